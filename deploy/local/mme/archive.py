"""Safe extraction of a model archive, as the SageMaker platform unpacks `<TargetModel>` for the container."""

from __future__ import annotations

import errno
import shutil
import tarfile
from pathlib import Path

COPY_BUFFER = 1 << 20  # tarfile's default (16 KiB) costs a Python call per 16 KiB of a multi-GB archive


class ArchiveError(Exception):
    """The archive cannot be served: not a tar.gz, unsafe, or not one model folder."""


class NoSpace(Exception):
    """The disk filled up during the extraction (the archive itself may be fine)."""


def extract(archive: Path, dest: Path) -> str:
    """Extract into dest in one pass over the archive (absolute paths, `..`, links leaving dest and device
    files are refused by the stdlib's `data` filter, member by member, before each is written).

    Returns the archive's single top-level folder, the Triton model folder.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    tops = set()

    def one_model_folder(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        name = member.name.lstrip("./")
        if name:
            tops.add(name.split("/")[0])
            if len(tops) > 1:
                raise ArchiveError(f"the archive must hold one top-level model folder, found: {sorted(tops)}")
        return tarfile.data_filter(member, path)

    try:
        # Members are read as they are extracted: listing them first would inflate a gzip twice.
        with tarfile.open(archive, "r:*", copybufsize=COPY_BUFFER) as tar:
            tar.extractall(dest, filter=one_model_folder)
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(dest.parent).free
            raise NoSpace(
                f"the disk at {dest.parent} filled up during extraction ({free / 2**20:,.0f} MiB free "
                f"once the partial extraction was removed)"
            ) from None
        raise ArchiveError(f"cannot extract {archive.name}: {type(e).__name__}: {e}") from None
    except (tarfile.TarError, EOFError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"cannot extract {archive.name}: {type(e).__name__}: {e}") from None
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if not tops:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"{archive.name} is empty")
    top = tops.pop()
    if not (dest / top / "config.pbtxt").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"the archive's folder {top}/ has no config.pbtxt")
    return top
