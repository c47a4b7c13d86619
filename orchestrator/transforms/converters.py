"""Model converters: the changes made to a freshly built model before a strategy wraps it, as
one ordered list (torchtitan's model converters). Each has `check(job, device, hw)`, run by the
pre-launch checks without torch (one line, exit 2), and `apply(model, job)`, run in every rank by
`run/setup.py: build_for_rank`, on rank 0's real model and the other ranks' meta-device copies
alike. The order, and why:

1. `lora` — peft's adapters around the chosen layers; the base weights are frozen.
2. `dpo_reference` — the policy paired with a frozen copy of itself (after LoRA: the reference
   is the adapted model as it starts).
3. `qat` — int8 fake-quantized linear layers (torchao), on the model as it will be trained.
4. `float8` — torchao `Float8Linear` layers (`precision=fp8`).
5. `activation_checkpointing` — each block recomputes its activations in backward (before
   compile, as torchtitan orders them: the compiled block includes the checkpointing).
6. `compile` — `torch.compile` of each transformer block in place, last: it compiles the
   layers the converters above put there, and the strategy then wraps the compiled blocks.

A new converter is one entry here (with its check) and, if it has keys, one config section.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.rules import positive
from orchestrator.config.schema import JobConfig

if TYPE_CHECKING:  # the checks run without torch
    from torch import nn


@dataclass(frozen=True)
class Converter:
    name: str
    enabled: Callable[[JobConfig], bool]
    apply: Callable[[Any, JobConfig], Any]  # (model, job) -> the converted model
    check: Callable[[JobConfig, str, Hardware], None] | None = None  # None: nothing to refuse


def _check_lora(job: JobConfig, device: str, hw: Hardware) -> None:
    from orchestrator.models.build import param_specs

    lo = job.lora
    if job.train.task != "pretrain":
        raise ConfigError("lora.rank", lo.rank, f"0 for train.task={job.train.task} (adapters "
                          "are trained, then merged into the saved model that it loads)")
    positive("lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        raise ConfigError("lora.dropout", lo.dropout, "a number in [0, 1)")
    names = {s.name.split(".")[-2] for s in param_specs(job.model) if "." in s.name}
    missing = [t for t in lo.target_modules if t not in names]
    if missing:
        raise ConfigError("lora.target_modules", missing, "module names of this model's linear "
                          "or embedding layers, e.g. " + ", ".join(sorted(names)))
    try:  # peft's own check: the layer types it can adapt
        param_specs(job.model, lo)
    except (ValueError, TypeError) as e:
        raise ConfigError("lora.target_modules", list(lo.target_modules),
                          f"layers peft can adapt ({str(e).splitlines()[0]})") from None


def _lora(model: nn.Module, job: JobConfig) -> nn.Module:
    from orchestrator.models.lora import apply_lora

    return apply_lora(model, job.lora)


def _dpo_reference(model: nn.Module, job: JobConfig) -> nn.Module:
    from orchestrator.models.preference import PreferenceModel

    assert job.dpo_beta is not None
    return PreferenceModel(model, job.dpo_beta)


def _check_qat(job: JobConfig, device: str, hw: Hardware) -> None:
    from orchestrator.quantization.checks import check_qat

    check_qat(job)


def _qat(model: nn.Module, job: JobConfig) -> nn.Module:
    from orchestrator.quantization.qat import prepare

    prepare(model)
    return model


def _check_float8(job: JobConfig, device: str, hw: Hardware) -> None:
    from orchestrator.quantization.fp8 import check

    check(job, device, hw)


def _float8(model: nn.Module, job: JobConfig) -> nn.Module:
    from orchestrator.quantization.fp8 import to_float8

    to_float8(model, job.precision.fp8_filter, job.precision.fp8_all_gather)
    return model


def _activation_checkpointing(model: nn.Module, job: JobConfig) -> nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _check_compile(job: JobConfig, device: str, hw: Hardware) -> None:
    from orchestrator.transforms.compile import check

    check(job, device)


def _compile(model: nn.Module, job: JobConfig) -> nn.Module:
    from orchestrator.transforms.compile import compile_blocks

    compile_blocks(model)
    return model


# DPO's rules (data, model family, beta, task) are the objective's, checked with it
# (planning/preflight.py); activation checkpointing refuses nothing.
CONVERTERS: tuple[Converter, ...] = (
    Converter("lora", lambda job: job.lora.rank > 0, _lora, _check_lora),
    Converter("dpo_reference", lambda job: job.dpo_beta is not None, _dpo_reference),
    Converter("qat", lambda job: job.precision.qat != "none", _qat, _check_qat),
    Converter("float8", lambda job: job.precision.name == "fp8", _float8, _check_float8),
    Converter("activation_checkpointing", lambda job: job.train.activation_checkpointing,
              _activation_checkpointing),
    Converter("compile", lambda job: job.train.compile, _compile, _check_compile),
)


def enabled(job: JobConfig, names: Sequence[str] | None = None) -> list[Converter]:
    """The job's converters in their order (only those named in `names`, when given)."""
    return [c for c in CONVERTERS if c.enabled(job) and (names is None or c.name in names)]


def check_converters(job: JobConfig, device: str, hw: Hardware) -> None:
    """Refuse, in one line, a converter the job cannot use (before launch, no torch)."""
    for converter in enabled(job):
        if converter.check is not None:
            converter.check(job, device, hw)


def apply_converters(model: nn.Module, job: JobConfig,
                     names: Sequence[str] | None = None) -> nn.Module:
    """`model` with the job's converters applied in order (only `names`, when given)."""
    for converter in enabled(job, names):
        model = converter.apply(model, job)
    return model
