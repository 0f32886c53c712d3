"""Discovery of plug-ins through entry points: datasets (group ``dagc.datasets``) and task kinds
(group ``dagc.kinds``) that an installed package provides, without editing dagc.

An entry point's object is the registration record itself -- a `dagc.trainer.data.Dataset`, or a
``(dagc.spec.TaskKind, dagc.trainer.kinds.KindTraining)`` pair -- or a callable taking no argument
that returns one. The entry point's name must be the registered name. `dagc.trainer.datasets`
and `dagc.trainer.kinds` load their group the first time their registry is consulted (a lookup,
`load_dataset`, `TrainConfig`, `kind_training`, ...), from the CLI and the API alike; a broken
plug-in raises `dagc.errors.PluginError` naming the entry point and what is wrong (and is tried
again on the next consultation, so it can be fixed in a running process).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points

from dagc.errors import DagcError, PluginError

DATASET_GROUP = "dagc.datasets"
KIND_GROUP = "dagc.kinds"

__all__ = ["DATASET_GROUP", "KIND_GROUP", "entry_point_objects", "plugin_names"]


def plugin_names(group: str) -> list[str]:
    """The names of the entry points of ``group`` the installed packages declare (none loaded)."""
    return sorted({ep.name for ep in entry_points(group=group)})


def entry_point_objects(group: str) -> Iterator[tuple[str, str, object]]:
    """Loads every entry point of ``group``; yields (its name, a description naming it for error
    messages, its object -- called first when it is a function or other callable). Raises
    PluginError when one fails to import or its callable raises (the message says which)."""
    seen: set[str] = set()
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        where = f"plug-in entry point {ep.name!r} = {ep.value!r} (group {group!r})"
        if ep.name in seen:
            raise PluginError(f"{where}: another installed entry point has the same name; uninstall one")
        seen.add(ep.name)
        try:
            obj = ep.load()
        except Exception as e:  # an import error, a missing attribute, anything the module raises
            raise PluginError(f"{where} fails to import: {type(e).__name__}: {_line(e)}") from None
        if callable(obj) and not isinstance(obj, type):
            try:
                obj = obj()
            except DagcError as e:
                raise PluginError(f"{where}: calling it raised: {_line(e)}") from None
            except Exception as e:
                raise PluginError(f"{where}: calling it raised {type(e).__name__}: {_line(e)}") from None
        yield ep.name, where, obj


def _line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or "(no message)"
