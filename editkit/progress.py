"""Progress bars: tqdm's widget in a live notebook, plain text in an executed copy.

A notebook executed headless (papermill; ``editkit figures`` and ``editkit run``) saves each
widget bar as the text of its first frame, so the executed copy shows "0%" forever. With
``EDITKIT_PROGRESS=text`` (what ``editkit figures``/``run`` set for their kernels) the bars are
written as text to stdout instead, and the copy keeps their last frame (100%, the time taken);
``EDITKIT_PROGRESS=off`` hides them; unset or ``auto``: ``tqdm.auto`` (widgets in Jupyter, text
in a terminal). Read at every bar, so a running kernel can switch.
"""
from __future__ import annotations

import os
import sys
from typing import Any

MODES = ("auto", "text", "off")


def mode() -> str:
    """The progress mode from ``EDITKIT_PROGRESS`` (``auto``, ``text`` or ``off``)."""
    value = os.environ.get("EDITKIT_PROGRESS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"EDITKIT_PROGRESS={value!r}: choose one of {MODES}")
    return value


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, or its text form or a disabled bar as :func:`mode` says."""
    m = mode()
    if m == "auto":
        from tqdm.auto import tqdm as bar

        return bar(*args, **kwargs)
    kwargs.setdefault("file", sys.stdout)  # stdout: plain output in Jupyter, not a red stderr box
    kwargs.setdefault("mininterval", 2.0)  # every frame is kept in the executed copy: a few, not hundreds
    if m == "off":
        kwargs["disable"] = True
    return _TextBar(*args, **kwargs)


def _text_bar() -> type:
    from tqdm.std import tqdm as std

    class TextBar(std):
        """A text bar whose postfix waits for the next frame instead of drawing one of its own."""

        def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

    return TextBar


_TextBar = _text_bar()
