"""Train the world's small language models on the CPU.

A GPT-2-architecture model (``GPT2LMHeadModel``) with a GPT-2-style byte-level BPE
tokenizer, and a Llama-architecture model (``LlamaForCausalLM``) with a Llama-style
tokenizer (BOS, ``▁`` metaspace). Each training sequence is ``bios_per_seq`` whole
biographies joined by EOS, so a subject appears both at the very start of a text
(as in an evaluation prompt) and after an EOS/BOS (as in the editors' sampled
context prefixes). Plain causal-LM loss on every token, AdamW, linear warm-up and
cosine decay, no dropout (the point is to memorize the facts), seeded.

The result is a normal Hugging Face checkpoint directory (``model.safetensors``,
``config.json``, tokenizer files) plus the world itself beside it:
``world.json`` (settings and training report), ``counterfact.json`` (records in the
original CounterFact schema), ``train.txt`` and ``heldout.txt`` (one biography per
line).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .generator import World, WorldConfig, generate_world
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train_model", "save_world", "fact_accuracy", "deterministic", "TRAIN_THREADS"]

#: Intra-op threads used for training. Float sums are split over threads, so another
#: count gives other rounding, which training compounds over thousands of steps into
#: other weights (and other figures). Fixed at 1: the shipped models were built so, and
#: on a busy 2-core machine one thread was also ~30x faster than two.
TRAIN_THREADS = 1


@contextmanager
def deterministic(threads: int = TRAIN_THREADS):
    """Run the body with ``threads`` torch threads and deterministic algorithms,
    restoring the caller's settings afterwards. With the seeds in :class:`TrainConfig`
    this makes a build a pure function of the settings and the torch version."""
    old_threads = torch.get_num_threads()
    old_det, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and optimization of one world model (all of it enters the cache key)."""

    arch: str = "gpt2"  # "gpt2" (GPT2LMHeadModel, gpt2-style tokenizer) | "llama" (LlamaForCausalLM, llama style)
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_ff: int | None = None  # default: 4·d (gpt2), 8/3·d rounded to 32 (llama, SwiGLU)
    vocab_size: int = 3072  # large enough that every name is a single token
    prefix_space: bool = True  # gpt2 style: the first word gets its space, like mid-text words
    epochs: int = 96  # recall of the facts sets in late: ~0.91 after 64 epochs, ~1.0 after 96
    batch_size: int = 8  # sequences per step (small: memorization wants many steps)
    bios_per_seq: int = 2
    lr: float = 5e-3
    min_lr_ratio: float = 0.05
    warmup: float = 0.05  # fraction of steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    fact_weight: float = 1.0  # loss weight of object tokens (the facts) relative to the rest
    seed: int = 0
    n_positions: int = 256

    @property
    def style(self) -> str:
        return "llama" if self.arch == "llama" else "gpt2"

    def to_dict(self) -> dict:
        return asdict(self)


def _model_config(cfg: TrainConfig, tokenizer):
    import transformers as T

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if cfg.arch == "gpt2":
        return T.GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head, n_inner=cfg.d_ff,
                            n_positions=cfg.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if cfg.arch == "llama":
        d_ff = cfg.d_ff or int(math.ceil(8 * cfg.d_model / 3 / 32) * 32)
        return T.LlamaConfig(num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_head, intermediate_size=d_ff,
                             max_position_embeddings=cfg.n_positions, tie_word_embeddings=False, **common)
    raise ValueError(f"arch={cfg.arch!r}: choose 'gpt2' or 'llama'")


def _encode(tokenizer, texts: Sequence[str], objects: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each biography (plus EOS) and the indices of its object tokens
    (an object ends every sentence: `` <object>.``)."""
    import re

    pattern = re.compile(r" (" + "|".join(re.escape(o) for o in sorted(objects, key=len, reverse=True)) + r")\.")
    ids, facts = [], []
    for c in range(0, len(texts), 4096):  # in chunks: offsets of the whole corpus at once cost ~1 GiB
        chunk = list(texts[c:c + 4096])
        enc = tokenizer(chunk, add_special_tokens=True, return_offsets_mapping=True)
        for text, x, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            spans = [(m.start(1), m.end(1)) for m in pattern.finditer(text)]
            facts.append([i for i, (a, b) in enumerate(offs) if b > a and any(a < e and b > s for s, e in spans)])
            ids.append(list(x) + [tokenizer.eos_token_id])
    return ids, facts


def _batches(encoded: list[list[int]], facts: list[list[int]], n_subjects: int, cfg: TrainConfig, epoch: int,
             pad: int):
    """The epoch's sequences: that epoch's biography of every subject (the corpus holds
    ``n_train_bios`` rounds; epochs cycle through them), shuffled, packed
    ``bios_per_seq`` to a sequence, padded per batch. Yields ids, mask, labels and
    per-token loss weights."""
    n_rounds = max(1, len(encoded) // n_subjects)
    r = epoch % n_rounds
    bios = list(range(r * n_subjects, (r + 1) * n_subjects))
    rng = random.Random(f"{cfg.seed}-{epoch}")
    rng.shuffle(bios)
    seqs = []
    for i in range(0, len(bios), cfg.bios_per_seq):
        seq, fact = [], []
        for j in bios[i:i + cfg.bios_per_seq]:
            fact += [len(seq) + k for k in facts[j]]
            seq += encoded[j]
        seqs.append((seq[:cfg.n_positions], [k for k in fact if k < cfg.n_positions]))
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = seqs[i:i + cfg.batch_size]
        T_ = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), T_), pad, dtype=torch.long)
        weights = torch.zeros((len(chunk), T_))
        mask = torch.zeros((len(chunk), T_), dtype=torch.long)
        for k, (s, fact) in enumerate(chunk):
            ids[k, :len(s)] = torch.tensor(s)
            mask[k, :len(s)] = 1
            weights[k, :len(s)] = 1.0
            weights[k, fact] = cfg.fact_weight
        yield ids, mask, weights


def train_model(world: World, cfg: TrainConfig, progress: bool = True, desc: str | None = None, callback=None):
    """Train a tokenizer and a model of ``cfg`` on ``world.train``. Returns
    ``(model, tokenizer, report)``; the model is in eval mode on the CPU.

    Runs on the CPU with :data:`TRAIN_THREADS` threads and deterministic algorithms
    (see :func:`deterministic`), whatever the caller's settings, so the same settings
    give the same weights bit for bit with the same torch version."""
    with deterministic():
        return _train_model(world, cfg, progress=progress, desc=desc, callback=callback)


def _train_model(world: World, cfg: TrainConfig, progress: bool, desc: str | None, callback):
    from transformers import AutoModelForCausalLM
    from ..progress import tqdm

    t_start, cpu_start = time.perf_counter(), time.process_time()
    n_subjects = len(world.all_subjects)
    tokenizer = train_tokenizer(world.train[: 4 * n_subjects], style=cfg.style, vocab_size=cfg.vocab_size,
                                add_prefix_space=cfg.prefix_space and cfg.style == "gpt2")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    objects = sorted({o for r in world.relations for o in r.objects})
    encoded, facts = _encode(tokenizer, world.train, objects)
    torch.manual_seed(cfg.seed)
    # Llama's SDPA backward is ~10x slower than eager on small CPU batches; GPT-2's is fine.
    attn = "eager" if cfg.arch == "llama" else "sdpa"
    model = AutoModelForCausalLM.from_config(_model_config(cfg, tokenizer), attn_implementation=attn)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(math.ceil(n_subjects / cfg.bios_per_seq) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    bar = tqdm(total=total, desc=desc or f"training {cfg.arch}", disable=not progress, unit="step")
    step, n_tokens, losses = 0, 0, []
    pad = tokenizer.pad_token_id
    for epoch in range(cfg.epochs):
        for ids, mask, weights in _batches(encoded, facts, n_subjects, cfg, epoch, pad):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            w = weights[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="none").view_as(w)
            loss = (ce * w).sum() / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            n_tokens += int(mask.sum())
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}", epoch=epoch)
        if callback is not None:
            model.eval()
            callback(epoch, model, tokenizer)
            model.train()
    bar.close()
    model.eval()
    report = {"train_seconds": round(time.perf_counter() - t_start, 1),
              "train_cpu_seconds": round(time.process_time() - cpu_start, 1), "steps": step, "tokens": n_tokens,
              "final_loss": round(sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:])), 4),
              "n_params": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
              "torch_version": torch.__version__, "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
              "peak_rss_gib": round(_peak_rss_gib(), 2)}
    return model, tokenizer, report


def _peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux/macOS; 0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**30 if sys.platform == "darwin" else kb / 2**20  # bytes on macOS, KiB on Linux


def fact_accuracy(model, tokenizer, records: Sequence[dict], which: str = "rewrite") -> float:
    """Fraction of prompts where the true object is more likely than the counterfactual
    (teacher-forced NLL, scored by :func:`editkit.metrics.score_targets`), on the rewrite
    prompts or the paraphrase prompts."""
    from ..metrics import score_targets
    from ..models import LanguageModel

    pairs_true, pairs_new = [], []
    for r in records:
        rw = r["requested_rewrite"]
        ps = [rw["prompt"].format(rw["subject"])] if which == "rewrite" else list(r["paraphrase_prompts"])
        pairs_true += [(p, rw["target_true"]["str"]) for p in ps]
        pairs_new += [(p, rw["target_new"]["str"]) for p in ps]
    side = tokenizer.padding_side
    try:
        lm = LanguageModel(model=model, tokenizer=tokenizer, name="world")
        nll = score_targets(lm, pairs_true + pairs_new, batch_size=256, progress=False).nll
    finally:
        tokenizer.padding_side = side
    n = len(pairs_true)
    return float((nll[:n] < nll[n:]).mean())  # the true object is the more likely one


def save_world(world: World, path: Path) -> None:
    """Write the world's records and corpus (original CounterFact schema) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "counterfact.json").write_text(json.dumps(world.records))
    (path / "train.txt").write_text("\n".join(world.train) + "\n")
    (path / "heldout.txt").write_text("\n".join(world.heldout) + "\n")


def build_checkpoint(path: Path, world_cfg: WorldConfig, train_cfg: TrainConfig, progress: bool = True,
                     desc: str | None = None) -> Path:
    """Generate the world, train the model and write everything to ``path``
    atomically (a temporary directory beside it, renamed at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    world = generate_world(world_cfg)
    model, tokenizer, report = train_model(world, train_cfg, progress=progress, desc=desc)
    pool = [r for r in world.records]
    report["accuracy_rewrite"] = fact_accuracy(model, tokenizer, pool)
    report["accuracy_paraphrase"] = fact_accuracy(model, tokenizer, pool, which="paraphrase")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_world(world, tmp)
        (tmp / "world.json").write_text(json.dumps(
            {"world": world_cfg.to_dict(), "train": train_cfg.to_dict(), "report": report}, indent=1))
        if path.exists():  # a concurrent build finished first, or a forced rebuild
            old = path.with_name(f".{path.name}-old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s in %.0fs: %s", path, report["train_seconds"], report)
    return path
