"""Publishing a folder written under a temporary name: a reader sees the earlier folder or the complete new one.

The files are synced, the folder is renamed into place (atomic on one filesystem) and its parent synced, so that the
rename survives a crash. An earlier folder is renamed aside (`.NAME.old-*`) before the new one goes in and deleted
only after, so a kill between the two renames leaves it whole; the next publish (or `restore_set_aside`) puts it
back. It lives in this folder, which travels as remote code with a published model, so that the retrieval index
saved by a published pipeline and the package's own writers (`imagebert_hf.formats.files`) share it; it imports
the standard library only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Syncs a folder's entries (a rename inside it) to disk; nothing where a folder cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Syncs every file under `folder` to disk, so that a rename publishing the folder never reaches the disk
    before the files it publishes."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def ordinary_file_mode() -> int:
    """The permission bits a new file gets from `open` here: 0o666 less the process's umask (read without setting
    it where Linux shows it, as setting it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def give_ordinary_mode(path: str | os.PathLike) -> None:
    """Gives a file written by safetensors the mode `open` would have given it: safetensors creates its files 0o600
    whatever the umask (safetensors issue 782), so a model saved for a team would be readable by its writer alone."""
    os.chmod(path, ordinary_file_mode())


def set_aside_folders(final: str | os.PathLike) -> list[Path]:
    """The earlier folders `publish_folder` renamed aside as `.NAME.old-*` next to `final`, oldest first."""
    final = Path(final).absolute()
    return sorted(
        (path for path in final.parent.glob(f".{final.name}.old-*") if path.is_dir()), key=lambda p: p.stat().st_mtime
    )


def restore_set_aside(final: str | os.PathLike) -> bool:
    """Puts back the earlier folder that `publish_folder` set aside as `.NAME.old-*` when a kill came between its two
    renames (`final` is then missing); the newest one wins and the others are removed. Returns whether it restored."""
    final = Path(final)
    set_aside = set_aside_folders(final)
    if not set_aside or os.path.lexists(final):
        return False
    os.replace(set_aside[-1], final)
    fsync_folder(final.parent)
    for stale in set_aside[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    return True


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = True) -> None:
    """Atomically puts the fully written folder `tmp` at `final`: its files are synced (its safetensors files given
    the mode of the others, `give_ordinary_mode`), then it is renamed.

    Args:
        tmp: The folder, written under a temporary name next to `final`.
        final: Where it goes.
        replace: Replace an existing `final` (renamed aside first, deleted once the new one is in). When False, an
            existing `final` raises `FileExistsError` (an `OSError`, as when another process publishes the same
            folder at the same moment) and `tmp` is kept.
    """
    tmp, final = Path(tmp), Path(final)
    for weights in tmp.rglob("*.safetensors"):
        give_ordinary_mode(weights)
    fsync_tree(tmp)
    restore_set_aside(final)
    if not os.path.lexists(final):
        os.replace(tmp, final)
        fsync_folder(final.parent)
        return
    if not replace:
        raise FileExistsError(f"{final} exists")
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "fsync_folder",
    "fsync_tree",
    "give_ordinary_mode",
    "ordinary_file_mode",
    "publish_folder",
    "restore_set_aside",
    "set_aside_folders",
]
