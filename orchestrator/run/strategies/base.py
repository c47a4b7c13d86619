"""The `Engine` every strategy returns, and the one train step they share.

Strategies differ only in how they wrap the model and optimizer, how they skip gradient sync
on accumulation micro-steps, and which tensors they hold; the step itself is written once.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.tensor import DTensor

from orchestrator.config.derived import optimizer_kernel
from orchestrator.config.schema import JobConfig
from orchestrator.models.storage import storage_bytes
from orchestrator.run import precision as prec

Probe = Callable[[str], None]
DCP_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# checkpoints written before the flattened layout: one `optim.param_groups` list
LEGACY_DCP_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=False)


def flat_optimizer_state(path: Path) -> bool:
    """Whether the DCP checkpoint at `path` keys its optimizer hyperparameters by parameter
    name (`optim.param_groups.<name>.lr`, DCP_OPTIONS), read from its metadata file."""
    from torch.distributed.checkpoint import FileSystemReader

    prefix = "optim.param_groups."
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # legacy: optim.param_groups.<group index>.<hyperparameter>; flat: ...<parameter name>.lr
    legacy = (k[len(prefix):].split(".") for k in keys if k.startswith(prefix))
    return not any(len(parts) == 2 and parts[0].isdigit() for parts in legacy)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of all of `t`: a DTensor's full value (gathered if sharded), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters the optimizer steps (frozen LoRA base weights are left out)."""
    return [p for p in params if p.requires_grad]


def build_optimizer(params: Iterable[nn.Parameter], job: JobConfig) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_class(job)
    return cls(trainable(params), **kwargs)


# optim.implementation -> torch's optimizer arguments
KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True},
           "for_loop": {"foreach": False, "fused": False}}


def optimizer_class(job: JobConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    cfg, args = job.optim, KERNELS[optimizer_kernel(job)]
    if cfg.name == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps,
                                   "weight_decay": cfg.weight_decay, **args}
    return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum,
                             "weight_decay": cfg.weight_decay, **args}


def on_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device (shapes only, no storage)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move a real model to `device`; give a meta-device one uninitialised storage there (its
    values are then received from rank 0). Conversion swaps the new tensors into the existing
    Parameter objects, so tied weights (GPT-2's head and embedding) stay one parameter."""
    if not on_meta(model):
        return model.to(device)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@torch.no_grad()
def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's, one collective per tensor."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t, src=0)


def background_writer(path: Path) -> Any:
    """The files writer of a background save. The staged state is in host memory already, so
    it is written without DCP's overlapping loader (`per_thread_copy_ahead=0`): with one thread
    and CUDA available that loader synchronizes a stream on the writer thread's current device,
    GPU 0 on every rank, opening a CUDA context there from each (torch/distributed/checkpoint/
    filesystem.py: `_write_files_from_queue`)."""
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(path), per_thread_copy_ahead=0)


def token_sums(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """[summed token loss, scored tokens, correct argmax predictions] of one batch's logits
    (`shift` for causal LMs, whose position t predicts token t+1; -100 is not scored)."""
    logits = logits.float()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    scored = labels != -100
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    correct = ((logits.argmax(-1) == labels) & scored).sum()
    return torch.stack([loss, scored.sum().float(), correct.float()])


class Engine:
    """What the loop sees: `train_step`, the optimizer (for the LR schedule) and measurements."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, job: JobConfig,
                 device: str, scaler: Any = None, set_to_none: bool = True) -> None:
        self.model, self.optimizer, self.job, self.device = model, optimizer, job, device
        self.scaler = scaler
        self.set_to_none = set_to_none
        self.probe: Probe | None = None  # called at "after_forward" / "after_backward"
        # the model output's own `metrics` (e.g. DPO reward accuracy), mean over micro batches
        self.step_metrics: dict[str, torch.Tensor] = {}
        self.compiled_blocks = 0  # transformer blocks compiled in place (`train.compile`)
        self.step = 0  # the optimizer step being taken (set by the loop)
        # what the ranks hold otherwise than checkpoints and the saved model do (a pipeline's
        # tied head, GPT-2's regrouped attention columns): to_checkpoint / from_checkpoint /
        # to_whole, applied in order (undone in reverse)
        self.adapters: list[Any] = []

    # -- strategy hooks -------------------------------------------------------------------
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip gradient communication on accumulation micro-steps that are not the last."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return prec.autocast(self.job.precision.name, self.device)

    def loss_context(self) -> contextlib.AbstractContextManager[Any]:
        """Around a forward and its backward: what the model's loss needs (tensor
        parallelism: the vocabulary-parallel cross-entropy, as the head's logits stay split by
        vocabulary: run/mesh.py)."""
        if self.job.parallelism.tensor_parallel == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def precision_metrics(self) -> dict[str, float]:
        """fp16: `loss_scale` and `overflow_steps` (the steps skipped on an inf/NaN gradient so
        far), the same on every rank; nothing for other precisions."""
        if self.scaler is None:
            return {}
        return prec.loss_scale_metrics(self.scaler, self.local_optimizer(), self.step)

    def local_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps this rank's parameters (ZeRO-1 wraps one)."""
        return self.optimizer

    def backward_scale(self) -> float:
        """1, or inf on `debug.inf_grad_at_step` (every gradient becomes non-finite)."""
        return math.inf if self.job.debug.inf_grad_at_step == self.step else 1.0

    def optimizer_state(self) -> Iterator[torch.Tensor]:
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    def held_tensors(self) -> dict[str, Iterable[torch.Tensor]]:
        params = list(self.model.parameters())
        return {
            "params_bytes": params,
            "grads_bytes": [p.grad for p in params if p.grad is not None],
            "optimizer_bytes": list(self.optimizer_state()),
        }

    def hf_model(self) -> nn.Module:
        """The underlying transformers model (for its config and `save_pretrained`)."""
        return getattr(self.model, "module", self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (collective: every rank must call it)."""
        return self.hf_model().state_dict()

    def save_checkpoint(self, path: Path) -> None:
        """Every rank writes its share of the model and optimizer state to `path` with
        torch.distributed.checkpoint (a collective; replicated tensors are written once)."""
        import torch.distributed.checkpoint as dcp

        model, optim = self._dcp_state()
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(path))

    def async_save_checkpoint(self, path: Path, group: Any, stager: Any) -> Any:
        """`save_checkpoint` in the background (DCP's async_save): returns DCP's
        `AsyncSaveResponse` at once; `stager` (a DCP DefaultStager with async staging, kept for
        the run: it re-uses its host copy) copies the state to host memory in a thread of its
        own (`staging_completion`), then the files are written (`upload_completion`). Its
        collectives run on `group`, a gloo group of its own, so they never interleave with the
        training step's."""
        import torch.distributed.checkpoint as dcp

        model, optim = self._dcp_state()
        return dcp.async_save({"model": model, "optim": optim}, checkpoint_id=str(path),
                              storage_writer=background_writer(path), process_group=group,
                              async_stager=stager)

    def load_checkpoint(self, path: Path) -> None:
        """Load `save_checkpoint`'s files, resharded to this engine's layout and world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        options = DCP_OPTIONS if flat_optimizer_state(path) else LEGACY_DCP_OPTIONS
        model, optim = self._dcp_state(options)
        state = {"model": model, "optim": optim}
        dcp.load(state, checkpoint_id=str(path))
        self._from_checkpoint(state["model"], state["optim"])
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)

    def _dcp_state(self, options: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and optimizer's state as DCP saves and loads them: keyed by parameter
        name, the optimizer's hyperparameters too (`param_groups.<name>.lr`), so that ranks
        holding different parameters (pipeline stages) never write one shared
        `param_groups` entry, of which DCP would keep only the first rank's."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer,
                                      options=options or DCP_OPTIONS)
        for adapter in self.adapters:
            adapter.to_checkpoint(model, optim)
        return model, optim

    def _from_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """After DCP filled `_dcp_state`'s dicts: back to this rank's own names and layout."""
        for adapter in reversed(self.adapters):
            adapter.from_checkpoint(model, optim)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor], shift: bool) -> torch.Tensor:
        """[summed token loss, scored tokens, correct argmax predictions] for one batch
        (`shift` for causal LMs, whose position t predicts token t+1)."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        with self.loss_context(), self.autocast():
            logits = whole(self.model(**inputs).logits).float()
        return token_sums(logits, inputs["labels"], shift)

    # -- shared -----------------------------------------------------------------------------
    def collect(self, output: Any, n: int) -> None:
        """Add one micro batch's extra metrics (if its output has any) to `step_metrics`."""
        for k, v in getattr(output, "metrics", {}).items():
            self.step_metrics[k] = self.step_metrics.get(k, 0) + v.detach().float() / n

    def model_state_bytes(self) -> dict[str, int]:
        """Measured bytes of parameters, gradients and optimizer state held by this rank now."""
        return storage_bytes(self.held_tensors())

    def warm_up(self, batch: dict[str, torch.Tensor]) -> None:
        """One forward and backward of `batch` as in `train_step`, with its gradient
        communication, then nothing of it kept: gradients zeroed, no optimizer step, the RNG
        state restored. Compiled blocks compile their forward and backward graphs here, so
        the first train step runs already compiled (a collective: every rank must call it)."""
        cuda = self.device == "cuda"
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.no_sync(True), self.loss_context():
            with self.autocast():
                loss = self.model(**inputs).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Forward + backward over the micro batches, then clip and step. Returns the mean loss."""
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        self.step_metrics = {}
        for i, batch in enumerate(micro_batches):
            total += self.micro_step(batch, n, last=i == n - 1)
        self.finish_step()
        return total

    def micro_step(self, batch: dict[str, torch.Tensor], n: int, last: bool) -> torch.Tensor:
        """Forward and backward of one of the step's `n` micro batches (gradient sync on the
        `last`); returns its share of the step's mean loss."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.no_sync(last), self.loss_context():
            with self.autocast():
                output = self.model(**inputs)
                loss = output.loss / n
            self.collect(output, n)
            self.backward(loss, last)
        return whole(loss.detach()).float()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """The model state's probe after the step's last forward, then `loss`'s backward
        (scaled by fp16's grad scaler, or by `debug.inf_grad_at_step`)."""
        if last and self.probe:
            self.probe("after_forward")
        scale = self.backward_scale()
        scaled = loss if scale == 1 else loss * scale
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def clip(self, max_norm: float) -> None:
        """Scale the gradients to a global norm of at most `max_norm`."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def finish_step(self) -> None:
        """After the step's backwards: unscale, clip and step the optimizer, free gradients."""
        if self.probe:
            self.probe("after_backward")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.job.train.grad_clip > 0:
            self.clip(self.job.train.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
