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
CPU the requests go through in chunks of 32 (``ValueConfig.v_batch_size``), which is
faster there than one huge padded batch; set ``v_batch_size`` to force another size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .hooks import add_at_positions, capture_output, no_param_grads
from .models import LanguageModel
from .requests import EditRequest, tokenize_spans

log = logging.getLogger(__name__)

__all__ = ["ValueConfig", "ValueResult", "optimize_values"]


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
    # caches and get slower per request (measured in benchmarks/), all of them on an accelerator.
    v_batch_size: int | None = None


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


def _build(lm: LanguageModel, requests: Sequence[EditRequest], prefixes: Sequence[str], essence: str):
    """One padded batch: for each request, its prefixed rewrite prompts + target,
    then one essence prompt. Returns the batch and row bookkeeping."""
    texts, spans, owner, kind = [], [], [], []
    for i, r in enumerate(requests):
        s0, s1 = r.subject_span
        for p in prefixes:
            text = p + r.text
            t0 = len(text) + 1
            texts.append(f"{text} {r.target_new}")
            spans.append([(len(p) + s0, len(p) + s1), (t0, t0 + len(r.target_new))])
            owner.append(i)
            kind.append(0)
    for i, r in enumerate(requests):
        s0 = essence.index("{}")
        texts.append(essence.format(r.subject))
        spans.append([(s0, s0 + len(r.subject))])
        owner.append(i)
        kind.append(1)
    batch = tokenize_spans(lm.tokenizer, texts, spans)
    # Flat index of every target token of the rewrite rows: (row, position that predicts it, token id).
    t_row, t_pos = [], []
    for row, k in enumerate(kind):
        if k == 0:
            t_row += [row] * len(batch.spans[row][1])
            t_pos += [t - 1 for t in batch.spans[row][1]]
    t_row, t_pos = torch.tensor(t_row), torch.tensor(t_pos)
    t_ids = batch.input_ids[t_row, t_pos + 1]
    ess_rows = torch.nonzero(torch.tensor(kind) == 1).flatten()
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


def _concat(parts: list[ValueResult]) -> ValueResult:
    """One result from the results of consecutive chunks of requests (history: summed per step)."""
    n = max(len(p.history) for p in parts)
    history = [sum(p.history[i] for p in parts if i < len(p.history)) for i in range(n)]
    return ValueResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("delta", "h", "nll_init", "nll_final", "steps")), history=history)


def optimize_values(lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                    prefixes: Sequence[str] = ("",), cfg: ValueConfig | None = None,
                    progress: bool = False) -> ValueResult:
    """Optimize one δ per request at ``layer`` (batched; see module docstring).

    Requests that reach ``stop_nll`` are frozen; once half of the batch is frozen it
    is re-padded with the active requests only, so a large edit costs what its
    slowest requests need rather than ``E × v_steps`` rows."""
    from tqdm.auto import tqdm

    cfg = cfg or ValueConfig()
    E, P = len(requests), len(prefixes)
    chunk = cfg.v_batch_size or (32 if lm.device.type == "cpu" else E)
    if E > chunk:  # requests are independent: chunks give the same δ as one batch
        parts = [optimize_values(lm, requests[i:i + chunk], layer, prefixes, cfg, progress)
                 for i in range(0, E, chunk)]
        return _concat(parts)
    module, block = lm.edit_module(layer), lm.block(layer)
    d = lm.d_out(layer)
    dev = module.weight.device
    unembed = lm.model.get_output_embeddings()
    base = lm.model.base_model  # the transformer without its LM head; its output is after the final norm

    def prepare(idx: torch.Tensor):
        """The padded batch of requests ``idx``; ``owner`` maps each row to its request (global index)."""
        batch, owner, targets = _build(lm, [requests[i] for i in idx.tolist()], prefixes, cfg.essence_template)
        cols = torch.tensor([s[0][-1] for s in batch.spans])  # subject's last token in every row
        return batch.to(lm.device), idx[owner].to(dev), targets, torch.arange(len(owner)), cols

    def forward(batch):
        return base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state

    def terms(hidden, targets, n: int):
        """Per-request NLL of target_new (mean over prefixes) and essence log-probs."""
        nll_rows, ess = _per_row_terms(hidden, unembed, targets, n * P)
        return nll_rows.view(n, P).mean(1).to(dev), ess.to(dev)

    # Clean pass: h (un-prefixed rewrite row = prefix 0), the essence distribution P0, initial NLL.
    idx = torch.arange(E)
    batch, owner, targets, rows, cols = prepare(idx)
    with torch.no_grad(), capture_output(block) as seen:
        hidden = forward(batch)
    h = seen[0][rows.to(seen[0].device), cols.to(seen[0].device)].float()
    h = h[torch.arange(E) * P].to(dev)  # rows of prefix 0 (""), one per request
    nll0, logp0 = terms(hidden, targets, E)
    nll_init, logp0 = nll0.detach().cpu(), logp0.detach()

    delta = torch.zeros(E, d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    h_norm = h.norm(dim=1)
    max_norm = cfg.clamp_norm_factor * h_norm
    active = torch.ones(E, dtype=torch.bool)
    steps = torch.zeros(E, dtype=torch.long)
    nll_req = nll_init.clone()
    history: list[float] = []
    bar = tqdm(total=cfg.v_steps, desc=f"values ({E} requests)", disable=not progress, leave=False)
    step = 0
    with no_param_grads(lm.model):
        while step < cfg.v_steps and active.any():
            if len(idx) > int(active.sum()):  # re-pad with the requests still optimizing
                idx = torch.nonzero(active).flatten()
                batch, owner, targets, rows, cols = prepare(idx)
            n = len(idx)
            with add_at_positions(module, rows, cols, lambda: delta[owner]):
                while step < cfg.v_steps:
                    nll_t, ess = terms(forward(batch), targets, n)
                    nll_req[idx] = nll_t.detach().cpu()
                    # Requests that already reach the wanted probability stop here, as they would alone.
                    live = active[idx] & (nll_req[idx] >= cfg.stop_nll)
                    active[idx] = live
                    if not live.any():
                        break
                    kl = (logp0[idx].exp() * (logp0[idx] - ess)).sum(-1)  # KL(P0 ‖ Pδ), one per request
                    decay = cfg.v_weight_decay * delta[idx].norm(dim=1) ** 2 / h_norm[idx] ** 2
                    loss = (nll_t + cfg.kl_factor * kl + decay)[live.to(dev)].sum()
                    history.append(loss.item())
                    bar.set_postfix(loss=f"{loss.item():.3f}", active=int(live.sum()))
                    opt.zero_grad()
                    loss.backward()
                    frozen = delta.detach().clone()
                    opt.step()
                    with torch.no_grad():
                        done = ~active.to(dev)
                        delta[done] = frozen[done]
                        norms = delta.norm(dim=1)
                        scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                        delta.mul_(scale[:, None])
                    steps += active.long()
                    step += 1
                    bar.update(1)
                    if 2 * int(live.sum()) <= n:
                        break  # half the batch is frozen: re-pad
        if active.any():  # out of steps: measure the NLL the final δ reaches
            idx = torch.nonzero(active).flatten()
            batch, owner, targets, rows, cols = prepare(idx)
            with torch.no_grad(), add_at_positions(module, rows, cols, lambda: delta[owner]):
                nll_req[idx] = terms(forward(batch), targets, len(idx))[0].cpu()
    bar.close()
    return ValueResult(delta=delta.detach().float(), h=h.detach(), nll_init=nll_init, nll_final=nll_req,
                       steps=steps, history=history)
