"""A background checkpoint holds the weights of the step it was taken at, even when the copy to
host memory (staging) is slower than the next step: the optimizer step waits for it (issue 27).

On this CPU the real copy of a small model ends long before the next optimizer step, so the
race never shows; here DCP's own stager copies only after a delay, and the step that follows
the save must still leave the checkpoint's weights untouched."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from orchestrator.common.contract import CONFIG_YAML
from orchestrator.run.checkpoint.periodic import Saver
from orchestrator.run.distributed import RankInfo
from orchestrator.run.setup import build_for_rank, setup
from tests.conftest import make_job

DELAY_S = 0.5  # a copy that starts after the next step's optimizer step would have run


class LateStager:
    """DCP's DefaultStager (synchronous copy), run in a thread of its own after `DELAY_S`."""

    def __init__(self) -> None:
        self.copy = DefaultStager(StagingOptions(False, False, False, False))
        self.pool = ThreadPoolExecutor(1)

    def stage(self, state_dict: dict[str, Any]) -> Future:
        return self.pool.submit(self._late, state_dict)

    def _late(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        time.sleep(DELAY_S)
        return self.copy.stage(state_dict)

    def close(self) -> None:
        self.pool.shutdown()
        self.copy.close()


def test_the_step_after_a_background_save_waits_for_its_copy(tmp_path: Path,
                                                             one_rank_group: None) -> None:
    job = make_job(["model=gpt2_tiny", "+recipe=fsdp_zero3", "checkpoint.async_save=true",
                    "logging=none"], str(tmp_path))
    (tmp_path / CONFIG_YAML).write_text("{}\n")  # the commit copies the run's config
    engine = setup(build_for_rank(job, RankInfo(0, 1, 0, "cpu")), job, "cpu")
    saver = Saver(engine, job, on_commit=lambda _: None)
    saver.stager.close()
    saver.stager = LateStager()
    batch = {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.randint(0, 256, (2, 16))}
    engine.train_step([batch])
    saved = {name: p.detach().full_tensor().clone() for name, p in engine.model.named_parameters()}
    final = saver.save(1, {})
    engine.train_step([batch])  # changes every weight: it must wait for the copy first
    stepped = {name: p.detach().full_tensor() for name, p in engine.model.named_parameters()}
    saver.close()
    dcp_to_torch_save(final, tmp_path / "flat.pt")
    written = torch.load(tmp_path / "flat.pt", weights_only=True)["model"]
    assert saver.pending is None and final.is_dir()
    changed = [name for name in saved if not torch.equal(saved[name], stepped[name])]
    assert len(changed) > len(saved) // 2  # the second step did change the weights
    for name, tensor in saved.items():
        assert torch.equal(written[name], tensor), name
