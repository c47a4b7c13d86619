"""What a hostile run of the data, checkpoint and export surfaces broke (issue 24, sections 1-4):
a user's files are never deleted or written into, a stale cache or a damaged run is never
reported as fresh, and what would crash inside the ranks is refused before launch in one line.
In-process where the launcher's own functions decide; the CLI where the exit code is the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.common import checkpoints
from orchestrator.common.errors import ConfigError, DataError
from orchestrator.config.derived import Hardware
from orchestrator.config.load import config_text
from orchestrator.config.resume import check_compatible, to_resume
from orchestrator.data.prepare import MANIFEST, prepare, prepare_job
from orchestrator.data.sources import resolve
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_cli
from tests.unit.test_checkpoint_safety import committed, job

DOCS = "one document with enough words to fill a sequence of sixty four bytes or more\n\n" * 4


def text_job(tmp_path: Path, *extra: str):
    good = tmp_path / "good.txt"
    good.write_text(DOCS)
    return make_job(["data=text", f"data.path={good}", "logging.progress=false", *extra],
                    run_dir=str(tmp_path / "run"))


# -- 1. data loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["foreign", "the corpus itself"])
def test_a_foreign_cache_dir_is_refused_untouched(tmp_path, case) -> None:
    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / "important.txt").write_text("keep me")
    if case == "foreign":
        job_ = text_job(tmp_path, f"data.cache_dir={cache}")
    else:  # data.path and data.cache_dir the same directory of sources
        (cache / "corpus.txt").write_text(DOCS)
        job_ = make_job(["data=text", f"data.path={cache}", f"data.cache_dir={cache}"])
    with pytest.raises(ConfigError, match=r"^config key 'data.cache_dir' has value .*; allowed: "
                       r"an empty directory, or one this project prepared \(this one holds "
                       r"other files: .*important.txt"):
        validate(job_, Hardware())
    with pytest.raises(ConfigError, match="'data.cache_dir'"):
        prepare_job(job_)  # action=prepare's own check, before anything is tokenized
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["important.txt", *(["corpus.txt"] if case != "foreign" else [])])
    assert (cache / "important.txt").read_text() == "keep me"


def test_a_foreign_cache_dir_is_refused_for_sft_rows_and_on_the_command_line(tmp_path) -> None:
    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / "important.txt").write_text("keep me")
    proc = run_cli(["data=jsonl_sft", f"data.cache_dir={cache}", "action=prepare"],
                   tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config key 'data.cache_dir' has value ")
    assert proc.stderr.count("\n") == 1
    assert [p.name for p in cache.iterdir()] == ["important.txt"]


def test_a_cache_dir_that_is_a_file_is_refused_before_tokenizing(tmp_path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    with pytest.raises(ConfigError, match=r"'data.cache_dir' .*allowed: a directory \(this is "
                       r"a file\)"):
        validate(text_job(tmp_path, f"data.cache_dir={blocker}"), Hardware())
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("name", ["/tmp/notes.txt", "", "sub/metrics.jsonl", ".."])
def test_the_metrics_file_is_a_name_inside_the_run_dir(name) -> None:
    with pytest.raises(ConfigError, match="'logging.metrics_file'.*a file name inside the run "
                                          "directory"):
        validate(make_job([f"logging.metrics_file='{name}'"]), Hardware())


def test_export_never_replaces_an_earlier_export(tmp_path) -> None:
    from orchestrator.run.checkpoint.export import export

    path = committed(tmp_path, 4)
    (path / checkpoints.CONFIG).write_text(config_text(job(tmp_path)))
    earlier = tmp_path / "export" / path.name / "model"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("mine")
    exporting = make_job(["action=export", f"run_dir={tmp_path}"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"'run.overwrite' has value False; allowed: true to "
                       rf"replace {earlier} \(an earlier export"):
        export(exporting)
    assert (earlier / "notes.txt").read_text() == "mine"


def test_resuming_from_inside_the_run_dir_cannot_also_overwrite_it(tmp_path) -> None:
    run_dir = tmp_path / "run"
    inside = run_dir / "checkpoints" / "step-00000004"
    with pytest.raises(ConfigError, match=r"'run.overwrite' has value True; allowed: false "
                                          r"when resuming from"):
        validate(make_job(["run.overwrite=true", f"resume={inside}"], run_dir=str(run_dir)),
                 Hardware())
    validate(make_job(["run.overwrite=true", f"resume={tmp_path / 'other'}"],
                      run_dir=str(run_dir)), Hardware())  # elsewhere: nothing to lose


# -- 2. stale or mixed results -------------------------------------------------------------------

def test_a_cache_is_rebuilt_when_the_text_field_changes(tmp_path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"a": "alpha " * 20, "b": "beta " * 20}) + "\n"
                           for _ in range(3)))
    out = tmp_path / "cache"
    _, built = prepare([src], out, text_field="a", progress=False)
    assert built
    _, again = prepare([src], out, text_field="a", progress=False)
    assert not again  # unchanged: left alone
    _, rebuilt = prepare([src], out, text_field="b", progress=False)
    assert rebuilt and json.loads((out / MANIFEST).read_text())["text_field"] == "b"


def test_a_cache_that_skipped_records_is_not_current_for_a_run_that_must_stop(tmp_path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"text": "good " * 20}) + "\n{not json\n")
    out = tmp_path / "cache"
    _, built = prepare([src], out, on_error="skip", progress=False)
    assert built and json.loads((out / MANIFEST).read_text())["skipped"] == 1
    with pytest.raises(ValueError, match=rf"{src}:2: not a JSON object"):
        prepare([src], out, on_error="raise", progress=False)  # rebuilt, and stops at the line


def test_when_every_checkpoint_is_damaged_auto_refuses_to_start_again(tmp_path, capsys) -> None:
    for step in (4, 8):
        shard = next(committed(tmp_path, step).glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(checkpoints.CheckpointError, match=r"^resume=auto: every checkpoint in "
                       rf"{tmp_path / 'checkpoints'} is damaged .*resume=never "
                       r"run.overwrite=true starts this run dir afresh"):
        to_resume(job(tmp_path))
    assert capsys.readouterr().err.count("trying the previous checkpoint") == 2


# -- 3. refused before launch --------------------------------------------------------------------

def test_a_resume_that_changes_the_optimizer_is_refused(tmp_path) -> None:
    saved = job(tmp_path)
    path = committed(tmp_path, 5)
    (path / checkpoints.CONFIG).write_text(config_text(saved))
    meta = json.loads((path / checkpoints.META).read_text())
    (path / checkpoints.META).write_text(json.dumps({**meta, "global_batch_size": 8}))
    resume = to_resume(saved)
    assert resume is not None
    changed = make_job(["optim.name=sgd", "train.global_batch_size=8"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^config key 'optim.name' has value 'sgd'; allowed: "
                       r"'adamw' as in the checkpoint"):
        check_compatible(changed, resume)


def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return path


@pytest.mark.parametrize("case", ["no weights", "marker deleted", "marker not JSON",
                                  "unknown method"])
def test_model_dirs_that_cannot_load_are_refused(tmp_path, case) -> None:
    path = model_dir(tmp_path)
    if case != "no weights":  # whole int8 weights (their header is checked too)
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path / "quantized.safetensors"))
    if case == "marker not JSON":
        (path / "orchestrator_quantized.json").write_text("{oops")
    if case == "unknown method":
        (path / "orchestrator_quantized.json").write_text(json.dumps({"method": "int3"}))
    want = {"no weights": "a model directory holding its weights",
            "marker deleted": "an int8 model directory with its orchestrator_quantized.json",
            "marker not JSON": "naming its method", "unknown method": "naming its method"}[case]
    with pytest.raises(ConfigError, match=f"'model.pretrained_path'.*{want}"):
        validate(make_job(["+recipe=evaluate", f"model.pretrained_path={path}",
                           "cluster.gpus_per_node=1"]), Hardware())


@pytest.mark.parametrize(("source", "want"), [
    ("{path: X, weight: inf}", r"'data.sources\[0\].weight' has value inf; allowed: a finite"),
    ("{weight: 1.0}", r"'data.sources\[0\].path' has value '\?\?\?'; allowed: a path"),
])
def test_a_source_without_a_path_or_a_finite_weight_is_refused(tmp_path, source, want) -> None:
    good = tmp_path / "good.txt"
    good.write_text(DOCS)
    with pytest.raises(ConfigError, match=want):
        validate(make_job(["data=text", f"data.sources=[{source.replace('X', str(good))}]"]),
                 Hardware())


def test_unreadable_sources_are_one_line_data_errors(tmp_path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=rf"^data: {fake}: not a readable Parquet file"):
        prepare_job(make_job(["data=text", f"data.path={fake}", "logging.progress=false",
                              f"data.cache_dir={tmp_path / 'c1'}"]))
    broken = tmp_path / "ds"
    broken.mkdir()
    (broken / "state.json").write_text("{broken")
    (broken / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match=rf"^data: {broken}: not a readable datasets "
                                        r"save_to_disk directory"):
        prepare_job(make_job(["data=text", f"data.path={broken}", "logging.progress=false",
                              f"data.cache_dir={tmp_path / 'c2'}"]))


@pytest.mark.parametrize(("url", "want"), [("nosuchproto://bucket/a.txt", "nosuchproto"),
                                           ("s3://bucket/a.txt", "s3fs")])
def test_a_url_without_its_filesystem_is_refused_naming_it(url, want) -> None:
    pytest.importorskip("fsspec")
    if want == "s3fs" and subprocess.run([sys.executable, "-c", "import s3fs"]).returncode == 0:
        want = "s3"  # installed here: the listing itself fails (no network), still one line
    with pytest.raises(ConfigError, match=rf"^config key 'data.path' has value '{url}'; "
                                          rf"allowed: .*{want}"):
        validate(make_job(["data=text", f"data.path={url}"]), Hardware())


@pytest.mark.parametrize("kind", ["hf", "bpe", "byte"])
def test_a_tokenizer_path_that_is_no_tokenizer_is_refused(tmp_path, kind) -> None:
    plain = tmp_path / "words.txt"
    plain.write_text(DOCS)
    with pytest.raises(ConfigError) as e:
        validate(text_job(tmp_path, f"data.tokenizer={kind}", f"data.tokenizer_path={plain}"),
                 Hardware())
    assert str(e.value).startswith(f"config key 'data.tokenizer_path' has value '{plain}'")
    assert "\n" not in str(e.value)


def test_num_proc_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="'data.num_proc' has value -3; allowed: a number >= 1"):
        validate(make_job(["data.num_proc=-3"]), Hardware())


# -- 4. documented usage and duplicates ----------------------------------------------------------

def test_a_single_parquet_file_is_a_text_source(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [DOCS] * 3}), path)
    job_ = make_job(["data=text", f"data.path={path}", "logging.progress=false",
                     f"data.cache_dir={tmp_path / 'cache'}"])
    validate(job_, Hardware())
    ((out, built),) = prepare_job(job_)
    assert built and json.loads((out / MANIFEST).read_text())["num_docs"] == 3  # one a row


def test_a_glob_through_a_symlink_loop_names_each_file_once(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(DOCS)
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert resolve(str(tmp_path / "d" / "**" / "*.txt")) == [tmp_path / "d" / "a.txt"]


def test_a_killed_preparation_leaves_no_temporary_directory_for_good(tmp_path) -> None:
    src = tmp_path / "a.txt"
    src.write_text(DOCS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".cache.tmp{dead}"  # what a SIGKILLed prepare of `cache` leaves
    (stale / "tokens.bin").parent.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 100)
    prepare([src], tmp_path / "cache", progress=False)
    assert not stale.exists() and (tmp_path / "cache" / MANIFEST).is_file()


def test_empty_run_dirs_a_killed_launch_left_are_removed_by_the_next(tmp_path) -> None:
    old, young, full = (tmp_path / f"2026-01-01_00-00-0{i}_abcdef" for i in range(3))
    for d in (old, young, full):
        d.mkdir()
    (full / "config.yaml").write_text("kept")
    mine = tmp_path / "mine"  # not a default name: never ours to remove
    mine.mkdir()
    for d in (old, full, mine):
        os.utime(d, (1e9, 1e9))
    proc = run_cli(["action=validate"], tmp_path / "2026-12-07_10-00-00_123456")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, full.name, "mine"])
