"""What every serving environment must satisfy, whichever way it was built.

- `bin/activate` works from any path (archives are extracted wherever SageMaker chooses);
- `lib/libpython3.X.so.1.0` is present (the backend stub embeds it);
- `sdmme-env.json` records the Python version (deploy compares it with the image's);
- the runtime imports from it at another path than it was built at, with the build environment out of
  reach.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MANIFEST = "sdmme-env.json"
RUNTIME_IMPORTS = (
    "numpy",
    "PIL",
    "torch",
    "transformers",
    "diffusers",
    "safetensors",
    "sdmme.serving.core",  # everything a model runs but pb_utils (sdmme.triton_model's only import)
    "boto3",
)
_PROBE = """
import importlib, json, sys
mods = {name: importlib.import_module(name) for name in sys.argv[1:]}
print(json.dumps({"prefix": sys.prefix, "version": "%d.%d" % sys.version_info[:2],
                  "numpy": mods["numpy"].__version__,
                  "files": {name: getattr(m, "__file__", "") for name, m in mods.items()}}))
"""


class ContractError(Exception):
    """The environment would not serve: the message says what is wrong and what to change."""


def read_manifest(env_dir: Path) -> Dict:
    check_layout(env_dir)
    return json.loads((env_dir / MANIFEST).read_text())


def check_layout(env_dir: Path) -> None:
    if not (env_dir / "bin" / "activate").is_file():
        raise ContractError(
            "environment has no bin/activate: Triton sources it to enter the environment; "
            "build it with `make env` (conda-pack or the relocatable builder)"
        )
    if not (env_dir / MANIFEST).is_file():
        raise ContractError(
            f"environment has no {MANIFEST} recording its Python version; rebuild it with `make env`"
        )
    if not list(env_dir.glob("lib/libpython3.*.so.1.0")):
        raise ContractError(
            "environment has no lib/libpython3.X.so.1.0, which the Python backend stub embeds; "
            "build Python with --enable-shared (conda's python has it)"
        )


def hiding(paths: List[Path], show: Optional[Tuple[Path, Path]] = None) -> List[str]:
    """A command prefix that mounts empty tmpfs over `paths` in a private mount namespace, when allowed;
    `show` = (source, target) first bind-mounts source at target, so it stays reachable there."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return []
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return []
    dirs = {p.resolve() for p in paths if p.is_dir()}
    outermost = sorted(p for p in dirs if not any(p != q and p.is_relative_to(q) for q in dirs))
    mounts = [f"mount -t tmpfs none '{p}'" for p in outermost]
    if show:
        mounts.insert(0, f"mount --bind '{show[0]}' '{show[1]}'")
    return ["unshare", "-m", "bash", "-c", f'{" && ".join(mounts)} && exec "$@"', "hide"] if mounts else []


def check_imports(env_dir: Path, hide: List[Path], seen_at: Optional[Path] = None) -> Dict:
    """Source bin/activate from `env_dir` (seen at `seen_at`, a bind mount, when hiding is possible) in a
    clean environment and import the runtime there."""
    hidden = hiding(hide, (env_dir, seen_at) if seen_at else None)
    if hidden and seen_at:
        env_dir = seen_at
    command = [
        "bash",
        "-c",
        'source "$1/bin/activate" && shift && exec python3 -c "$@"',
        "probe",
        str(env_dir),
        _PROBE,
        *RUNTIME_IMPORTS,
    ]
    clean = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    result = subprocess.run(hidden + command, env=clean, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise ContractError(
            f"the runtime does not import from the extracted environment:\n{result.stderr[-3000:]}"
        )
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    outside = {
        k: v for k, v in probe["files"].items() if not Path(v).resolve().is_relative_to(env_dir.resolve())
    }
    if outside:
        raise ContractError(
            f"modules imported from outside the environment (it is not self-contained): {outside}"
        )
    if probe["numpy"].split(".")[0] != "1":
        raise ContractError(
            f"numpy {probe['numpy']} in the environment: numpy 2 crashes the Python backend "
            "stub on BYTES inputs; pin numpy<2"
        )
    probe["build_env_hidden"] = bool(hidden)
    return probe


def verify(env_dir: Path, hide: List[Path]) -> Dict:
    """The whole contract on an environment directory: layout, manifest, and imports from elsewhere."""
    manifest = read_manifest(env_dir)
    with tempfile.TemporaryDirectory(prefix="sdmme-env-check-") as tmp:
        where = Path(tmp) / "somewhere" / "else"
        where.mkdir(parents=True)
        probe = check_imports(env_dir, hide, seen_at=where)
    if probe["version"] != manifest["python"]:
        raise ContractError(
            f"manifest says Python {manifest['python']} but the environment runs {probe['version']}"
        )
    hidden = (
        "build environment hidden" if probe["build_env_hidden"] else "build environment visible: not root"
    )
    print(
        f"environment contract holds: Python {probe['version']}, runtime imports ({hidden})",
        file=sys.stderr,
    )
    return manifest
