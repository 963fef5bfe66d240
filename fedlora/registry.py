"""Open registries: strategies, client hooks, data sources, partitioners, evaluators and models by name.

Built-ins register themselves with a decorator where they are defined; user code does the same, or ships a
Python entry point (group ``fedlora.<kind>``, e.g. ``fedlora.strategies``), or is named in a config's
``plugins:`` list (importable modules), which every process that reads the config imports first: so
``--resume``, ``fedlora eval`` and Flower nodes see the same names as the run that wrote it.

    @fedlora.register_strategy
    class MyMethod(fedlora.Strategy):
        name = "my-method"
        ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class UnknownName(LookupError):
    """A name no registry entry (built-in, registered, entry point or plugin) answers to."""


def unknown_name_message(field: str, kind: str, name: str, allowed: list[str]) -> str:
    """The one line that refuses a name no registry entry answers to."""
    return (
        f"config field '{field}': unknown {kind} {name!r} (allowed: {', '.join(allowed)}; "
        f"register your own with fedlora.register_* and list its module under plugins:)"
    )


class Registry(Generic[T]):
    """Name -> object, filled by ``register`` (a decorator) and, lazily, by entry points."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind  # "strategy", "data source", ...
        self.field = field  # the config field that names one, for error messages
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False
        self.entry_point_group = "fedlora." + {"strategy": "strategies"}.get(
            kind, kind.replace(" ", "_") + "s"
        )

    @overload
    def register(self, name: str, item: None = None, *, replace: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, item: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, item: T | None = None, *, replace: bool = False) -> Callable[[T], T] | T:
        """``registry.register("x", obj)``, or ``@registry.register("x")`` on a class or function."""

        def add(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered ({existing!r})")
            self._items[name] = obj
            return obj

        return add(item) if item is not None else add

    def _load(self) -> None:
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            for point in entry_points(group=self.entry_point_group):
                if point.name not in self._items:
                    self._items[point.name] = point.load()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise UnknownName(unknown_name_message(self.field, self.kind, name, self.names()))
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_plugins(modules: list[str]) -> None:
    """Import each module named in a config's ``plugins:`` (they register their names on import)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UnknownName(
                f"config field 'plugins': cannot import {module!r} ({err}); put it on PYTHONPATH or install it"
            ) from None
        except Exception as err:  # the plugin's own code failed while it was imported
            raise UnknownName(
                f"config field 'plugins': importing {module!r} failed ({type(err).__name__}: {str(err)[:200]}); "
                "fix the module or remove it from plugins"
            ) from None
