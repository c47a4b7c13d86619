"""Every ZeRO stage (0-3, optional CPU offload) on a DeepSpeed engine.

The DeepSpeed config is the one the plan generated and wrote to `<run_dir>/deepspeed.json`
(byte-for-byte what `action=plan` showed), with secrets redacted: their real values come from
the job's `parallelism.deepspeed`, which `load_job` restored from this rank's environment
(never from a file), and DeepSpeed's own logging of its config is scrubbed of them. Our
optimizer is a client `torch.optim` one, so no fused-Adam build is needed; DeepSpeed handles
accumulation boundaries, clipping and fp16 loss scaling itself, which is why this engine
overrides the whole step.

Checkpoints are DeepSpeed's own (`<checkpoint>/deepspeed`); at another world size or ZeRO
stage they reload through its universal checkpoint (strategies/deepspeed_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.common.contract import DEEPSPEED_JSON
from orchestrator.common.secrets import find_secrets, restore, scrub, secret_values
from orchestrator.config.schema import JobConfig
from orchestrator.run.strategies.base import (
    Engine,
    broadcast_from_rank0,
    build_optimizer,
    materialize,
    trainable,
)
from orchestrator.run.strategies.deepspeed_checkpoint import (
    AS_SAVED,
    DS_TAG,
    UNIVERSAL,
    WEIGHTS,
    consolidated_state_dict,
    load_whole,
    reload_mode,
    resume_mode,
    saved_layout,
    to_universal,
)


class DeepSpeedEngine(Engine):
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        self.step_metrics = {}
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            output = self.model(**{k: v.to(self.model.device) for k, v in batch.items()})
            loss = output.loss
            self.collect(output, n)
            if last and self.probe:
                self.probe("after_forward")
            scale = self.backward_scale()
            # DeepSpeed scales by 1/accum and reduces at the accumulation boundary
            self.model.backward(loss if scale == 1 else loss * scale)
            if last and self.probe:
                self.probe("after_backward")
            self.model.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().float() / n
        return total

    def autocast(self) -> Any:
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def precision_metrics(self) -> dict[str, float]:
        """fp16: DeepSpeed's own count of skipped steps and its optimizer's current scale
        (`engine.loss_scale()` is the configured static scale, 0 for dynamic scaling)."""
        if self.job.precision.name != "fp16":
            return {}
        return {"loss_scale": float(self.model.optimizer.loss_scale),
                "overflow_steps": float(self.model.skipped_steps)}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.job.parallelism.zero_stage == 3:  # gathers the partitions onto rank 0
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.model.module.state_dict()

    def save_checkpoint(self, path: Path) -> None:
        """DeepSpeed's own format (every rank writes its ZeRO partition; a collective)."""
        self.model.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        """DeepSpeed's own loader, on the files as saved (the same world size and ZeRO stage)
        or on their universal form (converted once by rank 0); or the weights alone where
        that cannot carry the optimizer state (`reload_mode`)."""
        import torch.distributed as dist

        now, stage = dist.get_world_size(), self.job.parallelism.zero_stage
        saved = saved_layout(path)
        mode, why = reload_mode(saved, self.job, now)
        if mode == AS_SAVED and self.model.load_universal_checkpoint():
            mode = UNIVERSAL  # asked for in parallelism.deepspeed
        where = (f"at world size {now} from a checkpoint saved at world size {saved.world_size}"
                 f" (ZeRO-{stage}, saved with ZeRO-{saved.zero_stage})")
        if mode == WEIGHTS:
            self.load_weights(path)
            if dist.get_rank() == 0:
                print(f"warning: resuming DeepSpeed {where}: only the weights were loaded; the "
                      f"optimizer state ({saved.optimizer}) was NOT carried and restarts from "
                      f"zero ({why})", file=sys.stderr, flush=True)
            return
        root = path
        if mode == UNIVERSAL:
            if not self.model.load_universal_checkpoint():
                raise ValueError(f"resuming {where} needs DeepSpeed's universal checkpoint, and "
                                 "this engine was created without checkpoint.load_universal")
            root = to_universal(path)
            if dist.get_rank() == 0:
                print(f"resuming DeepSpeed {where}: loading its universal form "
                      f"{root / DS_TAG} (weights and optimizer state)", flush=True)
        loaded, _ = self.model.load_checkpoint(str(root), tag=DS_TAG)
        if loaded is None:
            raise ValueError(f"DeepSpeed found no checkpoint under {root / DS_TAG}")

    def load_weights(self, path: Path) -> None:
        """The checkpoint's consolidated fp32 weights into this engine (every rank reads them;
        ZeRO-3 gathers its partitions to take them), and the fp32 master partitions refreshed
        from them; the optimizer state stays as built (empty)."""
        import deepspeed

        state = consolidated_state_dict(path)
        module = self.model.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            load_whole(module, state, path)  # stages 0-2: a no-op context, every rank loads
        refresh = getattr(self.model.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def _zero_optimizer(self) -> Any:
        return self.model.optimizer

    def optimizer_state(self) -> Iterator[torch.Tensor]:
        inner = getattr(self._zero_optimizer(), "optimizer", self._zero_optimizer())
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    def held_tensors(self) -> dict[str, Iterable[torch.Tensor]]:
        opt = self._zero_optimizer()
        params, grads = [], []
        for p in self.model.module.parameters():
            params.append(p)
            if getattr(p, "ds_tensor", None) is not None:  # stage 3: this rank's partition
                params.append(p.ds_tensor)
            if p.grad is not None:
                grads.append(p.grad)
        # fp32 master partitions: DeepSpeed keeps them even for fp32 models (optimizer state).
        masters = [*getattr(opt, "single_partition_of_fp32_groups", []),
                   *getattr(opt, "fp32_partitioned_groups_flat", [])]
        for group in (getattr(opt, "averaged_gradients", None) or {}).values():
            grads.extend(group or [])
        grads.extend(m.grad for m in masters if m.grad is not None)
        return {"params_bytes": params, "grads_bytes": grads,
                "optimizer_bytes": [*self.optimizer_state(), *masters]}


def load_config(job: JobConfig) -> dict[str, Any]:
    """<run_dir>/deepspeed.json with the secrets of `parallelism.deepspeed` put back (the file
    holds them redacted; `parallelism.deepspeed` is merged over the generated config, so its
    paths are the file's)."""
    config = json.loads((Path(job.run_dir) / DEEPSPEED_JSON).read_text())
    return restore(config, find_secrets(job.parallelism.deepspeed))


class _Scrub(logging.Filter):
    """Replaces secret values in log records (DeepSpeed logs its whole config on rank 0)."""

    def __init__(self, values: list[str]) -> None:
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message, self.values)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _scrub_logs(passthrough: dict[str, Any]) -> None:
    values = secret_values(passthrough)
    if values:
        from deepspeed.utils import logger

        logger.addFilter(_Scrub(values))


def _without_inference_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce when it starts
    (its `deepspeed_shm_comm` op: a C++ compiler needed, and a minute of it per virtualenv)
    that only `inference_all_reduce` uses (AutoTP inference, deepspeed/module_inject);
    training's collectives go through torch.distributed. Marked incompatible in DeepSpeed's
    table of probed ops (`deepspeed.ops.__compatible_ops__`, a module-level dict it keeps so
    that edits persist), the backend starts without it. CUDA's accelerator has no such op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    import deepspeed
    import torch.distributed as dist

    config = load_config(job)
    if resume_mode(job, dist.get_world_size()) == UNIVERSAL:
        # only read by `load_checkpoint` (deepspeed.json, the plan's config, stays as it was)
        config = {**config, "checkpoint": {**config.get("checkpoint", {}),
                                           "load_universal": True}}
    _scrub_logs(job.parallelism.deepspeed)
    _without_inference_comm_op()
    # DeepSpeed's ZeRO calls torch's deprecated names for its collectives, and every call
    # printed torch's FutureWarning: nothing the user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                            r"(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    if dist.get_world_size() > 1:
        # Ranks other than 0 built the model on the meta device: give it storage on this rank's
        # device. `deepspeed.initialize` broadcasts rank 0's parameters itself
        # (runtime/engine.py: `_broadcast_model`, for a model not built under zero.Init), not
        # its buffers: those are copied here.
        target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
        materialize(model, target)
        broadcast_from_rank0(model.buffers())
    o = job.optim
    if device == "cuda" and job.parallelism.offload_optimizer and o.name == "adamw":
        # The optimizer steps on the host: DeepSpeed's vectorised CPU Adam (JIT-built once,
        # OMP_NUM_THREADS = the rank's share of the node) instead of torch's per-tensor AdamW.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable(model.parameters()), lr=o.lr,
                                     betas=(o.beta1, o.beta2), eps=o.eps,
                                     weight_decay=o.weight_decay, adamw_mode=True)
    else:
        optimizer = build_optimizer(model.parameters(), job)
    ds_engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                         config=config)
    return DeepSpeedEngine(ds_engine, ds_optimizer, job, device)
