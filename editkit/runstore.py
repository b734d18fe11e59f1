"""The run store: a resumable, verified on-disk record of a study's finished units.

Both the study runners (:mod:`editkit.studies`) and the cluster executor (:mod:`editkit.cluster`)
write into it; it knows neither.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch

from ._version import __version__
from .progress import tqdm

log = logging.getLogger(__name__)

__all__ = ["RunStore", "RunStoreError", "UnitClaimed", "records_digest", "unit_float", "load_run", "STORE_FORMAT"]


#: Layout version written to ``params.json``; runs without it predate unit manifests.
STORE_FORMAT = 2


class RunStoreError(RuntimeError):
    """A run directory holds something that cannot be trusted; the message names the file."""


class UnitClaimed(RuntimeError):
    """Another live runner holds the claim on this unit."""


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(x.to_dict() if hasattr(x, "to_dict") else dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def records_digest(records: Sequence[Any]) -> str:
    """sha256 of the records' *content* (every field, in order), not their case_ids:
    two record lists that differ in any target, prompt or order get different keys."""
    h = hashlib.sha256()
    for r in records:
        h.update(type(r).__name__.encode())
        h.update(json.dumps(_jsonable(r), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def unit_float(x: float) -> str:
    """A lossless, file-name-safe spelling of a float for unit names (``repr``:
    shortest string that reads back to the same double; ``%g`` merged 1234567 and 1234568)."""
    return repr(float(x))


def _sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _unique_tmp(path: Path) -> Path:
    """A temporary name next to ``path`` no other writer (process, thread, host) uses."""
    return path.with_name(f".{path.name}.{platform.node()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _unique_tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise RunStoreError(f"unit file {path} is not a readable CSV ({type(exc).__name__}: {exc}); "
                            "delete it (and its .json manifest) and re-run to recompute that unit") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class RunStore:
    """A run directory: ``params.json`` plus, per finished unit, ``units/<unit>.csv`` and
    its manifest ``units/<unit>.json`` (row count, byte size, sha256 of the CSV).

    A unit counts as done only when its manifest matches its CSV, so a truncated,
    header-only or overwritten file is never taken as finished. Writes go to unique
    temporary names and are renamed into place (CSV first, manifest last), so a crash
    leaves either a verified unit or one that is redone.

    Several runners (processes, threads, hosts on a shared filesystem) can work on one
    directory: each unit is computed under :meth:`claim`, an ``O_EXCL`` lock file
    holding its owner's host, pid and a token, refreshed every ``heartbeat`` seconds.
    A lock is stale (and taken over) when its owner is a dead process on this host or
    when it was not refreshed for ``stale_after`` seconds (a crashed remote worker).

    The API a scheduler needs: ``is_done(unit)``, ``units()`` (the finished ones),
    ``with store.claim(unit): ... store.write(unit, frame)``, and :meth:`run_units`,
    which does a list of units cooperatively with any other runner on the directory.
    """

    path: Path
    stale_after: float = 600.0
    heartbeat: float = 30.0
    poll: float = 1.0
    key: str | None = None  # the run key (params.json's); every unit's manifest names it (None: read params.json)
    _told: set = field(default_factory=set, init=False, repr=False, compare=False)  # units said to be redone

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.key is None and (self.path / "params.json").exists():
            try:
                self.key = _read_params(self.path / "params.json").get("key")
            except RunStoreError:
                self.key = None

    @classmethod
    def open(cls, kind: str, params: dict, run_dir: str | os.PathLike | None = None,
             root: str | os.PathLike = "runs", **kw: Any) -> "RunStore":
        params = _jsonable(params)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(run_dir) if run_dir is not None else Path(root) / f"{kind}-{digest}"
        (path / "units").mkdir(parents=True, exist_ok=True)
        meta = {"kind": kind, "key": digest, "format": STORE_FORMAT, "params": params,
                "editkit_version": __version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        pfile = path / "params.json"
        if not pfile.exists():
            # Two runners may race here: both write the same key, the rename is atomic.
            _atomic_write_text(pfile, json.dumps(meta, indent=2))
        old = _read_params(pfile)
        if old.get("key") != digest:
            raise ValueError(f"run directory {path} holds a run with other parameters (key {old.get('key')} "
                             f"≠ {digest}); pass another run_dir or omit it to get one keyed by the parameters")
        log.info("run %s: %s", kind, path)
        return cls(path, key=digest, **kw)

    # --- files -------------------------------------------------------------
    def _file(self, unit: str) -> Path:
        if not unit or any(c in unit for c in "/\\\0") or unit.startswith("."):
            raise ValueError(f"unit name {unit!r} must be a plain file name (no '/', not starting with '.')")
        return self.path / "units" / f"{unit}.csv"

    def _manifest(self, unit: str) -> Path:
        return self._file(unit).with_suffix(".json")

    def _lock(self, unit: str) -> Path:
        return self._file(unit).with_suffix(".lock")

    # --- state of units ----------------------------------------------------
    def _verify(self, unit: str) -> str | None:
        """None when the unit's CSV matches its manifest, else why not."""
        f, m = self._file(unit), self._manifest(unit)
        if not m.exists():
            return "no manifest (unfinished)" if f.exists() else "absent"
        try:
            man = json.loads(m.read_text())
            want_sha, want_bytes, want_rows = man["sha256"], int(man["bytes"]), int(man["rows"])
        except (ValueError, KeyError, TypeError) as exc:
            return f"manifest {m} is unreadable ({type(exc).__name__}: {exc})"
        run = man.get("run")  # absent in manifests written before units named their run
        if run is not None and self.key is not None and run != self.key:
            return f"{m} belongs to another run (key {run}, this run's is {self.key})"
        if man.get("unit", unit) != unit:
            return f"manifest {m} names unit {man.get('unit')!r}, not {unit!r}"
        if not f.exists():
            return f"manifest {m} has no CSV"
        sha, n = _sha256_file(f)
        if n != want_bytes or sha != want_sha:
            return f"{f} has {n} bytes / sha256 {sha[:12]}, its manifest records {want_bytes} bytes / {want_sha[:12]}"
        try:
            rows = len(_read_csv(f))
        except Exception as exc:  # noqa: BLE001 - any unreadable CSV is a unit to redo
            return f"{f} is unreadable ({type(exc).__name__}: {exc})"
        if rows != want_rows:
            return f"{f} has {rows} rows, its manifest {m} records {want_rows}"
        return None

    def is_done(self, unit: str) -> bool:
        """Whether ``unit`` was written completely (its CSV matches its manifest)."""
        return self._verify(unit) is None

    def done_or_redo(self, unit: str) -> bool:
        """:meth:`is_done`, and when a unit exists but cannot be used (corrupt, an edited
        manifest, another run's), say once that it is redone and why (``warnings.warn``)."""
        why = self._verify(unit)
        if why not in (None, "absent") and unit not in self._told:
            self._told.add(unit)
            if "belongs to another run" in why:
                why = f"{why}: its rows were computed for another run and are not served"
            log.warning("run %s: redoing unit %r: %s", self.path, unit, why)
            warnings.warn(f"run {self.path}: redoing unit {unit!r}: {why}", UserWarning, stacklevel=2)
        return why is None

    # kept for callers of the first API
    has = is_done

    def units(self) -> list[str]:
        """Names of the finished units (verified), sorted."""
        names = sorted(p.stem for p in (self.path / "units").glob("*.json"))
        return [u for u in names if self.is_done(u)]

    @contextmanager
    def claim(self, unit: str) -> Iterator[None]:
        """Hold the per-unit lock for the block; raises :class:`UnitClaimed` at once if a
        live runner holds it. Safe across processes and hosts on a shared filesystem."""
        lock = self._lock(unit)
        token = uuid.uuid4().hex
        owner = json.dumps({"host": platform.node(), "pid": os.getpid(), "token": token,
                            "time": time.time()})
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale(lock):
                    raise UnitClaimed(f"unit {unit!r} of {self.path} is being computed by {self._owner(lock)}")
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(owner)
            break
        else:
            raise UnitClaimed(f"unit {unit!r} of {self.path}: could not take its lock {lock}")
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                try:
                    os.utime(lock)
                except OSError:
                    return

        thread = threading.Thread(target=beat, daemon=True, name=f"editkit-claim-{unit}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if self._owner(lock).get("token") == token:  # never remove a lock someone took over
                lock.unlink(missing_ok=True)

    def _owner(self, lock: Path) -> dict:
        try:
            return json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _break_if_stale(self, lock: Path) -> bool:
        """Remove ``lock`` if its owner is gone; True when the caller may retry."""
        owner = self._owner(lock)
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile
        dead = owner.get("host") == platform.node() and isinstance(owner.get("pid"), int) \
            and not _pid_alive(owner["pid"])
        if not (dead or age > self.stale_after or (not owner and age > 5 * self.poll)):
            return False
        log.warning("taking over the stale lock %s (owner %s, last refreshed %.0f s ago)", lock, owner, age)
        aside = _unique_tmp(lock)
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return True
        if self._owner(aside).get("token") != owner.get("token"):  # a fresh lock slipped in: put it back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # --- reading and writing -------------------------------------------------
    def write(self, unit: str, frame: pd.DataFrame) -> None:
        """Write ``unit`` atomically, then its manifest (rows, bytes, sha256)."""
        f = self._file(unit)
        tmp = _unique_tmp(f)
        frame.to_csv(tmp, index=False)
        sha, n = _sha256_file(tmp)
        os.replace(tmp, f)
        man = {"unit": unit, "run": self.key, "rows": len(frame), "columns": list(map(str, frame.columns)),
               "bytes": n, "sha256": sha, "host": platform.node(), "pid": os.getpid(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_write_text(self._manifest(unit), json.dumps(man, indent=1))

    def read(self, unit: str) -> pd.DataFrame:
        """One finished unit, verified (a mismatch raises :class:`RunStoreError` naming the file)."""
        why = self._verify(unit)
        if why is not None:
            raise RunStoreError(f"unit {unit!r} of {self.path} cannot be trusted: {why}")
        frame = _read_csv(self._file(unit))
        rows = json.loads(self._manifest(unit).read_text())["rows"]
        if len(frame) != rows:
            raise RunStoreError(f"unit file {self._file(unit)} has {len(frame)} rows, its manifest records {rows}")
        return frame

    def load(self) -> pd.DataFrame:
        """Every finished unit, each verified against its manifest. A unit CSV without a
        manifest is unfinished (a crash between the two renames) and is left out with a
        warning; a CSV that does not match its manifest raises, naming the file."""
        units = self.path / "units"
        legacy = _read_params(self.path / "params.json").get("format") is None \
            if (self.path / "params.json").exists() else False
        csvs = sorted(units.glob("*.csv"))
        if legacy:
            log.warning("run %s predates unit manifests: its %d unit files cannot be verified", self.path, len(csvs))
            frames = [_read_csv(f) for f in csvs]
        else:
            unfinished = [f.name for f in csvs if not f.with_suffix(".json").exists()]
            if unfinished:
                log.warning("run %s: %d unit file(s) without a manifest are unfinished and left out: %s",
                            self.path, len(unfinished), ", ".join(unfinished[:5]))
            names = [m.stem for m in sorted(units.glob("*.json"))]
            foreign = [u for u in names if "belongs to another run" in (self._verify(u) or "")]
            if foreign:
                warnings.warn(f"run {self.path}: {len(foreign)} unit(s) belong to another run (its params.json was "
                              f"replaced) and are left out: {', '.join(foreign[:5])}", UserWarning, stacklevel=2)
            frames = [self.read(u) for u in names if u not in foreign]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def run_units(self, work: Sequence[tuple[str, Callable[[], pd.DataFrame]]], *, desc: str = "units",
                  progress: bool = True) -> None:
        """Compute every ``(unit, make_frame)`` not yet done, each under its claim, together
        with any other runner on this directory: units claimed by a live runner are
        skipped and waited for; a unit found corrupt is redone."""
        def job(unit: str, make: Callable[[], pd.DataFrame]):
            return unit, lambda: self.done_or_redo(unit), lambda: self.write(unit, make())

        self.run_jobs([job(u, m) for u, m in work], desc=desc, progress=progress)

    def run_jobs(self, jobs: Sequence[tuple[str, Callable[[], bool], Callable[[], None]]], *, desc: str = "units",
                 progress: bool = True) -> None:
        """The cooperative loop under :meth:`run_units`, for jobs that write several
        files: ``(claim name, is_done, do)``; ``do`` runs under the claim when not done."""
        pending = list(jobs)
        bar = tqdm(total=len(pending), desc=desc, unit="unit", disable=not progress)
        waits: dict[str, float] = {}  # unit -> when this runner started waiting for it
        wait_bar = None
        while pending:
            waiting = []
            for name, done, do in pending:
                if done():
                    bar.update(1)
                    continue
                try:
                    with self.claim(name):
                        if not done():  # finished by another runner meanwhile?
                            do()
                    bar.update(1)
                except UnitClaimed:
                    waiting.append((name, done, do))
                    self._say_who_holds(name, waits)
            pending = waiting
            if pending:
                if progress and wait_bar is None:
                    wait_bar = tqdm(desc=f"{desc}: waiting for units held by other runners", unit="s",
                                    bar_format="{desc}: {elapsed}")
                if wait_bar is not None:
                    wait_bar.set_postfix_str(f"{len(pending)} unit(s), e.g. {pending[0][0]!r}", refresh=False)
                    wait_bar.update(0)
                time.sleep(self.poll)
        if wait_bar is not None:
            wait_bar.close()
        bar.close()

    def _say_who_holds(self, unit: str, waits: dict[str, float]) -> None:
        """Tell the user (once, then every minute) which runner holds ``unit`` and how long this
        one waits at most: a silent wait of up to ``stale_after`` seconds looks like a hang."""
        now = time.time()
        first = unit not in waits
        last = waits.setdefault(unit, now)
        if not first and now - last < 60:
            return
        waits[unit] = now
        lock = self._lock(unit)
        owner = self._owner(lock)
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            return
        who = f"{owner.get('host', '?')} (pid {owner.get('pid', '?')})"
        text = (f"run {self.path}: unit {unit!r} is being computed by {who}, lock refreshed {age:.0f} s ago; "
                f"waiting for it (taken over if not refreshed for {self.stale_after:.0f} s)")
        if first:
            warnings.warn(text, UserWarning, stacklevel=3)
        log.warning("%s", text)

    # --- tensors (sequential editing state) ----------------------------------
    def save_state(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file

        f = self.path / f"{name}.safetensors"
        tmp = _unique_tmp(f)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"meta": json.dumps(meta)})
        os.replace(tmp, f)

    def load_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved state, or None when absent or unreadable (then logged, naming the file)."""
        from safetensors import safe_open

        f = self.path / f"{name}.safetensors"
        if not f.exists():
            return None
        try:
            with safe_open(str(f), "pt") as h:
                return {k: h.get_tensor(k) for k in h.keys()}, json.loads(h.metadata()["meta"])
        except Exception as exc:  # safetensors raises its own error types
            log.warning("state file %s is unreadable (%s: %s); starting that sequence over", f,
                        type(exc).__name__, exc)
            return None


def _read_params(pfile: Path) -> dict:
    try:
        data = json.loads(pfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunStoreError(f"{pfile} is not valid JSON ({type(exc).__name__}: {exc}); the run's parameters "
                            "are unknown: restore the file or delete the run directory") from exc
    if not isinstance(data, dict) or "key" not in data:
        raise RunStoreError(f"{pfile} is not an editkit params.json (no 'key'); restore it or delete the run")
    return data


def load_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every row a run directory holds (finished, verified units only), with its
    parameters in ``.attrs["run"]``. Raises for a missing directory, a corrupt
    ``params.json`` or a unit file that does not match its manifest, naming the file."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    pfile = path / "params.json"
    if not pfile.exists():
        raise RunStoreError(f"{path} is not a run directory: it has no params.json")
    meta = _read_params(pfile)
    frame = RunStore(path).load()
    frame.attrs["run"] = meta
    return frame
