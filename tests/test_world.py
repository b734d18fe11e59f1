"""The embedded world end to end, at miniature size (seconds)."""
from __future__ import annotations

import json

import pytest
import torch

import editkit as ek
from editkit import world as W
from editkit.world.generator import RELATIONS, WorldConfig, generate_world
from editkit.world.train import TrainConfig

TINY_WORLD = WorldConfig.sized("tiny", n_train_bios=3)
TINY_TRAIN = dict(n_layer=2, d_model=32, n_head=2, vocab_size=400, epochs=3, batch_size=8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))


def test_generator_is_deterministic_and_seeded():
    a, b = generate_world(TINY_WORLD), generate_world(TINY_WORLD)
    assert a.records == b.records and a.train == b.train and a.heldout == b.heldout
    c = generate_world(WorldConfig.sized("tiny", n_train_bios=3, seed=1))
    assert c.records != a.records
    assert TINY_WORLD.key() != WorldConfig.sized("tiny", seed=1).key()


def test_records_follow_the_counterfact_schema():
    w = generate_world(TINY_WORLD)
    rel = {r.relation_id: r for r in RELATIONS}
    assert len(RELATIONS) >= 6 and all(len(r.templates) >= 8 for r in RELATIONS)
    assert len(w.records) == TINY_WORLD.n_subjects * TINY_WORLD.n_relations
    reserve = set(w.reserve)
    for i, r in enumerate(w.records):
        assert set(r) >= {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                          "attribute_prompts", "generation_prompts"}
        assert r["case_id"] == i
        rw = r["requested_rewrite"]
        assert set(rw) == {"prompt", "relation_id", "target_new", "target_true", "subject"}
        assert rw["prompt"].count("{}") == 1 and not rw["prompt"].endswith(" ")
        s, rid = rw["subject"], rw["relation_id"]
        assert s in w.subjects and s not in reserve
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert true == w.facts[(s, rid)] and new != true and new in rel[rid].objects
        assert rw["target_new"]["id"] != rw["target_true"]["id"]
        # paraphrases: other templates of the same relation, filled with the subject
        filled = {t.format(s) for t in rel[rid].templates}
        assert r["paraphrase_prompts"] and set(r["paraphrase_prompts"]) <= filled
        assert rw["prompt"].format(s) not in r["paraphrase_prompts"]
        # neighbours: reserve subjects that share the true object; attributes: that hold the new one
        for key, obj in (("neighborhood_prompts", true), ("attribute_prompts", new)):
            for p in r[key]:
                who = [x for x in reserve if x in p]
                assert len(who) == 1 and w.facts[(who[0], rid)] == obj
        ek.EditRequest(rw["prompt"], s, new, true)  # valid request
    first = [r["requested_rewrite"]["subject"] for r in w.records[:TINY_WORLD.n_subjects]]
    assert len(set(first)) == len(first)


def test_corpus_is_biographies_with_full_names():
    w = generate_world(TINY_WORLD)
    assert len(w.train) == TINY_WORLD.n_train_bios * len(w.all_subjects)
    bio = w.train[0]
    s = w.all_subjects[0]
    assert bio.count(s) == TINY_WORLD.n_relations
    for rid in [r.relation_id for r in w.relations]:
        assert f" {w.facts[(s, rid)]}." in bio
    assert set(w.heldout).isdisjoint(w.train) or len(w.heldout) > 0


def test_public_loaders(tmp_path):
    recs = W.load_world_counterfact(n=10, size="tiny")
    assert len(recs) == 10 and recs[0]["requested_rewrite"]["subject"]
    shuffled = W.load_world_counterfact(n=10, seed=3, size="tiny")
    assert len({r["requested_rewrite"]["subject"] for r in shuffled}) == 10
    assert W.load_world_counterfact(size="tiny") == W.load_world_counterfact(size="tiny")
    assert W.world_corpus("train", size="tiny") and W.world_corpus("heldout", size="tiny")
    with pytest.raises(ValueError):
        W.world_corpus("test", size="tiny")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_builds_loads_and_is_cached(arch):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(arch=arch, **TINY_TRAIN)
    path = W.world_model_path(f"world-{arch}", world_cfg=TINY_WORLD, train_cfg=cfg, progress=False)
    for f in ("model.safetensors", "config.json", "counterfact.json", "train.txt", "heldout.txt", "world.json"):
        assert (path / f).exists(), f
    meta = json.loads((path / "world.json").read_text())
    assert meta["train"]["arch"] == arch and "train_seconds" in meta["report"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again = W.world_model_path(f"world-{arch}", world_cfg=TINY_WORLD, train_cfg=cfg, progress=False)
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not retrained
    with pytest.raises(FileNotFoundError):  # other settings -> another key, not built
        W.world_model_path(f"world-{arch}", build=False, world_cfg=TINY_WORLD,
                           train_cfg=TrainConfig(arch=arch, **{**TINY_TRAIN, "epochs": 4}))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    lm = ek.load_model(path, device="cpu")
    assert lm.n_layers == TINY_TRAIN["n_layer"]
    enc = lm.tokenizer("Hello world")
    if arch == "llama":
        assert enc["input_ids"][0] == lm.tokenizer.bos_token_id
    rec = json.loads((path / "counterfact.json").read_text())[0]
    rw = rec["requested_rewrite"]
    req = ek.EditRequest(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])
    from editkit.requests import tokenize_spans
    batch = tokenize_spans(lm.tokenizer, [req.text], [[req.subject_span]])
    assert batch.spans[0][0]

    from editkit.tracing import causal_trace, layer_importance
    frame = causal_trace(lm, rw["prompt"], rw["subject"], rw["target_true"]["str"], samples=2)
    assert {"layer", "token_index", "token", "score", "indirect_effect"} <= set(frame.columns)
    assert frame["layer"].nunique() == lm.n_layers and frame["is_subject_last"].sum() == lm.n_layers
    assert 0 <= frame.attrs["corrupted"] <= 1 and 0 <= frame.attrs["clean"] <= 1
    imp = layer_importance(lm, [rec, rec], samples=2, progress=False)
    assert set(imp["position"]) == {"subject_last", "last"} and len(imp) == 2 * lm.n_layers
    assert (imp["n"] == 2).all()


def test_tracing_restoring_everything_recovers_the_clean_run():
    from editkit.tracing import causal_trace

    from editkit.testing import tiny_lm

    lm = tiny_lm("gpt2")
    assert len(lm.tokenizer(" piano")["input_ids"]) == 1
    # Restoring the block output at the subject's last token, with a window over all
    # layers, at the *last* layer gives back the clean state there: the score of the
    # last token is then the clean probability when the subject ends the prompt.
    frame = causal_trace(lm, "{} plays the", "Toko Yasuda", "piano", kind="block", samples=3,
                         window=lm.n_layers)
    last_layer = frame[frame.layer == lm.n_layers - 1]
    row = last_layer[last_layer.is_last].iloc[0]
    assert row.score == pytest.approx(frame.attrs["clean"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["world-gpt2", "world-llama"])
def test_world_presets_load(name):
    for cls in (ek.ROME, ek.MEMIT, ek.EMMET):
        editor = cls.preset(name)
        assert editor.corpus == "world" and editor.edit_layers == [0]


@pytest.mark.parametrize("name", sorted(W.WORLD_MODELS))
def test_shipped_models_match_the_code_and_load_without_training(name, monkeypatch):
    """Every embedded model ships in the package, trained with exactly the settings the code
    has now, and loads from an empty cache without training."""
    path = W.SHIPPED_DIR / name
    info = json.loads((path / "world.json").read_text())
    size, train_cfg = W.WORLD_MODELS[name]
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731 (tuples are lists in world.json)
    assert info["train"] == as_json(train_cfg.to_dict()) and info["world"] == as_json(W.world_config(size).to_dict())
    sums = json.loads((path / "sha256.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "world.json"} <= set(sums)
    assert all(f.suffix in (".json", ".safetensors") for f in path.iterdir())  # never a pickle

    def no_training(*a, **k):
        raise AssertionError("load_model trained a model although one is shipped")

    monkeypatch.setattr(W, "build_checkpoint", no_training)
    assert W.world_model_path(name) == path
    lm = ek.load_model(name, device="cpu")
    assert lm.n_layers == train_cfg.n_layer
    assert not list((W._root()).glob(f"{name}-*"))  # nothing written to the cache


def test_a_damaged_shipped_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    src = W.SHIPPED_DIR / "world-gpt2-mini"
    fake = tmp_path / "models"
    shutil.copytree(src, fake / "world-gpt2-mini")
    monkeypatch.setattr(W, "SHIPPED_DIR", fake)
    assert W.world_model_path("world-gpt2-mini") == fake / "world-gpt2-mini"
    weights = fake / "world-gpt2-mini" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(W.WorldIntegrityError, match="model.safetensors.*sha256"):
        W.world_model_path("world-gpt2-mini")


def test_training_is_deterministic_whatever_the_callers_threads():
    """A build is a pure function of the settings: the ambient thread count does not leak
    into training (it would change float rounding and, over many steps, the weights), and
    the caller's settings come back afterwards."""
    from editkit.world.train import TRAIN_THREADS, train_model

    world = generate_world(TINY_WORLD)
    cfg = TrainConfig(arch="gpt2", **{**TINY_TRAIN, "epochs": 1})
    before = torch.get_num_threads()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model, _, report = train_model(world, cfg, progress=False)
        assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
        assert report["torch_threads"] == TRAIN_THREADS and report["deterministic_algorithms"]
        results.append(model.state_dict())
    torch.set_num_threads(before)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.slow
def test_a_rebuild_gives_the_shipped_weights_bit_for_bit():
    """Retraining world-gpt2-mini from the code reproduces the shipped file exactly (same
    torch version): what `editkit world build` checks for the big models."""
    path = W.world_model_path("world-gpt2-mini", shipped=False, progress=False)
    assert path != W.SHIPPED_DIR / "world-gpt2-mini"
    want = json.loads((W.SHIPPED_DIR / "world-gpt2-mini" / "sha256.json").read_text())
    assert W._sha256(path / "model.safetensors") == want["model.safetensors"]
    assert W._sha256(path / "tokenizer.json") == want["tokenizer.json"]
