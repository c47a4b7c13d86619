"""Data sources (issue 13): every source kind prepares exactly the documents its own reader
(json, pyarrow, datasets) gives; bad records are named by file and line before launch, or skipped
and counted; two sources mix by weight, the same at world size 1 and 2; a local Hugging Face
tokenizer directory tokenizes as transformers does, and a model too small for it is refused."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.common.errors import ConfigError, DataError
from orchestrator.config.derived import Hardware
from orchestrator.data import batches, build_dataset
from orchestrator.data.prepare import MANIFEST, TOKENS, prepare, prepare_job
from orchestrator.data.sources import BadRecord, resolve
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_cli
from tests.hf_tokenizer import build_hf_tokenizer

EOT = 257  # the byte tokenizer's end-of-text


def byte_tokens(docs: list[str]) -> list[int]:
    """The reference: each document's UTF-8 bytes, then end-of-text."""
    return [t for d in docs for t in [*d.encode("utf-8"), EOT]]


def tokens_of(out: Path) -> list[int]:
    dtype = json.loads((out / MANIFEST).read_text())["dtype"]
    return np.fromfile(out / TOKENS, dtype=dtype).tolist()


def test_every_source_kind_prepares_its_documents_in_order(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    docs = [f"document {i}: caf\u00e9 \u2014 {'x' * i}" for i in range(12)]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("\n\n".join(docs[:3]), encoding="utf-8")
    (src / "b.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[3:6]))
    (src / "sub" / "c.json").write_text(json.dumps([{"content": d} for d in docs[6:8]]))
    pq.write_table(pa.table({"content": docs[8:10], "n": [1, 2]}), src / "sub" / "d.parquet")
    (src / "notes.bin").write_bytes(b"\0not a source")  # not a source suffix: left out
    disk = tmp_path / "disk"
    Dataset.from_dict({"content": docs[10:]}).save_to_disk(str(disk))

    files = resolve(str(src))
    assert [p.name for p in files] == ["a.txt", "b.jsonl", "c.json", "d.parquet"]
    assert resolve(str(src / "*.txt")) == [src / "a.txt"]
    out, built = prepare([*files, *resolve(str(disk))], tmp_path / "out", None, "content",
                         num_proc=2, progress=False)
    assert built and tokens_of(out) == byte_tokens(docs[:10] + docs[10:])
    assert json.loads((out / MANIFEST).read_text())["skipped"] == 0
    assert not prepare([*files, disk], out, None, "content", progress=False)[1]
    for source in (src / "sub" / "d.parquet", disk):  # a table without the text column
        with pytest.raises(BadRecord, match=f"^{source}: row 1: no column 'text' "):
            prepare([source], tmp_path / "none", None, "text", num_proc=1, progress=False)


BAD = {
    "malformed line": ("x.jsonl", b'{"text": "one"}\n\n{"text": "two"}\n{"text": tree}\n',
                       "x.jsonl:4: not a JSON object"),
    "missing field": ("x.jsonl", b'{"text": "one"}\n{"body": "two"}\n',
                      "x.jsonl:2: no string field 'text'"),
    "not UTF-8": ("x.txt", b"one\n\ntwo\nthr\xffee\n\nfour\n", "x.txt:4: not UTF-8"),
    "empty": ("x.txt", b"\n\n\n", "x.txt:1: no documents"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_is_named_by_file_and_line(tmp_path: Path, case: str) -> None:
    name, content, message = BAD[case]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(content)
    job = make_job(["data=text", f"data.path={tmp_path / 'd'}", "data.num_proc=1",
                    f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false"])
    with pytest.raises(DataError) as e:
        prepare_job(job)
    assert str(e.value).startswith(f"data: {tmp_path / 'd' / message}")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_skipped_records_are_counted_and_the_rest_prepared(tmp_path: Path, capsys) -> None:
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'{"text": "one"}\nnot json\n{"body": 2}\n{"text": "fo\xffur"}\n'
                    b'{"text": "five"}\n')
    job = make_job(["data=text", f"data.path={src}", "data.num_proc=1", "data.seq_len=4",
                    f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false",
                    "data.on_error=skip"])
    [(out, _)] = prepare_job(job)
    manifest = json.loads((out / MANIFEST).read_text())
    assert tokens_of(out) == byte_tokens(["one", "five"])
    assert manifest["skipped"] == 3 and manifest["first_skipped"].startswith(f"{src}:2: ")
    assert f"prepare: skipped 3 bad records of cache's sources (first: {src}:2: " in \
        capsys.readouterr().err


def test_cli_refuses_a_bad_record_and_a_too_short_corpus_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    for sources, line in [
        (f"[{{path: {bad}}}]", f"error: data: {bad}:2: no string field 'text'"),
        (f"[{{path: {short}}}, {{path: {bad}, weight: 2}}]",
         f"error: data: {short}: {len(short.read_bytes()) + 1} tokens, fewer than one "
         "sequence of data.seq_len=64")]:
        run = run_cli(["data=text", f"data.sources={sources}", "data.num_proc=1", "data.seq_len=64",
                       f"data.cache_dir={tmp_path / 'cache'}", "action=prepare"], tmp_path / "r")
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.splitlines() == [line]


def letters_corpus(path: Path, alphabet: str, docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join("".join(rng.choice(alphabet) for _ in range(rng.randint(20, 90)))
                                for _ in range(docs)))
    return path


def test_two_sources_mix_by_weight_and_the_draw_is_the_same_at_world_size_1_and_2(
        tmp_path: Path) -> None:
    """Lower-case windows come from source a, upper-case from b (weights 0.7/0.3); the mixture
    is larger than the 10,000 windows drawn, so the share is the sampler's draw from it."""
    a = letters_corpus(tmp_path / "a.txt", "abcdefghij", 2600, 1)
    b = letters_corpus(tmp_path / "b.txt", "ABCDEFGHIJ", 2600, 2)
    common = ["data=text", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}, "
              "weight: 0.3}]", "data.seq_len=16", "data.num_proc=1", "logging.progress=false",
              f"data.cache_dir={tmp_path / 'cache'}"]
    one, two = (make_job([*common, f"train.micro_batch_size={m}"]) for m in (8, 4))
    prepare_job(one)
    dataset = build_dataset(one)
    assert len(dataset) > 14_000

    def windows(job, rank: int, world: int, steps: int) -> list[list[tuple[int, ...]]]:
        stream = batches(dataset, job, rank, world)
        return [[tuple(w) for w in next(stream)["input_ids"].tolist()] for _ in range(steps)]

    single = windows(one, 0, 1, 1250)
    drawn = [w for step in single for w in step]
    from_a = Counter(any(97 <= t <= 106 for t in w) for w in drawn)
    assert len(drawn) == 10_000 and abs(from_a[True] / 10_000 - 0.7) <= 0.02
    pair = zip(windows(two, 0, 2, 1250), windows(two, 1, 2, 1250), strict=True)
    assert [sorted(s) for s in single] == [sorted(r0 + r1) for r0, r1 in pair]


def test_a_hugging_face_tokenizer_directory_prepares_as_transformers_encodes(
        tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    docs = [f"the {w} jumps over the lazy dog number {i}" for i, w in
            enumerate(["fox", "cat", "cow", "hen"] * 30)]
    tok_dir = build_hf_tokenizer(docs, tmp_path / "tok")
    src = tmp_path / "t.txt"
    src.write_text("\n\n".join(docs))
    out, _ = prepare([src], tmp_path / "out", tok_dir, num_proc=2, progress=False)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tokens_of(out) == [t for d in docs for t in [*hf.encode(d, add_special_tokens=False),
                                                        hf.eos_token_id]]
    assert hf.eos_token_id != 0 or hf.convert_ids_to_tokens(0) == "</s>"
    common = ["data=text", f"data.path={src}", "data.tokenizer=hf",
              f"data.tokenizer_path={tok_dir}", "action=validate"]
    validate(make_job([*common, "model.vocab_size=300"]), Hardware())  # exactly fits
    small = run_cli([*common, "model.vocab_size=299"], tmp_path / "r")
    assert small.returncode == 2
    assert small.stderr.splitlines() == [
        "error: config key 'model.vocab_size' has value 299; allowed: at least 300 (the data's "
        "300 ids plus the causal objective's special ids)"]


class _WhoReads(torch.utils.data.Dataset):
    """The prepared windows, noting which DataLoader worker read each one."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        ids = self.inner[i]["input_ids"]  # labelled here, so the batch is passed on as it is
        return {"input_ids": ids, "labels": ids,
                "worker": torch.tensor(-1 if info is None else info.id)}


def test_worker_processes_read_the_same_memmap_stream_and_resume_it(tmp_path: Path) -> None:
    """data.num_workers=2: the windows are read in two worker processes, and the stream (also
    resumed at a micro batch past an epoch) is the one the training process reads itself."""
    import itertools

    src = letters_corpus(tmp_path / "a.txt", "abcdefgh", 300, 3)
    common = ["data=text", f"data.path={src}", "data.seq_len=16", "data.num_proc=1",
              f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false",
              "train.micro_batch_size=4"]
    inline, workers = make_job(common), make_job([*common, "data.num_workers=2"])
    prepare_job(inline)
    data = _WhoReads(build_dataset(inline))
    per_epoch = len(data) // 2 // 4
    want = list(itertools.islice(batches(data, inline, 1, 2), per_epoch + 6))
    got = list(itertools.islice(batches(data, workers, 1, 2, start_step=per_epoch - 2), 8))
    assert all(torch.equal(w["input_ids"], g["input_ids"])
               for w, g in zip(want[per_epoch - 2:], got, strict=True))
    assert {int(w) for b in want for w in b["worker"]} == {-1}
    assert {int(w) for b in got for w in b["worker"]} == {0, 1}


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def test_sft_rows_are_prepared_in_the_chat_template_as_transformers_renders_it(
        tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from orchestrator.data import prepare_data

    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(6)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = build_hf_tokenizer([f"{r['prompt']} {r['response']}" for r in rows] * 5,
                                 tmp_path / "tok", chat_template=TEMPLATE)
    common = ["data=jsonl_sft", f"data.path={src}", "data.tokenizer=hf", "data.seq_len=64",
              f"data.tokenizer_path={tok_dir}", f"data.cache_dir={tmp_path / 'c'}"]
    job = make_job([*common, "data.chat_template=true"])
    validate(job, Hardware())
    assert prepare_data(job)[0][1] and not prepare_data(job)[0][1]  # built once
    dataset = build_dataset(job)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for i, row in enumerate(rows):
        prompt = hf.encode(hf.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                  tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)
        answer = [*hf.encode(row["response"], add_special_tokens=False), hf.eos_token_id]
        pad = 64 - len(prompt) - len(answer)
        assert dataset[i]["input_ids"].tolist() == prompt + answer + [hf.eos_token_id] * pad
        assert dataset[i]["labels"].tolist() == [-100] * len(prompt) + answer + [-100] * pad
        assert hf.decode(prompt).startswith("<|user|> what is")
    plain = make_job([*common, f"data.cache_dir={tmp_path / 'plain'}"])
    prepare_data(plain)
    assert build_dataset(plain)[0]["input_ids"].tolist() != dataset[0]["input_ids"].tolist()
    byte = make_job(["data=jsonl_sft", f"data.path={src}", "data.chat_template=true"])
    with pytest.raises(ConfigError, match="^config key 'data.chat_template' has value True"):
        validate(byte, Hardware())


def test_preference_pairs_are_prepared_as_the_in_memory_pairs(tmp_path: Path) -> None:
    from orchestrator.data import prepare_data
    from orchestrator.data.corpus import build_preferences
    from orchestrator.data.datasets import PreferencePairs
    from orchestrator.data.tokenizer import ByteTokenizer

    job = make_job(["data=jsonl_pref", "data.seq_len=96", f"data.cache_dir={tmp_path}"])
    prepare_data(job)
    prepared = build_dataset(job)
    in_memory = PreferencePairs(str(build_preferences()), 96, ByteTokenizer())
    assert len(prepared) == len(in_memory)
    for i in (0, len(prepared) // 2, len(prepared) - 1):
        assert prepared[i].keys() == in_memory[i].keys()
        assert all(torch.equal(prepared[i][k], in_memory[i][k]) for k in prepared[i])


def test_eval_path_is_prepared_with_the_data_and_evaluated_instead_of_a_held_out_share(
        tmp_path: Path) -> None:
    from orchestrator.data import prepare_data, train_and_held_out

    train = letters_corpus(tmp_path / "train.txt", "abcdefgh", 200, 4)
    held = letters_corpus(tmp_path / "held.txt", "ABCDEFGH", 40, 5)
    job = make_job(["data=text", f"data.path={train}", f"eval.path={held}", "data.seq_len=16",
                    "data.num_proc=1", "eval.every_steps=5", "logging.progress=false"],
                   run_dir=str(tmp_path / "run"))
    validate(job, Hardware())  # no eval.holdout needed with eval.path
    assert len(prepare_data(job)) == 2
    training, evaluated = train_and_held_out(job)
    want = byte_tokens([d for d in held.read_text().split("\n\n")])
    assert [t for i in range(len(evaluated)) for t in evaluated[i]["input_ids"].tolist()] == \
        want[: len(want) // 16 * 16]
    assert len(training) == len(build_dataset(job))  # nothing held out of the training text
    for over, key in [(["data=synthetic"], "eval.path"), ([f"eval.path={tmp_path}/no"],
                                                           "eval.path")]:
        with pytest.raises(ConfigError, match=f"^config key '{key}'"):
            validate(make_job([*job_overrides(train, held), *over]), Hardware())


def job_overrides(train: Path, held: Path) -> list[str]:
    return ["data=text", f"data.path={train}", f"eval.path={held}", "eval.every_steps=5"]


def test_fsspec_urls_are_sources(tmp_path: Path) -> None:
    """A glob over fsspec's in-memory filesystem (not a local path at all) and a file:// URL
    prepare the same documents as the local files; a changed remote file rebuilds."""
    import fsspec

    docs = [f"remote document {i} \u00e9" for i in range(6)]
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/bench/shard-{i}.jsonl", "w") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[2 * i: 2 * i + 2]))
    files = resolve("memory://bench/*.jsonl")
    assert [str(f) for f in files] == [f"memory:///bench/shard-{i}.jsonl" for i in range(3)]
    out, built = prepare(files, tmp_path / "mem", None, num_proc=1, progress=False)
    assert built and tokens_of(out) == byte_tokens(docs)
    assert not prepare(files, out, None, progress=False)[1]
    with fs.open("/bench/shard-2.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert prepare(resolve("memory://bench/*.jsonl"), out, None, progress=False)[1]
    assert tokens_of(out) == byte_tokens([*docs, "one more"])

    local = tmp_path / "local.txt"
    local.write_text("\n\n".join(docs))
    job = make_job(["data=text", f"data.path=file://{local}", "data.seq_len=8",
                    "data.num_proc=1", f"data.cache_dir={tmp_path / 'url'}",
                    "logging.progress=false"])
    validate(job, Hardware())
    [(url_out, _)] = prepare_job(job)
    assert tokens_of(url_out) == byte_tokens(docs)
