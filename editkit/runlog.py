"""What a notebook run was computed from, collected while it runs, for its report.

``editkit run`` / ``editkit figures`` point ``$EDITKIT_RUN_LOG`` at a file; the notebook's
kernel (through :func:`editkit.notebook.setup`) appends one JSON line per loaded model
(its weight fingerprint) and per record set (its content hash). After the run the lines
are stored in the executed notebook's metadata, beside the CPU time and the package
versions, so the notebook alone says what it was run on (:mod:`editkit.report`).
Without the variable nothing is written.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["ENV", "note", "read", "versions"]

ENV = "EDITKIT_RUN_LOG"


def note(kind: str, **info: Any) -> None:
    """Append ``{"kind": kind, **info}`` to the run log, if this process has one."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read(path: str | os.PathLike) -> list[dict]:
    """The entries of a run log (none if it does not exist), duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    out, seen = [], set()
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            key = json.dumps({k: v for k, v in entry.items() if k != "time"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(entry)
    return out


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("editkit", "torch", "transformers", "numpy", "pandas", "matplotlib", "papermill"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    from ._version import __version__

    out["editkit"] = __version__
    return out
