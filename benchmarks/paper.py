"""Paper-dimension benchmarks: Llama-3-8B's widths measured on whatever machine runs them.

A Llama-architecture model with Llama-3-8B's hidden size (4096), MLP width (14 336),
vocabulary (128 256) and grouped-query head layout (32 query / 8 key-value heads),
but only ``n_layer`` (2) layers and random weights, built locally in float32 and
bfloat16. Every measurement that reports memory runs in a fresh subprocess (peak
RSS = the kernel's VmHWM over that process), so one measurement's allocations never
hide in another's.

* ``paper C0``       C0 streaming at d_in = 14 336: stopping the forward at the
                     edited layer vs running the whole model (LM head included), tokens/s
                     and peak memory, each dtype.
* ``paper values``   value optimization, batched vs one request at a time, E = 1, 16, 64.
* ``paper solve``    MEMIT and EMMET Δ at E = 1 … 4096 on a cached Cholesky factor of
                     C0 vs the direct solve, at the world's (512), GPT-2-XL's (6400)
                     and Llama-3-8B's (14 336) d_in; seconds, peak RSS, and the
                     relative difference of the two Δ.
* ``paper e2e``      a MEMIT edit of 256 facts into the paper-width model, per stage.
* ``paper memory budget``  the full Llama-3-8B on one GPU, from the measured parts.

C0 for the solves is synthetic (random keys of the model's width plus a decaying
diagonal; condition number ≈ 1e5), written once to ``benchmarks/.cache/paper`` so
every worker solves against the same matrix.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("editkit.bench.paper")

HERE = Path(__file__).resolve().parent

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_attention_heads=32,
                 num_key_value_heads=8, num_hidden_layers=32, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
#: Widths the solve is measured at: the world model's MLP (4·128), GPT-2-XL's (4·1600), Llama-3-8B's.
WIDTHS = {"world": 512, "GPT-2-XL": 6400, "Llama-3-8B": 14336}


@dataclass
class PaperSettings:
    mode: str = "full"
    dims: dict = field(default_factory=lambda: dict(LLAMA3_8B))
    n_layer: int = 2
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float32"])
    cov_tokens: list[int] = field(default_factory=lambda: [512])
    cov_seq: int = 128
    value_sizes: list[int] = field(default_factory=lambda: [1, 16, 64])
    value_loop_cap: int = 4
    v_steps: int = 2
    n_prefixes: int = 1
    widths: dict = field(default_factory=lambda: dict(WIDTHS))
    solve_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 1024, 4096])
    # The direct path costs a d_in³/3 factorization per batch (a minute of CPU at d_in = 14 336), so it runs
    # at these E only (EMMET's direct path is a fresh C0 factorization plus the cached solve, both measured),
    # and the smaller widths at width_sizes only: the full run stays near 25 minutes of CPU time.
    direct_sizes: dict = field(default_factory=lambda: {"MEMIT": [1, 16, 64], "EMMET": [1, 64]})
    width_sizes: list[int] = field(default_factory=lambda: [16, 1024])
    direct_max_E: int = 1 << 30  # and at most this E (the largest width)
    steps: list[str] | None = None  # run only the plan steps whose name starts with one of these
    c0_keys: int = 1024  # random keys behind the synthetic C0
    lam: float = 15000.0  # MEMIT's mom2_update_weight for Llama-3-8B presets
    lam_e: float = 0.1
    e2e_facts: int = 256
    e2e_dtype: str = "bfloat16"
    time_condition_number: bool = False  # time second_moment's exact eigvalsh too (minutes of CPU at 14 336)
    e2e_v_steps: int = 1  # one Adam step per request: the stage costs stay measurable on 2 shared cores
    fresh_process: bool = True
    threads: int = 1
    seed: int = 0

    @classmethod
    def quick(cls) -> "PaperSettings":
        dims = dict(LLAMA3_8B, hidden_size=64, intermediate_size=224, vocab_size=2048, num_attention_heads=4,
                    num_key_value_heads=1)
        return cls(mode="quick", dims=dims, cov_tokens=[128], cov_seq=32, value_sizes=[1, 4], value_loop_cap=2,
                   widths={"world": 64, "paper-quick": 224}, solve_sizes=[1, 16, 64],
                   direct_sizes={"MEMIT": [1, 16, 64], "EMMET": [1]}, width_sizes=[16], c0_keys=128, e2e_facts=8,
                   fresh_process=False)

    @property
    def d_in(self) -> int:
        return self.dims["intermediate_size"]


# --------------------------------------------------------------------------- model and requests

_WORDS = ["Alder", "Brisk", "Corra", "Dunmore", "Elvan", "Fenwick", "Garro", "Halden", "Isolde", "Jarrow", "Kestrel",
          "Lorne", "Marrow", "Nolan", "Orrin", "Pell", "Quarry", "Rook", "Sable", "Tamsin", "Ulric", "Varden"]
_TEMPLATES = ["The mother tongue of {} is", "{} is a citizen of", "{} plays the", "{} was born in"]
_OBJECTS = ["English", "French", "Spain", "Sweden", "piano", "guitar", "Paris", "Berlin"]


def paper_texts() -> list[str]:
    """Text the tokenizer is trained on (and C0 is streamed over): every subject, template and object."""
    subs = [f"{a} {b}" for a in _WORDS for b in _WORDS if a != b]
    return [t.format(s) + f" {o}." for i, s in enumerate(subs) for t, o in
            [(_TEMPLATES[i % 4], _OBJECTS[i % 8]), (_TEMPLATES[(i + 1) % 4], _OBJECTS[(i + 3) % 8])]]


def paper_requests(n: int) -> list:
    """``n`` requests with distinct two-word subjects (22·21 = 462 of them)."""
    import editkit as ek

    subs = [f"{a} {b}" for a in _WORDS for b in _WORDS if a != b]
    if n > len(subs):
        raise ValueError(f"paper_requests: at most {len(subs)} distinct subjects, asked for {n}")
    return [ek.EditRequest(_TEMPLATES[i % 4], subs[i], _OBJECTS[(i + 1) % 8], _OBJECTS[i % 8]) for i in range(n)]


def paper_lm(dims: dict, n_layer: int, dtype: str, seed: int = 0):
    """A random-weight Llama of the given widths (built on the meta device, then filled
    with seeded N(0, 0.02) weights in place: a fraction of transformers' init time)."""
    import transformers as T
    from transformers import AutoModelForCausalLM

    from editkit.models import LanguageModel
    from editkit.world.tokenizer import train_tokenizer

    tok = train_tokenizer(paper_texts(), style="gpt2", vocab_size=400, add_prefix_space=True)
    cfg = T.LlamaConfig(**{**dims, "num_hidden_layers": n_layer}, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                for row in p.view(p.shape[0], -1).split(4096):  # bounded float32 scratch for bf16 weights
                    row.copy_(torch.randn(row.shape, generator=g).mul_(0.02))
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were on meta
    lm = LanguageModel(model=model, tokenizer=tok, name=f"paper-llama3-{n_layer}L-{dtype}")
    return lm


def synthetic_C0(d: int, n_keys: int, seed: int) -> torch.Tensor:
    """``GGᵀ/n + diag(logspace(0, -5))·s``: a key covariance of rank n plus a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, n_keys, generator=g).abs_().pow_(1.5)  # heavy-tailed, non-negative-mean keys
    C = (G @ G.T).double() / n_keys
    C.diagonal().add_(C.diagonal().mean() * torch.logspace(0, -5, d, dtype=torch.float64)[torch.randperm(d, generator=g)])
    return C


def synthetic_KR(d: int, d_out: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    K = torch.randn(d, E, generator=g).abs_().pow_(1.5).double()
    R = torch.randn(d_out, E, generator=g).double()
    return K, R


# --------------------------------------------------------------------------- measurement helpers

def _rss_mb(field_name: str) -> float:
    import re

    m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measured(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run ``fn``: wall seconds, CPU seconds of this process, RSS before, peak RSS during (VmHWM reset
    just before). On a shared machine the CPU seconds of a one-thread process are what the wall time
    would be on an idle one; ``s`` is that figure (``wall_s`` is kept beside it)."""
    gc.collect()
    before = _rss_mb("VmRSS")
    exact = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_mb("VmHWM")
    return out, {"s": cpu if torch.get_num_threads() == 1 else dt, "wall_s": dt, "cpu_s": cpu, "rss_before_mb": before,
                 "peak_rss_mb": peak, "peak_rss_delta_mb": peak - before, "rss_peak_exact": exact}


def cache_root() -> Path:
    p = HERE / ".cache" / "paper"
    p.mkdir(parents=True, exist_ok=True)
    return p


def c0_file(d: int, n_keys: int, seed: int) -> Path:
    """The synthetic C0 of width ``d`` and its Cholesky factor, written once (safetensors)."""
    from safetensors.torch import save_file

    from editkit.solver import C0Factor

    path = cache_root() / f"C0-{d}-{n_keys}-s{seed}.safetensors"
    if not path.exists():
        C = synthetic_C0(d, n_keys, seed)
        F, m = measured(lambda: C0Factor.of(C))
        save_file({"C0": C.contiguous(), "L": F.L.contiguous()}, str(path), metadata={"factor_s": repr(m["s"]), "cond": repr(F.cond)})
    return path


# --------------------------------------------------------------------------- workers (one measurement each)

def solve_worker(a: dict) -> dict:
    """One Δ: MEMIT (least squares) or EMMET (equality), cached factor or direct, at width d and batch E."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from editkit.solver import C0Factor, solve

    d, E, d_out = a["d"], a["E"], a["d_out"]
    with safe_open(a["c0_file"], framework="pt") as f:
        meta = f.metadata()
        M = (f.get_tensor("L") if a["path"] == "cached" else f.get_tensor("C0")).clone()
    K, R = synthetic_KR(d, d_out, E, a["seed"])
    constraint = "least_squares" if a["method"] == "MEMIT" else "equality"
    reg = a["lam"] if a["method"] == "MEMIT" else a["lam_e"]
    C0 = C0Factor(M) if a["path"] == "cached" else M
    sol, m = measured(lambda: solve(K, R, C0, constraint, reg, path=a["path"]))
    out = {**m, "cond": sol.cond, "c0_cond": float(meta.get("cond", "nan")),
           "delta_norm": sol.delta.norm().item()}
    if a.get("save_delta"):
        save_file({"delta": sol.delta.contiguous()}, a["save_delta"])
    return out


def factor_worker(a: dict) -> dict:
    """The one-time Cholesky factorization of C0 (what the cached path amortizes)."""
    from safetensors import safe_open

    from editkit.solver import C0Factor

    with safe_open(a["c0_file"], framework="pt") as f:
        C = f.get_tensor("C0").clone()
    F, m = measured(lambda: C0Factor.of(C, dtype=getattr(torch, a.get("dtype", "float64"))))
    return {**m, "cond": F.cond, "bytes": F.L.numel() * F.L.element_size()}


def cov_worker(a: dict) -> dict:
    """C0 streaming over ``tokens`` tokens: stop after the edited layer (editkit) or run the whole model."""
    from editkit import second_moment
    from editkit import stats as stats_mod

    lm = paper_lm(a["dims"], a["n_layer"], a["dtype"], a["seed"])
    weights_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2 ** 20
    texts = _token_texts(lm, a["tokens"], a["seq"])
    if a["side"] == "whole model":  # the forward as it ran before: every layer and the LM head
        stats_mod.stop_after = _no_stop
    # second_moment reports C0's exact condition number (an eigvalsh of d_in × d_in: minutes of CPU and several
    # d_in² buffers at 14 336); it is not part of streaming, so both sides skip it here (timed once, below)
    exact_cond = stats_mod.condition_number
    stats_mod.condition_number = lambda C: (float("nan"), float("nan"))
    second_moment(lm, a["layer"], texts[:1], None, cache=False, progress=False)  # warm-up
    (C, info), m = measured(lambda: second_moment(lm, a["layer"], texts, None, cache=False, progress=False,
                                                  batch_size=a["batch"], seq_len=a["seq"], return_info=True))
    out = {**m, "tokens": info.n_tokens, "tokens_per_s": info.n_tokens / m["s"], "weights_mb": weights_mb,
           "accumulator_mb": C.numel() * 8 / 2 ** 20, "C0_trace": C.trace().item()}
    if a.get("time_cond"):
        _, mc = measured(lambda: exact_cond(C))
        out["condition_number_s"], out["condition_number_peak_delta_mb"] = mc["s"], mc["peak_rss_delta_mb"]
    return out


class _no_stop:  # a context manager that does nothing (the whole-model baseline)
    def __init__(self, *_: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> bool:
        return False


def _token_texts(lm, tokens: int, seq: int) -> list[str]:
    """Texts of about ``seq`` tokens each, ``tokens`` tokens in all (the paper texts concatenated)."""
    words = " ".join(paper_texts()).split(" ")
    ids = lm.tokenizer(" ".join(words[: 4 * tokens]), add_special_tokens=False)["input_ids"][:tokens]
    return [lm.tokenizer.decode(ids[i:i + seq - 1]) for i in range(0, len(ids), seq - 1)]


def values_worker(a: dict) -> dict:
    """Value optimization of E requests batched, then the first ``loop`` of them one at a time."""
    import editkit as ek
    from editkit.values import value_chunk

    lm = paper_lm(a["dims"], a["n_layer"], a["dtype"], a["seed"])
    reqs = paper_requests(a["E"])
    cfg = ek.ValueConfig(v_steps=a["v_steps"], stop_nll=0.0)
    prefixes = ek.context_prefixes(lm, a["n_prefixes"], 6, a["seed"])
    layer = a["layer"]
    ek.optimize_values(lm, reqs[:1], layer, prefixes, cfg)  # warm-up
    batched, mb = measured(lambda: ek.optimize_values(lm, reqs, layer, prefixes, cfg))
    loop = reqs[: a["loop"]]
    singles, ml = measured(lambda: [ek.optimize_values(lm, [r], layer, prefixes, cfg) for r in loop])
    diff = max((batched.delta[i] - s.delta[0]).abs().max().item() for i, s in enumerate(singles))
    return {"batched": {**mb, "s_per_edit": mb["s"] / len(reqs)},
            "one_at_a_time": {**ml, "s_per_edit": ml["s"] / len(loop), "requests": len(loop)},
            "max_abs_delta_diff": diff, "d": lm.d_out(layer),
            "v_chunk": min(len(reqs), value_chunk(cfg, lm.device.type, lm.d_out(layer)))}


def e2e_worker(a: dict) -> dict:
    """MEMIT edit of ``facts`` requests at one layer, C0 given (synthetic, d_in wide), per stage."""
    from safetensors import safe_open

    import editkit as ek

    lm = paper_lm(a["dims"], a["n_layer"], a["dtype"], a["seed"])
    with safe_open(a["c0_file"], framework="pt") as f:
        C0 = f.get_tensor("C0").clone()
    reqs = paper_requests(a["facts"])
    ed = ek.MEMIT(layers=[a["layer"]], corpus="unused", n_prefixes=a["n_prefixes"], prefix_len=6,
                  mom2_update_weight=a["lam"], seed=a["seed"],
                  values=ek.ValueConfig(v_steps=a["v_steps"], stop_nll=0.0))
    if "solve_path" in {f.name for f in dataclasses.fields(ed)}:
        ed = dataclasses.replace(ed, solve_path=a["path"])
    edit, m = measured(lambda: ed.apply(lm, reqs, stats={a["layer"]: C0}, progress=False))
    # stage times are wall seconds from edit.timings; scaled by the process's CPU/wall ratio they estimate the
    # stages' CPU seconds (what an idle one-thread machine would take)
    share = m["cpu_s"] / m["wall_s"] if m["wall_s"] else float("nan")
    out = {**m, "values_s": edit.timings.get("values", 0.0) * share, "solve_s": edit.timings.get("solve", 0.0) * share,
           "factor_s": edit.timings.get("stats", 0.0) * share, "cpu_share": share,
           "wall_stages_s": dict(edit.timings), "solve_path": getattr(ed, "solve_path", "per batch (editors without solve_path)"),
           "weights_mb": sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2 ** 20}
    edit.undo()
    return out


WORKERS: dict[str, Callable[[dict], dict]] = {"solve": solve_worker, "factor": factor_worker, "cov": cov_worker,
                                              "values": values_worker, "e2e": e2e_worker}


def run_worker(kind: str, args: dict, fresh: bool, threads: int) -> dict:
    """In a fresh ``benchmarks/run.py --worker`` subprocess (full runs), or here (quick)."""
    if not fresh:
        return WORKERS[kind](args)
    import subprocess
    import sys

    cmd = [sys.executable, str(HERE / "run.py"), "--threads", str(threads), "--worker",
           json.dumps({"paper": kind, **args})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"paper worker {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the section

def bench_paper(s: PaperSettings, add: Callable[..., dict]) -> None:
    """Every paper-dimension measurement, in the order that matters most first."""
    from tqdm.auto import tqdm

    dims, d_in, d_model = s.dims, s.d_in, s.dims["hidden_size"]
    common = {"dims": dims, "n_layer": s.n_layer, "seed": s.seed}
    model_desc = (f"Llama, {s.n_layer} layers, hidden {d_model}, MLP {d_in}, vocab {dims['vocab_size']}, "
                  f"{dims['num_attention_heads']}/{dims['num_key_value_heads']} heads, random weights")
    plan: list[tuple[str, Callable[[], None]]] = []

    # --- solves: the d_in = 14 336 small-E comparison first (the target), then the rest
    def solve_pair(width_name: str, d: int, method: str, E: int) -> None:
        f = str(c0_file(d, min(s.c0_keys, d), s.seed))
        big_width = d == max(s.widths.values())
        skip_direct = big_width and (E not in s.direct_sizes[method] or E > s.direct_max_E)
        if method == "EMMET" and E > d:
            return  # more equality constraints than dimensions: infeasible
        res, paths = {}, ["cached"] + ([] if skip_direct else ["direct"])
        tmp = {p: str(cache_root() / f"delta-{s.mode}-{os.getpid()}-{method}-{d}-{E}-{p}.safetensors") for p in paths}
        for p in paths:
            res[p] = run_worker("solve", {"c0_file": f, "d": d, "d_out": d_model, "E": E, "method": method,
                                          "path": p, "lam": s.lam, "lam_e": s.lam_e, "seed": s.seed,
                                          "save_delta": tmp[p]}, s.fresh_process, s.threads)
        rel = None
        if not skip_direct:
            from safetensors.torch import load_file

            a_, b_ = load_file(tmp["cached"])["delta"], load_file(tmp["direct"])["delta"]
            rel = ((a_ - b_).norm() / b_.norm()).item()
        for p in paths:
            Path(tmp[p]).unlink(missing_ok=True)
        o, b = res["cached"], res.get("direct")
        ratio = b["s"] / o["s"] if b else None
        target = "cached factor ≥ 10× faster than direct, Δ equal to 1e-6 relative" \
            if (method == "MEMIT" and d == 14336 and E <= 64) else None
        met = (ratio >= 10 and rel is not None and rel <= 1e-6) if target else None
        add(f"paper solve {method} d_in={d} E={E}", "paper solve",
            {"method": method, "d_in": d, "E": E, "d_out": d_model, "width": width_name, "dtype": "float64",
             "reg": s.lam if method == "MEMIT" else s.lam_e},
            {"path": "cached factor", **o, "rel_delta_diff": rel}, ({"path": "direct", **b} if b else None), ratio,
            "s", 1, ratio_means="direct seconds ÷ cached-factor seconds", target=target, met=met,
            notes=("cached factor: C0 = LLᵀ factorized once (not counted: amortized over every batch at the layer; "
                   "it costs what the direct EMMET solve at E=1 costs); per batch W = L⁻¹K, (WᵀW + ρI) E×E, Y = L⁻ᵀW, Δ = R(WᵀW + ρI)⁻¹Yᵀ. direct: "
                   + ("Cholesky of λC0 + KKᵀ per batch" if method == "MEMIT" else "Cholesky of C0 per batch")
                   + "; each side in a fresh process, peak = VmHWM; synthetic C0 (cond ≈ c0_cond)"
                   + ("; direct path not run at this E (a d_in³ factorization per batch; run at E in %s up to %d)"
                      % (s.direct_sizes[method], min(s.direct_max_E, max(s.solve_sizes))) if skip_direct else "")))

    big = max(s.widths.values())
    small_E = [E for E in s.solve_sizes if E <= 64]
    large_E = [E for E in s.solve_sizes if E > 64]
    for E in small_E:
        plan.append((f"solve MEMIT {big} E={E}", lambda E=E: solve_pair("Llama-3-8B", big, "MEMIT", E)))


    # --- C0 streaming, both dtypes
    def cov_entries(dt: str) -> None:
        if True:
            for n in s.cov_tokens:
                res = {side: run_worker("cov", {**common, "dtype": dt, "tokens": n, "seq": s.cov_seq, "batch": 4,
                                                "layer": 0, "side": side, "time_cond": s.time_condition_number
                                                and side == "stop at layer" and dt == s.dtypes[0]}, s.fresh_process, s.threads)
                       for side in ("stop at layer", "whole model")}
                o, b = res["stop at layer"], res["whole model"]
                add(f"paper C0 {dt} tokens={o['tokens']}", "paper C0",
                    {"d_in": d_in, "E": 0, "dtype": dt, "tokens": o["tokens"], "layer": 0, "model": model_desc},
                    o, b, o["tokens_per_s"] / b["tokens_per_s"], "tok/s", 1,
                    ratio_means="tokens/s stopping after the edited layer ÷ tokens/s running the whole model",
                    notes="ek.second_moment (float64 d_in×d_in accumulator) in a fresh process each, without its exact "
                          "condition number (an eigvalsh of C0, not streaming; time_condition_number times it apart); baseline = "
                          "the same with the forward running every layer and the 128k-vocabulary LM head (as before "
                          f"this change); C0 traces equal: {abs(o['C0_trace'] - b['C0_trace']) <= 1e-9 * abs(b['C0_trace'])}")
    for dt in s.dtypes:
        plan.append((f"C0 streaming {dt}", lambda dt=dt: cov_entries(dt)))

    # --- values, both dtypes
    def value_entries(dt: str, E: int) -> None:
        if True:
            if True:
                r = run_worker("values", {**common, "dtype": dt, "E": E, "loop": min(E, s.value_loop_cap),
                                          "v_steps": s.v_steps, "n_prefixes": s.n_prefixes, "layer": 0},
                               s.fresh_process, s.threads)
                o, b = r["batched"], r["one_at_a_time"]
                add(f"paper values {dt} E={E}", "paper values",
                    {"d_in": d_in, "E": E, "dtype": dt, "v_steps": s.v_steps, "n_prefixes": s.n_prefixes,
                     "loop_requests": b["requests"], "layer": 0, "model": model_desc},
                    {**o, "max_abs_delta_diff": r["max_abs_delta_diff"], "v_chunk": r["v_chunk"]}, b,
                    b["s_per_edit"] / o["s_per_edit"],
                    "s/edit", 1, ratio_means="one-at-a-time seconds per edit ÷ batched seconds per edit",
                    notes="ek.optimize_values with stop_nll=0 (every step runs); δ at layer 0, d = hidden size; "
                          "peak_rss_delta_mb of the batched side = the activations of the value optimization "
                          "(weights are loaded before); fresh process")
    for dt in s.dtypes:
        for E in s.value_sizes:
            plan.append((f"values {dt} E={E}", lambda dt=dt, E=E: value_entries(dt, E)))

    def value_depth_entry() -> None:
        """The same batched value optimization with 2 more layers above the value layer: activation memory per layer."""
        E, dt, n4 = max(s.value_sizes), "bfloat16", s.n_layer + 2
        r = run_worker("values", {**common, "n_layer": n4, "dtype": dt, "E": E, "loop": 1, "v_steps": s.v_steps,
                                  "n_prefixes": s.n_prefixes, "layer": 0}, s.fresh_process, s.threads)
        add(f"paper values {dt} E={E} {n4} layers", "paper values",
            {"d_in": d_in, "E": E, "dtype": dt, "v_steps": s.v_steps, "n_prefixes": s.n_prefixes, "layer": 0,
             "n_layer": n4, "loop_requests": 1, "model": model_desc.replace(f"{s.n_layer} layers", f"{n4} layers")},
            {**r["batched"], "max_abs_delta_diff": r["max_abs_delta_diff"], "v_chunk": r["v_chunk"]}, r["one_at_a_time"],
            r["one_at_a_time"]["s_per_edit"] / r["batched"]["s_per_edit"], "s/edit", 1,
            ratio_means="one-at-a-time seconds per edit (1 request) ÷ batched seconds per edit",
            notes=f"as the {s.n_layer}-layer entry with {n4} layers: the difference of the batched peaks is the "
                  "activation memory of 2 layers above the value layer (used by the memory budget)")
    plan.append(("values depth", value_depth_entry))

    for E in large_E:
        plan.append((f"solve MEMIT {big} E={E}", lambda E=E: solve_pair("Llama-3-8B", big, "MEMIT", E)))
    for E in s.solve_sizes:
        plan.append((f"solve EMMET {big} E={E}", lambda E=E: solve_pair("Llama-3-8B", big, "EMMET", E)))
    for name, d in s.widths.items():
        if d == big:
            continue
        for method in ("MEMIT", "EMMET"):
            for E in s.width_sizes:
                plan.append((f"solve {method} {d} E={E}", lambda d=d, m=method, E=E, n=name: solve_pair(n, d, m, E)))

    def e2e_entry() -> None:
        f = str(c0_file(d_in, min(s.c0_keys, d_in), s.seed))
        r = run_worker("e2e", {**common, "dtype": s.e2e_dtype, "facts": s.e2e_facts, "layer": 0, "lam": s.lam,
                               "v_steps": s.e2e_v_steps, "n_prefixes": s.n_prefixes, "c0_file": f, "path": "cached"},
                       s.fresh_process, s.threads)
        add(f"paper e2e MEMIT {s.e2e_facts} facts", "paper e2e",
            {"d_in": d_in, "E": s.e2e_facts, "dtype": s.e2e_dtype, "v_steps": s.e2e_v_steps, "layers": [0],
             "model": model_desc}, r, None, None, "s", 1,
            notes="ek.MEMIT.apply with C0 given (synthetic, stats=); values/solve from edit.timings; peak RSS of "
                  "the whole edit over the loaded model; fresh process")
    plan.append(("e2e", e2e_entry))

    if s.steps:  # in the order asked for
        plan = [(n, f) for p in s.steps for n, f in plan if n.startswith(p)]
        plan = [x for i, x in enumerate(plan) if x[0] not in [y[0] for y in plan[:i]]]
    progress = cache_root() / f"progress-{s.mode}.jsonl"  # every entry as soon as it is measured
    add_entry = add

    def add(*args: Any, **kw: Any) -> dict:
        e = add_entry(*args, **kw)
        with open(progress, "a") as f:
            f.write(json.dumps(e, default=str) + "\n")
        return e

    for name, step in tqdm(plan, desc="paper benchmarks"):
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:  # one failed measurement must not lose the others
            log.exception("paper step %s failed", name)
            add(f"paper {name} (failed)", "paper failed", {"d_in": None, "E": None}, {"error": repr(exc)[:2000]},
                None, None, "", 0)
        log.info("paper step %s took %.1f s", name, time.perf_counter() - t0)



# --------------------------------------------------------------------------- curves, slopes, memory budget

def _solves(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["section"] == "paper solve" and e["params"].get("E")]


def _fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the exponent of a power law)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def solve_curves(entries: list[dict]) -> dict:
    """{(method, path, d_in): [(E, CPU seconds, solve memory MB)]} from the paper solve entries.

    Solve memory = the matrix the worker loaded (L or C0, d_in² float64) + the peak RSS the solve added
    on top of it: what the solve needs, without the interpreter's own ~300 MB."""
    curves: dict = {}
    for e in _solves(entries):
        p = e["params"]
        for side, path in (("ours", "cached factor"), ("baseline", "direct")):
            r = e.get(side)
            if r and "s" in r:
                mem = r["peak_rss_delta_mb"] + p["d_in"] ** 2 * 8 / 2 ** 20
                curves.setdefault((p["method"], path, p["d_in"]), []).append((p["E"], r["s"], mem))
    return {k: sorted(v) for k, v in curves.items()}


def slopes(entries: list[dict]) -> dict:
    """Power-law exponents: time vs E at the largest width (cached factor over E ≥ 256, where the O(d²E) work
    dominates; direct over E ≥ 16) and time and peak memory vs d_in (E = 16 and 1024)."""
    curves = solve_curves(entries)
    out: dict = {"vs_E": {}, "vs_width": {}}
    if not curves:
        return out
    big = max(k[2] for k in curves)
    for (method, path, d), pts in curves.items():
        if d == big:
            sel = [p for p in pts if p[0] >= 256] if path == "cached factor" else [p for p in pts if p[0] >= 16]
            out["vs_E"][f"{method} {path}"] = {"time": _fit_slope([p[0] for p in sel], [p[1] for p in sel]),
                                               "E": [p[0] for p in sel]}
    widths = sorted({k[2] for k in curves})
    widths = widths[1:] if len(widths) > 2 else widths  # the smallest width is call overhead, not arithmetic
    for method in ("MEMIT", "EMMET"):
        for path in ("cached factor", "direct"):
            for E in (16, 1024):
                pts = [(d, dict((p[0], p) for p in curves.get((method, path, d), [])).get(E)) for d in widths]
                pts = [(d, p) for d, p in pts if p]
                if len(pts) >= 2:
                    out["vs_width"][f"{method} {path} E={E}"] = {
                        "time": _fit_slope([d for d, _ in pts], [p[1] for _, p in pts]),
                        "peak_rss": _fit_slope([d for d, _ in pts], [p[2] for _, p in pts]),
                        "d_in": [d for d, _ in pts]}
    return out


def plot_paper(entries: list[dict], path: Path) -> Path | None:
    """One figure: solve time and peak memory vs E (largest width) and vs d_in (E = 16 and 1024)."""
    curves = solve_curves(entries)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = max(k[2] for k in curves)
    widths = sorted({k[2] for k in curves})
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    style = {("MEMIT", "cached factor"): ("C0", "-", "o"), ("MEMIT", "direct"): ("C3", "-", "s"),
             ("EMMET", "cached factor"): ("C0", "--", "^"), ("EMMET", "direct"): ("C3", "--", "v")}
    for (method, path_, d), pts in curves.items():
        if d != big:
            continue
        c, ls, mk = style[(method, path_)]
        for j in (0, 1):
            ax[j, 0].plot([p[0] for p in pts], [p[1 + j] / (1 if j == 0 else 1024) for p in pts], color=c,
                          linestyle=ls, marker=mk, label=f"{method}, {path_}")
    for E, mk in ((16, "o"), (1024, "s")):
        for (method, path_), (c, ls, _) in style.items():
            pts = [(d, dict((p[0], p) for p in curves.get((method, path_, d), [])).get(E)) for d in widths]
            pts = [(d, p) for d, p in pts if p]
            if len(pts) < 2:
                continue
            for j in (0, 1):
                ax[j, 1].plot([d for d, _ in pts], [p[1 + j] / (1 if j == 0 else 1024) for _, p in pts], color=c,
                              linestyle=ls, marker=mk, label=f"{method}, {path_}, E={E}")
    for a in ax.flat:
        a.set_xscale("log")
        a.set_yscale("log")
        a.grid(True, which="both", alpha=0.3)
    ax[0, 0].set(title=f"Δ solve time vs batch size E (d_in = {big:,})", xlabel="E (edits per batch)", ylabel="s")
    ax[1, 0].set(title=f"solve memory (L or C0 + peak working) vs E (d_in = {big:,})", xlabel="E", ylabel="GiB")
    ax[0, 1].set(title="Δ solve time vs MLP width d_in", xlabel="d_in", ylabel="s")
    ax[1, 1].set(title="solve memory vs d_in", xlabel="d_in", ylabel="GiB")
    for a in ax[:, 1]:
        a.set_xticks(widths)
        a.set_xticklabels([f"{w:,}" for w in widths])
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].legend(fontsize=7)
    fig.suptitle("Cached Cholesky factor of C0 (push-through) vs direct solve, float64, one CPU thread", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def llama3_8b_params(dims: dict = LLAMA3_8B) -> int:
    """Parameter count of a Llama of these widths (8 030 261 248 for Llama-3-8B)."""
    h, f, V, L = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"], dims["num_hidden_layers"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return L * per_layer + 2 * V * h + h


def memory_budget(entries: list[dict], edit_layers: int = 5, value_layer: int = 8, E: int = 4096,
                  chunks: tuple[int, ...] = (4096, 256, 64, 32)) -> dict:
    """GPU memory of a 4096-fact MEMIT edit of the full Llama-3-8B, from the measured parts (GiB).

    * weights: the parameter count in bfloat16 (checked against the measured 2-layer model);
    * C0 / factor: d_in² × 8 bytes (float64) or × 4 (float32) per edited layer (the factor
      entries' measured sizes);
    * the solve's working memory at E: the measured peak RSS of the cached-factor / direct solve
      process over what it held before (L or C0), plus K and R;
    * value optimization: the measured activation memory per request above the value layer,
      scaled to the 32 − 1 − ``value_layer`` layers of Llama-3-8B, plus the part that does not
      grow with depth (LM-head logits, keys/values of the prefixes), per chunk of requests.
    """
    GiB = 2 ** 30
    by = {e["name"]: e for e in entries}
    d, h = LLAMA3_8B["intermediate_size"], LLAMA3_8B["hidden_size"]
    need = [f"paper solve MEMIT d_in={d} E={E}", "paper values bfloat16 E=64", "paper values bfloat16 E=64 4 layers"]
    missing = [n for n in need if n not in by or by[n].get("ours") is None or "s" not in by[n]["ours"]]
    if missing:
        raise KeyError(f"memory_budget needs the measured entries {missing}; run `benchmarks/run.py --only paper`")
    n_params = llama3_8b_params()
    weights = n_params * 2 / GiB
    f64 = d * d * 8 / GiB
    sol = by[f"paper solve MEMIT d_in={d} E={E}"]
    KR = (d * E + h * E) * 8 / GiB
    solve_cached = sol["ours"]["peak_rss_delta_mb"] / 1024 + KR
    # the direct solve's working set beyond C0 (λC0 + KKᵀ, its factor, temporaries) barely depends on E: taken at
    # the largest E it was measured at, plus K and R of this E
    direct = [e for e in _solves(entries) if e["params"]["method"] == "MEMIT" and e["params"]["d_in"] == d
              and e.get("baseline")]
    direct_E = max((e["params"]["E"] for e in direct), default=None)
    solve_direct = (next(e for e in direct if e["params"]["E"] == direct_E)["baseline"]["peak_rss_delta_mb"] / 1024
                    + KR) if direct else None
    v2, v4 = by["paper values bfloat16 E=64"]["ours"], by["paper values bfloat16 E=64 4 layers"]["ours"]
    chunk = v2.get("v_chunk", 32)  # requests optimized together (on a CPU, chunks of 32)
    per_layer_req = max(v4["peak_rss_delta_mb"] - v2["peak_rss_delta_mb"], 0.0) / 2 / chunk / 1024  # GiB
    fixed_req = max(v2["peak_rss_delta_mb"] / 1024 / chunk - per_layer_req, 0.0)  # head, prefixes: one layer above
    layers_above = LLAMA3_8B["num_hidden_layers"] - 1 - value_layer
    act = {c: c * (fixed_req + per_layer_req * layers_above) for c in chunks}
    measured_2l = next((e["ours"].get("weights_mb") for e in entries if e["section"] == "paper C0"
                        and e["params"].get("dtype") == "bfloat16"), None)
    two = dict(LLAMA3_8B, num_hidden_layers=2)
    scen = {
        "direct solve, C0 of every edited layer on the GPU (float64)":
            weights + edit_layers * f64 + (solve_direct if solve_direct is not None else 2 * f64 + KR),
        "cached factor of every edited layer on the GPU (float64)": weights + edit_layers * f64 + solve_cached,
        "cached factor, solve_dtype='float32', every edited layer on the GPU":
            weights + edit_layers * f64 / 2 + solve_cached / 2,
        "offload_factor=True: factors on the CPU, one layer's on the GPU for its solve (float64)":
            weights + f64 + solve_cached,
        "offload_factor=True, solve_dtype='float32'": weights + f64 / 2 + solve_cached / 2,
    }
    rows = {name: {c: base + act[c] for c in chunks} for name, base in scen.items()}
    return {"params": n_params, "weights_gib": weights, "c0_or_factor_per_layer_gib": f64, "edit_layers": edit_layers,
            "E": E, "solve_cached_gib": solve_cached, "solve_direct_gib": solve_direct, "solve_direct_measured_E": direct_E,
            "KR_gib": KR,
            "values_per_request_gib": {"fixed": fixed_req, "per_layer": per_layer_req, "layers_above": layers_above},
            "values_activations_gib": act, "weights_2_layer_bf16_measured_mb": measured_2l,
            "weights_2_layer_bf16_formula_mb": llama3_8b_params(two) * 2 / 2 ** 20, "scenarios": rows,
            "fits": {name: {c: [g for g in (24, 40, 80) if v <= g - 1.0] for c, v in r.items()} for name, r in rows.items()}}


def budget_markdown(b: dict) -> str:
    chunks = list(next(iter(b["scenarios"].values())))
    lines = ["| GPU memory, 4096-fact MEMIT edit of Llama-3-8B (bf16) | " + " | ".join(
        f"values in chunks of {c}" for c in chunks) + " |", "| --- |" + " --- |" * len(chunks)]
    for name, r in b["scenarios"].items():
        cells = []
        for c in chunks:
            fits = b["fits"][name][c]
            cells.append(f"{r[c]:.1f} GiB ({'fits ' + '/'.join(map(str, fits)) + ' GB' if fits else 'fits none'})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    v = b["values_per_request_gib"]
    lines += ["", f"Parts (GiB): weights {b['weights_gib']:.2f} ({b['params'] / 1e9:.3f} B parameters × 2 bytes); "
              f"C0 or its factor {b['c0_or_factor_per_layer_gib']:.2f} per edited layer (float64; {b['edit_layers']} "
              f"layers); cached solve at E={b['E']} {b['solve_cached_gib']:.2f}"
              + (f", direct {b['solve_direct_gib']:.2f} (its working set measured at E={b['solve_direct_measured_E']})"
                 if b["solve_direct_gib"] is not None else "")
              + f" (K and R {b['KR_gib']:.2f} of it); value optimization {1024 * v['per_layer']:.2f} MiB per request per "
              f"layer above the value layer ({v['layers_above']} layers) + {1024 * v['fixed']:.1f} MiB per request "
              "(LM-head logits, prefix keys/values). 'fits' leaves 1 GiB for the CUDA context."]
    return "\n".join(lines)
