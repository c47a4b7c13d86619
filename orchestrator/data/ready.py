"""Making the job's data ready before launch, once, on the launcher's machine: the BPE trained
on the corpus (every rank then loads the same one) and every source tokenized into its cache
(`action=prepare` does only this). Imports its workers on use: the launcher stays free of numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from orchestrator.config.schema import JobConfig
from orchestrator.data.corpus import build_corpus
from orchestrator.data.settings import data_vocab, eval_job, tokenizer_file, uses_bpe
from orchestrator.data.tokenizer import BPETokenizer


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


def prepare_data(job: JobConfig) -> list[tuple[Path, bool]]:
    """Before launch (and `action=prepare`): tokenize the job's text, SFT or preference data
    once into its cache; (directory, whether it was built) for each source."""
    if job.data.name in ("jsonl_sft", "jsonl_pref"):
        from orchestrator.data.pairs import prepare_pairs

        return [prepare_pairs(job)]
    from orchestrator.data.prepare import prepare_job

    return prepare_job(job) + (prepare_job(eval_job(job)) if job.eval.path else [])
