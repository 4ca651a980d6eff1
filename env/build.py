"""`make env`: build the environment every model archive carries (a directory, `env/sd_env/`), make it
lean and reproducible, and check its contract.

- With conda: `conda env create` from environment.yml (CUDA torch, xformers; the Python of the SageMaker
  image), then conda-pack. The production path.
- Without conda: a self-contained copy of a CPython (this one, or `--python`) with a relocatable
  `bin/activate` and the pinned serving stack (env/serving.txt). Flavor `cpu` (dev machines, CI) swaps
  torch for a CPU build and leaves out xformers; it serves on the local tritonserver and the local MME.
  Flavor `gpu` installs the pins as they are (PyPI's CUDA torch imports on a machine without a GPU): the
  production environment, built with the image's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.aws import containers, tarball
from env import contract, trim

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "env" / "sd_env"
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


PINS = ROOT / "env" / "serving.txt"
LOCK = ROOT / "env" / "serving.lock"  # every package of the gpu flavor, exactly (`make lock`, env/lock.py)
DEV_LOCK = ROOT / "env" / "dev.lock"  # every package of `make venv` and of the cpu flavor, likewise
GPU_ONLY = ("torch", "xformers")  # the cpu flavor takes TORCH's build instead, and no xformers
_DESCRIBE = (
    "import json, sys, sysconfig; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
    "'prefix': sys.base_prefix, 'executable': sys.executable, 'libdir': sysconfig.get_config_var('LIBDIR')}))"
)


def pins() -> dict:
    """env/serving.txt as {package: requirement line}."""
    found = {}
    for line in PINS.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            found[re.split(r"[=<>!~\[ ]", requirement)[0].lower()] = requirement
    return found


def requirements(flavor: str, torch: str) -> list:
    """What the no-conda builder installs: the pins, with TORCH instead of the GPU-only ones for cpu."""
    pinned = pins()
    if flavor == "gpu":
        return list(pinned.values())
    return [torch] + [line for name, line in pinned.items() if name not in GPU_ONLY]


def constraints(flavor: str) -> list:
    """Each flavor installs with its lock, so its dependencies too are the same on any day: the gpu flavor
    with production's, the cpu flavor (TORCH's build) with the dev venv's, which `make test` runs on."""
    return ["-c", str(LOCK if flavor == "gpu" else DEV_LOCK)]


def relocatable(dest: Path, interpreter: str, packages: list) -> str:
    """Copy a CPython (no site-packages), add pip, install `packages` and this runtime into it."""
    described = subprocess.run(
        [interpreter, "-c", _DESCRIBE], check=True, capture_output=True, text=True, env=_clean_env()
    )
    info = json.loads(described.stdout)
    version, prefix = info["version"], Path(info["prefix"])
    libpython = Path(info["libdir"]) / f"libpython{version}.so.1.0"
    if not libpython.exists():
        raise contract.ContractError(
            f"{libpython} is missing: this Python was built without --enable-shared; "
            "use a shared-library build (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared) or conda"
        )
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(Path(info["executable"]).resolve(), dest / "bin" / f"python{version}")
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
    # No bytecode here: it is compiled once, reproducibly, after trimming (env/trim.py).
    run(
        [python, "-m", "pip", "install", "--no-compile", "--no-warn-script-location", *packages, str(ROOT)],
        env=env,
    )
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
    """conda-pack writes a relocatable copy (its bin/activate finds the environment where it is)."""
    pack = shutil.which("conda-pack")
    if not pack:
        raise SystemExit("conda-pack is not installed: conda install -n base -c conda-forge conda-pack")
    run(
        [
            pack,
            "--prefix",
            str(prefix),
            "--output",
            str(output),
            "--format",
            "no-archive",
            "--force",
            "--ignore-editable-packages",
        ]
    )


def build(
    builder: str,
    torch: str,
    flavor: str = "cpu",
    interpreter: str = sys.executable,
    output: Path = OUTPUT,
    work: Path = WORK,
) -> Path:
    start = time.monotonic()
    conda = shutil.which("conda")
    if builder == "conda" and not conda:
        raise SystemExit("conda is not installed: use --builder relocatable, or install Miniforge")
    builder = builder if builder != "auto" else ("conda" if conda else "relocatable")
    shutil.rmtree(work, ignore_errors=True)
    prefix = work / "sd_env"
    print(f"building the environment with the {builder} builder in {prefix}", file=sys.stderr)
    if builder == "conda":
        version = with_conda(work / "conda", conda)
        conda_pack(work / "conda", prefix)
    else:
        version = relocatable(prefix, interpreter, requirements(flavor, torch) + constraints(flavor))
    manifest = {"python": version, "builder": builder, "sdmme": _version()}
    if builder != "conda":
        manifest["flavor"] = flavor
    (prefix / contract.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    removed = trim.trim(prefix)
    print(
        "trimmed what serving never uses: "
        + ", ".join(f"{kind} {size / 1e6:,.0f} MB" for kind, size in sorted(removed.items())),
        file=sys.stderr,
    )
    env = {**_clean_env(), "LD_LIBRARY_PATH": str(prefix / "lib")}
    trim.compile_bytecode(prefix, str(prefix / "bin" / "python3"), env)
    shutil.rmtree(output, ignore_errors=True)
    output.with_name(output.name + ".verified").unlink(missing_ok=True)
    prefix.rename(output)  # checked where it is used, not where it was built
    shutil.rmtree(work, ignore_errors=True)
    print(trim.report(output), file=sys.stderr)
    print(f"built {output} in {time.monotonic() - start:.0f}s", file=sys.stderr)
    verified_manifest(output, recheck=True)
    image_python = containers.python_for(containers.DEFAULT_TAG)
    if version != image_python:
        print(
            f"note: this environment runs Python {version}; SageMaker's sagemaker-tritonserver:"
            f"{containers.DEFAULT_TAG}-py3 runs {image_python}. It serves locally (tritonserver, local MME); "
            f"for SageMaker build it with conda, or with ENV_FLAVOR=gpu ENV_PYTHON=python{image_python}.",
            file=sys.stderr,
        )
    return output


def verified_manifest(env_dir: Path = OUTPUT, recheck: bool = False) -> dict:
    """The manifest of an environment whose contract holds (with its digest, `tree_sha256`), checked with
    the build environment hidden.

    The full check (imports) runs again only when the environment changed since it last passed.
    """
    if not env_dir.is_dir():
        raise contract.ContractError(f"{env_dir} is missing: run `make env` first")
    stamp = env_dir.with_name(env_dir.name + ".verified")
    digest = tarball.tree_sha256(env_dir)
    if not recheck and stamp.exists() and stamp.read_text() == digest:
        return {**contract.read_manifest(env_dir), "tree_sha256": digest}
    manifest = contract.verify(env_dir, hide=[Path(sys.base_prefix), Path(sys.prefix), ROOT])
    stamp.write_text(digest)
    return {**manifest, "tree_sha256": digest}


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
        "--flavor",
        choices=("cpu", "gpu"),
        default="cpu",
        help="relocatable builder: cpu (TORCH, no xformers) or gpu (env/serving.txt as pinned)",
    )
    parser.add_argument("--python", default=sys.executable, help="relocatable builder: the CPython to copy")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement for the cpu flavor")
    args = parser.parse_args()
    try:
        build(args.builder, args.torch, args.flavor, args.python)
    except contract.ContractError as e:
        shutil.rmtree(OUTPUT, ignore_errors=True)
        raise SystemExit(f"make env: {e}") from None


if __name__ == "__main__":
    main()
