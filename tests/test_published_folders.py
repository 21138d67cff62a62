"""Folders the package publishes serve the same model, with the same scores, whether `imagebert_hf` is imported,
installed but not imported, or absent: a `save_for_hub` folder (what `push_to_hub` uploads) through the model card's
own line and through the app, a stage's `final/` folder (what pretraining's `--push_to_hub` uploads) through the Auto
classes with `trust_remote_code=True`. Also what the pipeline says about a pretraining checkpoint, and region records
computed in bfloat16."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import (
    ImageBERTForImageTextRetrieval,
    ImageBERTForPreTraining,
    ImageBERTModel,
    ImageBERTProcessor,
    ImageTextRetrievalPipeline,
)
from imagebert_hf.evaluation.hub import save_for_hub

from .testing_utils import PROJECT_ROOT, run_without_the_package


TEXTS = ["a red circle", "a blue square", "a green cross"]


def run_with_the_package(script: str, cwd, *args: str):
    """Runs `script` in a fresh offline interpreter where this checkout's `imagebert_hf` is importable (the script
    says whether it imports it) and returns the JSON its last printed line holds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _record(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "region_features": rng.standard_normal((3, config.region_feature_size)).astype(np.float32),
        "region_locations": np.array(
            [[0.0, 0.0, 0.5, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0, 0.25], [0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32
        ),
    }


def _parts(tokenizer, make_extractor, make_config):
    extractor = make_extractor()
    config = make_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    return config, ImageBERTProcessor.from_model_config(config, tokenizer, extractor)


@pytest.fixture
def parts(tokenizer, make_tiny_extractor, make_tiny_config):
    """A new tiny config and its processor."""
    return _parts(tokenizer, make_tiny_extractor, make_tiny_config)


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """A `save_for_hub` folder, a region record and the scores the package's pipeline gives them."""
    config, processor = _parts(tokenizer, make_tiny_extractor, make_tiny_config)
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config).eval()
    folder = tmp_path_factory.mktemp("published") / "imagebert-retrieval"
    save_for_hub(model, processor, folder)
    record = _record(config)
    pipe = ImageTextRetrievalPipeline(model=model, processor=processor, task="image-text-retrieval", device=-1)
    return folder, record, pipe(images=record, texts=TEXTS)


# The model card's get-started line, then which classes loaded the folder and what they score.
CARD_SCRIPT = """
import json, sys
from transformers import AutoModel, pipeline
folder = sys.argv[1]
retriever = pipeline("image-text-retrieval", model=folder, trust_remote_code=True)
record = {key: value for key, value in json.loads(sys.argv[2]).items()}
results = retriever(images=record, texts=json.loads(sys.argv[3]))
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
print(json.dumps({
    "model": type(retriever.model).__name__,
    "auto_model": type(base).__name__,
    "results": [[r["text"], r["score"]] for r in results],
}))
"""


def test_the_cards_line_serves_a_published_folder_alike_with_and_without_the_package(published, tmp_path):
    folder, record, expected = published
    args = (str(folder), json.dumps({key: value.tolist() for key, value in record.items()}), json.dumps(TEXTS))
    runs = {
        "imported": run_with_the_package("import imagebert_hf\n" + CARD_SCRIPT, tmp_path, *args),
        "installed, not imported": run_with_the_package(CARD_SCRIPT, tmp_path, *args),
        "not installed": run_without_the_package(CARD_SCRIPT, tmp_path, *args),
    }
    for how, run in runs.items():
        assert run["model"] == "ImageBERTForImageTextRetrieval", how
        assert run["auto_model"] == "ImageBERTModel", how  # AutoModel is the base model wherever it loads
        assert [text for text, _ in run["results"]] == [r["text"] for r in expected], how
        assert [score for _, score in run["results"]] == pytest.approx([r["score"] for r in expected], abs=1e-5), how


SERVED_BY_THE_PACKAGE_SCRIPT = """
import json, sys
import imagebert_hf
from transformers import pipeline
folder, record, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
served = pipeline("image-text-retrieval", model=folder, device=-1)
print(json.dumps({
    "modules": [type(served).__module__, type(served.model).__module__],
    "scores": [r["score"] for r in served(images=record, texts=texts)],
}))
"""


def test_after_import_the_package_serves_a_published_folder_without_trust_remote_code(published, tmp_path):
    folder, record, expected = published
    args = (str(folder), json.dumps({key: value.tolist() for key, value in record.items()}), json.dumps(TEXTS))
    run = run_with_the_package(SERVED_BY_THE_PACKAGE_SCRIPT, tmp_path, *args)
    # The package's own pipeline and classes, not the folder's code (which would ask for trust_remote_code).
    assert [module.split(".")[0] for module in run["modules"]] == ["imagebert_hf", "imagebert_hf"], run["modules"]
    assert run["scores"] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert "custom_pipelines" in json.loads((folder / "config.json").read_text())  # the folder is as published


def test_the_app_and_the_package_classes_serve_a_published_folder(published, tmp_path):
    from transformers import AutoModel, pipeline

    from imagebert_hf.app.cli import AppArguments, load_demo

    folder, record, expected = published
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(gallery / name)
    demo = load_demo(AppArguments(model=str(folder), gallery=str(gallery)))
    assert type(demo.retriever) is ImageTextRetrievalPipeline
    assert type(demo.retriever.model) is ImageBERTForImageTextRetrieval
    results = demo.retriever(images=record, texts=TEXTS)
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    # The package's classes, with no trust_remote_code: the folder's code is not run.
    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import load_retrieval_model

    served = pipeline("image-text-retrieval", model=load_retrieval_model(folder), device=-1)
    assert [r["score"] for r in served(images=record, texts=TEXTS)] == [r["score"] for r in results]
    assert type(AutoModel.from_pretrained(folder)) is ImageBERTModel


def test_saving_with_code_leaves_the_model_and_the_classes_as_they_were(parts, tmp_path):
    config, processor = parts
    model = ImageBERTForImageTextRetrieval(config)
    save_for_hub(model, processor, tmp_path / "published")
    assert "auto_map" not in vars(model.config) and "custom_pipelines" not in vars(model.config)
    for cls in (type(model), type(model.config), type(processor), type(processor.image_processor)):
        assert cls.__dict__.get("_auto_class") is None, cls
    # A later, ordinary save names no code it does not hold.
    model.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in saved and "custom_pipelines" not in saved


# A stage's final/ folder through the Auto classes, and the pretraining model's outputs on one pair.
FINAL_SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoProcessor
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
inputs = processor(regions=json.loads(sys.argv[2]), text=json.loads(sys.argv[3]))
with torch.no_grad():
    itm_logits = model(**inputs).itm_logits.reshape(-1)
print(json.dumps({
    "classes": [type(part).__name__ for part in (config, processor, processor.image_processor, model, base)],
    "remote": [type(part).__module__.startswith("transformers_modules") for part in (config, processor, model)],
    "itm_logits": itm_logits.tolist(),
}))
"""


def test_a_stage_final_folder_loads_with_its_code_where_the_package_is_not_installed(parts, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForPreTraining

    from imagebert_hf.training.checkpointing import TrainState
    from imagebert_hf.training.runner import save_final

    config, processor = parts
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(config).eval()
    final = save_final(Accelerator(cpu=True), model, TrainState(stage_name="stage"), tmp_path / "final", processor)
    record = _record(config)
    with torch.no_grad():
        expected = model(**processor(regions=record, text=TEXTS[0])).itm_logits
    # The trained model and the classes are left as they were for later, ordinary saves.
    assert "auto_map" not in vars(model.config)
    for cls in (type(model), type(model.config), type(processor), type(processor.image_processor)):
        assert cls.__dict__.get("_auto_class") is None, cls

    args = (str(final), json.dumps({key: value.tolist() for key, value in record.items()}), json.dumps(TEXTS[0]))
    remote = run_without_the_package(FINAL_SCRIPT, tmp_path, *args)
    assert remote["classes"] == [
        "ImageBERTConfig",
        "ImageBERTProcessor",
        "ImageBERTRoIExtractor",
        "ImageBERTForPreTraining",
        "ImageBERTModel",
    ]
    assert remote["remote"] == [True, True, True]
    assert remote["itm_logits"] == pytest.approx(expected.reshape(-1).tolist(), abs=1e-5)
    # With the package, its classes load the folder, with no trust_remote_code asked for.
    assert type(AutoModelForPreTraining.from_pretrained(final)) is ImageBERTForPreTraining


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_messages(folder) -> tuple[list[str], ImageTextRetrievalPipeline]:
    """What transformers and the package log while the pipeline loads `folder`."""
    import transformers
    from transformers import pipeline

    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("transformers", "imagebert_hf")]
    for logger in loggers:
        logger.addHandler(handler)
    # Scripts run in-process by other tests lower transformers' verbosity for good; the report is a warning.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        pipe = pipeline("image-text-retrieval", model=str(folder), device=-1)
    finally:
        transformers.logging.set_verbosity(verbosity)
        for logger in loggers:
            logger.removeHandler(handler)
    return handler.messages, pipe


def test_a_pretraining_checkpoint_gets_the_pipelines_notice_instead_of_the_load_report(parts, tmp_path):
    config, processor = parts
    pretrained = tmp_path / "pretrained"
    ImageBERTForPreTraining(config).save_pretrained(pretrained)
    processor.save_pretrained(pretrained)
    messages, pipe = _load_messages(pretrained)
    assert not [message for message in messages if "LOAD REPORT" in message]
    notices = [message for message in messages if "untrained heads" in message]
    assert len(notices) == 1 and "cls.text_projection, cls.region_projection" in notices[0]
    assert pipe.model.cls.text_projection.weight.isfinite().all()
    # Only for that load: the class declares nothing, and the same load outside the pipeline reports the keys.
    for name in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
        assert name not in ImageBERTForImageTextRetrieval.__dict__
    _, info = ImageBERTForImageTextRetrieval.from_pretrained(pretrained, output_loading_info=True)
    assert any(key.startswith("cls.text_projection.") for key in info["missing_keys"])

    # A base model's checkpoint has no ITM head: not served (its scores would be random), named.
    base = tmp_path / "base"
    ImageBERTModel(config).save_pretrained(base)
    processor.save_pretrained(base)
    with pytest.raises(ValueError, match=r"holds no image-text matching head \(cls.seq_relationship\)"):
        _load_messages(base)


def test_a_bfloat16_region_record_is_scored_as_its_float32_values(published):
    from transformers import pipeline

    folder, record, _ = published
    pipe = pipeline("image-text-retrieval", model=ImageBERTForImageTextRetrieval.from_pretrained(folder), device=-1)
    half = {key: torch.as_tensor(value).to(torch.bfloat16) for key, value in record.items()}
    widened = {key: value.float().numpy() for key, value in half.items()}
    assert pipe(images=half, texts=TEXTS) == pipe(images=widened, texts=TEXTS)
    # A tensor that cannot be read is named with its image.
    broken = {**half, "image_id": "photo-7", "region_locations": torch.empty(3, 5, device="meta")}
    with pytest.raises(ValueError, match=r"images\[0\] \(cached regions 'photo-7'\): region_locations"):
        pipe(images=broken, texts=TEXTS)


def test_a_model_and_processor_loaded_from_a_published_folder_save_plainly_without_code_they_do_not_hold(
    parts, tmp_path
):
    """Read back from a published folder (its `auto_map` names its code), an ordinary `save_pretrained` writes no
    `auto_map`: it would name code files the folder does not hold, and a load without the package would fail on them."""
    from imagebert_hf import ImageBERTProcessor
    from imagebert_hf.evaluation.hub import save_for_hub

    config, processor = parts
    save_for_hub(ImageBERTForImageTextRetrieval(config), processor, tmp_path / "published")
    assert "auto_map" in json.loads((tmp_path / "published" / "config.json").read_text())
    ImageBERTForImageTextRetrieval.from_pretrained(tmp_path / "published").save_pretrained(tmp_path / "plain")
    ImageBERTProcessor.from_pretrained(tmp_path / "published").save_pretrained(tmp_path / "plain")
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    saved = json.loads((tmp_path / "plain" / "processor_config.json").read_text())
    assert "auto_map" not in saved and "auto_map" not in saved["image_processor"]
    assert not list((tmp_path / "plain").glob("*.py"))
