"""Reading a JSON document field by field, with errors that name the field.

`Fields` wraps one JSON object of a document (the artifact manifest): each accessor returns the
value converted to its Python type or raises the document's error class (ArtifactError for a
manifest) with the field's path, e.g. ``manifest.json: models['model.onnx'].flops must be an
integer >= 0, got 'x'; recompile the artifact``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from dagc.errors import DagcError

__all__ = ["Fields"]

T = TypeVar("T")


class Fields:
    """One JSON object at path ``where`` of the document ``source``; see the module docstring.

    Every accessor takes a field name and returns its value converted, or raises ``error`` (a
    `DagcError` class) with the document, the field's path, what was expected, what was found and
    ``hint``. The constructor raises it too when ``value`` is not a JSON object.
    """

    def __init__(self, value: Any, where: str, source: str, error: type[DagcError], hint: str = "") -> None:
        self.source, self.where, self.error, self.hint = source, where, error, hint
        if not isinstance(value, Mapping):
            raise self.fail("", "a JSON object", value)
        self.d = value

    def path(self, key: str) -> str:
        """The path of field ``key`` of this object, for messages."""
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, what: str, value: Any) -> DagcError:
        """The error for field ``key`` (``""``: this object) not being ``what``."""
        where = self.path(key) if key else (self.where or "the document")
        return self.error(f"{self.source}: {where} must be {what}, got {value!r}{self.hint}")

    def only(self, *keys: str) -> None:
        """Refuse fields other than ``keys``."""
        unknown = sorted(set(self.d) - set(keys))
        if unknown:
            raise self.error(f"{self.source}: {self.where or 'the document'} has unknown field(s) {unknown}{self.hint}")

    def get(self, key: str) -> Any:
        """The raw value of field ``key``; raises the error if it is missing."""
        if key not in self.d:
            raise self.error(f"{self.source}: field {self.path(key)} is missing{self.hint}")
        return self.d[key]

    def optional(self, key: str, read: Callable[[str], T]) -> T | None:
        """``read(key)``, or None when the field is absent or null."""
        return None if self.d.get(key) is None else read(key)

    def child(self, key: str) -> Fields:
        """Field ``key``, a JSON object, as Fields; raises the error if it is not one."""
        return Fields(self.get(key), self.path(key), self.source, self.error, self.hint)

    def children(self, key: str) -> dict[str, Fields]:
        """A JSON object of objects: name -> its Fields (paths ``key['name']``)."""
        outer = self.child(key)
        return {str(k): Fields(v, f"{outer.where}[{k!r}]", self.source, self.error, self.hint)
                for k, v in outer.d.items()}

    def string(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        """A string (one of ``choices`` when given)."""
        v = self.get(key)
        if not isinstance(v, str) or (choices is not None and v not in choices):
            raise self.fail(key, f"one of {list(choices)}" if choices else "a string", v)
        return v

    def integer(self, key: str, low: int = 0) -> int:
        """An integer >= ``low`` (not a bool)."""
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.fail(key, f"an integer >= {low}", v)
        return v

    def number(self, key: str) -> float:
        """A finite number, as float."""
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(key, "a finite number", v)
        return float(v)

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        v = self.get(key)
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise self.fail(key, "a list of strings", v)
        return tuple(v)

    def integers(self, key: str, low: int = 0) -> tuple[int, ...]:
        """A list of integers >= ``low``, as a tuple."""
        v = self.get(key)
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= low for i in v):
            raise self.fail(key, f"a list of integers >= {low}", v)
        return tuple(v)
