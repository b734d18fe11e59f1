"""The embedded fact world: a synthetic CounterFact-style world and tiny models trained on it.

    import editkit as ek
    lm = ek.load_model("world-gpt2")            # shipped with the package: loads in seconds
    records = ek.load_counterfact("world")      # the world's facts, CounterFact schema

The trained models ship inside the package (``editkit/world/models/<name>/``:
safetensors weights, tokenizer and config, ``world.json`` with every setting and the
training report, ``sha256.json`` checked at load), so every user and every figure
starts from the same weights: a rebuild on another machine, or with another thread
count, rounds differently and drifts over thousands of steps into other numbers.

``editkit world build`` retrains them (deterministically for a given torch version:
one thread, deterministic algorithms, seeds) into ``$EDITKIT_CACHE/world`` (default
``~/.cache/editkit/world``) and says whether the result equals the shipped weights.
Cache directories are named after the model and a hash of every generator and
training setting, so changing a setting builds a new model and never reuses a stale
one; the world's data files are generated (deterministically, in seconds) there too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from ..paths import cache_dir
from .generator import RELATIONS, SIZES, World, WorldConfig, generate_world
from .tokenizer import train_tokenizer
from .train import TrainConfig, build_checkpoint, fact_accuracy, save_world, train_model

log = logging.getLogger(__name__)

__all__ = ["WorldConfig", "World", "TrainConfig", "RELATIONS", "SIZES", "WORLD_MODELS", "generate_world",
           "world_config", "world_model_path", "build_world", "shipped_model_path", "ship_world", "WorldIntegrityError", "load_world_counterfact", "world_corpus",
           "world_dir", "train_tokenizer", "train_model", "fact_accuracy", "training_report"]

#: Bumped when the training code changes in a way that changes the result.
FORMAT_VERSION = 1

#: The embedded models: name -> (world size, training settings). The ``-mini``
#: models are trained in seconds on the small world, for quick runs and tests of
#: the pipeline only (they do not know their facts well); pair them with
#: ``ek.load_counterfact("world:small")``.
WORLD_MODELS: dict[str, tuple[str, TrainConfig]] = {
    "world-gpt2": ("default", TrainConfig(arch="gpt2", n_layer=4, d_model=128, n_head=4)),
    # A 768-token vocabulary splits family names into 2-4 pieces (given names stay whole), so the
    # name is assembled at its last token and the facts get attached there. Measured (ROME at
    # layer 0, 200 single edits, 50 value steps): vocab 2157 (one-token names) ES ~0.4; 1024 ES 0.81;
    # 768 ES 0.94 (0.955 with 100 steps, the preset); 512 ES 0.90. 84 epochs: 440 s.
    "world-llama": ("default", TrainConfig(arch="llama", n_layer=4, d_model=128, n_head=4, vocab_size=768, epochs=84)),
    "world-gpt2-mini": ("small", TrainConfig(arch="gpt2", n_layer=2, d_model=64, n_head=4, vocab_size=600, epochs=4)),
    "world-llama-mini": ("small", TrainConfig(arch="llama", n_layer=2, d_model=64, n_head=4, vocab_size=600, epochs=4)),
}

#: Biographies per person in the training corpus (one fresh order and choice of
#: templates per training epoch).
TRAIN_BIOS = 96


def world_config(size: str = "default", **overrides) -> WorldConfig:
    """The world behind the embedded models (``size="small"`` / ``"tiny"`` for tests)."""
    return WorldConfig.sized(size, **{"n_train_bios": TRAIN_BIOS, **overrides})


def _root() -> Path:
    return cache_dir("world")


def _settings_key(world_cfg: WorldConfig, train_cfg: TrainConfig | None = None) -> str:
    blob = {"version": FORMAT_VERSION, "world": world_cfg.to_dict(), "train": train_cfg.to_dict() if train_cfg else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


#: Where the shipped checkpoints live inside the package (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "models"

#: The files of a shipped checkpoint (all safetensors/JSON), each listed in its ``sha256.json``.
SHIPPED_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "world.json")


class WorldIntegrityError(RuntimeError):
    """A shipped world checkpoint does not match its recorded sha256."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[Path, tuple] = {}


def verify_checkpoint(path: Path) -> None:
    """Check every file listed in ``path/sha256.json`` against its hash (once per process
    and file state): a truncated download or a hand-edited weight file must not silently
    give other numbers."""
    path = Path(path)
    sums = json.loads((path / "sha256.json").read_text())
    state = tuple((f, (path / f).stat().st_mtime_ns, (path / f).stat().st_size) for f in sorted(sums)
                  if (path / f).exists())
    if _VERIFIED.get(path) == state:
        return
    for f, want in sums.items():
        if not (path / f).exists():
            raise WorldIntegrityError(f"{path / f} is missing; reinstall editkit (or `git checkout {path}`), "
                                      "or retrain with `editkit world build`")
        got = _sha256(path / f)
        if got != want:
            raise WorldIntegrityError(f"{path / f} has sha256 {got}, but the package records {want}: the file is "
                                      "damaged or was changed. Reinstall editkit (or `git checkout` it), or retrain "
                                      "with `editkit world build` and load the printed directory.")
    _VERIFIED[path] = state


def _info_key(info: dict) -> str:
    blob = {"version": FORMAT_VERSION, "world": info["world"], "train": info["train"]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def shipped_model_path(name: str, key: str | None = None) -> Path | None:
    """The packaged checkpoint of ``name``, verified, or None when the package has none
    (or, given the settings ``key``, none built with those settings)."""
    path = SHIPPED_DIR / name
    if not (path / "sha256.json").exists():
        return None
    if key is not None and _info_key(json.loads((path / "world.json").read_text())) != key:
        log.warning("the shipped %s was trained with other settings than the current code's; using a cache build "
                    "(re-ship with `editkit world build --ship`)", name)
        return None
    verify_checkpoint(path)
    return path


def _resolve(name: str, world_cfg: WorldConfig | None, train_cfg: TrainConfig | None):
    if train_cfg is None or world_cfg is None:
        if name not in WORLD_MODELS:
            raise KeyError(f"unknown world model {name!r}; choose one of {sorted(WORLD_MODELS)}")
        size, default_train = WORLD_MODELS[name]
        train_cfg = train_cfg or default_train
        world_cfg = world_cfg or world_config(size)
    return world_cfg, train_cfg


def world_model_path(name: str, build: bool = True, *, progress: bool = True, force: bool = False,
                     world_cfg: WorldConfig | None = None, train_cfg: TrainConfig | None = None,
                     shipped: bool = True) -> Path:
    """The checkpoint directory of embedded model ``name`` (``"world-gpt2"`` /
    ``"world-llama"``): the one shipped in the package when its settings are these
    (and ``shipped``, and not ``force``), else the cache build, trained first when
    missing and ``build`` (or ``force``)."""
    world_cfg, train_cfg = _resolve(name, world_cfg, train_cfg)
    key = _settings_key(world_cfg, train_cfg)
    if shipped and not force:
        packaged = shipped_model_path(name, key)
        if packaged is not None:
            return packaged
    path = _root() / f"{name}-{key}"
    if force or not (path / "model.safetensors").exists():
        if not (build or force):
            raise FileNotFoundError(f"{name} is not built yet ({path}); run `editkit world build` "
                                    "or ek.world.build_world()")
        log.info("training %s into %s (once; cached afterwards)", name, path)
        build_checkpoint(path, world_cfg, train_cfg, progress=progress, desc=f"training {name}")
    return path


def build_world(names=("world-gpt2", "world-llama"), progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Train (or find in the cache) every embedded model in ``names`` from the code,
    never the shipped copy; ``force`` retrains. Logs whether each build's weights
    equal the shipped ones (they should, with the torch version they were built with)."""
    if isinstance(names, str):
        names = (names,)
    out = {}
    for n in names:
        out[n] = path = world_model_path(n, build=True, progress=progress, force=force, shipped=False)
        packaged = SHIPPED_DIR / n / "sha256.json"
        if packaged.exists():
            want = json.loads(packaged.read_text()).get("model.safetensors")
            same = _sha256(path / "model.safetensors") == want
            log.info("%s: %s the shipped weights", n, "identical to" if same else "DIFFERENT from")
    return out


def ship_world(names=("world-gpt2", "world-llama"), progress: bool = True) -> dict[str, Path]:
    """Copy cache builds of ``names`` into the package (:data:`SHIPPED_DIR`) with a
    ``sha256.json`` of their files (maintainers: run after changing the world or its
    training, then commit ``editkit/world/models``)."""
    import shutil

    if isinstance(names, str):
        names = (names,)
    out = {}
    for n, src in build_world(names, progress=progress).items():
        dst = SHIPPED_DIR / n
        dst.mkdir(parents=True, exist_ok=True)
        for old in dst.iterdir():
            old.unlink()
        sums = {}
        for f in SHIPPED_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, dst / f)
                sums[f] = _sha256(dst / f)
        (dst / "sha256.json").write_text(json.dumps(sums, indent=1) + "\n")
        out[n] = dst
    return out


def world_dir(size: str = "default") -> Path:
    """Directory with the world's files (``counterfact.json``, ``train.txt``,
    ``heldout.txt``), written on first use."""
    cfg = world_config(size)
    path = _root() / f"data-{size}-{_settings_key(cfg)}"
    if not (path / "counterfact.json").exists():
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            save_world(generate_world(cfg), tmp)
            (tmp / "world.json").write_text(json.dumps({"world": cfg.to_dict()}, indent=1))
            if not path.exists():
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_world_counterfact(n: int | None = None, seed: int | None = None, size: str = "default") -> list[dict]:
    """The world's records as plain dicts in the original CounterFact schema.

    Records come in rounds of one record per edit-pool subject, so the first
    ``n_subjects`` have distinct subjects. ``seed`` shuffles *within* each round
    (the distinct-subject prefix is kept); ``n`` takes the first ``n``.
    """
    records = json.loads((world_dir(size) / "counterfact.json").read_text())
    if seed is not None:
        n_subjects = world_config(size).n_subjects
        rng = random.Random(seed)
        rounds = [records[i:i + n_subjects] for i in range(0, len(records), n_subjects)]
        for r in rounds:
            rng.shuffle(r)
        records = [x for r in rounds for x in r]
    return records if n is None else records[:n]


def world_corpus(split: str = "train", size: str = "default") -> list[str]:
    """The world's text, one biography per string: ``"train"`` (what the models were
    trained on, epoch-major, so any prefix covers every person) or ``"heldout"``
    (fresh biographies, for perplexity)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: choose 'train' or 'heldout'")
    return (world_dir(size) / f"{split}.txt").read_text().splitlines()


def training_report(name: str, build: bool = True) -> dict:
    """What it cost to train embedded model ``name`` and what it learned: wall and CPU
    seconds, peak memory, steps, tokens, final loss, accuracy on the true facts
    (from the checkpoint's ``world.json``), plus the architecture."""
    info = json.loads((world_model_path(name, build=build) / "world.json").read_text())
    train = info["train"]
    arch = {"arch": train["arch"], "n_layer": train["n_layer"], "d_model": train["d_model"],
            "vocab_size": train["vocab_size"], "epochs": train["epochs"]}
    return {**arch, **info["report"]}
