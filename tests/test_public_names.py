"""Every public module says what it exports (`__all__`), and every exported name exists."""

import ast
import importlib

import pytest

import imagebert_hf

from .test_layering import SOURCE, module_name


PUBLIC_MODULES = sorted(
    module_name(path)
    for path in SOURCE.rglob("*.py")
    if not any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(SOURCE).parts)
)


def test_every_public_module_has_all():
    missing = []
    for path in sorted(SOURCE.rglob("*.py")):
        if module_name(path) not in PUBLIC_MODULES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # `__all__ = [...]`, or one name of a tuple assignment (`__all__, __getattr__, __dir__ = lazy_package(...)`)
        assigned = {
            name.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for name in (target.elts if isinstance(target, ast.Tuple) else [target])
            if isinstance(name, ast.Name)
        }
        if "__all__" not in assigned:
            missing.append(str(path.relative_to(SOURCE)))
    assert not missing, f"modules without __all__: {missing}"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_name_in_all_exists(module):
    loaded = importlib.import_module(module)
    names = loaded.__all__
    assert len(names) == len(set(names)), f"{module}.__all__ lists a name twice"
    missing = [name for name in names if not hasattr(loaded, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"


def test_the_package_exports_exactly_its_all():
    tree = ast.parse((SOURCE / "__init__.py").read_text(encoding="utf-8"))
    bound = set()
    # the package binds its public names lazily; its `if TYPE_CHECKING:` block spells out each name's import
    type_checking = [
        block for block in tree.body if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
    ]
    for node in tree.body + [node for block in type_checking for node in block.body]:
        if isinstance(node, ast.ImportFrom) and [alias.name for alias in node.names] == ["*"]:
            # `from .subpackage import *`: the names the subpackage exports
            bound.update(importlib.import_module(f"{imagebert_hf.__name__}.{node.module}").__all__)
        elif isinstance(node, ast.ImportFrom) and node.module != "typing":
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    public = {name for name in bound if not name.startswith("_")}
    assert set(imagebert_hf.__all__) == public
    assert imagebert_hf.__version__
