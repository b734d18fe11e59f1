"""AlphaEdit's null-space form of the one solver, checked against its objective
(small random matrices, float64, no model)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit.solver import NullSpace, null_space_delta

D_IN, D_OUT, M = 24, 10, 16  # preserved keys span M of the D_IN directions


def _preserved_keys(g: torch.Generator, noise: float = 0.0, n: int = 400) -> torch.Tensor:
    """K0 (D_IN × n) spanning a random M-dimensional subspace, plus isotropic ``noise``."""
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0][:, :M]
    K0 = basis @ torch.randn(M, n, generator=g, dtype=torch.float64)
    return K0 + noise * torch.randn(D_IN, n, generator=g, dtype=torch.float64)


def _edit(g: torch.Generator, E: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(D_IN, E, generator=g, dtype=torch.float64),
            torch.randn(D_OUT, E, generator=g, dtype=torch.float64))


def test_update_lies_in_the_null_space_of_the_preserved_keys():
    g = torch.Generator().manual_seed(0)
    K0 = _preserved_keys(g)
    C0 = K0 @ K0.T / K0.shape[1]
    ns = NullSpace.of(C0, threshold=1e-8)
    assert ns.rank == D_IN - M
    K, R = _edit(g)
    delta = ek.solve(K, R, C0, "null_space", 1.0, null_space=ns).delta
    # Δ k ≈ 0 for every key in the preserved span (relative to ‖Δ‖‖k‖)...
    rel = (delta @ K0).norm(dim=0) / (delta.norm() * K0.norm(dim=0))
    assert rel.max() < 1e-10
    # ...where MEMIT's update, for the same pairs, trades them off: it moves them (less
    # the more C0 outweighs the new keys, but never to zero).
    memit = ek.solve(K, R, C0 + 1e-3 * torch.eye(D_IN, dtype=C0.dtype), "least_squares", 1.0).delta
    assert ((memit @ K0).norm(dim=0) / (memit.norm() * K0.norm(dim=0))).max() > 1e-3
    # Δ = Δ P exactly (up to float error), and P is a projector.
    P = ns.projector
    torch.testing.assert_close(P @ P, P)
    torch.testing.assert_close(delta @ P, delta)


def test_preserved_outputs_move_at_most_by_the_cut():
    """With noisy statistics no direction is exactly free; the mean squared change of a
    preserved output is ``tr(Δ C0 Δᵀ) ≤ cut · ‖Δ‖²`` for both meanings of the threshold."""
    g = torch.Generator().manual_seed(1)
    K0 = _preserved_keys(g, noise=0.05)
    C0 = K0 @ K0.T / K0.shape[1]
    K, R = _edit(g)
    mu = torch.linalg.eigvalsh(C0)
    for ns in (NullSpace.of(C0, threshold=0.01), NullSpace.of(C0, threshold=2e-3, relative=True)):
        assert ns.rank == int((mu < ns.cut).sum()) and 0 < ns.rank < D_IN
        delta = null_space_delta(K, R, ns, reg=1.0).delta
        drift = torch.trace(delta @ C0 @ delta.T)
        assert drift <= ns.cut * delta.norm() ** 2 * (1 + 1e-9)
    rel = NullSpace.of(C0, threshold=2e-3, relative=True)
    assert rel.cut == pytest.approx(2e-3 * mu[-1].item())


def test_closed_form_solves_its_objective():
    """Δ minimizes ‖ΔK − R‖² + λ‖Δ‖² + ‖ΔK_p‖² over Δ = Δ̃P: the reduced r × r Cholesky
    solve equals the paper's d × d form R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λI)⁻¹ and a
    minimum-norm least-squares solve of the stacked objective in Δ̃."""
    g = torch.Generator().manual_seed(2)
    K0 = _preserved_keys(g, noise=0.02)
    C0 = K0 @ K0.T / K0.shape[1]
    ns = NullSpace.of(C0, threshold=0.01)
    P = ns.projector
    K, R = _edit(g, E=4)
    Kp = torch.randn(D_IN, 6, generator=g, dtype=torch.float64)
    I = torch.eye(D_IN, dtype=torch.float64)
    for lam in (0.5, 1.0, 10.0):
        ours = ek.solve(K, R, C0, "null_space", lam, null_space=ns, preserved=Kp @ Kp.T).delta
        paper = torch.linalg.solve((Kp @ Kp.T @ P + K @ K.T @ P + lam * I).T, (R @ K.T @ P).T).T
        torch.testing.assert_close(ours, paper, rtol=1e-9, atol=1e-11)
        # Δ̃ [PK, √λ P, PK_p] ≈ [R, 0, 0] in least squares; the update is Δ̃P.
        A = torch.cat([P @ K, lam ** 0.5 * P, P @ Kp], 1)
        B = torch.cat([R, torch.zeros(D_OUT, D_IN + Kp.shape[1], dtype=torch.float64)], 1)
        tilde = torch.linalg.lstsq(A.T, B.T, driver="gelsd").solution.T
        torch.testing.assert_close(ours, tilde @ P, rtol=1e-8, atol=1e-10)


def test_with_identity_projector_and_no_earlier_keys_it_is_ridge_memit():
    """P = I (a cut above every eigenvalue) and no K_p: Δ = R Kᵀ (K Kᵀ + λI)⁻¹, which is
    MEMIT's least squares with λ·C0 replaced by λ·I, i.e. MEMIT with C0 = I and the same λ
    (AlphaEdit's λ = 1 of the paper's formula: MEMIT with C0 = I, λ = 1)."""
    g = torch.Generator().manual_seed(3)
    K0 = _preserved_keys(g, noise=0.1)
    C0 = K0 @ K0.T / K0.shape[1]
    with pytest.warns(UserWarning, match="identity"):  # it protects nothing: said, since an editor would not want it
        everything = NullSpace.of(C0, threshold=2.0, relative=True)
    assert everything.rank == D_IN
    torch.testing.assert_close(everything.projector, torch.eye(D_IN, dtype=torch.float64))
    K, R = _edit(g)
    I = torch.eye(D_IN, dtype=torch.float64)
    for lam in (1.0, 7.0):
        alpha = ek.solve(K, R, C0, "null_space", lam, null_space=everything).delta
        memit = ek.solve(K, R, I, "least_squares", lam).delta
        torch.testing.assert_close(alpha, memit, rtol=1e-10, atol=1e-12)
    # ...and not MEMIT with the real C0.
    assert (ek.solve(K, R, C0, "least_squares", 1.0).delta - alpha).norm() > 1e-3 * alpha.norm()


def test_earlier_keys_are_protected_by_the_preserved_term():
    g = torch.Generator().manual_seed(4)
    K0 = _preserved_keys(g, noise=0.01)
    C0 = K0 @ K0.T / K0.shape[1]
    ns = NullSpace.of(C0, threshold=1e-3)
    Kp, _ = _edit(g, E=5)
    K, R = _edit(g, E=3)
    without = null_space_delta(K, R, ns, 1.0).delta
    with_p = null_space_delta(K, R, ns, 1.0, preserved=Kp @ Kp.T).delta
    assert (with_p @ Kp).norm() < 0.5 * (without @ Kp).norm()


def test_empty_null_space_and_bad_settings_are_clear_errors():
    g = torch.Generator().manual_seed(5)
    K0 = torch.randn(D_IN, 200, generator=g, dtype=torch.float64)
    C0 = K0 @ K0.T / 200  # full rank, eigenvalues well above 1e-3
    K, R = _edit(g)
    with pytest.raises(ek.SingularSystemError, match="null space is empty.*nullspace_threshold"):
        ek.solve(K, R, C0, "null_space", 1.0, null_space=NullSpace.of(C0, threshold=1e-3))
    with pytest.raises(ValueError, match="nullspace_threshold"):
        NullSpace.of(C0, threshold=0.0)
    with pytest.raises(ValueError, match="null_space"):
        ek.solve(K, R, C0, "least_squares", 1.0, preserved=C0)
    big = NullSpace.of(C0, threshold=10.0)  # r = 24 > E = 3: λ = 0 leaves the system singular
    with pytest.raises(ek.SingularSystemError, match="reg"):
        null_space_delta(K, R, big, reg=0.0)


# --- the AlphaEdit editor on a tiny model ---------------------------------------------

from editkit import experiments, plots  # noqa: E402
from editkit.editors import preserved_keys  # noqa: E402
from editkit.testing import TINY_TEXT, tiny_lm  # noqa: E402

REQS = [
    ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="French", target_true="English"),
    ek.EditRequest("{} plays the", "Toko Yasuda", target_new="guitar", target_true="piano"),
    ek.EditRequest("{} was developed by", "Apple A5", target_new="Google", target_true="Apple"),
]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, values=ek.ValueConfig(v_steps=4, v_lr=0.5))


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=3)


def test_alphaedit_edit_is_in_the_null_space_and_undo_restores_weights_and_keys(lm):
    before = lm.edit_module(1).weight.clone()
    editor = ek.AlphaEdit(layers=[1], **FAST)
    first = editor.apply(lm, REQS[:2], progress=False)
    C0 = editor.second_moment(lm, 1, False)
    ns = editor.null_space(lm, 1, C0)
    assert 0 < ns.rank < C0.shape[0]
    assert editor.null_space(lm, 1, C0) is ns  # cached beside C0
    delta = first.deltas[1].double()
    torch.testing.assert_close(delta @ ns.projector.double(), delta, rtol=0, atol=1e-5 * delta.abs().max().item())
    # the preserved outputs move at most by the cut: tr(Δ C0 Δᵀ) ≤ cut‖Δ‖² (float32 storage tolerance)
    assert torch.trace(delta @ C0.double() @ delta.T) <= ns.cut * delta.norm() ** 2 * 1.01
    K1 = first.keys[1].double()
    torch.testing.assert_close(preserved_keys(lm, 1), K1 @ K1.T)
    second = editor.apply(lm, REQS[2:], progress=False)
    K2 = second.keys[1].double()
    torch.testing.assert_close(preserved_keys(lm, 1), K1 @ K1.T + K2 @ K2.T)
    second.undo()
    torch.testing.assert_close(preserved_keys(lm, 1), K1 @ K1.T, rtol=0, atol=0)
    first.undo()
    assert preserved_keys(lm, 1) is None
    assert torch.equal(lm.edit_module(1).weight, before)


def test_alphaedit_in_every_runner_and_its_keys_survive_a_resumed_run(lm, tmp_path, monkeypatch):
    from tests.test_experiments import Interrupt, _interrupt_after, _record

    records = ek.load_counterfact([_record(i) for i in range(8)])
    before = lm.edit_module(1).weight.clone()
    kw = dict(editor_kwargs=FAST, heldout=TINY_TEXT[:6], progress=False)
    args = (lm, records, ["AlphaEdit"], 1, [2], 6)
    clean = experiments.sequential_batched(*args, run_dir=tmp_path / "a", **kw)
    _interrupt_after(monkeypatch, 3)  # pre, batch 0 (+ its checkpoint), then dies
    with pytest.raises(Interrupt):
        experiments.sequential_batched(*args, run_dir=tmp_path / "b", **kw)
    monkeypatch.undo()
    assert torch.equal(lm.edit_module(1).weight, before) and preserved_keys(lm, 1) is None
    resumed = experiments.sequential_batched(*args, run_dir=tmp_path / "b", **kw)
    cols = ["phase", "batch", "edits_so_far", "case_id", "kind", "prompt_index", "nll_new", "update_norm"]
    a = clean[cols].sort_values(cols[:6]).reset_index(drop=True)
    b = resumed[cols].sort_values(cols[:6]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-6)
    # without K_p in the saved state the resumed batches would differ: check that they do
    monkeypatch.setattr(ek.AlphaEdit, "load_sequential_state", lambda self, lm, t: None)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupt):
        experiments.sequential_batched(*args, run_dir=tmp_path / "c", **kw)
    monkeypatch.undo()
    monkeypatch.setattr(ek.AlphaEdit, "load_sequential_state", lambda self, lm, t: None)
    forgot = experiments.sequential_batched(*args, run_dir=tmp_path / "c", **kw)
    monkeypatch.undo()
    lm.cache.pop(("preserved_keys", 1), None)
    c = forgot[cols].sort_values(cols[:6]).reset_index(drop=True)
    assert not np_allclose(a.update_norm, c.update_norm)
    assert torch.equal(lm.edit_module(1).weight, before)
    # the other two runners and the comparison figure
    sweep = experiments.layer_sweep(lm, records, ["AlphaEdit"], [1], 2, editor_kwargs=FAST, root=tmp_path,
                                    progress=False)
    assert set(sweep[sweep.phase == "post"].method) == {"AlphaEdit"}
    batch = experiments.batch_sweep(lm, records, ["AlphaEdit", "MEMIT"], 1, [2], regs={"AlphaEdit": [1.0, 10.0]},
                                    editor_kwargs=FAST, root=tmp_path, progress=False)
    assert set(zip(batch[batch.phase == "post"].method, batch[batch.phase == "post"].reg)) >= {
        ("AlphaEdit", 1.0), ("AlphaEdit", 10.0)}
    assert torch.equal(lm.edit_module(1).weight, before) and preserved_keys(lm, 1) is None
    memit = experiments.sequential_batched(lm, records, ["MEMIT"], 1, [2], 6, run_dir=tmp_path / "m", **kw)
    both = pd.concat([resumed, memit[memit.method != "none"]], ignore_index=True)
    fig = plots.sequential_methods(both)
    assert len(fig.axes) == 4 + 2  # one batch size: ES, PS, NS, S, update norm, perplexity
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"AlphaEdit", "MEMIT"}


def np_allclose(a, b) -> bool:
    import numpy as np

    return bool(np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6))


def test_alphaedit_in_the_widget_method_picker_and_presets(lm, tmp_path, monkeypatch):
    from editkit.widgets import EditExplorer

    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    for name in ek.available_presets():  # every preset configures AlphaEdit
        editor = ek.make_editor("AlphaEdit", preset=name)
        assert editor.nullspace_threshold > 0 and editor.reg > 0
    before = lm.edit_module(1).weight.clone()
    ex = EditExplorer(lm, corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, v_steps=4)
    assert "AlphaEdit" in ex.method.options
    ex.method.value = "AlphaEdit"
    ex.layers.value = "1"
    ex.prompt.value, ex.subject.value = "The mother tongue of {} is", "Danielle Darrieux"
    ex.target_new.value, ex.target_true.value = "French", "English"
    rec = ex.on_edit()
    assert rec is not None, ex.status.value
    assert rec.edit.method == "AlphaEdit" and preserved_keys(lm, 1) is not None
    ex.on_undo()
    assert torch.equal(lm.edit_module(1).weight, before) and preserved_keys(lm, 1) is None
