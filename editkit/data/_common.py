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

__all__ = ["DatasetUnavailableError", "data_cache_dir", "fetch", "read_records", "parse_all", "sample", "looks_like_path"]

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


def read_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (one record per line)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is neither a JSON list of records nor JSON Lines: {exc}") from None
    if isinstance(data, dict):
        # some redistributions wrap the list: {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path} holds a JSON object, expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    return data


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
