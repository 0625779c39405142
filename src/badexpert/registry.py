"""One registry type for everything badexpert names: datasets, architectures, attacks, detectors.

A :class:`Registry` maps canonical names to factories (classes or functions) and looks names up
with one normalisation shared by all of them: case, ``-``, ``_`` and spaces do not matter
(``Fashion_MNIST``, ``fashion-mnist`` and ``fashionmnist`` are one name), plus per-registry
aliases. The CLI's help texts, configs and the test parametrisation read the registries, so
adding an entry is one line where it is defined.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from .errors import unknown_name


def name_key(name: str) -> str:
    """The one name normalisation: lower case, without ``-``, ``_`` and spaces."""
    return re.sub(r"[\s_-]", "", name.lower())


class Registry(dict):
    """``canonical name -> factory``, with :meth:`canonical` lookup by :func:`name_key` and aliases.

    It is a plain ``dict`` of the canonical names, so ``name in REGISTRY`` and ``REGISTRY[name]``
    work for canonical names; use :meth:`canonical` / :meth:`get_factory` for user input.
    """

    def __init__(self, kind: str, entries: Iterable[tuple[str, Any]] = (), aliases: dict[str, str] | None = None):
        super().__init__()
        self.kind = kind
        self._keys: dict[str, str] = {}
        for name, factory in entries:
            self.add(name, factory)
        for alias, name in (aliases or {}).items():
            self._keys[name_key(alias)] = name

    def add(self, name: str, factory: Any) -> Any:
        key = name_key(name)
        if key in self._keys and self._keys[key] != name:
            raise ValueError(f"{self.kind} '{name}' clashes with '{self._keys[key]}'")
        self[name] = factory
        self._keys[key] = name
        return factory

    def remove(self, name: str) -> Any:
        """Take an entry (and its aliases) out again, e.g. one a test added; returns its factory."""
        canonical = self.canonical(name)
        for key in [k for k, v in self._keys.items() if v == canonical]:
            del self._keys[key]
        return self.pop(canonical)

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register()`` (the class's ``name``) or ``.register("name")``."""
        return lambda factory: self.add(name or factory.name, factory)

    def canonical(self, name: Any) -> str:
        """The canonical name for user input, or a one-line error listing the choices."""
        found = self._keys.get(name_key(name)) if isinstance(name, str) else None
        if found is None:
            raise unknown_name(self.kind, str(name), self)
        return found

    def get_factory(self, name: Any) -> Any:
        return self[self.canonical(name)]

    def choices(self) -> str:
        """``"a, b or c"`` for help texts."""
        names = list(self)
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


__all__ = ["Registry", "name_key"]
