#!/usr/bin/env python
"""Layer sweep on a local Ray cluster: 1 worker vs 2 workers vs no cluster, side by side.

    python benchmarks/cluster.py                       # world-gpt2, 32 facts, ROME+MEMIT at 4 layers
    python benchmarks/cluster.py --model world-gpt2-mini --n-edits 8 --layers 0 1   # seconds

Each configuration runs the same ``experiments.layer_sweep`` into its own fresh run
directory; the workers are started (and load the model) *before* the clock starts, so
the times compare unit throughput, and the start-up is reported separately. The rows
of every distributed run are checked against the serial run's (exactly equal).
The load average is recorded before and after: on a shared machine a ratio means
little without it. Writes ``benchmarks/cluster.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's editkit (the workers get the same path)

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import editkit as ek  # noqa: E402
from editkit import cluster as ekc  # noqa: E402
from editkit import experiments  # noqa: E402


def sweep(lm, records, args, run_dir: Path, cluster=None) -> tuple[float, pd.DataFrame]:
    t0 = time.perf_counter()
    frame = experiments.layer_sweep(lm, records, args.methods, args.layers, args.n_edits, preset=args.preset,
                                    chunk=args.chunk, run_dir=run_dir, progress=False, cluster=cluster)
    return time.perf_counter() - t0, frame


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    key = ["phase", "method", "layer", "case_id", "kind", "prompt_index"]
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)[a.columns]
    return a.equals(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world-gpt2")
    ap.add_argument("--preset", default=None, help="default: the preset named like the model")
    ap.add_argument("--methods", nargs="+", default=["ROME", "MEMIT"])
    ap.add_argument("--layers", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--n-edits", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "cluster.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.preset = args.preset or ek.preset_for(args.model)
    lm = ek.load_model(args.model, device="cpu")
    records = ek.load_counterfact("world", n=args.n_edits, seed=0, unique_subjects=True)
    # C0 of every layer into the disk cache first, so no configuration pays for it
    for l in args.layers:
        ek.MEMIT.preset(args.preset, layers=[l]).second_moment(lm, l, False)
    tmp = Path(tempfile.mkdtemp(prefix="ek-cluster-bench-"))
    result: dict = {"model": args.model, "preset": args.preset, "methods": args.methods, "layers": args.layers,
                    "n_edits": args.n_edits, "chunk": args.chunk, "cpus": os.cpu_count(),
                    "machine": platform.platform(), "torch": torch.__version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": os.getloadavg()}
    try:
        result["serial_s"], serial = sweep(lm, records, args, tmp / "serial")
        for n in (1, 2):
            cl = ekc.Ray(workers=n, object_store_mb=80)
            t0 = time.perf_counter()
            cl.start(lm)
            result[f"ray{n}_startup_s"] = time.perf_counter() - t0
            result[f"ray{n}_s"], frame = sweep(lm, records, args, tmp / f"ray{n}", cl)
            result[f"ray{n}_rows_equal_serial"] = same_rows(serial, frame)
            result[f"ray{n}_by_worker"] = cl.stats["by_worker"]
            cl.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    result["speedup_2_vs_1"] = result["ray1_s"] / result["ray2_s"]
    result["speedup_2_vs_serial"] = result["serial_s"] / result["ray2_s"]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
