"""Atomic writes (issue 20, items 2-3): one temporary-name scheme that one cleanup recognises, whatever wrote the
file; a write that fails on a full disk names the file, the errno and the free space, and leaves the old file."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from timelit.merging.safetensors_io import save_weights
from timelit.merging.store import ExpertStore
from timelit.training.callbacks.checkpoint import AtomicCheckpointIO
from timelit.utilities import atomic
from timelit.utilities.atomic import Temporary, atomic_file, remove_temporaries, temporary_path, write_text
from timelit.utilities.disk_space import WriteError, format_bytes

HOST = socket.gethostname().split(".")[0]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_every_writer_names_its_temporary_file_so_that_the_cleanup_recognises_it(tmp_path):
    seen = []
    real_replace = os.replace

    def spy(source, target):  # the temporary name of every atomic write, as it is renamed into place
        seen.append(Path(source))
        real_replace(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic.os, "replace", spy)
        write_text(tmp_path / "results.json", "{}")
        save_weights(tmp_path / "ema_0001.safetensors", {"w": torch.ones(3)})
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    parsed = [Temporary.parse(path) for path in seen]
    assert [(t.target, t.host, t.pid) for t in parsed] == [
        (name, HOST, os.getpid()) for name in ("results.json", "ema_0001.safetensors", "last.ckpt")
    ]
    assert Temporary.parse(temporary_path(tmp_path / "a.b.c")).target == "a.b.c"
    for stranger in ("results.json", ".hidden", "x.tmp", ".x.host.notapid.tmp", ".x.tmp"):
        assert Temporary.parse(tmp_path / stranger) is None


KILLED_WRITER = """
import sys, time
from pathlib import Path
from timelit.utilities.atomic import atomic_file
with atomic_file(sys.argv[1]) as file:
    file.write(b"x" * 1_000_000)
    file.flush()
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def test_a_write_killed_midway_leaves_a_temporary_file_that_the_cleanup_removes_and_counts(tmp_path):
    target, ready = tmp_path / "experts" / "expert_0001.safetensors", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftover = target.parent / f".expert_0001.safetensors.{HOST}.{writer.pid}.tmp"
    assert hidden(target.parent) == [leftover.name] and not target.exists()
    assert Temporary.parse(leftover).writer_is_gone()
    (target.parent / "expert_0000.safetensors").write_bytes(b"finished")
    assert remove_temporaries([target.parent, tmp_path]) == (1, 1_000_000)
    assert hidden(target.parent) == [] and (target.parent / "expert_0000.safetensors").exists()


def test_the_cleanup_during_a_run_spares_writers_that_may_still_be_running(tmp_path):
    alive = tmp_path / f".a.{HOST}.1.tmp"  # pid 1 (init) exists
    elsewhere = tmp_path / f".b.{HOST}x.{2**22 + 1}.tmp"  # another host: its pid means nothing here
    gone = tmp_path / f".c.{HOST}.{2**22 + 1}.tmp"  # above the usual pid_max: no such process
    for path in (alive, elsewhere, gone):
        path.write_bytes(b"12345")
    assert remove_temporaries([tmp_path], only_gone_writers=True) == (1, 5)
    assert hidden(tmp_path) == sorted([alive.name, elsewhere.name])
    assert remove_temporaries([tmp_path]) == (2, 10)  # at a run's start, with its folder locked: all of them


def test_a_failed_write_names_the_file_the_errno_and_the_free_space_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)  # as NFS reports a full disk: at fsync
    with pytest.raises(WriteError) as caught:
        write_text(path, "new")
    message = str(caught.value)
    assert message.startswith(f"could not write {path}: ENOSPC (No space left on device); ")
    assert message.endswith(" free there") and "\n" not in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert path.read_text() == "old" and hidden(tmp_path) == []


def test_an_error_reading_a_source_inside_an_atomic_write_keeps_its_own_name(tmp_path):
    with pytest.raises(FileNotFoundError) as caught, atomic_file(tmp_path / "copy"), open(tmp_path / "nope", "rb"):
        pass
    assert not isinstance(caught.value, WriteError) and caught.value.filename == str(tmp_path / "nope")
    assert hidden(tmp_path) == []


def test_format_bytes():
    assert [format_bytes(n) for n in (12, 640_000, 1_500_000_000)] == ["12 B", "640.0 kB", "1.5 GB"]


# ---------------------------------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (needs root, as in CI's container); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _expert(folder: Path) -> None:
    ExpertStore(folder).add(1, {"w": torch.ones(2**19)})


def _merged(folder: Path) -> None:
    save_weights(folder / "ema_0001.safetensors", {"w": torch.ones(2**19)})


def _checkpoint(folder: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(2**19)}, folder / "last.ckpt")


def _final_model(folder: Path) -> None:
    source = folder.parent / "ema_0001.safetensors"
    source.write_bytes(b"\0" * 2_000_000)
    with atomic_file(folder / "final_model.safetensors") as file, open(source, "rb") as weights:
        file.write(weights.read())


def _results(folder: Path) -> None:
    write_text(folder / "results.json", "[" + "0," * 1_000_000 + "0]")


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (_expert, "expert_0001.safetensors"),
        (_merged, "ema_0001.safetensors"),
        (_checkpoint, "last.ckpt"),
        (_final_model, "final_model.safetensors"),
        (_results, "results.json"),
    ],
)
def test_every_kind_of_write_into_a_full_disk_says_so_and_leaves_nothing(small_disk, write, name):
    (small_disk / name).write_bytes(b"the previous one")
    with pytest.raises(WriteError) as caught:
        write(small_disk)
    message = str(caught.value)
    assert message.startswith(f"could not write {small_disk / name}: ENOSPC (No space left on device); ")
    assert "free there" in message and "\n" not in message
    assert (small_disk / name).read_bytes() == b"the previous one"
    assert hidden(small_disk) == []
