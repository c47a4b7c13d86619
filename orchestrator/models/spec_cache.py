"""Parameter shapes of a model config, for planning: the meta-device count (models.param_specs:
torch and transformers) is cached on disk, keyed by the config and the versions that shape the
model, so `action=plan` and `validate` of a model seen before import neither.

The cache is `<cache>/specs/<key>.json` (`$ORCHESTRATOR_CACHE`, else ~/.cache/orchestrator),
written atomically; a file that cannot be read is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from orchestrator.common.files import cache_dir
from orchestrator.config.schema import LoraConfig, ModelConfig
from orchestrator.models.specs import ParamSpec

FORMAT = 3  # bump when ParamSpec or the way specs are counted changes

_SPECS: dict[str, tuple[ParamSpec, ...]] = {}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def spec_key(model: ModelConfig, lora: LoraConfig | None = None,
             dpo_beta: float | None = None) -> str:
    """What the parameter shapes depend on: the model (LoRA, DPO) config and the versions of
    transformers (and peft for LoRA) that build it."""
    lora = lora if lora is not None and lora.rank > 0 else None
    versions = [_version("transformers"), _version("peft") if lora else None]
    return hashlib.sha256(repr((FORMAT, model, lora, dpo_beta, versions)).encode()
                          ).hexdigest()[:20]


def cached_specs(model: ModelConfig, lora: LoraConfig | None = None,
                 dpo_beta: float | None = None) -> list[ParamSpec]:
    """Parameter shapes from the meta device, built once per model (LoRA, DPO) config: kept in
    memory for this process (`parallelism.auto` plans many candidates of one model) and on
    disk for the next."""
    key = spec_key(model, lora, dpo_beta)
    if key not in _SPECS:
        _SPECS[key] = tuple(_from_disk(key) or _count(model, lora, dpo_beta, key))
    return list(_SPECS[key])


def _path(key: str) -> Path:
    return cache_dir() / "specs" / f"{key}.json"


def _from_disk(key: str) -> list[ParamSpec] | None:
    try:
        rows = json.loads(_path(key).read_text())
        return [ParamSpec(r[0], tuple(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _count(model: ModelConfig, lora: LoraConfig | None, dpo_beta: float | None,
           key: str) -> list[ParamSpec]:
    from orchestrator.models.build import param_specs

    specs = param_specs(model, lora, dpo_beta)
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps([[s.name, list(s.shape), s.group, s.head, s.trainable,
                                    s.out_features, s.lookup] for s in specs]))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next plan the count
    return specs
