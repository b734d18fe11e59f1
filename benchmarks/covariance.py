"""Benchmark 3, covariance: streaming ``second_moment`` against keeping every key, each size in a
fresh worker process (``run.py --worker``)."""
from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import HERE, ROOT, Context, _reset_peak, load_corpus, load_lm, median, timed


# --------------------------------------------------------------------------- 3. covariance

def _seq_len(lm) -> int:
    return min(getattr(lm.tokenizer, "model_max_length", 1024) or 1024, 1024)


@torch.no_grad()
def keep_all_keys_second_moment(lm, layer: int, texts: Sequence[str], batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """The naive baseline: keep every token key (N × d_in, float64), then ``Kᵀ K / N``.

    Same texts, batches, truncation and float64 precision as ``ek.second_moment``;
    memory grows with the number of tokens."""
    from editkit.hooks import capture_input

    module, seq_len = lm.edit_module(layer), _seq_len(lm)
    texts = [t for t in texts if t and t.strip()]
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=seq_len)
        with capture_input(module) as seen:
            lm.model(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device))
        mask = enc["attention_mask"].bool().to(seen[0].device)
        chunks.append(seen[0][mask].to(torch.float64))
    K = torch.cat(chunks)
    del chunks
    return (K.T @ K / len(K)).cpu(), len(K)


def _rss_kb(field_name: str) -> int:
    m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def cov_worker(args: dict) -> dict:
    """One covariance measurement in a fresh process: tokens/s and peak memory over the
    process's memory just before the call (model and corpus already loaded, warmed up)."""
    from editkit import second_moment

    torch.set_num_threads(args.get("threads") or torch.get_num_threads())
    lm = load_lm(args["model"], args["device"])
    texts = [t for t in load_corpus(args["corpus"]) if t and t.strip()][: args["n_samples"]]
    layer, side = args["layer"], args["side"]

    def run(tx):
        if side == "ours":
            C, info = second_moment(lm, layer, tx, None, cache=False, progress=False, return_info=True)
            return C, info.n_tokens
        return keep_all_keys_second_moment(lm, layer, tx)

    run(texts[:16])  # warm-up (allocator, kernels)
    times, peaks, cuda_peaks, n_tok = [], [], [], 0
    for _ in range(args["repeats"]):
        gc.collect()
        cuda = args["device"].startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        rss0 = _rss_kb("VmRSS")
        exact = _reset_peak()
        dt, (C, n_tok) = timed(lambda: run(texts))
        peak = _rss_kb("VmHWM") if exact else max(_rss_kb("VmHWM"), _rss_kb("VmRSS"))
        times.append(dt)
        peaks.append((peak - rss0) / 1024)
        if cuda:
            cuda_peaks.append((torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20)
        del C
    out = {"side": side, "n_samples": len(texts), "tokens": n_tok, "s": median(times), "times": times,
           "tokens_per_s": n_tok / median(times), "peak_rss_delta_mb": max(peaks),
           "rss_peak_exact": exact, "d_in": lm.d_in(layer)}
    if cuda_peaks:
        out["peak_cuda_alloc_mb"] = max(cuda_peaks)
    return out


def _spawn_worker(args: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(HERE / "run.py"), "--worker", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"covariance worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_covariance(ctx: Context) -> None:
    from editkit import second_moment

    s, lm, ed = ctx.settings, ctx.lm, ctx.editor
    layer = ed.edit_layers[0]
    d_in = lm.d_in(layer)
    # Same C0 from both sides (checked in this process on the smallest size).
    small = ctx.corpus[: s.cov_samples[0]]
    C_ours = second_moment(lm, layer, small, None, cache=False, progress=False)
    C_naive, _ = keep_all_keys_second_moment(lm, layer, small)
    c_diff = (C_ours - C_naive).abs().max().item()
    rows, naive_rows = [], []
    for n in s.cov_samples:
        res = {}
        for side in ("ours", "naive"):
            res[side] = _spawn_worker({"model": s.model, "corpus": s.corpus, "n_samples": n, "layer": layer,
                                       "side": side, "device": s.device, "repeats": s.repeats,
                                       "threads": torch.get_num_threads()})
        o, b = res["ours"], res["naive"]
        rows.append(o)
        naive_rows.append(b)
        mem_ratio = b["peak_rss_delta_mb"] / max(o["peak_rss_delta_mb"], 1e-9)
        ctx.add(f"covariance n={n}", "covariance",
                {"n_samples": o["n_samples"], "tokens": o["tokens"], "layer": layer, "d_in": d_in,
                 "accumulator_mb": d_in * d_in * 8 / 2 ** 20, "model": lm.name, "corpus": s.corpus},
                {k: o[k] for k in o if k not in ("side",)},
                {k: b[k] for k in b if k not in ("side",)},
                mem_ratio, "MB peak RSS", s.repeats, ratio_means="keep-all-keys peak MB ÷ streaming peak MB",
                target="memory O(d_in²), independent of samples",
                notes=("each side in a fresh subprocess; peak = kernel peak RSS (VmHWM, reset just before the call) "
                       "minus RSS just before the call, with model and corpus loaded and a warm-up done; "
                       f"baseline keeps all N × d_in float64 keys; max|C0_ours − C0_naive| = {c_diff:.1e} "
                       f"on {s.cov_samples[0]} texts"))
    peaks = [r["peak_rss_delta_mb"] for r in rows]
    naive = [r["peak_rss_delta_mb"] for r in naive_rows]
    toks = [r["tokens"] for r in rows]
    span = max(toks[-1] - toks[0], 1)
    bound = 4 * d_in * d_in * 8 / 2 ** 20 + 64.0  # a few d_in² float64 buffers + allocator/activation slack
    ctx.add("covariance memory vs samples", "covariance",
            {"n_samples": s.cov_samples, "tokens": toks, "d_in": d_in, "layer": layer, "bound_mb": bound},
            {"peak_rss_delta_mb": peaks, "kb_per_extra_token": (peaks[-1] - peaks[0]) * 1024 / span,
             "tokens_per_s": [r["tokens_per_s"] for r in rows]},
            {"peak_rss_delta_mb": naive, "kb_per_extra_token": (naive[-1] - naive[0]) * 1024 / span,
             "tokens_per_s": [r["tokens_per_s"] for r in naive_rows]},
            naive[-1] / max(peaks[-1], 1e-9), "MB", s.repeats,
            ratio_means=f"keep-all-keys peak ÷ streaming peak at {toks[-1]} tokens",
            target="memory O(d_in²), independent of samples",
            met=max(peaks) <= bound,
            notes=(f"'met' = streaming peak ≤ 4·d_in²·8 bytes + 64 MB = {bound:.1f} MB at every size; keys alone "
                   f"would take d_in·8 = {d_in * 8 / 1024:.1f} KB per token. Sub-MB figures are at the resolution "
                   "of RSS (pages, allocator reuse)"))
