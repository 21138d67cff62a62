"""Region extraction when machines race, inputs disagree or folders are damaged: two machines starting one folder
with other settings, a shard of another plan, manifest boxes on an image of another size, "~" in a path, a device
the workers must keep, flags a mode would ignore, a saved DatasetDict, and reruns or merges over folders cut short."""

import json
import shutil

import datasets
import numpy as np
import pytest
from PIL import Image
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.regions import cache_writer
from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import _weights_file_sha256, load_region_cache
from imagebert_hf.regions.cache_writer import extract_regions, merge_region_caches
from imagebert_hf.regions.cli import main

from .conftest import TINY_EXTRACTOR_KWARGS
from .test_extract_regions_cli_inputs import extractor_dir, jpeg_bytes, run_main, write_manifest  # noqa: F401
from .test_region_cache_scale import build
from .test_region_cache_writer_edges import _images


class PinnedToCPUExtractor(ImageBERTRoIExtractor):
    """Extracts only on the CPU it was pinned to (a worker process loads it by name)."""

    def extract_stream(self, *args, **kwargs):
        if self.device != "cpu":
            raise RuntimeError(f"the extractor runs on device {self.device!r}, not on the 'cpu' it was pinned to")
        yield from super().extract_stream(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny(make_tiny_extractor):
    return make_tiny_extractor()


def records(cache):
    return {key: cache[key] for key in cache}


def assert_same_records(found, expected):
    assert found.keys() == expected.keys()
    for key, record in expected.items():
        for name in ("region_features", "region_boxes", "region_class_labels"):
            np.testing.assert_array_equal(found[key][name], record[name], err_msg=f"{key} {name}")


# ------------------------------------------------------------------------------------------ machines racing


def test_a_machine_that_finds_the_folder_started_meanwhile_with_other_settings_is_refused(
    tiny, make_tiny_extractor, tmp_path, monkeypatch
):
    manifest = _images(tmp_path, 4)
    out = tmp_path / "cache"
    start = cache_writer._start_cache

    def other_machine_first(*args, **kwargs):
        # Between this machine's look at the folder and its start of the cache, the other machine (launched with
        # another max_regions) starts it and extracts its shard.
        monkeypatch.setattr(cache_writer, "_start_cache", start)
        extract_regions(
            manifest, out, make_tiny_extractor(max_regions=2), shard_size=2, num_shards=2, shard_index=1,
            progress=False,
        )  # fmt: skip
        return start(*args, **kwargs)

    monkeypatch.setattr(cache_writer, "_start_cache", other_machine_first)
    with pytest.raises(ValueError, match=r"holds a region cache of another source, extractor \(settings or weights"):
        extract_regions(manifest, out, tiny, shard_size=2, num_shards=2, shard_index=0, progress=False)

    # The folder stays the other machine's: its settings, its extractor, no shard of this one.
    assert json.loads((out / "cache_info.json").read_text())["extractor"]["max_regions"] == 2
    assert json.loads((out / "extractor" / "preprocessor_config.json").read_text())["max_regions"] == 2
    assert not (out / "shards" / "shard-00000").exists()


def test_a_shard_written_for_another_plan_is_refused_when_finishing_opening_and_merging(
    tiny, make_tiny_extractor, tmp_path
):
    manifest = _images(tmp_path, 4)
    other = tmp_path / "other"
    extract_regions(manifest, other, make_tiny_extractor(max_regions=2), shard_size=2, progress=False)
    foreign = other / "shards" / "shard-00001"

    # Finishing: this cache's shard 1 is the other settings' shard (same images, so same keys and sizes).
    out = tmp_path / "cache"
    extract_regions(manifest, out, tiny, shard_size=2, max_shards=1, progress=False)
    shutil.copytree(foreign, out / "shards" / "shard-00001")
    with pytest.raises(RegionCacheError, match=r"shards/shard-00001 was written for another cache .*Delete"):
        extract_regions(manifest, out, tiny, shard_size=2, progress=False)
    assert json.loads((out / "cache_info.json").read_text())["complete"] is False

    # Opening: a finished cache whose shard was replaced by the other one.
    full = tmp_path / "full"
    extract_regions(manifest, full, tiny, shard_size=2, progress=False)
    assert len(load_region_cache(full)) == 4
    shutil.rmtree(full / "shards" / "shard-00001")
    shutil.copytree(foreign, full / "shards" / "shard-00001")
    with pytest.raises(RegionCacheError, match=r"shards/shard-00001 was written for another cache"):
        load_region_cache(full)

    # Merging: a part holding the other settings' shard.
    for index in (0, 1):
        extract_regions(
            manifest, tmp_path / f"part{index}", tiny, shard_size=2, num_shards=2, shard_index=index, progress=False
        )
    shutil.rmtree(tmp_path / "part1" / "shards" / "shard-00001")
    shutil.copytree(foreign, tmp_path / "part1" / "shards" / "shard-00001")
    with pytest.raises(RegionCacheError, match=r"part1/shards/shard-00001 was written for another cache"):
        merge_region_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------ starts cut short


def killed_start(manifest, out, extractor, **kwargs):
    """What a start killed after writing `extractor/` and `index.jsonl` but before `cache_info.json` leaves (the
    order of earlier versions): a run of `extractor` over `manifest` without its other files."""
    extract_regions(manifest, out, extractor, progress=False, **kwargs)
    for name in ("cache_info.json", "report.json", "lookup.arrow"):
        (out / name).unlink()
    shutil.rmtree(out / "shards")


def reversed_manifest(manifest):
    lines = manifest.read_text().splitlines(keepends=True)
    other = manifest.with_name("reversed.jsonl")
    other.write_text("".join(reversed(lines)))
    return other


def assert_same_cache(found, expected, workers=False):
    """`found` holds the cache `expected` holds: the same regions, key table, settings and extractor."""
    found_records, expected_records = (
        records(load_region_cache(found, verify=True)),
        records(load_region_cache(expected)),
    )
    if workers:
        # Worker processes run other thread counts: the same regions, features equal up to float summation order.
        assert found_records.keys() == expected_records.keys()
        for key, record in expected_records.items():
            np.testing.assert_array_equal(found_records[key]["region_boxes"], record["region_boxes"], err_msg=key)
            np.testing.assert_allclose(
                found_records[key]["region_features"], record["region_features"], rtol=1e-2, atol=1e-5, err_msg=key
            )
    else:
        assert_same_records(found_records, expected_records)
    for name in ("cache_info.json", "index.jsonl", "extractor/preprocessor_config.json"):
        assert (found / name).read_text() == (expected / name).read_text(), name
    weights = [str(folder / "extractor" / "roi_extractor.safetensors") for folder in (found, expected)]
    assert _weights_file_sha256(weights[0]) == _weights_file_sha256(weights[1])


def test_a_folder_a_killed_start_left_is_reused_by_another_source_and_settings(tmp_path, extractor_dir):  # noqa: F811
    manifest = _images(tmp_path, 4)
    other = reversed_manifest(manifest)
    out, fresh = tmp_path / "cache", tmp_path / "fresh"
    killed_start(manifest, out, ImageBERTRoIExtractor.from_pretrained(extractor_dir, grid_sizes=[1]), shard_size=2)

    with CaptureLogger(cache_writer.logger) as captured:
        report = extract_regions(
            other, out, ImageBERTRoIExtractor.from_pretrained(extractor_dir), shard_size=2, progress=False
        )
    assert (report.num_extracted, report.num_failed) == (4, 0)
    assert f"{out / 'index.jsonl'} does not match the checksum in cache_info.json" in captured.out
    assert f"{out / 'extractor'} holds an extractor of other settings or weights" in captured.out
    extract_regions(other, fresh, ImageBERTRoIExtractor.from_pretrained(extractor_dir), shard_size=2, progress=False)
    assert_same_cache(out, fresh)
    # Not stuck: a rerun finds every shard done.
    rerun = extract_regions(
        other, out, ImageBERTRoIExtractor.from_pretrained(extractor_dir), shard_size=2, progress=False
    )
    assert rerun.num_shards_skipped == 2
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("stale", ["settings", "weights"])
def test_workers_load_the_extractor_the_cache_records_not_the_one_a_killed_start_left(
    stale,
    tmp_path,
    make_tiny_extractor,
    extractor_dir,  # noqa: F811
):
    manifest = _images(tmp_path, 4)
    out, fresh = tmp_path / "cache", tmp_path / "fresh"
    left = (
        ImageBERTRoIExtractor.from_pretrained(extractor_dir, grid_sizes=[1])
        if stale == "settings"
        else make_tiny_extractor(max_regions=4)  # the same settings, other (random) weights
    )
    killed_start(manifest, out, left, shard_size=2)

    extractor = ImageBERTRoIExtractor.from_pretrained(extractor_dir)
    report = extract_regions(manifest, out, extractor, shard_size=2, num_proc=2, progress=False)
    assert (report.num_extracted, report.num_failed) == (4, 0)
    extract_regions(manifest, fresh, extractor, shard_size=2, progress=False)
    assert_same_cache(out, fresh, workers=True)
    info = json.loads((out / "cache_info.json").read_text())
    saved = json.loads((out / "extractor" / "preprocessor_config.json").read_text())
    assert {**saved, "device": None} == info["extractor"]
    assert _weights_file_sha256(str(out / "extractor" / "roi_extractor.safetensors")) == info["weights_sha256"]


@pytest.mark.parametrize("meanwhile", ["_start_cache", "_complete_skeleton", "_same_saved_extractor"])
def test_two_machines_of_the_same_settings_both_go_on_over_a_killed_start(
    meanwhile,
    tmp_path,
    monkeypatch,
    extractor_dir,  # noqa: F811
):
    manifest = _images(tmp_path, 4)
    out, fresh = tmp_path / "cache", tmp_path / "fresh"
    killed_start(
        reversed_manifest(manifest), out, ImageBERTRoIExtractor.from_pretrained(extractor_dir, grid_sizes=[1]),
        shard_size=2,
    )  # fmt: skip
    step = getattr(cache_writer, meanwhile)
    placed = {}

    def other_machine_first(*args, **kwargs):
        # Before this machine claims the folder, completes its skeleton, or compares the extractor it just saved, the
        # other machine (the same settings) completes the skeleton and extracts its shard.
        monkeypatch.setattr(cache_writer, meanwhile, step)
        extract_regions(
            manifest, out, ImageBERTRoIExtractor.from_pretrained(extractor_dir), shard_size=2, num_shards=2,
            shard_index=1, progress=False,
        )  # fmt: skip
        placed.update({name: (out / name).stat().st_ino for name in ("extractor", "index.jsonl")})
        return step(*args, **kwargs)

    monkeypatch.setattr(cache_writer, meanwhile, other_machine_first)
    extractor = ImageBERTRoIExtractor.from_pretrained(extractor_dir)
    report = extract_regions(manifest, out, extractor, shard_size=2, num_shards=2, shard_index=0, progress=False)

    assert (report.num_extracted, report.num_failed) == (4, 0)
    # The other machine's extractor and index stay in place, untouched.
    assert placed == {name: (out / name).stat().st_ino for name in ("extractor", "index.jsonl")}
    extract_regions(manifest, fresh, extractor, shard_size=2, progress=False)
    assert_same_cache(out, fresh)


# ------------------------------------------------------------------------------------------ stated image sizes


def test_boxes_are_not_used_on_an_image_file_of_another_size_than_its_manifest_line_states(tiny, tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)

    def pixels():
        return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))

    pixels().save(tmp_path / "images" / "full.png")
    pixels().resize((32, 24)).save(tmp_path / "images" / "half.png")  # a half-size copy of a 64x48 photo
    turned = Image.Exif()
    turned[0x0112] = 6  # stored 64x48, shown (and boxed) 48x64
    for name in ("turned.jpg", "turned_wrong.jpg"):
        pixels().save(tmp_path / "images" / name, exif=turned)
    objects = [{"label": "x", "class_id": 1, "bbox_xywh": [5, 5, 30, 20]}]
    sizes = {"full.png": (64, 48), "half.png": (64, 48), "turned.jpg": (48, 64), "turned_wrong.jpg": (64, 48)}
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": f"images/{name}", "captions": ["a"], "width": w, "height": h, "objects": objects})
            + "\n"
            for name, (w, h) in sizes.items()
        )
    )

    report = extract_regions(manifest, tmp_path / "cache", tiny, use_boxes=True, progress=False)

    errors = {failure["key"]: failure["error"] for failure in report.failures}
    assert sorted(errors) == ["images/half.png", "images/turned_wrong.jpg"]
    assert errors["images/half.png"].startswith("the manifest states 64x48, but the image file is 32x24: its boxes")
    assert "48x64 once its EXIF orientation turns it" in errors["images/turned_wrong.jpg"]
    cache = load_region_cache(tmp_path / "cache")
    with pytest.raises(KeyError, match=r"has no regions: the manifest states 64x48, but the image file is 32x24"):
        cache["images/half.png"]
    assert (cache["images/turned.jpg"]["image_width"], cache["images/turned.jpg"]["image_height"]) == (48, 64)
    assert cache["images/full.png"]["num_regions"] == 1
    # Without boxes the stated size frames nothing: every image is extracted.
    assert extract_regions(manifest, tmp_path / "grid", tiny, progress=False).num_failed == 0


# ------------------------------------------------------------------------------------------ paths and devices


def test_a_tilde_in_any_path_is_the_home_folder(extractor_dir, tmp_path, monkeypatch):  # noqa: F811
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    write_manifest(home / "data", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    shutil.copytree(extractor_dir, home / "ext")

    argv = ["--manifest", "~/data/captions.jsonl", "--image_root", "~/data", "--extractor", "~/ext"]
    assert main([*argv, "--output_dir=~/cache"]) == 0
    assert json.loads((home / "cache" / "cache_info.json").read_text())["complete"] is True
    assert len(load_region_cache("~/cache")) == 2
    assert main(["--output_dir", "~/cache", "--verify"]) == 0

    for index in (0, 1):
        extract_regions(
            "~/data/captions.jsonl", f"~/part{index}", "~/ext", shard_size=1, num_shards=2, shard_index=index,
            progress=False,
        )  # fmt: skip
    merge_region_caches(["~/part0", "~/part1"], "~/merged")
    assert len(load_region_cache(home / "merged")) == 2
    assert not list(work.iterdir())  # no folder named "~" here


def test_worker_processes_run_on_the_device_the_extractor_was_pinned_to(tmp_path):
    manifest = _images(tmp_path, 2)
    extractor = PinnedToCPUExtractor(**TINY_EXTRACTOR_KWARGS, device="cpu")
    report = extract_regions(manifest, tmp_path / "cache", extractor, shard_size=1, num_proc=2, progress=False)
    assert (report.num_extracted, report.num_failed) == (2, 0)


# ------------------------------------------------------------------------------------------ flags a mode ignores


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    for index in (0, 1):
        build(folder / f"part{index}", num_images=4, shard_size=2, num_shards=2, shard_index=index)
    return [folder / "part0", folder / "part1"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--storage_dtype", "float32"], "--storage_dtype float32 does not apply to --merge, which joins finished"),
        (["--no_class_probs"], "--no_class_probs does not apply to --merge"),
        (["--batch_size", "1"], "--batch_size 1 does not apply to --merge"),
        (["--num_shards", "7"], "--num_shards 7 does not apply to --merge"),
        (["--shard_index", "3"], "--shard_index 3 does not apply to --merge"),
        (["--manifest", "m.jsonl"], "--manifest m.jsonl does not apply to --merge"),
    ],
)
def test_merge_refuses_the_flags_of_an_extraction(flags, expected, parts, tmp_path):
    out = tmp_path / "merged"
    message = run_main("--output_dir", out, "--merge", *parts, *flags)
    assert message.startswith(expected), message
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--storage_dtype", "float32"], "--storage_dtype float32 does not apply to --verify, which checks the cache"),
        (["--max_regions", "5"], "--max_regions 5 does not apply to --verify"),
        (["--num_proc", "4"], "--num_proc 4 does not apply to --verify"),
    ],
)
def test_verify_refuses_the_flags_of_an_extraction(flags, expected, parts):
    assert run_main("--output_dir", parts[0], "--verify", *flags).startswith(expected)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--key_column", "coco_id"], "--key_column coco_id does not apply to --manifest, which reads its images"),
        (["--image_column", "picture"], "--image_column picture does not apply to --manifest"),
        (["--dataset_path", "DATA", "--allow_outside_root"], "--allow_outside_root applies to a manifest"),
    ],
)
def test_an_extraction_refuses_the_flags_of_the_other_source(flags, expected, tmp_path, extractor_dir):  # noqa: F811
    manifest = write_manifest(tmp_path / "data", {"good.jpg": jpeg_bytes(5)})
    datasets.Dataset.from_dict({"image": [str(tmp_path / "data" / "good.jpg")]}).save_to_disk(str(tmp_path / "ds"))
    source = ["--manifest", manifest] if "--dataset_path" not in flags else []
    flags = [str(tmp_path / "ds") if flag == "DATA" else flag for flag in flags]
    out = tmp_path / "out"
    message = run_main(*source, *flags, "--output_dir", out, "--extractor", extractor_dir)
    assert message.startswith(expected), message
    assert not out.exists()


def test_a_saved_dataset_dict_is_refused_naming_its_splits(tiny, tmp_path, extractor_dir):  # noqa: F811
    write_manifest(tmp_path / "data", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "data" / n) for n in ("a.jpg", "b.jpg")]})
    splits = datasets.DatasetDict(train=rows, validation=rows.select([0]))
    splits.save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"

    message = run_main("--dataset_path", tmp_path / "dd", "--output_dir", out, "--extractor", extractor_dir)
    assert message == (
        f"--dataset_path {tmp_path / 'dd'} holds a DatasetDict of the splits ['train', 'validation']; give one "
        f"split's folder (e.g. --dataset_path {tmp_path / 'dd' / 'train'})"
    )
    with pytest.raises(ValueError, match=r"source is a DatasetDict of the splits \['train', 'validation'\]"):
        extract_regions(splits, out, tiny, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ damaged folders


def test_a_rerun_over_a_cut_short_cache_info_names_it(tmp_path, extractor_dir):  # noqa: F811
    manifest = write_manifest(tmp_path / "data", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    argv = ["--manifest", manifest, "--output_dir", tmp_path / "cache", "--extractor", extractor_dir]
    assert main([str(arg) for arg in argv]) == 0
    info = tmp_path / "cache" / "cache_info.json"
    info.write_bytes(info.read_bytes()[:10])
    assert run_main(*argv).startswith(f"{info} is damaged (")


@pytest.mark.parametrize("cut", ["no shard report", "no data file", "empty folder"])
def test_a_shard_folder_copied_in_part_is_named_by_the_reader_and_extracted_again_by_a_rerun(cut, tiny, tmp_path):
    manifest = _images(tmp_path, 4)
    out = tmp_path / "cache"
    extract_regions(manifest, out, tiny, shard_size=2, progress=False)
    expected = records(load_region_cache(out))
    shard = out / "shards" / "shard-00001"
    if cut == "no shard report":
        (shard / "shard_report.json").unlink()
        with pytest.raises(RegionCacheError, match=r"shard folder .*shard-00001 has no shard_report\.json"):
            load_region_cache(out)
    elif cut == "no data file":
        (shard / "data-00000-of-00001.arrow").unlink()
    else:
        shutil.rmtree(shard)
        shard.mkdir()

    with CaptureLogger(cache_writer.logger) as captured:
        report = extract_regions(manifest, out, tiny, shard_size=2, progress=False)
    assert f"{shard} has no shard_report.json or lacks data files" in captured.out
    assert (report.num_shards_skipped, report.num_extracted) == (1, 4)
    assert_same_records(records(load_region_cache(out)), expected)


def test_a_merge_checks_every_part_before_writing_anything(tmp_path, parts):
    copies = [tmp_path / part.name for part in parts]
    for part, copy in zip(parts, copies):
        shutil.copytree(part, copy)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"the parts hold 1 of 2 shards \(missing e\.g\. shard 1\)"):
        merge_region_caches(copies[:1], out)
    assert not out.exists()

    (copies[1] / "shards" / "shard-00001" / "shard_report.json").unlink()
    with pytest.raises(RegionCacheError, match=r"part1 holds an unfinished shard folder .*shard-00001 \(no shard_rep"):
        merge_region_caches(copies, out)
    assert not out.exists()

    (copies[1] / "index.jsonl").unlink()
    with pytest.raises(RegionCacheError, match=r"the part .*part1 has no index\.jsonl"):
        merge_region_caches(copies, out)
    assert not out.exists()


def test_a_rerun_after_an_image_was_restored_names_its_key(tiny, tmp_path):
    manifest = _images(tmp_path, 4)
    image = tmp_path / "images" / "003.png"
    kept = image.read_bytes()
    image.unlink()  # missing when the cache was written: a failure of its image
    report = extract_regions(manifest, tmp_path / "cache", tiny, shard_size=2, progress=False)
    assert [failure["key"] for failure in report.failures] == ["images/003.png"]

    image.write_bytes(kept)
    with pytest.raises(ValueError, match=r"another source: the key 'images/003\.png' \(index line 4\) names another"):
        extract_regions(manifest, tmp_path / "cache", tiny, shard_size=2, progress=False)


@pytest.fixture(scope="module")
def extractor_parts(tiny, tmp_path_factory):
    """Two parts of a split run with a real (tiny) extractor, whose `extractor/` folders hold its weights."""
    folder = tmp_path_factory.mktemp("extractor_parts")
    manifest = _images(folder, 4)
    for index in (0, 1):
        extract_regions(
            manifest, folder / f"part{index}", tiny, shard_size=2, num_shards=2, shard_index=index, progress=False
        )
    return [folder / "part0", folder / "part1"]


def weights_of(folder):
    return _weights_file_sha256(str(folder / "extractor" / "roi_extractor.safetensors"))


def test_a_merge_takes_the_extractor_the_caches_record_passing_over_a_copy_cut_short(extractor_parts, tmp_path):
    copies = [tmp_path / part.name for part in extractor_parts]
    for part, copy in zip(extractor_parts, copies):
        shutil.copytree(part, copy)
    recorded = json.loads((copies[0] / "cache_info.json").read_text())["weights_sha256"]
    weights = copies[0] / "extractor" / "roi_extractor.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # An earlier merge into the same folder, cut short while copying the extractor.
    out = tmp_path / "merged"
    (out / "extractor").mkdir(parents=True)
    (out / "extractor" / "preprocessor_config.json").write_text("{")

    with CaptureLogger(cache_writer.logger) as captured:
        merge_region_caches(copies, out)
    assert "could be confirmed" not in captured.out
    assert weights_of(out) == weights_of(copies[1]) == recorded
    ImageBERTRoIExtractor.from_pretrained(out / "extractor")  # a complete folder
    assert len(load_region_cache(out)) == 4


def test_a_merge_without_any_extractor_folder_names_it(extractor_parts, tmp_path):
    copies = [tmp_path / part.name for part in extractor_parts]
    for part, copy in zip(extractor_parts, copies):
        shutil.copytree(part, copy)
        shutil.rmtree(copy / "extractor")
    out = tmp_path / "merged"
    with pytest.raises(RegionCacheError, match=r"no part holds its extractor/ folder"):
        merge_region_caches(copies, out)
    assert not out.exists()
