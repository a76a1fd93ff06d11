"""Every docstring example in the package runs (as ``squeezer.*``, the way users import it)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import squeezer


def _modules() -> list[str]:
    names = ["squeezer"]
    for info in pkgutil.walk_packages(squeezer.__path__, "squeezer."):
        if info.name != "squeezer.__main__":
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
