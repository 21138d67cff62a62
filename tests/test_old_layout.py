"""Folders saved before the package re-layout (a flat package with `pipelines/image_text_retrieval.py`) still load.

The old `pipe.save_pretrained(dir)` wrote the same `config.json` / `processor_config.json` as today except that the
pipeline's code was `image_text_retrieval.py`, named as such in `custom_pipelines`, whose model class was
`AutoModel`, which `auto_map` sent to the retrieval class. The test writes such a folder from a folder saved today
and loads it with today's package.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from imagebert_hf import (
    AutoModelForImageTextRetrieval,
    ImageBERTForImageTextRetrieval,
    ImageBERTProcessor,
    ImageBERTRoIExtractor,
    ImageTextRetrievalPipeline,
)

from .testing_utils import run_without_the_package


OLD_PIPELINE = "image_text_retrieval.ImageTextRetrievalPipeline"
TEXTS = ["a red circle", "a blue square", "a green cross"]


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    from transformers import pipeline

    extractor = make_tiny_extractor()
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config)
    processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
    pipe = pipeline("image-text-retrieval", model=model, processor=processor, device=-1)
    folder = tmp_path_factory.mktemp("saved-before-the-layout")
    pipe.save_pretrained(folder)
    # What the pre-layout save wrote: its pipeline file under the old name, and config.json pointing at it.
    shutil.move(folder / "pipeline_image_text_retrieval.py", folder / "image_text_retrieval.py")
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved["custom_pipelines"] = {
        "image-text-retrieval": {"impl": OLD_PIPELINE, "pt": ["AutoModel"], "tf": [], "type": "multimodal"}
    }
    saved["auto_map"] = {
        "AutoConfig": "configuration_imagebert.ImageBERTConfig",
        "AutoModel": "modeling_imagebert.ImageBERTForImageTextRetrieval",
    }
    config_path.write_text(json.dumps(saved, indent=2))
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_imagebert.ImageBERTProcessor"}
    rng = np.random.default_rng(0)
    record = {
        "region_features": rng.standard_normal((3, config.region_feature_size)).astype(np.float32),
        "region_locations": np.tile(np.array([[0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32), (3, 1)),
    }
    return folder, record, pipe(images=record, texts=TEXTS)


def test_old_checkpoint_loads_into_todays_classes(old_folder):
    from transformers import AutoProcessor

    folder, record, expected = old_folder
    for loader in (ImageBERTForImageTextRetrieval, AutoModelForImageTextRetrieval):
        model = loader.from_pretrained(folder)
        assert type(model) is ImageBERTForImageTextRetrieval, loader
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is ImageBERTProcessor and type(processor.image_processor) is ImageBERTRoIExtractor
    inputs = processor(regions=[record] * len(TEXTS), text=TEXTS)
    with torch.no_grad():
        scores = model(**inputs).logits
    assert sorted(scores.tolist(), reverse=True) == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_old_pipeline_folder_serves_todays_pipeline(old_folder):
    from transformers import pipeline

    folder, record, expected = old_folder
    # Today's pipeline class serves the folder (its code is not run): the model, and the processor found next to it.
    model = ImageBERTForImageTextRetrieval.from_pretrained(folder)
    pipe = pipeline("image-text-retrieval", model=model, device=-1)
    assert type(pipe) is ImageTextRetrievalPipeline and type(pipe.model) is ImageBERTForImageTextRetrieval
    results = pipe(images=record, texts=TEXTS)
    assert [r["text"] for r in results] == [r["text"] for r in expected]
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    # And the folder's own code, where the package is not installed, still resolves the old names.
    script = f"""
import json, sys
from transformers import pipeline
pipe = pipeline(model={str(folder)!r}, trust_remote_code=True, device=-1)
assert type(pipe).__module__.endswith("image_text_retrieval"), type(pipe).__module__
record = {{key: [list(map(float, row)) for row in value] for key, value in json.loads(sys.argv[1]).items()}}
print(json.dumps([r["score"] for r in pipe(images=record, texts={TEXTS!r})]))
"""
    argument = json.dumps({key: value.tolist() for key, value in record.items()})
    remote_scores = run_without_the_package(script, folder.parent, argument)
    assert remote_scores == pytest.approx([r["score"] for r in expected], abs=1e-5)
