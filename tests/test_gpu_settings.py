"""The GPU settings, applied on CPU: every setting takes effect, fp16 runs, fallbacks hold, and the
config.pbtxt parameters reach the pipeline through a real tritonserver.

Only the speed and memory figures need a GPU (`make bench-gpu`); everything the runtime does to a
pipeline for one runs here, through the same functions.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from helpers import ROOT, b64, picture, post, sample_payload, small_job, with_parameters

from deploy.local.tritonserver import TritonServer
from sdmme import loader
from sdmme.pipeline import speed
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS

CPU = torch.device("cpu")
ALL_ON = Settings(dtype="float16", channels_last=True, fuse_qkv=True, vae_tiling=True, adapters="none")


def load(repository, model: str, settings: Settings):
    """The model of that kind in `repository` on CPU with `settings`, through the one loader."""
    return loader.load(MODELS[model], repository / model, CPU, settings)


def processors(module) -> set:
    return {type(p) for p in module.attn_processors.values()}


def test_device_defaults():
    device, settings = loader.device_for("GPU", "1"), Settings("GPU")
    assert device == torch.device("cuda:1") and speed.torch_dtype(settings, device) == torch.float16
    assert settings.attention == "sdpa" and settings.vae_slicing and settings.compile == "none"
    assert not settings.sync_free and not settings.cuda_graphs  # until a GPU has measured them
    device, settings = loader.device_for("CPU", "0"), Settings("CPU")
    assert device == CPU and speed.torch_dtype(settings, device) == torch.float32
    assert settings.sync_free and not settings.cuda_graphs


def test_settings_from_config_parameters():
    base = Settings("GPU")
    parsed = Settings.from_parameters(
        {"channels_last": "TRUE", "compile": "max-autotune", "EXECUTION_ENV_PATH": "$$X/env"}, "GPU"
    )
    assert parsed.channels_last and parsed.compile == "max-autotune" and parsed.attention == base.attention
    assert Settings.from_parameters({"time_budget_s": "12.5"}, "GPU").time_budget_s == 12.5
    parsed = Settings.from_parameters({"adapters": "s3://b/p/", "max_adapters": "3"}, "GPU")
    assert parsed.adapters == "s3://b/p/" and parsed.max_adapters == 3
    for parameters, message in [
        ({"attention": "flash"}, "attention='flash' is not one of sdpa, xformers"),
        ({"vae_slicing": "yes"}, "vae_slicing must be true or false"),
        ({"turbo": "true"}, "'turbo' is not a pipeline setting"),
        (
            {"attention": "xformers", "fuse_qkv": "true", "adapters": "none"},
            "cannot go with attention=xformers",
        ),
        ({"fuse_qkv": "true"}, "set adapters to none with it"),
        ({"max_adapters": "0"}, "max_adapters must be a whole number of 1 or more"),
        ({"max_adapters": "two"}, "max_adapters must be a whole number"),
        ({"time_budget_s": "soon"}, "time_budget_s must be a number"),
        ({"time_budget_s": "-5"}, "time_budget_s must be 0 or more"),
        ({"time_budget_s": "nan"}, "time_budget_s must be 0 or more"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings.from_parameters(parameters, "GPU")
    for made in (lambda: Settings(turbo=True), lambda: base.replace(turbo=True)):  # settings made in code
        with pytest.raises(TypeError, match="not a setting: turbo"):
            made()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_setting_takes_effect_and_fp16_runs(tiny_repository, model):
    loaded = load(tiny_repository, model, ALL_ON)
    pipeline = loaded.pipeline
    assert pipeline.unet.dtype == torch.float16 and pipeline.text_encoder.dtype == torch.float16
    assert processors(pipeline.unet) == {FusedAttnProcessor2_0}
    assert processors(pipeline.vae) == {FusedAttnProcessor2_0}
    assert pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipeline.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipeline.vae.use_slicing and pipeline.vae.use_tiling
    [[image]] = batching.run(loaded.runner, [small_job(model)])
    assert image.size == ((128, 128) if model == "sd_upscale" else (64, 64))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_gpu_defaults_in_fp16(tiny_repository, model):
    loaded = load(tiny_repository, model, Settings.from_parameters({"dtype": "float16"}, "GPU"))
    pipeline = loaded.pipeline
    assert pipeline.unet.dtype == torch.float16
    assert processors(pipeline.unet) == {AttnProcessor2_0}
    assert pipeline.vae.use_slicing and not pipeline.vae.use_tiling
    [[image]] = batching.run(loaded.runner, [small_job(model)])
    # random tiny weights can overflow fp16 (shared/FACTS.md): judge by shape, not by pixels
    assert image.mode == "RGB" and image.size[0] in (64, 128)


def test_unusable_xformers_falls_back_to_sdpa(tiny_repository, tmp_path):
    """An installed xformers that cannot run here (no GPU, wrong build) must not fail the load."""
    site = tmp_path / "site"
    (site / "xformers").mkdir(parents=True)
    (site / "xformers" / "__init__.py").write_text("from xformers import ops\n")
    (site / "xformers" / "ops.py").write_text(
        "def memory_efficient_attention(*args, **kwargs):\n"
        "    raise NotImplementedError('no kernel for this device')\n"
    )
    info = site / "xformers-0.0.28.post3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xformers\nVersion: 0.0.28.post3\n")
    script = textwrap.dedent(
        f"""
        import logging, torch
        from pathlib import Path
        from diffusers.utils import is_xformers_available
        from sdmme import loader
        from sdmme.settings import Settings
        from sdmme.spec import MODELS
        logging.basicConfig(level=logging.INFO)
        assert is_xformers_available()
        folder = Path({str(tiny_repository / "sd_base")!r})
        loaded = loader.load(MODELS["sd_base"], folder, torch.device("cpu"), Settings(attention="xformers"))
        pipeline = loaded.pipeline
        print("processors:", sorted({{type(p).__name__ for p in pipeline.unet.attn_processors.values()}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "xformers is not usable here" in result.stderr and "falling back to PyTorch SDPA" in result.stderr
    assert "processors: ['AttnProcessor2_0']" in result.stdout
    assert "attention: sdpa" in result.stderr


@pytest.mark.slow
def test_compile_option_compiles_the_unet_and_keeps_the_image(tiny_repository):
    """torch.compile (inductor; on CPU it needs a C compiler) gives the eager image up to rounding."""
    eager = load(tiny_repository, "sd_base", Settings()).runner
    compiled = load(tiny_repository, "sd_base", Settings(compile="default"))
    assert compiled.pipeline.unet._compiled_call_impl is not None  # nn.Module.compile, in place
    job = small_job("sd_base", steps=2)
    [[expected]] = batching.run(eager, [job])
    [[image]] = batching.run(compiled.runner, [job])
    difference = np.abs(np.asarray(expected, dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert difference.max() <= 2


@pytest.mark.server
def test_config_parameters_reach_the_pipeline_through_triton(tiny_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "sd_depth", repository / "sd_depth")
    with_parameters(
        repository / "sd_depth",
        {
            "dtype": "float16",
            "channels_last": "true",
            "fuse_qkv": "true",
            "adapters": "none",
            "cuda_graphs": "true",
        },
    )
    shutil.copytree(tiny_repository / "sd_base", repository / "sd_base")
    with_parameters(repository / "sd_base", {"attention": "flash"})
    shutil.copytree(tiny_repository / "sd_inpaint", repository / "sd_inpaint")
    config = repository / "sd_inpaint" / "config.pbtxt"
    config.write_text(config.read_text().replace('key: "kind"', 'key: "sort"'))
    log_file = tmp_path / "tritonserver.log"
    with TritonServer(repository, extra=["--model-control-mode=explicit"], log_file=log_file) as server:
        status, body = post(server, "/v2/repository/models/sd_depth/load", {})
        assert status == 200, body
        payload = sample_payload(
            prompt="a", image=b64(picture(64, 64)), gen_args=json.dumps({"num_inference_steps": 2})
        )
        status, body = post(server, "/v2/models/sd_depth/infer", payload)
        assert status == 200 and body["outputs"][0]["shape"] == [1, 1], body
        status, body = post(server, "/v2/repository/models/sd_base/load", {})
        assert status == 400 and "config.pbtxt parameter attention='flash' is not one of" in body["error"]
        status, body = post(server, "/v2/repository/models/sd_inpaint/load", {})
        assert status == 400 and "config.pbtxt of sd_inpaint must declare its kind, one of" in body["error"]
    log = log_file.read_text()
    assert (
        "sd_depth: loaded StableDiffusionDepth2ImgPipeline on cpu (float16, attention: sdpa, fused qkv" in log
    )
    assert "channels_last: True" in log
    assert "sync_free: True, cuda_graphs: up to 8 (no CUDA here: plain calls stand in for graphs)" in log
