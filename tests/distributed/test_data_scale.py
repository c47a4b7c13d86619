"""Training from the prepared memory map (issue 13), against the plain PyTorch loop of
test_reference_loop.py fed with the same text tokenized in memory by transformers itself:

- a text file tokenized with a local Hugging Face tokenizer directory (built here, nothing
  downloaded), prepared once by the launch, trains under DDP and FSDP2 ZeRO-3 with the per-step
  losses of the plain loop over the same windows (the held-out tail left out);
- `eval.every_steps=5` logs `val/loss` at steps 5, 10, 15, 20 equal to the plain loop's loss
  per token over the held-out windows, in metrics.jsonl and in the W&B run;
- the model is saved with its tokenizer, which AutoTokenizer loads back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.common.records import read_metrics, read_wandb_run
from orchestrator.data.corpus import build_corpus
from tests.distributed.checks import losses, run_all
from tests.distributed.test_reference_loop import TOL, WORLD, plain_loop
from tests.hf_tokenizer import build_hf_tokenizer

pytestmark = pytest.mark.slow

SEQ, HOLDOUT, EVERY = 64, 0.1, 5
COMMON = ["data=text", f"data.seq_len={SEQ}", "data.tokenizer=hf", f"eval.holdout={HOLDOUT}",
          f"eval.every_steps={EVERY}", "data.num_proc=2"]
# the held-out loss is summed over ranks in another order than the plain loop's one mean
VAL_TOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("data_scale")
    docs = [d for d in build_corpus().read_text(encoding="utf-8").split("\n\n")
            if d.strip()][:120]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path, build_hf_tokenizer(docs, root / "tokenizer", vocab_size=400), docs


@pytest.fixture(scope="module")
def runs(corpus) -> dict[str, Path]:
    path, tok, _ = corpus
    common = [*COMMON, f"data.path={path}", f"data.tokenizer_path={tok}",
              f"data.cache_dir={path.parent / 'prepared'}"]
    return run_all(path.parent, {
        "ddp": ["+recipe=ddp", *common],
        "fsdp_zero3": ["+recipe=fsdp_zero3", *common, "logging=none",
                       "train.save_model=false"]})


@pytest.fixture(scope="module")
def reference(corpus) -> tuple[tuple[float, ...], dict[int, float]]:
    """The plain loop on the same windows, tokenized here by transformers: each document's
    ids, then the tokenizer's eos; back-to-back windows of SEQ; the last HOLDOUT share held
    out, padded to a multiple of the ranks as DistributedSampler pads it."""
    from transformers import AutoTokenizer

    _, tok_dir, docs = corpus
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = [t for d in docs for t in [*tok.encode(d, add_special_tokens=False),
                                     tok.eos_token_id]]
    n = len(ids) // SEQ
    windows = torch.tensor(ids[: n * SEQ]).view(n, SEQ)
    cut = n - max(1, int(n * HOLDOUT))
    held = list(range(cut, n))
    held += held[: -len(held) % WORLD]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return plain_loop(windows[:cut], windows[held], EVERY)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["ddp", "fsdp_zero3"])
def test_memmap_training_equals_the_plain_loop_on_the_same_tokens(runs, reference,
                                                                  name: str) -> None:
    train, _ = reference
    got = losses(runs[name])
    assert max(abs(a - b) for a, b in zip(got, train, strict=True)) <= TOL
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.3  # it learns the text


@pytest.mark.parametrize("name", ["ddp", "fsdp_zero3"])
def test_validation_loss_every_5_steps_is_the_held_out_loss(runs, reference, name: str) -> None:
    _, val = reference
    logged = {m["step"]: m["val/loss"] for m in read_metrics(runs[name] / "metrics.jsonl")
              if "val/loss" in m}
    assert sorted(logged) == [5, 10, 15, 20]
    assert logged == pytest.approx(val, abs=VAL_TOL)
    assert logged[20] < logged[5] - 0.1  # the held-out loss falls too


def test_the_wandb_run_has_the_validation_loss(runs) -> None:
    history = [r["history"] for r in read_wandb_run(runs["ddp"]) if r["type"] == "history"]
    val = {int(h["step"]["num"]): h["item"]["val/loss"] for h in history
           if "val/loss" in h["item"]}
    logged = {m["step"]: m["val/loss"] for m in read_metrics(runs["ddp"] / "metrics.jsonl")
              if "val/loss" in m}
    assert val == pytest.approx(logged, abs=1e-6) and sorted(val) == [5, 10, 15, 20]


def test_the_model_is_saved_with_its_tokenizer(runs, corpus) -> None:
    from transformers import AutoTokenizer

    _, tok_dir, docs = corpus
    saved = AutoTokenizer.from_pretrained(str(runs["ddp"] / "model"))
    original = AutoTokenizer.from_pretrained(str(tok_dir))
    assert saved.eos_token == original.eos_token == "</s>"
    assert saved.encode(docs[3]) == original.encode(docs[3])
