"""CUDA graphs of the eager UNet (sdmme.pipeline.cuda_graphs), their bookkeeping driven on CPU: there the
capture is replaced by plain calls into the same static buffers, so signatures, warm-up, LRU, invalidation and
every fallback run as on a GPU; only the speed and the graphs' own output need one (`make bench-gpu`
compares the images with and without graphs there).
"""

import dataclasses
import logging

import pytest
import torch
from helpers import load_pipeline

from bench.loras import write_adapter
from sdmme import loader
from sdmme.pipeline import cuda_graphs
from sdmme.pipeline.runner import Runner
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS
from sdmme.tools import weights

CPU = torch.device("cpu")
GRAPHS = Settings("CPU", cuda_graphs=True, adapters="none")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return {model: weights.fill(root, model, "tiny") for model in MODELS}


def request(model: str, side: int = 64, steps: int = 4, seed: int = 3) -> batching.Job:
    job = batching.warmup_job(MODELS[model], 32 if model == "sd_upscale" else side, steps, seed)
    job.prompt = "a lighthouse at dawn"
    return job


def image(runner, job):
    [[result]] = batching.run(runner, [job])
    return result


@pytest.mark.parametrize("model", sorted(MODELS))
def test_graphs_replay_every_model_with_the_eager_image(folders, model, caplog):
    eager = Runner(load_pipeline(MODELS[model], folders[model], CPU, Settings("CPU")))
    with caplog.at_level(logging.INFO, logger="sdmme"):
        pipeline = load_pipeline(MODELS[model], folders[model], CPU, GRAPHS)
    assert "cuda_graphs: up to 8 (no CUDA here: plain calls stand in for graphs)" in caplog.text
    graphs = cuda_graphs.of(pipeline.unet)
    assert graphs is not None and graphs.unet is pipeline.unet
    runner = Runner(pipeline, sync_free=True)
    job = request(model)
    assert image(runner, job).tobytes() == image(eager, job).tobytes()
    steps = graphs.counts["eager"] + graphs.counts["replayed"]
    # the first call of the signature warms up, the second is captured and replayed, the rest replay
    assert graphs.counts == {"eager": 1, "captured": 1, "replayed": steps - 1}
    assert len(graphs.graphs) == 1
    image(runner, job)
    assert graphs.counts["captured"] == 1 and graphs.counts["eager"] == 1  # the same graph again


def test_one_graph_per_signature_the_least_recently_used_dropped(folders, caplog):
    settings = GRAPHS.replace(max_cuda_graphs=2)
    pipeline = load_pipeline(MODELS["sd_base"], folders["sd_base"], CPU, settings)
    graphs = cuda_graphs.of(pipeline.unet)
    runner = Runner(pipeline, sync_free=True)
    with caplog.at_level(logging.INFO, logger="sdmme"):
        for side in (64, 128, 64, 96):  # 64 used again before 96 comes: 128 is the one dropped
            image(runner, request("sd_base", side))
    sizes = [dict(key)["sample"][0][2] for key in graphs.graphs]
    assert sizes == [8, 12]  # latents of 64 and 96 pixels, the most recent last
    assert graphs.counts["dropped"] == 1 and graphs.counts["captured"] == 3
    assert "CUDA graph for batch 2, latents 16x16, float32 dropped (at most 2 kept)" in caplog.text
    # a batch of two requests is another signature (batch 4 with guidance)
    batching.run(
        runner, [request("sd_base", 64, seed=1), dataclasses.replace(request("sd_base", 64), index=1)]
    )
    assert [dict(key)["sample"][0][0] for key in graphs.graphs] == [2, 4]


def test_weights_moved_to_new_memory_drop_the_graphs(folders, caplog):
    pipeline = load_pipeline(MODELS["sd_base"], folders["sd_base"], CPU, GRAPHS)
    graphs = cuda_graphs.of(pipeline.unet)
    runner = Runner(pipeline, sync_free=True)
    job = request("sd_base")
    image(runner, job)
    with torch.no_grad():
        pipeline.unet.conv_in.weight.mul_(1.0)  # in place, as adapters are fused: the graphs stay
    image(runner, job)
    assert graphs.counts["dropped"] == 0 and graphs.counts["captured"] == 1
    pipeline.unet.conv_in.weight.data = pipeline.unet.conv_in.weight.data.clone()  # new memory
    with caplog.at_level(logging.INFO, logger="sdmme"):
        image(runner, job)
    assert "UNet weights moved to new memory or modules replaced: 1 CUDA graph(s) dropped" in caplog.text
    assert graphs.counts["dropped"] == 1 and graphs.counts["captured"] == 2  # warmed up and captured again
    block = pipeline.unet.mid_block.attentions[0].transformer_blocks[0]
    block.ff = torch.nn.Sequential(block.ff, torch.nn.Identity())  # a module added: new structure
    image(runner, job)
    assert graphs.counts["dropped"] == 2 and graphs.counts["captured"] == 3


def test_adapters_fused_in_place_keep_the_graphs(folders, tmp_path):
    folder = folders["sd_base"]
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(folder, store / "ink.safetensors", 2, 1)
    runner = loader.load(
        MODELS["sd_base"], folder.parent.parent, CPU, GRAPHS.replace(adapters=str(store))
    ).runner
    eager = loader.load(
        MODELS["sd_base"], folder.parent.parent, CPU, Settings("CPU", adapters=str(store))
    ).runner
    graphs = cuda_graphs.of(runner.pipeline.unet)
    job = request("sd_base")
    inked = dataclasses.replace(job, args={**job.args, "lora": (("ink", 1.0),)})
    base = image(runner, job)
    with_ink = image(runner, inked)
    assert with_ink.tobytes() == image(eager, inked).tobytes() and with_ink.tobytes() != base.tobytes()
    assert image(runner, job).tobytes() == base.tobytes()
    assert graphs.counts["dropped"] == 0 and graphs.counts["captured"] == 1


def test_a_capture_that_fails_leaves_that_signature_eager(folders, caplog):
    pipeline = load_pipeline(MODELS["sd_base"], folders["sd_base"], CPU, Settings("CPU"))
    expected = image(Runner(pipeline), request("sd_base"))

    def failing(forward, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = cuda_graphs.GraphedUNet(pipeline.unet, 8, capture=failing).install()
    calls = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    runner = Runner(pipeline, sync_free=True)
    with caplog.at_level(logging.INFO, logger="sdmme"):
        assert image(runner, request("sd_base")).tobytes() == expected.tobytes()
        image(runner, request("sd_base"))
    assert graphs.counts == {"eager": len(calls)} and not graphs.graphs
    assert caplog.text.count("could not be captured, it runs eagerly: operation not permitted") == 1


def test_calls_a_graph_cannot_take_run_eagerly(folders):
    pipeline = load_pipeline(MODELS["sd_base"], folders["sd_base"], CPU, GRAPHS)
    graphs = cuda_graphs.of(pipeline.unet)
    sample = torch.zeros(1, 4, 8, 8)
    context = torch.zeros(1, 77, pipeline.unet.config.cross_attention_dim)
    with torch.inference_mode():
        for _ in range(3):
            pipeline.unet(sample, 10, context)  # a timestep that is not a tensor
            pipeline.unet(sample, torch.tensor(10), context, cross_attention_kwargs={"scale": 0.5})
        out = pipeline.unet(sample, torch.tensor(10), context)  # warm-up; the next is captured
        assert out.sample.shape == sample.shape  # a UNet2DConditionOutput, as return_dict asks
    assert graphs.counts == {"eager": 7} and not graphs.graphs


def test_cuda_graphs_cannot_go_with_compile():
    with pytest.raises(ValueError, match="cuda_graphs captures the eager UNet; compile makes its own"):
        Settings.from_parameters({"cuda_graphs": "true", "compile": "default"}, "CPU")
    parsed = Settings.from_parameters({"cuda_graphs": "true", "max_cuda_graphs": "3"}, "CPU")
    assert parsed.cuda_graphs and parsed.max_cuda_graphs == 3
