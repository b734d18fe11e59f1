"""The registry of methods by name (:data:`METHODS`, filled by ``@register``) and
:func:`make_editor`, the one way runners, widgets and the command line build an editor."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import Editor

#: Every editing method by name. ``@register`` adds one; runners, widgets and the CLI read it.
METHODS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    """Add an Editor dataclass to :data:`METHODS` under ``cls.method``, and let its
    constructor take the aliases and flat value settings :meth:`Editor.params` accepts.

    Use as a decorator above ``@dataclass(kw_only=True)``; a method is then one class
    and this one line. The class sets ``method``, ``constraint``, its ``reg`` default and
    ``aliases``, and overrides :meth:`Editor.keys` or :meth:`Editor.solve` when it changes
    those steps (e.g. un-prefixed keys, a projected solve)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Editor, **kw: Any) -> None:
        init(self, **cls.params(kw))

    cls.__init__ = __init__  # type: ignore[method-assign]
    for alias, name in cls.aliases.items():
        if not hasattr(cls, alias):  # read the paper's name too (ROME defines its own `layer`)
            setattr(cls, alias, property(_getter(name), doc=f"alias of ``{name}``"))
    METHODS[cls.method] = cls
    return cls


def _getter(name: str) -> Callable[[Editor], Any]:
    return lambda self: getattr(self, name)


def make_editor(method: str | type[Editor] | Editor, layers: int | Sequence[int] | None = None,
                preset: str | Path | None = None, **overrides: Any) -> Editor:
    """The one way to build an editor from settings: ``method`` (a :data:`METHODS` name,
    an Editor class, or an Editor used as the template), editing ``layers`` (a layer
    number or a list; default: the preset's), configured by ``preset`` if given, with
    ``overrides`` (any field, alias or value setting) on top."""
    if isinstance(method, Editor):
        cls = type(method)
        current = {f.name: getattr(method, f.name) for f in fields(method) if f.init}
        editor = cls(**cls.params(current, overrides))
    else:
        cls = method if isinstance(method, type) else METHODS.get(str(method))
        if cls is None:
            raise ValueError(f"method={method!r}: choose from {sorted(METHODS)} or pass an Editor")
        if preset is not None:
            editor = cls.preset(preset, **overrides)
        elif layers is None and "layers" not in cls.params(overrides):
            raise ValueError(f"layers: {cls.method} needs the layers to edit (or a preset that names them)")
        else:
            return cls(**cls.params(overrides, {} if layers is None else {"layers": layers}))
    return editor if layers is None else dataclasses.replace(editor, layers=layers)
