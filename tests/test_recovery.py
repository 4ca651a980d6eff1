"""Faults through a real tritonserver with traffic running: a model's process killed as the OOM killer
would, a sticky device error (the test hook SDMME_TEST_FAULTS). Every request gets an answer, the other
model keeps serving, and the broken one serves again within 30 s plus its load time."""

import json
import os
import re
import shutil
import signal
import time

import pytest
from helpers import RECOVERY_TARGET_S, Traffic, b64, picture, post, sample_payload, wait_for, with_parameters

from deploy.local.tritonserver import TritonServer
from sdmme.serving import recovery

FAST = json.dumps({"num_inference_steps": 2, "height": 64, "width": 64})
UPSCALE = json.dumps({"num_inference_steps": 2})


@pytest.fixture(scope="module")
def served(tiny_repository, tmp_path_factory):
    """sd_base and sd_upscale on one tritonserver (explicit model control, as `make serve` runs it)."""
    work = tmp_path_factory.mktemp("recovery")
    repository = work / "model_repository"
    for model in ("sd_base", "sd_upscale"):
        shutil.copytree(tiny_repository / model, repository / model)
    # greedy: sd_upscale keeping more host memory free than any machine has (loaded by the test)
    shutil.copytree(tiny_repository / "sd_upscale", repository / "greedy")
    config = repository / "greedy" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "sd_upscale"', 'name: "greedy"'))
    with_parameters(repository / "greedy", {"host_memory_reserve_gib": "1000000"})
    faults = work / "faults"
    faults.mkdir()
    log_file = work / "tritonserver.log"
    with TritonServer(
        repository,
        log_file=log_file,
        env={recovery.FAULTS_ENV: str(faults)},
        extra=[
            "--model-control-mode=explicit",
            "--load-model=sd_base",
            "--load-model=sd_upscale",
            "--exit-timeout-secs=5",  # an instance whose process died never finishes unloading
        ],
    ) as server:
        server.faults, server.log = faults, log_file
        yield server


def request(server, model):
    if model == "sd_upscale":
        body = sample_payload(prompt="a", image=b64(picture(32, 32)), gen_args=UPSCALE)
    else:
        body = sample_payload(prompt="a lighthouse", gen_args=FAST)
    status, answer = post(server, f"/v2/models/{model}/infer", body)
    return status, answer.get("error", "")


def load_seconds(server, model):
    """The longest load of `model` the log reports (initialize(), after the process started)."""
    found = re.findall(rf"{model} \({model}\): ready in ([\d.]+)s", server.log.read_text())
    return max(float(seconds) for seconds in found)


def entry(server, model):
    """The model's record among its server's models (sdmme.serving.recovery): its process, whether broken."""
    for path in recovery.registry_folder(server.process.pid).glob("*.json"):
        record = json.loads(path.read_text())
        if record["name"] == model:
            return record
    return None


def test_a_killed_model_process_is_reloaded_while_the_other_model_serves(served):
    victim = entry(served, "sd_base")["pid"]
    with Traffic(lambda model: request(served, model), ["sd_base", "sd_upscale"]) as traffic:
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        seconds = traffic.served_again("sd_base", killed, RECOVERY_TARGET_S + load_seconds(served, "sd_base"))
        traffic.answered_more()
    print(f"killed model process: sd_base served again {seconds:.1f}s after the kill")
    assert seconds < RECOVERY_TARGET_S + load_seconds(served, "sd_base")
    assert {status for *_, status, _ in traffic.answers["sd_upscale"]} == {200}
    faults = {(status, error) for sent, _, status, error in traffic.answers["sd_base"] if status != 200}
    # Triton's own answers while the process is gone, then for the moment between unload and load.
    assert faults <= {
        (500, "Stub process 'sd_base_0' is not healthy."),
        (404, "Request for unknown model: 'sd_base' has no available versions"),
    }, faults
    log = served.log.read_text()
    assert f"sd_upscale: reloading sd_base (its process {victim} is gone)" in log
    assert re.search(r"sd_upscale: sd_base reloaded in [\d.]+s and serving again", log)
    assert entry(served, "sd_base")["pid"] != victim


def test_a_sticky_device_error_answers_503_and_the_model_is_reloaded(served):
    before = entry(served, "sd_base")["pid"]
    with Traffic(lambda model: request(served, model), ["sd_base", "sd_upscale"]) as traffic:
        (served.faults / "sd_base").touch()  # the next call fails: any request sent from now on
        faulted = time.monotonic()
        limit = RECOVERY_TARGET_S + load_seconds(served, "sd_base")
        seconds = traffic.served_again("sd_base", faulted, limit)
        traffic.answered_more()
    print(f"sticky device error: sd_base served again {seconds:.1f}s after the fault")
    assert {status for *_, status, _ in traffic.answers["sd_upscale"]} == {200}
    refused = [error for sent, _, status, error in traffic.answers["sd_base"] if status == 503]
    assert refused and all("sd_base is being reloaded after a device fault" in e for e in refused), refused
    assert all("retry in a few seconds" in e and "illegal memory access" in e for e in refused)
    assert {s for *_, s, _ in traffic.answers["sd_base"]} <= {200, 503, 404}
    log = served.log.read_text()
    broken = "sd_base: broken, it cannot serve any more (RuntimeError: CUDA error: an illegal memory access"
    assert broken in log
    assert "reloading sd_base (RuntimeError: CUDA error" in log
    assert entry(served, "sd_base")["pid"] != before


def test_a_broken_model_alone_reloads_itself_and_an_unloaded_one_stays_unloaded(served):
    assert post(served, "/v2/repository/models/sd_upscale/unload", {})[0] == 200
    wait_for(lambda: entry(served, "sd_upscale") is None, 60, "sd_upscale's entry goes with its clean unload")
    before = entry(served, "sd_base")["pid"]
    (served.faults / "sd_base").touch()
    assert request(served, "sd_base")[0] == 503
    wait_for(lambda: (entry(served, "sd_base") or {}).get("pid") not in (None, before), 60, "a new process")
    wait_for(lambda: request(served, "sd_base")[0] == 200, 60, "sd_base serves again")
    assert "sd_base: reloading sd_base (RuntimeError: CUDA error" in served.log.read_text()
    assert "reloading sd_upscale" not in served.log.read_text()  # unloaded on purpose: not brought back
    assert post(served, "/v2/repository/models/sd_upscale/load", {})[0] == 200
    assert request(served, "sd_upscale")[0] == 200


def test_a_load_that_would_not_fit_in_host_memory_is_refused_as_out_of_memory(served):
    status, answer = post(served, "/v2/repository/models/greedy/load", {})
    assert status == 400, answer  # behind SageMaker the same text is a 507: it evicts and retries
    assert "out of memory loading greedy: its weights take" in answer["error"]
    assert "1e+06 GiB stay free (host_memory_reserve_gib)" in answer["error"], answer
    assert request(served, "sd_base")[0] == 200  # the others serve on
    ready = re.search(
        r"sd_base \(sd_base\): ready in [\d.]+s \([^)]*\), host memory ([\d.]+) GiB resident \(before the "
        r"load ([\d.]+) GiB, peak ([\d.]+) GiB\)",
        served.log.read_text(),
    )
    assert ready, "the load's host memory is logged"
    after, before, peak = map(float, ready.groups())
    assert 0 < before <= after <= peak
    print(
        f"host memory of tiny sd_base: {before:.2f} GiB before its load, {after:.2f} after, peak {peak:.2f}"
    )
