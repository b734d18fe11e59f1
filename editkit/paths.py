"""Where editkit keeps things, and whether it may go online: read from the environment
in one place so every module agrees.

``EDITKIT_CACHE`` (default ``~/.cache/editkit``; ``~`` expanded) holds the world models
(``world/``), downloaded datasets (``data/``) and C0 statistics (``stats/``).
``HF_HUB_OFFLINE`` (any value but ``0``/``false``/empty) means: never touch the Hub.
``EDITKIT_DATA`` names a local CounterFact file that stands in for the official download
wherever ``"counterfact"`` is named (:func:`local_counterfact`).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "cache_dir", "hub_offline", "local_counterfact"]


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


def local_counterfact() -> Path | None:
    """``$EDITKIT_DATA``: a local CounterFact file (any layout ``ek.load_counterfact`` reads:
    the official JSON, multi-counterfact, EasyEdit's) used wherever ``"counterfact"`` is named:
    ``load_counterfact("counterfact")``, ``corpus="counterfact-text"`` (the real-model presets'
    C0), the notebooks' ``dataset="counterfact"`` and their commands. Set it once instead of
    writing the path into every call; None when unset."""
    value = os.environ.get("EDITKIT_DATA", "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"EDITKIT_DATA={value!r} is not a file: set it to a local CounterFact JSON file "
                                "(e.g. counterfact.json), or unset it to download the official one")
    return path.resolve()
