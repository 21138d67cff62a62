"""What a Hub push uploads (files and model card), checked against a local stand-in for the Hub."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.evaluation.hub import (
    BASE_MODEL,
    build_model_card,
    eval_results_from_run,
    load_results,
    push_to_hub,
    save_for_hub,
)


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
    card = build_model_card(
        RESULTS,
        model_id="someone/imagebert-tiny",
        config=model.config,
        datasets=["flickr8k"],
        base_model=BASE_MODEL,
        license="apache-2.0",
    )
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "google-bert/bert-base-uncased"
    assert "Finetuned from model [optional]:** google-bert/bert-base-uncased" in str(card)
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


def test_the_card_reports_full_ranking_once_per_row_and_the_model_s_location_size(model_and_processor, tmp_path):
    model, _ = model_and_processor
    # What examples/evaluate_retrieval.py writes with --shortlist_k for a gallery of no published protocol: two
    # entries of one name, the second the shortlist's recall.
    full = {"tr_r1": 50.0, "tr_r5": 80.0, "tr_r10": 90.0, "ir_r1": 40.0, "ir_r5": 70.0, "ir_r10": 80.0, "rsum": 410.0}
    entry = {"dataset_name": "coco", "dataset_type": "coco", "dataset_split": "test", "ranking": "full"}
    shortlist = {**entry, "ranking": "shortlist k=16", "metrics": {key: value / 2 for key, value in full.items()}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"model": "m", "results": [{**entry, "metrics": full}, shortlist]}))
    card = build_model_card(load_results(path), model_id="me/x", config=model.config)
    text = str(card)
    assert "| coco (test) | 50.0 | 80.0 | 90.0 | 40.0 | 70.0 | 80.0 | 410.0 |" in text
    assert "| coco (test) | 25.0 |" not in text
    metrics = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == list(full.values())
    assert f"a {model.config.region_location_size}-d location each" in text
    with pytest.raises(ValueError, match=r"evaluation results 0 and 1 both report 'coco \(test\)'"):
        build_model_card([{**entry, "metrics": full}, {**entry, "metrics": full}])
    # One name, two configurations: two rows.
    both = build_model_card([{**entry, "dataset_config": c, "metrics": full} for c in ("1k", "5k")])
    assert "| coco (1k, test) |" in str(both) and "| coco (5k, test) |" in str(both)
    path.write_text('{"results": 3}')
    with pytest.raises(ValueError, match="holds no list of results"):
        load_results(path)


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
        "folder_publishing.py",
        "modeling_auto.py",
        "roi_extractor.safetensors",
    }
    assert expected <= set(hub.files)
    assert set(hub.files) - expected <= {"preprocessor_config.json"}, set(hub.files) - expected
    card = hub.files["README.md"].decode()
    assert card.startswith("---\n") and "model-index:" in card and "value: 41.25" in card
    import json

    config = json.loads(hub.files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_imagebert.ImageBERTModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == (
        "modeling_imagebert.ImageBERTForImageTextRetrieval"
    )
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


def test_save_for_hub_refused_or_failing_rerun_leaves_the_earlier_folder(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "notes.txt").write_text("a file of the user's")
    save_for_hub(model, processor, folder, build_model_card(RESULTS[:1], model_id="first"))
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "notes.txt" in earlier and "model.safetensors" in earlier

    with pytest.raises(TypeError, match="processor must be an ImageBERTProcessor, got BertTokenizer"):
        save_for_hub(model, processor.tokenizer, folder)
    with pytest.raises(TypeError, match="card must be a huggingface_hub.ModelCard .*got dict"):
        save_for_hub(model, processor, folder, card={"model_id": "x"})
    import imagebert_hf.evaluation.hub as hub

    def full_disk(card, output_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(hub, "save_model_card", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_for_hub(model, processor, folder, build_model_card(RESULTS[:1], model_id="second"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


class SpyUpload:
    """Records every call of `evaluation.hub.upload_to_hub`, then runs it against a `RecordingHub`."""

    def __init__(self, upload):
        self.upload, self.calls, self.hub = upload, [], RecordingHub()

    def __call__(self, folder, repo_id, commit_message, **kwargs):
        self.calls.append((Path(folder), repo_id, commit_message))
        return self.upload(folder, repo_id, commit_message, **{**kwargs, "api": self.hub})


def test_pretraining_stages_and_retrieval_push_go_through_the_one_hub_publisher(
    model_and_processor, tmp_path, monkeypatch
):
    import imagebert_hf.evaluation.hub as hub
    from imagebert_hf.training.pretraining import _push_stage

    spy = SpyUpload(hub.upload_to_hub)
    monkeypatch.setattr(hub, "upload_to_hub", spy)
    stage_final = tmp_path / "stage1-mlm" / "final"
    stage_final.mkdir(parents=True)
    (stage_final / "config.json").write_text("{}")
    _push_stage(stage_final, "someone/imagebert-pretrained", "stage 1: mlm")
    assert spy.calls == [(stage_final, "someone/imagebert-pretrained", "stage 1: mlm")]
    assert spy.hub.calls[0] == (
        "create_repo", {"repo_id": "someone/imagebert-pretrained", "private": None, "exist_ok": True, "repo_type": "model"},
    )  # fmt: skip
    assert spy.hub.calls[1][1]["repo_id"] == "someone/imagebert-pretrained" and spy.hub.files == {"config.json": b"{}"}

    model, processor = model_and_processor
    push_to_hub(model, processor, "someone/imagebert-retrieval", results=RESULTS, commit_message="fine-tuned")
    assert spy.calls[1][1:] == ("someone/imagebert-retrieval", "fine-tuned")
    assert spy.hub.calls[-1][1]["repo_id"] == "someone/imagebert-retrieval" and "model.safetensors" in spy.hub.files
    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id, got none"):
        _push_stage(stage_final, None, "stage 1: mlm")
    with pytest.raises(ValueError, match="repo_id must be a non-empty Hub id such as 'user/name', got ''"):
        hub.upload_to_hub(stage_final, "", "x", api=RecordingHub())


FULL = {"tr_r1": 50.0, "tr_r5": 80.0, "tr_r10": 90.0, "ir_r1": 40.0, "ir_r5": 70.0, "ir_r10": 80.0, "rsum": 410.0}


def test_the_card_names_a_zero_shot_evaluation_and_refuses_results_it_would_misreport(model_and_processor):
    model, _ = model_and_processor
    entry = {"dataset_name": "coco", "dataset_type": "coco", "dataset_split": "test", "metrics": FULL}
    card = build_model_card([{**entry, "evaluation": "zero-shot"}], model_id="me/x", config=model.config)
    text = str(card)
    assert "| coco (test, zero-shot) | 50.0 |" in text and "evaluated zero-shot" in text
    assert "retrieval losses" not in text and "used to shortlist candidates" not in text
    names = {m["name"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert "Text retrieval R@1 (zero-shot)" in names
    fine_tuned = str(build_model_card([{**entry, "evaluation": "fine-tuned"}], model_id="me/x", config=model.config))
    assert "retrieval losses" in fine_tuned and "zero-shot" not in fine_tuned
    # Code and citation are fenced, so that they render as code.
    assert "```python\nfrom transformers import pipeline" in fine_tuned and "```bibtex\n@article{qi2020" in fine_tuned

    cases = (
        ({**entry, "dataset_split": "test\n## Results"}, "dataset_split holds a line break"),
        ({**entry, "ranking": None}, r"ranking must be a non-empty string \(.*\), got None"),
        ({**entry, "metrics": {**FULL, "tr_r1": 95.0}}, "tr_r1 95.0 is above tr_r5 80.0"),
        ({**entry, "metrics": {**FULL, "rsum": 500.0}}, r"rsum 500.0 is not the sum of the six recalls \(410.00\)"),
    )
    for result, message in cases:
        with pytest.raises(ValueError, match=message):
            build_model_card([result], model_id="me/x")
    with pytest.raises(ValueError, match="none of the 1 evaluation results is of full ranking"):
        build_model_card([{**entry, "ranking": "shortlist k=16"}], model_id="me/x")
    with pytest.raises(ValueError, match="model_id must be a non-empty name on one line"):
        build_model_card([entry], model_id="me/x\n<img src=x onerror=alert(1)>")
    # A `|` or HTML in a name stays inside its cell, as text.
    text = str(build_model_card([{**entry, "dataset_name": "coco <b>|hard|</b>"}], model_id="me/x"))
    assert "| coco &lt;b&gt;\\|hard\\|&lt;/b&gt; (test) | 50.0 |" in text


def test_a_published_folder_names_no_local_weights_path_and_keeps_an_earlier_card_with_a_warning(
    model_and_processor, tmp_path
):
    import logging

    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.evaluation import hub

    model, processor = model_and_processor
    weights = tmp_path / "private" / "backbone.safetensors"
    weights.parent.mkdir()
    processor.image_processor.save_weights(weights.parent)
    (weights.parent / "roi_extractor.safetensors").rename(weights)
    local = type(processor)(
        type(processor.image_processor)(**{**processor.image_processor.to_dict(), "backbone_weights": str(weights)}),
        processor.tokenizer,
        processor.max_text_length,
        processor.max_regions,
    )
    folder = tmp_path / "upload"
    save_for_hub(model, local, folder, build_model_card(model_id="me/x"))
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            assert str(tmp_path) not in (folder / name).read_text(), name
    weights.unlink()  # the folder's own weights are what a load reads
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

    reloaded = ImageBERTProcessor.from_pretrained(folder)
    assert reloaded.image_processor.backbone_weights == "roi_extractor.safetensors"
    assert reloaded.image_processor.extract([torch.zeros(3, 32, 32)])[0]["region_features"].shape[0] >= 1

    logger = logging.getLogger(hub.__name__)
    with CaptureLogger(hub.logger) as captured:
        logger.setLevel(logging.WARNING)
        files = save_for_hub(model, processor, folder)  # no card: the earlier one stays, said so
    assert "README.md" in files and "it may describe an earlier model" in captured.out


def test_a_stage_whose_upload_failed_is_uploaded_when_the_run_resumes(tmp_path, monkeypatch):
    """The stage's model is saved before its upload; a run that died there (or whose upload failed) skips the
    complete stage on resuming, and must still publish it, as the run would have."""
    import imagebert_hf.evaluation.hub as hub
    from imagebert_hf.training import PretrainingRunOptions, recipe_from_dict, run_pretraining
    from imagebert_hf.training.pretraining import PUSHED_FILE

    from .test_pretraining import tiny_recipe

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    uploads = []

    def upload(folder, repo_id, message, **kwargs):
        uploads.append(message)
        if message == "stage 2: clean" and uploads.count(message) == 1:
            raise ConnectionError("the Hub did not answer")

    monkeypatch.setattr(hub, "upload_to_hub", upload)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run"))
    options = PretrainingRunOptions(push_to_hub=True, hub_model_id="someone/imagebert-pretrained")
    with pytest.raises(ConnectionError):
        run_pretraining(recipe, options)
    assert uploads == ["stage 1: noisy", "stage 2: clean"]
    assert (tmp_path / "run" / "stage1-noisy" / PUSHED_FILE).is_file()
    assert not (tmp_path / "run" / "stage2-clean" / PUSHED_FILE).is_file()
    run_pretraining(recipe, dataclasses.replace(options, resume=True))
    assert uploads == ["stage 1: noisy", "stage 2: clean", "stage 2: clean"]  # stage 1 is not uploaded twice
    assert (tmp_path / "run" / "stage2-clean" / PUSHED_FILE).is_file()


def test_a_card_claims_no_shortlist_heads_a_fine_tuned_model_does_not_have(model_and_processor, tmp_path, monkeypatch):
    """A run fine-tuned with `--contrastive_weight 0` leaves its projection heads untrained (and out of `final/`):
    its card must not say they shortlist candidates, whether built by the evaluation or by `push_to_hub`."""
    from safetensors.torch import load_file, save_file

    from imagebert_hf.evaluation.full_ranking import load_retrieval_model

    model, _ = model_and_processor
    trained = str(build_model_card(RESULTS, model_id="me/x", config=model.config))
    assert "used to shortlist candidates" in trained
    untrained = str(build_model_card(RESULTS, model_id="me/x", config=model.config, shortlist_heads_trained=False))
    assert "used to shortlist candidates" not in untrained
    assert "projection heads for shortlisting were not trained" in untrained

    model.save_pretrained(tmp_path / "final")
    weights = load_file(tmp_path / "final" / "model.safetensors")
    kept = {
        name: value
        for name, value in weights.items()
        if not name.startswith(("cls.text_projection.", "cls.region_projection."))
    }
    save_file(kept, tmp_path / "final" / "model.safetensors", {"format": "pt"})
    loaded = load_retrieval_model(str(tmp_path / "final"))
    captured = {}

    def upload(folder, repo_id, message, **kwargs):
        captured["card"] = (Path(folder) / "README.md").read_text()

    import imagebert_hf.evaluation.hub as hub

    monkeypatch.setattr(hub, "upload_to_hub", upload)
    hub.push_to_hub(loaded, model_and_processor[1], "me/x", results=RESULTS)
    assert "projection heads for shortlisting were not trained" in captured["card"]


def test_a_card_claims_no_base_model_or_license_nobody_gave(model_and_processor):
    # Every card once said it came from bert-base-uncased under apache-2.0, also for a model trained from scratch on
    # research-only data.
    model, _ = model_and_processor
    card = build_model_card(RESULTS, model_id="me/scratch", config=model.config)
    data = card.data.to_dict()
    assert "base_model" not in data and "license" not in data
    assert "google-bert" not in str(card) and "apache" not in str(card)
    for name, value in (("base_model", "a\nb"), ("license", " ")):
        with pytest.raises(ValueError, match=rf"{name} must be a non-empty name on one line"):
            build_model_card(RESULTS, model_id="me/x", **{name: value})


def test_a_fine_tuning_run_names_its_hub_start_as_the_cards_base_model(tmp_path):
    from imagebert_hf.training import RetrievalArguments
    from imagebert_hf.training.retrieval_finetuning import _hub_start

    def start(name):
        return _hub_start(RetrievalArguments(output_dir=str(tmp_path / "run"), model_name_or_path=name))

    assert start("someone/imagebert-pretrained") == "someone/imagebert-pretrained"
    local = tmp_path / "someone"
    (local / "ckpt").mkdir(parents=True)
    assert start(str(local / "ckpt")) is None  # a folder is no Hub id, whatever its name
    assert start(None) is None and start("not a/valid id!") is None


def test_a_stage_is_uploaded_while_the_next_one_trains(tmp_path, monkeypatch):
    """The main process uploads a finished stage beside the next one's training: done before the next stage, the
    other processes would wait for it at their next collective, and an upload longer than the process group's
    timeout ended the run. The run still ends only once every upload went through, in stage order."""
    import threading

    import imagebert_hf.evaluation.hub as hub
    from imagebert_hf.training import PretrainingRunOptions, pretraining, recipe_from_dict, run_pretraining
    from imagebert_hf.training.pretraining import PUSHED_FILE

    from .test_pretraining import tiny_recipe

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    second_stage_started, events = threading.Event(), []
    build_stage = pretraining._pretraining_stage

    def stage(accelerator, recipe, options, index, *args):
        if index == 1:
            events.append("stage 2 starts")
            second_stage_started.set()
        return build_stage(accelerator, recipe, options, index, *args)

    def upload(folder, repo_id, message, **kwargs):
        if message == "stage 1: noisy":
            # Held until the next stage has started: a run that uploads before going on never gets there.
            assert second_stage_started.wait(timeout=120), "stage 2 waited for stage 1's upload"
        events.append(f"uploaded {message}")

    monkeypatch.setattr(pretraining, "_pretraining_stage", stage)
    monkeypatch.setattr(hub, "upload_to_hub", upload)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run"))
    run_pretraining(recipe, PretrainingRunOptions(push_to_hub=True, hub_model_id="someone/imagebert-pretrained"))
    assert events == ["stage 2 starts", "uploaded stage 1: noisy", "uploaded stage 2: clean"]
    for stage_dir in ("stage1-noisy", "stage2-clean"):
        assert (tmp_path / "run" / stage_dir / PUSHED_FILE).is_file()
