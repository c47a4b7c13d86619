"""The job's data settings, torch-free: its objective, its tokenizer (which file, how many ids)
and the job that reads `eval.path`."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config.schema import JobConfig
from orchestrator.data import objectives
from orchestrator.data.tokenizer import (
    TOKENIZER_JSON,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)

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


def eval_job(job: JobConfig) -> JobConfig:
    """The job reading `eval.path` as its (only) text source: how it is prepared and read."""
    import dataclasses

    return dataclasses.replace(job, data=dataclasses.replace(
        job.data, path=job.eval.path, sources=[], cache_dir=None))
