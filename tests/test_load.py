"""Time and load against a real tritonserver: answers go out per group, a request that cannot finish in
its budget is refused up front, a full queue answers at once, a caller who gives up stops the work,
mixed traffic from many clients all succeeds, and memory stays bounded."""

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import b64, picture, post, sample_payload, wait_for, wait_until_computing, with_parameters

from bench import serving
from deploy.local.tritonserver import TritonServer
from deploy.ops import stats


def txt2img(steps: int, size: int, seed: int = 0) -> dict:
    gen_args = {"num_inference_steps": steps, "height": size, "width": size, "seed": seed}
    return sample_payload(prompt="a lighthouse", gen_args=json.dumps(gen_args))


def timed_post(server, model: str, body: dict):
    start = time.monotonic()
    status, answer = post(server, f"/v2/models/{model}/infer", body)
    return status, answer, start, time.monotonic()


def test_each_group_is_answered_as_soon_as_it_is_done(server):
    """Two requests that queue behind a running call share the next execute(); the quick one's answer
    goes out when its group is done, not after the slow group."""
    before = serving.model_stats(server.url)
    metrics = f"127.0.0.1:{server.metrics_port}"

    def pending() -> float:  # requests Triton holds for sd_base, not yet handed to execute()
        return stats.total(stats.scrape(metrics), "nv_inference_pending_request_count", model="sd_base")

    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(timed_post, server, "sd_base", txt2img(12, 256))
        wait_until_computing(server.repository / "sd_base" / "1" / "model.py")
        quick = pool.submit(timed_post, server, "sd_base", txt2img(1, 64))
        wait_for(lambda: pending() == 1, 30, "the quick request queued behind the running call")
        slow = pool.submit(timed_post, server, "sd_base", txt2img(30, 256))
        blocker, quick, slow = running.result(), quick.result(), slow.result()
    assert [blocker[0], quick[0], slow[0]] == [200, 200, 200]
    assert quick[2] < blocker[3] and slow[2] < blocker[3], "both queued behind the running call"
    after = serving.counted(server.url, "sd_base", before, 3)
    assert after["execution_count"] - before["execution_count"] == 2  # the blocker, then quick and slow
    assert quick[3] < slow[3] - 0.2, (quick[3], slow[3])


@pytest.fixture(scope="module")
def limited(tiny_repository, tmp_path_factory):
    """sd_base with a 10 s time budget and a queue of one; sd_depth as shipped."""
    repository = tmp_path_factory.mktemp("limited")
    shutil.copytree(tiny_repository / "sd_base", repository / "sd_base")
    shutil.copytree(tiny_repository / "sd_depth", repository / "sd_depth")
    config = repository / "sd_base" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_size: 32", "max_queue_size: 1"))
    with_parameters(repository / "sd_base", {"time_budget_s": "10"})
    log_file = repository / "tritonserver.log"
    with TritonServer(repository, log_file=log_file) as server:
        server.log, server.repository = log_file, repository
        yield server


def test_a_request_that_cannot_finish_in_its_budget_is_refused_up_front(limited):
    status, body = post(limited, "/v2/models/sd_base/infer", txt2img(150, 1024))
    assert status == 400 and "would take about" in body["error"] and "must finish within 10s" in body["error"]
    assert "lower num_inference_steps" in body["error"]
    assert post(limited, "/v2/models/sd_base/infer", txt2img(1, 64))[0] == 200
    assert "sd_base: measured" in limited.log.read_text()


def test_a_full_queue_answers_at_once(limited):
    with ThreadPoolExecutor(6) as pool:
        running = pool.submit(timed_post, limited, "sd_base", txt2img(20, 256))
        wait_until_computing(limited.repository / "sd_base" / "1" / "model.py")
        queued = [pool.submit(timed_post, limited, "sd_base", txt2img(1, 64, seed=i)) for i in range(5)]
        results = [running.result()] + [future.result() for future in queued]
    blocker, others = results[0], results[1:]
    refused = [r for r in others if r[0] != 200]
    assert blocker[0] == 200 and refused, results
    for _, body, _, end in refused:
        assert "Exceeds maximum queue size" in body["error"], body
        assert end < blocker[3]  # answered while the running call was still busy
    assert any(r[0] == 200 for r in others)


def test_a_caller_who_gives_up_stops_the_work(server):
    """gRPC cancellation reaches the model, which stops the call between denoising steps."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    values = {
        "prompt": b"a",
        "gen_args": json.dumps({"num_inference_steps": 150, "height": 512, "width": 512}),
    }
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(
            np.array([[value.encode() if isinstance(value, str) else value]], np.object_)
        )
        inputs.append(tensor)
    answers = []
    done = threading.Event()
    context = client.async_infer(
        "sd_base", inputs, callback=lambda result, error: (answers.append(error), done.set())
    )
    wait_until_computing(server.repository / "sd_base" / "1" / "model.py")
    context.cancel()
    assert done.wait(30)
    assert "cancel" in str(answers[0]).lower(), answers
    start = time.monotonic()
    assert post(server, "/v2/models/sd_base/infer", txt2img(1, 64))[0] == 200
    waited = time.monotonic() - start
    log = server.log_file.read_text()
    assert "sd_base: stopped a call of 1 request(s): every caller gave up" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    [gave_up] = [line for line in lines if line["error"] == "the caller gave up; the call was stopped"]
    assert gave_up["outcome"] == "cancelled" and gave_up["model"] == "sd_base"  # its request log line
    assert waited < 10, waited  # the 150-step call (tens of seconds here) did not run to its end


def test_mixed_traffic_from_many_clients(server):
    """200 mixed requests (all four models, varied arguments) from 16 concurrent clients."""
    report = serving.mixed(server, count=200, clients=16)
    assert report["failures"] == [] and report["ok"] == 200, report["failures"][:3]
    assert report["p50"] <= report["p99"]
    print(f"mixed: p50 {report['p50']:.2f}s, p99 {report['p99']:.2f}s, {report['seconds']:.1f}s in all")


def stub_rss(model_file: str) -> int:
    """Resident memory (bytes) of the stub process serving `model_file`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            if b"triton_python_backend_stub" in command[0] and model_file.encode() in command[1]:
                with open(f"/proc/{pid}/statm") as f:
                    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    raise LookupError(f"no stub process for {model_file}")


def test_memory_stays_bounded_over_500_requests(server, tiny_repository):
    model_file = str(tiny_repository / "sd_upscale" / "1" / "model.py")
    body = sample_payload(
        prompt="a", image=b64(picture(32, 32)), gen_args=json.dumps({"num_inference_steps": 1})
    )
    for _ in range(20):  # warm: allocator pools and caches settle
        post(server, "/v2/models/sd_upscale/infer", body)
    before = stub_rss(model_file)
    for i in range(500):
        status, answer = post(server, "/v2/models/sd_upscale/infer", body)
        assert status == 200, (i, answer)
    growth = stub_rss(model_file) - before
    assert growth < 64 * 2**20, f"the model process grew by {growth / 2**20:.0f} MiB over 500 requests"


@pytest.mark.server
def test_unloading_and_loading_ten_times_returns_the_memory(tiny_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "sd_base", repository / "sd_base")
    with TritonServer(repository, extra=["--model-control-mode=explicit"]) as server:
        pid = server.process.pid

        def server_rss() -> int:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        def cycle():
            assert post(server, "/v2/repository/models/sd_base/load", {})[0] == 200
            assert post(server, "/v2/models/sd_base/infer", txt2img(1, 64))[0] == 200
            assert post(server, "/v2/repository/models/sd_base/unload", {})[0] == 200
            deadline = time.monotonic() + 60
            while any(True for _ in _stubs()) and time.monotonic() < deadline:
                time.sleep(0.2)

        def _stubs():
            model_file = str(repository / "sd_base" / "1" / "model.py").encode()
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if model_file in f.read():
                            yield entry
                except OSError:
                    continue

        cycle()  # the first load brings in what stays (backend libraries)
        before = server_rss()
        for _ in range(10):
            cycle()
        assert not list(_stubs()), "an unloaded model's process is still running"
        growth = server_rss() - before
        assert growth < 128 * 2**20, (
            f"tritonserver grew by {growth / 2**20:.0f} MiB over 10 unload/load cycles"
        )
