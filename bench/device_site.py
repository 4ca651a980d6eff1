"""What a device venv takes from the lent machine's own Python: the packages of env/serving.lock (and
nvidia-pytriton, for `serve`) that no carried wheel put in the venv, with all they require. In practice
torch and its own. Nothing else of that machine is visible: its other packages are built for its numpy
2, and the first GPU call died at import because transformers imports scipy whenever it finds one.

    python -m bench.device_site LOCK VENV_SITE DEST   (run by the device's Python: it reads its metadata)

Each taken distribution's top-level entries are linked into DEST, which a .pth in the venv names.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path, PurePath
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from env import lock

ALSO = ("nvidia-pytriton",)  # what `device.sh serve` needs beyond the production environment


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(path: Optional[List[str]] = None) -> Dict[str, metadata.Distribution]:
    found: Dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=sys.path if path is None else path):
        found.setdefault(canonical(dist.metadata["Name"]), dist)  # the first on the path wins, as on import
    return found


def requirements(dist: metadata.Distribution, extras: Iterable[str] = ()) -> List[Tuple[str, FrozenSet]]:
    """What `dist` requires here, with the `extras` asked of it: (name, its extras asked) pairs."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a Python without packaging still has pip's copy
        from pip._vendor.packaging.requirements import Requirement
    needed = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
            needed.append((canonical(requirement.name), frozenset(requirement.extras)))
    return needed


def taken(roots: Iterable[str], here: Dict[str, metadata.Distribution], venv: Iterable[str]):
    """The distributions of `here` that `roots` need and the venv lacks, and the roots found nowhere."""
    have, take, asked, missing = set(venv), {}, {}, set()
    todo = [(canonical(root), frozenset()) for root in roots]
    while todo:
        name, extras = todo.pop()
        if name in have or (name in take and extras <= asked[name]):
            continue
        if name not in here:
            missing.add(name)
            continue
        take[name] = here[name]
        asked[name] = asked.get(name, frozenset()) | extras
        todo.extend(requirements(here[name], asked[name]))
    return take, sorted(missing)


def entries(dist: metadata.Distribution) -> List[Path]:
    """The top-level files and folders of `dist` in its site folder (its .dist-info included)."""
    if dist.files is None:
        raise SystemExit(f"{dist.metadata['Name']}: no RECORD, so which files to link is unknown")
    tops = {PurePath(f).parts[0] for f in dist.files}
    tops -= {"..", "__pycache__"}
    return sorted(Path(dist.locate_file(top)) for top in tops if not top.endswith(".pth"))


def link(lock_file: Path, venv_site: Path, dest: Path) -> None:
    roots = [*lock.read(lock_file), *ALSO]
    take, missing = taken(roots, distributions(), distributions([str(venv_site)]))
    dest.mkdir(parents=True, exist_ok=True)
    for dist in take.values():
        for entry in entries(dist):
            target = dest / entry.name
            if entry.exists() and not target.is_symlink():  # a namespace folder (nvidia/) comes once
                target.symlink_to(entry)
    versions = ", ".join(f"{dist.metadata['Name']} {dist.version}" for _, dist in sorted(take.items()))
    print(f"from {sys.executable}: {versions or 'nothing'}")
    if missing:
        print(f"found neither carried nor there: {', '.join(missing)}")


if __name__ == "__main__":
    link(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
