"""Atomic writes: a reader sees either the previous file (or folder) or the complete new one, never a part of it.

Every writer here writes under a temporary name in the target's folder, flushes it and syncs it to disk, renames it
over the target with `os.replace` (atomic on one filesystem), then syncs the folder so that the rename itself
survives a crash (where the OS lets a folder be opened). A write that fails leaves the target as it was and removes
its temporary file. `publish_folder` does the same for a whole folder written under a temporary name, and
`publish_folder_keeping_others` for a writer that owns only some files of its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from transformers.utils import logging

from ..models.imagebert.folder_publishing import fsync_folder as _fsync_folder
from ..models.imagebert.folder_publishing import fsync_tree, publish_folder, restore_set_aside


logger = logging.get_logger(__name__)

RUN_LOCK_FILE = ".run.lock"
# Descriptors of the run locks this process holds. A forked child (a DataLoader worker) closes its copies at once: a
# lock lasts as long as any copy of its descriptor, and a worker outliving a killed run would keep the folder locked.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for descriptor in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through: it appears at `path`, complete and synced, when the block ends
    without an error; on an error `path` is left as it was.

    The temporary name (`.NAME.tmp-PID-RANDOM`, in the same folder) is unique, so several processes or threads may
    write the same file at once: each rename puts one complete file in place.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Writes `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Writes `text` to `path` atomically (see `atomic_writer`)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs) -> None:
    """Writes `json.dumps(obj, **json_kwargs)` to `path` atomically (see `atomic_writer`)."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs))


def file_checksum(path: str | os.PathLike) -> dict[str, Any]:
    """`{"size", "sha256"}` of a file, read in 8 MiB blocks: what integrity records store and verification compares."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _link_tree(source: Path, target: Path) -> None:
    """Recreates `source` at `target` with hard links to its files (a copy where links are refused)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            _link_tree(entry, target / entry.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def publish_folder_keeping_others(
    tmp: str | os.PathLike, final: str | os.PathLike, owned: Callable[[str], bool] = lambda name: False
) -> None:
    """`publish_folder` for a writer that owns only some files of `final`: the entries of `final` that `tmp` lacks
    and that are not `owned` (the writer's stale files, e.g. old weight shards) are carried into `tmp` as hard links
    (no data is copied), then `tmp` replaces `final`. Other files of the folder (a run's logs, a tokenizer) stay.

    Args:
        tmp: The writer's new files, written under a temporary name next to `final`.
        final: Where they go.
        owned: Whether a top-level name in `final` belongs to the writer (dropped when the new save lacks it).
    """
    tmp, final = Path(tmp), Path(final)
    if final.is_dir():
        for entry in final.iterdir():
            if not (tmp / entry.name).exists() and not (tmp / entry.name).is_symlink() and not owned(entry.name):
                _link_tree(entry, tmp / entry.name)
    publish_folder(tmp, final)


def read_text_file(path: str | Path, expected: str) -> str:
    """The content of a UTF-8 text file the user names. A file that cannot be read (missing, a folder, no
    permission) raises the same `OSError` class, one that is not UTF-8 text a `ValueError`; both name `path` and what
    was `expected`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise type(error)(f"cannot read {path} ({error.strerror or error}); expected {expected}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file; expected {expected}.") from None


class DuplicateJSONKeyError(ValueError):
    """A JSON object gives one key twice: plain JSON readers keep the last value without a word."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} is given twice in one object")
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateJSONKeyError(key)
        result[key] = value
    return result


# A JSON string (escapes included) or a bracket: enough of the grammar to measure how deep arrays and objects nest.
_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(text: str) -> json.JSONDecodeError:
    """The `JSONDecodeError` for a text whose arrays or objects nest deeper than the reader's recursion allows,
    placed at the innermost bracket of the deepest nesting."""
    depth = deepest = position = 0
    for token in _JSON_NESTING.finditer(text):
        if token.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest, position = depth, token.start()
        elif token.group() in "]}":
            depth -= 1
    return json.JSONDecodeError(f"arrays or objects nested {deepest} deep, too deep to read", text, position)


def loads_json(text: str) -> Any:
    """`json.loads` that raises `DuplicateJSONKeyError` for an object giving one key twice (a user's file read with
    plain `json.loads` would silently keep the last value), and `json.JSONDecodeError` for arrays or objects nested
    too deep for the reader (where `json.loads` raises `RecursionError`)."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except RecursionError:
        raise _too_deep(text) from None


def read_json_file(path: str | Path, expected: str):
    """The parsed content of a JSON file, its errors as `read_text_file`'s; JSON that does not parse, or has a key
    twice in one object (which plain JSON readers resolve silently, the last one winning), raises a `ValueError`
    naming `path`, the line or the key, and what was `expected`."""
    text = read_text_file(path, expected)
    try:
        return loads_json(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); expected {expected}."
        ) from None
    except DuplicateJSONKeyError as duplicate:
        raise ValueError(
            f"{path} gives the key {duplicate.key!r} twice in one object, so which value holds is unclear; expected "
            f"{expected}."
        ) from None


def expand_home(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with a leading `~` expanded in each string, and in each string of a list; other values unchanged.

    A shell leaves `--output_dir=~/run` as typed, and YAML never expands it: a reader that did not expand it would
    write into, or look in, a folder named `~` under the working directory while the checks looked in the home
    folder. Expanded once where flags or a recipe are read, the checks and the run see the same path. A Hub id never
    starts with `~`, so fields that take either are expanded too.
    """
    return {
        name: os.path.expanduser(value)
        if isinstance(value, str)
        else [os.path.expanduser(item) if isinstance(item, str) else item for item in value]
        if isinstance(value, list)
        else value
        for name, value in values.items()
    }


def check_nothing_left_unexpanded(output_dir: str | os.PathLike, flag: str = "--resume") -> None:
    """Raises when `--resume` finds nothing in `output_dir`, under the home folder, but an earlier release wrote the
    run there as typed: into a folder named `~` under the working directory (it did not expand `~`). Resuming would
    otherwise start the run again from its first step in the home folder.

    Call it only once the run's folder is known to hold nothing to resume.
    """
    try:
        rest = Path(output_dir).absolute().relative_to(Path.home())
    except ValueError:
        return
    unexpanded = Path.cwd() / "~" / rest
    if unexpanded.is_dir() and any(unexpanded.iterdir()):
        raise ValueError(
            f"{flag}: nothing to resume in {output_dir}, but {unexpanded} holds files: an earlier version wrote "
            f"'~/{rest.as_posix()}' into a folder named '~' in the working directory. Move it to {output_dir} and "
            "resume again, or remove it to start the run afresh."
        )


def check_output_dir(path: str | os.PathLike | None, flag: str = "--output_dir") -> Path:
    """The folder a command writes into, as a `Path`; raises ValueError naming `flag` when it is empty (an empty
    string is the current folder to the OS, and a command would write, or replace, its files there), names an
    existing file, or could not be made: a file or an unwritable folder where it would be created. A missing folder
    is fine: the command creates it. Checked before the work starts, so that hours of it are not lost to a path."""
    if path is None or not str(path).strip():
        raise ValueError(f"{flag} must be a non-empty path, got {path!r}.")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file; expected a folder (created when missing).")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} cannot be written: {existing} is not a folder this user may write in.")
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """The file a command writes at its end, as a `Path`; raises ValueError naming `flag` when it is a folder or its
    folder could not be made or written (`check_output_dir`): checked before the work, so that none of it is lost to
    the path."""
    if path is None or not str(path).strip():
        raise ValueError(f"{flag} must be a non-empty path, got {path!r}.")
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{flag} {file} is a folder; expected a file path.")
    check_output_dir(file.parent, flag)
    return file


def check_folder_or_hub_id(name: str | os.PathLike, what: str, expected: str) -> None:
    """Raises `FileNotFoundError` naming `what` when `name` is neither an existing path nor a name the Hub could
    hold (`name` or `owner/name`): `from_pretrained` would report such a name as a malformed repo id rather than as
    a folder that does not exist. An existing file raises `NotADirectoryError`: `from_pretrained` would try to read
    it as a config and report a JSON error that names neither `what` nor the folder it expected. An empty name
    raises `ValueError`."""
    if not os.fspath(name).strip():  # the empty path is the current folder to the OS
        raise ValueError(f"{what} must name {expected} or a Hub id, got {os.fspath(name)!r}.")
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise NotADirectoryError(
            f"{what} {os.fspath(name)} is a file; expected {expected} (or a Hub id such as owner/name)."
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(os.fspath(name))
    except HFValidationError:
        raise FileNotFoundError(
            f"{what} {os.fspath(name)}: no such folder (expected {expected}, or a Hub id such as owner/name)."
        ) from None


class FolderInUseError(OSError):
    """Another process holds the folder's run lock (`exclusive_folder`)."""


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, flag: str = "output_dir") -> Iterator[None]:
    """Holds `folder`'s run lock while the block runs, creating the folder when needed: a second run writing into
    the same folder (a job submitted twice, a requeued job whose first copy still runs) fails at once with
    `FolderInUseError`, naming the holder, instead of interleaving checkpoints with the first.

    The lock is the kernel's (`flock`) on `RUN_LOCK_FILE` in the folder, so it ends with the process that holds it,
    however that process ends: a killed run leaves no stale lock. Across nodes it holds where the shared filesystem
    passes `flock` on (NFSv4, Lustre mounted with `flock`); a mount with node-local locks guards only against runs on
    the same node. Where the filesystem refuses locks or the platform has no `flock`, it warns and goes on unlocked.
    Take it in one process of a run (the main one): the others write where that one tells them.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        logger.warning(f"{folder}: no file locks on this platform; nothing stops a second run writing here too.")
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK_FILE
    descriptor, owner = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), os.getpid()
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "holder unknown"
            raise FolderInUseError(
                f"{flag} {folder} is in use by another run ({holder}); wait for it to end or choose another {flag}."
            ) from None
        except OSError as error:
            logger.warning(
                f"{folder}: this filesystem takes no file locks ({error.strerror}); nothing stops a second run "
                "writing here too."
            )
        else:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"process {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        _HELD_LOCKS.add(descriptor)
        yield
    finally:
        if os.getpid() == owner:  # a forked child that gets here closed its copy when it was forked
            _HELD_LOCKS.discard(descriptor)
            os.close(descriptor)  # releases the lock


__all__ = [
    "DuplicateJSONKeyError",
    "FolderInUseError",
    "RUN_LOCK_FILE",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_writer",
    "check_folder_or_hub_id",
    "check_nothing_left_unexpanded",
    "check_output_dir",
    "check_output_file",
    "exclusive_folder",
    "expand_home",
    "file_checksum",
    "fsync_tree",
    "loads_json",
    "publish_folder",
    "publish_folder_keeping_others",
    "read_json_file",
    "read_text_file",
    "restore_set_aside",
]
