"""Name tables: ``model.name``, ``method.name`` and ``data.dataset`` -> what builds or describes it;
``model.backbone`` -> its network.

``dssn.models`` and ``dssn.method`` fill them as they are imported (which importing
``dssn`` does), so the config, the command line and the builders read one list.
A new model or method is its own file plus one ``add`` line in its package.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from dssn.errors import DssnError

T = TypeVar("T")


class UnknownNameError(DssnError, ValueError):
    """A name no entry of the registry has; the message lists the ones it has."""


class Registry(Generic[T]):
    def __init__(self, key: str) -> None:
        self.key = key
        """The config key whose values name the entries (for messages)."""
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.key} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Take an entry out again (a test that registers its own)."""
        return self._entries.pop(self.check(name))

    def names(self) -> list[str]:
        return list(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else an error that suggests the closest names."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.key} '{name}'{hint} Registered: {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


MODELS: Registry = Registry("model.name")
METHODS: Registry = Registry("method.name")
DATASETS: Registry = Registry("data.dataset")
"""Dataset layouts (``dssn.data.catalog.DatasetSpec``), filled by ``dssn.data``."""
BACKBONES: Registry = Registry("model.backbone")
"""``model.backbone`` name -> the ``model.name`` that takes it."""
