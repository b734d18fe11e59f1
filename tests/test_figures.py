"""Figures that travel: names carry what changes them, captions say what they show, every score
figure shows the unedited model, and the same figure saved twice has the same bytes."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from editkit import plots


def rows(phase, method, n=6, seed=0, **cols):
    """Synthetic evaluate() rows: every record has a rewrite, a paraphrase and a neighborhood prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for case in range(n):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            p_new, p_true = rng.uniform(0, 1, 2)
            out.append(dict(dataset="world", case_id=case, kind=kind, p_new=p_new, p_true=p_true,
                            success=bool(p_new > p_true) if kind != "neighborhood" else bool(p_true > p_new),
                            phase=phase, method=method, **cols))
    return out


def layer_frame():
    data = rows("pre", "none", layer=-1, seed=9)
    for m in ("ROME", "MEMIT"):
        for layer in (0, 1, 2):
            data += rows("post", m, layer=layer, seed=layer + 3 * len(m))
    return pd.DataFrame(data)


def test_figure_names_carry_what_changes_the_figure():
    name = plots.figure_name("batch_editing", "world-gpt2", methods=["MEMIT", "EMMET"], layers=[0],
                             batch_sizes=[4, 16, 64, 256], protocol="reference", dataset="world", n=256)
    assert name == "batch_editing_world-gpt2_MEMIT-EMMET_L0_b4-16-64-256_reference_world_n256"
    other = plots.figure_name("batch_editing", "world-gpt2", methods=["MEMIT", "EMMET"], layers=[0],
                              batch_sizes=[4, 16, 64, 256], protocol="editkit", dataset="world", n=256)
    assert other != name
    assert plots.figure_name("layer_sweep", "HuggingFaceTB/SmolLM2-135M", layers=range(13, 18),
                             dataset="/data/counterfact-easyedit-1000.json", n=24) == \
        "layer_sweep_SmolLM2-135M_L13-17_counterfact-easyedit-1000_n24"
    cap = plots.caption("world-gpt2", layers=[0], protocol="reference", dataset="world", n=256)
    for part in ("world-gpt2", "layer 0", "reference", "world", "256"):
        assert part in cap


def test_score_figures_show_the_unedited_model_and_the_caption():
    frame = layer_frame()
    fig = plots.layer_sweep(frame, caption="world-gpt2 · layer 0-2 · n = 6 facts")
    assert "n = 6 facts" in fig._suptitle.get_text()
    base = plots._baseline(frame, 10)
    es = [l for l in fig.axes[0].get_lines() if l.get_label() == "unedited model"]
    assert len(es) == 1 and es[0].get_ydata()[0] == pytest.approx(base["ES"])
    legend = {t.get_text() for leg in fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]
              for t in leg.get_texts()}
    assert "unedited model" in legend


def sequential_frame():
    data = rows("pre", "none", batch_size=0, edits_so_far=0)
    for m, sizes in (("MEMIT", (2, 4)), ("AlphaEdit", (2, 4)), ("r-ROME", (2,))):
        for bs in sizes:
            for k in (4, 8):
                data += rows("all", m, batch_size=bs, edits_so_far=k, seed=k + bs)
                data.append(dict(phase="probe", method=m, batch_size=bs, edits_so_far=k, update_norm=0.1 * k,
                                 perplexity=10.0 + k))
    return pd.DataFrame(data)


def test_sequential_methods_one_figure_per_batch_size():
    frame = sequential_frame()
    with pytest.raises(ValueError, match="one figure per batch size"):
        plots.sequential_methods(frame)
    fig = plots.sequential_methods(frame, batch_size=4)
    assert len(fig.axes) == 6  # ES, PS, NS, S, update norm, perplexity on a 2 × 3 grid
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"MEMIT", "AlphaEdit", "r-ROME (one at a time)", "unedited model"} <= labels


def overlapping_texts(fig):
    """Pairs of visible texts (titles, axis labels, tick labels) of the figure's panels that overlap."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_visible()]
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def test_no_overlapping_labels():
    assert overlapping_texts(plots.layer_sweep(layer_frame())) == []
    assert overlapping_texts(plots.sequential_methods(sequential_frame(), batch_size=4)) == []


def test_saving_the_same_figure_twice_gives_the_same_bytes(tmp_path):
    """PDFs carried a creation date, so every `make figures` rewrote every committed PDF."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import pandas as pd
        from editkit import plots
        from test_frame import layer_frame
        plots.save(plots.layer_sweep(layer_frame(), caption="world-gpt2 · n = 6"), "fig", sys.argv[1])
    """)
    (tmp_path / "test_frame.py").write_text(open(__file__).read())
    digests = []
    for out in ("a", "b"):  # two processes, as two runs of `make figures`
        subprocess.run([sys.executable, "-c", script, str(tmp_path / out)], check=True)
        digests.append({p: hashlib.sha256((tmp_path / out / p).read_bytes()).hexdigest() for p in ("fig.png", "fig.pdf")})
    assert digests[0] == digests[1]
    assert b"CreationDate" not in (tmp_path / "a" / "fig.pdf").read_bytes()


def test_a_batched_method_run_at_one_size_is_not_called_one_at_a_time():
    """AlphaEdit run only at batch 4 (MEMIT at 2 and 4) is a batched method: drawn solid under its
    own name in the batch-4 figure and absent from the batch-2 one; only ROME and its kin, which
    apply a batch's facts one after another, are drawn "(one at a time)" in every figure."""
    frame = sequential_frame()
    frame = frame[~((frame["method"] == "AlphaEdit") & (frame["batch_size"] == 2))]
    labels = {t.get_text() for t in plots.sequential_methods(frame, batch_size=4).legends[0].get_texts()}
    assert {"MEMIT", "AlphaEdit", "r-ROME (one at a time)"} <= labels and "AlphaEdit (one at a time)" not in labels
    labels = {t.get_text() for t in plots.sequential_methods(frame, batch_size=2).legends[0].get_texts()}
    assert "MEMIT" in labels and not any(lab.startswith("AlphaEdit") for lab in labels)


def test_captions_list_irregular_layers_in_full():
    """A figure's name abbreviates 8 irregular layers (L0-20x8); its caption must list them."""
    cap = plots.caption("smollm2-135m", layers=[0, 2, 4, 6, 8, 12, 16, 20], n=64)
    assert "layers 0, 2, 4, 6, 8, 12, 16, 20" in cap
    assert "layers 13-17" in plots.caption("m", layers=range(13, 18))


def test_layer_sweep_marks_a_best_layer_only_as_far_as_the_sweep_separates_it():
    """A 'best layer' line on layers whose intervals overlap would claim a winner the data do not
    show: the mark is faint and the legend says so; a clearly best layer gets the full mark."""
    def frame(sep: bool):
        data = rows("pre", "none", layer=-1, seed=9, n=40)
        for layer in (0, 1, 2):
            r = rows("post", "ROME", layer=layer, seed=1, n=40)  # the same scores at every layer...
            for x in r:
                if layer == 1 and (sep or x["case_id"] == 0):  # ...but layer 1 wins everywhere / on one fact
                    x["success"] = True
            data += r
        return pd.DataFrame(data)

    def marks(fig):
        return [l.get_gid() for l in fig.axes[0].get_lines() if (l.get_gid() or "").startswith("best-layer")]

    clear, unclear = plots.layer_sweep(frame(True)), plots.layer_sweep(frame(False))
    assert marks(clear) == ["best-layer:ROME:separated"]
    assert marks(unclear) == ["best-layer:ROME:not separated"]
    legend = " ".join(leg.get_title().get_text() for leg in unclear.legends)
    assert "not separated" in legend
