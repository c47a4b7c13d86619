"""Text sources for `action=prepare`: what a configured path names, and its documents, streamed.

A path is a file, a glob (`shards/*.jsonl`), a directory (every supported file under it, sorted)
or a Hugging Face `datasets.save_to_disk` directory; files may also be fsspec URLs
(`s3://bucket/shards/*.parquet`, `gcs://…`, `file://…`), read through fsspec with whatever
filesystem package the URL needs installed. Files by suffix: `.txt` and other text is
split at blank lines; `.jsonl` has one object per line and `.json` is JSON lines or one array of
objects (the `data.text_field` of each); `.parquet` rows give the text column. A record the job
cannot use (a malformed line, a missing or non-string field, bytes that are not UTF-8) raises
`BadRecord` naming the file and line (or row), unless `on_error="skip"` counts it instead.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO

TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_BYTES = 1 << 20  # a text file is read this many bytes at a time
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Remote:
    """A source file named by an fsspec URL (its path-like parts, for naming and suffixes)."""

    url: str

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.url).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.url).stem

    def __str__(self) -> str:
        return self.url


Source = Path | Remote


def open_binary(path: Source) -> IO[bytes]:
    """A source file opened for reading bytes, locally or through fsspec."""
    if isinstance(path, Remote):
        import fsspec

        return fsspec.open(path.url, "rb").open()
    return open(path, "rb")


def stat(path: Source) -> tuple[int, int]:
    """(size, mtime in ns) of a source file; a remote one's modification time as its
    filesystem reports it (0 where it reports none: then only the size tells a change)."""
    if isinstance(path, Path):
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    from fsspec.core import url_to_fs

    fs, inner = url_to_fs(path.url)
    info = fs.info(inner)
    when = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
    if not isinstance(when, (int, float)):
        when = datetime.fromisoformat(str(when)).timestamp()
    return int(info["size"]), int(float(when) * 1e9)


class BadRecord(ValueError):
    """A record of a source the job cannot use; the message starts with `file:line:`."""


class SourceError(ValueError):
    """A whole source the job cannot read (not a record of it): a file that is not what its
    suffix says, a broken dataset directory, a URL whose filesystem is unknown or whose
    package is not installed. The message starts with the source."""


@dataclass
class Skipped:
    """Bad records passed over under `data.on_error=skip`: how many, and the first one."""

    count: int = 0
    first: str | None = None

    def add(self, message: str) -> None:
        self.count += 1
        self.first = self.first or message


def is_hf_disk(path: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (one split, or a DatasetDict)."""
    return path.is_dir() and any((path / m).is_file() for m in HF_DISK_MARKERS)


def resolve(spec: str) -> list[Source]:
    """The files (or one `save_to_disk` directory) a configured path names, sorted; raises
    `FileNotFoundError` naming the path when it names nothing."""
    files: list[Source]
    if "://" in spec:
        files = _resolve_url(spec)
    elif glob.has_magic(spec):
        found = sorted(Path(p).absolute() for p in glob.glob(spec, recursive=True))
        files = _unique([p for p in found if p.is_file()])
    else:
        path = Path(spec).absolute()
        if is_hf_disk(path):
            return [path]
        if path.is_dir():
            files = _unique(sorted(p for p in path.rglob("*") if p.is_file() and
                                   p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES))
        else:
            files = [path] if path.is_file() else []
    if not files:
        raise FileNotFoundError(f"{spec}: no such file, or no .txt/.jsonl/.json/.parquet "
                                "file under it")
    return files


def _unique(files: list[Path]) -> list[Path]:
    """Each file once, by its real path (a `**` glob through a directory symlink loop, or a
    symlink beside its target, names one file many times), in the given order."""
    seen: set[str] = set()
    out = []
    for f in files:
        real = str(f.resolve())
        if real not in seen:
            seen.add(real)
            out.append(f)
    return out


def _resolve_url(spec: str) -> list[Source]:
    from fsspec.core import url_to_fs

    try:
        fs, inner = url_to_fs(spec)
    except ImportError as e:  # fsspec names the package the protocol needs
        raise SourceError(f"{spec}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # "Protocol not known"
        raise SourceError(f"{spec}: {str(e).splitlines()[0]} (no fsspec filesystem for it)"
                          ) from None
    if glob.has_magic(inner):
        found = [p for p in fs.glob(inner) if fs.isfile(p)]
    elif fs.isdir(inner):
        found = [p for p in fs.find(inner)
                 if PurePosixPath(p).suffix in TEXT_SUFFIXES + RECORD_SUFFIXES]
    else:
        found = [inner] if fs.isfile(inner) else []
    return [Remote(fs.unstrip_protocol(p)) for p in sorted(found)]


def documents(path: Source, text_field: str, skipped: Skipped | None = None) -> Iterator[str]:
    """The documents of one source, streamed. Bad records raise `BadRecord`, or are counted
    in `skipped` when it is given."""
    if isinstance(path, Path) and is_hf_disk(path):
        yield from _hf_disk(path, text_field, skipped)
    elif path.suffix == ".parquet":
        yield from _parquet(path, text_field, skipped)
    elif path.suffix in (".jsonl", ".json"):
        yield from _json_lines(path, text_field, skipped)
    else:
        yield from _text(path, skipped)


def _bad(message: str, skipped: Skipped | None) -> None:
    if skipped is None:
        raise BadRecord(message)
    skipped.add(message)


def _field(row: object, text_field: str, where: str, skipped: Skipped | None) -> str | None:
    text = row.get(text_field) if isinstance(row, dict) else None
    if isinstance(text, str):
        return text
    _bad(f"{where}: no string field {text_field!r}", skipped)
    return None


def _json_lines(path: Source, text_field: str, skipped: Skipped | None) -> Iterator[str]:
    with open_binary(path) as f:
        if path.suffix == ".json" and _starts_array(f):
            yield from _json_array(path, text_field, skipped)
            return
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line)", skipped)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                _bad(f"{where}: not a JSON object ({e})", skipped)
                continue
            text = _field(row, text_field, where, skipped)
            if text is not None:
                yield text


def _starts_array(f) -> bool:  # noqa: ANN001 - a binary file object
    head = f.read(4096).lstrip()
    f.seek(0)
    return head.startswith(b"[")


def _json_array(path: Source, text_field: str, skipped: Skipped | None) -> Iterator[str]:
    """A `.json` file holding one array of objects (read whole: such files are small; large
    data comes as JSON lines or Parquet). Records are numbered from 1."""
    try:
        with open_binary(path) as f:
            rows = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRecord(f"{path}:1: not a JSON array of objects ({e})") from None
    for n, row in enumerate(rows, 1):
        text = _field(row, text_field, f"{path}: record {n}", skipped)
        if text is not None:
            yield text


def _parquet(path: Source, text_field: str, skipped: Skipped | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(open_binary(path))
        batches = (b.column(0).to_pylist()
                   for b in f.iter_batches(columns=[text_field], batch_size=4096))
        yield from _column(path, text_field, f.schema_arrow.names, batches, skipped)
    except (pa.ArrowException, OSError) as e:  # not Parquet, or cut short
        raise SourceError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _column(path: Source, text_field: str, columns: list[str],
            batches: Iterator[list[object]], skipped: Skipped | None) -> Iterator[str]:
    """The text of a table's `text_field` column, read in batches; rows are numbered from 1."""
    if text_field not in columns:
        raise BadRecord(f"{path}: row 1: no column {text_field!r} (columns: "
                        f"{', '.join(columns)})")
    row = 0
    for batch in batches:
        for text in batch:
            row += 1
            if isinstance(text, str):
                yield text
            else:
                _bad(f"{path}: row {row}: {text_field!r} is {type(text).__name__}, not text",
                     skipped)


def _hf_disk(path: Path, text_field: str, skipped: Skipped | None) -> Iterator[str]:
    """A `save_to_disk` dataset (its "train" split when it is a DatasetDict), read through its
    memory-mapped Arrow files a batch at a time."""
    import pyarrow as pa
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a readable datasets save_to_disk directory "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise BadRecord(f"{path}: row 1: a DatasetDict without a 'train' split "
                            f"(splits: {', '.join(data)})")
        data = data["train"]
    batches = (b[text_field] for b in data.select_columns([text_field]).iter(batch_size=4096)) \
        if text_field in data.column_names else iter(())
    try:
        yield from _column(path, text_field, data.column_names, batches, skipped)
    except (pa.ArrowException, OSError) as e:  # an Arrow file cut short
        raise SourceError(f"{path}: not a readable datasets save_to_disk directory "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _text(path: Source, skipped: Skipped | None) -> Iterator[str]:
    """Documents split at blank lines exactly as `text.split("\\n\\n")` splits the whole
    decoded text, with universal newlines as `open()` reads it (empty ones dropped). The file
    is read in binary chunks cut at blank lines, so each piece decodes whole and a bad byte is
    located by line; under `skip` the document holding it is dropped."""
    line = 1  # of the first byte of `rest`
    rest = b""
    with open_binary(path) as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            if chunk.endswith(b"\r"):  # keep a CR LF pair in one chunk
                chunk += f.read(1)
            rest += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            pieces = rest.split(b"\n\n")
            rest = pieces.pop() if chunk else b""
            for piece in pieces:
                doc = _decode(piece, path, line, skipped)
                if doc is not None and doc.strip():
                    yield doc
                line += piece.count(b"\n") + 2
            if not chunk:
                return


def _decode(piece: bytes, path: Source, line: int, skipped: Skipped | None) -> str | None:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + piece[:e.start].count(b"\n")
        _bad(f"{path}:{at}: not UTF-8 ({e.reason}: byte {piece[e.start]:#04x})", skipped)
        return None
