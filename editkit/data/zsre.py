"""zsRE question-answering edits in the MEND layout (``subject, src, pred, rephrase,
alt, answers, loc, loc_ans, cond``), as in ROME/MEMIT's ``zsre_mem_eval.json``.

Two definitions of the zsRE edit are in use, and they score different things:

* ``"rome"`` (ROME/MEMIT, the default): the edit writes the *correct* answer
  ``answers[0]`` (there is no counterfactual "true" object, so only top-1 / token
  accuracies are defined: ES_top1, ES_acc, ...), and the locality prompt is
  ``loc + "?"``;
* ``"mend"`` (MEND/EasyEdit): the edit writes the alternative answer ``alt`` against
  ``answers[0]``, and the locality prompt is ``loc`` as given.

:func:`editkit.metrics.evaluate` names the definition in its ``dataset`` column
(``"zsre-rome"`` / ``"zsre-mend"``). The edit prompt is the question itself with the
subject replaced by ``{}``; a question that does not contain its subject cannot be edited
by locate-and-edit methods (there is no subject token), so such records raise at
load time, or are dropped and counted with ``skip_invalid=True``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..requests import EditRequest, RequestError
from ._common import check_unique_ids, fetch, looks_like_path, parse_all, read_records, sample

log = logging.getLogger(__name__)

__all__ = ["ZsreRecord", "load_zsre", "ZSRE_URLS", "ZSRE_DEFINITIONS"]

#: zsRE definitions: name -> (what the edit writes, locality prompt).
ZSRE_DEFINITIONS = {"rome": "target answers[0], locality prompt loc + '?' (ROME/MEMIT)",
                    "mend": "target alt against answers[0], locality prompt loc (MEND/EasyEdit)"}

#: The official evaluation file of the ROME/MEMIT release.
ZSRE_URLS: dict[str, str] = {"zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json"}


@dataclass
class ZsreRecord:
    """One zsRE edit. It offers the same scoring interface as
    :class:`~editkit.data.CounterFactRecord` (``request``, ``paraphrase_prompts``,
    ``neighborhood_prompts`` with per-prompt ``neighborhood_targets``), so
    :func:`editkit.metrics.evaluate` treats both alike: rewrite = ``src``,
    paraphrase = ``rephrase``, neighborhood = the locality prompt → ``loc_ans``
    (which must stay unchanged). ``definition`` (see :data:`ZSRE_DEFINITIONS`) says
    what the edit writes and how the locality prompt reads."""

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
    definition: str = "rome"
    prompt: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.definition not in ZSRE_DEFINITIONS:
            raise ValueError(f"definition={self.definition!r}: choose 'rome' (ROME/MEMIT: {ZSRE_DEFINITIONS['rome']}) "
                             f"or 'mend' ({ZSRE_DEFINITIONS['mend']})")
        self.answers = [self.answers] if isinstance(self.answers, str) else list(self.answers)
        if not self.answers or not isinstance(self.answers[0], str) or not self.answers[0].strip():
            raise ValueError(f"case_id={self.case_id!r}: 'answers' is empty; zsRE needs the true answer first")
        if not isinstance(self.alt, str) or not self.alt.strip():
            raise RequestError(f"case_id={self.case_id!r}: 'alt' is empty ({self.alt!r}); the record has no "
                               "alternative answer. Pass skip_invalid=True to ek.load_zsre to drop such records")
        try:
            self.prompt = EditRequest.from_filled(self.src, self.subject, self.alt).prompt
        except RequestError as exc:
            raise RequestError(f"case_id={self.case_id!r}: {exc}") from None

    # --- the scoring interface shared with CounterFactRecord ------------------
    @property
    def request(self) -> EditRequest:
        """The edit on question ``src`` (subject as ``{}``): ``answers[0]`` under the ROME/MEMIT
        definition (no target_true), ``alt`` against ``answers[0]`` under MEND's (no target_true
        when ``alt`` equals it)."""
        return EditRequest(self.prompt, self.subject, self.target_new, self._request_true, case_id=self.case_id)

    @property
    def _request_true(self) -> str | None:
        # zsRE's eval split has records whose ``alt`` *is* the true answer (10 of the 500 MEND
        # records; the edit then reinforces it). EditRequest rejects target_new == target_true,
        # so such a request carries no target_true; scoring still uses ``target_true``.
        true = self.target_true
        return None if true is not None and true.strip() == self.target_new.strip() else true

    @property
    def dataset(self) -> str:
        """The name :func:`editkit.metrics.evaluate` writes in its ``dataset`` column."""
        return f"zsre-{self.definition}"

    @property
    def target_new(self) -> str:
        return self.answers[0] if self.definition == "rome" else self.alt

    @property
    def target_true(self) -> str | None:
        return None if self.definition == "rome" else self.answers[0]

    @property
    def text(self) -> str:
        return self.src

    @property
    def paraphrase_prompts(self) -> list[str]:
        return [self.rephrase]

    @property
    def neighborhood_prompts(self) -> list[str]:
        return [self.loc + "?" if self.definition == "rome" else self.loc]

    @property
    def neighborhood_targets(self) -> list[str]:
        return [self.loc_ans]

    def neighborhood_target(self, i: int) -> str:
        return self.neighborhood_targets[i]

    @property
    def generation_prompts(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        """The MEND layout (plus ``case_id`` and ``definition``)."""
        return {"case_id": self.case_id, "subject": self.subject, "src": self.src, "pred": self.pred,
                "rephrase": self.rephrase, "alt": self.alt, "answers": list(self.answers), "loc": self.loc,
                "loc_ans": self.loc_ans, "cond": self.cond, "definition": self.definition}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], case_id: Any = None, definition: str | None = None) -> "ZsreRecord":
        if isinstance(d, ZsreRecord):
            return d if definition in (None, d.definition) else replace(d, definition=definition)
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a dict or ZsreRecord, got {type(d).__name__}")
        missing = [k for k in ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans") if k not in d]
        if missing:
            raise ValueError(f"zsRE record lacks {missing} (keys: {sorted(d)}); expected the MEND layout "
                             "subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond")
        return cls(case_id=d.get("case_id", case_id), subject=d["subject"], src=d["src"], rephrase=d["rephrase"],
                   alt=d["alt"], answers=d["answers"], loc=d["loc"], loc_ans=d["loc_ans"], pred=d.get("pred"),
                   cond=d.get("cond"), definition=definition or d.get("definition", "rome"))


def load_zsre(source: Any = None, n: int | None = None, seed: int | None = None, *,
              skip_invalid: bool = False, definition: str = "rome") -> list[ZsreRecord]:
    """zsRE records in the MEND layout, under ``definition`` ``"rome"`` (ROME/MEMIT: the edit
    writes ``answers[0]``, locality prompt ``loc + "?"``; the default) or ``"mend"``
    (MEND/EasyEdit: the edit writes ``alt``, locality prompt ``loc``).

    ``source``: ``None`` / ``"zsre"`` downloads the official ``zsre_mem_eval.json``
    once into ``$EDITKIT_CACHE/data`` (a clear :class:`DatasetUnavailableError`
    offline); a local JSON path; or a list of dicts / records. ``case_id`` is the
    position in the file when the file has none. ``seed`` shuffles
    deterministically, then the first ``n`` are kept. A question that does not
    contain its subject, or whose ``alt`` is empty, raises (naming the record) unless
    ``skip_invalid=True``.
    """
    if source is None or (isinstance(source, str) and source.lower() in ZSRE_URLS):
        raw = read_records(fetch(ZSRE_URLS["zsre"], "zsre_mem_eval.json", "zsRE",
                                 "ek.load_zsre('/path/to/zsre_mem_eval.json')"))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        if not path.exists():
            hint = "" if looks_like_path(str(source)) else " (known names: 'zsre')"
            raise FileNotFoundError(f"zsRE file {str(source)!r} does not exist{hint}; pass the path of a MEND-layout "
                                    "zsRE JSON file, or source=None to download the official one")
        raw = read_records(path)
    else:
        raw = list(source)
    if definition not in ZSRE_DEFINITIONS:
        raise ValueError(f"definition={definition!r}: choose 'rome' ({ZSRE_DEFINITIONS['rome']}) or 'mend' "
                         f"({ZSRE_DEFINITIONS['mend']})")
    records = parse_all(raw, lambda d, i: ZsreRecord.from_dict(d, case_id=i, definition=definition), skip_invalid,
                        "zsRE")
    check_unique_ids(records, "zsRE")
    return sample(records, n, seed)
