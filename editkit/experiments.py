"""Experiment runners for the three studies, with a resumable on-disk run store.

Each runner returns a tidy long-form DataFrame (one row per record × prompt kind ×
prompt, as :func:`editkit.metrics.evaluate` gives, plus the experiment's own
columns) and writes it *incrementally*: every finished unit of work (a chunk of
single edits at one layer, one batch, one sequential step) is written atomically
to its own file in the run directory. Re-running the same call finds the files,
skips those units and never duplicates or loses rows. The run directory is keyed
by the parameters, so a changed parameter never mixes into an old run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .cluster import Unit, run_units
from .editors import Editor, make_editor
from .hooks import restored_weights
from .models import LanguageModel, in_eval_mode

log = logging.getLogger(__name__)

__all__ = ["RunStore", "RunStoreError", "UnitClaimed", "records_digest", "unit_float", "layer_sweep", "batch_sweep",
           "sequential_batched", "load_run", "make_editor", "perplexity", "heldout_texts"]

# --- run store --------------------------------------------------------------

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
        return cls(path, **kw)

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
            want_sha, want_bytes = man["sha256"], int(man["bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            return f"manifest {m} is unreadable ({type(exc).__name__}: {exc})"
        if not f.exists():
            return f"manifest {m} has no CSV"
        sha, n = _sha256_file(f)
        if n != want_bytes or sha != want_sha:
            return f"{f} has {n} bytes / sha256 {sha[:12]}, its manifest records {want_bytes} bytes / {want_sha[:12]}"
        return None

    def is_done(self, unit: str) -> bool:
        """Whether ``unit`` was written completely (its CSV matches its manifest)."""
        return self._verify(unit) is None

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
        man = {"unit": unit, "rows": len(frame), "columns": list(map(str, frame.columns)), "bytes": n,
               "sha256": sha, "host": platform.node(), "pid": os.getpid(),
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
            frames = [self.read(m.stem) for m in sorted(units.glob("*.json"))]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def run_units(self, work: Sequence[tuple[str, Callable[[], pd.DataFrame]]], *, desc: str = "units",
                  progress: bool = True) -> None:
        """Compute every ``(unit, make_frame)`` not yet done, each under its claim, together
        with any other runner on this directory: units claimed by a live runner are
        skipped and waited for; a unit found corrupt is redone."""
        def job(unit: str, make: Callable[[], pd.DataFrame]):
            def done() -> bool:
                why = self._verify(unit)
                if why not in (None, "absent"):
                    log.warning("run %s: redoing unit %r: %s", self.path, unit, why)
                return why is None
            return unit, done, lambda: self.write(unit, make())

        self.run_jobs([job(u, m) for u, m in work], desc=desc, progress=progress)

    def run_jobs(self, jobs: Sequence[tuple[str, Callable[[], bool], Callable[[], None]]], *, desc: str = "units",
                 progress: bool = True) -> None:
        """The cooperative loop under :meth:`run_units`, for jobs that write several
        files: ``(claim name, is_done, do)``; ``do`` runs under the claim when not done."""
        pending = list(jobs)
        bar = tqdm(total=len(pending), desc=desc, unit="unit", disable=not progress)
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
            pending = waiting
            if pending:
                time.sleep(self.poll)
        bar.close()

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


# --- helpers ----------------------------------------------------------------

def _method_name(method: str | Editor) -> str:
    return method.method if isinstance(method, Editor) else str(method)


def _records(records: Sequence[Any], n: int | None) -> list[Any]:
    records = list(records)
    if n is not None and n > len(records):
        raise ValueError(f"asked for {n} edits but only {len(records)} records were given")
    return records[:n] if n is not None else records


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def _identity(lm: LanguageModel, recs: Sequence[Any]) -> dict:
    """What a run's rows are computed *from*: the model's name and a fingerprint of
    all its weights, and the records' content (their case_ids are kept for humans).
    Part of every run key, so other weights or other targets never reuse old rows."""
    return dict(model=lm.name, model_fingerprint=lm.fingerprint(), records=records_digest(recs),
                cases=[getattr(r, "case_id", i) for i, r in enumerate(recs)])


def _with_converged(frame: pd.DataFrame, records: Sequence[Any], edit: Any) -> pd.DataFrame:
    """Add ``converged``: whether the value optimization of each row's own request
    reached its stopping criterion (``Edit.diagnostics["converged"]``)."""
    flags = edit.diagnostics.get("converged") or [edit.converged] * len(records)
    ids = [getattr(r, "case_id", i) for i, r in enumerate(records)]
    if len(set(ids)) == len(ids) and len(flags) == len(ids):
        frame["converged"] = frame.case_id.map(dict(zip(ids, flags))).astype(bool)
    else:  # case_ids repeat: the batch's flag for every row
        frame["converged"] = edit.converged
    return frame


def _check_layers(lm: LanguageModel, layers: Sequence[int], what: str = "layers") -> None:
    """Refuse layers the model does not have before any work starts (a sweep over
    ``range(8)`` on a 4-layer model would otherwise fail minutes in, at layer 4)."""
    bad = [l for l in layers if not isinstance(l, numbers.Integral) or isinstance(l, bool) or not 0 <= l < lm.n_layers]
    if bad:
        raise ValueError(f"{what}={list(layers) if what == 'layers' else layers[0]!r}: {lm.name} has {lm.n_layers} layers "
                         f"(0..{lm.n_layers - 1}); {bad} out of range. Pass e.g. layers=range({lm.n_layers}).")


def _evaluate(lm, records, eval_batch_size, /, **cols) -> pd.DataFrame:
    from .metrics import evaluate

    frame = evaluate(lm, records, batch_size=eval_batch_size, progress=False)
    for k, v in cols.items():
        frame[k] = v
    return frame


def heldout_texts(source: str = "world", n: int = 200, seed: int = 0,
                  exclude: Sequence[Any] | None = None) -> list[str]:
    """Held-out text for the perplexity probe of sequential editing.

    * the embedded world (``"world[:size]"``): its held-out split;
    * a local CounterFact file (or ``"counterfact-text:<source>"``), the offline case of a
      real model: the true sentences of the file's *eval* half
      (:func:`editkit.corpora.counterfact_texts`), which an offline C0 never reads, minus the
      ``exclude`` records (pass the records being edited) and any sentence naming one of
      their subjects, so the probe reads real English that neither C0 nor an edit touched;
    * anything else: ``n`` documents of wikitext-103's test split (Hub), as the study does.
    """
    import random

    from .corpora import counterfact_texts
    from .data.corpus import HubCorpus, iter_corpus

    source = str(source)
    kind, _, rest = source.partition(":")
    if source.startswith("world"):
        from .world import world_corpus

        texts = list(world_corpus("heldout", size=rest or "default"))
    elif kind == "counterfact-text" or Path(source).is_file():
        cf = (rest or "counterfact") if kind == "counterfact-text" else source
        texts = list(counterfact_texts(cf, exclude=exclude, split="eval", seed=seed))
        if not texts:
            raise ValueError(f"heldout_texts({source!r}): no sentence of the file's eval half is left once the "
                             f"{len(exclude or ())} excluded records are dropped; edit fewer records or pass "
                             "heldout texts of your own")
        if len(texts) < n:
            log.warning("heldout_texts(%r): only %d held-out sentences (asked for %d)", source, len(texts), n)
    else:
        texts = list(iter_corpus(HubCorpus("wikitext", "wikitext-103-raw-v1", "test"), n * 5))
    random.Random(seed).shuffle(texts)
    return texts[:n]


@in_eval_mode
@torch.no_grad()
def perplexity(lm: LanguageModel, texts: Sequence[str], batch_size: int = 16, max_length: int = 256) -> float:
    """Token-level perplexity of ``texts`` (the general-ability probe of sequential editing)."""
    nll, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                           max_length=min(max_length, lm.max_positions or max_length)).to(lm.device)
        logits = lm.model(**enc).logits[:, :-1].float()
        tgt, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
        lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
        nll -= lp[mask].sum().item()
        count += int(mask.sum())
    return float(torch.tensor(nll / max(count, 1)).exp())


@contextmanager
def _restored_state(editor: Editor, lm: LanguageModel) -> Iterator[dict[str, torch.Tensor]]:
    """The method's state besides the weights (AlphaEdit's K_p K_pᵀ) as the sequence found
    it, put back when the sequence ends: like the weights, the model leaves a run as it came."""
    state = editor.sequential_state(lm)
    try:
        yield state
    finally:
        editor.load_sequential_state(lm, state)


# --- study 1: layer sweep ----------------------------------------------------

def layer_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("ROME", "MEMIT"),
                layers: Iterable[int] | None = None, n_edits: int | None = 100, *, preset: str | None = None,
                editor_kwargs: dict | None = None, chunk: int = 25, eval_batch_size: int = 64,
                trace: bool = False, run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Each fact edited into the *unedited* model alone, scored, and restored exactly;
    for every layer and every method. Rows carry ``method``, ``layer``, ``phase``
    (``"pre"`` for the unedited baseline, ``"post"`` after the edit). With ``trace``,
    causal-tracing importance per layer is added as ``phase="trace"`` rows.

    ``cluster`` (an :class:`editkit.cluster.Ray`, or ``"local:2"``, ``"ray://head:10001"``)
    computes the (layer, chunk) units on its workers, into the same run store."""
    recs = _records(records, n_edits)
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    _positive(chunk=chunk, eval_batch_size=eval_batch_size)
    _check_layers(lm, layers)
    kw = editor_kwargs or {}
    editors = {(_method_name(m), l): make_editor(m, l, preset, **kw) for m in methods for l in layers}
    params = dict(**_identity(lm, recs), methods=[_method_name(m) for m in methods], layers=layers,
                  n_edits=len(recs), preset=preset, editors={f"{m}-L{l}": e for (m, l), e in editors.items()},
                  trace=trace, chunk=chunk, eval_batch_size=eval_batch_size)
    store = RunStore.open("layer_sweep", params, run_dir, root)

    starts = range(0, len(recs), chunk)
    units = [Unit(f"pre-{i:06d}", _layer_pre, (recs[i:i + chunk], eval_batch_size),
                  dict(phase="pre", records=f"{i}-{min(i + chunk, len(recs)) - 1}")) for i in starts]
    units += [Unit(f"{m}-L{l:03d}-{i:06d}", _layer_post, (editors[(m, l)], m, l, recs[i:i + chunk], eval_batch_size),
                   dict(method=m, layer=l, records=f"{i}-{min(i + chunk, len(recs)) - 1}"), group=("layer", l))
              for (m, l) in editors for i in starts]
    if trace:
        units.append(Unit("trace", _layer_trace, (recs[: min(len(recs), 50)],), dict(phase="trace")))
    run_units(store, lm, units, cluster, desc="layer sweep", progress=progress)
    return store.load()


# The units of each study are module-level functions ``f(lm, store, *args)`` so that the
# same code runs in this process or on a cluster worker (which has its own copy of lm).

def _layer_pre(lm: LanguageModel, store: RunStore, recs: list, eval_batch_size: int, *,
               on_output: Callable | None = None) -> pd.DataFrame:
    return _evaluate(lm, recs, eval_batch_size, phase="pre", method="none", layer=-1)


def _layer_post(lm: LanguageModel, store: RunStore, editor: Editor, m: str, l: int, recs: list,
                eval_batch_size: int, *, on_output: Callable | None = None) -> pd.DataFrame:
    frames = []
    for r in recs:
        with editor.applied(lm, [r], progress=False) as edit:
            frames.append(_evaluate(lm, [r], eval_batch_size, phase="post", method=m, layer=l,
                                    delta_norm=edit.norms[l]["delta_norm"], converged=edit.converged))
    return pd.concat(frames, ignore_index=True)


def _layer_trace(lm: LanguageModel, store: RunStore, recs: list, *,
                 on_output: Callable | None = None) -> pd.DataFrame:
    from .tracing import layer_importance

    imp = layer_importance(lm, recs, progress=False)
    imp["phase"] = "trace"
    return imp


# --- study 2: batch editing ----------------------------------------------------

def batch_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                layer: int = 1, batch_sizes: Sequence[int] = (16, 64, 256), *, n_facts: int | None = None,
                preset: str | None = None, regs: dict[str, Sequence[float]] | None = None,
                editor_kwargs: dict | None = None, eval_batch_size: int = 64,
                heldout: Sequence[str] | None = None, heldout_batches: int = 4,
                run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Every batch size scored over the same ``n_facts`` facts (default: the largest
    batch size): ``n_facts / b`` independent batches of ``b``, each edited into the
    *unedited* model, scored, and restored exactly. So a small batch size rests on as
    many facts as a large one and the bands compare like with like (one batch of 4
    would score 4 facts). ``regs`` optionally sweeps λ
    (``{"MEMIT": [1e3, 1e4], "EMMET": [0.01, 0.1]}``); the value is in column ``reg``,
    the batch's index in ``batch``. Each batch is one unit of the run store, so an
    interrupted sweep resumes batch by batch. ``cluster`` computes the batches on its
    workers (see :func:`layer_sweep`).

    ``heldout`` texts (:func:`heldout_texts`) add the general-ability probe: their
    perplexity with the batch applied, in column ``perplexity`` (the unedited model's in the
    ``pre`` rows), measured for the first ``heldout_batches`` batches of every batch size (a
    perplexity pass costs about as much as scoring a batch of 64, and 512 single edits move it
    by less than its own rounding); the other batches' rows hold NaN."""
    batch_sizes = list(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes is empty; give at least one batch size, e.g. batch_sizes=[16, 64]")
    _positive(eval_batch_size=eval_batch_size, **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    if len(set(batch_sizes)) < len(batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes} has duplicates")
    n = int(n_facts) if n_facts is not None else max(batch_sizes)
    bad = [bs for bs in batch_sizes if n % bs]
    if bad:
        raise ValueError(f"n_facts={n} is not a multiple of batch size(s) {bad}: every batch size is scored over "
                         f"the same facts as n_facts / b whole batches; pick n_facts a multiple of "
                         f"{math.lcm(*batch_sizes)}")
    recs = _records(records, n)
    _check_layers(lm, [layer], "layer")
    kw = editor_kwargs or {}
    grid = []
    for m in methods:
        base = make_editor(m, layer, preset, **kw)
        values = [float(v) for v in ((regs or {}).get(base.method) or [base.reg])]
        if len(set(values)) < len(values):
            raise ValueError(f"regs[{base.method!r}]={values} has duplicates")
        grid += [(base.method, reg, bs, dataclasses.replace(base, reg=reg)) for reg in values for bs in batch_sizes]
    params = dict(**_identity(lm, recs), layer=layer, batch_sizes=batch_sizes, n_facts=n, preset=preset,
                  eval_batch_size=eval_batch_size, grid=[(m, reg, bs, ed) for m, reg, bs, ed in grid])
    if heldout is not None:
        heldout = list(heldout)
        if not heldout:
            raise ValueError("heldout is empty; pass heldout texts (e.g. experiments.heldout_texts(...)) or None")
        _positive(heldout_batches=heldout_batches)
        params.update(heldout=records_digest(heldout), heldout_batches=heldout_batches)  # in the run key
    store = RunStore.open("batch_sweep", params, run_dir, root)

    def probe(i: int) -> list[str] | None:  # None: no perplexity column; []: the column, NaN here
        return None if heldout is None else heldout if i < heldout_batches else []

    units = [Unit("pre", _batch_pre, (recs, eval_batch_size, heldout), dict(phase="pre"))]
    units += [Unit(f"{m}-reg{unit_float(reg)}-bs{bs:06d}-b{i:06d}", _batch_post,
                   (ed, m, reg, bs, layer, recs[i * bs:(i + 1) * bs], eval_batch_size, i, probe(i)),
                   dict(method=m, reg=reg, batch_size=bs, batch=i))
              for m, reg, bs, ed in grid for i in range(n // bs)]
    run_units(store, lm, units, cluster, desc="batch sweep", progress=progress)
    return store.load()


def _batch_pre(lm: LanguageModel, store: RunStore, recs: list, eval_batch_size: int,
               heldout: Sequence[str] | None = None, *, on_output: Callable | None = None) -> pd.DataFrame:
    ppl = {} if heldout is None else dict(perplexity=perplexity(lm, heldout))
    return _evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, reg=0.0, **ppl)


def _batch_post(lm: LanguageModel, store: RunStore, ed: Editor, m: str, reg: float, bs: int, layer: int,
                part: list, eval_batch_size: int, batch: int = 0, heldout: Sequence[str] | None = None, *,
                on_output: Callable | None = None) -> pd.DataFrame:
    """One batch edited into the unedited model, scored (and the held-out text's perplexity
    measured, when given), and restored."""
    t0 = time.perf_counter()
    with ed.applied(lm, part, progress=False) as edit:
        t_edit = time.perf_counter() - t0
        ppl = {} if heldout is None else dict(perplexity=perplexity(lm, heldout) if heldout else float("nan"))
        frame = _evaluate(lm, part, eval_batch_size, phase="post", method=m, batch_size=bs, batch=batch, reg=reg,
                          delta_norm=edit.norms[layer]["delta_norm"], edit_seconds=t_edit, **ppl)
        return _with_converged(frame, part, edit)


# --- study 3: sequential-batched editing ------------------------------------

def sequential_batched(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                       layer: int = 1, batch_sizes: Sequence[int] = (1, 16, 64, 256), total_edits: int = 256, *,
                       checkpoints: Sequence[int] | None = None, heldout: Sequence[str] | None = None,
                       preset: str | None = None, editor_kwargs: dict | None = None, eval_batch_size: int = 64,
                       run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                       progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Batches applied one after another to the *same* model (``total_edits`` facts
    as ``total_edits / batch_size`` batches). After each batch: that batch's scores
    (``phase="batch"``), the update norms and held-out perplexity (``phase="probe"``);
    at ``checkpoints`` (numbers of edits so far; default powers of 4 and the end)
    the scores of every fact edited so far (``phase="all"``, forgetting).

    The accumulated weight change is saved after every batch, so an interrupted run
    resumes from its last finished batch. The model is restored exactly at the end.
    A sequence is serial by nature; ``cluster`` runs the independent sequences (method ×
    batch size) on its workers (see :func:`layer_sweep`).
    """
    recs = _records(records, total_edits)
    batch_sizes = list(batch_sizes)
    _positive(total_edits=total_edits, eval_batch_size=eval_batch_size,
              **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    _check_layers(lm, [layer], "layer")
    for bs in batch_sizes:
        if total_edits % bs:
            raise ValueError(f"total_edits={total_edits} is not a multiple of batch size {bs}")
    if checkpoints is None:
        checkpoints = sorted({4 ** k for k in range(12) if 4 ** k <= total_edits} | {total_edits})
    kw = editor_kwargs or {}
    editors = {_method_name(m): make_editor(m, layer, preset, **kw) for m in methods}
    params = dict(**_identity(lm, recs), layer=layer, batch_sizes=batch_sizes, total_edits=total_edits,
                  checkpoints=list(checkpoints), preset=preset, editors=editors, eval_batch_size=eval_batch_size,
                  heldout=hashlib.sha256("\x00".join(heldout or []).encode()).hexdigest())
    store = RunStore.open("sequential_batched", params, run_dir, root)
    units = [Unit("pre", _sequence_pre, (recs, layer, heldout, eval_batch_size), dict(phase="pre"))]
    units += [Unit(f"seq-{m}-bs{bs:06d}", _sequence, (e, m, bs, layer, recs, list(checkpoints), heldout,
                                                      eval_batch_size, progress and cluster is None),
                   dict(method=m, batch_size=bs), outputs=tuple(_seq_unit(m, bs, b) for b in range(total_edits // bs)))
              for m, e in editors.items() for bs in batch_sizes]
    run_units(store, lm, units, cluster, desc="sequential-batched", progress=progress)
    return store.load()


def _seq_unit(m: str, bs: int, b: int) -> str:
    return f"{m}-bs{bs:06d}-b{b:06d}"


def _sequence_pre(lm: LanguageModel, store: RunStore, recs: list, layer: int, heldout: Sequence[str] | None,
                  eval_batch_size: int, *, on_output: Callable | None = None) -> pd.DataFrame:
    pre = _evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, batch=-1, edits_so_far=0)
    W = lm.weight(layer).detach().double()
    probe = dict(phase="probe", method="none", batch_size=0, batch=-1, edits_so_far=0, update_norm=0.0,
                 weight_norm=W.norm().item())
    if heldout:
        probe["perplexity"] = perplexity(lm, heldout)
    return pd.concat([pre, pd.DataFrame([probe])], ignore_index=True)


def _sequence(lm: LanguageModel, store: RunStore, editor: Editor, m: str, bs: int, layer: int, recs: list,
              checkpoints: list[int], heldout: Sequence[str] | None, eval_batch_size: int, progress: bool, *,
              on_output: Callable | None = None) -> None:
    """One sequence (method × batch size): its batches applied one after another, each
    batch's unit written as it finishes, and the accumulated weight saved after it, so
    an interrupted sequence resumes after its last finished batch (here or elsewhere)."""
    module = lm.edit_module(layer)
    n_batches = len(recs) // bs
    state_name = f"state-{m}-bs{bs:06d}"
    tick = on_output or (lambda: None)
    with restored_weights([module]), _restored_state(editor, lm) as start_state:
        W0 = lm.weight(layer).detach().to(torch.float64, copy=True)
        editor.second_moment(lm, layer, progress)  # C0 of the unedited model, before any state is loaded
        start = 0
        saved = store.load_state(state_name)
        if saved is not None:
            tensors, meta = saved
            start = int(meta["next_batch"])
            broken = [b for b in range(start) if not store.is_done(_seq_unit(m, bs, b))]
            if broken:  # an earlier batch's file is gone or corrupt: only a full rerun can redo it
                log.warning("%s bs=%d: unit(s) %s of %s are missing or corrupt; restarting the sequence",
                            m, bs, [_seq_unit(m, bs, b) for b in broken[:3]], store.path)
                start = 0
            else:
                with torch.no_grad():
                    module.weight.copy_(tensors.pop("weight").to(module.weight))
                editor.load_sequential_state(lm, tensors)  # e.g. AlphaEdit's K_p K_pᵀ
                log.info("%s bs=%d: resuming after batch %d", m, bs, start)
        if start == 0:
            editor.load_sequential_state(lm, start_state)
        for _ in range(start):
            tick()
        converged: dict = {}  # case_id -> converged, for the rows of every fact edited so far
        for b in range(start):
            old = store.read(_seq_unit(m, bs, b))
            if "converged" in old:
                rows = old[old.phase == "batch"]
                converged.update(zip(rows.case_id, rows.converged))
        for b in range(start, n_batches):
            part = recs[b * bs:(b + 1) * bs]
            done_edits = (b + 1) * bs
            cols = dict(method=m, batch_size=bs, batch=b, edits_so_far=done_edits)
            t0 = time.perf_counter()
            edit = editor.apply(lm, part, progress=False)
            t_edit = time.perf_counter() - t0
            edit.commit()  # kept applied: the sequence continues on this model
            frames = [_with_converged(_evaluate(lm, part, eval_batch_size, phase="batch", **cols), part, edit)]
            converged.update(zip(frames[0].case_id, frames[0].converged))
            if done_edits in checkpoints:
                everything = _evaluate(lm, recs[:done_edits], eval_batch_size, phase="all", **cols)
                everything["converged"] = everything.case_id.map(converged)
                frames.append(everything)
            W = lm.weight(layer).detach().double()
            probe = dict(phase="probe", **cols, converged=edit.converged, update_norm=(W - W0).norm().item(),
                         weight_norm=W.norm().item(), batch_delta_norm=edit.norms[layer]["delta_norm"],
                         edit_seconds=t_edit)
            if heldout:
                probe["perplexity"] = perplexity(lm, heldout)
            frames.append(pd.DataFrame([probe]))
            # Unit, then state: a crash in between redoes batch b from the state before it
            # and atomically overwrites the same unit file, so no row is lost or duplicated.
            # The state holds the weights and whatever else the method's next batch reads
            # (AlphaEdit: the earlier keys K_p K_pᵀ), so a resumed run continues exactly.
            store.write(_seq_unit(m, bs, b), pd.concat(frames, ignore_index=True))
            store.save_state(state_name, {"weight": module.weight.detach(), **editor.sequential_state(lm)},
                             {"next_batch": b + 1})
            tick()
