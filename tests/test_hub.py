"""What a Hub push uploads (files and model card), checked against a local stand-in for the Hub."""

from pathlib import Path

import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.evaluation.hub import build_model_card, eval_results_from_run, push_to_hub, save_for_hub


RESULTS = [
    {
        "dataset_name": "Flickr8k dev",
        "dataset_type": "flickr8k",
        "dataset_split": "dev",
        "metrics": {
            "tr_r1": 12.5,
            "tr_r5": 30.0,
            "tr_r10": 41.25,
            "ir_r1": 8.0,
            "ir_r5": 25.5,
            "ir_r10": 36.0,
            "rsum": 153.25,
        },
    },  # fmt: skip
    {
        "dataset_name": "MS-COCO 1k",
        "dataset_type": "coco",
        "dataset_config": "1k",
        "dataset_split": "test",
        "metrics": {"tr_r1": 50.0, "ir_r1": 40.0},
    },
]


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi`: records the calls and keeps a copy of every uploaded file."""

    def __init__(self):
        self.calls = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, folder_path, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        root = Path(folder_path)
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "commit-info"


@pytest.fixture(scope="module")
def model_and_processor(tokenizer, make_tiny_extractor, make_tiny_config):
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

    extractor = make_tiny_extractor(grid_sizes=[1])
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    torch.manual_seed(0)
    return ImageBERTForImageTextRetrieval(config), ImageBERTProcessor.from_model_config(config, tokenizer, extractor)


def test_model_index_from_an_evaluation_run():
    results = eval_results_from_run(RESULTS)
    assert len(results) == 7 + 2
    first = results[0]
    assert (first.task_type, first.dataset_type, first.dataset_split, first.metric_name, first.metric_value) == (
        "image-text-retrieval", "flickr8k", "dev", "Text retrieval R@1", 12.5,
    )  # fmt: skip
    assert {r.metric_name for r in results[7:]} == {"Text retrieval R@1", "Image retrieval R@1"}
    with pytest.raises(ValueError, match="unknown metrics"):
        eval_results_from_run([{**RESULTS[0], "metrics": {"accuracy": 1.0}}])
    with pytest.raises(ValueError, match="dataset_type"):
        eval_results_from_run([{"dataset_name": "x", "metrics": {}}])


def test_card_metadata_and_sections(model_and_processor):
    model, _ = model_and_processor
    card = build_model_card(RESULTS, model_id="someone/imagebert-tiny", config=model.config, datasets=["flickr8k"])
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "google-bert/bert-base-uncased"
    assert data["datasets"] == ["flickr8k"]
    assert data["metrics"] == ["recall"]
    assert "image-text-retrieval" in data["tags"] and "pipeline_tag" not in data
    index = data["model-index"][0]
    assert index["name"] == "someone/imagebert-tiny"
    flickr = index["results"][0]
    assert flickr["dataset"] == {"name": "Flickr8k dev", "type": "flickr8k", "split": "dev"}
    assert [m["value"] for m in flickr["metrics"]] == [12.5, 30.0, 41.25, 8.0, 25.5, 36.0, 153.25]
    text = str(card)
    assert "| Flickr8k dev (dev) | 12.5 | 30.0 | 41.2 | 8.0 | 25.5 | 36.0 | 153.2 |" in text
    assert "## Citation" in text and "qi2020imagebert" in text
    assert f"{model.config.num_hidden_layers} layers of width {model.config.hidden_size}" in text
    assert 'pipeline("image-text-retrieval", model="someone/imagebert-tiny", trust_remote_code=True)' in text


def test_push_uploads_exactly_model_processor_code_and_card(model_and_processor):
    model, processor = model_and_processor
    hub = RecordingHub()
    assert push_to_hub(model, processor, "someone/imagebert-tiny", results=RESULTS, private=True, api=hub) == (
        "commit-info"
    )
    assert hub.calls[0] == (
        "create_repo", {"repo_id": "someone/imagebert-tiny", "private": True, "exist_ok": True, "repo_type": "model"},
    )  # fmt: skip
    name, upload = hub.calls[1]
    assert name == "upload_folder" and upload["repo_id"] == "someone/imagebert-tiny"
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "configuration_imagebert.py",
        "modeling_imagebert.py",
        "pipeline_image_text_retrieval.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processing_imagebert.py",
        "image_processing_imagebert.py",
        "roi_backends.py",
        "roi_boxes.py",
        "roi_image_loading.py",
        "roi_offline_weights.py",
        "roi_precomputed.py",
        "roi_butd.py",
        "region_batching.py",
        "retrieval_index.py",
        "modeling_auto.py",
        "roi_extractor.safetensors",
    }
    assert expected <= set(hub.files)
    assert set(hub.files) - expected <= {"preprocessor_config.json"}, set(hub.files) - expected
    card = hub.files["README.md"].decode()
    assert card.startswith("---\n") and "model-index:" in card and "value: 41.25" in card
    import json

    config = json.loads(hub.files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_imagebert.ImageBERTForImageTextRetrieval"
    assert (
        config["custom_pipelines"]["image-text-retrieval"]["impl"]
        == "pipeline_image_text_retrieval.ImageTextRetrievalPipeline"
    )
    processor_config = json.loads(hub.files["processor_config.json"])
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_imagebert.ImageBERTProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_imagebert.ImageBERTRoIExtractor"
    )
    # Saving for the Hub leaves the classes as they were for later, ordinary saves.
    for cls in (type(model), type(processor), type(processor.image_processor)):
        assert getattr(cls, "_auto_class", None) is None, cls


def test_save_for_hub_lists_the_written_files(model_and_processor, tmp_path):
    model, processor = model_and_processor
    card = build_model_card(RESULTS[:1], model_id="local")
    files = save_for_hub(model, processor, tmp_path, card)
    assert files == sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert "README.md" in files
    reloaded = ImageBERTForImageTextRetrieval.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
