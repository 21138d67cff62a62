"""Files and codes named by `imagebert-curate` flags are checked before the output folder is touched: a bad
`--config_file`, model file, vocabulary, plug-in scorer or language code ends the command with one line naming the
flag, what it got and what was expected, and leaves an earlier run's output byte for byte as it was."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagebert_hf.curation import CurationConfig, LinearModel, run_local, synthetic
from imagebert_hf.curation.cli import main
from imagebert_hf.curation.config import TextCleaningConfig
from imagebert_hf.curation.pipeline import check_stage_inputs

from .testing_utils import require_module


pytestmark = [require_module("resiliparse"), require_module("wordfreq")]

# Flags that keep the demo page's pair and spare the NSFW detector's model.
LENIENT = ["--nsfw_detector", "none", "--natural_threshold", "0", "--relevance_threshold", "0"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A saved HTML page with its photo, and the output folder of a successful run on it."""
    root = tmp_path_factory.mktemp("crawl")
    site = root / "site"
    (site / "images").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(site / "images" / "walk.jpg", quality=85)
    page = synthetic.page_html(
        "Walk",
        "images/walk.jpg",
        alt="A man walking a dog in the park",
        paragraphs=synthetic.FILLER_PARAGRAPHS[:3],
    )
    (site / "walk.html").write_text(page)
    out = root / "out"
    assert main(["--inputs", str(site), "--output_dir", str(out), *LENIENT]) == 0
    snapshot = _snapshot(out)
    assert "config.json" in snapshot and any(name.startswith("data/") for name in snapshot)
    return site, out, snapshot


def _model_file(path: Path, **changes) -> Path:
    data = {"feature_names": ["a", "b"], "mean": [0.0, 0.0], "scale": [1.0, 1.0], "coef": [1.0, -1.0]}
    data["intercept"] = 0.0
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# (flags built in tmp_path, pieces the error line must hold)
BAD_INPUTS = {
    "config-a-list": (
        lambda d: ["--config_file", str(_write(d / "run.json", b"[1, 2]"))],
        ["--config_file", "run.json", "mapping of sections", "got list"],
    ),
    "config-value-of-wrong-type": (
        lambda d: ["--config_file", str(_write(d / "run.json", b'{"parse": {"max_page_bytes": "lots"}}'))],
        ["--config_file", "run.json", "parse.max_page_bytes", "integer", "'lots'"],
    ),
    "config-a-folder": (
        lambda d: ["--config_file", str(d)],
        ["--config_file", "cannot read {d}", "expected a JSON curation configuration"],
    ),
    "config-missing": (
        lambda d: ["--config_file", str(d / "missing.json")],
        ["--config_file", "missing.json", "cannot read", "expected a JSON curation configuration"],
    ),
    "relevance-model-a-list": (
        lambda d: ["--relevance_model_path", str(_write(d / "model.json", b"[1, 2]"))],
        ["relevance.relevance_model_path", "model.json", "holds a list", "expected a JSON linear model"],
    ),
    "relevance-model-missing": (
        lambda d: ["--relevance_model_path", str(d / "missing.json")],
        ["relevance.relevance_model_path", "missing.json", "cannot read", "expected a JSON linear model"],
    ),
    "relevance-model-a-folder": (
        lambda d: ["--relevance_model_path", str(d)],
        ["relevance.relevance_model_path", "cannot read {d}", "expected a JSON linear model"],
    ),
    "relevance-model-of-other-features": (
        lambda d: ["--relevance_model_path", str(_model_file(d / "model.json"))],
        ["relevance.relevance_model_path", "model.json", "other features", "relevance model"],
    ),
    "natural-model-bad-json": (
        lambda d: ["--natural_model_path", str(_write(d / "model.json", b'{"mean": "x\x01"}'))],
        ["images.natural_model_path", "model.json", "not valid JSON", "line 1", "expected a JSON linear model"],
    ),
    "natural-model-short-vector": (
        lambda d: ["--natural_model_path", str(_model_file(d / "model.json", coef=[1.0]))],
        ["images.natural_model_path", "model.json", "coef must be a list of 2 finite numbers", "[1.0]"],
    ),
    "nsfw-plugin-module-missing": (
        lambda d: ["--nsfw_detector", "no_such_module_here:Detector"],
        ["images.nsfw_detector", "cannot import", "'no_such_module_here'", "module:Class"],
    ),
    "natural-plugin-class-missing": (
        lambda d: ["--natural_classifier", "json:NoSuchClass"],
        ["images.natural_classifier", "has no class 'NoSuchClass'", "module:Class"],
    ),
    "vocabulary-missing": (
        lambda d: ["--vocabulary", str(d / "vocab.txt")],
        ["text.vocabulary", "vocab.txt", "cannot read", "one word per line"],
    ),
    "vocabulary-empty": (
        lambda d: ["--vocabulary", str(_write(d / "vocab.txt", b"\n  \n"))],
        ["text.vocabulary", "vocab.txt", "holds no words", "one word per line"],
    ),
    "vocabulary-not-text": (
        lambda d: ["--vocabulary", str(_write(d / "vocab.txt", b"\x89PNG\r\n\x1a\n\xff\xfe"))],
        ["text.vocabulary", "vocab.txt", "not a UTF-8 text file"],
    ),
    "language-unknown": (
        lambda d: ["--languages", "en", "zz"],
        ["parse.languages", "['en', 'zz']", "unknown: ['zz']", "known codes: af,", " en,"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_with_one_line_and_leaves_the_output(good_run, tmp_path, case):
    site, out, snapshot = good_run
    make_flags, pieces = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as info:
        main(["--inputs", str(site), "--output_dir", str(out), *LENIENT, *make_flags(tmp_path)])
    message = info.value.code
    assert isinstance(message, str) and message.startswith("imagebert-curate: error: ") and "\n" not in message
    for piece in pieces:
        assert piece.replace("{d}", str(tmp_path)) in message, message
    assert "pip install" not in message
    assert _snapshot(out) == snapshot


def test_a_type_error_of_the_config_file_is_one_line(tmp_path):
    """From `parse_args` a wrong type in the file stays a TypeError (the Python API), the command says one line."""
    from imagebert_hf.curation.cli import parse_args

    path = _write(tmp_path / "run.json", b'{"text": {"max_words": [3]}}')
    argv = ["--inputs", "site", "--output_dir", str(tmp_path / "out"), "--config_file", str(path)]
    with pytest.raises(TypeError, match=r"--config_file: .*run\.json: text\.max_words must be an integer"):
        parse_args(argv)
    with pytest.raises(SystemExit, match=r"^imagebert-curate: error: --config_file: .*text\.max_words"):
        main(argv)


def test_run_local_checks_the_files_before_creating_the_output(good_run, tmp_path):
    site, _, _ = good_run
    config = CurationConfig(text=TextCleaningConfig(vocabulary=str(tmp_path / "vocab.txt")))
    with pytest.raises(FileNotFoundError, match=r"text\.vocabulary: cannot read .*vocab\.txt"):
        run_local([site], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_good_files_pass(tmp_path):
    """A vocabulary file, a saved model and `unknown` among the languages are accepted."""
    from imagebert_hf.curation.image_filters import load_packaged_model

    vocab = _write(tmp_path / "vocab.txt", b"[CLS]\n##s\nthe\ndog\n")
    model = load_packaged_model("relevance.json")
    model.save(tmp_path / "relevance.json")
    reloaded = LinearModel.load(tmp_path / "relevance.json")
    assert reloaded.feature_names == model.feature_names and np.array_equal(reloaded.coef, model.coef)
    config = CurationConfig.from_dict(
        {
            "parse": {"languages": ["en", "de", "unknown"]},
            "images": {"nsfw_detector": "none", "natural_classifier": "none"},
            "text": {"vocabulary": str(vocab)},
            "relevance": {"relevance_model_path": str(tmp_path / "relevance.json")},
        }
    )
    check_stage_inputs(config)


LINEAR_MODEL_CASES = {
    "not-finite": ({"mean": [0.0, float("nan")]}, "mean must be a list of 2 finite numbers"),
    "zero-scale": ({"scale": [1.0, 0.0]}, "scale must be positive"),
    "intercept-a-string": ({"intercept": "0"}, "intercept must be a finite number, got '0'"),
    "names-not-strings": ({"feature_names": [1, 2]}, "feature_names must be a non-empty list of strings"),
    "metadata-a-list": ({"metadata": []}, "metadata must be a mapping"),
}


@pytest.mark.parametrize("case", list(LINEAR_MODEL_CASES))
def test_linear_model_file_checked(tmp_path, case):
    changes, expected = LINEAR_MODEL_CASES[case]
    path = _model_file(tmp_path / "model.json", **changes)
    with pytest.raises(ValueError) as info:
        LinearModel.load(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_linear_model_lacking_a_field(tmp_path):
    path = _write(tmp_path / "model.json", b'{"feature_names": ["a"], "mean": [0]}')
    with pytest.raises(ValueError, match=r"model\.json lacks the field\(s\) \['scale', 'coef', 'intercept'\]"):
        LinearModel.load(path)
