"""`make package`: one self-contained `<model>.tar.gz` per model in the repository, as a SageMaker MME
serves it.

Each archive holds one top-level folder named after the model: its manifest first (a reader of the
first few kilobytes learns the model's kind without decompressing the rest), config.pbtxt (with
EXECUTION_ENV_PATH pointing inside the model folder), 1/model.py, 1/weights/ and the environment as a
directory (which carries the sdmme runtime; Triton uses it in place). Nothing else in the model folder
is shipped. Everything is checked before anything is written.

`make package-slim` leaves the environment out: slim archives run in the same environment baked into an
image at a fixed path (docker/Dockerfile, `make image`), so a cold model reads little but its weights.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Dict, List, Optional

from deploy.aws import tarball
from env import contract, trim
from env.build import OUTPUT as ENV_DIR
from env.build import verified_manifest
from sdmme import model_folder
from sdmme.model_folder import MANIFEST
from sdmme.pipeline import compile_artifacts
from sdmme.spec import MODELS

ENV_NAME = "sd_env"  # a directory: Triton uses it in place, so SageMaker's extraction is the only one
BUNDLED = f"$$TRITON_MODEL_DIRECTORY/{ENV_NAME}"  # the environment the archive carries
# Slim archives (`make package-slim`): the environment is baked into the image there (docker/Dockerfile).
IMAGE_ENV_PATH = "/opt/sdmme/sd_env"
# gzip level 0: CUDA libraries and fp16 weights barely compress, and every cold load on every instance
# pays for inflating (zlib: 2.8 GB of weights in 1.1 s stored, 13.4 s at level 1 on the dev machine).
STORED = 0


def env_parameter(env_path: str) -> str:
    why = "runs in the environment it carries" if env_path == BUNDLED else "runs in the image's environment"
    return f"""
# Added by `make package`: this archive {why}.
parameters: {{
  key: "EXECUTION_ENV_PATH"
  value: {{ string_value: "{env_path}" }}
}}
"""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PackageError(Exception):
    """A model folder or the environment is not fit to ship; nothing was written."""


def check_model(folder: Path) -> Dict:
    """Check one model folder; returns what the manifest records about it."""
    name = folder.name
    config_path = folder / "config.pbtxt"
    if not config_path.exists():
        raise PackageError(f"{name}: {config_path} is missing")
    config = config_path.read_text()
    declared = re.search(r'^name:\s*"([^"]+)"', config, re.M)
    if not declared or declared.group(1) != name:
        raise PackageError(f'{name}: config.pbtxt must say name: "{name}" (the folder name)')
    if not re.search(r'^backend:\s*"python"', config, re.M):
        raise PackageError(f'{name}: config.pbtxt must say backend: "python"')
    kind = model_folder.kind_in(config)
    if kind not in MODELS:
        raise PackageError(
            f"{name}: config.pbtxt must declare its kind, one of {', '.join(MODELS)} "
            f'(parameters: {{ key: "kind" value: {{ string_value: "..." }} }}), it says {kind!r}'
        )
    if "EXECUTION_ENV_PATH" in config:
        raise PackageError(f"{name}: config.pbtxt already sets EXECUTION_ENV_PATH; packaging adds it")
    if not (folder / "1" / "model.py").exists():
        raise PackageError(f"{name}: 1/model.py is missing")
    weights = folder / "1" / "weights"
    if not (weights / "model_index.json").exists():
        raise PackageError(f"{name}: no weights in {weights}: run `make weights` or `make weights-hub`")
    pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise PackageError(
            f"{name}: pickled files are never shipped (safetensors only): {', '.join(pickled)}"
        )
    if not any(weights.rglob("*.safetensors")):
        raise PackageError(f"{name}: {weights} holds no .safetensors files")
    source = json.loads((weights / "source.json").read_text()) if (weights / "source.json").exists() else {}
    return {
        "model": name,
        "kind": kind,
        "weights": source.get("source", "unknown"),
        "compile_artifacts": compile_artifacts.summary(folder),
    }


def members(folder: Path, staging: Path, env_dir: Path, env_path: str = BUNDLED) -> List:
    """What goes into the archive, in the archive's layout: what serving reads, nothing a build left."""
    name = folder.name
    config = staging / "config.pbtxt"
    config.write_text((folder / "config.pbtxt").read_text().rstrip("\n") + "\n" + env_parameter(env_path))
    files = [(config, f"{name}/config.pbtxt"), (staging / MANIFEST, f"{name}/{MANIFEST}")]
    if env_path == BUNDLED:
        files.append((env_dir, f"{name}/{ENV_NAME}"))
    files.append((folder / "1" / "model.py", f"{name}/1/model.py"))
    shipped = [*(folder / "1" / "weights").rglob("*"), *(folder / "1" / compile_artifacts.FOLDER).glob("*")]
    for path in sorted(shipped):
        relative = path.relative_to(folder)
        if "__pycache__" in relative.parts or path.is_dir():
            continue
        files.append((path, f"{name}/{relative.as_posix()}"))
    return files


def read_manifest(stream: IO[bytes]) -> Optional[Dict]:
    """The manifest of an archive from the start of its bytes (the first member), None if it is not
    first there (an archive from before it was)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|gz") as tar:
            first = tar.next()
            if first is None or not first.name.endswith("/" + MANIFEST) or first.name.count("/") != 1:
                return None
            return json.load(tar.extractfile(first))
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None


def package(
    repository: Path,
    models: List[str],
    dist: Path,
    env_dir: Path = ENV_DIR,
    env_path: str = BUNDLED,
    gzip_level: int = STORED,
) -> List[Path]:
    """Self-contained archives, or with `env_path` slim ones that run in the environment at that path
    (the same environment, baked into the serving image)."""
    infos = [check_model(repository / model) for model in models]  # every check before any write
    try:
        env_manifest = verified_manifest(env_dir)
    except contract.ContractError as e:
        raise PackageError(f"environment {env_dir}: {e}") from None
    print(trim.report(env_dir), file=sys.stderr)
    written = []
    for info in infos:
        folder = repository / info["model"]
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            manifest = {
                **info,
                "python": env_manifest["python"],
                "env_builder": env_manifest["builder"],
                "env_path": "bundled" if env_path == BUNDLED else env_path,
                "env_sha256": env_manifest["tree_sha256"],
                "sdmme": env_manifest["sdmme"],
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            dest = dist / f"{info['model']}.tar.gz"
            print(f"packing {dest}", file=sys.stderr, flush=True)
            tarball.write(
                dest,
                members(folder, staging, env_dir, env_path),
                f"packing {dest.name}",
                compresslevel=gzip_level,
                first=f"{info['model']}/{MANIFEST}",
            )
            written.append(dest)
    for path in written:
        print(f"{path}: {path.stat().st_size / 1e6:,.1f} MB  sha256 {tarball.sha256(path)[:16]}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", help="default: every model in the repository")
    parser.add_argument("--dist", type=Path, default=Path("dist"))
    parser.add_argument("--env", type=Path, default=ENV_DIR, help="the environment (make env)")
    parser.add_argument(
        "--slim-env-path",
        help=f"slim archives without the environment, run in the one at this path in the image "
        f"(make image puts it at {IMAGE_ENV_PATH})",
    )
    parser.add_argument(
        "--gzip-level",
        type=int,
        choices=range(10),
        default=STORED,
        help="0 (default): stored, inflating is a copy; higher levels trade every cold load's time for "
        "a smaller upload (docs/benchmarks.md)",
    )
    args = parser.parse_args()
    try:
        found = model_folder.in_repository(args.repository)
        unknown = sorted(set(args.models or []) - set(found))
        if unknown:
            raise PackageError(f"no such model in {args.repository}: {', '.join(unknown)}")
        env_path = args.slim_env_path or BUNDLED
        package(args.repository, args.models or sorted(found), args.dist, args.env, env_path, args.gzip_level)
    except PackageError as e:
        raise SystemExit(f"make package: {e}") from None


if __name__ == "__main__":
    main()
