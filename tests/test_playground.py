"""The playground page in a real browser (Debian's headless Chromium driven by Playwright), against a real
tritonserver: what a person does in the page reaches the models, and what they answer shows there.

Triton is reached through a recording proxy, so the tests see what the model received. A failing test
saves a screenshot of the page in out/test-screenshots/.
"""

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, picture, wait_for
from PIL import Image

from client import playground
from deploy.local.tritonserver import free_port
from sdmme import spec
from sdmme.serving import batching
from sdmme.spec import MODELS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "out" / "test-screenshots"


class Recorder(ThreadingHTTPServer):
    """An HTTP proxy to tritonserver that keeps every inference request's JSON body."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream, self.bodies = upstream, []
        super().__init__(("127.0.0.1", 0), Forward)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def last(self, model: str) -> dict:
        return next(body for path, body in reversed(self.bodies) if path == f"/v2/models/{model}/infer")


class Forward(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args) -> None:
        pass

    def _forward(self, data=None) -> None:
        request = urllib.request.Request(
            f"http://{self.server.upstream}{self.path}", data=data, method=self.command
        )
        for key in ("Content-Type", "Inference-Header-Content-Length"):
            if self.headers.get(key):
                request.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, headers, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        self.send_response(status)
        for key in ("Content-Type", "Inference-Header-Content-Length"):
            if headers.get(key):
                self.send_header(key, headers[key])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._forward()

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/infer"):
            self.server.bodies.append((self.path, json.loads(data)))
        self._forward(data)


@pytest.fixture(scope="module")
def recorder(server):
    proxy = Recorder(server.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()


@pytest.fixture(scope="module")
def site(recorder, tiny_repository):
    page_server = playground.Playground(playground.TritonTarget(recorder.url, tiny_repository))
    page_server.serve_in_background()
    yield page_server
    page_server.shutdown()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra: make venv")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed: make test installs it (make browser, as root)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, site, request):
    """The page, loaded and ready; every address it asked for is kept in page.asked."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    tab.asked = []
    tab.on("request", lambda r: tab.asked.append(r.url))
    tab.goto(site.url)
    tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield tab
    if getattr(request.node, "failed_call", False):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def small(page, steps="2") -> None:
    page.fill("#arg-num_inference_steps", steps)


def test_the_model_list_is_the_servers(page, server):
    with urllib.request.urlopen(
        urllib.request.Request(f"http://{server.url}/v2/repository/index", data=b"{}"), timeout=30
    ) as r:
        ready = sorted(m["name"] for m in json.loads(r.read()) if m["state"] == "READY")
    shown = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert shown == ready
    assert all(url.startswith(page.url.rstrip("/")) for url in page.asked), page.asked  # nothing else


def test_text_to_image_generates_and_shows_an_image_with_its_seed(page, recorder):
    page.select_option("#model", "sd_base")
    small(page)
    page.fill("#arg-height", "64")
    page.fill("#arg-width", "72")
    page.fill("#prompt", "a lighthouse in the page")
    page.click("#generate")
    page.wait_for_selector(".result img.result-image", timeout=120_000)
    size = page.eval_on_selector(".result img.result-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [72, 64]
    seed = int(page.text_content(".result .seed").split()[1])
    sent = recorder.last("sd_base")
    inputs = {i["name"]: i["data"][0] for i in sent["inputs"]}
    assert inputs["prompt"] == "a lighthouse in the page"
    assert json.loads(inputs["gen_args"])["seed"] == seed  # the seed shown is the one the model used
    first = page.get_attribute(".result img.result-image", "src")
    page.click(".result .rerun")  # the same seed again: the same image, a second card beside the first
    page.wait_for_function("document.querySelectorAll('.result').length === 2", timeout=120_000)
    again = page.eval_on_selector_all(".result img.result-image", "imgs => imgs.map(i => i.src)")
    assert again[0] == first == again[1]
    assert page.get_attribute(".result a.download", "download") == f"sd_base-{seed}.jpeg"


def test_inpainting_sends_the_mask_drawn_on_the_uploaded_image(page, recorder, tmp_path):
    source = tmp_path / "photo.png"
    source.write_bytes(picture(96, 64, seed=3))
    page.select_option("#model", "sd_inpaint")
    page.set_input_files("#image-input", str(source))
    page.wait_for_selector("#mask-tools:not([hidden])")
    page.wait_for_function("document.getElementById('mask-canvas').width === 96")
    box = page.locator("#mask-canvas").bounding_box()
    middle = box["y"] + box["height"] / 2
    page.fill("#brush-size", "10")
    page.mouse.move(box["x"] + box["width"] * 0.2, middle)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, middle, steps=10)
    page.mouse.up()
    small(page)
    page.click("#generate")
    page.wait_for_selector(".result img.result-image", timeout=120_000)
    inputs = {i["name"]: i["data"][0] for i in recorder.last("sd_inpaint")["inputs"]}
    assert base64.b64decode(inputs["image"]) == source.read_bytes()  # the file itself
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(inputs["mask_image"]))).convert("L"))
    assert mask.shape == (64, 96) and set(np.unique(mask)) == {0, 255}
    row = mask[32]
    assert (row[int(96 * 0.3) : int(96 * 0.7)] == 255).all()  # along the stroke: repaint
    assert (mask[:20] == 0).all() and (mask[-20:] == 0).all() and (row[:10] == 0).all()  # elsewhere: keep
    page.click("#invert-mask")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.result').length === 2", timeout=120_000)
    inverted = {i["name"]: i["data"][0] for i in recorder.last("sd_inpaint")["inputs"]}["mask_image"]
    assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(inverted))).convert("L")) == 255 - mask).all()


def test_an_out_of_range_value_shows_the_servers_message_beside_its_field(page):
    page.select_option("#model", "sd_base")
    page.fill("#arg-num_inference_steps", "2000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error-num_inference_steps').textContent !== ''")
    message = page.text_content("#error-num_inference_steps")
    assert message == "gen_args.num_inference_steps=2000 is out of range; allowed: int in [1, 150]"
    assert "invalid" in page.get_attribute("#arg-num_inference_steps", "class")
    assert page.locator(".result").count() == 0 and not page.is_visible("#banner")


def test_an_image_model_without_an_image_says_so_and_sends_nothing(page, recorder):
    sent = len(recorder.bodies)
    page.select_option("#model", "sd_upscale")
    page.click("#generate")
    assert page.text_content("#error-image") == "upload an image first"
    assert len(recorder.bodies) == sent


def test_a_server_that_is_down_is_said_in_words(browser):
    down = playground.Playground(playground.TritonTarget(f"127.0.0.1:{free_port()}")).serve_in_background()
    tab = browser.new_page()
    try:
        tab.goto(down.url)
        tab.wait_for_selector("#banner", state="visible")
        assert "did not answer /v2/repository/index" in tab.text_content("#banner")
    finally:
        tab.close()
        down.shutdown()


def test_the_schema_the_form_is_built_from_is_the_servers_validation():
    """sdmme.spec.schema() (GET /api/schema) accepts what the server accepts and refuses what it refuses."""
    jsonschema = pytest.importorskip("jsonschema", reason="moto brings jsonschema into the dev venv")

    schema = spec.schema()
    for name, kind in MODELS.items():
        gen_args = schema["kinds"][name]["gen_args"]
        defaults = {k: v["default"] for k, v in gen_args["properties"].items() if v["default"] is not None}
        jsonschema.validate(defaults, gen_args)
        kind.validate_args({k: v for k, v in defaults.items() if k != "lora_scale"})
        for bad in ({"num_inference_steps": 151}, {"scheduler": "lms"}, {"lora": "../x"}, {"nope": 1}):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, gen_args)
            with pytest.raises(spec.InvalidInput):
                kind.validate_args(bad)
    assert schema["kinds"]["sd_inpaint"]["image_inputs"] == ["image", "mask_image"]


@pytest.mark.server
def test_the_command_starts_a_server_when_none_answers_and_stops_it(tiny_repository):
    """`make playground` after `make demo`: nothing serves at the URL, so the playground starts
    tritonserver on the repository there, serves the page, and stops both when stopped."""
    triton, port = free_port(), free_port()
    command = [sys.executable, "-m", "client.playground", "--url", f"127.0.0.1:{triton}"]
    command += ["--model-repository", str(tiny_repository), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("playground for ") for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("nothing answers at" in line for line in lines)
        assert f"on http://127.0.0.1:{port}/" in lines[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=30) as r:
            models = json.loads(r.read())["models"]
        assert [(m["name"], m["kind"]) for m in models] == [(kind, kind) for kind in sorted(MODELS)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert b"sdmme playground" in r.read()
    finally:
        process.send_signal(signal.SIGTERM)  # as make's timeout or a service manager stops it
        process.wait(timeout=90)

    def triton_answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{triton}/v2/health/live", timeout=5)
            return True
        except OSError:
            return False

    wait_for(lambda: not triton_answers(), 30, "the tritonserver it started is gone with it")


def test_a_models_400_names_the_field_the_page_shows_it_beside():
    """playground.field_of on the messages the server itself makes (sdmme.spec, sdmme.serving.batching)."""
    for kind, args, field in (
        ("sd_base", {"num_inference_steps": 0}, "num_inference_steps"),
        ("sd_base", {"scheduler": "lms"}, "scheduler"),
        ("sd_base", {"lora": "../x"}, "lora"),
        ("sd_depth", {"strength": 2}, "strength"),
        ("sd_base", {"nope": 1}, None),  # no field of the form: the page's banner
    ):
        with pytest.raises(spec.InvalidInput) as e:
            MODELS[kind].validate_args(args)
        assert playground.field_of(str(e.value)) == field, str(e.value)

    def refusal(kind, **inputs):
        arrays = {name: np.array([[value]], dtype=np.object_) for name, value in inputs.items()}
        with pytest.raises(spec.InvalidInput) as e:
            batching.parse(MODELS[kind], 0, arrays, 8)
        return playground.field_of(str(e.value))

    image = base64.b64encode(picture(64, 64))
    assert refusal("sd_base", gen_args=b"{}") == "prompt"  # missing
    assert refusal("sd_base", prompt=b"x" * (spec.MAX_PROMPT_CHARS + 1)) == "prompt"
    assert refusal("sd_depth", prompt=b"a", image=b"not an image") == "image"
    small = base64.b64encode(picture(32, 32))
    assert refusal("sd_inpaint", prompt=b"a", image=image, mask_image=small) == "mask_image"
