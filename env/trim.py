"""A built environment made lean and reproducible, and its size by package.

Lean: what serving never reads goes (test suites, C headers and static libraries, console scripts, pip,
caches). Kept on purpose: the headers `torch.compile` builds against (Python's, torch's, triton's).
Reproducible: the same inputs give the same bytes, so an unchanged model is never uploaded twice:
bytecode is compiled once, without timestamps or build paths (unchecked-hash .pyc, which imports never
re-validate), and install records that name the build machine (`direct_url.json`) are dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

NEEDED_HEADERS = ("include/python3", "site-packages/torch/include", "site-packages/triton/")
KEEP_IN_BIN = ("activate", "conda-unpack", "deactivate")


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _remove(path: Path) -> int:
    size = _size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    return size


def trim(prefix: Path) -> Dict[str, int]:
    """Remove what serving never uses; returns the bytes removed by kind."""
    removed: Dict[str, int] = defaultdict(int)
    for path in sorted(prefix.rglob("*"), key=lambda p: len(p.parts)):
        if not os.path.lexists(path):
            continue  # inside something removed already
        relative = path.relative_to(prefix).as_posix()
        if path.is_dir() and not path.is_symlink():
            if path.name == "__pycache__":
                removed["bytecode (compiled again below)"] += _remove(path)
            elif path.name in ("tests", "test") and "site-packages/" in relative:
                removed["test suites"] += _remove(path)
            elif path.name == "include" and not any(k in relative for k in NEEDED_HEADERS):
                removed["C headers"] += _remove(path)
            elif path.parent.name == "site-packages" and path.name.split("-")[0] in ("pip", "pip.libs"):
                removed["pip"] += _remove(path)
        elif path.suffix == ".a":
            removed["static libraries"] += _remove(path)
        elif (
            path.parent == prefix / "bin"
            and not path.name.startswith("python")
            and path.name not in KEEP_IN_BIN
        ):
            removed["console scripts"] += _remove(path)
        elif path.name == "direct_url.json" and path.parent.name.endswith(".dist-info"):
            removed["build-machine records"] += _remove(path)
    _prune_records(prefix)
    return dict(removed)


def _prune_records(prefix: Path) -> None:
    """Install records list only files that are there: the removed ones (console scripts, whose
    hashes cover shebangs naming the build path) would make the records differ from build to build."""
    for record in prefix.glob("lib/python3*/site-packages/*.dist-info/RECORD"):
        site = record.parent.parent
        lines = record.read_text().splitlines(keepends=True)
        kept = [line for line in lines if os.path.lexists(site / line.rsplit(",", 2)[0])]
        if len(kept) != len(lines):
            record.write_text("".join(kept))


def compile_bytecode(prefix: Path, python: str, env: dict) -> None:
    """Bytecode for every module, reproducible: no timestamps, no build path, never re-validated."""
    subprocess.run(
        [
            python,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(prefix),
            "-p",
            "/",
            str(prefix / "lib"),
        ],
        env=env,
        check=False,  # a few files in some packages are templates that do not compile; they are skipped
        stdout=subprocess.DEVNULL,
    )


def sizes(prefix: Path) -> List[Tuple[str, int]]:
    """Bytes by installed distribution (from their RECORDs), the standard library and the rest."""
    owner: Dict[str, str] = {}
    for record in prefix.glob("lib/python3*/site-packages/*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0]
        site = record.parent.parent
        for line in record.read_text().splitlines():
            path = line.rsplit(",", 2)[0]
            owner[os.path.normpath(site / path)] = name
    totals: Dict[str, int] = defaultdict(int)
    for path in prefix.rglob("*"):
        if not (path.is_file() or path.is_symlink()) or path.is_dir():
            continue
        relative = path.relative_to(prefix).as_posix()
        name = owner.get(os.path.normpath(path))
        if name is None and "/__pycache__/" in relative and "site-packages/" in relative:
            source = path.parent.parent / (path.name.split(".")[0] + ".py")
            name = owner.get(os.path.normpath(source))
        if name is None:
            name = "python (interpreter, standard library)" if "site-packages/" not in relative else "other"
        totals[name] += path.lstat().st_size
    return sorted(totals.items(), key=lambda item: -item[1])


def report(prefix: Path, top: int = 12) -> str:
    rows = sizes(prefix)
    total = sum(size for _, size in rows)
    lines = [f"environment {prefix}: {total / 1e6:,.0f} MB"]
    for name, size in rows[:top]:
        lines.append(f"  {size / 1e6:9,.1f} MB  {name}")
    rest = rows[top:]
    if rest:
        lines.append(f"  {sum(s for _, s in rest) / 1e6:9,.1f} MB  {len(rest)} more packages")
    return "\n".join(lines)
