"""Run an experiment's units on a Ray cluster: one actor per worker/device keeps the model.

editkit's runners cut a study into *units* (a chunk of single edits at one layer, one
batch, one sequence of batches), each written atomically to the run store. This module
hands those units to workers instead of running them in the notebook's process:

* :class:`Ray` starts (or connects to) a Ray cluster and keeps **one actor per worker**.
  Each actor receives a picklable :class:`~editkit.models.ModelSpec` (name or path,
  dtype, device; never weights), loads the model *once* and keeps it, with its cached
  statistics (C0), for every unit and every runner call that follows.
* Results land in the **same run store** on a shared filesystem. A worker computes a
  unit under the store's per-unit claim (:meth:`RunStore.claim`: an ``O_EXCL`` lock
  file with a heartbeat), so a unit is computed by one worker, and is written
  atomically under its own name, so a unit computed twice is overwritten, never
  duplicated.
* A worker that dies mid-unit (killed, out of memory, node lost): its unit goes back to
  the queue and runs on another worker (Ray restarts the dead actor, up to
  ``max_restarts``). The dead worker's claim is released by the driver, which knows the
  worker is gone; nothing it half-wrote counts, because a unit is done only when its
  file matches its manifest.
* An interrupted distributed run resumes serially or distributed alike: both skip the
  units the store already holds.
* One ``tqdm.auto`` bar over all units across workers; a failing unit raises
  :class:`UnitError` with the unit's parameters and the worker's traceback.

Without a cluster (``cluster=None``) every runner is unchanged: :func:`run_units` runs
the same unit functions in this process, under the same claims.

Why Ray rather than Dask: the model must stay resident in a long-lived process per
device, and units must be routed to whichever of those processes is free. Ray actors
are exactly that (stateful workers, GPU placement by ``num_gpus``, restart on death,
death reported to the caller per task); Dask's actors are experimental, do not restart,
and its GPU placement goes through worker resources set at cluster start.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence
from urllib.parse import parse_qsl, urlsplit

from .editors import summarized_edit_warnings
from .models import LanguageModel, ModelSpec
from .progress import tqdm
from .runstore import RunStore, UnitClaimed

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent  # the editkit this process imported (workers report theirs)

__all__ = ["Ray", "Unit", "UnitError", "ClusterError", "resolve", "run_units", "spec_of"]


class ClusterError(RuntimeError):
    """The cluster cannot run the units (no workers left, a worker loaded another model, ...)."""


class UnitError(RuntimeError):
    """A unit failed on a worker; the message carries its parameters and the remote traceback."""

    def __init__(self, unit: "Unit", message: str, remote_traceback: str = "", worker: str = ""):
        self.unit, self.remote_traceback, self.worker = unit, remote_traceback, worker
        params = ", ".join(f"{k}={v!r}" for k, v in unit.params.items())
        where = f" on worker {worker}" if worker else ""
        super().__init__(f"unit {unit.name!r} ({params}) failed{where}: {message}"
                         + (f"\n--- remote traceback ---\n{remote_traceback}" if remote_traceback else ""))


@dataclass(frozen=True)
class Unit:
    """One piece of a study: ``fn(lm, store, *args)`` computes it on whichever process runs it.

    ``fn`` is a module-level function (it travels by reference, not by value) that
    returns the unit's frame (then written as ``units/<name>.csv``) or, for a unit that
    writes several files itself (a sequence of batches), ``None``; ``outputs`` lists
    those files. ``params`` are shown in progress and in errors; units with the same
    ``group`` (e.g. one layer) are preferably given to the same worker, which has that
    group's statistics in memory already.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    params: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    group: Hashable = None

    @property
    def files(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)


def unit_done(store: "RunStore", unit: Unit) -> bool:
    return all([store.done_or_redo(f) for f in unit.files])  # every file checked: each redo is said


def execute(unit: Unit, lm: LanguageModel, store: "RunStore", on_output: Callable[[], None] | None = None) -> str:
    """Compute ``unit`` (the caller holds its claim) unless the store has it: "done" or "skipped"."""
    if unit_done(store, unit):
        return "skipped"
    frame = unit.fn(lm, store, *unit.args, on_output=on_output)
    if frame is not None:
        store.write(unit.name, frame)
        if on_output is not None:
            on_output()
    return "done"


def run_units(store: "RunStore", lm: LanguageModel, units: Sequence[Unit], cluster: Any = None, *,
              desc: str = "units", progress: bool = True) -> None:
    """Compute every unit the store does not hold yet: in this process when ``cluster``
    is None, else on the cluster (a :class:`Ray`, or a string for :func:`resolve`)."""
    cluster = resolve(cluster)
    if cluster is not None:
        cluster.run_units(store, lm, units, desc=desc, progress=progress)
        return
    total = sum(len(u.files) for u in units)
    bar = tqdm(total=total, desc=desc, unit="unit", disable=not progress)

    def job(u: Unit):
        def done() -> bool:
            return unit_done(store, u)

        def do() -> None:
            execute(u, lm, store, on_output=lambda: bar.update(1))

        return u.name, done, do

    try:
        with summarized_edit_warnings(desc):
            store.run_jobs([job(u) for u in units], desc=desc, progress=False)
        bar.update(max(0, total - bar.n))  # units found finished (before, or by another runner)
    finally:
        bar.close()


# --- resolving the ``cluster`` argument ---------------------------------------------

def resolve(cluster: Any) -> "Ray | None":
    """``None`` / ``""`` / ``"none"`` → serial; a :class:`Ray` as is; a string:

    * ``"local:N"`` — a Ray instance on this machine with N workers;
    * ``"ray://head:10001"`` — Ray Client to a running cluster;
    * ``"auto"`` — the cluster this process runs in (e.g. started by ``ray start`` under Slurm);

    options after ``?``: ``"ray://head:10001?workers=8&gpus_per_worker=1"``.
    Strings are resolved to one shared object each, so a notebook that runs several
    sweeps with the same string keeps its workers and their loaded models.
    """
    if cluster is None or (isinstance(cluster, str) and cluster.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(cluster, Ray):
        return cluster
    if not isinstance(cluster, str):
        raise TypeError(f"cluster={cluster!r}: pass None, an editkit.cluster.Ray, or a string such as "
                        "'local:2', 'ray://head:10001' or 'auto'")
    key = cluster.strip()
    if key not in _RESOLVED:
        _RESOLVED[key] = _parse(key)
    return _RESOLVED[key]


_RESOLVED: dict[str, "Ray"] = {}
_OPTIONS = {"workers": int, "gpus_per_worker": float, "cpus_per_worker": float, "max_restarts": int,
            "max_attempts": int, "object_store_mb": int}


def _parse(text: str) -> "Ray":
    base, _, query = text.partition("?")
    opts: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in _OPTIONS:
            raise ValueError(f"cluster={text!r}: unknown option {k!r}; options are {sorted(_OPTIONS)}")
        try:
            opts[k] = _OPTIONS[k](v)
        except ValueError:
            raise ValueError(f"cluster={text!r}: option {k}={v!r} is not a {_OPTIONS[k].__name__}") from None
    if base.startswith("local"):
        n = base.partition(":")[2]
        if n:
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"cluster={text!r}: 'local:N' needs a positive number of workers, e.g. 'local:2'")
            opts.setdefault("workers", int(n))
        return Ray(address=None, **opts)
    if base == "auto" or urlsplit(base).scheme in ("ray", "rays") or ":" in base:
        opts.setdefault("workers", None)  # one per GPU (gpus_per_worker > 0) or per CPU of the cluster
        return Ray(address=base, **opts)
    raise ValueError(f"cluster={text!r} is not understood: use 'local:2', 'ray://head:10001', 'auto' "
                     "or 'host:6379'")


def spec_of(lm: LanguageModel, spec: ModelSpec | None = None) -> ModelSpec:
    """The spec workers load ``lm`` from: the one given, else the one ``lm`` was loaded with."""
    spec = spec or getattr(lm, "spec", None)
    if spec is None:
        raise ClusterError(f"model {lm.name!r} has no ModelSpec, so workers cannot load it: load it with "
                           "ek.load_model(...) (which records one) or pass "
                           "Ray(model=ek.models.ModelSpec('name-or-path', dtype=...))")
    return spec


# --- the worker actor -------------------------------------------------------------

class _Worker:
    """One per worker/device: loads the model once, then computes units under their claims."""

    def __init__(self, spec: ModelSpec, fingerprint: str | None, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.host, self.pid = platform.node(), os.getpid()
        self.problem: str | None = None
        self.lm: LanguageModel | None = None
        t0 = time.perf_counter()
        try:
            self.lm = spec.load()
            got = self.lm.fingerprint() if fingerprint is not None else None
            if got != fingerprint:
                self.problem = (f"worker {self.host}:{self.pid} loaded {spec.source!r} with fingerprint {got}, "
                                f"the driver's model has {fingerprint}: the workers would compute other rows. "
                                "Make the same checkpoint reachable under the same name on every node, and run "
                                "the cluster on the unedited model.")
        except Exception:  # reported with the first unit, with its traceback
            self.problem = f"loading {spec} failed:\n{traceback.format_exc()}"
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return {"host": self.host, "pid": self.pid, "problem": self.problem, "editkit": str(_PACKAGE / "__init__.py"),
                "device": str(self.lm.device) if self.lm is not None else None, "load_seconds": self.load_seconds}

    def run(self, store: "RunStore", unit: Unit) -> dict:
        who = {"host": self.host, "pid": self.pid}
        if self.problem:
            return {"status": "error", "message": "the worker has no usable model", "traceback": self.problem, **who}
        try:
            with store.claim(unit.name):
                status = execute(unit, self.lm, store)
        except UnitClaimed as exc:
            return {"status": "claimed", "message": str(exc), **who}
        except Exception as exc:
            if self.lm.edits:  # a unit must leave the model as it found it; never reuse a tainted one
                self.problem = f"a failed unit left {len(self.lm.edits)} edit(s) applied on this worker"
            return {"status": "error", "message": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(), **who}
        return {"status": status, **who}


# --- the engine ---------------------------------------------------------------------

@dataclass
class Ray:
    """A Ray cluster for editkit's runners: ``layer_sweep(..., cluster=Ray(workers=4, gpus_per_worker=1))``.

    ``address=None`` starts Ray on this machine (``include_dashboard=False``, a small
    object store: units move parameters and records, never tensors); ``"auto"`` joins
    the cluster this process runs in; ``"ray://head:10001"`` connects with Ray Client.
    If Ray is already initialised in this process it is used as is.

    ``workers`` actors are started the first time a runner uses the cluster, each with
    ``cpus_per_worker`` CPUs (its torch thread count) and ``gpus_per_worker`` GPUs, and
    kept, with the model loaded, until :meth:`shutdown` (or another model is asked for).
    ``model`` overrides the :class:`ModelSpec` the runner's model was loaded with.
    ``max_restarts``: how often Ray restarts a dead actor; ``max_attempts``: how often a
    unit whose worker died is tried before the run stops with an error; ``start_timeout``:
    seconds to wait for the workers to load the model (a cluster without the resources
    asked for fails then, instead of waiting forever); ``start_attempts``: tries to start
    a local Ray (its raylet exits when its agent is slow to start on a crowded machine).
    """

    address: str | None = None
    workers: int | None = 2
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    model: ModelSpec | None = None
    max_restarts: int = 1
    max_attempts: int = 3
    object_store_mb: int = 128
    start_timeout: float = 600.0
    start_attempts: int = 3
    runtime_env: dict | None = None
    init_kwargs: dict = field(default_factory=dict)
    #: what the last run did: units done / skipped, retries after a worker died, per-worker counts
    stats: dict = field(default_factory=dict, init=False, repr=False)
    _actors: list = field(default_factory=list, init=False, repr=False)
    _infos: list = field(default_factory=list, init=False, repr=False)
    _key: tuple | None = field(default=None, init=False, repr=False)
    _started_ray: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers={self.workers!r} must be a positive integer (or None: one per GPU/CPU)")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker}, cpus_per_worker={self.cpus_per_worker}: "
                             "need gpus_per_worker >= 0 and cpus_per_worker > 0")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be at least 1")

    # --- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "Ray":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise ClusterError("cluster=Ray(...) needs Ray: pip install 'editkit[cluster]' (or pip install ray)") \
                from None
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, configure_logging=False, log_to_driver=True)
            if self.address is None:
                # Enough logical CPUs for every worker even on a small machine (the actors then
                # share the cores, which is the user's call); GPUs are detected by Ray.
                need = math.ceil(self.cpus_per_worker * (self.workers or 1))
                # A local cluster talks over loopback only: Ray would otherwise bind its services to the
                # machine's network address.
                kw.update(num_cpus=max(os.cpu_count() or 1, need), object_store_memory=self.object_store_mb * 2 ** 20,
                          _node_ip_address="127.0.0.1")
            kw.update(self.init_kwargs)
            attempts = max(1, self.start_attempts) if self.address is None else 1
            for attempt in range(1, attempts + 1):
                try:
                    ray.init(address=self.address, **kw)
                    break
                except Exception as exc:
                    # On a loaded machine the raylet gives up waiting (~15 s) for its agent
                    # process to import and exits; a second try finds the imports cached.
                    ray.shutdown()
                    if attempt == attempts:
                        raise ClusterError(f"Ray did not start ({attempts} tries): {exc}") from exc
                    log.warning("Ray did not start (%s); trying again (%d/%d)", exc, attempt + 1, attempts)
            self._started_ray = True
        return ray

    def _worker_runtime_env(self) -> dict | None:
        """Local workers import *this* editkit (a checkout on sys.path, not another install)."""
        if self.runtime_env is not None:
            return self.runtime_env
        if self.address is not None:
            return None  # remote nodes: editkit installed there, or pass runtime_env={"py_modules": [...]}
        root = str(_PACKAGE.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        return {"env_vars": {"PYTHONPATH": path}}

    def _n_workers(self, ray) -> int:
        if self.workers is not None:
            return self.workers
        res = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(res.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    def _pool(self, lm: LanguageModel) -> list:
        """The actors for ``lm`` (started once and kept while the same model is asked for)."""
        ray = self._ray()
        spec = spec_of(lm, self.model)
        fingerprint = lm.fingerprint()
        key = (spec, fingerprint)
        actor_cls = ray.remote(_Worker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=self.max_restarts,
            max_task_retries=0, runtime_env=self._worker_runtime_env())

        def start() -> Any:
            return actor_cls.remote(spec, fingerprint, max(1, int(self.cpus_per_worker)))

        if self._key == key and self._actors:  # keep the loaded workers; replace the ones that died for good
            actors = list(self._actors)
            for j, a in enumerate(actors):
                if not self._alive(ray, a):
                    log.warning("worker %d is gone; starting another", j)
                    actors[j] = start()
        else:
            self._kill_actors()
            n = self._n_workers(ray)
            log.info("starting %d editkit workers for %s", n, spec.source)
            actors = [start() for _ in range(n)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            self._actors = actors
            self._kill_actors()
            raise ClusterError(f"{len(actors)} workers did not start within {self.start_timeout:.0f} s; the cluster "
                               f"has {ray.available_resources()} free: lower workers, cpus_per_worker or "
                               "gpus_per_worker, or raise start_timeout") from None
        problems = [i["problem"] for i in infos if i["problem"]]
        if problems:
            for a in actors:
                ray.kill(a, no_restart=True)
            self._actors, self._key = [], None
            raise ClusterError(f"{len(problems)} of {len(actors)} workers could not load the model:\n{problems[0]}")
        log.info("workers ready: %s", ", ".join(f"{i['host']}:{i['pid']} ({i['device']}, {i['load_seconds']:.1f} s)"
                                                for i in infos))
        self._actors, self._infos, self._key = actors, infos, key
        return actors

    def start(self, lm: LanguageModel) -> list[dict]:
        """Start the workers for ``lm`` now (each loads the model) rather than at the first
        runner call; returns :meth:`workers_info`. Useful to pay the start-up in its own cell."""
        self._pool(lm)
        return self.workers_info()

    def _alive(self, ray, actor) -> bool:
        """Whether ``actor`` answers (waiting while Ray restarts it); False once it is dead for good."""
        for _ in range(3):
            try:
                ray.get(actor.info.remote(), timeout=self.start_timeout)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                time.sleep(1.0)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
        try:
            ray.kill(actor, no_restart=True)  # free its CPUs/GPUs for the replacement
        except Exception:
            pass
        return False

    def workers_info(self) -> list[dict]:
        """Host, pid, device and load time of each worker started so far (as first started)."""
        return list(self._infos)

    def _kill_actors(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already gone
                    pass
        self._actors, self._infos, self._key = [], [], None

    def shutdown(self) -> None:
        """Stop the workers (and Ray, if this object started it)."""
        self._kill_actors()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    # --- running units ------------------------------------------------------------
    def run_units(self, store: "RunStore", lm: LanguageModel, units: Sequence[Unit], *, desc: str = "units",
                  progress: bool = True) -> None:
        """Compute every unit the store lacks on the workers; see the module docstring."""
        ray = self._ray()
        from ray.exceptions import ActorUnavailableError, RayError, RayTaskError

        actors = list(self._pool(lm))
        store = _shared(store)
        total = sum(len(u.files) for u in units)
        pending: deque[tuple[Unit, int]] = deque((u, 0) for u in units if not unit_done(store, u))
        bar = tqdm(total=total, desc=desc, unit="unit", disable=not progress)
        bar.update(total - sum(len(u.files) for u, _ in pending))
        stats = {"units": len(units), "done": 0, "skipped": len(units) - len(pending), "retries": 0,
                 "worker_deaths": 0, "by_worker": {}}
        self.stats = stats
        idle = deque(range(len(actors)))
        last_group: dict[int, Hashable] = {}
        deaths = [0] * len(actors)
        inflight: dict[Any, tuple[int, Unit, int]] = {}
        later: list[tuple[float, Unit, int]] = []  # units another runner holds: look again after `poll`
        errors: list[UnitError] = []
        counted: set[str] = set()

        def pick(i: int) -> tuple[Unit, int]:
            """In order, preferring this worker's last group (its C0 is in memory), then a
            group no other worker has touched (so each layer's C0 is computed once)."""
            mine = last_group.get(i)
            taken = {g for k, g in last_group.items() if k != i} | {u.group for _, u, _ in inflight.values()}
            j = next((j for j, (u, _) in enumerate(pending) if u.group is None or u.group == mine), None)
            if j is None or (mine is None and pending[j][0].group is not None):
                j = next((j for j, (u, _) in enumerate(pending) if u.group is None or u.group not in taken), 0)
            pending.rotate(-j)
            item = pending.popleft()
            pending.rotate(j)
            return item

        probes: dict[Any, int] = {}  # workers Ray is restarting: their info() answers when they are back
        try:
            while pending or inflight or later:  # a worker still restarting at the end is left to do so
                now = time.monotonic()
                for item in [x for x in later if x[0] <= now]:
                    later.remove(item)
                    pending.append(item[1:])
                while idle and pending and not errors:
                    i = idle.popleft()
                    unit, attempt = pick(i)
                    last_group[i] = unit.group
                    inflight[actors[i].run.remote(store, unit)] = (i, unit, attempt)
                if not inflight and not probes:
                    if errors or not later:
                        break
                    time.sleep(max(0.0, min(t for t, *_ in later) - time.monotonic()))
                    continue
                ready, _ = ray.wait([*inflight, *probes], num_returns=1, timeout=1.0)
                if progress and not ready:
                    _refresh(bar, store, units, counted)
                for ref in ready:
                    if ref in probes:
                        i = probes.pop(ref)
                        try:
                            self._infos[i] = ray.get(ref)
                            idle.append(i)
                        except ActorUnavailableError:  # still restarting: ask again
                            probes[actors[i].info.remote()] = i
                        except RayError as exc:
                            log.warning("worker %d did not come back after dying: %s", i, exc)
                        continue
                    i, unit, attempt = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                    except RayTaskError as exc:  # the actor method itself failed (e.g. arguments unpicklable)
                        errors.append(UnitError(unit, type(exc).__name__, str(exc)))
                        idle.append(i)
                        continue
                    except RayError as exc:  # the worker died mid-unit (RayActorError and kin)
                        stats["worker_deaths"] += 1
                        deaths[i] += 1
                        info = self._infos[i] if i < len(self._infos) else {}
                        _release_claim_of_dead(store, unit.name, info)
                        log.warning("worker %s:%s died during unit %r (%s); retrying the unit elsewhere",
                                    info.get("host"), info.get("pid"), unit.name, type(exc).__name__)
                        if attempt + 1 >= self.max_attempts:
                            errors.append(UnitError(unit, f"its worker died {attempt + 1} times "
                                                          f"(last: {type(exc).__name__}: {exc})"))
                        else:
                            stats["retries"] += 1
                            pending.appendleft((unit, attempt + 1))
                        if deaths[i] <= self.max_restarts:  # Ray restarts it; it loads the model again
                            probes[actors[i].info.remote()] = i
                        continue
                    idle.append(i)
                    worker = f"{res['host']}:{res['pid']}"
                    if res["status"] in ("done", "skipped"):
                        stats[res["status"]] += 1
                        stats["by_worker"][worker] = stats["by_worker"].get(worker, 0) + 1
                        _refresh(bar, store, [unit], counted, force=True)
                    elif res["status"] == "claimed":
                        later.append((time.monotonic() + store.poll, unit, attempt))
                    else:
                        errors.append(UnitError(unit, res["message"], res.get("traceback", ""), worker))
                if pending and not errors and not idle and not inflight and not probes:
                    raise ClusterError(f"every worker died; {len(pending)} unit(s) left undone (the run store "
                                       "keeps the finished ones: run again to resume, serially or distributed)")
        finally:
            bar.close()  # on Ctrl-C, units running on workers still finish and land in the store
        if pending and not errors:
            raise ClusterError(f"no worker is left; {len(pending)} unit(s) left undone (the run store keeps the "
                               "finished ones: run again to resume, serially or distributed)")
        if errors:
            if len(errors) > 1:
                log.error("%d units failed; the first is raised, the others: %s", len(errors),
                          ", ".join(e.unit.name for e in errors[1:]))
            raise errors[0]


def _shared(store: "RunStore") -> "RunStore":
    """The store with an absolute path (workers run in other working directories)."""
    import dataclasses

    return dataclasses.replace(store, path=Path(store.path).resolve())


def _refresh(bar, store: "RunStore", units: Sequence[Unit], counted: set[str], force: bool = False) -> None:
    """Advance the bar by the output files that appeared (a sequence writes many)."""
    have = {p.stem for p in (Path(store.path) / "units").glob("*.json")}
    new = [f for u in units for f in u.files if f not in counted and (f in have or force)]
    counted.update(new)
    if new:
        bar.update(min(len(new), bar.total - bar.n))


def _release_claim_of_dead(store: "RunStore", unit: str, info: dict) -> None:
    """Remove ``unit``'s lock when it is held by the worker Ray reported dead (host and pid
    match), so the retry elsewhere does not wait ``stale_after`` seconds for a remote
    host's lock to go stale. A lock taken over by anyone else is left alone."""
    lock = store._lock(unit)
    owner = store._owner(lock)
    if owner and owner.get("host") == info.get("host") and owner.get("pid") == info.get("pid"):
        aside = lock.with_name(f".{lock.name}.dead-{os.getpid()}.{time.monotonic_ns()}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return
        if store._owner(aside).get("token") == owner.get("token"):
            aside.unlink(missing_ok=True)
            log.info("released the claim of dead worker %s:%s on %s", info.get("host"), info.get("pid"), unit)
        else:  # someone claimed it meanwhile: put theirs back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
