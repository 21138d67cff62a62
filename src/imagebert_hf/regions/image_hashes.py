"""The content hash of every image a region cache is planned from, read once.

A cache is planned from its images' contents (one unit per distinct picture), so every image is read and hashed
before any is extracted. The processes that extract one cache share that work: each hashes its share of the images
stored in files and leaves the hashes in the cache's `plan/` folder for the others, and a rerun (a resumed or
requeued job, another process count) hashes only the images whose file changed since (another size or modification
time). Images held in memory are hashed by every process, as reading them costs no I/O.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..formats.files import atomic_writer
from ..models.imagebert.roi_image_loading import ImageLoadError, image_content_hash


logger = logging.get_logger(__name__)

PLAN_DIR = "plan"
# How long a process that has hashed its share waits for the others' shares, beyond the time its own took, before it
# hashes what is missing itself: a process that died, or plans another folder, costs time, never a hang.
MIN_PEER_WAIT_SECONDS = 60.0
_POLL_SECONDS = (0.05, 2.0)
_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class DatasetImage:
    """The image cell of one row of a dataset stored in its own Arrow files, read again when it is hashed and when
    the row's shard is extracted: planning keeps no image (held whole, in every process, a dataset of image bytes
    would take its size in memory, twice). Pickled to a worker, the dataset is its file names."""

    images: Any  # the dataset with its image column alone
    row: int

    def read(self) -> Any:
        return self.images[self.row][self.images.column_names[0]]


def image_of(image: Any) -> Any:
    """An item's image as the extractor takes it."""
    return image.read() if isinstance(image, DatasetImage) else image


def content_hash(image: Any, max_file_bytes: int) -> str | None:
    """`image_content_hash` of an item's image, or None for one that cannot be read (its unit records why)."""
    try:
        return image_content_hash(image_of(image), max_file_bytes)
    except ImageLoadError:
        return None


def _file_state(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file; (-1, -1) when it cannot be read."""
    try:
        state = os.stat(path)
    except (OSError, ValueError):
        return -1, -1
    return state.st_size, state.st_mtime_ns


def _stored_identity(image: Any, dataset_states: dict) -> tuple[str, int, int] | None:
    """`(name, size, mtime_ns)` of an image stored in a file: a path (a manifest's, a dataset's path cell) or a row of
    a dataset in its own Arrow files (their sizes and times); None for an image held in memory."""
    if isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
        image = image["path"]
    if isinstance(image, str):
        return (os.path.abspath(image), *_file_state(image))
    if isinstance(image, DatasetImage):
        # Every row of a listing shares one dataset: its files are read and stated once, not once a row.
        if id(image.images) not in dataset_states:
            files = [os.path.abspath(entry["filename"]) for entry in image.images.cache_files]
            states = [_file_state(name) for name in files]
            dataset_states[id(image.images)] = (
                "|".join(files),
                sum(size for size, _ in states),
                max(mtime for _, mtime in states),
            )
        files, size, mtime = dataset_states[id(image.images)]
        return (f"{files}#{image.row}", size, mtime)
    return None


def _part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.arrow"


def _write_part(path: Path, positions: list[int], identities: list[tuple], contents: list[str | None]) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "position": pa.array(positions, pa.int64()),
            "size": pa.array([identity[1] for identity in identities], pa.int64()),
            "mtime_ns": pa.array([identity[2] for identity in identities], pa.int64()),
            "content": pa.array(contents, pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle, pa.ipc.new_file(handle, table.schema) as writer:
        writer.write_table(table)


def _read_part(path: Path, identities: dict[int, tuple]) -> dict[int, str | None]:
    """The hashes a part file holds for the positions whose file is still the one it hashed (same size and
    modification time); {} for a part that cannot be read (damaged or of another layout: its images are hashed
    again). An image it found unreadable is tried again (the file may be readable now, or under another size
    limit)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        columns = {name: table.column(name).to_pylist() for name in ("position", "size", "mtime_ns", "content")}
    except (OSError, KeyError, ValueError, pa.ArrowException) as error:
        logger.warning("ignoring the image hashes of %s, which cannot be read (%s)", path, error)
        return {}
    found = {}
    for position, size, mtime, content in zip(*columns.values()):
        identity = identities.get(position)
        unchanged = identity is not None and identity[1:] == (size, mtime) and size >= 0
        if unchanged and isinstance(content, str) and _SHA1.fullmatch(content):
            found[position] = content
    return found


def share_content_hashes(
    items: list[dict[str, Any]],
    output_dir: Path,
    max_file_bytes: int,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> Path | None:
    """Sets `item["content"]` (the image's content hash, None when it cannot be read) on every item without one.

    Process `rank` of the `world` processes that plan the cache at `output_dir` hashes every `world`-th image stored
    in a file and publishes the hashes under `output_dir/plan/<listing>/`; it takes the others' from there, and any
    that an earlier run left for a file that has not changed since (same size and modification time). A share whose
    process has not published it once this one has waited `MIN_PEER_WAIT_SECONDS` beyond its own hashing time is
    hashed here. Every process ends with the same hashes whatever the others did: a hash is only ever that of the
    file as this process finds it. Returns the folder of hashes when this call made it, else None.
    """
    from tqdm.auto import tqdm

    dataset_states: dict = {}
    stored: dict[int, tuple] = {}
    for position, item in enumerate(items):
        if "content" not in item:
            identity = _stored_identity(item["image"], dataset_states)
            if identity is not None:
                stored[position] = identity
    listing = hashlib.sha256()
    for name, _, _ in stored.values():
        listing.update(name.encode("utf-8", "surrogateescape") + b"\n")
    folder = output_dir / PLAN_DIR / listing.hexdigest()[:24]
    known: dict[int, str | None] = {}
    made = None if folder.is_dir() else folder
    if stored and folder.is_dir():
        for part in sorted(folder.glob("part-*.arrow")):
            known.update(_read_part(part, stored))
    positions = list(stored)
    mine = positions[rank::world]
    todo = [position for position in mine if position not in known]
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="hashing images", unit="img", disable=not progress or not todo) as bar:
        for position in todo:
            known[position] = content_hash(items[position]["image"], max_file_bytes)
            bar.update()
    took = time.perf_counter() - started
    if todo:
        _write_part(folder / _part_name(rank, world), mine, [stored[p] for p in mine], [known[p] for p in mine])
    if world > 1:
        _collect_peer_parts(
            folder, stored, known, rank, world, deadline=time.perf_counter() + took + MIN_PEER_WAIT_SECONDS
        )
    missing = [position for position in positions if position not in known]
    if missing:
        logger.info("hashing %d images whose hashes no other process published", len(missing))
    for position in missing:
        known[position] = content_hash(items[position]["image"], max_file_bytes)
    for position, item in enumerate(items):
        if "content" not in item:
            item["content"] = known[position] if position in known else content_hash(item["image"], max_file_bytes)
    return made if made is not None and made.is_dir() else None


def _collect_peer_parts(
    folder: Path, stored: dict[int, tuple], known: dict[int, str | None], rank: int, world: int, deadline: float
) -> None:
    """Reads the parts of the other processes into `known` as they land, until each is read or `deadline` passes; a
    process whose share is known already (from an earlier run's parts) is not waited for."""
    positions = list(stored)
    waiting = [
        peer
        for peer in range(world)
        if peer != rank and any(position not in known for position in positions[peer::world])
    ]
    pause, told = _POLL_SECONDS[0], False
    while waiting:
        for peer in list(waiting):
            part = folder / _part_name(peer, world)
            if part.is_file():
                known.update(_read_part(part, stored))
                waiting.remove(peer)
        if not waiting or time.perf_counter() > deadline:
            break
        if not told and pause >= 1.0:
            logger.info("waiting for the image hashes of processes %s (under %s)", waiting, folder)
            told = True
        time.sleep(pause)
        pause = min(pause * 2, _POLL_SECONDS[1])


__all__ = ["DatasetImage", "MIN_PEER_WAIT_SECONDS", "PLAN_DIR", "content_hash", "image_of", "share_content_hashes"]
