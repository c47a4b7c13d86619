"""Cheap checks of a local Hugging Face model directory (`model.pretrained_path`), before
anything launches: its config.json parses, it asks for no remote code, and its safetensors
files are whole. Reads only config.json and each safetensors header, never the weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from orchestrator.common.errors import ConfigError

KEY = "model.pretrained_path"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# what from_pretrained loads weights from (one file, or an index of shards)
WEIGHT_FILES = ("model.safetensors", INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(KEY, str(path.parent), f"a model directory whose {what} {path} is "
                          f"valid JSON (it is not: {e.msg} at line {e.lineno} column "
                          f"{e.colno}, char {e.pos})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(KEY, str(path.parent), f"a model directory whose {what} {path} is "
                          f"readable UTF-8 ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(KEY, str(path.parent), f"a model directory whose {what} {path} is "
                          f"a JSON object (it is a {type(data).__name__})")
    return data


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` is not whole (None when its header is readable and
    the file is as long as the header says: 8-byte little-endian length N, N bytes of JSON,
    then the tensors' data at the header's data_offsets)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated: {size} bytes, shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            return f"{path} has a header length of {n} bytes (corrupt)"
        if 8 + n > size:
            return f"{path} is truncated: {size} bytes, its header alone needs {8 + n}"
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path} has an unreadable header ({e})"
    if not isinstance(header, dict):
        return f"{path} has a header that is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            return f"{path} has no valid data_offsets for tensor {name!r} (corrupt)"
        end = max(end, offsets[1])
    need = 8 + n + end
    if need > size:
        return (f"{path} is truncated: {size} bytes, its header says {need} "
                f"({size / max(need, 1):.0%} present)")
    return None


def check_model_dir(path: str, other_weights: tuple[str, ...] = ()) -> None:
    """Refuse (ConfigError on model.pretrained_path) a directory whose config.json is missing,
    corrupt or not an object, that asks for remote code (`auto_map`: transformers would run
    the directory's Python), that holds no weights (`WEIGHT_FILES`, or one of `other_weights`:
    an int8 model's own file), whose weight index names missing shards, or whose safetensors
    files are truncated or corrupt. pytorch_model.bin files are not inspected."""
    root = Path(path)
    config = root / CONFIG
    if not config.is_file():
        raise ConfigError(KEY, path, "a local Hugging Face model directory (with config.json), "
                          "e.g. an earlier run's <run_dir>/model")
    if "auto_map" in _json_object(config, CONFIG):
        raise ConfigError(KEY, path, f"a model directory whose {config} has no 'auto_map' (it "
                          "asks to run the directory's own Python code, which is refused; use "
                          "a model of a family transformers ships)")
    if not any((root / f).is_file() for f in (*WEIGHT_FILES, *other_weights)):
        raise ConfigError(KEY, path, "a model directory holding its weights (model.safetensors, "
                          "pytorch_model.bin or a sharded index; this one has none)")
    index = root / INDEX
    if index.is_file():
        weight_map = _json_object(index, "weight index").get("weight_map", {})
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [s for s in shards if not (root / str(s)).is_file()]
        if missing:
            raise ConfigError(KEY, path, f"a model directory holding every shard {index} "
                              f"names ({root / str(missing[0])} is missing)")
    for weights in sorted(root.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(KEY, path, f"a model directory with whole weight files: "
                              f"{problem}; save or download it again")
