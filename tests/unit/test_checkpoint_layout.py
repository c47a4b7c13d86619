"""DCP checkpoints key the optimizer's hyperparameters by parameter name (pipeline stages each
hold different parameters, and DCP keeps one rank's copy of a shared key); checkpoints written
before that keep one `optim.param_groups` list, and still resume: the loader reads which layout
the files hold from their metadata."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from orchestrator.run.strategies.base import (
    DCP_OPTIONS,
    LEGACY_DCP_OPTIONS,
    Engine,
    flat_optimizer_state,
)
from tests.conftest import make_job


def _engine(seed: int) -> Engine:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    return Engine(model, optimizer, make_job(["logging=none"]), "cpu")


def _step(engine: Engine) -> None:
    engine.model(torch.ones(3, 4)).sum().backward()
    engine.optimizer.step()
    engine.optimizer.zero_grad()


def test_both_checkpoint_layouts_resume_with_the_optimizer_state(tmp_path: Path,
                                                                  one_rank_group: None) -> None:
    """Saved in either layout after 2 steps, loaded into a fresh engine: the same weights, Adam
    moments and betas. (nn.Sequential names its parameters "0.weight": a flat key
    `optim.param_groups.0.weight.lr` must not pass for the old layout.)"""
    saved = _engine(0)
    _step(saved)
    _step(saved)
    for name, options in (("legacy", LEGACY_DCP_OPTIONS), ("flat", DCP_OPTIONS)):
        model, optim = get_state_dict(saved.model, saved.optimizer, options=options)
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(tmp_path / name))
        assert flat_optimizer_state(tmp_path / name) is (name == "flat")
        loaded = _engine(1)
        loaded.load_checkpoint(tmp_path / name)
        for a, b in zip(saved.model.parameters(), loaded.model.parameters(), strict=True):
            assert torch.equal(a, b)
            assert torch.equal(saved.optimizer.state[a]["exp_avg"],
                               loaded.optimizer.state[b]["exp_avg"])
        assert loaded.optimizer.param_groups[0]["betas"] == (0.8, 0.9)
