"""One small generic registry for backbones, adapters, tasks, runtimes and datasets.

An entry is (name, builder, config class). Duplicate names raise; unknown names raise with the list of
known ones. The registry is the only list: the CLI, the app and parametrized tests all read it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(LookupError):
    """An unknown registry name; the message lists the known names."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered builder and the dataclass that configures it."""

    name: str
    builder: T
    config_cls: type | None
    help: str
    # what the generated contract tests need: a tiny, offline build spec (e.g. {"name": "timm:vit_tiny…",
    # "pretrained": False}) or synthetic-data hints; None = the entry is not instantiable offline
    spec: dict[str, Any] | None = None
    # capabilities this entry needs from its partners, e.g. ("tokens",) for a token backbone only, ("denoiser",);
    # a tag "a|b" is met by either alternative (see :func:`unmet`)
    requires: tuple[str, ...] = ()
    # capabilities this entry offers (a backbone's "tokens", "image", "points", "text", "diffusion" …; a task's
    # "pooled" when its head reads the backbone's pooled feature vector, "text" when it binds a text encoder)
    provides: tuple[str, ...] = ()


class Registry(Generic[T]):
    """A name → (builder, config class) map with loud errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        config_cls: type | None = None,
        help: str = "",
        spec: dict[str, Any] | None = None,
        requires: tuple[str, ...] = (),
        provides: tuple[str, ...] = (),
    ) -> Callable[[T], T]:
        """Decorator registering ``builder`` under ``name`` (with the test spec and capability tags)."""

        def deco(builder: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = help or (getattr(builder, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, config_cls, doc, spec, tuple(requires), tuple(provides))
            return builder

        return deco

    def get(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise naming the known ones."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def items(self) -> list[tuple[str, Entry[T]]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


def describe(obj: Any) -> str:
    """First docstring line of an object, for listings."""
    return (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]


def unmet(requires: Iterable[str], offered: Iterable[str]) -> list[str]:
    """The required capability tags that ``offered`` does not meet, in order; ``"a|b"`` is met by ``a`` or ``b``."""
    have = set(offered)
    return [tag for tag in requires if not set(tag.split("|")) & have]


def satisfied(requires: Iterable[str], offered: Iterable[str]) -> bool:
    """``offered`` meets every tag of ``requires`` (alternatives ``"a|b"`` included)."""
    return not unmet(requires, offered)
