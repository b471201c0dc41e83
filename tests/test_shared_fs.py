"""Safe on a shared file system (#14): file modes under the umask, durable writes.

Every writer of the project goes through ``icnn_pl.atomic.atomic_path``; these tests write
one file with each writer under umask 022 and 002 and check the mode on disk, and record
which descriptors are fsync'ed (the file's data, then its directory).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from icnn_pl import atomic
from icnn_pl.atomic import atomic_path, write_text_atomic
from icnn_pl.data.matio import save_mat
from icnn_pl.nets.weights import save_safetensors
from icnn_pl.pipeline.outputs import ReconOutputs, write_table
from icnn_pl.review.gallery import save_png


def _write_everything(folder: Path) -> list[Path]:
    """One file from each writer of the project; returns their paths."""
    write_text_atomic(folder / "a.txt", "x")
    save_mat(folder / "b.mat", {"feat": np.ones((1, 3), np.float32)})
    save_png(Image.new("RGB", (4, 4)), folder / "c.png")
    save_safetensors(nn.Linear(2, 2), folder / "d.safetensors")
    write_table(folder / "e.csv", [{"a": 1}])
    write_table(folder / "f.json", [{"a": 1}])
    out = ReconOutputs(folder / "run", "sub-01", "VC")
    out.write("img", np.zeros((4, 4, 3), np.float32), np.ones(3, np.float32))
    return [folder / n for n in ("a.txt", "b.mat", "c.png", "d.safetensors", "e.csv",
                                 "f.json")] + [out.mat_path("img"), out.png_path("img")]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        paths = _write_everything(tmp_path)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what an ordinary write gets
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert set(modes.values()) == {oct(mode)}, modes
    assert not list(tmp_path.rglob("*.tmp"))


def test_umask_fallback_without_proc(monkeypatch):
    """Where /proc is missing the umask is read by setting and restoring it."""
    real_open = open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    old = os.umask(0o027)
    try:
        monkeypatch.setattr("builtins.open", no_proc)
        assert atomic.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)


def _record_fsyncs(monkeypatch) -> list[str]:
    """Replace os.fsync by one that records what each descriptor is (file or directory
    path, via /proc/self/fd) before syncing it."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_data_then_directory_are_fsynced(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "hello")
    assert len(synced) == 2, synced
    assert Path(synced[0]).name.startswith(".out.txt.") and synced[0].endswith(".tmp")
    assert synced[1] == str(target.parent)  # the directory, after the rename
    assert target.read_text() == "hello"


def test_new_parent_folders_are_fsynced(tmp_path, monkeypatch):
    """#21 item 5: each folder the write creates is made durable in its parent."""
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(target, "hello")
    assert synced[:2] == [str(tmp_path), str(tmp_path / "a")], synced
    assert synced[-1] == str(tmp_path / "a" / "b")


_UMASK_222_CHILD = r"""
import os, stat, sys
from icnn_pl.atomic import write_text_atomic
from icnn_pl.data.matio import save_mat
import numpy as np
import scipy.io, scipy.io.matlab  # imported before dropping to a user who cannot read them
os.setgid(65534); os.setuid(65534)  # root ignores permissions: write as nobody
os.umask(0o222)
folder = sys.argv[1]
write_text_atomic(os.path.join(folder, "a.txt"), "hello")
save_mat(os.path.join(folder, "b.mat"), {"x": np.ones(3)})
with open(os.path.join(folder, "plain.txt"), "w") as fh:  # what a plain write does here
    fh.write("x")
print(oct(stat.S_IMODE(os.stat(os.path.join(folder, "a.txt")).st_mode)))
"""


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="POSIX only")
def test_atomic_writes_work_under_umask_222():
    """#21 item 6: a umask without owner write (0222) still lets atomic writes succeed,
    as a plain open(path, "w") does there; the file gets 0444 like a plain one."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="icnn-umask-"))  # pytest's tmp is root-only
    folder.chmod(0o777)
    try:
        _umask_222_child(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _umask_222_child(folder: Path) -> None:
    import subprocess
    import sys

    code = _UMASK_222_CHILD if os.geteuid() == 0 else \
        _UMASK_222_CHILD.replace("os.setgid(65534); os.setuid(65534)", "pass")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0o444"
    assert (folder / "a.txt").read_text() == "hello"
    assert not list(folder.rglob("*.tmp"))
    assert (folder / "b.mat").is_file()


def test_directory_fsync_refused_is_tolerated(tmp_path, monkeypatch):
    """Some network file systems refuse fsync on a directory (EINVAL): the write stands."""
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(tmp_path / "x.txt", "ok")
    assert (tmp_path / "x.txt").read_text() == "ok"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "y.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_writers_are_swept(tmp_path):
    """#21 item 5: write probes, claim temporaries and takeover leftovers of dead writers
    on this host, and other hosts' temporaries once they are a day old, are removed when
    a job opens its outputs; a live writer's and a recent other-host file are kept."""
    import subprocess
    import sys
    import time

    from icnn_pl.atomic import _HOST

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "sub-01" / "VC"
    out.mkdir(parents=True)
    dead = [tmp_path / f".write-test.{_HOST}-{proc.pid}-k2j3h4.tmp",
            out / f".recon_image-a.claim.{_HOST}-{proc.pid}-0a1b2c3d.tmp",
            out / f".recon_image-a.claim.takeover.{_HOST}-{proc.pid}-0a1b2c3e.tmp",
            out / ".recon_image-b.mat.node9-77-abcdef.tmp"]
    kept = [out / f".recon_image-c.mat.{_HOST}-{os.getpid()}-abcdef.tmp",
            out / ".recon_image-d.mat.node9-77-abcdef.tmp"]
    for path in dead + kept:
        path.write_text("x")
    old = time.time() - 2 * 86400
    os.utime(dead[-1], (old, old))
    ReconOutputs(tmp_path, "sub-01", "VC")
    assert [p.exists() for p in dead] == [False] * len(dead)
    assert all(p.exists() for p in kept)
    assert not list(tmp_path.glob(".write-test*"))
