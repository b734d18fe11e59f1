"""zsRE question-answering edits in the MEND layout (``subject, src, pred, rephrase,
alt, answers, loc, loc_ans, cond``), as in ROME/MEMIT's ``zsre_mem_eval.json``.

A zsRE record edits the answer of question ``src`` about ``subject`` from
``answers[0]`` to ``alt``. The edit prompt is the question itself with the subject
replaced by ``{}``; a question that does not contain its subject cannot be edited
by locate-and-edit methods (there is no subject token), so such records raise at
load time, or are dropped and counted with ``skip_invalid=True``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..requests import EditRequest, RequestError
from ._common import fetch, looks_like_path, parse_all, read_records, sample

log = logging.getLogger(__name__)

__all__ = ["ZsreRecord", "load_zsre", "ZSRE_URLS"]

#: The official evaluation file of the ROME/MEMIT release.
ZSRE_URLS: dict[str, str] = {"zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json"}


@dataclass
class ZsreRecord:
    """One zsRE edit. It offers the same scoring interface as
    :class:`~editkit.data.CounterFactRecord` (``request``, ``paraphrase_prompts``,
    ``neighborhood_prompts`` with per-prompt ``neighborhood_targets``), so
    :func:`editkit.metrics.evaluate` treats both alike: rewrite = ``src`` →
    ``alt``; paraphrase = ``rephrase`` → ``alt``; neighborhood = ``loc`` →
    ``loc_ans`` (which must stay unchanged)."""

    case_id: Any
    subject: str
    src: str
    rephrase: str
    alt: str
    answers: list[str]
    loc: str
    loc_ans: str
    pred: str | None = None
    cond: str | None = None
    prompt: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.answers = [self.answers] if isinstance(self.answers, str) else list(self.answers)
        if not self.answers:
            raise ValueError(f"case_id={self.case_id!r}: 'answers' is empty; zsRE needs the true answer first")
        try:
            self.prompt = EditRequest.from_filled(self.src, self.subject, self.alt, self.answers[0]).prompt
        except RequestError as exc:
            raise RequestError(f"case_id={self.case_id!r}: {exc}") from None

    # --- the scoring interface shared with CounterFactRecord ------------------
    @property
    def request(self) -> EditRequest:
        """The edit: question ``src`` (subject as ``{}``), ``target_new=alt``, ``target_true=answers[0]``."""
        return EditRequest(self.prompt, self.subject, self.alt, self.answers[0], case_id=self.case_id)

    @property
    def target_new(self) -> str:
        return self.alt

    @property
    def target_true(self) -> str:
        return self.answers[0]

    @property
    def text(self) -> str:
        return self.src

    @property
    def paraphrase_prompts(self) -> list[str]:
        return [self.rephrase]

    @property
    def neighborhood_prompts(self) -> list[str]:
        return [self.loc]

    @property
    def neighborhood_targets(self) -> list[str]:
        return [self.loc_ans]

    def neighborhood_target(self, i: int) -> str:
        return self.neighborhood_targets[i]

    @property
    def generation_prompts(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        """The MEND layout (plus ``case_id``)."""
        return {"case_id": self.case_id, "subject": self.subject, "src": self.src, "pred": self.pred,
                "rephrase": self.rephrase, "alt": self.alt, "answers": list(self.answers), "loc": self.loc,
                "loc_ans": self.loc_ans, "cond": self.cond}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], case_id: Any = None) -> "ZsreRecord":
        if isinstance(d, ZsreRecord):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a dict or ZsreRecord, got {type(d).__name__}")
        missing = [k for k in ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans") if k not in d]
        if missing:
            raise ValueError(f"zsRE record lacks {missing} (keys: {sorted(d)}); expected the MEND layout "
                             "subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond")
        return cls(case_id=d.get("case_id", case_id), subject=d["subject"], src=d["src"], rephrase=d["rephrase"],
                   alt=d["alt"], answers=d["answers"], loc=d["loc"], loc_ans=d["loc_ans"], pred=d.get("pred"),
                   cond=d.get("cond"))


def load_zsre(source: Any = None, n: int | None = None, seed: int | None = None, *,
              skip_invalid: bool = False) -> list[ZsreRecord]:
    """zsRE records in the MEND layout.

    ``source``: ``None`` / ``"zsre"`` downloads the official ``zsre_mem_eval.json``
    once into ``$EDITKIT_CACHE/data`` (a clear :class:`DatasetUnavailableError`
    offline); a local JSON path; or a list of dicts / records. ``case_id`` is the
    position in the file when the file has none. ``seed`` shuffles
    deterministically, then the first ``n`` are kept. A question that does not
    contain its subject raises (naming the record) unless ``skip_invalid=True``.
    """
    if source is None or (isinstance(source, str) and source.lower() in ZSRE_URLS):
        raw = read_records(fetch(ZSRE_URLS["zsre"], "zsre_mem_eval.json", "zsRE",
                                 "ek.load_zsre('/path/to/zsre_mem_eval.json')"))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        if not path.is_file():
            hint = "" if looks_like_path(str(source)) else " (known names: 'zsre')"
            raise FileNotFoundError(f"zsRE file {str(source)!r} does not exist{hint}; pass the path of a MEND-layout "
                                    "zsRE JSON file, or source=None to download the official one")
        raw = read_records(path)
    else:
        raw = list(source)
    records = parse_all(raw, lambda d, i: ZsreRecord.from_dict(d, case_id=i), skip_invalid, "zsRE")
    return sample(records, n, seed)
