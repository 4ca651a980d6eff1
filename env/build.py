"""`make env`: build the environment every model archive carries, pack it, and check its contract.

- With conda: `conda env create` from environment.yml (CUDA torch, xformers; the Python of the SageMaker
  image), then conda-pack. The production path.
- Without conda (dev machines, CI): a self-contained copy of this CPython with the CPU dependencies and a
  relocatable `bin/activate`. It serves on the local tritonserver and the local MME.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from deploy import containers, tarball
from env import contract

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "env" / "sd_env.tar.gz"
WORK = ROOT / "env" / "build"

# Relocatable: PATH and the libpython location come from where this file is, not where it was built.
ACTIVATE = """\
# Relocatable: everything is found relative to this file, wherever the environment was extracted.
_sdmme_env="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export PATH="$_sdmme_env/bin:$PATH"
export LD_LIBRARY_PATH="$_sdmme_env/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset PYTHONHOME PYTHONPATH
export VIRTUAL_ENV="$_sdmme_env"
"""

# Parts of the CPython prefix the runtime never needs.
SKIP = shutil.ignore_patterns(
    "site-packages", "test", "tests", "idlelib", "turtledemo", "tkinter", "__pycache__", "*.a", "lib2to3"
)


def run(cmd: list, **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def relocatable(dest: Path, torch: str) -> str:
    """Copy this CPython (no site-packages), add pip, install the CPU runtime into it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix = Path(sys.base_prefix)
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    libpython = libdir / f"libpython{version}.so.1.0"
    if not libpython.exists():
        raise contract.ContractError(
            f"{libpython} is missing: this Python was built without --enable-shared; "
            "use a shared-library build (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared) or conda"
        )
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(Path(sys.executable).resolve(), dest / "bin" / f"python{version}")
    for alias in ("python3", "python"):
        (dest / "bin" / alias).symlink_to(f"python{version}")
    (dest / "lib").mkdir()
    shutil.copy2(libpython, dest / "lib" / libpython.name)
    (dest / "lib" / f"libpython{version}.so").symlink_to(libpython.name)
    print(f"copying the standard library of {prefix}", file=sys.stderr)
    shutil.copytree(prefix / "lib" / f"python{version}", dest / "lib" / f"python{version}", ignore=SKIP)
    (dest / "bin" / "activate").write_text(ACTIVATE)
    env = {**_clean_env(), "LD_LIBRARY_PATH": str(dest / "lib")}
    python = str(dest / "bin" / "python3")
    run([python, "-m", "ensurepip", "--default-pip"], env=env)
    run([python, "-m", "pip", "install", "--no-warn-script-location", torch, f"{ROOT}[runtime]"], env=env)
    return version


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def with_conda(dest: Path, conda: str) -> str:
    run([conda, "env", "create", "--prefix", str(dest), "--file", str(ROOT / "environment.yml")], cwd=ROOT)
    out = subprocess.run(
        [str(dest / "bin" / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def conda_pack(prefix: Path, output: Path) -> None:
    """conda-pack writes a relocatable bin/activate (it rewrites prefixes on activation)."""
    pack = shutil.which("conda-pack")
    if not pack:
        raise SystemExit("conda-pack is not installed: conda install -n base -c conda-forge conda-pack")
    run([pack, "--prefix", str(prefix), "--output", str(output), "--force", "--ignore-editable-packages"])


def build(builder: str, torch: str) -> Path:
    start = time.monotonic()
    conda = shutil.which("conda")
    if builder == "conda" and not conda:
        raise SystemExit("conda is not installed: use --builder relocatable, or install Miniforge")
    builder = builder if builder != "auto" else ("conda" if conda else "relocatable")
    shutil.rmtree(WORK, ignore_errors=True)
    prefix = WORK / "sd_env"
    print(f"building the environment with the {builder} builder in {prefix}", file=sys.stderr)
    version = with_conda(prefix, conda) if builder == "conda" else relocatable(prefix, torch)
    manifest = {"python": version, "builder": builder, "sdmme": _version()}
    (prefix / contract.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if builder == "conda":
        conda_pack(prefix, OUTPUT)
    else:
        tarball.write(
            OUTPUT, [(prefix / p.name, p.name) for p in sorted(prefix.iterdir())], "packing environment"
        )
    print(
        f"packed {OUTPUT} ({OUTPUT.stat().st_size / 1e6:,.0f} MB) in {time.monotonic() - start:.0f}s",
        file=sys.stderr,
    )
    verified_manifest(OUTPUT, recheck=True)
    shutil.rmtree(WORK, ignore_errors=True)
    image_python = containers.python_for(containers.DEFAULT_TAG)
    if version != image_python:
        print(
            f"note: this environment runs Python {version}; SageMaker's sagemaker-tritonserver:"
            f"{containers.DEFAULT_TAG}-py3 runs {image_python}. It serves locally (tritonserver, local MME); "
            "for SageMaker build it with conda from environment.yml.",
            file=sys.stderr,
        )
    return OUTPUT


def verified_manifest(archive: Path = OUTPUT, recheck: bool = False) -> dict:
    """The manifest of an archive whose contract holds, checked with the build environment hidden.

    The full check (extract, import) runs again only when the archive changed since it last passed.
    """
    if not archive.exists():
        raise contract.ContractError(f"{archive} is missing: run `make env` first")
    stamp = archive.with_name(archive.name + ".verified")
    digest = tarball.sha256(archive)
    if not recheck and stamp.exists() and stamp.read_text() == digest:
        return contract.read_manifest(archive)
    manifest = contract.verify(archive, hide=[Path(sys.base_prefix), Path(sys.prefix), ROOT])
    stamp.write_text(digest)
    return manifest


def _version() -> str:
    from importlib.metadata import version

    return version("sdmme")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--builder",
        choices=("auto", "conda", "relocatable"),
        default="auto",
        help="auto: conda when installed, else relocatable",
    )
    parser.add_argument(
        "--torch", default="torch==2.13.0", help="torch requirement for the relocatable builder"
    )
    args = parser.parse_args()
    try:
        build(args.builder, args.torch)
    except contract.ContractError as e:
        OUTPUT.unlink(missing_ok=True)
        raise SystemExit(f"make env: {e}") from None


if __name__ == "__main__":
    main()
