"""Hook points with restore guarantees.

Every forward hook and every weight change in editkit lives in one of these
context managers, so an exception inside the block (a keyboard interrupt during a
sweep, an OOM) always leaves the model exactly as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["capture_input", "capture_output", "add_at_positions", "restored_weights", "no_param_grads", "stop_after",
           "StopForward", "skipped_blocks"]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the (first positional) input of ``module`` on every call."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def capture_output(module: nn.Module, *, raw: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the output (hidden states for a block) of ``module`` on every call
    (with ``raw``, the output object itself: a block may return a tuple)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out if raw else _first(out)))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def add_at_positions(module: nn.Module, rows: torch.Tensor, cols: torch.Tensor,
                     delta: Callable[[], torch.Tensor] | torch.Tensor, *, replace: bool = False) -> Iterator[None]:
    """Add ``delta[i]`` to ``module``'s output at ``(rows[i], cols[i])`` (with
    ``replace``, write it there instead: causal tracing restores clean states so).

    ``delta`` may be a callable evaluated at forward time, so an optimizer can
    update the underlying parameter between calls.
    """

    def hook(m, args, out):
        d = delta() if callable(delta) else delta
        h = _first(out)
        idx = (rows.to(h.device), cols.to(h.device))
        d = d.to(device=h.device, dtype=h.dtype)
        h = h.index_put(idx, d if replace else h[idx] + d)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def restored_weights(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Snapshot the ``weight`` of each module and put it back, bit for bit, on exit."""
    saved = [m.weight.detach().clone() for m in modules]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for m, w in zip(modules, saved):
                m.weight.copy_(w)


@contextmanager
def no_param_grads(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter (values are optimized through
    the activations only), and put each flag back on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def skipped_blocks(blocks: list[nn.Module], output: Any) -> Iterator[None]:
    """Run the consecutive ``blocks`` (a model's first ones) as no-ops, the last returning
    ``output``: what they would compute is already known (an earlier forward of the same
    tokens, whose states there cannot change). The others hand their input on unchanged,
    in the form ``output`` has (a tensor, or a tuple for blocks that return one). Each
    block's own ``forward`` is back on exit; hooks on the blocks still run."""
    tupled = isinstance(output, tuple)

    def passthrough(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if tupled else hidden

    def last(*args, **kwargs):
        return output

    for b in blocks:
        b.forward = passthrough
    blocks[-1].forward = last
    try:
        yield
    finally:
        for b in blocks:
            vars(b).pop("forward", None)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed activation is captured."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward pass right after ``module`` runs (saves the layers above it)."""

    def hook(m, args, out):
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()
