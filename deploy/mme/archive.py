"""Safe extraction of a model archive, as the SageMaker platform unpacks `<TargetModel>` for the container."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path


class ArchiveError(Exception):
    """The archive cannot be served: not a tar.gz, unsafe, or not one model folder."""


def extract(archive: Path, dest: Path) -> str:
    """Extract into dest (absolute paths, `..`, links leaving dest and device files are refused).

    Returns the archive's single top-level folder, the Triton model folder.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            tops = {m.name.lstrip("./").split("/")[0] for m in members if m.name.lstrip("./")}
            if len(tops) != 1:
                raise ArchiveError(
                    f"the archive must hold one top-level model folder, found: {sorted(tops)[:5]}"
                )
            tar.extractall(dest, members=members, filter="data")  # stdlib refuses unsafe entries here
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"cannot extract {archive.name}: {type(e).__name__}: {e}") from None
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    top = tops.pop()
    if not (dest / top / "config.pbtxt").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"the archive's folder {top}/ has no config.pbtxt")
    return top
