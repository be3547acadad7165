"""Checking the shape of JSON documents Strata keeps in files.

A document edited by hand, cut short by a full disk or written by another
version must be refused with what is wrong and where (``tenants.acme.primary:
expected an integer, got a string``), never followed into a ``KeyError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_KINDS: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


@dataclass(frozen=True)
class Fields:
    """An object with these fields (``required`` must be present)."""

    required: dict[str, Shape]
    optional: dict[str, Shape] = field(default_factory=dict)


@dataclass(frozen=True)
class MapOf:
    """An object whose every value has one shape; ``digit_keys``: its keys
    are non-negative integers written out (version numbers)."""

    value: Shape
    digit_keys: bool = False


Shape = type | tuple[type, ...] | Fields | MapOf


def _kind(value: object) -> str:
    for kind, name in _KINDS.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def shape_problem(value: Any, shape: Shape, where: str = "") -> str | None:
    """What is wrong with ``value`` against ``shape``, naming the field (its
    path from ``where``, the document itself when empty); None when nothing is."""
    here = where or "the document"
    if isinstance(shape, Fields):
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {_kind(value)}"
        for name in shape.required:
            if name not in value:
                return f"{_at(where, name)}: missing"
        for name, sub in (*shape.required.items(), *shape.optional.items()):
            if name in value:
                problem = shape_problem(value[name], sub, _at(where, name))
                if problem is not None:
                    return problem
        return None
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {_kind(value)}"
        for key, item in value.items():
            if shape.digit_keys and not (key.isascii() and key.isdigit()):
                return f"{here}: key {key!r} is not a version number"
            problem = shape_problem(item, shape.value, _at(where, key))
            if problem is not None:
                return problem
        return None
    kinds = shape if isinstance(shape, tuple) else (shape,)
    # bool is an int to Python, never to a document's reader.
    if type(value) not in kinds and not (float in kinds and type(value) is int):
        wanted = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        return f"{here}: expected {wanted}, got {_kind(value)}"
    return None
