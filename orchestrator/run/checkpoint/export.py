"""`action=export run_dir=... [step=N]`: a Hugging Face `save_pretrained` directory (with its
tokenizer) from any periodic checkpoint of a run, consolidated from its shards in one process.

Written to `<run_dir>/export/step-<N>/model`, loadable with `from_pretrained` and usable as the
next step's `model.pretrained_path`.

torch strategies: torch.distributed.checkpoint resharded into one whole copy. DeepSpeed (ZeRO
1-3): its own consolidation, `deepspeed.utils.zero_to_fp32`, of the fp32 master weights of every
partition (on the CPU, no process group); stage 0 (no ZeRO) holds the whole module already.
A bf16 DeepSpeed run thus exports its fp32 masters (rounded to bf16: the run's saved model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.common import checkpoints
from orchestrator.common.errors import ConfigError
from orchestrator.config.schema import JobConfig
from orchestrator.run.checkpoint.final import MODEL_DIR, save_final

EXPORT_DIR = "export"


def _checkpoint(job: JobConfig) -> checkpoints.Resume:
    found = checkpoints.complete(job.run_dir)
    if not found:
        raise ConfigError("run_dir", job.run_dir, "a run directory holding complete checkpoints "
                          "(checkpoints/step-*; train with checkpoint.every_steps > 0)")
    if job.step is None:
        path = found[-1]
    else:
        path = Path(job.run_dir) / checkpoints.ROOT / checkpoints.step_name(job.step)
        if path not in found:
            steps = ", ".join(str(int(p.name[len(checkpoints.PREFIX):])) for p in found)
            raise ConfigError("step", job.step, f"a step with a complete checkpoint: {steps}")
    return checkpoints.read(path, "export")


def _load_dcp(model: nn.Module, path: Path) -> None:
    """A torch strategy's DCP shards into `model`, resharded into one whole copy."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = {"model": get_model_state_dict(model)}
        load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
    finally:
        if own_group:
            dist.destroy_process_group()


def _load_deepspeed(model: nn.Module, path: Path) -> None:
    """DeepSpeed's checkpoint consolidated into `model` (strategies/deepspeed.py)."""
    from orchestrator.run.strategies.deepspeed_checkpoint import consolidated_state_dict, load_whole

    try:
        load_whole(model, consolidated_state_dict(path), path)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise checkpoints.CheckpointError(f"cannot consolidate the DeepSpeed checkpoint {path}: "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                       ) from None


def export(job: JobConfig) -> Path:
    """Consolidate the chosen checkpoint's model weights and save them; returns the model dir."""
    from orchestrator.config.load import load_job
    from orchestrator.data import tokenizer_file, uses_bpe
    from orchestrator.models.build import build_model
    from orchestrator.run.strategies.base import Engine
    from orchestrator.transforms.converters import apply_converters

    resume = _checkpoint(job)
    out = Path(job.run_dir) / EXPORT_DIR / resume.path.name
    if (out / MODEL_DIR).exists() and not job.run.overwrite:  # before consolidating
        raise ConfigError("run.overwrite", False, f"true to replace {out / MODEL_DIR} (an "
                          "earlier export: its files are deleted), or move it away first")
    saved = load_job(resume.path / checkpoints.CONFIG)  # the run as it was trained
    with torch.device("cpu"):  # the converters that shape the saved parameters
        model = apply_converters(build_model(saved.model, seed=saved.train.seed), saved,
                                 names=("lora", "dpo_reference"))
    if saved.parallelism.backend == "deepspeed":
        _load_deepspeed(model, resume.path)
    else:
        _load_dcp(model, resume.path)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.0), saved, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    bpe = tokenizer_file(saved) if uses_bpe(saved) else None
    final = save_final(engine, out, 0, bpe)
    assert final is not None
    return final
