"""Text corpora: where C0's keys and the held-out perplexity probe read their text.

A corpus is a list of strings, a local ``.txt`` file (one document per non-empty line),
``.jsonl`` (a ``text`` field), a folder of those, ``"world"`` (the embedded world's
training text; ``"world:<size>"`` for another size), a Hub dataset name streamed through
``datasets`` (``"wikitext"``, ``"wikipedia"`` or any ``owner/name`` with a ``text`` column),
a :class:`HubCorpus` for a given split, or any iterable of strings (read once, see
:func:`materialize_corpus`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..paths import local_counterfact
from ..registry import Registry

__all__ = ["iter_corpus", "corpus_name", "materialize_corpus", "HubCorpus", "CorpusUnavailableError", "HUB_CORPORA",
           "CORPORA"]

#: Named corpora that are neither files nor Hub datasets (``"world"``, ``"world:small"``):
#: ``provider(name)`` returns the texts. Filled by :mod:`editkit.registrations`.
CORPORA = Registry("corpus")

#: Hub datasets behind the short corpus names users type.
HUB_CORPORA = {
    "wikitext": ("wikitext", "wikitext-103-raw-v1", "train"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", "train"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "train"),
}


class CorpusUnavailableError(RuntimeError):
    """The corpus for C0 could not be read (offline Hub, missing path)."""


def corpus_name(corpus: Any) -> str:
    """A stable identity for a corpus argument (for cache keys and logs)."""
    if isinstance(corpus, HubCorpus):
        return f"hub:{corpus.repo}:{corpus.config}:{corpus.split}"
    if isinstance(corpus, os.PathLike):
        corpus = os.fspath(corpus)
    if isinstance(corpus, str):
        kind, _, source = corpus.partition(":")
        if kind in ("counterfact-text", "offline-text") and source in ("", "counterfact"):
            local = local_counterfact()
            if local is not None:  # EDITKIT_DATA stands in for the official file: C0 is keyed by that file
                return f"{kind}:{corpus_name(str(local))}"
        p = Path(corpus)
        if p.exists():
            st = p.stat()
            return f"path:{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"
        return corpus
    if not isinstance(corpus, (list, tuple)):
        raise TypeError("corpus_name needs a list of texts; pass the corpus through materialize_corpus first "
                        "(a generator would be consumed by hashing it)")
    texts = list(corpus)
    h = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return f"list:{len(texts)}:{h}"


def materialize_corpus(corpus: Any, n_samples: int | None = None) -> Any:
    """A one-shot iterable corpus (a generator, a file handle, ``map(...)``) as a list of
    its first ``n_samples`` texts, so it can be both hashed for the cache key and read;
    names, paths, lists and :class:`HubCorpus` pass through unchanged."""
    if isinstance(corpus, (str, os.PathLike, HubCorpus, list, tuple)):
        return corpus
    if not hasattr(corpus, "__iter__"):
        raise TypeError(f"corpus={corpus!r} is not a corpus: pass a name ('wikitext', 'world'), a .txt/.jsonl path, "
                        "or an iterable of strings")
    texts = [t for t in itertools.islice(iter(corpus), n_samples)]
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"corpus must yield strings; it yielded {bad[0]}")
    return texts


def iter_corpus(corpus: str | Sequence[str] | os.PathLike, n_samples: int | None = None) -> Iterator[str]:
    """Yield non-empty texts from a corpus.

    ``corpus`` is a list of strings, a local ``.txt`` file (one document per
    non-empty line), ``.jsonl`` (a ``text`` field), a directory of those, the name
    ``"world"`` (the embedded world's training corpus; ``"world:<size>"`` for another size), or a Hub dataset name
    (``"wikitext"``, ``"wikipedia"`` or any ``owner/name`` with a ``text`` column),
    streamed through ``datasets``.
    """
    texts = _iter_corpus(corpus)
    count = 0
    for t in texts:
        if t and t.strip():
            yield t
            count += 1
            if n_samples is not None and count >= n_samples:
                return


def _iter_corpus(corpus: Any) -> Iterable[str]:
    if isinstance(corpus, HubCorpus):
        return _hub_texts(corpus)
    if isinstance(corpus, (list, tuple)):
        return corpus
    if not isinstance(corpus, (str, os.PathLike)):
        return corpus  # any iterable of strings
    name = str(corpus)
    provider = CORPORA.find(name)
    if provider is not None:  # e.g. "world": the embedded world's training text
        return provider(name)
    path = Path(name).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
        return (t for f in files for t in _read_file(f))
    if name.startswith((".", "/", "~")) or name.endswith((".txt", ".jsonl")):
        raise CorpusUnavailableError(f"corpus path {name!r} does not exist; pass an existing .txt/.jsonl file or folder")
    return _hub_texts(name)


def _read_file(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if path.suffix == ".jsonl":
                yield json.loads(line).get("text", "")
            else:
                yield line.rstrip("\n")


@dataclass(frozen=True)
class HubCorpus:
    """A Hub dataset split with a ``text`` column, streamed (e.g. wikitext-103's test split)."""

    repo: str
    config: str | None = None
    split: str = "train"


def _hub_texts(name: str | HubCorpus) -> Iterator[str]:
    from datasets import load_dataset

    from ..hub import hub_offline_reason, hub_reachable

    if isinstance(name, HubCorpus):
        repo, config, split = name.repo, name.config, name.split
    else:
        repo, config, split = HUB_CORPORA.get(name, (name, None, "train"))
    if not hub_reachable():
        raise CorpusUnavailableError(
            f"corpus {name!r} is a Hugging Face Hub dataset ({repo!r}) and the Hub cannot be reached "
            f"({hub_offline_reason()}). Offline, pass corpus= a local .txt/.jsonl file or folder, a list of "
            "strings, or 'world' (the embedded world's corpus)."
        )
    try:
        ds = load_dataset(repo, config, split=split, streaming=True)
        first = iter(ds)
        row = next(first)
    except Exception as exc:  # datasets raises many types when offline
        raise CorpusUnavailableError(
            f"could not stream corpus {name!r} (Hub dataset {repo!r}) : {type(exc).__name__}: {exc}\n"
            "The Hugging Face Hub must be reachable for a Hub corpus. Offline, pass corpus= a local .txt/.jsonl "
            "file or folder, a list of strings, or 'world' (the embedded world's corpus)."
        ) from exc
    yield row["text"]
    for row in first:
        yield row["text"]
