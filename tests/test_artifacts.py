"""write_atomic: normal file modes, nothing half-written, and temporaries of killed writers cleaned up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixq.artifacts import _host, remove_stale_temporaries, temporary_name, write_atomic

ROOT = Path(__file__).resolve().parents[1]


def umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_mode_follows_the_umask_like_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = write_atomic(tmp_path / "sub" / "a.json", "{}")
        with open(tmp_path / "ref.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert out.read_text() == "{}"
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask == (tmp_path / "ref.txt").stat().st_mode & 0o777
    assert [p.name for p in out.parent.iterdir()] == ["a.json"]


def test_default_umask_gives_a_team_readable_file(tmp_path):
    out = write_atomic(tmp_path / "m.onnx", b"\x00\x01")
    assert out.stat().st_mode & 0o777 == umask_mode()
    if umask_mode() == 0o644:
        assert out.stat().st_mode & 0o044 == 0o044


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    write_atomic(target, "old")
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # not str/bytes: fails inside the write
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_temporary_names_carry_host_and_pid(tmp_path):
    t = temporary_name(tmp_path / "model.onnx")
    assert t.parent == tmp_path and t.name.startswith(".model.onnx.") and t.name.endswith(".tmp")
    assert f".{_host()}.{os.getpid()}." in t.name


KILLED_WRITER = """
import os, sys, time
import mixq.artifacts as a
real_replace = os.replace
def hang(src, dst):  # the data is in the temporary; die before the rename
    print(src, flush=True)
    time.sleep(600)
os.replace = hang
a.write_atomic(sys.argv[1], b"x" * 1_000_000)
"""


def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "big.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.is_file() and tmp.stat().st_size == 1_000_000 and f".{proc.pid}." in tmp.name
        # while the writer lives, another write into the folder leaves its temporary alone
        write_atomic(tmp_path / "other.json", "{}")
        assert tmp.is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert tmp.is_file() and not target.exists()  # killed mid-write: the temporary is left behind
    write_atomic(tmp_path / "next.json", "{}")
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.json", "other.json"]


def test_only_dead_writers_of_this_host_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    names = {
        "dead": f".a.json.{host}.{dead.pid}.0123abcd.tmp",
        "alive": f".a.json.{host}.{os.getpid()}.0123abcd.tmp",
        "other_host": f".a.json.{host}x.{dead.pid}.0123abcd.tmp",
        "not_ours": f".a.json.{dead.pid}.tmp",
        "artifact": "a.json",
    }
    for n in names.values():
        (tmp_path / n).write_text("x")
    time.sleep(0.01)
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
