"""Public names that load their module on first access, so importing a package (and a console script's `--help`)
loads no torch. It sits here, at the bottom of the package's layers, because every package uses it and this folder
travels as remote code on its own."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(
    package: str, modules: dict[str, list[str]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package` (PEP 562).

    Args:
        package: The package's `__name__`.
        modules: Module (relative to the package) -> the public names it defines.
        namespace: The package's `globals()`; a name, once loaded, is stored there so later lookups skip `__getattr__`.
    """
    defined_in = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = defined_in.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__


__all__ = ["lazy_names"]
