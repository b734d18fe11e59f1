"""The cached-factor solve (push-through identity on a Cholesky factor of C0) against
the direct solve and against the equations themselves."""
from __future__ import annotations

import pytest
import torch

import editkit as ek
from editkit.solver import C0Factor, c0_checksum, least_squares_delta


def _system(d: int = 96, E: int = 12, d_out: int = 40, cond: float = 1e6, seed: int = 0):
    """C0 with a wide spectrum (condition number ≈ ``cond``), keys correlated with it."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    C0 = (Q * ev) @ Q.T
    C0 = (C0 + C0.T) / 2
    K = Q @ (ev.sqrt()[:, None] * torch.randn(d, E, generator=g, dtype=torch.float64)) + 0.01 * torch.randn(
        d, E, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, E, generator=g, dtype=torch.float64)
    return C0, K, R


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("E", [1, 12, 64])
@pytest.mark.parametrize("constraint, reg", [("least_squares", 0.5), ("least_squares", 1e4), ("equality", 0.0),
                                             ("equality", 0.1)])
def test_cached_factor_and_direct_give_the_same_delta(constraint, reg, E):
    C0, K, R = _system(E=E)
    F = C0Factor.of(C0)
    cached = ek.solve(K, R, F, constraint, reg)
    direct = ek.solve(K, R, C0, constraint, reg, path="direct")
    assert cached.path == "cached" and direct.path == "direct"
    assert _rel(cached.delta, direct.delta) < 1e-6
    assert torch.equal(ek.solve(K, R, C0, constraint, reg).delta, cached.delta)  # a tensor: factorized on the fly


def test_cached_least_squares_satisfies_the_normal_equations():
    """Δ(λC0 + KKᵀ) = R Kᵀ: the push-through solution is MEMIT's minimizer, not just close to the direct one."""
    C0, K, R = _system(E=20)
    lam = 3.0
    delta = ek.solve(K, R, C0Factor.of(C0), "least_squares", lam).delta
    lhs, rhs = delta @ (lam * C0 + K @ K.T), R @ K.T
    assert _rel(lhs, rhs) < 1e-8


def test_cached_equality_meets_every_constraint():
    C0, K, R = _system(E=30)
    delta = ek.solve(K, R, C0Factor.of(C0), "equality", 0.0).delta
    assert _rel(delta @ K, R) < 1e-8


def test_direct_least_squares_takes_E_right_hand_sides():
    """The direct path solves against K (E columns), giving the textbook R Kᵀ A⁻¹."""
    C0, K, R = _system(d=32, E=5, d_out=7, cond=1e3)
    lam = 2.0
    textbook = R @ K.T @ torch.linalg.inv(lam * C0 + K @ K.T)
    assert _rel(least_squares_delta(K, R, C0, lam).delta, textbook) < 1e-10


def test_factor_reuse_offload_and_errors(tmp_path):
    C0, K, R = _system(E=8)
    F = C0Factor.of(C0, checksum=True)
    assert F.checksum == c0_checksum(C0) and F.d_in == C0.shape[0]
    # a factor saved with its C0's checksum is found again only for that C0
    F.save(tmp_path / "f.safetensors")
    G = C0Factor.load(tmp_path / "f.safetensors", checksum=c0_checksum(C0))
    assert G is not None and torch.equal(G.L, F.L) and G.checksum == F.checksum
    C1 = C0.clone()
    C1[0, 0] += 1e-9
    assert C0Factor.load(tmp_path / "f.safetensors", checksum=c0_checksum(C1)) is None
    # the float32 factor (the offload option): same Δ to float32 accuracy, returned in its dtype
    lo = ek.solve(K, R, F.to(dtype=torch.float32), "least_squares", 10.0)
    hi = ek.solve(K, R, F, "least_squares", 10.0)
    assert lo.delta.dtype == torch.float32 and _rel(lo.delta.double(), hi.delta) < 1e-2
    with pytest.raises(ValueError, match="direct"):
        ek.solve(K, R, F, "least_squares", 1.0, path="direct")
    with pytest.raises(ValueError, match="path"):
        ek.solve(K, R, C0, "least_squares", 1.0, path="fast")
    # a per-layer product built once (the slot AlphaEdit's projector will use)
    calls = []
    P1 = F.derive("projector", lambda f: calls.append(1) or torch.eye(f.d_in, dtype=f.dtype))
    P2 = F.derive("projector", lambda f: calls.append(1) or torch.zeros(1))
    assert P1 is P2 and calls == [1]


def test_singular_c0_is_refused_with_the_ridge_hint():
    C0, K, R = _system(d=16, E=2, cond=10)
    C0[3, :] = C0[:, 3] = 0.0
    with pytest.raises(ek.SingularSystemError, match="c0_ridge"):
        C0Factor.of(C0)
    F = C0Factor.of(C0, ridge_eps=1e-6)
    assert torch.isfinite(ek.solve(K, R, F, "least_squares", 1.0).delta).all()


def test_factor_cached_beside_C0_and_verified_against_it(tmp_path, monkeypatch, caplog):
    """c0_factor stores L next to C0 (same key), reads it back, and refactorizes when the C0 it was made from
    has changed on disk."""
    from editkit.stats import c0_factor, load_cached_c0, save_cached_c0
    from editkit.testing import TINY_TEXT, tiny_lm

    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    lm = tiny_lm("llama", n_layer=2, d=16)
    F = c0_factor(lm, 1, TINY_TEXT[:40], None, ridge_eps=1e-6, progress=False)
    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert any(".chol-float64-r1e-06." in f for f in files)
    G = c0_factor(lm, 1, TINY_TEXT[:40], None, ridge_eps=1e-6, progress=False)
    assert torch.equal(F.L, G.L) and G.checksum == F.checksum
    c0_path = next(p for p in (tmp_path / "stats").iterdir() if p.suffix == ".safetensors" and ".chol-" not in p.name)
    C0, info = load_cached_c0(c0_path, lm.d_in(1))
    save_cached_c0(c0_path, 2 * C0, info)  # the cached C0 changed (validly) under the factor
    H = c0_factor(lm, 1, TINY_TEXT[:40], None, ridge_eps=1e-6, progress=False)
    torch.testing.assert_close(H.L, F.L * 2 ** 0.5)
    assert H.checksum != F.checksum


@pytest.mark.parametrize("method", ["ROME", "MEMIT", "EMMET"])
def test_cached_factor_editor_matches_the_direct_solve(method):
    """An editor solving on the cached C0 factor writes the same Δ as one factorizing every batch, and
    factorizes each layer's C0 once across sequential edits."""
    import dataclasses as dc

    from editkit import solver
    from editkit.testing import TINY_TEXT, tiny_lm

    torch.manual_seed(0)
    lm = tiny_lm("llama", n_layer=3, d=32)
    layers = [1] if method == "ROME" else [0, 1]
    C0s = {l: ek.second_moment(lm, l, TINY_TEXT, None, cache=False, progress=False) for l in layers}
    kw = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, c0_ridge=1e-6,
              values=ek.ValueConfig(v_steps=2, stop_nll=0.0))
    ed = {"ROME": lambda: ek.ROME(layer=1, **kw), "MEMIT": lambda: ek.MEMIT(layers=layers, **kw),
          "EMMET": lambda: ek.EMMET(layers=layers, **kw)}[method]()
    reqs = [ek.EditRequest("{} plays the", "Toko Yasuda", "guitar"), ek.EditRequest("{} was born in", "Apple A5", "Paris")]
    calls = []
    real_of = solver.C0Factor.of.__func__

    def counting_of(cls, *a, **k):
        calls.append(1)
        return real_of(cls, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solver.C0Factor, "of", classmethod(counting_of))
        with ed.applied(lm, reqs, stats=C0s, progress=False) as cached:
            d_cached = {l: d.clone() for l, d in cached.deltas.items()}
        with ed.applied(lm, reqs[:1], stats=C0s, progress=False):
            pass
    assert len(calls) == len(layers)  # once per layer, reused by the second edit
    direct = dc.replace(ed, solve_path="direct")
    with direct.applied(lm, reqs, stats=C0s, progress=False) as ref:
        for l in layers:
            assert ((d_cached[l] - ref.deltas[l]).norm() / ref.deltas[l].norm()).item() < 1e-4  # float32 weights
    with dc.replace(ed, offload_factor=True).applied(lm, reqs, stats=C0s, progress=False) as off:
        for l in layers:
            torch.testing.assert_close(off.deltas[l], d_cached[l])
    with pytest.raises(ValueError, match="solve_path"):
        dc.replace(ed, solve_path="fast").apply(lm, reqs, stats=C0s, progress=False)


def test_values_run_in_chunks_that_fit_a_gpu_by_default():
    """All 4096 values of a Llama-3-8B edit in one batch need ~450 GiB (README memory budget):
    an accelerator gets chunks of 64 unless v_batch_size says otherwise. A CPU gets chunks sized to
    the width (benchmarks/value_chunk.py, per request): 8 on SmolLM2-135M (width 576), cheaper there
    than 16 or the former fixed 32; 16 on world-gpt2 (width 128), where 8 pays more call overhead."""
    from editkit.values import ValueConfig, value_chunk

    assert value_chunk(ValueConfig(), "cuda", 4096) == 64
    assert value_chunk(ValueConfig(), "cpu", 576) == 8 and value_chunk(ValueConfig(), "cpu", 128) == 16
    assert value_chunk(ValueConfig(v_batch_size=4096), "cuda", 4096) == 4096
