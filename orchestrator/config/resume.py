"""Resuming a run with a changed config: what may change (lr, steps, world size at the same
global batch, ...) and what may not (the shapes and meaning of the saved state and the data
stream). Checked by the launcher before launch; the ranks log the harmless changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from orchestrator.common.checkpoints import CONFIG, CheckpointError, Resume, find
from orchestrator.config.schema import JobConfig

# What a resumed run may not change: the shapes and meaning of the saved state and the data
# stream. Anything else (lr, steps, logging, world size and micro batch at the same global
# batch, the torch strategy) may change.
FIXED = ("model", "lora", "objective", "data.name", "data.path", "data.seq_len",
         "data.tokenizer", "data.tokenizer_path", "data.sources", "data.text_field",
         "data.on_error", "data.chat_template", "data.num_samples", "data.branching",
         "data.shuffle", "eval.holdout", "train.seed", "train.global_batch_size",
         "precision.name", "precision.qat", "parallelism.backend",
         "optim.name")  # AdamW's state (exp_avg, exp_avg_sq) is not SGD's (momentum_buffer)


def to_resume(job: JobConfig) -> Resume | None:
    """The checkpoint `job` continues from (`common.checkpoints.find` with its `resume` and
    run directory)."""
    return find(job.resume, job.run_dir)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _differences(now: Any, saved: Any, key: str) -> Iterator[tuple[str, Any, Any]]:
    """The leaf keys under `key` whose values differ, with both values, in key order."""
    if isinstance(now, dict) and isinstance(saved, dict):
        for k in sorted(set(now) | set(saved)):
            yield from _differences(now.get(k), saved.get(k), f"{key}.{k}" if key else k)
    elif now != saved:
        yield key, now, saved


# set per launch, never a change of the run
PER_LAUNCH = ("run_dir", "resume", "action", "step", "run.overwrite")


def _configs(job: JobConfig, resume: Resume) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this launch's config, the checkpoint's), both redacted, with the global batch."""
    import yaml

    from orchestrator.common.secrets import redact
    from orchestrator.config.derived import resolve_batch
    from orchestrator.config.load import to_dict

    try:
        saved = yaml.safe_load((resume.path / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {resume.path / CONFIG}: {e}") from None
    now = redact(to_dict(job))
    now["train"]["global_batch_size"] = resolve_batch(job)[1]
    saved["train"]["global_batch_size"] = int(resume.meta.get("global_batch_size", 0)) or \
        saved["train"]["global_batch_size"]
    return now, saved


def changes(job: JobConfig, resume: Resume) -> dict[str, list[Any]]:
    """What this launch changes of the run it resumes: {key: [saved, now]} (per-launch keys
    such as run_dir left out)."""
    return _changed(*_configs(job, resume))


def _changed(now: dict[str, Any], saved: dict[str, Any]) -> dict[str, list[Any]]:
    return {key: [before, value] for key, value, before in _differences(now, saved, "")
            if not any(key == k or key.startswith(f"{k}.") for k in PER_LAUNCH)}


def check_compatible(job: JobConfig, resume: Resume) -> dict[str, list[Any]]:
    """Before launch: refuse to resume `resume` with a config that changes what it saved (the
    first differing key is named); return the harmless changes (`changes`)."""
    from orchestrator.common.errors import ConfigError

    now, saved = _configs(job, resume)
    for key in FIXED:
        found = next(_differences(_get(now, key), _get(saved, key), key), None)
        if found:
            leaf, value, before = found
            raise ConfigError(leaf, value, f"{before!r} as in the checkpoint {resume.path} "
                              "(resume=never, or another run dir, starts fresh)")
    return _changed(now, saved)
