"""Every writer survives `kill -9`: a child process runs the writer over an earlier, complete output and is killed
with SIGKILL in the middle of its write (at the moment its new files are written but not yet published); the earlier
output must still read back as it was, and a rerun must complete.

The child pauses through a patch of the writer's own publishing step (written into the child's script, nothing in
the package knows about it): it writes a `ready` file, then sleeps until it is killed.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from .testing_utils import PROJECT_ROOT


PAUSE = """
import os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {src!r})
def pause(*args, **kwargs):
    with open({ready!r}, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)
"""


def kill_during(script: str, tmp_path, timeout: float = 120.0) -> None:
    """Runs `script` (which calls `pause()` in the middle of its write) in a child, SIGKILLs it once paused."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    prelude = PAUSE.format(root=str(PROJECT_ROOT), src=str(PROJECT_ROOT / "src"), ready=str(ready))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(
                    f"the writer finished before it could be killed (rc {child.returncode}):\n{child.stderr.read()}"
                )
            if time.monotonic() > deadline:
                pytest.fail("the writer never reached its pause")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ region cache


def test_region_cache_extraction_killed_mid_shard_resumes_to_the_same_cache(tmp_path):
    from imagebert_hf.regions.cache_layout import RegionCacheError
    from imagebert_hf.regions.cache_reader import load_region_cache, verify_region_cache

    from .test_region_cache_scale import assert_same_records, build, records_of

    build(tmp_path / "reference")
    expected = records_of(load_region_cache(tmp_path / "reference"))
    cache = tmp_path / "cache"
    build(cache, max_shards=1)  # the earlier output: shard 0 finished
    finished = folder_bytes(cache / "shards" / "shard-00000")

    kill_during(
        f"""
        import imagebert_hf.regions.cache_writer as cache_writer
        from tests.test_region_cache_scale import build
        publish = cache_writer.publish_folder
        def publish_then_pause(tmp, final, replace=True):
            if "shard-00001" in str(final):
                pause()
            return publish(tmp, final, replace)
        cache_writer.publish_folder = publish_then_pause
        build({str(cache)!r})
        """,
        tmp_path,
    )
    # Killed with shard 1 written under its temporary name: shard 0 is as it was, shard 1 is not published.
    assert folder_bytes(cache / "shards" / "shard-00000") == finished
    assert list((cache / "shards").glob("shard-00001.tmp-*"))
    assert not (cache / "shards" / "shard-00001").exists()
    with pytest.raises(RegionCacheError, match=r"incomplete \(2 shards missing, e.g. shard-00001\); rerun"):
        load_region_cache(cache)

    report = build(cache)
    assert report.num_shards_skipped == 1 and not list((cache / "shards").glob("*.tmp-*"))
    assert_same_records(records_of(load_region_cache(cache)), expected)
    assert verify_region_cache(cache) == 1 + 3  # index.jsonl and one Arrow file per shard


# ------------------------------------------------------------------------------------------------ curation


def _html_inputs(folder, pages: int):
    from imagebert_hf.curation import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    for number in range(pages):
        page = synthetic.page_html(f"T{number}", f"/{number}.jpg", alt=f"A cat number {number}", paragraphs=["x"])
        (folder / f"page{number}.html").write_text(page)
    return [str(folder)]


def test_curation_killed_before_publishing_keeps_the_earlier_output(tmp_path):
    from imagebert_hf.curation.pipeline import run_local

    output = tmp_path / "out"
    run_local(_html_inputs(tmp_path / "first", 1), output)
    earlier = folder_bytes(output)
    assert "data/part-00000-of-00001.parquet" in earlier

    second = _html_inputs(tmp_path / "second", 3)
    kill_during(
        f"""
        import imagebert_hf.curation.pipeline as pipeline
        pipeline.publish_folder = pause
        pipeline.run_local({second!r}, {str(output)!r})
        """,
        tmp_path,
    )
    left = folder_bytes(output)
    assert {k: v for k, v in left.items() if not k.startswith((".data.tmp-", "curation-"))} == earlier
    assert any(k.startswith(".data.tmp-") for k in left)  # the new data, written but never published

    run_local(second, output)
    funnel = json.loads((output / "funnel.json").read_text())
    assert funnel != json.loads(earlier["funnel.json"])  # the rerun's counts (3 pages) replaced the first run's
    assert not list(output.glob(".data.tmp-*")) and not list(output.glob("curation-*"))


def test_curation_with_a_missing_input_leaves_the_earlier_output(tmp_path):
    from imagebert_hf.curation.pipeline import run_local

    output = tmp_path / "out"
    run_local(_html_inputs(tmp_path / "first", 1), output)
    earlier = folder_bytes(output)
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.warc"):
        run_local([str(tmp_path / "missing.warc")], output)
    assert folder_bytes(output) == earlier


# ------------------------------------------------------------------------------------------------ retrieval index


def test_retrieval_index_save_killed_keeps_the_earlier_index(tmp_path):
    from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex

    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    np.save(tmp_path / "second.npy", second)
    folder = tmp_path / "index"
    EmbeddingIndex(first).save(folder)

    kill_during(
        f"""
        import numpy as np
        import imagebert_hf.models.imagebert.retrieval_index as retrieval_index
        retrieval_index.publish_folder = pause
        retrieval_index.EmbeddingIndex(np.load({str(tmp_path / "second.npy")!r})).save({str(folder)!r})
        """,
        tmp_path,
    )
    loaded = EmbeddingIndex.load(folder, verify=True)
    np.testing.assert_array_equal(loaded.embeddings.numpy(), first)
    assert list(tmp_path.glob(".index.tmp-*"))  # the killed save's files, never published

    EmbeddingIndex(second).save(folder)
    np.testing.assert_array_equal(EmbeddingIndex.load(folder, verify=True).embeddings.numpy(), second)


# ------------------------------------------------------------------------------------------------ evaluation outputs


def test_model_card_save_killed_mid_write_keeps_the_earlier_card(tmp_path):
    from imagebert_hf.evaluation.hub import build_model_card, save_model_card

    metrics = {"tr_r1": 10.0, "ir_r1": 5.0}
    result = {"dataset_name": "MS-COCO 5k", "dataset_type": "coco", "metrics": metrics}
    save_model_card(build_model_card([result], model_id="first-model"), tmp_path)
    earlier = (tmp_path / "README.md").read_text()

    kill_during(
        f"""
        import os
        from imagebert_hf.evaluation.hub import build_model_card, save_model_card
        replace = os.replace
        def replace_then_pause(source, target):
            if str(target).endswith("README.md"):
                pause()
            return replace(source, target)
        os.replace = replace_then_pause
        result = {{"dataset_name": "MS-COCO 5k", "dataset_type": "coco", "metrics": {{"tr_r1": 50.0}}}}
        save_model_card(build_model_card([result], model_id="second-model"), {str(tmp_path)!r})
        """,
        tmp_path,
    )
    assert (tmp_path / "README.md").read_text() == earlier
    assert list(tmp_path.glob(".README.md.tmp-*"))  # the complete new card, never renamed
    save_model_card(build_model_card([result], model_id="second-model"), tmp_path)
    assert "second-model" in (tmp_path / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_save_killed_keeps_the_previous_checkpoint_and_resumes(tmp_path):
    pytest.importorskip("accelerate")
    from imagebert_hf.training.checkpointing import TrainState, latest_checkpoint, list_checkpoints

    script = f"""
        import torch
        from accelerate import Accelerator
        import imagebert_hf.training.checkpointing as checkpointing
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(torch.nn.Linear(4, 2))
        step = int(sys.argv[1]) if len(sys.argv) > 1 else 2
        if step == 2:
            checkpointing.publish_folder = pause
        checkpointing.save_checkpoint(accelerator, {str(tmp_path / "ckpt")!r}, checkpointing.TrainState(completed_steps=step))
        """
    # The earlier checkpoint, written by a child that is not killed.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PAUSE.format(root=str(PROJECT_ROOT), src=str(PROJECT_ROOT / "src"), ready=str(tmp_path / "unused"))
            + textwrap.dedent(script),
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    kill_during(script, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_00000001"]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_00000001"
    assert TrainState.load(latest_checkpoint(tmp_path / "ckpt")).completed_steps == 1
    assert (tmp_path / "ckpt" / ".tmp-step_00000002").is_dir()  # half a checkpoint, never listed


# ------------------------------------------------------------------------------------------------ saved models


def test_save_model_killed_keeps_the_earlier_model_and_the_folders_other_files(tmp_path):
    pytest.importorskip("accelerate")
    import torch
    from accelerate import Accelerator

    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
    from imagebert_hf.training.checkpointing import save_model

    from .testing_utils import tiny_config_kwargs

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    save_model(
        accelerator, accelerator.prepare(ImageBERTForPreTraining(ImageBERTConfig(**tiny_config_kwargs()))), folder
    )
    earlier = folder_bytes(folder)

    script = f"""
        import torch
        from accelerate import Accelerator
        from imagebert_hf import ImageBERTForPreTraining
        from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
        import imagebert_hf.training.checkpointing as checkpointing
        from tests.testing_utils import tiny_config_kwargs
        checkpointing.publish_folder_keeping_others = pause
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(1)
        model = ImageBERTForPreTraining(ImageBERTConfig(**tiny_config_kwargs(num_hidden_layers=1)))
        checkpointing.save_model(accelerator, accelerator.prepare(model), {str(folder)!r})
        """
    kill_during(script, tmp_path)
    assert folder_bytes(folder) == earlier
    assert (tmp_path / ".final.tmp-save" / "model.safetensors").is_file()  # the new model, never published
    assert ImageBERTForPreTraining.from_pretrained(folder).config.num_hidden_layers == 2

    torch.manual_seed(1)
    second = ImageBERTForPreTraining(ImageBERTConfig(**tiny_config_kwargs(num_hidden_layers=1)))
    save_model(accelerator, accelerator.prepare(second), folder)
    assert ImageBERTForPreTraining.from_pretrained(folder).config.num_hidden_layers == 1
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ready") == ["final"]


def test_save_for_hub_killed_keeps_the_earlier_hub_folder(tmp_path):
    script = """
        import torch
        from imagebert_hf import ImageBERTForImageTextRetrieval
        from imagebert_hf.data.synthetic import make_synthetic_tokenizer
        from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
        from imagebert_hf.models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor
        from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
        import imagebert_hf.evaluation.hub as hub
        from tests.conftest import TINY_EXTRACTOR_KWARGS
        from tests.testing_utils import tiny_config_kwargs
        name = sys.argv[1] if len(sys.argv) > 1 else "second"
        if name == "second":
            hub.publish_folder_keeping_others = pause
        tokenizer = make_synthetic_tokenizer()
        extractor = ImageBERTRoIExtractor(**TINY_EXTRACTOR_KWARGS)
        config = ImageBERTConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), **extractor.config_kwargs()))
        torch.manual_seed(0)
        processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
        card = hub.build_model_card(model_id=name + "-model")
        hub.save_for_hub(ImageBERTForImageTextRetrieval(config), processor, FOLDER, card)
        """.replace("FOLDER", repr(str(tmp_path / "hub")))
    prelude = PAUSE.format(root=str(PROJECT_ROOT), src=str(PROJECT_ROOT / "src"), ready=str(tmp_path / "unused"))
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), "first"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    earlier = folder_bytes(tmp_path / "hub")
    assert "first-model" in earlier["README.md"].decode() and "model.safetensors" in earlier

    kill_during(script, tmp_path)
    assert folder_bytes(tmp_path / "hub") == earlier
    (written,) = tmp_path.glob(".hub.tmp-*")  # the complete new folder, never published
    assert "second-model" in (written / "README.md").read_text()
