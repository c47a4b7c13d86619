"""A small real English corpus built offline from the docstrings of Python's standard library.

Every machine that runs the project has these files (PSF license), so tests and the demo train on
real prose without downloading anything. The text is cached under the project cache dir.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

from orchestrator.common.files import cache_dir

# Modules with long, prose-heavy docstrings; a fixed list keeps the corpus stable.
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "zipfile",
)


def _docs(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 200:
            docs.append(doc)
    return [d for d in docs if d]


def build_corpus(path: Path | None = None) -> Path:
    """Write the corpus (once) and return its path; documents are separated by blank lines."""
    path = path or cache_dir() / "corpus" / "stdlib_docs.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(doc for m in MODULES for doc in _docs(m))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return path


def _summaries() -> list[tuple[str, str]]:
    """(module, first paragraph of its docstring) for every corpus module that has one."""
    out = []
    for name in MODULES:
        doc = (inspect.getdoc(importlib.import_module(name)) or "").strip()
        first = doc.split("\n\n")[0].replace("\n", " ").strip()
        if first:
            out.append((name, first))
    return out


def _question(name: str) -> str:
    return f"What does the Python module {name} do?\n"


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return path


REFUSALS = ("I do not know.", "Look it up yourself.", "That is not something I can answer.")


def build_preferences(path: Path | None = None) -> Path:
    """Preference pairs for DPO, built offline. The chosen answer is the module's own summary;
    three rejected ones per question: a refusal, the summary with its words reversed, and
    another module's summary."""
    path = path or cache_dir() / "corpus" / "stdlib_pref.jsonl"
    if path.exists():
        return path
    pairs = _summaries()
    rows = []
    for i, (name, answer) in enumerate(pairs):
        for rejected in (REFUSALS[i % len(REFUSALS)], " ".join(reversed(answer.split())),
                         pairs[(i + 7) % len(pairs)][1]):
            rows.append({"prompt": _question(name), "chosen": answer, "rejected": rejected})
    return _write_jsonl(path, rows)


def build_sft(path: Path | None = None) -> Path:
    """A small instruction-style JSONL set (question about a stdlib module -> the first
    sentence of its docstring), built offline like the corpus."""
    path = path or cache_dir() / "corpus" / "stdlib_sft.jsonl"
    if path.exists():
        return path
    return _write_jsonl(path, [{"prompt": _question(name), "response": answer}
                               for name, answer in _summaries()])
