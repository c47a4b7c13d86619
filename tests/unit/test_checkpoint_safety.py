"""A damaged or tampered checkpoint is refused with a line naming the file, and never runs code;
resume=auto then falls back to the previous complete checkpoint (issue 12, safety)."""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path, PosixPath

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from orchestrator.common import checkpoints
from orchestrator.config import resume as config_resume
from orchestrator.config.schema import JobConfig


class Bomb:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # what a tampered pickle does on load: call anything
        return (os.mkdir, (str(self.target),))


def committed(run_dir: Path, step: int) -> Path:
    """A real DCP checkpoint of a small model, committed as periodic.Saver would."""
    path = run_dir / checkpoints.ROOT / checkpoints.step_name(step)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dcp.save({"w": torch.full((4,), float(step))}, checkpoint_id=str(path))
    finally:
        if created:
            dist.destroy_process_group()
    files = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    (path / checkpoints.META).write_text(json.dumps({"step": step, "files": files}))
    return path


def job(run_dir: Path, resume: str = "auto") -> JobConfig:
    return dataclasses.replace(JobConfig(), run_dir=str(run_dir), resume=resume)


def test_a_pickle_bomb_in_place_of_the_index_is_refused_without_running(tmp_path) -> None:
    path = committed(tmp_path, 4)
    target = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Bomb(target)))
    meta = json.loads((path / checkpoints.META).read_text())
    meta["files"][".metadata"] = (path / ".metadata").stat().st_size  # sizes fixed up too
    (path / checkpoints.META).write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"{path / '.metadata'} is not a plain DCP index \(refused "
                             r"posix.mkdir\)"):
        config_resume.to_resume(job(tmp_path, resume=str(path)))
    assert not target.exists()


def rewrite_index(path: Path, data: bytes) -> None:
    """Replace a committed checkpoint's DCP index, fixing its recorded size up too."""
    (path / ".metadata").write_bytes(data)
    meta = json.loads((path / checkpoints.META).read_text())
    meta["files"][".metadata"] = len(data)
    (path / checkpoints.META).write_text(json.dumps(meta))


class EnumsByGetattr(pickle.Pickler):
    """Pickles every Enum member as `getattr(EnumClass, "NAME")`, as Debian 12's Python 3.11.2
    does (3.10, 3.11.7 and 3.12 pickle `EnumClass(value)`): built explicitly, so the test does
    not depend on the interpreter running it."""

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def pickled(obj: object, pickler: type[pickle.Pickler] = pickle.Pickler) -> bytes:
    buffer = io.BytesIO()
    pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def test_an_index_with_enums_pickled_by_getattr_passes(tmp_path) -> None:
    """A real index re-pickled the way Python 3.11.2 writes one: its enum members come back
    as themselves, and the checkpoint resumes."""
    path = committed(tmp_path, 2)
    with open(path / ".metadata", "rb") as fh:
        index = pickle.load(fh)  # trusted here: written by this test
    data = pickled(index, EnumsByGetattr)
    assert b"getattr" in data and b"_MEM_FORMAT_ENCODING" in data  # the 3.11.2 form
    rewrite_index(path, data)
    resume = config_resume.to_resume(job(tmp_path, resume=str(path)))
    assert resume is not None and resume.step == 2
    with open(path / ".metadata", "rb") as fh:
        loaded = checkpoints._MetadataOnly(fh).load()
    assert loaded.state_dict_metadata == index.state_dict_metadata


class Mkdir:
    """A bomb through an allowed class: `getattr(PosixPath(target), "mkdir")()`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (PosixPath(self.target).mkdir, ())  # a bound method pickles as getattr(obj, name)


class NotAMember:
    """`getattr` on an allowed enum class, for a name that is not one of its members."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

        return (getattr, (_MEM_FORMAT_ENCODING, "__init_subclass__"))


@pytest.mark.parametrize("bomb", [Mkdir, NotAMember])
def test_getattr_is_refused_unless_it_names_an_enum_member(tmp_path, bomb) -> None:
    path = committed(tmp_path, 4)
    target = tmp_path / "pwned"
    data = pickled(bomb(target))
    assert b"getattr" in data
    rewrite_index(path, data)
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"{path / '.metadata'} is not a plain DCP index \(refused "
                             r"builtins.getattr\("):
        config_resume.to_resume(job(tmp_path, resume=str(path)))
    assert not target.exists()


def test_a_truncated_shard_is_named_and_auto_falls_back(tmp_path, capsys) -> None:
    older, newer = committed(tmp_path, 4), committed(tmp_path, 8)
    shard = next(newer.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(checkpoints.CheckpointError, match=rf"checkpoint file {shard} is damaged "
                                                       r"\(10 bytes, \d+ when saved\)"):
        config_resume.to_resume(job(tmp_path, resume=str(newer)))
    resume = config_resume.to_resume(job(tmp_path))
    assert resume is not None and resume.path == older and resume.step == 4
    assert "trying the previous checkpoint" in capsys.readouterr().err


def test_the_real_index_passes(tmp_path) -> None:
    resume = config_resume.to_resume(job(tmp_path, resume=str(committed(tmp_path, 2))))
    assert resume is not None and resume.step == 2


def test_a_resume_that_changes_what_was_saved_is_refused(tmp_path) -> None:
    """Before launch, in-process: the config the checkpoint was saved with against the new one.
    Harmless edits pass and are listed; the first changed key that shapes the saved state is
    named."""
    from orchestrator.common.errors import ConfigError
    from orchestrator.config.load import config_text

    saved = job(tmp_path)
    path = committed(tmp_path, 5)
    (path / checkpoints.CONFIG).write_text(config_text(saved))
    meta = json.loads((path / checkpoints.META).read_text())
    (path / checkpoints.META).write_text(json.dumps({**meta, "global_batch_size": 8}))
    resume = config_resume.to_resume(saved)
    assert resume is not None and resume.step == 5
    harmless = dataclasses.replace(saved, optim=dataclasses.replace(saved.optim, lr=1e-4),
                                   cluster=dataclasses.replace(saved.cluster, gpus_per_node=1),
                                   train=dataclasses.replace(saved.train, steps=50,
                                                             micro_batch_size=8))
    assert config_resume.check_compatible(harmless, resume) == {  # recorded by the launch
        "cluster.gpus_per_node": [2, 1], "optim.lr": [saved.optim.lr, 1e-4],
        "train.micro_batch_size": [saved.train.micro_batch_size, 8], "train.steps": [20, 50]}
    deeper = dataclasses.replace(saved, model=dataclasses.replace(saved.model, n_layer=3))
    with pytest.raises(ConfigError) as info:
        config_resume.check_compatible(deeper, resume)
    assert str(info.value) == (f"config key 'model.n_layer' has value 3; allowed: 2 as in the "
                               f"checkpoint {path} (resume=never, or another run dir, starts "
                               "fresh)")
    bigger = dataclasses.replace(saved, train=dataclasses.replace(saved.train,
                                                                  micro_batch_size=8))
    with pytest.raises(ConfigError, match="'train.global_batch_size' has value 16; allowed: 8"):
        config_resume.check_compatible(bigger, resume)


def test_a_save_cut_short_never_counts(tmp_path) -> None:
    """A run killed while writing step 16's checkpoint leaves `.step-00000016.tmp`: it is not
    a checkpoint, and resume=auto takes step 12, the newest complete one."""
    committed(tmp_path, 12)
    partial = tmp_path / checkpoints.ROOT / f".{checkpoints.step_name(16)}.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-00000012"]
    resume = config_resume.to_resume(job(tmp_path))
    assert resume is not None and resume.step == 12


BARE_PATH = "/usr/local/bin:/usr/bin:/bin"  # what a new user's shell finds first
WRITE = """
import json, sys, warnings
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")  # no process group: one process saves alone
path = Path(sys.argv[1])
dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(path))
files = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
(path / "meta.json").write_text(json.dumps({"step": 3, "files": files}))
"""


def interpreters() -> list[str]:
    """This venv's interpreter and the `python3` a bare PATH finds (the README's commands work
    with whichever comes first), one per binary: a checkpoint's pickled index is written in
    the format of the interpreter that saved it."""
    found: dict[str, str] = {}
    for exe in (sys.executable, shutil.which("python3", path=BARE_PATH), "/usr/bin/python3"):
        if exe and os.path.exists(exe):
            found.setdefault(os.path.realpath(exe), exe)
    return list(found.values())


@pytest.mark.parametrize("python", interpreters())
def test_a_checkpoint_saved_by_each_interpreter_here_resumes(tmp_path, python) -> None:
    """A real DCP save under each interpreter (with this venv's torch on its path), read back
    and verified here as the launcher does. Debian 12's 3.11.2 writes enum members as
    `getattr(EnumClass, "NAME")`, which the safe unpickler once refused."""
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if tag != sys.implementation.cache_tag:
        pytest.skip(f"{python} is {tag}: this venv's torch ({sys.implementation.cache_tag}) "
                    "cannot load there")
    path = tmp_path / checkpoints.ROOT / checkpoints.step_name(3)
    env = {**os.environ, "PYTHONPATH": str(Path(torch.__file__).parents[1])}  # this torch
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([python, "-c", WRITE, str(path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resume = config_resume.to_resume(job(tmp_path, resume=str(path)))
    assert resume is not None and resume.step == 3
    state = {"w": torch.zeros(4)}
    dcp.load(state, checkpoint_id=str(path))
    assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
