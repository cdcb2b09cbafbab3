"""Paths and URIs through pyarrow's filesystems, tested with file:// URIs."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cvae import fs


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resolve_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local, path = fs.resolve("rel/dir")
    assert isinstance(local, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "dir")
    uri_fs, uri_path = fs.resolve(f"file://{tmp_path}/x")
    assert isinstance(uri_fs, pafs.LocalFileSystem) and uri_path == f"{tmp_path}/x"
    with pytest.raises(ValueError, match=r"cannot open 'nosuch://bucket/x' as a pyarrow filesystem URI"):
        fs.resolve("nosuch://bucket/x")
    assert fs.is_uri("s3://b/k") and fs.is_uri("file:///x") and not fs.is_uri("/x") and not fs.is_uri("x")
    assert fs.join("s3://bucket/runs/", "a", "/b.parquet") == "s3://bucket/runs/a/b.parquet"
    assert fs.join("/data", "a", "b") == "/data/a/b"


def test_staged_uri_directory_is_a_copy_removed_afterwards(tree):
    with fs.staged(f"file://{tree}") as local:
        assert local != tree and local.name == "src"
        assert _files(local) == _files(tree)
        (local / "a.txt").write_text("changed")  # the copy is private
    assert not local.exists() and (tree / "a.txt").read_text() == "alpha"


def test_staged_subset_and_single_file(tree):
    with fs.staged(f"file://{tree}", only=["sub/b.bin"]) as local:
        assert _files(local) == {"sub/b.bin": (tree / "sub" / "b.bin").read_bytes()}
    with fs.staged(f"file://{tree}/a.txt") as local:
        assert local.is_file() and local.read_text() == "alpha"
    assert not local.exists()


# A process that dies inside `staged` (SIGKILL: no finally), as a killed Ray worker does.
KILLED_WHILE_STAGED = """
import os, signal, sys
from cvae import fs
with fs.staged(sys.argv[1]) as local:
    print(local, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_s_staged_copy_is_removed_by_the_next_staging(tree, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    child = subprocess.run([sys.executable, "-c", KILLED_WHILE_STAGED, f"file://{tree}"], capture_output=True,
                           text=True, env={**os.environ, "TMPDIR": str(temp)})
    assert child.returncode == -9
    left = Path(child.stdout.strip())
    assert left.exists() and left.parent.parent == temp  # the leak
    mine = temp / f"{fs.STAGE_PREFIX}{os.getpid()}-live"  # a live process's copy: kept
    mine.mkdir()
    with fs.staged(f"file://{tree}") as local:
        assert _files(local) == _files(tree)
        assert not left.parent.exists()
        assert mine.exists()
    assert sorted(p.name for p in temp.iterdir()) == [mine.name]


def test_staged_local_path_is_used_in_place(tree):
    with fs.staged(tree) as local:
        assert local == tree
    assert tree.exists()
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        with fs.staged(tree / "missing"):
            pass
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        with fs.staged(f"file://{tree}/missing"):
            pass


def test_local_output_uploads_on_success_only(tmp_path, tree):
    dest = tmp_path / "out" / "run"
    with fs.local_output(f"file://{dest}") as local:
        assert local != dest
        (local / "report.json").write_text("{}")
        (local / "figures").mkdir()
        (local / "figures" / "f.png").write_bytes(b"png")
    assert _files(dest) == {"figures/f.png": b"png", "report.json": b"{}"}
    assert not local.exists()

    failed = tmp_path / "out" / "failed"
    with pytest.raises(RuntimeError):
        with fs.local_output(f"file://{failed}") as local:
            (local / "half.json").write_text("{")
            raise RuntimeError("job died")
    assert not failed.exists() and not local.exists()

    plain = tmp_path / "plain"
    with fs.local_output(plain) as local:
        assert local == plain and plain.is_dir()


def test_upload_copy_and_read(tmp_path, tree):
    fs.upload(tree, f"file://{tmp_path}/copy")
    assert _files(tmp_path / "copy") == _files(tree)
    fs.upload(tree / "a.txt", f"file://{tmp_path}/deep/er/a.txt")
    assert fs.read_bytes(f"file://{tmp_path}/deep/er/a.txt") == b"alpha"
    assert fs.exists(f"file://{tmp_path}/copy/sub") and not fs.exists(f"file://{tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="no such file"):
        fs.read_bytes(f"file://{tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="nothing to upload"):
        fs.upload(tmp_path / "nope", f"file://{tmp_path}/x")
    fs.copy_to_local(f"file://{tree}", tmp_path / "back")
    assert _files(tmp_path / "back") == _files(tree)


def test_local_output_uploads_completion_markers_last(tmp_path, monkeypatch):
    """On object storage an upload is many PUTs: an older manifest goes first, the new one last."""
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "manifest.json").write_text("old")
    events, real_upload = [], fs.upload

    def upload(local, where):
        events.append(("upload", Path(local).name, (dest / "manifest.json").exists()))
        return real_upload(local, where)

    monkeypatch.setattr(fs, "upload", upload)
    with fs.local_output(f"file://{dest}") as local:
        (local / "shard-0.h5").write_bytes(b"x")
        (local / "manifest.json").write_text("new")
    # The folder went up while no manifest was there; the new manifest alone, after it.
    assert events[0][2] is False and events[-1][:2] == ("upload", "manifest.json")
    assert _files(dest) == {"manifest.json": b"new", "shard-0.h5": b"x"}


def test_parquet_files_skip_hidden_and_underscore_names_at_any_depth(tmp_path):
    for name in ("b/q.parquet", "a/p.parquet", "top.parquet", "_staging-1/p.parquet", ".hid/p.parquet",
                 "b/_c/p.parquet", "_x.parquet", "b/.y.parquet", "notes.txt", "_SUCCESS.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    filesystem, root = fs.resolve(tmp_path)
    assert fs.parquet_files(filesystem, root) == [f"{root}/{n}" for n in ("a/p.parquet", "b/q.parquet", "top.parquet")]
    # the same through a file:// URI, and nothing (not an error) for a missing folder
    filesystem, root = fs.resolve(tmp_path.as_uri())
    assert [p.rsplit("/", 2)[-2:] for p in fs.parquet_files(filesystem, root)] == [["a", "p.parquet"],
                                                                                  ["b", "q.parquet"],
                                                                                  [tmp_path.name, "top.parquet"]]
    assert fs.parquet_files(filesystem, root + "/missing") == []
