"""`import imagebert_hf` is cheap, yet the Auto classes and the pipeline still know ImageBERT with no further call.

Each check runs in a fresh interpreter, since the point is what one import statement loads (`sys.modules`) and what
it registers. The registration checks load a saved tiny model and processor right after `import imagebert_hf`, in
the orders a user may import things: transformers' Auto classes first or second, another transformers model first,
an ImageBERT class first.
"""

import ast
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imagebert_hf.models.imagebert.lazy_names import type_checking_imports

from .test_console_scripts import console_scripts
from .testing_utils import PROJECT_ROOT


HEAVY = ("torch", "torchvision", "transformers")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def loaded_after(statements: str) -> set[str]:
    """The heavy packages in `sys.modules` after running `statements` in a fresh interpreter."""
    done = run_python(
        f"""
        import sys
        {statements}
        print(*[name for name in {HEAVY!r} if name in sys.modules])
        """
    )
    return set(done.stdout.split())


def test_the_package_import_loads_no_heavy_package():
    assert loaded_after("import imagebert_hf") == set()


def spelled_imports(package: str) -> dict[str, str]:
    """Name -> defining module, as the `if TYPE_CHECKING:` block of `package`'s `__init__.py` spells it, a
    `from .sub import *` followed into `sub`'s own block."""
    init_file = PROJECT_ROOT / "src" / package.replace(".", "/") / "__init__.py"
    tree = ast.parse(init_file.read_text(encoding="utf-8"))
    spelled = {}
    for block in tree.body:
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING":
            for node in block.body:
                if [alias.name for alias in node.names] == ["*"]:
                    spelled.update(spelled_imports(f"{package}.{node.module}"))
                else:
                    spelled.update({alias.name: f"{package}.{node.module}" for alias in node.names})
    return spelled


@pytest.mark.parametrize(
    "package", ["imagebert_hf", "imagebert_hf.models.imagebert", "imagebert_hf.regions", "imagebert_hf.curation"]
)
def test_lazy_names_are_the_type_checking_imports(package):
    """A package's public names (`__all__`, what `dir` shows, what resolves) are the ones its `if TYPE_CHECKING:`
    block imports, each the object of the module that block names."""
    loaded = importlib.import_module(package)
    spelled = spelled_imports(package)
    assert spelled
    assert set(loaded.__all__) == set(spelled) | ({"register"} if package == "imagebert_hf" else set())
    assert set(loaded.__all__) <= set(dir(loaded))
    for name, module in spelled.items():
        assert getattr(loaded, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        loaded.NotAName  # noqa: B018


def test_a_type_checking_block_with_other_lines_is_refused(tmp_path):
    init_file = tmp_path / "__init__.py"
    init_file.write_text("if TYPE_CHECKING:\n    from .module import name as alias\n", encoding="utf-8")
    with pytest.raises(ImportError, match=r"__init__.py, line 2: the TYPE_CHECKING block holds 'from .module import"):
        type_checking_imports(str(init_file), "some_package")


# The console scripts whose `--help` must not load torch (what makes it slow).
LIGHT_SCRIPTS = ["imagebert-curate", "imagebert-app", "imagebert-convert-uniter", "imagebert-extract-regions"]


@pytest.mark.parametrize("script", LIGHT_SCRIPTS)
def test_help_of_a_console_script_loads_no_torch(script):
    module = console_scripts()[script]
    done = run_python(
        f"""
        import sys
        import {module} as script
        sys.argv = [{script!r}, "--help"]
        try:
            script.main()
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        print("loaded:", *[name for name in ("torch", "torchvision") if name in sys.modules])
        """
    )
    assert "usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "loaded:"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

    extractor = make_tiny_extractor(max_regions=10, return_class_probs=False)
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lazy-registration")
    ImageBERTForImageTextRetrieval(config).save_pretrained(folder)
    ImageBERTProcessor.from_model_config(config, tokenizer, extractor).save_pretrained(folder)
    return folder


# What runs before the checks, in a fresh interpreter: the orders a user may import things in.
PRELUDES = {
    "package only": "import imagebert_hf",
    "auto classes first": "from transformers import AutoModel\nimport imagebert_hf",
    "another model first": "import imagebert_hf\nfrom transformers import BertModel",
    "an imagebert class first": "import imagebert_hf\nfrom imagebert_hf import ImageBERTForPreTraining",
}


@pytest.mark.parametrize("prelude", list(PRELUDES))
def test_auto_classes_and_pipeline_know_imagebert_right_after_the_import(saved_model, prelude):
    done = run_python(
        PRELUDES[prelude]
        + textwrap.dedent(
            """
            import sys
            from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoProcessor, pipeline

            folder = sys.argv[1]
            print(type(AutoConfig.from_pretrained(folder)).__name__)
            print(type(AutoModel.from_pretrained(folder)).__name__)
            print(type(AutoModelForPreTraining.from_pretrained(folder)).__name__)
            print(type(imagebert_hf.AutoModelForImageTextRetrieval.from_pretrained(folder)).__name__)
            print(type(AutoProcessor.from_pretrained(folder)).__name__)
            print(type(pipeline("image-text-retrieval", model=folder, device=-1)).__name__)
            """
        ),
        str(saved_model),
    )
    assert done.stdout.split() == [
        "ImageBERTConfig",
        "ImageBERTModel",
        "ImageBERTForPreTraining",
        "ImageBERTForImageTextRetrieval",
        "ImageBERTProcessor",
        "ImageTextRetrievalPipeline",
    ]


def test_a_subpackage_is_reached_as_an_attribute_after_the_package_import():
    # The README's `evaluate.load(imagebert_hf.metrics.retrieval_metric_path())` once raised AttributeError unless
    # `imagebert_hf.metrics` had been imported by name; a name that is no submodule still raises.
    done = run_python(
        "import sys, imagebert_hf\n"
        "path = imagebert_hf.metrics.retrieval_metric_path()\n"
        "print(path.endswith('image_text_retrieval'), imagebert_hf.evaluation.recall.__name__)\n"
        "try:\n    imagebert_hf.no_such_part\nexcept AttributeError as error:\n    print(error)\n"
        "print(hasattr(imagebert_hf, 'no_such.part'), hasattr(imagebert_hf, '__wrapped__'))\n"
    )
    assert done.stdout.splitlines() == [
        "True imagebert_hf.evaluation.recall",
        "module 'imagebert_hf' has no attribute 'no_such_part'",
        "False False",
    ]
