"""What every benchmark shares: settings, machine facts and timing, the model, corpus and records
they run on, and the Context that collects their entries."""
from __future__ import annotations

import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("editkit.bench")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # measure the checkout this script lives in, not another installed editkit
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # paper.py beside these files
    sys.path.insert(0, str(HERE))
from paper import _reset_peak  # noqa: E402,F401  (one copy of the peak-RSS reset, shared with the paper section)
SECTIONS = ("values", "scoring", "covariance", "precompute", "e2e", "paper")
#: Sections that bring their own model (the world / tiny model is not loaded for them alone).
OWN_MODEL = ("paper",)
METRICS = ("ES", "PS", "NS", "S")


# --------------------------------------------------------------------------- settings

@dataclass
class Settings:
    """Everything that sizes a run. ``full()`` and ``quick()`` are the two presets."""

    mode: str
    model: str  # "world-gpt2", "world-llama", any load_model name, or "tiny-<arch>" (editkit.testing.tiny_lm)
    corpus: str  # "world" or "tiny" (editkit.testing.TINY_TEXT)
    repeats: int
    v_steps: int
    value_sizes: list[int]
    value_loop_cap: int  # the per-request loop runs on at most this many requests (per-edit time reported)
    n_score: int
    score_loop_n: int  # one-prompt-at-a-time side runs on the first this-many records
    score_batch_size: int
    cov_samples: list[int]  # corpus texts per covariance measurement
    precompute_multiples: list[int]
    precompute_facts: int
    e2e_facts: int
    e2e_repeats: int = 1
    paper_steps: list[str] | None = None  # benchmarks/paper.py plan steps to run (default all)
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def full(cls, **kw: Any) -> "Settings":
        return cls(**{**dict(mode="full", model="world-gpt2", corpus="world", repeats=3, v_steps=10,
                             value_sizes=[1, 16, 64, 256], value_loop_cap=64, n_score=1000, score_loop_n=250,
                             score_batch_size=64, cov_samples=[250, 1000, 4000], precompute_multiples=[1, 2, 4, 10],
                             precompute_facts=64, e2e_facts=256), **kw})

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        return cls(**{**dict(mode="quick", model="tiny-gpt2", corpus="tiny", repeats=1, v_steps=3,
                             value_sizes=[1, 4, 8], value_loop_cap=4, n_score=8, score_loop_n=4, score_batch_size=16,
                             cov_samples=[40, 160], precompute_multiples=[1, 2, 4, 10], precompute_facts=4,
                             e2e_facts=8), **kw})


# --------------------------------------------------------------------------- machine, timing

def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": device,
    }
    try:
        import transformers

        import editkit

        info["transformers"] = transformers.__version__
        info["editkit"] = editkit.__version__
    except Exception:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["git"] = None
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, with CUDA synchronized on both ends."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- model, corpus, records

def load_lm(spec: str, device: str):
    """``tiny-<arch>`` → a tiny random model from editkit.testing; anything else → ek.load_model."""
    import editkit as ek

    if spec.startswith("tiny-"):
        from editkit.testing import tiny_lm

        lm = tiny_lm(spec[len("tiny-"):], n_layer=3, d=32)
        lm.model.to(device)
        return lm
    return ek.load_model(spec, device=device)


def load_corpus(spec: str) -> list[str]:
    """The C0 corpus as a list of texts (loaded once, so memory baselines include it)."""
    if spec == "tiny":
        from editkit.testing import TINY_TEXT

        return list(TINY_TEXT)
    if spec == "world":
        from editkit.world import world_corpus

        return world_corpus("train")
    from editkit.stats import iter_corpus

    return list(iter_corpus(spec, None))


def _tiny_records(n: int) -> list[dict]:
    """CounterFact-schema records over the tiny models' vocabulary (subjects repeat past 10)."""
    from editkit.testing import _NAMES, _OBJS

    prompts = ["The mother tongue of {} is", "{} is a citizen of", "{} plays the", "{} was born in"]
    out = []
    for i in range(n):
        s, other = _NAMES[i % len(_NAMES)], _NAMES[(i + 3) % len(_NAMES)]
        p = prompts[(i // len(_NAMES)) % len(prompts)]
        true, new = _OBJS[i % 4], _OBJS[(i + 1) % 4]
        out.append({"case_id": i, "requested_rewrite": {"prompt": p, "relation_id": f"P{i % 4}", "subject": s,
                                                        "target_new": {"str": new}, "target_true": {"str": true}},
                    "paraphrase_prompts": [f"Here is a fact. {p.format(s)}", f"{s} is known; {p.format(s)}"],
                    "neighborhood_prompts": [p.format(other), p.format(_NAMES[(i + 5) % len(_NAMES)])],
                    "attribute_prompts": [], "generation_prompts": [f"{s} was born in"]})
    return out


@dataclass
class _Rec:
    """A stand-in record (only ``.request``) for when ek.load_counterfact is not available."""

    request: Any


def load_records(settings: Settings, n: int) -> list[Any]:
    """``n`` records with ``.request``: the world's CounterFact (seeded, distinct subjects first),
    or synthetic ones for the tiny models."""
    import editkit as ek

    if settings.corpus == "tiny":
        dicts = _tiny_records(n)
        if hasattr(ek, "load_counterfact"):
            return list(ek.load_counterfact(dicts))
        return [_Rec(ek.EditRequest(d["requested_rewrite"]["prompt"], d["requested_rewrite"]["subject"],
                                    d["requested_rewrite"]["target_new"]["str"],
                                    d["requested_rewrite"]["target_true"]["str"], case_id=d["case_id"]))
                for d in dicts]
    if not hasattr(ek, "load_counterfact"):
        raise RuntimeError("ek.load_counterfact is not available yet; run with --quick")
    return list(ek.load_counterfact(settings.corpus, n=n, seed=settings.seed))


def make_editor(lm, settings: Settings):
    """MEMIT from the model's preset when there is one, else a small documented fallback."""
    import editkit as ek
    from editkit.editors import preset_for

    if settings.corpus == "tiny":
        from editkit.testing import TINY_TEXT

        return ek.MEMIT(layers=[1], corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4,
                        mom2_update_weight=100.0, seed=settings.seed,
                        values=ek.ValueConfig(v_steps=max(settings.v_steps, 6)))
    name = preset_for(lm.name)
    if name is not None:
        return ek.MEMIT.preset(name, seed=settings.seed)
    log.warning("no preset for %s; using MEMIT(layers=[1], corpus=%r)", lm.name, settings.corpus)
    return ek.MEMIT(layers=[1], corpus=settings.corpus, n_samples=None, seed=settings.seed)


def have_metrics() -> bool:
    import editkit as ek

    return hasattr(ek, "evaluate") and hasattr(ek, "summarize")


def scores_of(summary: Any) -> dict[str, float | None]:
    """ES/PS/NS/S values from ``ek.summarize``'s frame (metric as index or as a column)."""
    import pandas as pd

    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(summary)
    if "metric" in df.columns:
        df = df.set_index("metric")
    out: dict[str, float | None] = {}
    for m in METRICS:
        try:
            v = df.loc[m, "value"]
            v = v.iloc[0] if hasattr(v, "iloc") else v
            out[m] = float(v)
        except (KeyError, TypeError, ValueError):
            out[m] = None
    return out


def nll_columns(frame: Any) -> list[str]:
    cols = [c for c in frame.columns if "nll" in str(c).lower()]
    return cols or [c for c in frame.columns if str(frame[c].dtype).startswith("float")]


# --------------------------------------------------------------------------- entries

@dataclass
class Context:
    settings: Settings
    lm: Any
    editor: Any
    records: list[Any]
    corpus: list[str]
    entries: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def add(self, name: str, section: str, params: dict, ours: dict, baseline: dict | None, ratio: float | None,
            unit: str, repeats: int, *, ratio_means: str = "", target: str | None = None, met: bool | None = None,
            notes: str = "") -> dict:
        e = {"name": name, "section": section, "params": params, "ours": ours, "baseline": baseline,
             "ratio": None if ratio is None or not math.isfinite(ratio) else round(ratio, 4), "ratio_means": ratio_means,
             "unit": unit, "repeats": repeats, "target": target, "met": met, "notes": notes}
        self.entries.append(e)
        log.info("%s: ours=%s baseline=%s ratio=%s", name, ours, baseline, e["ratio"])
        return e

    def skip(self, name: str, section: str, reason: str, params: dict | None = None) -> None:
        log.warning("%s skipped: %s", name, reason)
        self.entries.append({"name": name, "section": section, "params": params or {}, "ours": None,
                             "baseline": None, "ratio": None, "ratio_means": "", "unit": None, "repeats": 0,
                             "target": None, "met": None, "notes": "", "skipped": reason})
