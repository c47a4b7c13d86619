"""The job's data settings: objective, tokenizer, what is prepared before launch. The datasets and
the batch stream (data/stream.py, torch) are importable from here too, loaded on first use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.data import objectives
from orchestrator.data.corpus import build_corpus
from orchestrator.data.tokenizer import (
    TOKENIZER_JSON,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)
from orchestrator.schema import JobConfig

FAMILY_OBJECTIVE = {"gpt2": "causal", "llama": "causal", "bert": "mlm", "t5": "span"}


def objective_of(job: JobConfig) -> str:
    if job.dpo_beta is not None:
        return "dpo"
    name = job.objective.name
    return FAMILY_OBJECTIVE[job.model.family] if name == "auto" else name


def data_vocab(job: JobConfig) -> int:
    """Ids the data may use: the model's vocabulary less the objective's special ids."""
    o = job.objective
    return job.model.vocab_size - objectives.reserved_ids(
        objective_of(job), job.data.seq_len, o.noise_density, o.mean_span_length)


def tokenizer_file(job: JobConfig) -> Path:
    """Where the job's tokenizer is: the configured path (a tokenizer.json, or for
    data.tokenizer=hf a Hugging Face tokenizer directory), the pretrained model's, or the BPE
    trained at launch into the run directory."""
    d, m = job.data, job.model
    if d.tokenizer_path:
        return Path(d.tokenizer_path)
    if m.pretrained_path and (Path(m.pretrained_path) / TOKENIZER_JSON).exists():
        return Path(m.pretrained_path) / TOKENIZER_JSON
    return Path(job.run_dir) / TOKENIZER_JSON


def uses_bpe(job: JobConfig) -> bool:
    """A tokenizer file rather than bytes: a BPE (trained at launch or given), a Hugging Face
    tokenizer, or the pretrained model's own tokenizer.json."""
    pretrained = job.model.pretrained_path
    return job.data.tokenizer != "byte" or bool(
        pretrained and (Path(pretrained) / TOKENIZER_JSON).exists())


def prepare_tokenizer(job: JobConfig) -> None:
    """Before launch: train the BPE on the corpus once, so every rank loads the same one."""
    if job.data.tokenizer != "bpe" or not uses_bpe(job) or tokenizer_file(job).exists():
        return
    if job.data.name == "text":
        from orchestrator.data.prepare import all_documents

        corpus: Path | Iterator[str] = all_documents(job)
    else:
        corpus = build_corpus()
    BPETokenizer.train(corpus, data_vocab(job), tokenizer_file(job))


def get_tokenizer(job: JobConfig) -> Tokenizer:
    return load_tokenizer(tokenizer_file(job)) if uses_bpe(job) else ByteTokenizer()


def ids_needed(job: JobConfig) -> int:
    """Token ids the data uses: the Markov chain's, the tokenizer's (one still to be trained
    has at least the 256 bytes and end-of-text), or the byte tokenizer's."""
    if job.data.name == "synthetic":
        return job.data.branching
    if uses_bpe(job) and tokenizer_file(job).exists():
        return get_tokenizer(job).vocab_size
    return ByteTokenizer.vocab_size


def prepare_data(job: JobConfig) -> list[tuple[Path, bool]]:
    """Before launch (and `action=prepare`): tokenize the job's text, SFT or preference data
    once into its cache; (directory, whether it was built) for each source."""
    if job.data.name in ("jsonl_sft", "jsonl_pref"):
        from orchestrator.data.pairs import prepare_pairs

        return [prepare_pairs(job)]
    from orchestrator.data.prepare import prepare_job

    return prepare_job(job) + (prepare_job(eval_job(job)) if job.eval.path else [])


def eval_job(job: JobConfig) -> JobConfig:
    """The job reading `eval.path` as its (only) text source: how it is prepared and read."""
    import dataclasses

    return dataclasses.replace(job, data=dataclasses.replace(
        job.data, path=job.eval.path, sources=[], cache_dir=None))


STREAM = ("build_dataset", "train_and_held_out", "split", "stack", "with_objective",
          "make_collate", "batch_generator", "batches")


def __getattr__(name: str) -> Any:
    """The torch side (data/stream.py), imported when one of its names is first asked for."""
    if name in STREAM:
        from orchestrator.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
