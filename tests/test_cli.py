"""The command line against the real server: files written, every gen_args option exposed."""

import subprocess
import sys

import pytest
from helpers import ROOT, picture
from PIL import Image

from client.cli import COMMANDS, build_parser, main
from sdmme.spec import MODELS


def test_help_lists_every_gen_arg(capsys):
    for command, model in COMMANDS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        for param in MODELS[model].params:
            assert "--" + param.name.replace("_", "-") in text


def test_invalid_option_is_refused_before_sending(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["txt2img", "a", "--num-images-per-prompt", "9"])
    assert "gen_args.num_images_per_prompt=9 is out of range" in capsys.readouterr().err


def test_inpaint_writes_files(server, tmp_path):
    (tmp_path / "in.png").write_bytes(picture(64, 64))
    (tmp_path / "mask.png").write_bytes(picture(64, 64, mode="L"))
    code = main(
        [
            "--url",
            server.url,
            "--out",
            str(tmp_path / "out"),
            "inpaint",
            "a cat",
            "--image",
            str(tmp_path / "in.png"),
            "--mask-image",
            str(tmp_path / "mask.png"),
            "--num-inference-steps",
            "2",
            "--num-images-per-prompt",
            "2",
            "--output-format",
            "png",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == ["inpaint-0.png", "inpaint-1.png"]
    assert Image.open(written[0]).size == (64, 64)


def test_model_error_exit_code(server, tmp_path, capsys):
    code = main(["--url", server.url, "--out", str(tmp_path), "upscale", "--image", __file__])
    assert code == 1 and "image is not a PNG, JPEG or WebP image" in capsys.readouterr().err


def test_building_requests_needs_neither_boto3_nor_tritonclient():
    """bench/served.py builds and reads the AWS sample's bodies on a GPU machine without either library:
    each transport's client imports its own only when named."""
    code = """
import sys
sys.modules["boto3"] = sys.modules["tritonclient"] = None  # as if not installed
from client.base import request_body
assert request_body("a", None, {}, {"seed": 1})["inputs"][0]["data"] == ["a"]
try:
    from client import EndpointClient
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "boto3" in out.stdout


def test_lora_options_build_gen_args_lora(capsys):
    from client.cli import adapters_arg

    def lora(*argv):
        return adapters_arg(build_parser().parse_args(["txt2img", "a", *argv]).lora)

    assert lora("--lora", "ink") == "ink"  # the simple form, which --lora-scale applies to
    assert lora("--lora", "ink:0.8") == [{"name": "ink", "scale": 0.8}]
    assert lora("--lora", "ink", "--lora", "sun:0.5") == [{"name": "ink"}, {"name": "sun", "scale": 0.5}]
    for bad, message in (
        ("../ink", "not an adapter name"),
        ("ink:3", "out of range"),
        ("ink:x", "not a number"),
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["txt2img", "a", "--lora", bad])
        assert message in capsys.readouterr().err
