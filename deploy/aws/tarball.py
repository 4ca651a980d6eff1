"""Reproducible .tar.gz archives: the same files give the same bytes, so unchanged models skip upload."""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Optional, Tuple

CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """A digest of a directory as an archive would hold it: paths, kinds, executable bits, contents and
    link targets (not times or owners)."""
    digest = hashlib.sha256()
    for path, name in _entries(root, "."):
        info = os.lstat(path)
        if os.path.islink(path):
            digest.update(f"L {name} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            digest.update(f"D {name}\n".encode())
        else:
            digest.update(f"F {name} {bool(info.st_mode & 0o111)} {info.st_size}\n".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    digest.update(block)
    return digest.hexdigest()


def _entries(root: Path, arcname: str) -> Iterable[Tuple[Path, str]]:
    yield root, arcname
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            yield path, f"{arcname}/{path.relative_to(root).as_posix()}"


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isdir() or info.mode & 0o111:
        info.mode = 0o755
    elif not info.issym():
        info.mode = 0o644
    return info


class Progress:
    """Prints bytes done every few seconds (packing real environments takes minutes)."""

    def __init__(self, label: str, total: int, every: float = 5.0):
        self.label, self.total, self.every = label, total, every
        self.done, self.last, self.start = 0, time.monotonic(), time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(
                f"  {self.label}: {self.done / 1e6:,.0f} / {self.total / 1e6:,.0f} MB",
                file=sys.stderr,
                flush=True,
            )


def tree_size(paths: Iterable[Path]) -> int:
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
        for dirpath, _, filenames in os.walk(root):
            total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
    return total


def write(
    dest: Path,
    members: Iterable[Tuple[Path, str]],
    label: str,
    compresslevel: int,
    first: Optional[str] = None,
) -> Path:
    """Write `members` (local path, name in archive; folders recursively) to dest, atomically.

    Entries are sorted (the one named `first` ahead of the rest) with fixed mtime, owner and modes, and
    the gzip header has no name or time.
    """
    members = sorted(members, key=lambda member: (member[1] != first, member[1]))
    progress = Progress(label, tree_size(p for p, _ in members))
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel
        ) as zipped, tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path, arcname in members:
                entries = (
                    _entries(path, arcname) if path.is_dir() and not path.is_symlink() else [(path, arcname)]
                )
                for item, name in entries:
                    info = _normalise(tar.gettarinfo(str(item), arcname=name))
                    if info.isfile():
                        with open(item, "rb") as f:
                            tar.addfile(info, f)
                        progress.add(info.size)
                    else:
                        tar.addfile(info)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest
