"""The atomic writers of `formats/files.py`: complete files or none, no temporary file left, folders published whole."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from imagebert_hf.formats.files import (
    RUN_LOCK_FILE,
    FolderInUseError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    exclusive_folder,
    fsync_tree,
    publish_folder,
)


def test_writers_write_and_replace(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second é")
    assert target.read_text(encoding="utf-8") == "second é"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]}, indent=2)
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2]}, indent=2)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_publish_folder(tmp_path):
    tmp, final = tmp_path / ".tmp-out", tmp_path / "out"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "f.txt").write_text("new")
    fsync_tree(tmp)
    final.mkdir()
    (final / "stale.txt").write_text("stale")
    publish_folder(tmp, final)
    assert not tmp.exists()
    assert (final / "sub" / "f.txt").read_text() == "new" and not (final / "stale.txt").exists()

    tmp.mkdir()
    (tmp / "g.txt").write_text("other")
    with pytest.raises(FileExistsError):
        publish_folder(tmp, final, replace=False)
    assert (tmp / "g.txt").is_file() and (final / "sub" / "f.txt").is_file()


def test_a_kill_between_the_two_renames_is_undone_by_the_next_publish(tmp_path):
    from imagebert_hf.formats.files import restore_set_aside

    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("earlier")
    # What a kill between `publish_folder`'s two renames leaves: the earlier folder set aside, nothing at `final`.
    os.replace(final, tmp_path / ".out.old-123-abcd")
    assert restore_set_aside(final) and (final / "a.txt").read_text() == "earlier"
    assert not list(tmp_path.glob(".out.old-*")) and not restore_set_aside(final)
    os.replace(final, tmp_path / ".out.old-124-abcd")
    new = tmp_path / ".out.tmp"
    new.mkdir()
    (new / "a.txt").write_text("new")
    publish_folder(new, final)
    assert (final / "a.txt").read_text() == "new" and not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------------------------ the run lock


def test_a_folder_held_by_one_run_is_refused_to_another_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with exclusive_folder(folder):
        assert (folder / RUN_LOCK_FILE).is_file()
        with pytest.raises(FolderInUseError) as caught, exclusive_folder(folder, flag="--output_dir"):
            pass
    assert str(caught.value) == (
        f"--output_dir {folder} is in use by another run (process {os.getpid()} on {os.uname().nodename}); wait for "
        "it to end or choose another --output_dir."
    )
    with exclusive_folder(folder):  # released when the block ended
        pass


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = rf"in use by another run \(process {holder.pid} on "
        with pytest.raises(FolderInUseError, match=refused), exclusive_folder(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_folder(tmp_path):
        pass


HOLD_AND_WAIT = """
import sys, time
from imagebert_hf.formats.files import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_run_is_free_at_once_though_its_forked_workers_live_on(tmp_path):
    """A DataLoader worker is a forked copy of the run, descriptors included; it must not keep the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WITH_A_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(holder.stdout.readline())
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child is alive
        with exclusive_folder(tmp_path):
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(child, signal.SIGKILL)


# The child prints its pid itself: by then the fork hooks, which close the inherited lock, have run in it.
HOLD_WITH_A_CHILD = """
import os, sys, time
from imagebert_hf.formats.files import exclusive_folder
with exclusive_folder(sys.argv[1]):
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(600)
"""


def test_expand_home_expands_strings_and_lists_only(monkeypatch, tmp_path):
    from imagebert_hf.formats.files import expand_home

    monkeypatch.setenv("HOME", str(tmp_path))
    expanded = expand_home(
        {"output_dir": "~/run", "merge": ["~/a", "b", 3], "hub": "org/model", "unset": None, "steps": 5}
    )
    assert expanded == {
        "output_dir": str(tmp_path / "run"),
        "merge": [str(tmp_path / "a"), "b", 3],
        "hub": "org/model",
        "unset": None,
        "steps": 5,
    }
