"""Public names that load their module on first access, so importing a package (and a console script's `--help`)
loads no torch. It sits here, at the bottom of the package's layers, because every package uses it and this folder
travels as remote code on its own.

A package lists its public names once, as the imports of its `if TYPE_CHECKING:` block (what type checkers and
editors read); `type_checking_imports` reads that block back (with `ast`, importing nothing) into the name -> module
table that `lazy_names` resolves from and that the package's `__all__` is made of; `lazy_package` does both, as the
last line of the package's `__init__.py`:

    __all__, __getattr__, __dir__ = lazy_package(__file__, __name__, globals())
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
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
            # A submodule, loaded on first access as `import package.name` would (`imagebert_hf.metrics....`).
            if name.isidentifier() and not name.startswith("_") and _has_submodule(package, name):
                return importlib.import_module(f".{name}", package)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__


def _has_submodule(package: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def type_checking_imports(init_file: str, package: str) -> dict[str, list[str]]:
    """Module (relative to `package`) -> the names that the `if TYPE_CHECKING:` block of the package's `__init__.py`
    imports from it, in order. `from .sub import *` stands for the names in `sub.__all__` (`sub` being a package of
    lazy names itself, importing it loads nothing heavy).

    Args:
        init_file: The package's `__file__`.
        package: The package's `__name__`.

    Raises:
        ImportError: naming the file and line of an entry that is not a `from .module import name, ...` line.
    """
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"))
    modules: dict[str, list[str]] = {}
    for block in tree.body:
        if not (isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"):
            continue
        for node in block.body:
            if not (isinstance(node, ast.ImportFrom) and node.level == 1 and not any(a.asname for a in node.names)):
                raise ImportError(
                    f"{init_file}, line {node.lineno}: the TYPE_CHECKING block holds {ast.unparse(node)!r}; expected "
                    "only `from .module import name, ...` lines (no alias), the package's public names."
                )
            names = [alias.name for alias in node.names]
            if names == ["*"]:
                names = list(importlib.import_module(f".{node.module}", package).__all__)
            modules.setdefault(node.module, []).extend(names)
    return modules


def lazy_package(
    init_file: str, package: str, namespace: dict[str, Any]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """The `__all__`, `__getattr__` and `__dir__` of a package whose public names are the imports of the
    `if TYPE_CHECKING:` block of its `__init__.py`: that block read by `type_checking_imports`, resolved by
    `lazy_names`.

    Args:
        init_file: The package's `__file__`.
        package: The package's `__name__`.
        namespace: The package's `globals()`.
    """
    modules = type_checking_imports(init_file, package)
    return [name for names in modules.values() for name in names], *lazy_names(package, modules, namespace)


__all__ = ["lazy_names", "lazy_package", "type_checking_imports"]
