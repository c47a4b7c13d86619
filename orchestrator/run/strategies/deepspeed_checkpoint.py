"""DeepSpeed checkpoints at another layout (world size or ZeRO stage), and as whole weights.

A checkpoint resumed at another world size or ZeRO stage goes through DeepSpeed's universal
checkpoint: rank 0 converts it once with `deepspeed.checkpoint.ds_to_universal` into
`<checkpoint>/universal` (the original is only read; a later resume re-uses it), and the engine
is created with `checkpoint.load_universal` so that its `load_checkpoint` repartitions the fp32
master weights and Adam's moments over the new ranks. DeepSpeed's universal format holds Adam's
state only: a checkpoint of another optimizer (SGD), or one crossing stage 0 (no partitions) or
stage 3 (a file layout of its own), reloads the weights alone (consolidated by
`deepspeed.utils.zero_to_fp32`, also what `action=export` uses) and restarts the optimizer
state, with a warning saying so. zero_to_fp32 and ds_to_universal unpickle DeepSpeed's
optimizer files in full, as DeepSpeed's own `load_checkpoint` does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.common import checkpoints
from orchestrator.config.resume import to_resume
from orchestrator.config.schema import JobConfig

DS_TAG = "deepspeed"  # the sub-directory of a checkpoint that holds DeepSpeed's files
UNIVERSAL_DIR = "universal"  # beside it: its universal form (`UNIVERSAL_DIR/DS_TAG`), on demand
AS_SAVED, UNIVERSAL, WEIGHTS = "as saved", "universal", "weights"  # how a checkpoint reloads


@dataclass(frozen=True)
class Saved:
    """What a periodic checkpoint was saved by (None: not recorded)."""

    world_size: int | None
    zero_stage: int | None
    optimizer: str | None


def saved_layout(path: Path) -> Saved:
    """From the checkpoint's `meta.json` (world size, strategy) and `config.yaml` (optimizer)."""
    import yaml

    try:
        meta = json.loads((path / checkpoints.META).read_text())
    except (OSError, ValueError):
        meta = {}
    try:
        optimizer = yaml.safe_load((path / checkpoints.CONFIG).read_text())["optim"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        optimizer = None
    strategy = meta.get("strategy") or [None, None]
    return Saved(meta.get("world_size"), strategy[1], optimizer)


def reload_mode(saved: Saved, job: JobConfig, world_size: int) -> tuple[str, str]:
    """How an engine of `job` at `world_size` reloads a checkpoint saved as `saved`, and why:
    AS_SAVED (the same world size and stage, or whole stage-0 replicas on both sides),
    UNIVERSAL (ZeRO partitions repartitioned between stages 1-2 or within stage 3, Adam on
    both sides) or WEIGHTS (anything else: the weights, no optimizer state)."""
    stage = job.parallelism.zero_stage
    if saved.world_size in (None, world_size) and saved.zero_stage in (None, stage):
        return AS_SAVED, "the same layout"
    if stage == 0 and saved.zero_stage == 0:
        return AS_SAVED, "whole replicas"
    if stage == 0 or saved.zero_stage == 0:
        return WEIGHTS, "DeepSpeed's universal checkpoint does not cover ZeRO-0"
    if saved.zero_stage is not None and (saved.zero_stage == 3) != (stage == 3):
        # DeepSpeed 0.19 looks for stage 3's per-rank model files only at stage 3, and for
        # stages 1-2's single one only there
        return WEIGHTS, "DeepSpeed's universal checkpoint does not cross between ZeRO-3 and 1-2"
    if job.optim.name != "adamw" or saved.optimizer not in (None, "adamw"):
        return WEIGHTS, "DeepSpeed's universal checkpoint holds Adam's state only"
    return UNIVERSAL, "repartitioned"


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights in the DeepSpeed checkpoint `path`, in fp32: ZeRO 1-3
    consolidated by `deepspeed.utils.zero_to_fp32` from every rank's fp32 master partition
    (frozen parameters too, at stages 2-3); stage 0's module (no ZeRO optimizer files) as
    saved. zero_to_fp32 unpickles DeepSpeed's optimizer files in full, as DeepSpeed's own
    `load_checkpoint` does; stage 0's file is read with `weights_only=True`."""
    from deepspeed.utils import zero_to_fp32

    files = path / DS_TAG
    if files.is_dir() and not any(files.glob("*_optim_states.pt")):
        saved = torch.load(zero_to_fp32.get_model_state_file(str(files), 0),
                           map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)


def load_whole(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """`consolidated_state_dict`'s weights into a whole (unpartitioned) model. ZeRO-1 keeps no
    copy of frozen parameters (LoRA's base weights): the model keeps the ones it was built
    with (model.pretrained_path's, never changed by training)."""
    result = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False)  # tied ones too
              if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"the DeepSpeed checkpoint {path} does not match the model: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def convert_to_universal(source: Path, out: Path) -> None:
    """DeepSpeed's `ds_to_universal` of the ZeRO checkpoint `source` (a `DS_TAG` directory)
    into `out/DS_TAG`, written under a temporary name and renamed into place: `out` is complete
    or absent. Serial (one worker), so the same checkpoint always converts to the same files;
    `source` is only read. The universal-checkpoint version marker that DeepSpeed expects a
    client to store is added (`inject_missing_state`): plain data-parallel ZeRO needs nothing
    else (no tensor/pipeline slicing patterns)."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report
            ds_to_universal.main(args)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / DS_TAG).is_dir():
                raise
            shutil.rmtree(tmp)  # another launch converted it first: the same files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_universal(path: Path) -> Path:
    """Every rank: the checkpoint root holding the universal form of `path`'s DeepSpeed files
    (`path/UNIVERSAL_DIR`), converted by rank 0 if it is not there yet while the other ranks
    wait; a failed conversion raises on every rank."""
    import torch.distributed as dist

    out = path / UNIVERSAL_DIR
    error = ""
    if dist.get_rank() == 0 and not (out / DS_TAG).is_dir():
        try:
            convert_to_universal(path / DS_TAG, out)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    box = [error]
    dist.broadcast_object_list(box, src=0)  # also the barrier after rank 0's conversion
    if box[0]:
        raise ValueError(f"cannot convert {path / DS_TAG} to DeepSpeed's universal checkpoint: "
                         f"{box[0]}")
    return out


def resume_mode(job: JobConfig, world_size: int) -> str | None:
    """`reload_mode` of the checkpoint this launch resumes (`to_resume`'s pick, quietly
    here: the recipe reports it and any error itself); None when it resumes none."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            resume = to_resume(job)
    except checkpoints.CheckpointError:
        return None
    return None if resume is None else reload_mode(saved_layout(resume.path), job, world_size)[0]
