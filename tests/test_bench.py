"""The benchmarks the repo runs: bench-gpu refuses without a GPU and its code runs on CPU (tiny weights)."""

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import ROOT

from bench import gpu, served, serving
from sdmme.tools import weights


def test_bench_gpu_refuses_without_a_gpu():
    """`make bench-gpu` as a user types it (the venv exists: make test made it)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "bench-gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "bench.gpu" in result.stdout
    assert "make bench-gpu needs a CUDA GPU and none is visible here" in result.stderr


def device_script(step, tmp_path, args, expect=0, wheels=""):
    """bench/device.sh as a lent GPU machine runs it, on this machine's Python and CPU, in a venv over this
    one's packages as there over the device's. By default no wheels: `device.sh wheels` may have fetched
    some here, for the device's Python."""
    environment = {
        **os.environ,
        "OUT": str(tmp_path),
        "DEVICE_PYTHON": sys.executable,
        "DEVICE_VENV": str(tmp_path / "venv"),
        "DEVICE_WHEELS": wheels,
        "BENCH_ARGS": args,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "device.sh"), step], env=environment, capture_output=True, text=True
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_bench_gpu_code_runs_on_cpu_with_tiny_weights(tmp_path):
    """Through bench/device.sh, the one call a lent GPU machine gets, with the device and weights swapped."""
    weights = tmp_path / "weights"
    args = "--device cpu --tiny --dtype float32 --steps 2 --repeats 1 --compile default --skip artifacts"
    args += f" --weights-cache {weights}"
    result = device_script("run", tmp_path, args)
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.startswith("## make bench-gpu: CPU;") and "Weights: tiny." in report
    assert "| batch 8 |" in result.stdout and "| batch 8 |" in (tmp_path / "bench.log").read_text()
    for row in [
        "| SDPA (today's default) |",
        "| sync-free loop |",
        "| sync-free + CUDA graphs |",
        "| sync-free + CUDA graphs + channels_last |",
        "| sync-free + CUDA graphs + fused QKV |",
        "| sync-free + CUDA graphs + channels_last + fused QKV |",
        "| batch 1 |",
        "| batch 4 |",
        "| batch 8 |",
        "| scheduler pndm, SDPA (today's default) |",
        "| scheduler euler, SDPA (today's default) |",
        "| scheduler dpm++, SDPA (today's default) |",
        "| sd_depth 512x512 |",
        "| sd_inpaint 512x512 |",
        "| sd_upscale 128->512 |",
        "| sd_upscale 256->1024, VAE tiling |",
    ]:
        assert row in report, row
    assert "Fastest without compile: " in report and "With compile: " in report
    assert "Images against SDPA (today's default), same seed: sync-free loop: identical;" in report
    best = report.split("Fastest without compile: ")[1].split(" (")[0]
    assert f"| scheduler unipc, {best} |" in report
    assert "+ compile (default) |" in report
    assert "failed" not in report and "out of memory" not in report
    # TFLOP/s counts every image of a batch: the FLOPs per image (TFLOP/s x latency / n) agree
    per_image = []
    for n in (1, 4, 8):
        cells = next(line for line in report.splitlines() if line.startswith(f"| batch {n} |")).split("|")
        per_image.append(float(cells[5]) * float(cells[2]) / n)
    assert max(per_image) < 1.1 * min(per_image), per_image


@pytest.mark.slow
def test_compile_artifacts_measured_on_cpu_with_tiny_weights(tiny_repository):
    """bench-gpu's artifacts section (bench/compiled.py): build, cold loads without and with them (at the
    warm-up's size, batch 1: every other shape is another compile on 2 cores)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compiled",
            "--weights",
            str(weights.weights_dir(tiny_repository, "sd_base")),
            "--modes",
            "default",
            "--side",
            "512",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--quick",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| default |")]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert len(cells) == 9 and "failed" not in row, row
    compiled, from_artifacts = re.fullmatch(r"(\d+) \((\d+)\)", cells[5]).groups()
    assert compiled == "0" and int(from_artifacts) > 0, row  # the load with artifacts compiled nothing
    assert float(cells[3]) > 0 and float(cells[4]) > 0 and cells[7] == "not measured (quick)"


@pytest.mark.server
def test_the_four_models_served_with_the_aws_sample_payloads(tmp_path):
    """bench/device.sh serve: one tritonserver with the four models, each called as the AWS sample calls."""
    args = (
        f"--tiny --side 64 --steps 2 --repeats 1 --repository {tmp_path / 'repository'} "
        "--set fuse_qkv=true adapters=none"  # fused projections would bypass adapters: none with it
    )
    result = device_script("serve", tmp_path, args)
    report = (tmp_path / "served.md").read_text()
    assert "settings: fuse_qkv=true, adapters=none;" in report
    assert "Serving overhead, sd_base 64x64, 2 steps, median of 1:" in report and "  overhead: " in report
    log = (tmp_path / "tritonserver.log").read_text()
    for model in ("sd_base", "sd_depth", "sd_inpaint", "sd_upscale"):  # --set reached every model's load
        assert re.search(rf"{model}: loaded .*attention: sdpa, fused qkv", log), model
    for model, request in [("sd_base", 64), ("sd_depth", 64), ("sd_inpaint", 64), ("sd_upscale", 16)]:
        assert f"| {model} | {request} px, 2 steps | 200 | 64x64 |" in report, report
    assert "| sd_upscale |" in result.stdout
    assert report.startswith("## Served by tritonserver, AWS sample payloads: CPU;")


@pytest.mark.parametrize(
    ("item", "message"),
    [("fuse_qkvv=true", "'fuse_qkvv' is not a pipeline setting"), ("compile", "compile='' is not one of")],
)
def test_served_refuses_a_bad_setting_before_building_anything(tmp_path, capsys, item, message):
    with pytest.raises(SystemExit):
        served.main(["--repository", str(tmp_path / "r"), "--out", str(tmp_path / "o.md"), "--set", item])
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_bench_gpu_sections_can_be_skipped_and_rounds_merge(tiny_repository):
    """A short lease: --skip leaves only the eager settings (each the median of both rounds' calls)."""
    bench = gpu.Bench(torch.device("cpu"), lambda model: weights.weights_dir(tiny_repository, model), 1)
    lines = gpu.run(
        bench, steps=1, compile_mode="none", upscale_sides=[], rounds=2, skip=gpu.SECTIONS, dtype="float32"
    )
    rows = [line for line in lines if line.startswith(("| SDPA", "| sync-free"))]
    text = "\n".join(lines)
    assert len(rows) == 6 and "Fastest without compile: " in text and "; rounds: 2." in text
    table_rows = [line for line in lines if line.startswith("| ") and not line.startswith("| setting")]
    assert table_rows == rows and not [line for line in lines if "Largest" in line or "+ compile" in line]


def numpy_wheel(tmp_path, version):
    """A wheel such as a call would carry, holding only numpy's version."""
    wheel = tmp_path / f"numpy-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("numpy/__init__.py", f'__version__ = "{version}"\n')
        info = f"numpy-{version}.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: numpy\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def test_serving_refuses_numpy_2_before_starting_tritonserver(tmp_path):
    """The stub dies on the first BYTES input with numpy 2: a device whose numpy is 2 (no .whl carried on
    that machine yet) is told so at once, not after minutes of loading."""
    result = device_script("serve", tmp_path, "--tiny", expect=2, wheels=str(numpy_wheel(tmp_path, "2.1.3")))
    assert "numpy 2.1.3" in (tmp_path / "gpu.txt").read_text()
    assert "numpy<2 is not installed" in result.stderr and "call 'run' with .whl first" in result.stderr
    assert not (tmp_path / "served.md").exists()


def test_the_device_venv_sees_the_carried_wheels_the_lock_and_nothing_else(tmp_path):
    """The first GPU call died at import: the device's scipy (built for its numpy 2) was visible and
    transformers imports scipy when it finds one. The venv now takes from the device's Python only what
    env/serving.lock names and no wheel brought (torch and its own); here, the dev venv plays the device."""
    result = device_script("venv", tmp_path, "", wheels=str(numpy_wheel(tmp_path, "1.99.0")))
    assert "found neither carried nor there: " in result.stdout  # the lock's xformers, CUDA 12 libraries
    python = tmp_path / "venv" / "bin" / "python"
    probe = (  # numpy is a stub with a version: find the others, don't import them
        "import importlib.util as u, numpy\n"
        "print(numpy.__version__, u.find_spec('torch').origin, u.find_spec('diffusers').origin)\n"
        "print([m for m in ('pytest', 'hypothesis', 'moto', 'ruff') if u.find_spec(m)])"
    )
    seen = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    seen = seen.splitlines()
    version, torch_file, diffusers_file = seen[0].split()
    site = tmp_path / "venv" / "device-site"
    assert version == "1.99.0" and not (site / "numpy").exists()  # the carried wheel, not the device's
    assert torch_file == str(site / "torch" / "__init__.py") and diffusers_file.startswith(str(site))
    assert seen[1] == "[]"  # the dev venv has all four; the lock names none


def test_make_bench_sections_against_a_real_server(server, tiny_repository):
    """`make bench`'s three measurements, small: they run and report what they claim to."""
    lines = serving.overhead(server, tiny_repository, steps=2, size=64, repeats=1)
    assert lines[-1].startswith("  overhead: ") and lines[-1].endswith("%")
    lines = serving.batching_gain(server, count=3, steps=2, size=64)
    assert "one at a time" in lines[1] and "in 3 execute() calls" in lines[1]
    lines = serving.transport(server, side=32)
    json_bytes = int(lines[1].split("response ")[1].split()[0])
    binary_bytes = int(lines[2].split("response ")[1].split()[0])
    assert binary_bytes < json_bytes


@pytest.mark.server
def test_make_bench_telemetry_compares_a_model_with_its_telemetry_on_and_off(tiny_repository, tmp_path):
    lines = serving.telemetry_overhead(tiny_repository, steps=2, size=64, rounds=2, work=tmp_path)
    assert lines[-2].startswith("  difference: ") and "% of the time its caller waited" in lines[-1]
    assert float(lines[-1].split("model: ")[1].split(" ms")[0]) > 0  # measured, not made up
    requests = [
        line for line in (tmp_path / "tritonserver.log").read_text().splitlines() if line.startswith("{")
    ]
    # The warm-up, 2 rounds and one after PUBLISH_EVERY_S that publishes telemetry's own time.
    assert [json.loads(line)["model"] for line in requests] == ["observed"] * 4


def test_bench_adapters_runs_its_measurements_through_the_local_mme(packed_env, tmp_path):
    """`make bench-adapters` with tiny weights: every figure of its report is measured, none made up."""
    from bench import adapters

    results = adapters.measure("tiny", 2, packed_env[0], repeats=1, rounds=1, side=64, work=tmp_path)
    assert set(results["per_step"]) == {"model alone", "LoRA unfused (PEFT)", "LoRA fused"}
    assert len(results["fetch_s"]) == 2 and len(results["load_s"]) == 2  # two adapters, each fetched once
    assert results["fuse_s"] and results["unfuse_s"]
    assert results["adapter_bytes"] < results["archive_bytes"]["sd_base_ink.tar.gz"]
    assert all(rss > 0 for rss in results["rss"].values())  # each stub process found
    text = adapters.report(results, "this machine", 64)
    assert "| S3 bytes |" in text and "A cold adapter added" in text
