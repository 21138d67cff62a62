"""`imagebert-extract-regions` given bad inputs, run in-process through `main(argv)`: an unknown flag, a missing
image root or extractor folder, a manifest that is a folder or lists nothing, images that all fail, a cache damaged
where no checksum was recorded, and a `cache_info.json` whose shard count is absurd. Each ends with exit status 1
and one line naming the input; the refused inputs leave no output behind."""

import io
import json
import os
import shutil

import pytest
from PIL import Image

from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import load_region_cache, verify_region_cache
from imagebert_hf.regions.cli import main

from .test_region_cache_scale import build


PROGRAM = "imagebert-extract-regions: error: "


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (40 * seed % 256, 90, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_manifest(folder, images: dict[str, bytes]):
    """A manifest with one line per image of `images` (file name -> bytes), written next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (folder / name).write_bytes(data)
    manifest = folder / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"image": name, "captions": ["a photo"]}) + "\n" for name in images))
    return manifest


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory, make_tiny_extractor):
    """The tiny test extractor saved with its weights (`roi_extractor.safetensors`), as `--extractor` takes it."""
    folder = tmp_path_factory.mktemp("extractor")
    make_tiny_extractor(max_regions=4).save_pretrained(folder)
    return folder


def run_main(*argv) -> str:
    """The one line `main` ends with; fails the test unless it ends with exit status 1 that way."""
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith(PROGRAM), message  # SystemExit(str): status 1
    assert "\n" not in message, message
    return message[len(PROGRAM) :]


def test_an_unknown_flag_is_refused_as_argparse_refuses_one(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--output_dir", str(out), "--bogus", "1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bogus 1")
    assert not out.exists()


def test_every_image_failing_exits_1_naming_the_first_and_the_report(tmp_path, extractor_dir):
    manifest = write_manifest(
        tmp_path / "data", {"cut.jpg": jpeg_bytes(1)[:100], "text.jpg": b"not an image\n", "empty.jpg": b""}
    )
    out = tmp_path / "out"
    message = run_main("--manifest", manifest, "--output_dir", out, "--extractor", extractor_dir)
    assert message.startswith("no image could be extracted: all 3 failed (first: cut.jpg: "), message
    assert message.endswith(f"reasons in {out / 'report.json'}"), message
    assert json.loads((out / "report.json").read_text())["num_failed"] == 3


def test_some_images_failing_still_exits_0(tmp_path, extractor_dir, capsys):
    manifest = write_manifest(tmp_path / "data", {"good.jpg": jpeg_bytes(2), "text.jpg": b"not an image\n"})
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--output_dir", str(out), "--extractor", str(extractor_dir)]) == 0
    assert "1 extracted, 1 failed" in capsys.readouterr().out
    assert list(load_region_cache(out).keys()) == ["good.jpg"]


def test_a_missing_image_root_is_refused_before_anything_is_written(tmp_path, extractor_dir):
    manifest = write_manifest(tmp_path / "data", {"good.jpg": jpeg_bytes(3)})
    out, root = tmp_path / "out", tmp_path / "nonexistent"
    message = run_main("--manifest", manifest, "--output_dir", out, "--extractor", extractor_dir, "--image_root", root)
    assert message.startswith(f"image_root {root} does not exist (expected the folder"), message
    assert not out.exists()


def test_a_manifest_that_is_a_folder_is_named_as_one(tmp_path):
    out = tmp_path / "out"
    message = run_main("--manifest", tmp_path, "--output_dir", out)
    assert message == f"--manifest {tmp_path}: a folder (expected a jsonl manifest)"
    assert not out.exists()


def test_an_empty_manifest_is_refused_before_anything_is_written(tmp_path, extractor_dir):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("")
    out = tmp_path / "out"
    message = run_main("--manifest", manifest, "--output_dir", out, "--extractor", extractor_dir)
    assert message == f"manifest {manifest} lists no images: nothing to extract."
    assert not out.exists()


def test_a_missing_extractor_folder_is_named(tmp_path):
    manifest = write_manifest(tmp_path / "data", {"good.jpg": jpeg_bytes(4)})
    out, missing = tmp_path / "out", tmp_path / "no" / "extractor"
    message = run_main("--manifest", manifest, "--output_dir", out, "--extractor", missing)
    assert message.startswith(f"--extractor {missing}: no such folder (expected a folder saved with"), message
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ verify


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory, extractor_dir):
    data = tmp_path_factory.mktemp("data")
    manifest = write_manifest(data, {f"img{i}.jpg": jpeg_bytes(i) for i in range(3)})
    folder = data / "cache"
    assert main(["--manifest", str(manifest), "--output_dir", str(folder), "--extractor", str(extractor_dir)]) == 0
    return folder


@pytest.mark.parametrize(
    "damaged", ["extractor/roi_extractor.safetensors", "extractor/preprocessor_config.json", "shards/*/state.json"]
)
def test_verify_finds_a_truncated_file_that_has_no_recorded_checksum(cache_copy, damaged):
    assert main(["--output_dir", str(cache_copy), "--verify"]) == 0
    file = next(cache_copy.glob(damaged))
    os.truncate(file, 100)
    message = run_main("--output_dir", cache_copy, "--verify")
    assert message.startswith(f"region cache file {file} is damaged ("), message
    with pytest.raises(RegionCacheError, match="is damaged"):
        verify_region_cache(cache_copy)


def test_verify_finds_a_missing_extractor_folder(cache_copy):
    shutil.rmtree(cache_copy / "extractor")
    message = run_main("--output_dir", cache_copy, "--verify")
    assert message.startswith(f"region cache {cache_copy} has no extractor/ folder"), message


# ------------------------------------------------------------------------------------------------ shard count


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "cache"
    build(folder, num_images=4, shard_size=2)
    return folder


def set_num_shards(folder, num_shards: int) -> None:
    info_path = folder / "cache_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "num_shards": num_shards}))


def test_an_absurd_shard_count_names_cache_info(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    set_num_shards(copy, 10**9)
    with pytest.raises(RegionCacheError, match=r"cache_info.json is damaged \(num_shards=1000000000, more than the"):
        load_region_cache(copy)


def test_a_shard_count_without_an_index_is_checked_against_the_shard_folders(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    (copy / "index.jsonl").unlink()  # lookup.arrow alone can serve reads: the index is no bound here
    set_num_shards(copy, 10**9)
    with pytest.raises(
        RegionCacheError,
        match=r"cache_info\.json says num_shards=1000000000, but .*shard_report\.json \(written with the shards\) holds 2",
    ):
        load_region_cache(copy)
    # A cache written before the shard reports recorded the count: the shards on disk still bound the check.
    for report in copy.glob("shards/shard-*/shard_report.json"):
        report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items() if k != "num_shards"}))
    with pytest.raises(RegionCacheError, match=r"incomplete \(999999998 shards missing, e\.g\. shard-00002\)"):
        load_region_cache(copy)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max_regions", "2"], "--max_regions 2 applies to the default extractor; the saved --extractor"),
        (["--dataset_path", "DATA", "--use_boxes"], "--use_boxes applies to a manifest (its object boxes"),
        (["--dataset_path", "DATA", "--image_root", "ROOT"], "--image_root applies to a manifest (its object boxes"),
    ],
)
def test_a_flag_that_would_not_apply_is_refused(flags, expected, tmp_path, extractor_dir):
    manifest = write_manifest(tmp_path / "data", {"good.jpg": jpeg_bytes(5)})
    source = ["--manifest", manifest] if "--dataset_path" not in flags else []
    flags = [str(tmp_path / "data") if flag in ("DATA", "ROOT") else flag for flag in flags]
    out = tmp_path / "out"
    message = run_main(*source, *flags, "--output_dir", out, "--extractor", extractor_dir)
    assert message.startswith(expected), message
    assert not out.exists()
