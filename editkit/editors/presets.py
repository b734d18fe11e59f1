"""Named presets: ``editkit/presets/<name>.json``, one entry per method, and the preset a
model's name points at."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def _read_preset(name: str | Path) -> dict:
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    res = resources.files("editkit") / "presets" / f"{name}.json"
    if not res.is_file():
        raise KeyError(f"no preset {str(name)!r}; available: {', '.join(available_presets())} "
                       "(or pass a path to a JSON file of the same shape)")
    return json.loads(res.read_text())


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("editkit") / "presets").iterdir() if p.name.endswith(".json"))


def preset_for(model_name: str) -> str | None:
    """The preset whose name the model's name contains (longest match), or None.

    ``"meta-llama/Meta-Llama-3-8B"`` → ``"llama-3-8b"``, ``"EleutherAI/gpt-j-6B"`` →
    ``"gpt-j-6b"``, ``"world-gpt2"`` → ``"world-gpt2"``.
    """
    name = str(model_name).lower().replace("_", "-")
    hits = [p for p in available_presets() if p in name]
    return max(hits, key=len) if hits else None
