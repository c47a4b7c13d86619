"""Disk full: metrics.jsonl only ever ends with a whole record and the run stops with one line;
the metrics reader survives a cut-off last record; a failed model save leaves no temporary
directory and the previous model intact; the recipes print `error: ...` and exit 1.

Real failures only: a file-size limit (RLIMIT_FSIZE: a short write, then EFBIG), a 16 KiB tmpfs
mounted in a user namespace (ENOSPC) and /dev/full (ENOSPC), where the machine allows them."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from orchestrator.common.errors import OrchestratorError
from orchestrator.common.records import read_metrics
from orchestrator.config.load import to_dict
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.run.checkpoint.final import MODEL_DIR, save_final
from orchestrator.run.loop import NonFiniteLoss
from orchestrator.run.metrics import DiskFull, MetricsLogger, WriteError
from orchestrator.run.rank_main import run_rank
from orchestrator.run.strategies.base import Engine
from tests.conftest import REPO, make_job

QUIET = ["model=gpt2_tiny", "logging=none", "logging.progress=false"]


@pytest.fixture
def dev_full(tmp_path: Path) -> Path:
    """A full device (every write: ENOSPC): /dev/full, or the same device node made here
    (containers may lack /dev/full; root can still mknod it)."""
    if Path("/dev/full").is_char_device():
        return Path("/dev/full")
    node = tmp_path / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError:
        pytest.skip("no /dev/full and no right to make the device node")
    return node


def _engine() -> Engine:
    job = make_job(["model=gpt2_tiny"])
    model = build_model(job.model, seed=0)
    return Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), job, "cpu")


def _old_model(run_dir: Path) -> Path:
    old = run_dir / MODEL_DIR
    old.mkdir()
    (old / "config.json").write_text('{"old": true}\n')
    return old


def test_dev_full_stops_the_run_with_one_line(tmp_path, dev_full) -> None:
    (tmp_path / "metrics.jsonl").symlink_to(dev_full)  # every write: ENOSPC
    logger = MetricsLogger(make_job(QUIET, run_dir=str(tmp_path)))
    with pytest.raises(DiskFull) as info:
        logger.log(7, {"loss": 1.0})
    logger.close(failed=True)
    assert str(info.value) == (f"disk full writing {tmp_path / 'metrics.jsonl'} (no space left "
                               "on device); the run stopped at step 7")
    assert isinstance(info.value, OrchestratorError) and info.value.errno == errno.ENOSPC


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 16 KiB tmpfs: a process in its own user and mount namespace mounts it
    and waits; this process reaches it through that process's root, /proc/<pid>/root."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    script = f"mount -t tmpfs -o size=16k none '{mount_point}' && echo ready && exec sleep 600"
    holder = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        if holder.stdout.readline().strip() != "ready":
            pytest.skip("cannot mount a tmpfs in a user namespace here")
        yield Path(f"/proc/{holder.pid}/root{mount_point}")
    finally:
        holder.kill()
        holder.wait()


def test_a_really_full_disk(full_disk) -> None:
    """The disk fills up: the logger stops at the step that did not fit, the file ends with the
    last whole record, and a model save that follows fails with one line and leaves the previous
    model as it was."""
    run_dir = full_disk
    old = _old_model(run_dir)
    logger = MetricsLogger(make_job(QUIET, run_dir=str(run_dir)))
    with pytest.raises(DiskFull) as info:
        for step in range(1, 10_000):
            logger.log(step, {"loss": 1.0 / step, "tokens_per_s": 12345.678})
    logger.close(failed=True)
    metrics = run_dir / "metrics.jsonl"
    assert str(info.value) == (f"disk full writing {metrics} (no space left on device); the run "
                               f"stopped at step {step}")
    assert info.value.errno == errno.ENOSPC and step > 10
    assert metrics.read_bytes().endswith(b"\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cut-off record to skip
        assert [r["step"] for r in read_metrics(metrics)] == list(range(1, step))
    with pytest.raises(DiskFull) as info:
        save_final(_engine(), run_dir, 0)
    assert str(info.value) == (f"disk full saving the model to {old} (no space left on device); "
                               "training finished but no new model was saved")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", MODEL_DIR]
    assert json.loads((old / "config.json").read_text()) == {"old": True}


def test_a_record_cut_short_is_removed_again(tmp_path) -> None:
    """RLIMIT_FSIZE lets the first write of a record through in part (a short write), the next
    fails with EFBIG: the file is cut back to the end of the last whole record."""
    job = make_job(QUIET, run_dir=str(tmp_path))
    logger = MetricsLogger(job)
    logger.log(1, {"loss": 2.5})
    logger.close()
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import pickle, resource, signal, sys
        from orchestrator.run.metrics import MetricsLogger, WriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        logger = MetricsLogger(pickle.loads(sys.stdin.buffer.read()))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 10}, resource.RLIM_INFINITY))
        try:
            logger.log(2, {{"loss": 1.25, "tokens_per_s": 12345.0}})
        except WriteError as e:
            print(type(e).__name__, e.errno, e, sep="|")
    """)
    proc = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(job), cwd=REPO,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    name, code, message = proc.stdout.decode().strip().split("|")
    assert (name, int(code)) == ("WriteError", errno.EFBIG)
    assert message == f"cannot write {path} (File too large); the run stopped at step 2"
    assert path.read_bytes() == before  # the 10 bytes that got through are gone again
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}]


def test_read_metrics_skips_a_cut_off_last_record_with_a_warning(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: skipped an incomplete last record"):
        assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_read_metrics_rejects_a_corrupt_record_in_the_middle(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON record"):
        read_metrics(path)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')  # a whole line, but corrupt
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON record"):
        read_metrics(path)


def test_a_failed_save_removes_its_temporary_dir_and_keeps_the_old_model(tmp_path) -> None:
    old = _old_model(tmp_path)
    engine = _engine()
    with pytest.raises(FileNotFoundError):  # the model is written, then the copy fails
        save_final(engine, tmp_path, 0, tokenizer_json=tmp_path / "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIR]
    assert [p.name for p in old.iterdir()] == ["config.json"]
    assert json.loads((old / "config.json").read_text()) == {"old": True}
    # a save that succeeds replaces it and leaves nothing else behind
    assert save_final(engine, tmp_path, 0) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIR]
    assert "old" not in json.loads((old / "config.json").read_text())


def test_run_rank_prints_one_line_for_user_errors_and_keeps_tracebacks_for_bugs(
        tmp_path, capsys) -> None:
    (tmp_path / "metrics.jsonl").mkdir()  # a real OSError when the logger opens its file
    job = make_job(QUIET, run_dir=str(tmp_path))
    assert run_rank(lambda: MetricsLogger(job)) == 1
    assert capsys.readouterr().err == (f"error: cannot write {tmp_path / 'metrics.jsonl'} (Is a "
                                       "directory); the run stopped before its first step\n")
    with pytest.raises(ZeroDivisionError):
        run_rank(lambda: 1 / 0)
    with pytest.raises(FileNotFoundError):  # an OSError that is not disk full: a bug
        run_rank((tmp_path / "missing").read_text)
    assert run_rank(lambda: None) == 0
    assert capsys.readouterr().err == ""


def test_run_rank_reports_an_unwrapped_disk_full_in_one_line(capsys, dev_full) -> None:
    def library_write() -> None:  # a write that the project does not wrap hits the full disk
        with open(dev_full, "w") as f:
            f.write("x")

    assert run_rank(library_write) == 1
    assert capsys.readouterr().err == "error: disk full (No space left on device)\n"


def test_run_rank_reports_a_non_finite_loss_in_one_line(capsys) -> None:
    def diverge() -> None:
        raise NonFiniteLoss("loss became nan at step 3")

    assert run_rank(diverge) == 1
    assert capsys.readouterr().err == "error: loss became nan at step 3\n"


def test_pretrain_stops_with_one_line_and_cleans_up(tmp_path, monkeypatch, capsys) -> None:
    from recipes import pretrain

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # set by init
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    job = make_job([*QUIET, "train.steps=2"], run_dir=str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
    make_plan(job, "cpu", 1).write(tmp_path / "plan.json")
    (tmp_path / "metrics.jsonl").mkdir()  # the metrics file cannot be written
    assert pretrain.main(["pretrain", str(tmp_path / "config.yaml")]) == 1
    assert not dist.is_initialized()  # the recipe's clean-up ran
    assert capsys.readouterr().err == (f"error: cannot write {tmp_path / 'metrics.jsonl'} (Is a "
                                       "directory); the run stopped before its first step\n")
    assert issubclass(WriteError, OSError)
