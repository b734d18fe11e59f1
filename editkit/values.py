"""Values: the hidden-state change ``δ`` that makes the model emit the new object.

For each request, ``δ`` is added to the residual stream (the edited MLP's output)
of layer ``L`` at the subject's last token and optimized with Adam on

    L(δ) = NLL of target_new over the prefixed prompts
         + κ · KL(P(·|"{s} is a") ‖ P_δ(·|"{s} is a"))      (essence drift)
         + β · ‖δ‖² / ‖h‖²                                    (decay)

with ``‖δ‖ ≤ c‖h‖`` enforced after each step. The E requests are independent, so
they are optimized together: one padded forward/backward per step over all
requests' prompts, one δ row per request, and a loss that is the *sum* of the
per-request losses, so each row's gradient is exactly its own request's gradient
(Adam is element-wise, so the trajectory equals optimizing that request alone).
A request that reaches ``stop_nll`` is frozen from then on, as it would have
stopped alone, and dropped from the padded batch once half of it is frozen. On a
CPU the requests go through in chunks sized to the model's width (:func:`value_chunk`):
a padded batch's activations outgrow the caches as it grows, while on a narrow model a
small batch pays the call overhead it was meant to spread. Set ``v_batch_size`` to force
another size.

δ enters at the subject's last token, so no position before it can change: those
positions (the context prefix and the subject's first tokens, about two thirds of
every prompt) run once, and each step recomputes only the *tail* from the subject's
last token on, attending to the cached keys/values of the rest
(``ValueConfig.cache_prefix``; the same δ as recomputing everything, to float rounding).
Below layer L no position can change either: the tail's states there are computed by
the first forward of a padded batch, and every later step starts at block L
(:data:`REUSE_LOWER`). Where the edited block ends ``residual + mlp(norm(residual))``
(``Adapter.mlp_norm``), block L itself is not recomputed either: its output is the first
forward's, with the subject's last token set to ``residual + (mlp + δ)``, the very sum the
block computes. Both give the same δ bit for bit (the same floats in the same operations).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .hooks import add_at_positions, capture_input, capture_output, no_param_grads, skipped_blocks
from .protocols import conventions
from .models import LanguageModel
from .requests import EditRequest, tokenize_spans, with_target

log = logging.getLogger(__name__)

__all__ = ["ValueConfig", "ValueResult", "ValueBatch", "optimize_values", "memoized_values", "VALUE_MEMO_SIZE",
           "value_store_dir"]


@dataclass
class ValueConfig:
    """Hyperparameters of the δ optimization (names follow the ROME/MEMIT papers)."""

    v_lr: float = 0.5
    v_steps: int = 25
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_nll: float = 0.05
    essence_template: str = "{} is a"
    # Requests per padded batch. None: 32 on a CPU, where bigger batches spill out of the
    # caches and get slower per request (measured in benchmarks/), 64 on an accelerator, where
    # the activations of a whole 4096-fact edit of Llama-3-8B would need ~450 GiB (the README's
    # memory budget; 64 fits 40 GB). Chunks give the same δ: requests are independent.
    v_batch_size: int | None = None
    # Run the positions before the subject's last token once and reuse their keys/values.
    cache_prefix: bool = True
    # The protocol of the loss conventions, "editkit" or "reference" (or a protocols.Conventions); an
    # editor sets it from its own ``protocol``. See editkit.protocols and the protocol table in docs/protocols.md.
    conventions: Any = "editkit"
    # Where δ's reference vector h is read (its norm scales the clamp and the decay; v* = h + δ):
    # "block", the residual after the block (MEMIT, EMMET), or "mlp", the MLP output (the reference ROME).
    site: str = "block"


@dataclass
class ValueResult:
    delta: torch.Tensor  # (E, d) float32
    h: torch.Tensor  # (E, d) residual at layer L, subject's last token, un-prefixed prompt
    nll_init: torch.Tensor  # (E,)
    nll_final: torch.Tensor  # (E,)
    steps: torch.Tensor  # (E,) steps each request took
    history: list = field(default_factory=list)  # total loss per step

    @property
    def target(self) -> torch.Tensor:
        """``Z = h + δ``: the residual each request should have at layer L."""
        return self.h + self.delta


def _build(lm: LanguageModel, requests: Sequence[EditRequest], prefixes: Sequence[str], essence: str,
           kl_token: str = "prompt_last"):
    """One padded batch: for each request, its prefixed rewrite prompts + target,
    then one essence prompt. Returns the batch and row bookkeeping."""
    texts, spans, owner, kind = [], [], [], []
    for i, r in enumerate(requests):
        s0, s1 = r.subject_span
        for p in prefixes:
            text, target = with_target(p + r.text, r.target_new)
            texts.append(text)
            spans.append([(len(p) + s0, len(p) + s1), target])
            owner.append(i)
            kind.append(0)
    for i, r in enumerate(requests):
        s0 = essence.index("{}")
        texts.append(essence.format(r.subject))
        spans.append([(s0, s0 + len(r.subject))])
        owner.append(i)
        kind.append(1)
    batch = tokenize_spans(lm.tokenizer, texts, spans, max_positions=lm.max_positions)
    # Flat index of every target token of the rewrite rows: (row, position that predicts it, token id).
    t_row, t_pos = [], []
    for row, k in enumerate(kind):
        if k == 0:
            t_row += [row] * len(batch.spans[row][1])
            t_pos += [t - 1 for t in batch.spans[row][1]]
    t_row, t_pos = torch.tensor(t_row), torch.tensor(t_pos)
    t_ids = batch.input_ids[t_row, t_pos + 1]
    ess_rows = torch.nonzero(torch.tensor(kind) == 1).flatten()
    if kl_token == "subject_last":  # the reference reads "{s} is a" at the subject's last token
        ess_pos = torch.tensor([batch.spans[r][0][-1] for r in ess_rows.tolist()], dtype=torch.long)
    else:  # at the prompt's last token, which predicts the object
        ess_pos = batch.attention_mask.sum(1)[ess_rows] - 1
    targets = (t_row, t_pos, t_ids, ess_rows, ess_pos)
    return batch, torch.tensor(owner), targets


def _per_row_terms(hidden: torch.Tensor, unembed: torch.nn.Module, targets, n_rewrite: int):
    """Mean target NLL of each rewrite row, and last-token log-probs of essence rows.

    Only the positions the loss needs go through the unembedding and log-softmax:
    the vocabulary can be 128k while a handful of positions per prompt matter."""
    t_row, t_pos, t_ids, ess_rows, ess_pos = (t.to(hidden.device) for t in targets)
    logits = unembed(hidden[torch.cat([t_row, ess_rows]), torch.cat([t_pos, ess_pos])]).float()
    n_tok = len(t_row)
    tok_logp = logits[:n_tok].log_softmax(-1).gather(1, t_ids[:, None]).squeeze(1)
    nll = torch.zeros(n_rewrite, device=hidden.device).index_add(0, t_row, -tok_logp)
    count = torch.zeros(n_rewrite, device=hidden.device).index_add(0, t_row, torch.ones_like(tok_logp))
    ess = logits[n_tok:].log_softmax(-1)
    return nll / count, ess


@dataclass
class _Rows:
    """One padded batch of rows cut at ``cut`` (per row). Positions before the cut cannot
    see δ: they ran once and left their keys/values in ``kv``; the ``tail`` runs every step."""

    tail: torch.Tensor  # (R, Ct) token ids from the cut on, right-padded
    mask: torch.Tensor  # (R, Cp + Ct) attention mask over the cached prefix and the tail
    tail_pos: torch.Tensor  # (R, Ct) position ids of the tail tokens
    kv: list | None  # per layer (keys, values) of the prefix, or None (nothing cached)
    col: torch.Tensor  # (R,) the subject's last token, in tail coordinates
    owner: torch.Tensor  # (R,) the request (global index) of each row
    targets: tuple  # loss positions in tail coordinates (see _build)
    below: Any = None  # the tail's output of the block under the edited one (first forward), or None
    top: tuple | None = None  # (output of block L without δ, its residual and MLP output at ``col``), or None


#: Run the blocks under the edited layer once per padded batch (see the module docstring).
#: Exact, so always on; a switch only for measuring what it saves (benchmarks/profile_edit.py).
REUSE_LOWER = True


#: Prefix slots are a multiple of this: a request's cached keys then sit in the same slots
#: whether it runs alone or in a batch (prefixes up to 32 tokens), so its attention sums round
#: alike (its δ alone and in a batch agree to rounding; see memoized_values), and there are
#: fewer distinct shapes.
_ALIGN = 32


def _cut(batch, cut: torch.Tensor, pad_id: int):
    """Split every right-padded row at ``cut`` into a left-padded prefix and a right-padded
    tail; position ids count real tokens only, so every token keeps its position."""
    ids, am = batch.input_ids, batch.attention_mask
    n = am.sum(1)
    R, Cp, Ct = len(ids), -(-int(cut.max()) // _ALIGN) * _ALIGN, int((n - cut).max())
    pre, tail = ids.new_full((R, Cp), pad_id), ids.new_full((R, Ct), pad_id)
    pre_m, tail_m = am.new_zeros((R, Cp)), am.new_zeros((R, Ct))
    for r, (c, m) in enumerate(zip(cut.tolist(), n.tolist())):
        pre[r, Cp - c:], pre_m[r, Cp - c:] = ids[r, :c], 1
        tail[r, :m - c], tail_m[r, :m - c] = ids[r, c:m], 1
    mask = torch.cat([pre_m, tail_m], 1)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return (pre, pre_m, pos[:, :Cp]), (tail, mask, pos[:, Cp:])


def _prefix_kv(base: torch.nn.Module, pre, pre_m, pre_pos, n_layers: int) -> list | None:
    """Keys/values of the prefix at every layer (padding zeroed, so no stray NaN can leak
    through a zero attention weight), or None when the model's cache does not hold them
    whole (sliding windows, shared or unusual layouts): then nothing is cached."""
    if pre.shape[1] == 0:
        return None
    with torch.no_grad():
        out = base(input_ids=pre, attention_mask=pre_m, position_ids=pre_pos, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    layers = getattr(cache, "layers", None)
    kv = ([(layer.keys, layer.values) for layer in layers] if layers is not None
          else list(zip(getattr(cache, "key_cache", []), getattr(cache, "value_cache", []))))
    if len(kv) != n_layers or any(k is None or k.dim() != 4 or k.shape[-2] != pre.shape[1] for k, _ in kv):
        log.debug("prefix keys/values not cacheable for this model; recomputing whole prompts")
        return None
    keep = pre_m.bool()[:, None, :, None]
    return [(torch.where(keep.to(k.device), k, 0.0), torch.where(keep.to(v.device), v, 0.0)) for k, v in kv]


def _cache_kwargs(base: torch.nn.Module) -> Callable[[list | None], dict]:
    """A function from prefix keys/values to forward kwargs that hand the model a fresh cache
    holding them (the forward appends the tail's, so each step needs its own). transformers 5
    names the argument ``cache``, earlier versions ``past_key_values``; looked up once."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def kwargs(kv: list | None) -> dict:
        if not kv:
            return {"use_cache": False}
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return {name: cache, "use_cache": True}

    return kwargs


#: The per-request fields of a :class:`ValueResult` (one row per request), in constructor order.
_ROW_FIELDS = ("delta", "h", "nll_init", "nll_final", "steps")


def _concat(parts: list[ValueResult]) -> ValueResult:
    """One result from the results of consecutive chunks of requests (history: summed per step)."""
    n = max(len(p.history) for p in parts)
    history = [sum(p.history[i] for p in parts if i < len(p.history)) for i in range(n)]
    return ValueResult(*(torch.cat([getattr(p, f) for p in parts]) for f in _ROW_FIELDS), history=history)


class ValueBatch:
    """The δ optimization of one chunk of requests: the state it carries from step to
    step, and the step itself.

    ``rows`` is the padded batch of the requests still optimizing (``idx``); ``repad()``
    rebuilds it once half of them are frozen. ``step()`` is :meth:`objective` (forward,
    freeze, loss) then :meth:`update` (backward, Adam, clamp). Each convention of the
    loss is one line: the terms in :meth:`loss` (KL direction, the decay's power of
    ‖δ‖), the stopping rule in :meth:`objective`, the KL position in ``_build``'s
    essence rows, and the number of updates in ``optimize_values``' loop."""

    def __init__(self, lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                 prefixes: Sequence[str], cfg: ValueConfig) -> None:
        self.lm, self.requests, self.prefixes, self.cfg = lm, requests, prefixes, cfg
        self.conv = conventions(cfg.conventions)
        if cfg.site not in ("block", "mlp"):
            raise ValueError(f"ValueConfig.site={cfg.site!r}: choose 'block' or 'mlp'")
        self.module, self.block = lm.edit_module(layer), lm.block(layer)
        self.lower = [lm.block(i) for i in range(layer)] if REUSE_LOWER else []  # blocks δ cannot reach
        # The norm in front of block L's MLP: its input is the residual that the MLP output is added to.
        norm = lm.adapter.mlp_norm
        self.mlp_norm = lm.module(norm.format(layer)) if REUSE_LOWER and norm else None
        self.dev = self.module.weight.device
        self.unembed = lm.model.get_output_embeddings()
        self.base = lm.model.base_model  # the transformer without its LM head; its output is after the final norm
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.cache_kwargs = _cache_kwargs(self.base)
        self.caching = cfg.cache_prefix  # turned off for good once the model's cache turns out unusable
        E, P = len(requests), len(prefixes)

        # Clean pass: h (un-prefixed rewrite row = prefix 0), the essence distribution P0, initial NLL.
        self.idx = torch.arange(E)
        self.rows = self.prepare(self.idx)
        with torch.no_grad(), capture_output(self.block if cfg.site == "block" else self.module) as seen:
            hidden = self.forward()
        h = seen[0][torch.arange(len(self.rows.col), device=seen[0].device), self.rows.col.to(seen[0].device)].float()
        self.h = h[torch.arange(E) * P].to(self.dev)  # rows of prefix 0 (""), one per request
        nll0, logp0 = self.terms(hidden)
        self.nll_init, self.logp0 = nll0.detach().cpu(), logp0.detach()

        self.delta = torch.zeros(E, lm.d_out(layer), device=self.dev, requires_grad=True)
        self.opt = torch.optim.Adam([self.delta], lr=cfg.v_lr)
        self.h_norm = self.h.norm(dim=1)
        self.max_norm = cfg.clamp_norm_factor * self.h_norm
        self.active = torch.ones(E, dtype=torch.bool)  # requests still optimizing
        self.steps = torch.zeros(E, dtype=torch.long)  # steps each request took
        self.nll = self.nll_init.clone()  # latest NLL of target_new per request
        self.history: list[float] = []  # total loss per step
        self.n_steps = 0
        self.needs_repad = False

    # --- the padded rows ----------------------------------------------------
    def prepare(self, idx: torch.Tensor) -> _Rows:
        """The padded rows of requests ``idx``, cut at the subject's last token (when caching)."""
        lm = self.lm
        batch, owner, targets = _build(lm, [self.requests[i] for i in idx.tolist()], self.prefixes,
                                       self.cfg.essence_template, self.conv.kl_token)
        cols = torch.tensor([s[0][-1] for s in batch.spans])  # subject's last token in every row
        cut = cols if self.caching else torch.zeros_like(cols)
        (pre, pre_m, pre_pos), tail = _cut(batch, cut, self.pad_id)
        kv = _prefix_kv(self.base, pre.to(lm.device), pre_m.to(lm.device), pre_pos.to(lm.device), lm.n_layers)
        if kv is None and cut.any():  # the model cannot reuse them: recompute whole prompts, now and later
            self.caching = False
            cut = torch.zeros_like(cols)
            tail = _cut(batch, cut, self.pad_id)[1]
        t_row, t_pos, t_ids, ess_rows, ess_pos = targets
        targets = (t_row, t_pos - cut[t_row], t_ids, ess_rows, ess_pos - cut[ess_rows])
        tail_ids, mask, tail_pos = (t.to(lm.device) for t in tail)
        return _Rows(tail_ids, mask, tail_pos, kv, cols - cut, idx[owner].to(self.dev), targets)

    def repad(self) -> None:
        """Rebuild the padded batch with the requests still optimizing."""
        self.idx = torch.nonzero(self.active).flatten()
        self.rows = self.prepare(self.idx)
        self.needs_repad = False

    # --- one step -----------------------------------------------------------
    def forward(self, with_delta: bool = False) -> torch.Tensor:
        """The final hidden states of the tail (δ added when ``with_delta``). The blocks under
        the edited layer, and the edited block itself where its MLP output is simply added to
        the residual, run on the first forward of these rows only; later ones start above them."""
        r = self.rows

        def run() -> torch.Tensor:
            return self.base(input_ids=r.tail, attention_mask=r.mask, position_ids=r.tail_pos,
                             **self.cache_kwargs(r.kv)).last_hidden_state

        if r.top is not None:
            with skipped_blocks(self.lower + [self.block], self.block_output(with_delta)):
                return run()
        if r.below is not None:
            with skipped_blocks(self.lower, r.below), self.adding_delta() if with_delta else contextlib.nullcontext():
                return run()
        if not self.lower and self.mlp_norm is None:
            with self.adding_delta() if with_delta else contextlib.nullcontext():
                return run()
        return self.first_forward(run, with_delta)

    def first_forward(self, run: Callable[[], torch.Tensor], with_delta: bool) -> torch.Tensor:
        """The whole forward, keeping what later steps reuse: the output of the block under L, and
        block L's output with the residual and the MLP output (before δ) at the subject's last token."""
        r = self.rows
        at = (torch.arange(len(r.col), device=self.dev), r.col.to(self.dev))
        with contextlib.ExitStack() as st:
            below = st.enter_context(capture_output(self.lower[-1], raw=True)) if self.lower else None
            if self.mlp_norm is not None:
                resid = st.enter_context(capture_input(self.mlp_norm))
                mlp = st.enter_context(capture_output(self.module))  # registered before δ's hook: sees it without δ
                out = st.enter_context(capture_output(self.block, raw=True))
            if with_delta:
                st.enter_context(self.adding_delta())
            hidden = run()
        if below:
            r.below = _kept(below[-1])
            if r.below is None:  # a block that returns more than its hidden states: run them all from now on
                self.lower = []
        if self.mlp_norm is not None and out and _kept(out[-1]) is not None:
            top = (_kept(out[-1]), resid[-1][at].detach().clone(), mlp[-1][at].detach().clone())
            h = top[0][0] if isinstance(top[0], tuple) else top[0]
            d = self.delta[r.owner].detach().to(h.dtype) if with_delta else 0.0
            if torch.equal(h[at], top[1] + (top[2] + d)):  # the block is residual + MLP output: reuse it
                r.top = top
            else:
                log.debug("block %s does not end residual + MLP output; recomputing it every step", self.block)
                self.mlp_norm = None
        return hidden

    def block_output(self, with_delta: bool) -> Any:
        """Block L's output from the first forward, at the subject's last token ``residual + (mlp + δ)``."""
        r = self.rows
        out, resid, mlp = r.top
        h = out[0] if isinstance(out, tuple) else out
        at = (torch.arange(len(r.col), device=h.device), r.col.to(h.device))
        col = resid + (mlp + self.delta[r.owner].to(h.dtype)) if with_delta else resid + mlp
        h = h.index_put(at, col)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def adding_delta(self):
        r = self.rows
        return add_at_positions(self.module, torch.arange(len(r.col)), r.col, lambda: self.delta[r.owner])

    def terms(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request NLL of target_new (mean over prefixes) and essence log-probs of the rows."""
        n, P = len(self.idx), len(self.prefixes)
        nll_rows, ess = _per_row_terms(hidden, self.unembed, self.rows.targets, n * P)
        return nll_rows.view(n, P).mean(1).to(self.dev), ess.to(self.dev)

    def loss(self, nll: torch.Tensor, ess: torch.Tensor) -> torch.Tensor:
        """The loss of each request in ``idx``: NLL + κ·KL + β·decay, the KL and the decay as the
        protocol says: KL(P0 ‖ Pδ) and ‖δ‖²/‖h‖² (editkit), KL(Pδ ‖ P0) and ‖δ‖/‖h‖² (reference)."""
        idx, cfg, conv = self.idx, self.cfg, self.conv
        if conv.kl == "edited_first":
            kl = (ess.exp() * (ess - self.logp0[idx])).sum(-1)  # KL(Pδ ‖ P0), one per request
        else:
            kl = (self.logp0[idx].exp() * (self.logp0[idx] - ess)).sum(-1)  # KL(P0 ‖ Pδ)
        norm = self.delta[idx].norm(dim=1) if conv.decay == "norm" else self.delta[idx].norm(dim=1) ** 2
        return nll + cfg.kl_factor * kl + cfg.v_weight_decay * norm / self.h_norm[idx] ** 2

    def step(self) -> None:
        """One optimization step: score and freeze (:meth:`objective`), then update δ (:meth:`update`)."""
        loss = self.objective()
        if loss is not None:
            self.update(loss)

    def objective(self) -> torch.Tensor | None:
        """Forward with δ; freeze the requests that reached ``stop_nll``; the summed loss of
        the others (None when every request is frozen)."""
        idx = self.idx
        nll, ess = self.terms(self.forward(with_delta=True))
        self.nll[idx] = nll.detach().cpu()
        each = self.loss(nll, ess)
        # Requests that already reach the threshold stop here, as they would alone: on their total
        # loss (reference) or on their NLL (editkit).
        score = each.detach().cpu() if self.conv.stop == "total" else self.nll[idx]
        live = self.active[idx] & (score >= self.cfg.stop_nll)
        self.active[idx] = live
        if not live.any():
            return None
        loss = each[live.to(self.dev)].sum()
        self.history.append(loss.item())
        return loss

    def update(self, loss: torch.Tensor) -> None:
        """Backward, one Adam step, frozen rows put back, then ``‖δ‖ ≤ c‖h‖`` per request."""
        self.opt.zero_grad()
        loss.backward()
        frozen = self.delta.detach().clone()
        self.opt.step()
        with torch.no_grad():
            done = ~self.active.to(self.dev)
            self.delta[done] = frozen[done]
            norms = self.delta.norm(dim=1)
            scale = torch.where(norms > self.max_norm, self.max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
            self.delta.mul_(scale[:, None])
        self.steps += self.active.long()
        self.n_steps += 1
        live = int(self.active[self.idx].sum())
        self.needs_repad = 2 * live <= len(self.idx)  # half the batch is frozen: re-pad before the next step

    def measure(self) -> None:
        """The NLL the current δ reaches for the requests still active (after the last step)."""
        if self.active.any():
            if not torch.equal(torch.nonzero(self.active).flatten(), self.idx):  # the same rows: keep their states
                self.repad()
            with torch.no_grad():
                self.nll[self.idx] = self.terms(self.forward(with_delta=True))[0].cpu()

    def result(self) -> ValueResult:
        return ValueResult(delta=self.delta.detach().float(), h=self.h.detach(), nll_init=self.nll_init,
                           nll_final=self.nll, steps=self.steps, history=self.history)


def _kept(out: Any) -> Any:
    """A block's output kept for later steps (a tensor, or a 1-tuple from older transformers), or
    None for an output that holds more than the hidden states."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple) and len(out) == 1:
        return (out[0].detach().clone(),)
    return None


#: On a CPU, requests per padded batch × the residual width: the chunk holds about this many
#: activations per token position (the chunk is clamped to 8...32 requests).
CPU_CHUNK_WIDTH = 2048


def value_chunk(cfg: "ValueConfig", device_type: str, width: int) -> int:
    """Requests per padded batch: ``cfg.v_batch_size``, else 64 on an accelerator (memory-sized)
    and on a CPU ``CPU_CHUNK_WIDTH // width`` clamped to 8...32 (cache-sized; ``width`` is the
    residual width). Why (``benchmarks/value_chunk.py``, one thread, per request): a chunk of 32
    costs 1.07-1.10x a chunk of 8 on SmolLM2-135M (width 576) and 1.04-1.13x a chunk of 16 on
    world-gpt2 (width 128), since wide padded batches fall out of the cache; 8 and 16 are equal
    within the run-to-run noise, so the narrow model takes the larger chunk (fewer calls)."""
    if cfg.v_batch_size:
        return cfg.v_batch_size
    if device_type != "cpu":
        return 64
    return max(8, min(32, CPU_CHUNK_WIDTH // max(int(width), 1)))


def optimize_values(lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                    prefixes: Sequence[str] = ("",), cfg: ValueConfig | None = None,
                    progress: bool = False) -> ValueResult:
    """Optimize one δ per request at ``layer`` (batched; see module docstring).

    Requests that reach ``stop_nll`` are frozen; once half of the batch is frozen it
    is re-padded with the active requests only, so a large edit costs what its
    slowest requests need rather than ``E × v_steps`` rows."""
    from .progress import tqdm

    cfg = cfg or ValueConfig()
    E = len(requests)
    chunk = value_chunk(cfg, lm.device.type, lm.d_out(layer))
    if E > chunk:  # requests are independent: chunks give the same δ as one batch
        parts = [optimize_values(lm, requests[i:i + chunk], layer, prefixes, cfg, progress)
                 for i in range(0, E, chunk)]
        return _concat(parts)
    state = ValueBatch(lm, requests, layer, prefixes, cfg)
    # "N steps": the reference's loop evaluates N times and updates after all but the last.
    n_updates = cfg.v_steps - 1 if state.conv.updates == "steps_minus_one" else cfg.v_steps
    bar = tqdm(total=n_updates, desc=f"values ({E} requests)", disable=not progress, leave=False)
    with no_param_grads(lm.model):
        while state.n_steps < n_updates and state.active.any():
            if state.needs_repad:
                state.repad()
            state.step()
            if state.history and state.n_steps > bar.n:
                bar.set_postfix(loss=f"{state.history[-1]:.3f}", active=int(state.active.sum()))
                bar.update(1)
        state.measure()  # out of steps: the NLL the final δ reaches
    bar.close()
    return state.result()


#: Requests whose values one model keeps (``lm.cache``; rows on the CPU, oldest dropped first).
VALUE_MEMO_SIZE = 8192


def memoized_values(lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                    prefixes: Sequence[str] = ("",), cfg: ValueConfig | None = None,
                    progress: bool = False) -> ValueResult:
    """:func:`optimize_values` through a memo on ``lm``, so a batch sweep or a λ sweep optimizes
    each request's δ once instead of once per batch size and λ.

    Exact up to float rounding: a request's δ depends only on the request, the model's
    current weights, the layer, the prefixes and ``cfg`` — requests are independent — and the
    key holds all of them, the weights as ``lm.fingerprint()``, so a model changed by an
    earlier edit (a sequence of batches) never reuses a value of the model before it. Alone or
    in a batch, a request's δ is the same up to rounding, not always bit for bit: padded
    batches of other shapes run matmuls that may round the last bits differently, even on one
    thread, and a request whose optimization passes a sharp drop of its loss carries that
    further (measured on world-gpt2, MEMIT preset, 64 facts, one thread: up to 6.4e-4 relative
    on one request's δ, 8e-5 on ΔW). The memo returns the δ of the first batch the request was
    optimized in. ``history`` covers the requests optimized by this call; ``lm.cache.pop("_values_memo")``
    empties the memo."""
    from collections import OrderedDict

    cfg = cfg or ValueConfig()
    memo: OrderedDict = lm.cache.setdefault("_values_memo", OrderedDict())
    base = (lm.fingerprint(), layer, tuple(prefixes), repr(cfg))
    keys = [base + (repr(r),) for r in requests]
    disk = value_store_dir(lm)
    if disk is not None:
        for k in keys:
            if k not in memo and (row := _read_row(disk, k)) is not None:
                memo[k] = row
    todo = list(dict.fromkeys(k for k in keys if k not in memo))  # unique, in order
    history: list = []
    if todo:
        index = {k: i for i, k in enumerate(keys)}
        # with a disk memo, one padded chunk at a time, each written as it finishes: an
        # interrupted pass keeps its finished chunks (chunks give the same δ: requests are independent)
        step = len(todo) if disk is None else value_chunk(cfg, lm.device.type, lm.d_out(layer))
        for c in range(0, len(todo), step):
            part = todo[c:c + step]
            fresh = optimize_values(lm, [requests[index[k]] for k in part], layer, prefixes, cfg, progress)
            history += fresh.history
            for j, k in enumerate(part):
                memo[k] = tuple(getattr(fresh, f)[j].detach().cpu() for f in _ROW_FIELDS)
                if disk is not None:
                    _write_row(disk, k, memo[k])
    for k in keys:
        memo.move_to_end(k)
    rows = [memo[k] for k in keys]
    while len(memo) > VALUE_MEMO_SIZE:
        memo.popitem(last=False)
    return ValueResult(*(torch.stack([r[i] for r in rows]).to(lm.device) for i in range(len(_ROW_FIELDS))),
                       history=history)



# --- the memo on disk (opt-in) ------------------------------------------------------
# A long study (hundreds of facts on a real model, hours of CPU) may be cut off; its run
# store keeps the finished units, and this keeps the finished δ, so a resumed process — or
# the λ sweep of another notebook — never optimizes a request twice. One safetensors file per
# (weights, layer, prefixes, settings, request): the full key is stored inside the file and
# compared on load (as its sha256: the file holds no prompt text, so a study's values can be
# shared without its records), so a file from other weights or settings is never used.

def value_store_dir(lm: LanguageModel):
    """The folder of the on-disk values memo, or ``None`` (the default: memory only).

    Switched on per model with ``lm.cache["_values_dir"] = path`` or for a whole process with
    the environment variable ``EDITKIT_VALUES_DIR``."""
    import os
    from pathlib import Path

    where = lm.cache.get("_values_dir") or os.environ.get("EDITKIT_VALUES_DIR")
    return Path(where).expanduser() if where else None


def _key_sha(key: tuple) -> str:
    import hashlib

    return hashlib.sha256(repr(key).encode()).hexdigest()


def _row_file(disk, key: tuple):
    return disk / f"{_key_sha(key)[:40]}.safetensors"


def _read_row(disk, key: tuple) -> tuple | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = _row_file(disk, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("key_sha256")
        row = load_file(str(path))
        if stored != _key_sha(key) or set(row) != set(_ROW_FIELDS):
            raise ValueError("key or fields differ")
    except (OSError, ValueError, SafetensorError) as e:
        log.warning("values memo file %s is unreadable or not this request's (%s); optimizing again", path, e)
        return None
    return tuple(row[f] for f in _ROW_FIELDS)


def _write_row(disk, key: tuple, row: tuple) -> None:
    import os
    from safetensors.torch import save_file

    disk.mkdir(parents=True, exist_ok=True)
    path = _row_file(disk, key)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({f: t.contiguous().cpu() for f, t in zip(_ROW_FIELDS, row)}, str(tmp), metadata={"key_sha256": _key_sha(key)})
    os.replace(tmp, path)
