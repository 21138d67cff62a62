"""`imagebert-app`'s flags: an unknown flag or a value that cannot work (a port out of range, a count below 1, a
device that is not here) ends the command with one line naming the flag, before any model or gallery is loaded."""

import json
import re
import subprocess
import sys

import pytest
import torch

from imagebert_hf.app import cli


PREFIX = "imagebert-app: error: "


@pytest.fixture
def no_loading(monkeypatch):
    """Makes loading a model or a gallery fail the test: every check must come before it."""

    def load_demo(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(cli, "load_demo", load_demo)


def refusal(argv) -> str:
    """The one-line message `main(argv)` ends with."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    message = stop.value.code
    # A string code is printed to stderr and the process exits 1.
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(PREFIX), message
    return message[len(PREFIX) :]


BAD_VALUES = [
    (["--port", "99999"], "--port must be in [1, 65535], got 99999."),
    (["--port", "0"], "--port must be in [1, 65535], got 0."),
    (["--port", "-80"], "--port must be in [1, 65535], got -80."),
    (["--top_k", "-1"], "--top_k must be in [1, 32], got -1."),
    (["--top_k", "0"], "--top_k must be in [1, 32], got 0."),
    (["--top_k", "33"], "--top_k must be in [1, 32], got 33."),
    (["--shortlist_k", "-3"], "--shortlist_k must be >= 1, got -3."),
    (["--shortlist_k", "0"], "--shortlist_k must be >= 1, got 0."),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0."),
    (["--max_gallery", "0"], "--max_gallery must be >= 1, got 0."),
    (["--max_gallery", "-2"], "--max_gallery must be >= 1, got -2."),
    (["--gallery_regions", "grid"], "--gallery_regions must be one of ['auto', 'boxes', 'extractor'], got 'grid'"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_VALUES, ids=[" ".join(flags) for flags, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_flag(flags, expected, tmp_path, no_loading):
    assert refusal(["--model", str(tmp_path), "--gallery", str(tmp_path), *flags]) == expected


@pytest.mark.parametrize("model", ["./no-such-model", "no-such-owner/no-such-model"])
def test_a_bad_value_is_named_before_a_missing_model_or_gallery(model, tmp_path, no_loading):
    missing = str(tmp_path / "no-such-gallery")
    assert refusal(["--model", model, "--gallery", missing, "--port", "99999"]).startswith("--port must be")
    assert refusal(["--model", model, "--batch_size", "0"]).startswith("--batch_size must be")
    assert refusal(["--device", "no-such-device"]).startswith("--device no-such-device: not a device")


def test_an_unknown_flag_is_refused_as_argparse_refuses_one(tmp_path, no_loading, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--model", "./no-such-model", "--gallery", str(tmp_path), "--bogus", "1"])
    assert stop.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith("error: unrecognized arguments: --bogus 1"), last_line


def test_the_command_exits_1_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imagebert_hf.app.cli", "--model", "./no-such-model", "--top_k", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [PREFIX + "--top_k must be in [1, 32], got -1."], result.stderr[
        -2000:
    ]


def test_good_values_pass_the_checks(tmp_path):
    argv = ["--model", str(tmp_path), "--gallery", str(tmp_path), "--port", "65535", "--top_k", "1"]
    args = cli.parse_args([*argv, "--shortlist_k", "1", "--batch_size", "1", "--max_gallery", "1", "--device", "-1"])
    assert (args.port, args.top_k, args.shortlist_k, args.batch_size, args.max_gallery) == (65535, 1, 1, 1, 1)
    assert cli.parse_args(["--model", str(tmp_path), "--gallery", str(tmp_path)]).max_gallery is None
    assert cli.app_device(cli.AppArguments().device) == torch.device("cpu")
    assert cli.app_device("-1") == cli.app_device(-1) == cli.app_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ --device


def test_devices_on_a_machine_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(cli, "_accelerator", lambda: (None, 0))
    assert cli.app_device("cpu") == torch.device("cpu")
    for value in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError, match=rf"^--device {value}: {value} is not available here \(available: cpu\)$"):
            cli.app_device(value)
    with pytest.raises(ValueError, match=r"^--device 7: there is no accelerator here to index \(available: cpu\)$"):
        cli.app_device("7")


def test_devices_on_a_machine_with_two_gpus(monkeypatch):
    monkeypatch.setattr(cli, "_accelerator", lambda: ("cuda", 2))
    assert cli.app_device("cuda") == torch.device("cuda")
    assert cli.app_device("cuda:1") == cli.app_device("1") == torch.device("cuda", 1)
    assert cli.app_device("0") == torch.device("cuda", 0) and cli.app_device("-1") == torch.device("cpu")
    available = re.escape("(available: cpu, cuda:0, cuda:1)")
    with pytest.raises(ValueError, match=rf"^--device 7: cuda:7 is not available here {available}$"):
        cli.app_device("7")
    with pytest.raises(ValueError, match=rf"^--device cuda:2: cuda:2 is not available here {available}$"):
        cli.app_device("cuda:2")
    with pytest.raises(ValueError, match=rf"^--device mps: mps is not available here {available}$"):
        cli.app_device("mps")


@pytest.mark.parametrize("value", ["gpu", "cuda:-1", "-2", "--1", "cuda:x", ""])
def test_a_value_torch_cannot_parse_is_not_a_device(value):
    with pytest.raises(ValueError, match=rf"^--device {re.escape(value)}: not a device \(expected cpu, .*available: "):
        cli.app_device(value)


def test_devices_of_this_machine(tmp_path, no_loading):
    """The real machine: its accelerator's first device is accepted, one past its last is refused by main."""
    kind, count = cli._accelerator()
    if kind is None:
        assert refusal(["--device", "cuda"]) == "--device cuda: cuda is not available here (available: cpu)"
        assert refusal(["--device", "7"]).startswith("--device 7: there is no accelerator here to index")
        return
    assert cli.app_device(f"{kind}:0") == cli.app_device("0") == torch.device(kind, 0)
    assert cli.app_device(kind) == torch.device(kind)
    message = refusal(["--model", str(tmp_path), "--gallery", str(tmp_path), "--device", str(count)])
    assert message.startswith(f"--device {count}: {kind}:{count} is not available here (available: cpu, {kind}:0")


def test_a_missing_model_folder_is_named_and_a_hub_id_is_left_to_the_hub(tmp_path, no_loading):
    missing = tmp_path / "no-such-model"
    assert refusal(["--model", str(missing), "--gallery", str(tmp_path)]) == (
        f"--model {missing}: no such folder (expected a saved model folder, or a Hub id such as owner/name)."
    )
    # A name the Hub could hold goes on to loading (which the fixture makes fail the test, so catch that).
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli.main(["--model", "no-such-owner/no-such-model", "--gallery", str(tmp_path)])


@pytest.mark.parametrize(
    ("model", "gallery_regions", "boxed"),
    [(None, "auto", True), ("MODEL", "auto", False), ("MODEL", "boxes", True), (None, "extractor", False)],
)
def test_a_manifest_gallery_uses_its_boxes_for_the_demo_model_only_unless_asked(
    model, gallery_regions, boxed, tmp_path, monkeypatch
):
    """A model trained on its processor's regions is served a manifest's photos as the processor covers them, not
    over the manifest's boxes (the demo's training layout), unless --gallery_regions says otherwise."""
    from imagebert_hf.app import engine

    manifest = tmp_path / "captions.jsonl"
    objects = [{"bbox_xyxy": [0, 0, 4, 4], "label": "dog"}]
    line = {"image": "a.png", "captions": ["a dog"], "objects": objects, "width": 8, "height": 8, "split": "test"}
    manifest.write_text(json.dumps(line) + "\n")
    seen = {}
    monkeypatch.setattr(engine, "load_retriever", lambda model, device=None: None)
    monkeypatch.setattr(engine, "RetrievalDemo", lambda retriever, photos, **kwargs: seen.setdefault("photos", photos))
    monkeypatch.setattr(cli, "ensure_demo_model", lambda demo_dir: tmp_path)
    args = cli.AppArguments(model=model and str(tmp_path), gallery=str(manifest), gallery_regions=gallery_regions)
    cli.load_demo(args)
    [photo] = seen["photos"]
    assert (photo.boxes is not None) == boxed
    if boxed:
        assert photo.boxes[-1] == (0.0, 0.0, 8.0, 8.0) and photo.box_labels[-1] == "whole image"


def test_an_address_the_app_cannot_serve_on_is_named_before_the_gallery_is_indexed(tmp_path, no_loading):
    import socket

    flags = ["--model", str(tmp_path), "--gallery", str(tmp_path)]
    assert refusal([*flags, "--host", "256.1.1.1"]).startswith("--host 256.1.1.1: not an address this machine")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert refusal([*flags, "--port", str(port)]).startswith(f"--port {port}: cannot serve on 127.0.0.1:{port}")
