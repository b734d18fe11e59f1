"""Where editkit keeps things, and whether it may go online: read from the environment
in one place so every module agrees.

``EDITKIT_CACHE`` (default ``~/.cache/editkit``; ``~`` expanded) holds the world models
(``world/``), downloaded datasets (``data/``) and C0 statistics (``stats/``).
``HF_HUB_OFFLINE`` (any value but ``0``/``false``/empty) means: never touch the Hub.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "cache_dir", "hub_offline"]


def cache_root() -> Path:
    """``$EDITKIT_CACHE``, default ``~/.cache/editkit``, with ``~`` expanded."""
    return Path(os.environ.get("EDITKIT_CACHE") or "~/.cache/editkit").expanduser()


def cache_dir(kind: str, create: bool = True) -> Path:
    """``cache_root() / kind`` (``"world"``, ``"data"``, ``"stats"``...), created unless ``create=False``."""
    root = cache_root()
    path = root / kind
    if create:
        for p in (root, path):
            if p.exists() and not p.is_dir():
                raise NotADirectoryError(
                    f"the editkit cache {p} is a file, not a folder: set EDITKIT_CACHE to a folder (it is "
                    f"{os.environ.get('EDITKIT_CACHE') or 'unset, default ~/.cache/editkit'}), or pass cache=False")
        path.mkdir(parents=True, exist_ok=True)
    return path


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
