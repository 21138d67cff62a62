"""`imagebert-app`: serve the retrieval app on a model and a gallery (the `make demo` checkpoint and its held-out
photos by default, built first when absent).

    imagebert-app                                   # make demo's model and test photos, on http://127.0.0.1:7860
    imagebert-app --model path/or/hub-id --gallery photos/   # any model, a folder of images
    imagebert-app --model ... --gallery captions.jsonl --split test      # or a jsonl manifest
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..formats.files import check_folder_or_hub_id, check_output_dir
from ..formats.manifest import ManifestError, outside_root_flag
from ..models.imagebert.script_errors import exit_on_error, parse_flags


DEMO_MODEL = Path("pretraining") / "stage2-clean" / "final"
DEMO_GALLERY = Path("data") / "captions.jsonl"
GALLERY_REGIONS = ("auto", "boxes", "extractor")


@dataclass
class AppArguments:
    """Settings of `imagebert-app`."""

    model: str | None = field(
        default=None,
        metadata={"help": "A model folder or Hub id with its processor; the `make demo` checkpoint when unset."},
    )
    gallery: str | None = field(
        default=None,
        metadata={"help": "A folder of images or a jsonl manifest; the demo's photos when unset."},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "Keep only this split of a manifest gallery ('test' for the default demo gallery)."},
    )
    max_gallery: int | None = field(default=None, metadata={"help": "Use at most this many gallery photos."})
    allow_outside_root: bool = outside_root_flag("a manifest gallery (rooted at the manifest's folder)")
    gallery_regions: str = field(
        default="auto",
        metadata={
            "help": "Regions of a manifest gallery's photos: 'boxes' (its annotated boxes plus the whole image, the "
            "layout `make demo` trains on), 'extractor' (the model's processor covers each photo, as for a folder or "
            "an upload), or 'auto': boxes for the demo model, the extractor for a --model."
        },
    )
    region_cache: str | None = field(
        default=None,
        metadata={
            "help": "A region cache of the gallery's photos (imagebert-extract-regions over the same manifest, with "
            "the model's extractor): their regions are read from it, memory-mapped, instead of extracted at start. "
            "For a large gallery; --gallery_regions does not apply (the cache's regions are used)."
        },
    )
    demo_dir: str = field(default="outputs/demo", metadata={"help": "Where `make demo` writes (and the app reads)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (loopback by default)."})
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    top_k: int = field(default=8, metadata={"help": "Photos shown per text query (changeable in the page)."})
    shortlist_k: int = field(
        default=128, metadata={"help": "Candidates of the prebuilt index re-ranked by the cross-encoder per query."}
    )
    batch_size: int = field(default=32, metadata={"help": "Images per extraction batch and pairs per forward."})
    device: str = field(
        default="cpu",
        metadata={
            "help": "Where the model runs: cpu, an accelerator such as cuda, cuda:1 or mps, or an index of this "
            "machine's accelerator (-1 for the CPU)."
        },
    )


def find_demo_script() -> Path | None:
    """`examples/demo.py` of a source checkout: under the working folder, or beside the installed sources."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "examples" / "demo.py").is_file():
            return root / "examples" / "demo.py"
    return None


def ensure_demo_model(demo_dir: str | os.PathLike) -> Path:
    """The `make demo` checkpoint under `demo_dir`, built first (about 2 minutes on a CPU) when it is absent."""
    demo_dir = Path(demo_dir)
    model = demo_dir / DEMO_MODEL
    if (model / "config.json").is_file() and (demo_dir / DEMO_GALLERY).is_file():
        return model
    script = find_demo_script()
    if script is None:
        raise SystemExit(
            f"no demo model at {model}, and examples/demo.py (which builds it) is not here: run the app from a "
            "source checkout, or pass --model and --gallery."
        )
    print(f"No demo model at {model}: building it with {script} (about 2 minutes on a CPU) ...", flush=True)
    subprocess.run([sys.executable, str(script), "--output_dir", str(demo_dir), "--report_to", "none"], check=True)
    print(f"Demo model ready at {model}.", flush=True)
    return model


def _accelerator() -> tuple[str | None, int]:
    """The type of the accelerator torch can use here (`"cuda"`, `"mps"`, ...) and its device count; None, 0 when
    there is none."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:  # torch < 2.6 has no generic accelerator interface
        return ("cuda", torch.cuda.device_count()) if torch.cuda.is_available() else (None, 0)
    if not accelerator.is_available():
        return None, 0
    return accelerator.current_accelerator().type, accelerator.device_count()


def app_device(value: str | int):
    """The `torch.device` that `--device` names: `cpu`, a device string torch parses (`cuda`, `cuda:1`, `mps`), or
    an index of this machine's accelerator (-1 for the CPU). Raises `ValueError` naming `--device` when torch cannot
    parse it or the device is not here, before anything is loaded on it."""
    import torch

    text = str(value).strip()
    kind, count = _accelerator()
    available = ", ".join(["cpu"] + [f"{kind}:{index}" for index in range(count)])
    index = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
    if index is not None and index >= 0 and kind is None:
        raise ValueError(f"--device {text}: there is no accelerator here to index (available: {available})")
    try:
        if index is None:
            device = torch.device(text)
        elif index == -1:
            device = torch.device("cpu")
        elif index >= 0:
            device = torch.device(kind, index)
        else:
            raise RuntimeError(f"no device has the index {index}")
    except RuntimeError:
        raise ValueError(
            f"--device {text}: not a device (expected cpu, an accelerator such as cuda or cuda:0, or an "
            f"accelerator index, -1 for the CPU; available: {available})"
        ) from None
    if device.type == "cpu" or (device.type == kind and (device.index is None or device.index < count)):
        return device
    raise ValueError(f"--device {text}: {device} is not available here (available: {available})")


def load_demo(args: AppArguments):
    """The `RetrievalDemo` the arguments describe: the pipeline and the gallery, indexed."""
    from .engine import AppInputError, RetrievalDemo, load_retriever, open_gallery_cache, read_gallery

    model, gallery, split = args.model, args.gallery, args.split
    # A model trained on its processor's regions (the real-data example's grid) would rank a manifest's boxes as
    # regions it never saw: the boxes serve the demo, whose training used them.
    use_boxes = args.gallery_regions == "boxes" or (args.gallery_regions == "auto" and model is None)
    if model is None:
        model = str(ensure_demo_model(args.demo_dir))
        if gallery is None:
            gallery, split = str(Path(args.demo_dir) / DEMO_GALLERY), split or "test"
    if gallery is None:
        raise SystemExit("--gallery is needed with --model: a folder of images or a jsonl manifest.")
    try:
        photos = read_gallery(
            gallery,
            split=split,
            limit=args.max_gallery,
            use_boxes=use_boxes,
            allow_outside_root=args.allow_outside_root,
        )
    except ManifestError as error:
        # The manifest reader names its Python argument; here the switch is a flag.
        raise ManifestError(str(error).replace("allow_outside_root=True", "--allow_outside_root")) from None
    retriever = load_retriever(model, device=app_device(args.device))
    where = f"--region_cache {args.region_cache}"
    cache = None if args.region_cache is None else open_gallery_cache(args.region_cache, retriever, model, where)
    print(f"Indexing {len(photos)} gallery photos from {gallery} ...", flush=True)
    try:
        return RetrievalDemo(
            retriever, photos, shortlist_k=args.shortlist_k, batch_size=args.batch_size, region_cache=cache
        )
    except AppInputError as error:
        if cache is None:
            raise
        # The engine names the cache by its folder; here it is a flag.
        raise AppInputError(str(error).replace(f"the region cache {cache.path}", where, 1)) from None


def check_arguments(args: AppArguments) -> None:
    """Raises `ValueError` naming the flag when a setting cannot work: every check of the command line, made
    before a model or gallery is loaded. The values come before the paths, so a bad value is named even where the
    model or gallery is missing too."""
    from ..models.imagebert.configuration_imagebert import check_field
    from .engine import MAX_RESULTS

    # The pipeline reads None as "all" for top_k and shortlist_k; these flags are always set, and below 1 they
    # would leave nothing to rank or show.
    for name in ("shortlist_k", "batch_size"):
        check_field(f"--{name}", getattr(args, name), "int", 1, None)
    check_field("--top_k", args.top_k, "int", 1, MAX_RESULTS)  # the page's slider goes no further
    if args.max_gallery is not None:  # unset: the whole gallery
        check_field("--max_gallery", args.max_gallery, "int", 1, None)
    check_field("--port", args.port, "int", 1, 65535)
    if args.gallery_regions not in GALLERY_REGIONS:
        raise ValueError(f"--gallery_regions must be one of {list(GALLERY_REGIONS)}, got {args.gallery_regions!r}")
    app_device(args.device)
    if args.model is not None:
        check_folder_or_hub_id(args.model, "--model", "a saved model folder")
    else:  # the demo model is read from, or built into, --demo_dir
        check_output_dir(args.demo_dir, "--demo_dir")
    if args.model is not None and args.gallery is None:
        raise ValueError("--gallery is needed with --model: a folder of images or a jsonl manifest")
    if args.gallery is not None and not Path(args.gallery).exists():
        raise ValueError(
            f"--gallery {args.gallery}: no such file or folder (expected a folder of images or a .jsonl manifest)"
        )
    if args.region_cache is not None and not (Path(args.region_cache) / "cache_info.json").is_file():
        raise ValueError(
            f"--region_cache {args.region_cache}: not a region cache (expected a folder written by "
            "imagebert-extract-regions, holding cache_info.json)"
        )


def check_address(host: str, port: int) -> None:
    """Raises `ValueError` naming `--host` or `--port` when the app could not serve on `host:port` (an address that
    does not resolve or is not this machine's, a port in use): found by binding it for a moment, before the gallery
    is indexed, rather than by the server once it has been. A port taken in between still fails at launch."""
    import errno
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host {host}: not an address this machine can serve on ({error})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ValueError(
                    f"--port {port}: cannot serve on {host}:{port} ({error.strerror}); choose another port"
                ) from None
            raise ValueError(f"--host {host}: cannot serve on it ({error.strerror})") from None


def parse_args(argv: list[str] | None = None) -> AppArguments:
    """The command line (`sys.argv` when `argv` is None) as checked `AppArguments`: an unknown flag ends it as
    argparse ends it (exit status 2), a bad setting with one line naming it and exit status 1."""
    (args,) = parse_flags(HfArgumentParser(AppArguments), argv)
    with exit_on_error("imagebert-app", errors=(OSError, TypeError, ValueError)):
        check_arguments(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Serves the app until stopped; returns 0. A bad argument (a value out of range, a device that is not here, a
    missing model folder or gallery, a gallery without images, a host or port it cannot serve on) ends it with one line naming it and exit status 1,
    an unknown flag with argparse's usage and exit status 2; all but the gallery's contents are checked before any
    model is loaded."""
    args = parse_args(argv)
    with exit_on_error("imagebert-app"):
        check_address(args.host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with exit_on_error(
        "imagebert-app", missing_extra="the app needs its extra: pip install -e '.[app]' in the project's checkout"
    ):
        from .ui import build_app, launch_app

        try:
            demo = load_demo(args)
        except subprocess.CalledProcessError as error:
            raise SystemExit(
                f"imagebert-app: error: building the demo model failed (exit status {error.returncode}, output "
                "above); or pass --model and --gallery"
            ) from None
        launch_app(build_app(demo, top_k=args.top_k), server_name=args.host, server_port=args.port)
    return 0


__all__ = [
    "AppArguments",
    "DEMO_GALLERY",
    "DEMO_MODEL",
    "app_device",
    "check_address",
    "check_arguments",
    "ensure_demo_model",
    "find_demo_script",
    "load_demo",
    "main",
    "parse_args",
]


if __name__ == "__main__":
    raise SystemExit(main())
