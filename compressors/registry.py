"""Name -> object registries with helpful errors (``unknown quantizer 'lsqq'; did you mean 'lsq'?``)."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry key; its message says what is known."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def did_you_mean(name: str, known: list[str] | tuple[str, ...], kind: str, *,
                 shown: list[str] | tuple[str, ...] | None = None, more: str = "") -> str:
    """``unknown target 'arm-a27'; did you mean 'arm-a72'? known: ...`` (``shown`` limits the list)."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    listed = ", ".join(sorted(set(shown if shown is not None else known)))
    return f"unknown {kind} {name!r}{hint} known: {listed}{more}"


class Registry(Generic[T]):
    """A named collection of methods of one kind.

    Example:
        >>> R = Registry("quantizer")
        >>> @R.register("uniform", summary="uniform affine")
        ... def f(): ...
        >>> R.get("uniform") is f
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, *, summary: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._summaries[name] = summary or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            return obj
        return deco

    def add(self, name: str, obj: T, *, summary: str = "") -> T:
        return self.register(name, summary=summary)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(did_you_mean(name, list(self._items), self.kind)) from None

    def summary(self, name: str) -> str:
        return self._summaries.get(name, "")

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
