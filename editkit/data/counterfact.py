"""CounterFact records and their loader.

One record type, :class:`CounterFactRecord`, whatever the file layout: the
original CounterFact schema (``requested_rewrite`` with a ``{}`` template, as
released with ROME and MEMIT's multi-counterfact), the Hugging Face copies of it,
the EasyEdit layout (prompt already filled in, one rephrase and one locality
prompt) and the embedded world. Metrics and editors only ever see the record.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..paths import local_counterfact
from ..registry import Registry
from ..requests import EditRequest, RequestError
from ._common import (DatasetUnavailableError, check_unique_ids, fetch, looks_like_path, parse_all,
                      read_records, sample)

log = logging.getLogger(__name__)

__all__ = ["CounterFactRecord", "load_counterfact", "COUNTERFACT_URLS", "COUNTERFACT_SOURCES"]

#: Named sources of CounterFact-style records other than files and downloads (``"world"``,
#: ``"world:small"``): ``provider(name, n=..., seed=...)`` returns the raw record dicts.
#: Filled by :mod:`editkit.registrations`.
COUNTERFACT_SOURCES = Registry("CounterFact source")

#: Official files of the ROME/MEMIT release, downloaded by name on first use.
COUNTERFACT_URLS: dict[str, str] = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "multi_counterfact": "https://rome.baulab.info/data/dsets/multi_counterfact.json",
}
_ALIASES = {"cf": "counterfact", "mcf": "multi_counterfact", "multi-counterfact": "multi_counterfact",
            "multicounterfact": "multi_counterfact"}


def _strs(value: Any, name: str = "prompts") -> list[str]:
    """A prompt field as a list of strings (EasyEdit stores one prompt as a bare string).
    Anything else in it (None, a number) is an error naming the field: stringified, it
    would be scored as the prompt "None"."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    out = list(value)
    bad = [(i, v) for i, v in enumerate(out) if not isinstance(v, str)]
    if bad:
        i, v = bad[0]
        raise ValueError(f"{name}[{i}] is {v!r} ({type(v).__name__}); every entry must be a string "
                         f"({len(bad)} of {len(out)} are not): fix or drop them")
    return out


def _target(value: Any) -> tuple[str, Any]:
    """``{"str": "English", "id": "Q1860"}`` or a bare string → (string, id). The leading
    space the prompt text puts before a target is editkit's (see requests.with_target):
    a target written with one loses it, so the text has one space, not two."""
    if isinstance(value, Mapping):
        value, tid = value["str"], value.get("id")
    else:
        tid = None
    return (value.lstrip() if isinstance(value, str) else value), tid


@dataclass
class CounterFactRecord:
    """One CounterFact counterfactual: rewrite ``(subject, relation) → target_true``
    into ``target_new``, with the prompts that measure generalization and leakage.

    ``prompt`` is the rewrite template with one ``{}`` for the subject.
    ``neighborhood_targets`` holds the true object of each neighborhood prompt when
    it differs per prompt (the EasyEdit layout's ``locality_ground_truth``); when
    ``None`` every neighborhood prompt's true object is ``target_true``, as in the
    original CounterFact where neighbours share the subject's true object.
    """

    case_id: Any
    subject: str
    prompt: str
    target_new: str
    target_true: str
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] | None = None
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    pararel_idx: int | None = None

    def __post_init__(self) -> None:
        for name in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            setattr(self, name, _strs(getattr(self, name), f"case_id={self.case_id!r}: {name}"))
        for name in ("target_new", "target_true"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).lstrip())
        if self.neighborhood_targets is not None:
            self.neighborhood_targets = [t.lstrip() for t in _strs(self.neighborhood_targets,
                                                                    f"case_id={self.case_id!r}: neighborhood_targets")]
            if len(self.neighborhood_targets) != len(self.neighborhood_prompts):
                raise ValueError(
                    f"case_id={self.case_id!r}: neighborhood_targets has {len(self.neighborhood_targets)} entries "
                    f"for {len(self.neighborhood_prompts)} neighborhood_prompts; give one true object per prompt "
                    "(or None when they all share target_true)")
        if self.target_true is None:
            raise RequestError(f"case_id={self.case_id!r}: target_true is required for CounterFact scoring")
        try:  # validate now so a bad record fails at load time, naming itself
            self.request
        except RequestError as exc:
            raise RequestError(f"case_id={self.case_id!r}: {exc}") from None

    @property
    def request(self) -> EditRequest:
        """The edit this record asks for."""
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true, case_id=self.case_id)

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def neighborhood_target(self, i: int) -> str:
        """The true object of neighborhood prompt ``i`` (``o^c`` in its comparison)."""
        return self.neighborhood_targets[i] if self.neighborhood_targets is not None else self.target_true

    def to_dict(self) -> dict:
        """The record in the original CounterFact schema (``requested_rewrite`` with
        ``{"str", "id"}`` targets). ``neighborhood_targets`` is added only when set,
        ``id``/``pararel_idx`` only when known, so a file read in that schema writes
        back unchanged."""
        new = {"str": self.target_new} | ({"id": self.target_new_id} if self.target_new_id is not None else {})
        true = {"str": self.target_true} | ({"id": self.target_true_id} if self.target_true_id is not None else {})
        out: dict[str, Any] = {"case_id": self.case_id}
        if self.pararel_idx is not None:
            out["pararel_idx"] = self.pararel_idx
        out["requested_rewrite"] = {"prompt": self.prompt, "relation_id": self.relation_id, "target_new": new,
                                    "target_true": true, "subject": self.subject}
        out["paraphrase_prompts"] = list(self.paraphrase_prompts)
        out["neighborhood_prompts"] = list(self.neighborhood_prompts)
        if self.neighborhood_targets is not None:
            out["neighborhood_targets"] = list(self.neighborhood_targets)
        out["attribute_prompts"] = list(self.attribute_prompts)
        out["generation_prompts"] = list(self.generation_prompts)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], case_id: Any = None) -> "CounterFactRecord":
        """Parse a record in the original schema or the EasyEdit layout (detected by
        its keys). ``case_id`` is the fallback when the dict has none."""
        if isinstance(d, CounterFactRecord):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a dict or CounterFactRecord, got {type(d).__name__}")
        if "requested_rewrite" in d:
            return cls._from_original(d, case_id)
        if "prompt" in d and "subject" in d and "target_new" in d:
            return cls._from_easyedit(d, case_id)
        if "src" in d and "alt" in d:
            raise ValueError("this is a zsRE record (src/alt keys); load it with ek.load_zsre")
        raise ValueError(
            f"unrecognized CounterFact layout (keys {sorted(d)}): expected the original schema "
            "('requested_rewrite', 'paraphrase_prompts', ...) or the EasyEdit layout "
            "('prompt', 'subject', 'target_new', 'ground_truth', 'rephrase_prompt', 'locality_prompt', ...)")

    @classmethod
    def _from_original(cls, d: Mapping[str, Any], case_id: Any) -> "CounterFactRecord":
        rw = d["requested_rewrite"]
        if isinstance(rw, (list, tuple)):
            if len(rw) != 1:
                raise ValueError(f"requested_rewrite holds {len(rw)} rewrites; editkit records hold one each")
            rw = rw[0]
        new, new_id = _target(rw["target_new"])
        true, true_id = _target(rw["target_true"])
        return cls(
            case_id=d.get("case_id", case_id), subject=rw["subject"], prompt=rw["prompt"], target_new=new,
            target_true=true, relation_id=rw.get("relation_id"), target_new_id=new_id, target_true_id=true_id,
            paraphrase_prompts=d.get("paraphrase_prompts"), neighborhood_prompts=d.get("neighborhood_prompts"),
            neighborhood_targets=d.get("neighborhood_targets"), attribute_prompts=d.get("attribute_prompts"),
            generation_prompts=d.get("generation_prompts"), pararel_idx=d.get("pararel_idx"))

    @classmethod
    def _from_easyedit(cls, d: Mapping[str, Any], case_id: Any) -> "CounterFactRecord":
        """EasyEdit: ``prompt`` is filled in, so the ``{}`` template is recovered from
        the subject's (first) occurrence; a subject absent from the prompt is an error."""
        cid = d.get("case_id", case_id)
        true = d.get("ground_truth", d.get("target_true"))
        if isinstance(true, (list, tuple)):  # some EasyEdit files list several true answers
            true = true[0] if true else None
        if true is None:
            raise ValueError(f"case_id={cid!r}: EasyEdit record has no 'ground_truth'")
        try:
            req = EditRequest.from_filled(d["prompt"], d["subject"], _target(d["target_new"])[0], _target(true)[0])
        except RequestError as exc:
            raise RequestError(f"case_id={cid!r}: {exc}") from None
        neighborhood = _strs(d.get("locality_prompt"))
        loc_truth = _strs(d.get("locality_ground_truth"))
        if len(loc_truth) != len(neighborhood):
            raise ValueError(f"case_id={cid!r}: {len(neighborhood)} locality_prompt(s) but {len(loc_truth)} "
                             "locality_ground_truth value(s); give one true object per locality prompt")
        return cls(case_id=cid, subject=req.subject, prompt=req.prompt, target_new=req.target_new,
                   target_true=req.target_true, relation_id=d.get("relation_id"),
                   paraphrase_prompts=d.get("rephrase_prompt"), neighborhood_prompts=neighborhood,
                   neighborhood_targets=loc_truth, generation_prompts=d.get("generation_prompts"),
                   attribute_prompts=d.get("attribute_prompts"), pararel_idx=d.get("pararel_idx"))


def _raw_records(source: Any) -> Iterable[Any]:
    """The raw records behind ``source`` (see :func:`load_counterfact`)."""
    if isinstance(source, (str, os.PathLike)) and Path(os.path.expanduser(str(source))).exists():
        return read_records(Path(os.path.expanduser(str(source))))
    if isinstance(source, os.PathLike):
        raise FileNotFoundError(f"CounterFact file {source} does not exist; pass the path of a CounterFact JSON "
                                "file, or a name: 'counterfact', 'multi_counterfact', 'world'")
    if isinstance(source, str):
        name = _ALIASES.get(source.lower(), source.lower())
        local = local_counterfact() if name == "counterfact" else None
        if local is not None:  # EDITKIT_DATA: the user's own copy stands in for the download
            log.info("counterfact: reading %s (EDITKIT_DATA)", local)
            return read_records(local)
        if name in COUNTERFACT_URLS:
            path = fetch(COUNTERFACT_URLS[name], f"{name}.json", f"CounterFact ({name})",
                         f"ek.load_counterfact('/path/to/{name}.json')")
            return read_records(path)
        if source.startswith(("http://", "https://")):
            fname = "url-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in source.split("://", 1)[1])
            return read_records(fetch(source, fname[-150:], "CounterFact", "ek.load_counterfact('/path/to/file.json')"))
        if looks_like_path(source):
            raise FileNotFoundError(f"CounterFact file {source!r} does not exist; pass the path of a CounterFact "
                                    "JSON file, or a name: 'counterfact', 'multi_counterfact', 'world'")
        return _hf_records(source)
    if isinstance(source, (list, tuple)):
        return source
    if isinstance(source, Iterable) and not isinstance(source, (Mapping, bytes)):
        return list(source)
    raise TypeError(f"source={source!r}: pass a path, a dataset name ('counterfact', 'multi_counterfact', 'world', "
                    "a Hugging Face id like 'azhx/counterfact') or a list of records")


def _hf_records(name: str) -> list[dict]:
    """A Hugging Face dataset copy of CounterFact (all splits concatenated, in order)."""
    from ..hub import hub_offline_reason, hub_reachable
    from ..paths import hub_offline

    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DatasetUnavailableError("loading a Hugging Face dataset needs the 'datasets' package") from exc
    hint = ("pass a local CounterFact JSON path, or an official name: 'counterfact', 'multi_counterfact', "
            "or 'world' for the embedded offline world")
    if not hub_offline() and not hub_reachable():  # datasets would retry for minutes: fail at once
        raise DatasetUnavailableError(
            f"cannot load the Hugging Face dataset {name!r}: {hub_offline_reason()}. With a copy in the local "
            f"Hugging Face cache, set HF_HUB_OFFLINE=1 to use it; otherwise {hint}")
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:
        raise DatasetUnavailableError(f"could not load the Hugging Face dataset {name!r} "
                                      f"({type(exc).__name__}: {exc}); {hint}") from exc
    splits = ds.values() if hasattr(ds, "values") else [ds]
    return [row for split in splits for row in split]


def load_counterfact(source: Any = None, n: int | None = None, seed: int | None = None,
                     unique_subjects: bool = False, *, skip_invalid: bool = False) -> list[CounterFactRecord]:
    """CounterFact records from any of its layouts.

    ``source``:
      - ``None`` or ``"world"`` (``"world:small"`` for another world size): the
        embedded synthetic world, offline (``editkit.world.load_world_counterfact``);
      - ``"counterfact"`` / ``"multi_counterfact"``: the official ROME/MEMIT files,
        downloaded once into ``$EDITKIT_CACHE/data`` (a clear
        :class:`DatasetUnavailableError` when offline, never a hang);
      - a local path to a JSON (or JSON Lines) file in the original schema or the
        EasyEdit layout (auto-detected per record), or an ``http(s)://`` URL;
      - a Hugging Face dataset id such as ``"azhx/counterfact"`` (via ``datasets``);
      - a list of dicts (either layout) or :class:`CounterFactRecord`.

    Records are validated as they are read: an EasyEdit prompt that does not contain
    its subject raises :class:`~editkit.RequestError` naming the record, unless
    ``skip_invalid=True``, which drops such records and logs how many.

    Selection: ``unique_subjects`` keeps the first record of each subject (in file
    order), then ``seed`` shuffles deterministically, then the first ``n`` are kept.
    For the world, ``seed`` is passed on (it shuffles within rounds of distinct
    subjects, see ``load_world_counterfact``).
    """
    name = "world" if source is None else source
    provider = COUNTERFACT_SOURCES.find(name) if isinstance(name, str) else None
    if provider is not None:  # e.g. the embedded world: records generated in the order its seed gives
        raw = provider(name, n=None if unique_subjects else n, seed=seed)
        records = parse_all(raw, lambda d, i: CounterFactRecord.from_dict(d, case_id=i), skip_invalid, "CounterFact")
        return sample(records, n, None, (lambda r: r.subject) if unique_subjects else None)
    raw = _raw_records(source)
    records = parse_all(raw, lambda d, i: CounterFactRecord.from_dict(d, case_id=i), skip_invalid, "CounterFact")
    check_unique_ids(records, "CounterFact")
    return sample(records, n, seed, (lambda r: r.subject) if unique_subjects else None)
