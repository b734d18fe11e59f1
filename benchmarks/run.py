#!/usr/bin/env python
"""editkit benchmarks: editing, scoring and covariance throughput, measured side by side.

    python benchmarks/run.py            # full run on the embedded world model (make bench)
    python benchmarks/run.py --quick    # tiny model, seconds (make bench QUICK=1)

Each benchmark lives in a file of its name beside this driver (``values.py``, ``scoring.py``,
``covariance.py``, ``precompute.py``, ``e2e.py``, ``paper.py``); ``common.py`` holds what they
share and ``report.py`` the outputs.

Every measurement runs editkit and a naive baseline *in the same process*, one after
the other (alternating which side goes first), and reports the median of
``--repeats`` runs of each side:

1. values      batched ``optimize_values`` over E requests vs. the same objective
               optimized request by request as the reference implementations do it
               (whole model + LM head on every position each step; the ratio) and vs.
               editkit's optimizer called one request at a time (batching alone);
               same steps (``stop_nll=0`` so every side runs every step): seconds per
               edit, and max |Δδ| between the sides.
2. scoring     ``ek.evaluate`` batched vs. ``batch_size=1`` (one prompt at a time):
               records per second, and the max difference of the NLL columns.
3. covariance  ``ek.second_moment`` (streaming, d_in × d_in float64 accumulator) vs.
               keeping every key and computing K Kᵀ at the end: tokens per second and
               peak memory, each in a fresh subprocess, for several corpus sizes.
   precompute  C0 from 1×, 2×, 4×, 10× d_in token keys and from the full corpus →
               MEMIT batch edit → ES/PS/NS/S (the minimal-precomputation curve).
4. end-to-end  a 256-fact MEMIT batch edit plus its evaluation, per stage.

Outputs: ``results.json`` (a list of entries: name, section, params, ours, baseline,
ratio, unit, repeats, machine, ...), a markdown table (``RESULTS.md``) and, for a
full run, the Performance page (``docs/performance.md``) between ``<!-- bench:start -->`` and
``<!-- bench:end -->``. Quick mode writes under ``benchmarks/.cache/`` and leaves
that page alone unless asked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # measure the checkout this script lives in, not another installed editkit
    sys.path.insert(0, str(ROOT))
from benchmarks.common import (OWN_MODEL, SECTIONS, Context, Settings, load_average, load_corpus,  # noqa: E402
                               load_lm, load_records, log, machine_info, make_editor, seed_all)
from benchmarks.covariance import bench_covariance, cov_worker  # noqa: E402
from benchmarks.e2e import bench_e2e  # noqa: E402
from benchmarks.precompute import bench_precompute  # noqa: E402
# markdown_table, render_paper and update_readme are used by tests through this module
from benchmarks.report import (_section_group, _write_readme, markdown_table, render_paper,  # noqa: E402,F401
                               update_readme, write_outputs)
from benchmarks.scoring import bench_scoring  # noqa: E402
from benchmarks.values import bench_values  # noqa: E402


def bench_paper(ctx: Context) -> None:
    """Llama-3-8B widths (benchmarks/paper.py): C0 streaming, values, cached-factor vs direct solves, e2e."""
    sys.path.insert(0, str(HERE))
    from paper import PaperSettings
    from paper import bench_paper as run_paper

    ps = PaperSettings.quick() if ctx.settings.mode == "quick" else PaperSettings()
    ps.seed = ctx.settings.seed
    ps.threads = torch.get_num_threads()
    ps.steps = ctx.settings.paper_steps
    if os.environ.get("EDITKIT_BENCH_DIRECT_MAX_E"):  # cap the direct solves at the largest width (short runs)
        ps.direct_max_E = int(os.environ["EDITKIT_BENCH_DIRECT_MAX_E"])
    run_paper(ps, ctx.add)


BENCHES: dict[str, Callable[[Context], None]] = {"values": bench_values, "scoring": bench_scoring,
                                                  "covariance": bench_covariance, "precompute": bench_precompute,
                                                  "e2e": bench_e2e, "paper": bench_paper}


def run(settings: Settings, sections: Sequence[str] = SECTIONS) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    seed_all(settings.seed)
    machine = machine_info(settings.device)
    machine.update(mode=settings.mode, load_start=load_average(),
                   date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    log.info("machine: %s", machine)
    if all(name in OWN_MODEL for name in sections):
        ctx = Context(settings, None, None, [], [])
    else:
        lm = load_lm(settings.model, settings.device)
        n_rec = max([settings.n_score, settings.e2e_facts, settings.precompute_facts, max(settings.value_sizes)])
        ctx = Context(settings, lm, make_editor(lm, settings), load_records(settings, n_rec),
                      load_corpus(settings.corpus))
    for name in tqdm(list(sections), desc="benchmarks"):
        t0 = time.perf_counter()
        BENCHES[name](ctx)
        log.info("section %s took %.1f s", name, time.perf_counter() - t0)
    machine["load_end"] = load_average()
    machine["settings"] = dataclasses.asdict(settings)
    return ctx.entries, machine


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few records: seconds (for tests)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results.json; quick: "
                                             "benchmarks/.cache/results-quick.json)")
    ap.add_argument("--md", type=Path, help="markdown table (default next to --out: RESULTS.md / RESULTS-quick.md)")
    ap.add_argument("--readme", dest="readme", action="store_true", default=None,
                    help="update docs/performance.md (default: on for a full run, off for --quick)")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--merge", action="store_true",
                    help="keep the entries already in --out that this run does not produce again (by name)")
    ap.add_argument("--paper-steps", nargs="+", help="paper section: only the steps whose name starts with these "
                                                     "(e.g. 'solve MEMIT 14336', 'values', 'e2e')")
    ap.add_argument("--model", help="model to benchmark (default world-gpt2; quick: tiny-gpt2)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite RESULTS.md, the sections of docs/performance.md and the figure from --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if (a.verbose or not a.worker) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # Quick mode uses one thread: on a shared 2-core machine, OpenMP threads that wait on
    # each other make tiny kernels up to 50× slower and the timings meaningless.
    threads = a.threads or (1 if a.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if a.worker:
        args = json.loads(a.worker)
        if "paper" in args:
            sys.path.insert(0, str(HERE))
            from paper import WORKERS

            print(json.dumps(WORKERS[args.pop("paper")](args)))
        else:
            print(json.dumps(cov_worker(args)))
        return 0
    over: dict[str, Any] = {"seed": a.seed, "device": a.device, "paper_steps": a.paper_steps}
    if a.model:
        over["model"] = a.model
        if a.model.startswith("tiny-"):
            over["corpus"] = "tiny"
    if a.repeats:
        over["repeats"] = over["e2e_repeats"] = a.repeats
    settings = Settings.quick(**over) if a.quick else Settings.full(**over)
    load = load_average()
    if not a.quick and load and load[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %s on %s cores: other processes compete for the CPU and the timings will be "
                    "noisy (consider --threads 1, or rerun on a quiet machine)", load, os.cpu_count())
    out = a.out or (HERE / ".cache" / "results-quick.json" if a.quick else HERE / "results.json")
    md = a.md or out.with_name("RESULTS-quick.md" if a.quick else "RESULTS.md")
    if a.render:
        entries = json.loads(out.read_text())
        table = write_outputs(entries, entries[0]["machine"], out, md)
        _write_readme([e for e in entries if not e["section"].startswith("paper")], entries, a.readme is not False)
        return 0
    sections = a.only or SECTIONS
    entries, machine = run(settings, sections)
    for e in entries:
        e["machine"] = machine
    if a.merge and out.exists():
        new = {e["name"] for e in entries}
        kept = [e for e in json.loads(out.read_text()) if e["name"] not in new
                and (a.paper_steps or _section_group(e["section"]) not in sections)]
        entries = kept + entries
        machine = kept[0]["machine"] if kept else machine
    table = write_outputs(entries, machine, out, md)
    print(table)
    if a.readme if a.readme is not None else not a.quick:
        _write_readme([e for e in entries if not e["section"].startswith("paper")], entries, True)
    log.info("wrote %s and %s", out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
