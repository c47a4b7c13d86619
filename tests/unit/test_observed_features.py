"""Features whose effect the losses barely or never show, observed directly: activation
checkpointing (each block runs forward again in backward), gradient accumulation without
communication on the micro batches before the last, and mixed precision (the dtype the matmuls
compute in). In-process on a one-rank gloo group, through the real per-rank program
(`recipes.pretrain.PretrainRecipe`: model build, checkpointing, strategy set-up, data, the loop;
it also sets the process's parent-death signal, as every rank does)."""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from orchestrator.config.derived import optimizer_kernel
from orchestrator.config.load import config_text
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.run.strategies.base import Engine
from recipes.pretrain import PretrainRecipe
from tests.conftest import make_job

RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def rank_env() -> Iterator[None]:
    """A one-rank recipe sets torchrun's variables in this process: take them away after."""
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_one_rank(run_dir: Path, overrides: list[str],
                   observe: Callable[[Engine], None] = lambda engine: None) -> list[float]:
    """Run the pre-training recipe as its one rank in this process; `observe` sees the engine
    after set-up, before the first step."""
    job = make_job(["cluster.gpus_per_node=1", "logging=none", "train.save_model=false",
                    *overrides], run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_text(job))
    make_plan(job, "cpu", 1).write(run_dir / "plan.json")
    recipe = PretrainRecipe(str(run_dir / "config.yaml"))
    failed = True
    with rank_env():
        try:
            recipe.setup()
            assert dist.get_world_size() == 1
            observe(recipe.engine)
            losses = recipe.train()
            failed = False
        finally:
            recipe.cleanup(failed=failed)
    return losses


# -- activation checkpointing --------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["ddp", "fsdp_zero3"])
def test_activation_checkpointing_runs_each_block_forward_again_in_backward(
        tmp_path, recipe: str) -> None:
    """Checkpointing: every block's MLP is called twice per micro batch (once more in backward,
    to rebuild the activations the block did not keep); without it, once. The recomputation is
    exact: the losses equal those of the same run without checkpointing.

    Counted with a forward *pre*-hook on a submodule: transformers checkpoints the block's
    `forward`, not its `__call__`, so hooks on the block fire once either way, and torch's
    recomputation stops as soon as the last tensor backward needs is rebuilt, before the
    block's last submodule's forward hooks would run."""
    steps, calls = 3, {}

    def count_block_calls(key: str) -> Callable[[Engine], None]:
        def observe(engine: Engine) -> None:
            blocks = engine.hf_model().transformer.h
            calls[key] = [0] * len(blocks)
            for i, block in enumerate(blocks):
                block.mlp.register_forward_pre_hook(
                    lambda *_, i=i: calls[key].__setitem__(i, calls[key][i] + 1))
        return observe

    base = [f"+recipe={recipe}", f"train.steps={steps}"]
    on = train_one_rank(tmp_path / "on", [*base, "train.activation_checkpointing=true"],
                        count_block_calls("on"))
    off = train_one_rank(tmp_path / "off", base, count_block_calls("off"))
    assert calls == {"on": [2 * steps] * 2, "off": [steps] * 2}
    # measured: identical (0.0) under DDP and FSDP2 ZeRO-3 alike
    assert max(abs(a - b) for a, b in zip(on, off, strict=True)) <= 1e-6
    assert off[-1] < off[0]


# -- gradient accumulation without communication --------------------------------------------------

ACCUM = 4


@pytest.mark.parametrize("recipe", ["ddp", "zero1"])
def test_ddp_all_reduces_gradients_once_per_step_not_per_micro_batch(tmp_path, recipe: str):
    """With grad_accum_steps=4, DDP's gradient all-reduce (seen through a comm hook that counts,
    then runs the real all-reduce) happens only in the backward of the 4th micro batch of each
    step; without no_sync it would run in every micro batch's backward."""
    steps, micro, reduced = 2, [0], []

    def observe(engine: Engine) -> None:
        ddp = engine.model
        ddp.module.register_forward_pre_hook(lambda *_: micro.__setitem__(0, micro[0] + 1))

        def hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the real annotations,
            reduced.append(micro[0])  # which `from __future__ import annotations` turns to str
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
                lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, hook)

    losses = train_one_rank(tmp_path, [f"+recipe={recipe}", f"train.steps={steps}",
                                       f"train.grad_accum_steps={ACCUM}"], observe)
    assert len(losses) == steps and micro[0] == steps * ACCUM
    per_micro_batch = Counter(reduced)  # micro batches numbered 1.. across the steps
    assert sorted(per_micro_batch) == [ACCUM * s for s in range(1, steps + 1)]
    assert len(set(per_micro_batch.values())) == 1  # the same buckets in every step


def test_fsdp_reduce_scatters_gradients_only_after_the_last_micro_batch(tmp_path) -> None:
    """FSDP2 with grad_accum_steps=4: the sharded gradients (what reduce-scatter writes) do not
    exist before the last micro batch's backward of each step; with gradient sync on every
    micro batch they would exist from the first backward on."""
    seen: list[bool] = []  # before each forward, then before each optimizer step

    def observe(engine: Engine) -> None:
        model = engine.model

        def sharded_grads(*_: object) -> None:  # any sharded gradient written yet this step?
            # (the root keeps its unsharded plain parameters registered until it reshards)
            seen.append(any(isinstance(p, DTensor) and p.grad is not None
                            for p in model.parameters()))

        model.register_forward_pre_hook(sharded_grads)
        engine.optimizer.register_step_pre_hook(sharded_grads)

    train_one_rank(tmp_path, ["+recipe=fsdp_zero2", "train.steps=2",
                              f"train.grad_accum_steps={ACCUM}"], observe)
    assert seen == ([False] * ACCUM + [True]) * 2


# -- mixed precision -------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("recipe", ["ddp", "fsdp_zero3"])
def test_mixed_precision_computes_in_low_precision_over_fp32_weights(
        tmp_path, recipe: str, precision: str) -> None:
    """The blocks' matmuls (autocast under DDP, FSDP2's parameter cast under ZeRO-3) produce
    bf16 / fp16 outputs, while the weights the optimizer steps stay fp32."""
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    outputs: list[torch.dtype] = []
    stepped: list[torch.dtype] = []

    def observe(engine: Engine) -> None:
        for block in engine.hf_model().transformer.h:
            block.mlp.c_fc.register_forward_hook(lambda _m, _i, out: outputs.append(out.dtype))
        engine.optimizer.register_step_post_hook(lambda opt, *_: stepped.extend(
            p.dtype for group in opt.param_groups for p in group["params"]))

    losses = train_one_rank(tmp_path, [f"+recipe={recipe}", f"precision={precision}",
                                       "train.steps=1"], observe)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert outputs == [want] * 2
    assert stepped and set(stepped) == {torch.float32}


# -- the optimizer's kernel ----------------------------------------------------------------------

def profiled_steps(engine: Engine, steps: list[Counter[str]]) -> None:
    """Profile every optimizer step of `engine`: the names of the ops it ran, one Counter each."""
    opt, prof = engine.local_optimizer(), []

    def start(*_: object) -> None:
        prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        prof[-1].start()

    def stop(*_: object) -> None:
        prof[-1].stop()
        steps.append(Counter(event.name for event in prof[-1].events()))

    opt.register_step_pre_hook(start)
    opt.register_step_post_hook(stop)


@pytest.mark.parametrize("recipe", ["ddp", "fsdp_zero3"])
def test_the_optimizer_steps_with_the_kernel_chosen(tmp_path, recipe: str) -> None:
    """`optim.implementation`, seen in a profile of each optimizer step: fused runs torch's
    `_fused_adamw_` over every tensor (FSDP2's DTensor parameters too, for which torch by
    itself picks the per-tensor loop), foreach its multi-tensor ops, for_loop one `addcdiv_`
    per tensor; the losses agree within float rounding whichever kernel steps."""
    tensors = len(list(build_model(make_job([]).model, seed=0).parameters()))
    losses = {}
    for chosen in ("fused", "foreach", "for_loop"):
        steps: list[Counter[str]] = []
        losses[chosen] = train_one_rank(
            tmp_path / chosen, [f"+recipe={recipe}", "train.steps=3",
                                f"optim.implementation={chosen}"],
            lambda engine, steps=steps: profiled_steps(engine, steps))
        assert len(steps) == 3
        for ops in steps:
            fused, foreach = ops["aten::_fused_adamw_"] > 0, ops["aten::_foreach_addcdiv_"] > 0
            assert (fused, foreach) == (chosen == "fused", chosen == "foreach"), ops
            if chosen == "for_loop":  # (on CPU the foreach ops also loop, inside the kernel)
                assert ops["aten::addcdiv_"] >= tensors, ops
    assert losses["fused"][-1] < losses["fused"][0]
    for other in ("foreach", "for_loop"):  # measured over 20 steps: 4.8e-7 from fused
        assert max(abs(a - b) for a, b in zip(losses[other], losses["fused"], strict=True)) \
            <= 1e-5


@pytest.mark.parametrize(("overrides", "want"), [
    ([], "fused"), (["precision=bf16"], "fused"), (["precision=fp16"], "for_loop"),
    (["+recipe=deepspeed_zero2", "precision=fp16"], "fused"),  # DeepSpeed's own loss scaler
    (["optim.implementation=foreach"], "foreach")])
def test_auto_is_the_fused_kernel_but_under_torchs_fp16_loss_scaler(overrides: list[str],
                                                                   want: str) -> None:
    assert optimizer_kernel(make_job(overrides)) == want
