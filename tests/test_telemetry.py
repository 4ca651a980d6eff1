"""What an operator sees, through a real tritonserver: after a known mix of requests the models' metrics
on Triton's metrics port equal the mix, and every request wrote one JSON log line with its fields and,
unless asked, no prompt; make stats reads the same port; the dashboard names only metrics that exist."""

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import (
    ROOT,
    b64,
    copy_repository,
    picture,
    post,
    sample_payload,
    wait_until_computing,
    with_parameters,
)

from deploy.aws import sagemaker
from deploy.local.mme import frontend
from deploy.local.tritonserver import TritonServer
from deploy.ops import stats
from sdmme.serving import outcomes, telemetry
from sdmme.tools import weights

SECRET = "a violet lighthouse, code 7781"  # a prompt that must never reach a log unless asked
BLOCKER_PROMPT = "the blocker's own words: phare à l'aube, 灯台"  # logged: non-ASCII must stay JSON
FIELDS = {"time", "event", "model", "kind", "id", "outcome", "error", "request_s"}
MODEL_OF = {"base": "sd_base", "up": "sd_upscale", "busy": "busy"}  # request ids' prefixes
RAN = {"adapters", "adapters_from", "steps", "width", "height", "images", "group", "queue_s", "pipeline_s"}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """sd_base and sd_upscale as shipped; `busy`: an sd_base with a queue of one, a 10 s time budget and
    log_prompts; `quiet`: an sd_upscale with its request log and metrics off."""
    repository = copy_repository(tmp_path_factory.mktemp("telemetry") / "model_repository")
    for model in ("sd_depth", "sd_inpaint"):
        shutil.rmtree(repository / model)
    for model in ("sd_base", "sd_upscale"):
        weights.fill(repository, model, "tiny")
    for name, template in (("busy", "sd_base"), ("quiet", "sd_upscale")):
        shutil.copytree(repository / template, repository / name)
        config = repository / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{template}"', f'name: "{name}"'))
    config = repository / "busy" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_size: 32", "max_queue_size: 1"))
    with_parameters(repository / "busy", {"time_budget_s": "10", "log_prompts": "true"})
    with_parameters(repository / "quiet", {"request_log": "false", "metrics": "false"})
    log_file = repository.parent / "tritonserver.log"
    with TritonServer(repository, log_file=log_file) as server:
        server.log, server.repository = log_file, repository
        server.mix = run_mix(server)
        yield server


def txt2img(request_id: str, prompt: str = SECRET, **gen_args) -> dict:
    args = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1, **gen_args}
    return {"id": request_id, **sample_payload(prompt=prompt, gen_args=json.dumps(args))}


def upscale(request_id: str, side: int = 16) -> dict:
    args = json.dumps({"num_inference_steps": 3, "seed": 2})
    return {"id": request_id, **sample_payload(prompt=SECRET, image=b64(picture(side, side)), gen_args=args)}


def call(server, model: str, body: dict) -> int:
    return post(server, f"/v2/models/{model}/infer", body)[0]


def run_mix(server) -> dict:
    """The known mix; returns what the callers saw: model -> list of (id, HTTP status)."""
    seen = {"sd_base": [], "sd_upscale": [], "busy": [], "quiet": []}
    base = [
        txt2img("base-1"),
        txt2img("base-2", num_inference_steps=3, num_images_per_prompt=2, height=72, width=64),
        txt2img("base-3", scheduler="ddim"),
        txt2img("base-bad", num_inference_steps=2000),
    ]
    for body in base:
        seen["sd_base"].append((body["id"], call(server, "sd_base", body)))
    for i, side in enumerate((16, 24)):
        body = upscale(f"up-{i}", side)
        seen["sd_upscale"].append((body["id"], call(server, "sd_upscale", body)))
    seen["quiet"].append(("quiet-1", call(server, "quiet", upscale("quiet-1"))))

    # busy: a long call, then two requests while it runs: one waits in the queue of one, the other is
    # refused by Triton at once; then one that could not finish in the 10 s budget even alone.
    blocker = txt2img("busy-blocker", prompt=BLOCKER_PROMPT, num_inference_steps=40, height=512, width=512)
    thread_result = {}
    thread = threading.Thread(target=lambda: thread_result.update(status=call(server, "busy", blocker)))
    thread.start()
    wait_until_computing(server.repository / "busy" / "1" / "model.py")
    queued = [txt2img(f"busy-{i}", prompt="queued words") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda body: post(server, "/v2/models/busy/infer", body), queued))
    thread.join()
    seen["busy"].append(("busy-blocker", thread_result["status"]))
    for body, (status, answer) in zip(queued, statuses):
        seen["busy"].append((body["id"], status))
        if status != 200:
            assert status == 503 and "Exceeds maximum queue size" in answer["error"], answer
    over = txt2img("busy-over", prompt="queued words", num_inference_steps=150, height=1024, width=1024)
    seen["busy"].append(("busy-over", call(server, "busy", over)))
    return seen


def request_lines(server) -> list:
    lines = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event": "request"' in line:
            lines.append(json.loads(line))
    return lines


def wait_for_lines(server, count: int, timeout: float = 10.0) -> list:
    """The request lines once there are `count` (a line is written right after its answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = request_lines(server)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_the_metrics_equal_the_mix(observed):
    mix = observed.mix
    assert [status for _, status in mix["sd_base"]] == [200, 200, 200, 400]
    assert [status for _, status in mix["sd_upscale"]] == [200, 200]
    busy = dict(mix["busy"])
    assert busy["busy-blocker"] == 200 and busy["busy-over"] == 400
    assert sorted([busy["busy-0"], busy["busy-1"]]) == [200, 503], busy  # one queued, one refused
    samples = stats.scrape(f"127.0.0.1:{observed.metrics_port}")

    def value(name, **labels):
        return stats.total(samples, name, **labels)

    assert stats.by_label(samples, "sdmme_requests_total", "outcome", model="sd_base") == {
        "ok": 3,
        "invalid_input": 1,
    }
    assert stats.by_label(samples, "sdmme_requests_total", "outcome", model="sd_upscale") == {"ok": 2}
    # Triton refused one busy request before the model saw it: the model counts what reached it.
    assert stats.by_label(samples, "sdmme_requests_total", "outcome", model="busy") == {
        "ok": 2,
        "over_budget": 1,
    }
    assert value("sdmme_requests_total", model="sd_base", kind="sd_base") == 4
    assert value("sdmme_images_total", model="sd_base") == 1 + 2 + 1
    assert value("sdmme_images_total", model="sd_upscale") == 2
    # One call per request here: sequential calls, and busy's queued request ran alone after the blocker.
    for model, calls, steps in (("sd_base", 3, 2 + 3 + 2), ("sd_upscale", 2, 3 + 3), ("busy", 2, 40 + 2)):
        assert value("sdmme_denoising_steps_total", model=model) == steps, model
        assert value("sdmme_step_seconds_count", model=model) == calls, model
        assert value("sdmme_group_size_count", model=model) == calls, model
        assert value("sdmme_group_size_sum", model=model) == calls, model
        assert value("sdmme_queue_seconds_count", model=model) == calls, model  # the requests that ran
    for model, answered in (("sd_base", 4), ("sd_upscale", 2), ("busy", 3)):
        assert value("sdmme_request_seconds_count", model=model) == answered, model
        assert value("sdmme_request_seconds_bucket", model=model, le="+Inf") == answered, model
    for model in ("sd_base", "sd_upscale", "busy"):
        phases = stats.by_label(samples, "sdmme_load_seconds", "phase", model=model)
        assert {"weights", "to_device", "settings", "total"} <= set(phases), phases
        assert phases["total"] >= phases["weights"] > 0
        assert value("sdmme_host_memory_bytes", model=model) > 200 * 2**20
        assert not value("sdmme_gpu_memory_bytes", model=model)  # no CUDA here: not published
    assert "calibrate" in stats.by_label(samples, "sdmme_load_seconds", "phase", model="busy")
    ours = [name for name, series in samples.items() if name.startswith("sdmme_")]
    assert not any(dict(labels).get("model") == "quiet" for name in ours for labels in samples[name])


def test_every_request_wrote_one_line_with_its_fields_and_no_prompt(observed):
    mix = observed.mix
    answered = {rid for model in ("sd_base", "sd_upscale", "busy") for rid, status in mix[model]}
    answered -= {rid for rid, status in mix["busy"] if status == 503}  # Triton's refusal: not the model's
    lines = wait_for_lines(observed, len(answered))
    assert sorted(line["id"] for line in lines) == sorted(answered)  # one each; quiet wrote none
    by_id = {line["id"]: line for line in lines}
    for line in lines:
        assert FIELDS <= set(line), line
        assert line["outcome"] in outcomes.OUTCOMES
        assert line["model"] == MODEL_OF[line["id"].split("-")[0]], line
        if line["outcome"] == "ok":
            assert RAN <= set(line) and line["error"] is None
            assert line["pipeline_s"] > 0 and line["queue_s"] >= 0 and line["encode_s"] >= 0
            assert line["request_s"] >= line["queue_s"] + line["pipeline_s"] - 1e-3
    assert (by_id["base-2"]["width"], by_id["base-2"]["height"]) == (64, 72)
    assert by_id["base-2"]["images"] == 2 and by_id["base-2"]["steps"] == 3 and by_id["base-2"]["group"] == 1
    assert (by_id["up-1"]["width"], by_id["up-1"]["height"]) == (96, 96)  # 24 px in, x4 out
    assert (
        by_id["base-bad"]["outcome"] == "invalid_input"
        and "num_inference_steps" in by_id["base-bad"]["error"]
    )
    assert by_id["busy-over"]["outcome"] == "over_budget" and "10s" in by_id["busy-over"]["error"]
    [queued] = [by_id[rid] for rid in ("busy-0", "busy-1") if rid in by_id]
    # Its time counts from its own execute(), after the blocker's: Triton's queue is not in it.
    assert queued["request_s"] < by_id["busy-blocker"]["request_s"]
    # Prompts: only busy (log_prompts) writes them; the others' never reach the log at all.
    assert by_id["busy-blocker"]["prompt"] == BLOCKER_PROMPT
    assert all("prompt" not in line for line in lines if line["model"] != "busy")
    assert SECRET not in observed.log.read_text(errors="replace")


def test_make_stats_prints_a_row_per_model(observed):
    result = subprocess.run(
        ["make", "--no-print-directory", "stats", f"STATS_URL=127.0.0.1:{observed.metrics_port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines()]
    header = next(i for i, row in enumerate(table) if row[:2] == ["model", "requests"])
    rows = {row[0]: row for row in table[header + 1 :]}
    assert set(rows) == {"busy", "sd_base", "sd_upscale"}, result.stdout
    assert rows["sd_base"][1:4] == ["4", "3", "invalid_input"]  # requests, ok, errors...
    assert rows["busy"][1:3] == ["3", "2"]
    missing = subprocess.run(
        ["make", "--no-print-directory", "stats", "STATS_URL=127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no metrics at 127.0.0.1:9" in missing.stderr


def test_the_dashboard_names_only_metrics_the_server_publishes(observed):
    dashboard = json.loads((ROOT / "deploy" / "ops" / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    names = set()
    for expr in exprs:
        names |= set(stats.metric_names(expr))
    with urllib.request.urlopen(f"http://127.0.0.1:{observed.metrics_port}/metrics") as response:
        published = set(stats.parse(response.read().decode()))
    # Published only where there is CUDA, once a call used an adapter (test_adapters reads it), and
    # after an execute() at least PUBLISH_EVERY_S after the load (make bench's test reads it).
    later = {"sdmme_gpu_memory_bytes", "sdmme_adapter_uses_total", "sdmme_telemetry_seconds_total"}
    assert names - later <= published, names - published
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names}
    assert set(telemetry.FAMILIES) <= families, set(telemetry.FAMILIES) - families  # each one shown


def test_metrics_port_on_sagemaker_and_the_local_mme_is_one_setting(tmp_path):
    """make deploy METRICS=1 gives the container the launcher's settings; the local MME reads the same two
    as SageMaker's launcher does (the port on, at the port named); make mme METRICS=1 sets them."""
    dry = ["make", "--no-print-directory", "-n"]
    deploy = subprocess.run(
        dry + ["deploy", "BUCKET=b", "ROLE_ARN=r", "METRICS=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert "-m deploy.aws.sagemaker deploy" in deploy.stdout and " --metrics" in deploy.stdout, deploy.stdout
    assert sagemaker.METRICS_ENVIRONMENT[frontend.ALLOW_METRICS] == "true"
    mme = subprocess.run(dry + ["mme", "BUCKET=b", "METRICS=1"], cwd=ROOT, capture_output=True, text=True)
    assert "-m deploy.local.mme" in mme.stdout and "--metrics-port 8002" in mme.stdout, mme.stdout
    for env, on in (({}, False), ({frontend.ALLOW_METRICS: "true", frontend.METRICS_PORT: "23456"}, True)):
        server = frontend.server(tmp_path / "empty", 18080, tmp_path / "log", env=env)
        try:
            assert ("--allow-metrics=false" not in server.cmd) == on
            assert ("--metrics-port=23456" in server.cmd) == on
        finally:
            server.stop()
