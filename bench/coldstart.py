"""`make bench-coldstart`: a cold model's time at real size, per model and archive layout, through the
local MME (moto's S3 over HTTP, the endpoint, tritonserver in SageMaker mode), in one run.

Real size: the GPU environment as SageMaker's image would use it (env/serving.txt as pinned, PyPI's CUDA
torch, built once without conda with the image's Python; it imports and serves on a machine without a
GPU) and full-size weights (random, fp16 safetensors from the published configs: the real bytes).
Layouts:
- before: the environment as a .tar.gz inside the archive, which Triton extracts again into /tmp (both
  at gzip level 1, as packed before);
- after: the environment as a directory inside the archive, used in place (one extraction), the archive
  stored (gzip level 0, `make package`'s default);
- slim: no environment in the archive; it is at a fixed path, as in an image of `make image`.
Per model and layout: archive size, download, extraction, load to READY, first image (1 step), and the
time to read the weights alone. Appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from PIL import Image
from safetensors.torch import load_file

from bench.local_s3 import local_s3
from bench.report import cpu_machine, publish
from client import base
from deploy.aws import package, tarball, upload
from deploy.local.mme.service import LocalEndpoint
from env import build
from sdmme.spec import MODELS
from sdmme.tools import weights

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
LAYOUTS = ("before", "after", "slim")
REQUESTS = {  # a first image as small as each model allows: the cost measured is the cold start
    "sd_base": {"gen_args": {"num_inference_steps": 1, "height": 64, "width": 64}},
    "sd_depth": {"image": 64, "gen_args": {"num_inference_steps": 2, "strength": 0.5}},
    "sd_inpaint": {"image": 64, "mask_image": 64, "gen_args": {"num_inference_steps": 1}},
    "sd_upscale": {"image": 32, "gen_args": {"num_inference_steps": 1}},
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def request_body(model: str) -> bytes:
    spec = REQUESTS[model]
    images = {
        name: Image.new("RGB", (spec[name], spec[name]), (120, 80, 40)) for name in MODELS[model].image_inputs
    }
    return json.dumps(base.request_body("a", None, images, spec["gen_args"])).encode()


def before_archive(repository: Path, model: str, dist: Path, env_tar: Path) -> Path:
    """Today's layout before this change: the environment as a .tar.gz that Triton unpacks."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        (staging / package.MANIFEST).write_text(json.dumps({"model": model, "kind": model, "python": "?"}))
        members = package.members(repository / model, staging, env_tar, package.BUNDLED)
        members = [
            (path, name.replace(f"/{package.ENV_NAME}", f"/{env_tar.name}"))
            if path == env_tar
            else (path, name)
            for path, name in members
        ]
        config = staging / "config.pbtxt"
        config.write_text(config.read_text().replace(f'/{package.ENV_NAME}"', f'/{env_tar.name}"'))
        first = f"{model}/{package.MANIFEST}"
        return tarball.write(
            dist / f"{model}.tar.gz", members, f"{model} (before)", compresslevel=1, first=first
        )


def native_extract_s(archive: Path) -> float:
    """GNU tar's time to extract the archive, as a platform that shells out to tar and gzip would (the
    local MME extracts in Python with zlib, whose inflating of stored blocks is much faster than gzip's)."""
    import subprocess

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        start = time.monotonic()
        subprocess.run(["tar", "-xzf", str(archive), "-C", tmp], check=True)
        return time.monotonic() - start


def weights_read_s(folder: Path) -> float:
    """Reading every byte of the weights into tensors (safetensors maps files lazily: touch them all)."""
    start = time.monotonic()
    for path in sorted(folder.rglob("*.safetensors")):
        for tensor in load_file(path).values():
            tensor.sum()
    return time.monotonic() - start


def measure(models: List[str], env_dir: Path, python: str) -> List[Dict]:
    """`python`: the environment's version (its backend stub)."""
    repository = WORK / "model_repository"  # fill makes each model's folder
    env_tar = WORK / "sd_env.tar.gz"
    if not env_tar.exists():
        members = [(p, p.name) for p in sorted(env_dir.iterdir())]
        tarball.write(env_tar, members, "environment as a .tar.gz (before)", compresslevel=1)
    rows = []
    with local_s3("bench") as (url, s3, single):
        for model in models:
            weights.fill(repository, model, "full")
            read_s = weights_read_s(weights.weights_dir(repository, model))
            for layout in LAYOUTS:
                dist = WORK / "dist"
                shutil.rmtree(dist, ignore_errors=True)
                dist.mkdir(parents=True)
                if layout == "before":
                    archive = before_archive(repository, model, dist, env_tar)
                else:
                    env_path = package.BUNDLED if layout == "after" else str(env_dir)
                    (archive,) = package.package(repository, [model], dist, env_dir, env_path)
                size = archive.stat().st_size
                native = native_extract_s(archive)
                upload.upload(s3, [archive], "bench", layout, config=single, replace=True)
                shutil.rmtree(dist)
                rows.append(
                    {
                        "model": model,
                        "layout": layout,
                        "archive_mb": size / 1e6,
                        "weights_read_s": read_s,
                        "native_extract_s": native,
                        **cold_start(url, layout, model, single, python),
                    }
                )
                s3.delete_object(Bucket="bench", Key=f"{layout}/{model}.tar.gz")
                say(json.dumps(rows[-1]))
            shutil.rmtree(weights.weights_dir(repository, model))  # disk: one model's weights at a time
    return rows


def cold_start(s3_url: str, layout: str, model: str, config, python: str) -> Dict[str, float]:
    root = WORK / "mme"
    shutil.rmtree(root, ignore_errors=True)
    before = set(Path("/tmp").glob("python_env_*"))
    with LocalEndpoint(
        "bench", "", root, max_models=1, s3_endpoint_url=s3_url, python_version=python
    ) as endpoint:
        endpoint.manager.transfer_config = config
        start = time.monotonic()
        _, _, timings = endpoint.manager.invoke(
            f"{layout}/{model}.tar.gz", request_body(model), "application/json"
        )
        total = time.monotonic() - start
    for leftover in set(Path("/tmp").glob("python_env_*")) - before:
        shutil.rmtree(leftover, ignore_errors=True)  # Triton's second copy of the environment (before)
    shutil.rmtree(root, ignore_errors=True)
    return {**{f"{k}_s": v for k, v in timings.items()}, "first_image_s": total}


def _native_total(r: Dict) -> float:
    """The first image with the archive extracted by GNU tar instead of the emulator's Python."""
    return r["first_image_s"] - r.get("extract_s", 0) + r["native_extract_s"]


def table(rows: List[Dict]) -> str:
    lines = [
        "| model | layout | archive | download | extract (local MME, Python) | extract (GNU tar) "
        "| load to READY | first image | first image, GNU tar extraction | reading the weights alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['archive_mb'] / 1e3:.2f} GB "
            f"| {r.get('download_s', 0):.1f}s | {r.get('extract_s', 0):.1f}s | {r['native_extract_s']:.1f}s "
            f"| {r.get('load_s', 0):.1f}s | {r['first_image_s']:.1f}s | {_native_total(r):.1f}s "
            f"| {r['weights_read_s']:.1f}s ({100 * r['weights_read_s'] / _native_total(r):.0f}%) |"
        )
    return "\n".join(lines)


def speedups(rows: List[Dict]) -> str:
    by = {(r["model"], r["layout"]): r for r in rows}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        if all((model, layout) in by for layout in LAYOUTS):
            before, after, slim = (by[(model, layout)] for layout in LAYOUTS)
            lines.append(
                f"- {model}, to a first image, with GNU tar extracting: after "
                f"{_native_total(before) / _native_total(after):.2f}x faster than before, slim "
                f"{_native_total(before) / _native_total(slim):.2f}x; as the local MME measured it "
                f"(Python extraction): after {before['first_image_s'] / after['first_image_s']:.2f}x, "
                f"slim {before['first_image_s'] / slim['first_image_s']:.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--python", default="python3.12", help="the image's Python, for the GPU environment")
    parser.add_argument("--env", type=Path, help="an existing GPU environment (default: built in bench/work)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    env_dir = args.env or WORK / "sd_env_gpu"
    if not (env_dir / "sdmme-env.json").exists():
        say(f"building the GPU environment in {env_dir} (several GB from PyPI)")
        build.build("relocatable", "", "gpu", args.python, output=env_dir, work=WORK / "env_build")
    manifest = build.verified_manifest(env_dir)
    env_mb = tarball.tree_size([env_dir]) / 1e6
    rows = measure(args.models, env_dir, manifest["python"])
    machine = cpu_machine()
    text = (
        f"\n## make bench-coldstart: cold start at real size ({time.strftime('%Y-%m-%d')}; {machine})\n\n"
        f"GPU environment: Python {manifest['python']}, {env_mb:,.0f} MB as a directory (env/serving.txt, "
        "trimmed); full-size random weights, fp16. Local MME: moto's S3 on loopback (one GET per archive), "
        "tritonserver 2.51 in SageMaker mode on the CPU; first image: 1 step at the smallest size. Archives: "
        "before at gzip level 1, after and slim stored (level 0).\n\n"
        + table(rows)
        + "\n\n"
        + speedups(rows)
        + "\n"
    )
    publish(text, docs=not args.no_docs)


if __name__ == "__main__":
    main()
