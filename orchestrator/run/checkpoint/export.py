"""`action=export run_dir=... [step=N]`: a Hugging Face `save_pretrained` directory (with its
tokenizer) from any periodic checkpoint of a run, consolidated from its shards in one process.

Written to `<run_dir>/export/step-<N>/model`, loadable with `from_pretrained` and usable as the
next step's `model.pretrained_path`; with `format=gguf`, `<run_dir>/export/step-<N>/model-<dtype
or quant>.gguf` for llama.cpp instead (gguf_export.py), made from such a directory.

torch strategies: torch.distributed.checkpoint resharded into one whole copy. DeepSpeed (ZeRO
1-3): its own consolidation, `deepspeed.utils.zero_to_fp32`, of the fp32 master weights of every
partition (on the CPU, no process group); stage 0 (no ZeRO) holds the whole module already.
A bf16 DeepSpeed run thus exports its fp32 masters (rounded to bf16: the run's saved model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestrator.common import checkpoints
from orchestrator.common.errors import ConfigError
from orchestrator.common.units import human_bytes
from orchestrator.config.schema import JobConfig
from orchestrator.run.checkpoint import gguf_export
from orchestrator.run.checkpoint.final import MODEL_DIR, save_final

EXPORT_DIR = "export"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


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
    """Consolidate the chosen checkpoint's model weights and save them (a Hugging Face
    directory, or a GGUF file made from one); returns what was written."""
    from orchestrator.config.load import load_job
    from orchestrator.data import tokenizer_file, uses_bpe

    resume = _checkpoint(job)
    out = Path(job.run_dir) / EXPORT_DIR / resume.path.name
    saved = load_job(resume.path / checkpoints.CONFIG)  # the run as it was trained
    gguf = job.format == "gguf"
    target = out / (gguf_export.file_name(job.dtype or "f16", job.quant) if gguf else MODEL_DIR)
    if target.exists() and not job.run.overwrite:  # before consolidating
        raise ConfigError("run.overwrite", False, f"true to replace {target} (an earlier export: "
                          "it is deleted), or move it away first")
    bpe = tokenizer_file(saved) if uses_bpe(saved) else None
    if gguf:  # what GGUF cannot hold is refused before anything is consolidated
        gguf_export.check_model(saved.model.family)
        gguf_export.check_tokenizer(_tokenizer_json(bpe))
    print(f"export plan: {target} from {resume.path.name}, {_planned(saved, job)}")
    out.mkdir(parents=True, exist_ok=True)
    if not gguf:
        return _save_hf(saved, resume.path, out, bpe, job.dtype)
    with tempfile.TemporaryDirectory(dir=out, prefix=".gguf-source-") as tmp:
        source = _save_hf(saved, resume.path, Path(tmp), bpe, None)
        return gguf_export.write_gguf(source, saved.model.family, target, job.dtype or "f16",
                                      job.quant, byte_tokenizer=bpe is None,
                                      name=saved.model.name)


def _planned(saved: JobConfig, job: JobConfig) -> str:
    """What the export will write, from the model's parameter shapes (nothing allocated)."""
    from orchestrator.models.spec_cache import cached_specs

    shapes = {s.name: s.shape for s in cached_specs(saved.model)}
    if job.format == "gguf":
        size = gguf_export.planned_bytes(shapes, saved.model.family, job.dtype or "f16",
                                         job.quant)
        what = f"{job.quant if job.quant != 'none' else job.dtype or 'f16'} tensors"
    else:
        width = DTYPES[job.dtype].itemsize if job.dtype else 4
        size, what = sum(int(np.prod(s)) for s in shapes.values()) * width, "weights"
    return f"{len(shapes)} tensors, {human_bytes(size)} of {what}"


def _tokenizer_json(bpe: Path | None) -> Path | None:
    """The tokenizer.json of the run's tokenizer (None: bytes)."""
    from orchestrator.data.tokenizer import TOKENIZER_JSON, hf_dir

    if bpe is None:
        return None
    folder = hf_dir(bpe)
    return folder / TOKENIZER_JSON if folder is not None else bpe


def _save_hf(saved: JobConfig, checkpoint: Path, out: Path, bpe: Path | None,
             dtype: str | None) -> Path:
    """The checkpoint's weights as a save_pretrained directory `out/model` (in `dtype`, or
    as trained), with the tokenizer."""
    from orchestrator.models.build import build_model
    from orchestrator.run.strategies.base import Engine
    from orchestrator.transforms.converters import apply_converters

    with torch.device("cpu"):  # the converters that shape the saved parameters
        model = apply_converters(build_model(saved.model, seed=saved.train.seed), saved,
                                 names=("lora", "dpo_reference"))
    if saved.parallelism.backend == "deepspeed":
        _load_deepspeed(model, checkpoint)
    else:
        _load_dcp(model, checkpoint)
    if dtype is not None:
        model.to(DTYPES[dtype])
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.0), saved, "cpu")
    final = save_final(engine, out, 0, bpe)
    assert final is not None
    return final
