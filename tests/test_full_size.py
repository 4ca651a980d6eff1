"""The four real architectures at full size (random weights from the published configs), through the
runtime on CPU: `make test-full` runs only these (about 2 minutes, 6 GB of memory and 2.6 GB of disk at a
time on 2 cores); `make test` runs them too.

Saved as fp16 safetensors and loaded by the same code as real weights, in fp32 on CPU, one or two
denoising steps at the smallest valid size. The sizes on disk must match the published weights': that
checks the configs in sdmme/tools/configs/ against the real models.
"""

import gc
import shutil

import pytest
import torch
from helpers import load_pipeline, small_job

from sdmme.pipeline.runner import Runner
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS
from sdmme.tools import weights

pytestmark = pytest.mark.full

# Published fp16 safetensors sizes in GB (shared/FACTS.md; SD 2 UNets share one architecture).
PUBLISHED_GB = {
    "sd_base": {"unet": 1.73},
    "sd_depth": {"unet": 1.73, "depth_estimator": 0.25},
    "sd_inpaint": {"unet": 1.73},
    "sd_upscale": {"unet": 0.95},
}


def size_gb(folder) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


@pytest.mark.parametrize("model", sorted(MODELS))
def test_full_size_model_runs_through_the_runtime(model, tmp_path):
    folder = weights.fill(tmp_path, model, "full")
    for component, published in PUBLISHED_GB[model].items():
        assert size_gb(folder / component) == pytest.approx(published, rel=0.03), component
    pipeline = load_pipeline(MODELS[model], folder, torch.device("cpu"), Settings("CPU"))
    assert pipeline.unet.dtype == torch.float32
    assert pipeline.unet.config.use_linear_projection and pipeline.text_encoder.config.hidden_size == 1024
    if model == "sd_depth":
        assert pipeline.depth_estimator.config.is_hybrid
    if model == "sd_upscale":
        assert len(pipeline.unet.down_blocks) == 4 and pipeline.vae.config.scaling_factor == 0.08333
    runner = Runner(pipeline)
    assert runner.min_image_side == (8 if model == "sd_upscale" else 64)  # one latent cell, deepest level
    [[image]] = batching.run(runner, [small_job(model, steps=2)])
    assert image.size == ((128, 128) if model == "sd_upscale" else (64, 64))
    del pipeline, runner
    gc.collect()
    shutil.rmtree(folder)  # 2.6 GB each; pytest keeps its temporary folders
