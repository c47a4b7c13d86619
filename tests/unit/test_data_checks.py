"""The launcher refuses a data file the ranks would fail on or silently train NaN on, naming
the file, the line or byte, and the reason; the datasets keep the same checks as a backstop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.data import check
from orchestrator.data.check import check_data
from orchestrator.data.datasets import PackedText, PreferencePairs, PromptResponse
from orchestrator.data.tokenizer import BPETokenizer
from tests.conftest import make_job, run_cli


def refused(data: str, path: Path, *extra: str) -> str:
    """check_data's one-line message for `path` (the test fails if it is accepted)."""
    with pytest.raises(ConfigError) as e:
        check_data(make_job([f"data={data}", f"data.path={path}", *extra]))
    assert e.value.key == "data.path" and e.value.value == str(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def accepted(data: str, path: Path, *extra: str) -> None:
    check_data(make_job([f"data={data}", f"data.path={path}", *extra]))


def jsonl(tmp_path: Path, *lines: object, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---- text -------------------------------------------------------------------------------

def test_empty_file_is_refused(tmp_path: Path) -> None:
    for data in ("text", "jsonl_sft", "jsonl_pref"):
        path = tmp_path / f"{data}.empty"
        path.write_bytes(b"")
        assert "non-empty file (this one is empty)" in refused(data, path)


def test_text_shorter_than_one_sequence_is_refused_exactly_for_the_byte_tokenizer(
        tmp_path: Path) -> None:
    """The count is the one PackedText gets: UTF-8 bytes of each non-blank document (blank
    lines split documents, CRLF reads as LF) plus one end-of-text each."""
    text = "ab\r\ncd\n\n\n \n\nä€\n\nend"  # docs "ab\ncd", "\n " (blank: dropped), "ä€", "end"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    tokens = (5 + 1) + (2 + 3 + 1) + (3 + 1)  # bytes + end-of-text per document
    accepted("text", path, f"data.seq_len={tokens}")
    PackedText(str(path), tokens)  # the rank agrees: one sequence
    message = refused("text", path, f"data.seq_len={tokens + 1}")
    assert f"at least data.seq_len={tokens + 1} tokens" in message
    assert f"this one has {tokens} byte tokens" in message
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedText(str(path), tokens + 1)


def test_streamed_count_matches_the_whole_file_at_every_chunk_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "x\r\n\r\ny\r\r\nzé\n\n\n\nw€ \n\n\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8") as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    expected = sum(len(d.encode()) + 1 for d in docs)
    for chunk in range(1, 8):
        monkeypatch.setattr(check, "CHUNK", chunk)  # cuts "\r\n", "\n\n" and multi-byte chars
        assert check._scan(str(path), False, check._byte_count, 10**6) == expected, chunk


def test_bpe_text_is_refused_only_when_even_one_token_per_byte_is_too_few(
        tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a" * 30)
    message = refused("text", path, "data.seq_len=32", "data.tokenizer=bpe")
    assert "this one has at most 31 BPE tokens" in message
    accepted("text", path, "data.seq_len=31", "data.tokenizer=bpe")


def test_binary_file_is_refused_with_the_offset_of_its_first_nul(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04ab\x00\x00" + bytes(range(256)) * 100)
    message = refused("text", path)
    assert "NUL byte at offset 6: this looks like a binary file" in message
    assert "data.tokenizer" not in message
    assert "for data.tokenizer=bpe to train on" in refused("text", path, "data.tokenizer=bpe")
    assert "NUL byte at offset 6" in refused("jsonl_sft", path)


def test_non_utf8_is_refused_with_the_byte_offset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "CHUNK", 7)  # é (2 bytes) and € (3 bytes) cut at chunk ends
    good = ("é€" * 40 + "\n\n") * 3
    path = tmp_path / "latin1.txt"
    path.write_bytes(good.encode() + b"caf\xe9 au lait" + b"x" * 200)
    message = refused("text", path, "data.seq_len=8")
    assert f"(line 7, byte {len(good.encode()) + 3} is not UTF-8: invalid continuation " \
        "byte)" in message
    path.write_bytes(good.encode())
    accepted("text", path, "data.seq_len=8")
    path.write_bytes(good.encode() + "€".encode()[:2])  # a character cut off at the end
    assert f"byte {len(good.encode())} is not UTF-8: unexpected end of data" in refused(
        "text", path, "data.seq_len=8")
    lines = tmp_path / "bad.jsonl"
    raw = b'{"prompt": "a", "response": "\xff"}\n'
    lines.write_bytes(raw)
    assert f"byte {raw.index(0xFF)} is not UTF-8: invalid start byte" in refused("jsonl_sft",
                                                                                  lines)


def test_synthetic_and_built_in_sets_are_not_checked(tmp_path: Path) -> None:
    check_data(make_job(["data=synthetic", f"data.path={tmp_path / 'nothing'}"]))
    for data in ("text", "jsonl_sft", "jsonl_pref"):
        check_data(make_job([f"data={data}"]))


# ---- JSONL ------------------------------------------------------------------------------

OK = {"prompt": "Q? ", "response": "A."}


@pytest.mark.parametrize(("line", "reason"), [
    ('{"prompt": "a", "response": ', "invalid JSON at column 29: Expecting value"),
    ('["a", "b"]', "a JSON list, expected an object with keys {prompt, response}"),
    ({"prompt": "a"}, "missing key 'response', expected keys {prompt, response}"),
    ({"prompt": "a", "response": 3}, "key 'response' is int, expected a string"),
    ({"prompt": None, "response": "b"}, "key 'prompt' is null, expected a string"),
])
def test_each_bad_sft_line_is_named_by_file_and_line(tmp_path: Path, line: object,
                                                     reason: str) -> None:
    path = jsonl(tmp_path, OK, "", line, OK)
    where = f"{path}:3: {reason}"
    message = refused("jsonl_sft", path)
    assert message.startswith(f"config key 'data.path' has value '{path}'; allowed: JSONL with "
                              "one {prompt, response} object per line (")
    assert where in message
    with pytest.raises(ValueError, match="^" + re.escape(where)):
        PromptResponse(str(path), 32)  # the rank's backstop says the same


def test_jsonl_needs_at_least_one_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path, "", "   ")
    assert "(this one has only blank lines)" in refused("jsonl_sft", path)


def test_sft_rows_without_a_trainable_token_are_refused(tmp_path: Path) -> None:
    """Their loss is 0/0: an empty prompt and response label only position 0, which a causal
    LM never predicts; a prompt that fills seq_len leaves no response token at all."""
    path = jsonl(tmp_path, OK, {"prompt": "", "response": ""})
    message = refused("jsonl_sft", path)
    assert f"{path}:2: no trainable token: prompt and response are both empty" in message
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: no trainable token")):
        PromptResponse(str(path), 32)

    path = jsonl(tmp_path, OK, OK, {"prompt": "x" * 16, "response": "ok"}, name="long.jsonl")
    assert (f"{path}:3: no trainable token: the prompt's 16 tokens fill data.seq_len=16, "
            "leaving no response token") in refused("jsonl_sft", path, "data.seq_len=16")
    accepted("jsonl_sft", path, "data.seq_len=17")  # exactly one token left: the eos

    path = jsonl(tmp_path, {"prompt": "", "response": "a"}, {"prompt": "a", "response": ""},
                 name="edge.jsonl")
    accepted("jsonl_sft", path, "data.seq_len=2")
    assert len(PromptResponse(str(path), 2)) == 2


def test_bpe_without_its_tokenizer_yet_refuses_only_what_any_tokenizer_would(
        tmp_path: Path) -> None:
    path = jsonl(tmp_path, OK, {"prompt": "x" * 40, "response": "ok"})
    run_dir = str(tmp_path / "run")  # no tokenizer.json there yet: trained at launch
    job = make_job(["data=jsonl_sft", f"data.path={path}", "data.tokenizer=bpe",
                    "data.seq_len=8"], run_dir=run_dir)
    check_data(job)  # the long prompt may be few BPE tokens: not known yet
    empty = jsonl(tmp_path, OK, {"prompt": "", "response": ""}, name="empty.jsonl")
    job = make_job(["data=jsonl_sft", f"data.path={empty}", "data.tokenizer=bpe"],
                   run_dir=run_dir)
    with pytest.raises(ConfigError, match=r"empty.jsonl:2: no trainable token: prompt and "):
        check_data(job)


def test_bpe_with_its_tokenizer_checks_exactly(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    tok_file = tmp_path / "tokenizer.json"
    tok = BPETokenizer.train(corpus, 300, tok_file)
    prompt = "the lazy dog " * 4
    n = len(tok.encode(prompt))
    path = jsonl(tmp_path, OK, {"prompt": prompt, "response": "ok"})
    over = ["data.tokenizer=bpe", f"data.tokenizer_path={tok_file}"]
    assert f":2: no trainable token: the prompt's {n} tokens fill" in refused(
        "jsonl_sft", path, f"data.seq_len={n}", *over)
    accepted("jsonl_sft", path, f"data.seq_len={n + 1}", *over)

    text = tmp_path / "t.txt"
    text.write_text("the lazy dog\n\nthe quick brown fox\n")
    n = len(tok.encode("the lazy dog")) + len(tok.encode("the quick brown fox\n")) + 2
    accepted("text", text, f"data.seq_len={n}", *over)
    PackedText(str(text), n, tok)  # the rank agrees: one sequence
    assert f"(this one has {n} BPE tokens)" in refused("text", text, f"data.seq_len={n + 1}",
                                                       *over)


def test_preference_pairs_are_checked_like_sft_rows(tmp_path: Path) -> None:
    good = {"prompt": "Q? ", "chosen": "yes", "rejected": "no"}
    path = jsonl(tmp_path, good, good)
    accepted("jsonl_pref", path)
    path = jsonl(tmp_path, good, {"prompt": "Q", "chosen": "yes", "rejected": ["no"]},
                 name="list.jsonl")
    assert f"{path}:2: key 'rejected' is list, expected a string" in refused("jsonl_pref", path)
    path = jsonl(tmp_path, good, {"prompt": "Q", "chosen": "yes"}, name="missing.jsonl")
    assert (f"{path}:2: missing key 'rejected', expected keys {{prompt, chosen, rejected}}"
            in refused("jsonl_pref", path))
    path = jsonl(tmp_path, good, {"prompt": "", "chosen": "yes", "rejected": ""},
                 name="empty.jsonl")
    where = f"{path}:2: no trainable token: prompt and rejected are both empty"
    assert where in refused("jsonl_pref", path)
    with pytest.raises(ValueError, match=re.escape(where)):
        PreferencePairs(str(path), 32)


# ---- the CLI ------------------------------------------------------------------------------

def test_cli_refuses_a_binary_text_file_in_one_line_before_launch(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\x00\x01\x02" * 1000)
    result = run_cli(["action=run", "data=text", f"data.path={data}"], tmp_path / "r",
                     timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "NUL byte at offset 0" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
