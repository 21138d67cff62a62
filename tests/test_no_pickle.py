"""No file a user hands us is unpickled: every loader of the package and the examples is read with `ast`, and a call
that can run code from a file (`torch.load` without `weights_only=True`, `pickle.load`, `np.load(allow_pickle=True)`,
`yaml.load` with an unsafe loader, ...) fails the test, naming the file and line. A crafted pickle given as the
evaluation's corpus cache is refused without running."""

import ast
import pickle
import re

import pytest
import torch

from .testing_utils import PROJECT_ROOT


SCANNED = [PROJECT_ROOT / "src" / "imagebert_hf", PROJECT_ROOT / "examples"]

# module.attribute calls that unpickle (or otherwise execute) what they read, whatever their arguments.
ALWAYS_UNSAFE = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("torch.jit", "load"),
}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "_unique_key_loader")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: why` for every call in `source` that can execute code from what it reads."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        owner, _, attribute = name.rpartition(".")
        where = f"{filename}:{node.lineno}"
        if (owner, attribute) in ALWAYS_UNSAFE or name in ("Unpickler", "read_pickle"):
            problems.append(f"{where}: {name}(...) unpickles or executes what it reads")
        elif attribute == "load" and owner == "torch":
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{where}: torch.load(...) without weights_only=True")
        elif attribute == "load" and owner in ("np", "numpy"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}: {name}(..., allow_pickle=...) may unpickle")
        elif attribute == "load" and owner == "yaml":
            loader = _keyword(node, "Loader")
            loader_name = _dotted(loader.func if isinstance(loader, ast.Call) else loader) if loader else ""
            if not loader_name.endswith(SAFE_YAML_LOADERS):
                problems.append(f"{where}: yaml.load(...) without a SafeLoader")
    return problems


def python_files():
    return sorted(path for folder in SCANNED for path in folder.rglob("*.py"))


def test_the_scan_sees_the_package_and_the_examples():
    files = python_files()
    assert len(files) > 50
    assert any(path.name == "full_ranking.py" for path in files)
    assert any(path.parent.name == "examples" for path in files)


def test_no_file_of_the_package_or_the_examples_unpickles():
    problems = []
    for path in python_files():
        problems += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PROJECT_ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "snippet, reason",
    [
        ("torch.load(path)", "torch.load.*without weights_only=True"),
        ("torch.load(path, weights_only=False)", "torch.load.*without weights_only=True"),
        ("torch.load(path, weights_only=flag)", "torch.load.*without weights_only=True"),
        ("pickle.load(handle)", "pickle.load.*unpickles"),
        ("pickle.loads(data)", "pickle.loads.*unpickles"),
        ("pickle.Unpickler(handle).load()", "pickle.Unpickler.*unpickles"),
        ("np.load(path, allow_pickle=True)", "np.load.*may unpickle"),
        ("numpy.load(path, allow_pickle=flag)", "numpy.load.*may unpickle"),
        ("joblib.load(path)", "joblib.load"),
        ("pd.read_pickle(path)", "pd.read_pickle"),
        ("yaml.load(handle)", "yaml.load.*SafeLoader"),
        ("yaml.load(handle, Loader=yaml.Loader)", "yaml.load.*SafeLoader"),
        ("yaml.unsafe_load(handle)", "yaml.unsafe_load"),
        ("marshal.loads(data)", "marshal.loads"),
        ("shelve.open(path)", "shelve.open"),
    ],
)
def test_the_scan_catches_an_unsafe_loader(snippet, reason):
    problems = unsafe_calls(f"def f(path, handle, data, flag):\n    return {snippet}\n", "bad.py")
    assert len(problems) == 1
    assert problems[0].startswith("bad.py:2: ")
    assert re.search(reason, problems[0]), problems[0]


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(path)",
        "np.load(path, allow_pickle=False)",
        "yaml.load(handle, Loader=yaml.SafeLoader)",
        "json.load(handle)",
    ],
)
def test_the_scan_lets_safe_loaders_through(snippet):
    assert unsafe_calls(f"def f(path, handle):\n    return {snippet}\n") == []


MARKER_NAME = "pickle-ran.txt"


class _RunsCode:
    """Unpickling this object would write a marker file: proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as handle:
        handle.write("code ran")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_crafted_pickle_corpus_cache_is_refused_and_never_runs(tmp_path, writer):
    from imagebert_hf.evaluation.full_ranking import CorpusCacheError, load_corpus_cache

    marker = tmp_path / MARKER_NAME
    cache = tmp_path / "corpus.pt"
    payload = {"image_ids": ["a"], "texts": ["t"], "text_to_image": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, cache)
    else:
        cache.write_bytes(pickle.dumps(payload))
    with pytest.raises(CorpusCacheError, match=r"corpus.pt is not a corpus cache.*pickles, which are never loaded"):
        load_corpus_cache(cache, {"dataset": "synthetic"})
    assert not marker.exists()


def test_an_evaluation_run_refuses_a_pickle_left_by_an_older_version(tmp_path, tokenizer, make_tiny_config):
    from imagebert_hf.evaluation.full_ranking import CorpusCacheError, EvaluationArguments, load_evaluation_corpus

    marker = tmp_path / MARKER_NAME
    cache = tmp_path / "c.pt"
    torch.save({"image_ids": _RunsCode(marker)}, cache)
    args = EvaluationArguments(
        output_dir=str(tmp_path), dataset="synthetic", synthetic_images=3, corpus_cache=str(cache)
    )
    with pytest.raises(CorpusCacheError, match="never loaded"):
        load_evaluation_corpus(args, tokenizer, make_tiny_config(vocab_size=len(tokenizer)))
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_checkpoint_with_a_crafted_random_state_file_is_refused_and_never_runs(tmp_path, writer):
    """accelerate skips a random-state file it cannot read without a word; resuming from one must fail, naming it."""
    from accelerate import Accelerator

    from imagebert_hf.training.checkpointing import TrainState, load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    checkpoint = save_checkpoint(accelerator, tmp_path / "checkpoints", TrainState(completed_steps=3))
    assert load_checkpoint(accelerator, checkpoint).completed_steps == 3  # the file as saved loads

    marker = tmp_path / MARKER_NAME
    random_states = checkpoint / "random_states_0.pkl"
    payload = {"random_state": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, random_states)
    else:
        random_states.write_bytes(pickle.dumps(payload))
    weights = model.weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"random_states_0\.pkl: this checkpoint.s random-state file does not load as tensors"
    ):
        load_checkpoint(accelerator, checkpoint)
    assert not marker.exists()
    torch.testing.assert_close(model.weight.detach(), weights)  # refused before anything was restored
