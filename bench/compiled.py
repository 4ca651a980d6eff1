"""Compiled speed and what compile artifacts save (`make bench-gpu` section `artifacts`; alone:
`python -m bench.compiled`), each step in a fresh process as a cold load on an instance would be:

- build: `make compile-cache` for the mode (a cold compile of the warm-up's size at batch 1 and 8);
- load: a cold load from those artifacts (with a compile cache of its own, empty) to the model ready,
  the graphs it compiled and took from the artifacts, then the latency at batch 1 and 8 and the first
  request at a size not prepared (compiled then, and said in the log);
- the same load without artifacts (and an empty cache): today's cold start with compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from sdmme import model_folder

ROOT = Path(__file__).resolve().parent.parent


def _model_folder(work: Path, weights_folder: Path, mode: str) -> Path:
    """A model folder of sd_base with `mode` in its config.pbtxt and `weights_folder` as its weights."""
    folder = model_folder.write(work / mode / "sd_base", "sd_base", {"compile": mode, "adapters": "none"})
    weights = folder / "1" / "weights"
    if not weights.exists():
        weights.symlink_to(weights_folder.resolve())
    return folder


def _python(args: List[str], env_cache: Optional[Path], timeout: float) -> subprocess.CompletedProcess:
    env = None
    if env_cache is not None:
        import os

        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(env_cache)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def cold_load(folder: Path, side: int, steps: int, repeats: int, quick: bool = False) -> Dict:
    """In this (fresh) process: artifacts (if any), the model loaded and warmed up as initialize() does;
    then batch 1 and 8 and a size not prepared."""
    import torch

    from sdmme import loader
    from sdmme.pipeline import compile_artifacts
    from sdmme.serving import batching

    start = time.perf_counter()
    loaded = loader.load_model(folder, "GPU" if torch.cuda.is_available() else "CPU")
    device, spec, runner = loaded.device, loaded.spec, loaded.runner

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    result = {
        "artifacts": loaded.from_artifacts,
        "load_s": time.perf_counter() - start,
        **compile_artifacts.compiled_graphs(),
    }

    def timed(jobs) -> float:
        sync()
        begin = time.perf_counter()
        batching.run(runner, jobs)
        sync()
        return time.perf_counter() - begin

    for batch in (1,) if quick else (1, 8):
        jobs = [
            dataclasses.replace(batching.warmup_job(spec, side, steps, seed=i), index=i) for i in range(batch)
        ]
        timed(jobs)  # the first call of batch 8 may still compile (a shape not in the artifacts)
        result[f"batch_{batch}_s"] = statistics.median(timed(jobs) for _ in range(repeats))
    if quick:
        return result
    new_side = side * 3 // 4 // 8 * 8
    result["new_size_first_s"] = timed([batching.warmup_job(spec, new_side, steps)])
    result["new_size_s"] = timed([batching.warmup_job(spec, new_side, steps)])
    result["new_side"] = new_side
    return result


def rows(
    weights_folder: Path,
    modes: List[str],
    side: int,
    steps: int,
    repeats: int,
    quick: bool = False,
    timeout: float = 1800,
) -> List[str]:
    """The table: per mode, build time, cold load with and without artifacts, latencies (`quick`: batch
    1 only, no new size: each is another compile, and CPU tests have 2 cores)."""
    columns = [
        "compile mode",
        "build (s)",
        "artifact (MB)",
        "cold load, no artifacts (s)",
        "cold load, artifacts (s)",
        "graphs compiled at that load (from artifacts)",
        f"{side}px batch 1 (s)",
        "batch 8 (s)",
        "first call at a new size (s)",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    with tempfile.TemporaryDirectory(prefix="bench-compiled-") as tmp:
        work = Path(tmp)
        for mode in modes:
            folder = _model_folder(work, weights_folder, mode)
            try:
                build = _python(
                    [
                        "-m",
                        "sdmme.tools.compile_cache",
                        "--model",
                        "sd_base",
                        "--repository",
                        str(folder.parent),
                        "--shapes",
                        f"{side}:1" if quick else f"{side}:1,{side}:8",
                    ],
                    None,
                    timeout,
                )
                if build.returncode != 0:
                    raise RuntimeError(
                        build.stderr.strip().splitlines()[-1] if build.stderr.strip() else "failed"
                    )
                record = json.loads(next((folder / "1" / "compile").glob("*.json")).read_text())
                loads = {}
                for with_artifacts in (False, True):
                    if not with_artifacts:
                        shutil.move(str(folder / "1" / "compile"), str(work / f"{mode}-aside"))
                    else:
                        shutil.move(str(work / f"{mode}-aside"), str(folder / "1" / "compile"))
                    args = [
                        "-m",
                        "bench.compiled",
                        "--load",
                        str(folder),
                        "--side",
                        str(side),
                        "--steps",
                        str(steps),
                        "--repeats",
                        str(repeats),
                    ] + (["--quick"] if quick else [])
                    done = _python(args, work / f"cache-{mode}-{with_artifacts}", timeout)
                    if done.returncode != 0:
                        raise RuntimeError(done.stderr.strip().splitlines()[-1])
                    loads[with_artifacts] = json.loads(done.stdout.strip().splitlines()[-1])
                cold, warm = loads[False], loads[True]
                cells = [
                    mode,
                    f"{record['build_seconds']:.0f}",
                    f"{record['bytes'] / 1e6:.1f}",
                    f"{cold['load_s']:.1f}",
                    f"{warm['load_s']:.1f}",
                    f"{warm['compiled']} ({warm['from cache']})",
                    f"{warm['batch_1_s']:.3f}",
                ]
                if not quick:
                    cells.append(f"{warm['batch_8_s']:.3f}")
                    first, then = warm["new_size_first_s"], warm["new_size_s"]
                    cells.append(f"{first:.1f} ({warm['new_side']}px; then {then:.3f})")
                else:
                    cells += ["not measured (quick)"] * 2
                lines.append("| " + " | ".join(cells) + " |")
            except Exception as e:
                why = f"failed: {type(e).__name__}: {str(e)[:200]}".replace("|", "/")
                lines.append(f"| {mode} | {why} |" + " |" * (len(columns) - 2))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--load", type=Path, help="(internal) one cold load of this model folder; prints JSON"
    )
    parser.add_argument("--weights", type=Path, help="sd_base's weights folder (the table)")
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, no new size (CPU tests)")
    args = parser.parse_args(argv)
    if args.load:
        print(json.dumps(cold_load(args.load, args.side, args.steps, args.repeats, args.quick)))
        return 0
    if not args.weights:
        parser.error("--weights is required for the table")
    print("\n".join(rows(args.weights, args.modes, args.side, args.steps, args.repeats, args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
