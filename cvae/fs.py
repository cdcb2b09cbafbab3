"""Paths that may be local or URIs that pyarrow's filesystems handle (file://, s3://, gs://).

Jobs read and write through three helpers:
- `resolve(path)` gives the (pyarrow FileSystem, path) pair for any path or URI;
- `staged(path)` yields a local copy of a file or directory (HDF5 shards, a checkpoint)
  for libraries that need a local file, and removes the copy afterwards;
- `local_output(path)` yields a local directory to write into and, for a URI, uploads it
  when the block finishes without error, completion markers (MARKERS) last.
`parquet_files(filesystem, folder)` lists a folder's Parquet files the way Spark, Ray and
pyarrow.dataset do (a path component starting with '.' or '_' is skipped: staging folders,
markers). `check_writable(path)` lets a job refuse an output location it cannot write before it
starts any work.
A plain local path is used in place: nothing is copied.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from cvae.errors import CvaeError, OutputLocationError


def is_uri(path: str | Path) -> bool:
    """True for 'scheme://...' (file:// included); False for a plain local path."""
    return "://" in str(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """A path or URI to (filesystem, path within it). Plain paths become absolute local paths."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(path))
    except Exception as exc:  # unknown scheme, missing credentials, bad bucket name
        raise CvaeError(f"cannot open {path!r} as a pyarrow filesystem URI: {exc}") from None


def parquet_files(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Sorted '.parquet' files under `folder` (recursive), none under a hidden or '_' name."""
    prefix = folder.rstrip("/") + "/"
    found = filesystem.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                  and not any(part.startswith((".", "_")) for part in f.path[len(prefix):].split("/")))


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a path or URI with '/' (URIs keep their scheme)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str | Path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def check_writable(path: str | Path) -> None:
    """Check that the output folder `path` (path or URI) can be created and written.

    Through the path's pyarrow filesystem: creates the folder (and missing parents), writes
    and deletes a probe file in it, then removes the folders it created, so a job that fails
    later leaves nothing behind. Raises OutputLocationError, one line naming the path.
    """
    try:
        filesystem, root = resolve(path)
        root = root.rstrip("/") or "/"
        created = None  # the topmost folder this check creates
        probe_dir = root
        while filesystem.get_file_info(probe_dir).type == pafs.FileType.NotFound:
            created = probe_dir
            parent = probe_dir.rsplit("/", 1)[0]
            if not parent or parent == probe_dir:
                break
            probe_dir = parent
        try:
            filesystem.create_dir(root, recursive=True)
            probe = f"{root.rstrip('/')}/.cvae-write-check-{uuid.uuid4().hex}"
            with filesystem.open_output_stream(probe) as fh:
                fh.write(b"")
            filesystem.delete_file(probe)
        finally:
            if created is not None:
                with contextlib.suppress(OSError):
                    filesystem.delete_dir(created)
    except (ValueError, OSError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputLocationError(f"output {path}: cannot be created or written: {reason}") from None


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    with fs.open_input_stream(p) as fh:
        return fh.read()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a local file under a temporary name, then rename: readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def copy_to_local(path: str | Path, local: str | Path) -> Path:
    """Copy a file or a directory tree at `path` (path or URI) to the local path `local`."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    local = Path(local)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if info.type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
    else:
        local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, str(local.resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def upload(local: str | Path, dest: str | Path) -> str:
    """Copy a local file or directory tree to `dest` (path or URI); returns `dest`."""
    local = Path(local)
    if not local.exists():
        raise FileNotFoundError(f"nothing to upload: {local} does not exist")
    fs, p = resolve(dest)
    if local.is_dir():
        fs.create_dir(p, recursive=True)
    elif "/" in p:
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local.resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return str(dest)


STAGE_PREFIX = "cvae-stage-"  # + the staging process's pid + "-" + a random part


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_dead_stages(root: str | Path | None = None) -> list[Path]:
    """Remove the staged copies left in `root` (the temp folder) by processes that died
    without their `finally` (a killed Ray worker); returns what was removed. A copy is
    known by its owner's pid in its name; a live owner's, or another user's, is left alone."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STAGE_PREFIX}*"):
        pid = folder.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


@contextlib.contextmanager
def staged(path: str | Path, only: list[str] | None = None) -> Iterator[Path]:
    """Yield a local path holding the file or directory at `path`.

    A plain local path is yielded as is. A URI (file:// included, so tests exercise the
    remote path) is copied into a fresh temporary directory, removed on exit (and, if this
    process is killed first, by the next `staged` on the machine: `sweep_dead_stages`). `only`
    names the files of a directory to copy (for example a manifest and some shards).
    """
    if not is_uri(path):
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        yield local
        return
    sweep_dead_stages()
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-"))
    try:
        name = str(path).rstrip("/").rsplit("/", 1)[-1] or "staged"
        if only is None:
            yield copy_to_local(path, tmp / name)
        else:
            for rel in only:
                copy_to_local(join(path, rel), tmp / name / rel)
            yield tmp / name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Files whose presence tells readers that a folder is complete (a dataset's manifest, the
# query engine's and the evaluation's markers, a query set's summary).
MARKERS = ("manifest.json", "_SUCCESS.json", "_summary.json", "report.json")


def _upload_markers_last(local: Path, dest: str | Path) -> None:
    """Upload the folder `local` (ours to change) to `dest`: first delete the markers already
    at `dest`, then upload everything else, then the markers. On object storage an upload is
    many PUTs; a job killed in the middle, or a reader looking meanwhile, never finds a marker
    beside files it does not vouch for."""
    markers = [name for name in MARKERS if (local / name).is_file()]
    if not markers:
        upload(local, dest)
        return
    held = Path(tempfile.mkdtemp(prefix="cvae-markers-"))
    try:
        for name in markers:
            os.replace(local / name, held / name)
            filesystem, p = resolve(join(dest, name))
            if filesystem.get_file_info(p).type == pafs.FileType.File:
                filesystem.delete_file(p)
        upload(local, dest)
        for name in markers:
            upload(held / name, join(dest, name))
    finally:
        shutil.rmtree(held, ignore_errors=True)


@contextlib.contextmanager
def local_output(path: str | Path) -> Iterator[Path]:
    """Yield a local directory to write outputs into; a URI is uploaded on success.

    A plain local path is created and yielded as is. For a URI the outputs are written to a
    temporary directory and copied to the URI only if the block finishes without error, so
    a failed job leaves nothing half-written behind at the destination; completion markers
    (MARKERS) go last, after any older marker there was deleted.
    """
    if not is_uri(path):
        local = Path(path)
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    resolve(path)  # fail early on a bad URI, before any work is done
    tmp = Path(tempfile.mkdtemp(prefix="cvae-out-"))
    try:
        yield tmp
        _upload_markers_last(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
