"""Writers that own only part of their folder (a saved model, the Hub folder, the curation funnel, the Spark runner's
output) replace their own files in one step, keep every other file, and leave the earlier output as it was when a
rerun is refused. (The kill -9 cases are in test_kill9_writers.py.)"""

import json
import sys

import pytest
import torch

from imagebert_hf.formats.files import publish_folder, publish_folder_keeping_others

from .testing_utils import require_module


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the helpers


def test_publish_folder_keeping_others_replaces_owned_files_and_keeps_the_rest(tmp_path):
    final, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    (final / "logs").mkdir(parents=True)
    (final / "logs" / "events").write_text("run log")
    (final / "tokenizer.json").write_text("tok")
    (final / "config.json").write_text("old config")
    (final / "model-00001-of-00002.safetensors").write_text("old shard")
    tmp.mkdir()
    (tmp / "config.json").write_text("new config")
    (tmp / "model.safetensors").write_text("new weights")

    publish_folder_keeping_others(tmp, final, owned=lambda name: name.startswith(("model", "config")))
    assert folder_bytes(final) == {
        "config.json": b"new config",
        "logs/events": b"run log",
        "model.safetensors": b"new weights",
        "tokenizer.json": b"tok",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_publish_folder_never_deletes_the_earlier_folder_before_the_new_one_is_in(tmp_path, monkeypatch):
    import os

    final, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    final.mkdir()
    (final / "a").write_text("earlier")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    replace = os.replace

    def fail_second_rename(source, target):
        if str(source) == str(tmp):
            raise OSError("disk gone")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError, match="disk gone"):
        publish_folder(tmp, final)
    assert (final / "a").read_text() == "earlier"  # put back from its side name


# ------------------------------------------------------------------------------------------------ save_model


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model


@pytest.fixture
def accelerator(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_save_model_replaces_the_model_and_keeps_the_other_files_of_the_folder(
    tmp_path, accelerator, make_tiny_config
):
    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training.checkpointing import save_model

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "model-00001-of-00003.safetensors").write_text("a stale shard of an earlier save")
    (folder / "model.safetensors.index.json").write_text("{}")
    torch.manual_seed(0)
    model = ImageBERTForPreTraining(make_tiny_config())
    save_model(accelerator, accelerator.prepare(Wrapper(model)), folder, submodule="model")

    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "trainer_state.json", "config.json", "model.safetensors"} <= names
    assert not names & {"model-00001-of-00003.safetensors", "model.safetensors.index.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = ImageBERTForPreTraining.from_pretrained(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_save_model_refused_rerun_leaves_the_earlier_model(tmp_path, accelerator, make_tiny_config):
    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training.checkpointing import save_model

    folder = tmp_path / "final"
    model = accelerator.prepare(Wrapper(ImageBERTForPreTraining(make_tiny_config())))
    save_model(accelerator, model, folder, submodule="model")
    earlier = folder_bytes(folder)
    with pytest.raises(ValueError, match=r"submodule 'modle' is not an attribute of Wrapper with save_pretrained"):
        save_model(accelerator, model, folder, submodule="modle")
    with pytest.raises(ValueError, match=r"folder '.*weights.bin' is an existing file, expected a folder"):
        (tmp_path / "weights.bin").write_text("x")
        save_model(accelerator, model, tmp_path / "weights.bin", submodule="model")
    assert folder_bytes(folder) == earlier
    assert (tmp_path / "weights.bin").read_text() == "x"


def test_save_model_failing_mid_save_leaves_the_earlier_model(tmp_path, accelerator, make_tiny_config, monkeypatch):
    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training.checkpointing import save_model

    folder = tmp_path / "final"
    model = accelerator.prepare(ImageBERTForPreTraining(make_tiny_config()))
    save_model(accelerator, model, folder)
    earlier = folder_bytes(folder)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_model(accelerator, model, folder)
    assert folder_bytes(folder) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ------------------------------------------------------------------------------------------------ curation funnel


def test_funnel_report_refused_tally_leaves_the_earlier_report(tmp_path):
    from imagebert_hf.curation.tally import Tally, load_funnel, write_funnel_report

    tally = Tally()
    tally.add("read", "page", "input", 3)
    tally.add("read", "page", "kept", 2)
    tally.drop("read", "page", "too_short", 1)
    write_funnel_report(tally, tmp_path)
    earlier = folder_bytes(tmp_path)
    assert set(earlier) == {"funnel.json", "funnel.md", "funnel.png"} and earlier["funnel.png"][:4] == b"\x89PNG"

    with pytest.raises(ValueError, match=r"tally count of 'read/page/kept' must be a non-negative integer, got -1"):
        write_funnel_report(Tally({"read/page/kept": -1}), tmp_path)
    with pytest.raises(ValueError, match=r"tally key 'read-page' is not of the form 'stage/unit/reason'"):
        write_funnel_report(Tally({"read-page": 1}), tmp_path)
    with pytest.raises(TypeError, match=r"tally must be a Tally .* got dict"):
        write_funnel_report({"read/page/kept": 1}, tmp_path)
    assert folder_bytes(tmp_path) == earlier
    assert load_funnel(tmp_path) == tally


# ------------------------------------------------------------------------------------------------ Spark runner


@require_module("pyspark")
@require_module("fastwarc")
def test_spark_refused_rerun_leaves_the_earlier_output_and_a_rerun_publishes_atomically(tmp_path):
    from imagebert_hf.curation import synthetic
    from imagebert_hf.curation.spark import local_spark_session, run_spark

    def pages(folder, count):
        folder.mkdir()
        for number in range(count):
            page = synthetic.page_html(f"T{number}", f"/{number}.jpg", alt=f"A cat number {number}", paragraphs=["x"])
            (folder / f"page{number}.html").write_text(page)
        return [str(folder)]

    spark = local_spark_session("local[1]", shuffle_partitions=1)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        output = tmp_path / "out"
        first = run_spark(pages(tmp_path / "first", 1), output, spark=spark, num_partitions=1, load_result=False)
        earlier = folder_bytes(output)
        assert any(name.startswith("data/") for name in earlier) and "funnel.json" in earlier

        with pytest.raises(FileNotFoundError, match="input not found: .*missing.warc"):
            run_spark([str(tmp_path / "missing.warc")], output, spark=spark, num_partitions=1)
        with pytest.raises(ValueError, match="sources_per_part must be a positive integer, got 0"):
            run_spark(pages(tmp_path / "second", 3), output, spark=spark, sources_per_part=0)
        assert folder_bytes(output) == earlier

        second = run_spark([str(tmp_path / "second")], output, spark=spark, num_partitions=1, load_result=False)
        assert second.tally != first.tally
        assert json.loads((output / "funnel.json").read_text()) != json.loads(earlier["funnel.json"])
        assert not [p for p in output.iterdir() if p.name.startswith(".")]  # no temporary or old data folder
    finally:
        spark.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_weights_saved_for_a_team_are_readable_as_the_umask_allows(tmp_path, accelerator, make_tiny_config):
    """safetensors creates its files 0o600 whatever the umask: a model a run saved, or a corpus cache, would be
    readable by its writer alone on a shared cluster. Published folders and the corpus cache give them the mode of
    every other file (0o644 under umask 022, 0o640 under 027)."""
    import os

    from safetensors.torch import save_file

    from imagebert_hf import ImageBERTForImageTextRetrieval
    from imagebert_hf.data.retrieval_corpus import RetrievalCorpus
    from imagebert_hf.evaluation.full_ranking import save_corpus_cache
    from imagebert_hf.training.checkpointing import save_model

    previous = os.umask(0o027)
    try:
        save_file({"weight": torch.zeros(2)}, tmp_path / "bare.safetensors")
        assert (tmp_path / "bare.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does
        save_model(accelerator, ImageBERTForImageTextRetrieval(make_tiny_config()), tmp_path / "model")
        corpus = RetrievalCorpus(
            image_ids=["a"],
            texts=["x"],
            text_to_image=torch.zeros(1, dtype=torch.long),
            text_inputs={},
            region_inputs={},
        )
        save_corpus_cache(tmp_path / "corpus.safetensors", corpus, {"split": "test"})
    finally:
        os.umask(previous)
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "corpus.safetensors").stat().st_mode & 0o777 == 0o640
