"""Runners on a local Ray cluster (2 workers, tiny CPU model): the same rows as the serial
run, exactly once, even when a worker is killed mid-unit.

One Ray instance and one pair of worker actors serve the whole module (Ray's start-up
is most of this file's time); every test reuses the workers and their loaded model.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit import cluster as ekc
from editkit import experiments
from editkit.testing import TINY_TEXT, tiny_lm

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install 'editkit[cluster]')")

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Kaiser Chiefs", "Anaal Nathrakh", "Jürgen Müller"]
OBJECTS = ["English", "French", "Spain", "Sweden"]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, values=ek.ValueConfig(v_steps=3))
LAYER_ARGS = dict(methods=["ROME", "MEMIT"], layers=[0, 1], n_edits=6, editor_kwargs=FAST, chunk=1)
KEY = ["phase", "method", "layer", "case_id", "kind", "prompt_index"]


def _record(i: int) -> dict:
    s = SUBJECTS[i]
    other = SUBJECTS[(i + 3) % len(SUBJECTS)]
    return {"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                 "subject": s, "target_new": {"str": OBJECTS[(i + 1) % 4]},
                                                 "target_true": {"str": OBJECTS[i % 4]}},
            "paraphrase_prompts": [f"{s} is a citizen of"],
            "neighborhood_prompts": [f"The native language of {other} is"],
            "attribute_prompts": [], "generation_prompts": [f"{s} was born in"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Serial runs here use the workers' thread count (one CPU each): float sums reduce in
    another order with another thread count, so rows are bitwise equal only like for like."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=3)


@pytest.fixture(scope="module")
def records():
    return ek.load_counterfact([_record(i) for i in range(len(SUBJECTS))])


@pytest.fixture(scope="module")
def local_ray(lm):
    """Two workers on a local Ray instance started by editkit (no dashboard, small object store)."""
    # Ray's raylet exits when its agent process takes more than ~15 s to start, which it
    # does on a machine far busier than its cores (measured: load 15-25 on 2 cores, every
    # try failed after ~90 s). There the module skips at once, naming the load, rather than
    # spend minutes of a shared machine failing; on a machine at ordinary load (CI) it runs.
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 4 * cores and not os.environ.get("EDITKIT_CLUSTER_TESTS"):
        pytest.skip(f"machine too crowded to start Ray (load {load:.0f} on {cores} cores; the raylet gives its "
                    "agent ~15 s): run this file at ordinary load, as CI does, or force with EDITKIT_CLUSTER_TESTS=1")
    cl = ekc.Ray(workers=2, object_store_mb=80)
    started = cl.start(lm)
    assert len(started) == 2
    yield cl
    cl.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def serial_layer(lm, records, tmp_path_factory):
    return experiments.layer_sweep(lm, records, run_dir=tmp_path_factory.mktemp("serial") / "run", progress=False,
                                   **LAYER_ARGS)


def _same_rows(a: pd.DataFrame, b: pd.DataFrame, key: list[str], drop: tuple[str, ...] = ()) -> None:
    key = [k for k in key if k in a.columns]
    a = a.drop(columns=list(drop)).sort_values(key).reset_index(drop=True)
    b = b.drop(columns=list(drop)).sort_values(key).reset_index(drop=True)[a.columns]
    assert not a.duplicated(key).any()
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_layer_and_batch_sweep_match_the_serial_run(local_ray, lm, records, serial_layer, tmp_path):
    dist = experiments.layer_sweep(lm, records, run_dir=tmp_path / "layer", cluster=local_ray, progress=False,
                                   **LAYER_ARGS)
    assert len(dist) == len(serial_layer) > 0
    _same_rows(serial_layer, dist, KEY)
    workers = local_ray.workers_info()
    assert len(workers) == 2 and all(w["pid"] != os.getpid() for w in workers)
    assert os.path.samefile(workers[0]["editkit"], ek.__file__)  # the workers run this checkout
    assert local_ray.stats["done"] == 2 * 2 * 6 + 6 and len(local_ray.stats["by_worker"]) == 2
    # an interrupted distributed run (three units never written) resumes serially to the same rows
    for name in ("MEMIT-L001-000002", "ROME-L000-000005", "pre-000003"):
        for f in (tmp_path / "layer" / "units").glob(f"{name}.*"):
            f.unlink()
    resumed = experiments.layer_sweep(lm, records, run_dir=tmp_path / "layer", progress=False, **LAYER_ARGS)
    _same_rows(serial_layer, resumed, KEY)

    kw = dict(methods=["MEMIT", "EMMET"], layer=1, batch_sizes=[2, 4], editor_kwargs=FAST, progress=False)
    serial = experiments.batch_sweep(lm, records, run_dir=tmp_path / "b-serial", **kw)
    dist = experiments.batch_sweep(lm, records, run_dir=tmp_path / "b-dist", cluster=local_ray, **kw)
    assert set(dist.batch_size) == {0, 2, 4}
    _same_rows(serial, dist, ["phase", "method", "reg", "batch_size", "case_id", "kind", "prompt_index"],
               drop=("edit_seconds",))
    # the distributed run resumes serially: nothing left to compute, the same rows come back
    again = experiments.batch_sweep(lm, records, run_dir=tmp_path / "b-dist", **kw)
    _same_rows(dist, again, ["phase", "method", "reg", "batch_size", "case_id", "kind", "prompt_index"])


def test_a_worker_killed_mid_unit_loses_and_duplicates_nothing(local_ray, lm, records, serial_layer, tmp_path):
    run = tmp_path / "killed"
    out: dict = {}

    def sweep() -> None:
        try:
            out["frame"] = experiments.layer_sweep(lm, records, run_dir=run, cluster=local_ray, progress=False,
                                                   **LAYER_ARGS)
        except BaseException as exc:  # re-raised in the test thread
            out["error"] = exc

    thread = threading.Thread(target=sweep)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for lock in (run / "units").glob("*-L*.lock") if (run / "units").exists() else []:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                continue  # being written or released
            if owner.get("pid") not in (None, os.getpid()):
                os.kill(owner["pid"], signal.SIGKILL)  # the worker dies holding the unit's claim
                killed = (lock.stem, owner["pid"])
                break
        time.sleep(0.01)
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert killed is not None, "no worker was caught mid-unit"
    assert local_ray.stats["worker_deaths"] == 1 and local_ray.stats["retries"] == 1
    _same_rows(serial_layer, out["frame"], KEY)  # every row, exactly once
    assert not list((run / "units").glob("*.lock"))
    assert len(list((run / "units").glob("*.csv"))) == 2 * 2 * 6 + 6
    # the cluster comes back with two workers (the dead one restarted or replaced)
    again = experiments.layer_sweep(lm, records, run_dir=run, cluster=local_ray, progress=False, **LAYER_ARGS)
    assert local_ray.stats["skipped"] == local_ray.stats["units"] and len(again) == len(serial_layer)
    assert killed[1] not in {w["pid"] for w in local_ray.workers_info()}


def test_a_unit_error_names_the_unit_and_carries_the_remote_traceback(local_ray, lm, records, tmp_path):
    bad = dict(LAYER_ARGS, layers=[0], editor_kwargs=dict(FAST, corpus="/nonexistent/corpus.txt"))
    with pytest.raises(ekc.UnitError) as info:
        experiments.layer_sweep(lm, records, run_dir=tmp_path / "bad", cluster=local_ray, progress=False, **bad)
    msg = str(info.value)
    assert "layer=0" in msg and "method='ROME'" in msg and "remote traceback" in msg
    assert "Traceback (most recent call last)" in info.value.remote_traceback
    # the pre units (no edit, so no corpus) still landed: a rerun continues from them
    assert len(list((tmp_path / "bad" / "units").glob("pre-*.csv"))) == 6


def test_cluster_strings():
    assert ekc.resolve(None) is None and ekc.resolve("none") is None
    local = ekc.resolve("local:3")
    assert isinstance(local, ekc.Ray) and local.address is None and local.workers == 3
    assert ekc.resolve("local:3") is local  # one object per string: a notebook keeps its workers
    remote = ekc.resolve("ray://head:10001?workers=8&gpus_per_worker=1")
    assert remote.address == "ray://head:10001" and remote.workers == 8 and remote.gpus_per_worker == 1
    for bad in ("local:0", "local:x", "ray://h:1?wrkers=2", "banana"):
        with pytest.raises(ValueError, match="cluster="):
            ekc.resolve(bad)
    with pytest.raises(ValueError, match="workers"):
        ekc.Ray(workers=0)
