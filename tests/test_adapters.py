"""Adapters: LoRAs checked and stored by `make adapter`, served per request on a warm model through a real
tritonserver, fused into its weights and undone exactly."""

import base64
import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import brought
import diffusers
import numpy as np
import pytest
import torch
from helpers import ROOT, post, sample_payload, wait_until_computing, with_parameters
from PIL import Image

from bench import serving
from deploy.local.tritonserver import TritonServer, free_port
from deploy.ops import stats
from sdmme import model_folder
from sdmme.adapters import __main__ as make_adapter
from sdmme.adapters import files
from sdmme.adapters.fusing import Fuser
from sdmme.settings import Settings
from sdmme.spec import MODELS, InvalidInput
from sdmme.tools import repository, tiny

STYLE = {"seed": 3, "height": 64, "width": 64, "num_inference_steps": 3, "output_format": "png"}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """What users bring: a tiny sd_base as a diffusers folder, LoRAs for it in diffusers and kohya format
    (the kohya one also adapts the text encoder), and one for another architecture."""
    root = tmp_path_factory.mktemp("loras")
    tiny.sd_base().save_pretrained(root / "base")
    brought.write_lora(tiny.sd_base(), root / "ink")
    brought.write_lora(tiny.sd_base(), root / "sun", seed=11)
    brought.write_text_encoder_lora(tiny.sd_base(), root / "kohya_te.safetensors")
    brought.write_lora(tiny.sd_upscale(), root / "upscaler")
    return root


@pytest.fixture(scope="module")
def served(loras, tmp_path_factory):
    """`base`: the tiny sd_base as `make model` writes it (fp16), at most two adapters loaded; its adapters
    ink, sun and kohya_te; `fused`: the same model with ink fused by `make model LORA=`; `plain`: adapters
    off. One tritonserver for the module."""
    repo = tmp_path_factory.mktemp("adapters") / "model_repository"
    model_folder.write(repo / "sd_base", "sd_base")
    base = str(loras / "base")
    repository.add(repo, "base", "sd_base", base)
    repository.add(repo, "fused", "sd_base", base, lora=str(loras / "ink" / "lora.safetensors"))
    repository.add(repo, "plain", "sd_base", base)
    repository.add(repo, "remote", "sd_base", base)
    shutil.rmtree(repo / "sd_base")  # only the template of make model
    with_parameters(repo / "base", {"max_adapters": "2"})
    with_parameters(repo / "plain", {"adapters": "none"})
    with_parameters(repo / "remote", {"adapters": "s3://nowhere/adapters/remote/"})
    make_adapter.add(repo, "base", "ink", str(loras / "ink" / "lora.safetensors"))
    make_adapter.add(repo, "base", "sun", str(loras / "sun" / "lora.safetensors"))
    make_adapter.add(repo, "base", "kohya_te", str(loras / "kohya_te.safetensors"))
    log_file = repo.parent / "tritonserver.log"
    unreachable = {  # remote's S3 store: a port nothing listens on, one attempt
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    with TritonServer(repo, log_file=log_file, env=unreachable) as server:
        server.repository, server.log = repo, log_file
        yield server


def generate(server, model="base", **gen_args):
    """(status, image as an array) through the server, the AWS sample's body."""
    body = sample_payload(prompt="a lighthouse", gen_args=json.dumps({**STYLE, **gen_args}))
    status, answer = post(server, f"/v2/models/{model}/infer", body)
    if status != 200:
        return status, answer.get("error", "")
    data = base64.b64decode(answer["outputs"][0]["data"][0])
    return status, np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def image(server, model="base", **gen_args):
    status, result = generate(server, model, **gen_args)
    assert status == 200, result
    return result


def test_a_request_without_adapters_is_served_as_the_model_alone(served):
    alone = image(served, "plain")
    assert np.array_equal(image(served), alone)  # before any adapter
    assert not np.array_equal(image(served, lora="ink"), alone)
    assert np.array_equal(image(served), alone)  # after one: its weights are copied back, not computed
    assert np.array_equal(image(served, lora="ink", lora_scale=0.0), alone)
    assert np.array_equal(
        image(served, lora=[{"name": "ink", "scale": 0}, {"name": "sun", "scale": 0}]), alone
    )


def test_an_adapter_gives_the_image_of_the_same_lora_fused_by_make_model(served):
    adapted, fused = image(served, lora="ink"), image(served, "fused")
    # make model rounds base + LoRA to fp16 once on disk; the adapter adds the LoRA in fp32 to the fp16
    # weights on this CPU (fp32 serving): the same math, rounded differently.
    assert np.abs(adapted - fused).max() <= 1, np.abs(adapted - fused).max()
    assert not np.array_equal(adapted, image(served))


def test_stacked_adapters_differ_from_each_alone_and_scale_counts(served):
    ink, sun = image(served, lora="ink"), image(served, lora="sun")
    both = image(served, lora=["ink", "sun"])
    assert not np.array_equal(both, ink) and not np.array_equal(both, sun)
    half = image(served, lora="ink", lora_scale=0.5)
    assert not np.array_equal(half, ink) and not np.array_equal(half, image(served))
    assert np.array_equal(image(served, lora=[{"name": "ink", "scale": 0.5}]), half)  # both forms alike


def test_a_kohya_lora_with_text_encoder_layers_is_served(served, loras):
    record = json.loads((served.repository / "base" / "adapters" / "kohya_te.json").read_text())
    assert record["format"] == "kohya" and record["layers"]["text_encoder"] > 0 and record["rank"] == 2
    assert not np.array_equal(image(served, lora="kohya_te"), image(served))


def test_two_adapters_in_one_execute_run_as_two_pipeline_calls(served):
    """Two requests that queue behind a running call share the next execute(); their adapters differ, so
    they run as two pipeline calls, each with its own adapter."""
    alone = {name: image(served, lora=name) for name in ("ink", "sun")}
    # Triton's batcher hands a queued request on alone when the next one comes more than
    # max_queue_delay (5 ms) later, which a loaded CI machine sometimes makes: try a few times.
    assert any(shared_execute(served, alone) for _ in range(5)), "never in one execute() in 5 tries"


def shared_execute(served, alone) -> bool:
    """Queue an ink and a sun request behind a long call; whether they shared one execute(), each image
    is its adapter's own. Returns whether two of the three shared one."""
    line = "base: 1 request(s), 1 image(s) in one call"
    before = serving.model_stats(served.url, "base")
    calls_before = served.log.read_text().count(line)
    blocker = {**STYLE, "num_inference_steps": 60, "height": 256, "width": 256}
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(generate, served, **blocker)
        wait_until_computing(served.repository / "base" / "1" / "model.py")  # it waits for no company
        queued = [pool.submit(generate, served, lora=name) for name in ("ink", "sun")]
        results = [future.result() for future in queued]
        assert running.result()[0] == 200
    for (status, result), name in zip(results, ("ink", "sun")):
        assert status == 200 and np.array_equal(result, alone[name]), name
    after = serving.counted(served.url, "base", before, 3)
    executions = after["execution_count"] - before["execution_count"]
    assert executions in (1, 2, 3), executions
    assert served.log.read_text().count(line) - calls_before == 3  # one call each, however grouped
    return executions < 3


def test_the_least_recently_used_adapter_is_unloaded_and_loads_again(served):
    first = image(served, lora="ink")
    image(served, lora="sun")
    image(served, lora="kohya_te")  # a third with two allowed: ink goes
    assert "base: adapter ink unloaded (least recently used; 2 stay loaded)" in served.log.read_text()
    loads = served.log.read_text().count("base: adapter ink loaded from")
    assert np.array_equal(image(served, lora="ink"), first)
    assert served.log.read_text().count("base: adapter ink loaded from") == loads + 1


def test_an_adapter_added_while_the_model_serves_is_served(served, loras):
    status, message = generate(served, lora="late")
    assert status == 400 and "unknown adapter late for base" in message
    assert "its adapters are the .safetensors files there" in message
    make_adapter.add(served.repository, "base", "late", str(loras / "sun" / "lora.safetensors"))
    assert np.array_equal(image(served, lora="late"), image(served, lora="sun"))


def test_adapter_uses_are_counted_by_source_and_logged_per_request(served, loras):
    """A new adapter's first call loads it from the store's disk, the next finds it on the device: the
    metric counts both by source, and each request's log line says where its adapter came from."""
    make_adapter.add(served.repository, "base", "counted", str(loras / "ink" / "lora.safetensors"))
    port = f"127.0.0.1:{served.metrics_port}"
    before = stats.by_label(stats.scrape(port), "sdmme_adapter_uses_total", "source", model="base")
    for request_id in ("counted-1", "counted-2"):
        body = sample_payload(
            prompt="a lighthouse", gen_args=json.dumps({**STYLE, "lora": "counted", "lora_scale": 0.5})
        )
        assert post(served, "/v2/models/base/infer", {"id": request_id, **body})[0] == 200
    after = stats.by_label(stats.scrape(port), "sdmme_adapter_uses_total", "source", model="base")
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert changed == {"disk": 1, "device": 1}
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if '"id": "counted-' in line]
    assert [(line["id"], line["adapters"], line["adapters_from"]) for line in lines] == [
        ("counted-1", ["counted@0.5"], "disk"),
        ("counted-2", ["counted@0.5"], "device"),
    ]


def bad_adapter(served, name, tensors=None, record=None):
    """An adapter put in the store by hand, bypassing make adapter's checks."""
    folder = served.repository / "base" / "adapters"
    good = folder / "ink.safetensors"
    shutil.copy2(good, folder / f"{name}.safetensors")
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, folder / f"{name}.safetensors")
    record = record or {"bytes": (folder / f"{name}.safetensors").stat().st_size}
    record.setdefault("sha256", files.sha256(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(record))
    return folder / f"{name}.safetensors"


def test_bad_adapters_fail_alone_with_a_400_naming_them(served, loras):
    from safetensors.torch import load_file

    folder = served.repository / "base" / "adapters"
    truncated = bad_adapter(served, "truncated")
    truncated.write_bytes(truncated.read_bytes()[:-100])
    corrupt = bad_adapter(served, "corrupt")
    data = bytearray(corrupt.read_bytes())
    data[-10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    oversized = bad_adapter(served, "oversized", record={"bytes": files.MAX_BYTES + 1, "sha256": "0" * 64})
    with open(oversized, "r+b") as f:  # sparse: no disk spent
        f.truncate(files.MAX_BYTES + 1)
    ink = load_file(folder / "ink.safetensors")
    bad_adapter(served, "elsewhere", {k.replace("unet.", "unet.extra_", 1): v for k, v in ink.items()})
    wide = {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in ink.items()}
    bad_adapter(served, "wider", wide)
    bad_adapter(served, "foreign", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    (folder / "malformed.json").write_text("{not json")
    (folder / "malformed.safetensors").write_bytes(b"\x00" * 100)
    cases = {
        "truncated": "is not the file its record describes",
        "corrupt": "is not the file its record describes",
        "oversized": "bytes; at most 536,870,912 (512 MiB)",
        "elsewhere": "which this model does not have: a LoRA for another model?",
        "wider": "does not fit unet.",
        "foreign": "which is not in this project's adapter format",
        "nope": "unknown adapter nope for base",
        "../ink": "is not an adapter name",
        "s3://bucket/ink": "is not an adapter name",
    }
    for name, message in cases.items():
        status, error = generate(served, lora=name)
        assert status == 400 and message in error and name.split("/")[-1] in error, (name, error)
        assert np.array_equal(image(served, lora="ink"), image(served, lora="ink"))  # serving goes on
    status, error = generate(served, lora="malformed")
    assert status == 400 and "malformed" in error, error
    good = image(served, lora="ink")
    status, error = generate(served, lora=["ink", "nope"])
    assert status == 400 and "unknown adapter nope" in error
    assert np.array_equal(image(served, lora="ink"), good)


def test_a_store_that_does_not_answer_fails_only_its_requests_with_a_503(served):
    status, error = generate(served, "remote", lora="ink")
    assert status == 503 and "the adapter store s3://nowhere/adapters/remote/ did not answer" in error, error
    assert generate(served, "remote")[0] == 200 and generate(served, lora="ink")[0] == 200


def test_a_model_with_adapters_off_says_so(served):
    status, error = generate(served, "plain", lora="ink")
    assert status == 400 and "serves no adapters" in error


def test_make_adapter_checks_before_writing(loras, tmp_path):
    repo = tmp_path / "model_repository"
    model_folder.write(repo / "sd_base", "sd_base")
    repository.add(repo, "mine", "sd_base", str(loras / "base"))
    (tmp_path / "lora.ckpt").write_bytes(b"never read")
    for name, source, message in [
        ("x", loras / "upscaler" / "lora.safetensors", "does not fit this model"),
        ("x", tmp_path / "lora.ckpt", "pickled files are never loaded"),
        ("x", tmp_path / "missing.safetensors", "no such file"),
        ("../x", loras / "ink" / "lora.safetensors", "is not an adapter name"),
    ]:
        with pytest.raises(InvalidInput, match=message):  # AdapterError, or the name's InvalidInput
            make_adapter.add(repo, "mine", name, str(source))
        assert not (repo / "mine" / "adapters").exists() or not list((repo / "mine" / "adapters").iterdir())
    with pytest.raises(files.AdapterError, match="no model nobody"):
        make_adapter.add(repo, "nobody", "x", str(loras / "ink" / "lora.safetensors"))
    make = ["make", "--no-print-directory", "adapter", "NAME=ink", "MODEL=mine"]
    ink = f"FILE={loras / 'ink' / 'lora.safetensors'}"
    result = subprocess.run([*make, ink, f"REPOSITORY={repo}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads((repo / "mine" / "adapters" / "ink.json").read_text())
    assert record["sha256"] == files.sha256(repo / "mine" / "adapters" / "ink.safetensors")
    assert record["layers"] == {"unet": 32, "text_encoder": 0} and record["format"] == "diffusers"
    again = subprocess.run([*make, ink, f"REPOSITORY={repo}"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "exists; pass FORCE=1" in again.stderr


def test_kohya_and_diffusers_files_of_one_lora_are_stored_alike(loras, tmp_path):
    architecture = files.empty_architecture(tiny.sd_base().unet.config, tiny.sd_base().text_encoder.config)
    canonical, info = files.convert(loras / "ink" / "lora.safetensors", architecture)
    from safetensors.torch import save_file

    save_file(canonical, tmp_path / "ink.safetensors")
    kohya = brought.write_kohya(tmp_path / "ink.safetensors", tmp_path / "ink_kohya.safetensors")
    again, kohya_info = files.convert(
        kohya, files.empty_architecture(tiny.sd_base().unet.config, tiny.sd_base().text_encoder.config)
    )
    assert info["format"] == "diffusers" and kohya_info["format"] == "kohya"
    assert canonical.keys() == again.keys()
    assert all(torch.allclose(canonical[k], again[k]) for k in canonical)


@pytest.mark.parametrize("lora", ["ink/lora.safetensors", "kohya_te.safetensors"])
def test_fusing_matches_diffusers_own_fuse_lora(loras, lora):
    """The weights an adapter is served with are those of diffusers' load_lora_weights + fuse_lora, and
    unfusing gives back exactly the loaded weights."""
    reference = diffusers.StableDiffusionPipeline.from_pretrained(loras / "base")
    reference.load_lora_weights(str(loras / lora), adapter_name="x")
    reference.fuse_lora(lora_scale=0.7, adapter_names=["x"])
    reference.unload_lora_weights()
    mine = diffusers.StableDiffusionPipeline.from_pretrained(loras / "base")
    modules = {"unet": mine.unet, "text_encoder": mine.text_encoder}
    loaded = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in modules.items()}
    architecture = files.empty_architecture(mine.unet.config, mine.text_encoder.config)
    tensors, _ = files.convert(loras / lora, architecture)
    fuser = Fuser(modules)
    fuser.apply([("x", files.layers_of(tensors, modules, InvalidInput), 0.7)])
    for component, module in modules.items():
        ours, theirs = module.state_dict(), getattr(reference, component).state_dict()
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours), component
    fuser.apply([])
    for component, module in modules.items():
        assert all(torch.equal(v, loaded[component][k]) for k, v in module.state_dict().items())


def test_the_lora_gen_args_are_declared_once():
    spec = MODELS["sd_base"]
    assert spec.validate_args({"lora": "ink"})["lora"] == (("ink", 1.0),)
    assert spec.validate_args({"lora": "ink", "lora_scale": 0.5})["lora"] == (("ink", 0.5),)
    assert spec.validate_args({"lora": ["ink", {"name": "sun", "scale": 2}]})["lora"] == (
        ("ink", 1.0),
        ("sun", 2.0),
    )
    assert spec.validate_args({"lora": []})["lora"] is None
    for given, message in [
        ({"lora": "a/b"}, "not an adapter name"),
        ({"lora": "x" * 129}, "not an adapter name"),
        ({"lora": ["a", "b", "c", "d"]}, "at most 3 can be stacked"),
        ({"lora": ["a", "a"]}, "names a more than once"),
        ({"lora": [{"name": "a", "scale": 2.5}]}, "lora\\[0\\].scale=2.5 is out of range"),
        ({"lora": [{"name": "a", "weight": 1}]}, 'must be an adapter name or {"name"'),
        ({"lora": ["a"], "lora_scale": 0.5}, "with a list, give each its"),
        ({"lora_scale": 0.5}, "lora_scale is the strength of the one adapter"),
        ({"lora": 3}, "must be a string or a list"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            spec.validate_args(given)


@pytest.mark.slow
def test_adapters_swap_on_a_compiled_unet_without_recompiling(served):
    """compile (inductor, on CPU here) with adapters: fused in place, so a swap changes weights the compiled
    graph reads and recompiles nothing; the images are the eager ones up to rounding."""
    from torch._dynamo.utils import counters

    from sdmme import loader
    from sdmme.serving import batching

    folder = served.repository / "base"
    runners = {}
    for mode in ("none", "default"):
        settings = Settings(compile=mode)
        runners[mode] = loader.load(MODELS["sd_base"], folder, torch.device("cpu"), settings).runner

    def run(mode, lora):
        job = batching.warmup_job(MODELS["sd_base"], 64, steps=2)
        job.args["lora"] = lora
        [[result]] = batching.run(runners[mode], [job])
        return np.asarray(result, dtype=np.int16)

    run("default", None)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter counts this compilation
    order = (None, (("ink", 1.0),), (("sun", 0.5),), (("ink", 1.0), ("sun", 0.5)))
    compiled = {lora: run("default", lora) for lora in order}
    assert np.array_equal(run("default", None), compiled[None])  # and back to the model alone
    assert counters["stats"]["unique_graphs"] == graphs, "a swap recompiled the UNet"
    for lora, result in compiled.items():
        assert np.abs(result - run("none", lora)).max() <= 2, lora
    assert not np.array_equal(compiled[(("ink", 1.0),)], compiled[None])


@pytest.fixture()
def s3_store(aws, served, tmp_path):
    """An S3 store on moto holding base's adapters as make upload puts them, with a cache of its own."""
    from helpers import remove_bucket

    from deploy.aws import upload
    from sdmme.adapters.store import S3Store

    client = upload.s3_client()
    client.create_bucket(Bucket="stores")
    upload.upload(client, [], "stores", "p", adapters=upload.adapter_files(served.repository))
    store = S3Store("s3://stores/p/adapters/base/", tmp_path / "cache", 10**9, client=client)
    yield store
    remove_bucket(client, "stores")


def fetched(caplog, name) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith(f"adapter {name}: fetched from"))


def test_concurrent_first_uses_of_a_cold_adapter_fetch_it_once(s3_store, caplog):
    record = s3_store.record("ink")
    with caplog.at_level("INFO", logger="sdmme"), ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: s3_store.path("ink", record), range(4)))
    assert len(set(paths)) == 1 and files.sha256(paths[0]) == record["sha256"]
    assert fetched(caplog, "ink") == 1


def test_the_disk_cache_is_bounded_and_refetches(s3_store, caplog):
    ink, sun = s3_store.record("ink"), s3_store.record("sun")
    s3_store.cache_bytes = ink["bytes"] + sun["bytes"] // 2  # room for one of them
    with caplog.at_level("INFO", logger="sdmme"):
        first = s3_store.path("ink", ink)
        s3_store.path("sun", sun)
        assert not first.exists()  # the least recently used went
        assert s3_store.path("ink", ink).exists()
    assert fetched(caplog, "ink") == 2 and "(least recently used) to stay under" in caplog.text


def test_a_bad_or_missing_file_in_s3_is_refused_and_never_cached(s3_store):
    client, key = s3_store.s3, s3_store.key("ink.safetensors")
    good = client.get_object(Bucket="stores", Key=key)["Body"].read()
    client.put_object(Bucket="stores", Key=key, Body=good[:-50])
    with pytest.raises(
        files.AdapterError, match="adapter ink in s3://stores/p/adapters/base/ is not the file"
    ):
        s3_store.path("ink", s3_store.record("ink"))
    assert not list(s3_store.cache.glob("*.safetensors*"))
    client.delete_object(Bucket="stores", Key=key)
    with pytest.raises(files.AdapterError, match="has a record but no ink.safetensors"):
        s3_store.path("ink", s3_store.record("ink"))
    assert s3_store.record("nope") is None


def test_a_store_that_does_not_answer_fails_its_requests_retryably(tmp_path):
    import boto3
    from botocore.config import Config

    from deploy.local.tritonserver import free_port
    from sdmme.adapters.store import S3Store, StoreError

    closed = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
    )
    store = S3Store("s3://b/adapters/m/", tmp_path, 10**6, client=closed)
    with pytest.raises(StoreError, match="the adapter store s3://b/adapters/m/ did not answer for ink.json"):
        store.record("ink")


def test_adapters_refuse_fused_qkv_however_the_settings_were_made(served):
    from sdmme.adapters import serving

    for made in (
        lambda: Settings(fuse_qkv=True),
        lambda: Settings("CPU").replace(fuse_qkv=True),
        lambda: Settings.from_parameters({"fuse_qkv": "true"}, "CPU"),
    ):
        with pytest.raises(ValueError, match="set adapters to none with it"):
            made()
    settings = Settings(fuse_qkv=True, adapters="none")
    assert serving.for_model(served.repository / "base", settings, None) is None


def test_an_adapter_store_is_a_folder_or_s3_nothing_else(tmp_path):
    from sdmme.adapters.store import LocalStore, S3Store, open_store

    assert isinstance(open_store(str(tmp_path), tmp_path, 1), LocalStore)
    assert open_store("s3://b/p/q/", tmp_path, 1).location == "s3://b/p/q/"
    assert isinstance(open_store("s3://b", tmp_path, 1), S3Store)
    for bad, message in (("s3:///p/", "an S3 store is s3://bucket/prefix/"), ("https://x/y", "nothing else")):
        with pytest.raises(ValueError, match=message):
            open_store(bad, tmp_path, 1)
