"""Shared plumbing for the dataset loaders: the download cache, a download that
never hangs, JSON reading and seeded sampling.

The official datasets are downloaded on first use into ``$EDITKIT_CACHE/data``
(default ``~/.cache/editkit/data``), next to the world models, and read from there
afterwards, so a machine that downloaded once works offline.
"""
from __future__ import annotations

import json
import logging
import os
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ..paths import cache_dir

log = logging.getLogger(__name__)

__all__ = ["DatasetUnavailableError", "data_cache_dir", "fetch", "read_records", "parse_all", "sample", "looks_like_path",
           "check_unique_ids"]

T = TypeVar("T")

#: Seconds to wait for the server before giving up: an offline user must get an
#: error at once, never a hang.
DOWNLOAD_TIMEOUT = 15.0


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be obtained (offline, unknown name, server error).

    The message says where the file would be cached and how to pass a local copy.
    """


def data_cache_dir() -> Path:
    """``$EDITKIT_CACHE/data`` (default ``~/.cache/editkit/data``); created on demand."""
    return cache_dir("data", create=False)


def fetch(url: str, filename: str, what: str, local_hint: str, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """The cached copy of ``url`` (downloading it on first use).

    The file is written to a temporary name and renamed when complete, so an
    interrupted download never leaves a truncated file that would be read later.
    """
    path = data_cache_dir() / filename
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    log.info("downloading %s from %s to %s", what, url, path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        tmp.replace(path)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DatasetUnavailableError(
            f"could not download {what} from {url} ({type(exc).__name__}: {reason}). "
            f"Run once with network access (the file is then cached at {path}), copy the file there, "
            f"or pass a local copy: {local_hint}."
        ) from exc
    return path


def looks_like_path(source: str) -> bool:
    """A string meant as a file path rather than a dataset name ("azhx/counterfact")."""
    return source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl")) or source.count("/") > 1


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without a BOM) or UTF-16 with its BOM; anything else
    is an error naming the file."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the JSON file inside it")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 (or UTF-16 with a byte-order mark) text: byte {exc.start} is "
                         f"{raw[exc.start:exc.start + 1]!r}; save it as UTF-8") from None


def read_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (one record per line). An empty file, or a
    line that is not JSON, is an error naming the file (and the line)."""
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; expected a JSON list of records or JSON Lines")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if lineno == 1 and whole.lineno > 1:  # a JSON document broken further down, not JSON Lines
                    exc, lineno = whole, whole.lineno
                raise ValueError(f"{path} is neither a JSON list of records nor JSON Lines: line {lineno}: "
                                 f"{exc.msg} (column {exc.colno})") from None
    if isinstance(data, dict):
        # some redistributions wrap the list: {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path} holds a JSON object, expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    return data


def check_unique_ids(records: Sequence[Any], what: str) -> None:
    """Refuse records that share a ``case_id``: every frame is keyed by it, so two records
    with one id would give duplicate rows that no join or resume can tell apart."""
    seen: dict = {}
    dups = []
    for r in records:
        key = repr(r.case_id)
        if key in seen and len(dups) < 5:
            dups.append(r.case_id)
        seen[key] = True
    if dups:
        raise ValueError(f"{what}: case_id {', '.join(map(repr, dups))} occur(s) more than once; every record needs "
                         "its own case_id (frames are keyed by it). Renumber them, or load a list without "
                         "case_ids to number them by position")


def parse_all(raw: Iterable[Any], parse: Callable[[Any, int], T], skip_invalid: bool, what: str) -> list[T]:
    """Parse every raw record; invalid ones raise (naming the record) or, with
    ``skip_invalid``, are dropped and counted in a log warning."""
    out: list[T] = []
    skipped: list[str] = []
    for i, item in enumerate(raw):
        try:
            out.append(parse(item, i))
        except (ValueError, KeyError, TypeError) as exc:
            if skip_invalid:
                skipped.append(f"#{i}: {exc}")
                continue
            detail = str(exc) if isinstance(exc, ValueError) else f"malformed ({type(exc).__name__}: {exc})"
            error = type(exc) if isinstance(exc, ValueError) else ValueError
            raise error(f"{what} record #{i}: {detail}. Pass skip_invalid=True to drop such records "
                        "(their count is logged).") from exc
    if skipped:
        log.warning("skipped %d invalid %s record(s) of %d; first: %s", len(skipped), what,
                    len(skipped) + len(out), skipped[0])
    return out


def sample(records: Sequence[T], n: int | None, seed: int | None, unique_key: Callable[[T], Any] | None = None) -> list[T]:
    """Unique filtering (first record per key, in file order), then a seeded shuffle,
    then the first ``n``. Filtering first makes the kept set independent of the seed."""
    records = list(records)
    if unique_key is not None:
        seen: set = set()
        kept = []
        for r in records:
            k = unique_key(r)
            if k not in seen:
                seen.add(k)
                kept.append(r)
        records = kept
    if seed is not None:
        random.Random(seed).shuffle(records)
    if n is not None:
        if n < 0:
            raise ValueError(f"n={n} must be non-negative (or None for all records)")
        if n > len(records):
            log.warning("asked for n=%d records but only %d are available; returning all", n, len(records))
        records = records[:n]
    return records
