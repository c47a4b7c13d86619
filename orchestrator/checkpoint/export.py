"""`action=export run_dir=... [step=N]`: a Hugging Face `save_pretrained` directory (with its
tokenizer) from any periodic checkpoint of a run, consolidated from its shards in one process.

Written to `<run_dir>/export/step-<N>/model`, loadable with `from_pretrained` and usable as the
next step's `model.pretrained_path`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.checkpoint import periodic
from orchestrator.checkpoint.final import save_final
from orchestrator.errors import ConfigError
from orchestrator.schema import JobConfig

EXPORT_DIR = "export"


def _checkpoint(job: JobConfig) -> periodic.Resume:
    found = periodic.complete(job.run_dir)
    if not found:
        raise ConfigError("run_dir", job.run_dir, "a run directory holding complete checkpoints "
                          "(checkpoints/step-*; train with checkpoint.every_steps > 0)")
    if job.step is None:
        path = found[-1]
    else:
        path = Path(job.run_dir) / periodic.ROOT / periodic.step_name(job.step)
        if path not in found:
            steps = ", ".join(str(int(p.name[len(periodic.PREFIX):])) for p in found)
            raise ConfigError("step", job.step, f"a step with a complete checkpoint: {steps}")
    return periodic.read(path, "export")


def export(job: JobConfig) -> Path:
    """Consolidate the chosen checkpoint's model weights and save them; returns the model dir."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from orchestrator.data import tokenizer_file, uses_bpe
    from orchestrator.models import build_model
    from orchestrator.strategies.base import Engine
    from orchestrator.typed import load_job

    resume = _checkpoint(job)
    saved = load_job(resume.path / periodic.CONFIG)  # the run as it was trained
    if saved.parallelism.backend == "deepspeed":
        raise ConfigError("run_dir", job.run_dir, "a run trained with parallelism.backend="
                          "'torch' (exporting DeepSpeed checkpoints is not supported yet)")
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_model(saved.model, seed=saved.train.seed, lora=saved.lora,
                            dpo_beta=saved.dpo_beta)
        state = {"model": get_model_state_dict(model)}
        load(state, checkpoint_id=str(resume.path))  # resharded into one whole copy
        set_model_state_dict(model, state["model"])
        engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.0), saved, "cpu")
        out = Path(job.run_dir) / EXPORT_DIR / resume.path.name
        out.mkdir(parents=True, exist_ok=True)
        bpe = tokenizer_file(saved) if uses_bpe(saved) else None
        final = save_final(engine, out, 0, bpe)
    finally:
        if own_group:
            dist.destroy_process_group()
    assert final is not None
    return final
