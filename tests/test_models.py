"""`make model`: your own models from single-file checkpoints, diffusers folders and LoRAs, checked up front.

Serving two of them side by side behind the local MME is in test_mme.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import brought
import pytest
import torch
from helpers import ROOT, copy_repository
from safetensors.torch import load_file

from sdmme import model_folder
from sdmme.tools import checkpoints, repository, tiny
from sdmme.tools.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return brought.write_all(tmp_path_factory.mktemp("brought"))


@pytest.fixture()
def repo(tmp_path):
    """A model repository with the default folders (the templates) and no weights."""
    return copy_repository(tmp_path / "model_repository")


def saved_unet(folder: Path) -> dict:
    """The UNet's tensors as stored."""
    return load_file(folder / "1" / "weights" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("layout, family", [("sd2", "SD 2.x"), ("sd1", "SD 1.x")])
def test_single_file_becomes_a_model_with_exactly_its_weights(files, repo, layout, family):
    folder = repository.add(
        repo, "my_style", "sd_base", str(files / f"style_{layout}.safetensors"), config=str(files / "config")
    )
    expected = brought.fine_tuned().unet.to(torch.float16).state_dict()
    got = saved_unet(folder)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(v.dtype == torch.float16 for v in got.values())
    record = json.loads((folder / "1" / "weights" / "source.json").read_text())
    assert record["kind"] == "sd_base" and record["format"] == "single-file" and record["family"] == family
    config = (folder / "config.pbtxt").read_text()
    assert config.startswith('name: "my_style"') and model_folder.kind_in(config) == "sd_base"
    assert (folder / "1" / "model.py").read_text() == (repo / "sd_base" / "1" / "model.py").read_text()
    assert model_folder.in_repository(repo)["my_style"] == "sd_base"
    assert not list(repo.glob(".*partial"))


def test_lora_is_fused_into_the_layers_it_names_and_nowhere_else(files, repo):
    folder = repository.add(
        repo,
        "my_lora",
        "sd_base",
        str(files / "base"),
        lora=str(files / "lora" / "lora.safetensors"),
        lora_scale=0.8,
    )
    base = tiny.sd_base().unet.to(torch.float16).state_dict()
    got = saved_unet(folder)
    changed = sorted(k for k in base if not torch.equal(base[k], got[k]))
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    assert all(".attn" in k for k in changed)  # attention projections only
    record = json.loads((folder / "1" / "weights" / "source.json").read_text())
    assert record["lora_scale"] == 0.8 and record["lora_layers"]["unet"] == len(changed) > 0
    assert record["format"] == "diffusers"


@pytest.mark.parametrize(
    "kind, weights, lora, message",
    [
        ("sd_inpaint", "style_sd2.safetensors", None, "takes 4 input channels, sd_inpaint needs 9"),
        ("sd_base", "inpaint.safetensors", None, "takes 9 input channels, sd_base needs 4"),
        ("sd_depth", "style_sd1.safetensors", None, "is SD 1.x; sd_depth accepts SD 2.x checkpoints"),
        ("sd_base", "sdxl.safetensors", None, "is SDXL; sd_base accepts SD 2.x or SD 1.x"),
        ("sd_base", "lora/lora.safetensors", None, "is a LoRA, not a whole model"),
        ("sd_base", "inpaint_folder", None, "is a StableDiffusionInpaintPipeline, sd_base takes a Stable"),
        ("sd_base", "base", "lora_wider.safetensors", "(?s)does not fit this model: .*size mismatch"),
        ("sd_base", "base", "lora_other/lora.safetensors", "(?s)does not fit this model: .*size mismatch"),
        ("sd_base", "base", "lora_nowhere.safetensors", "32 of its 32 layers match no layer of this model"),
        ("sd_base", "model.ckpt", None, "pickled checkpoints are never loaded"),
    ],
)
def test_a_mismatch_is_refused_before_anything_is_written(files, repo, kind, weights, lora, message):
    (files / "model.ckpt").write_bytes(b"not read")
    before = sorted(p.name for p in repo.iterdir())
    with pytest.raises(CheckpointError, match=message):
        repository.add(
            repo,
            "mine",
            kind,
            str(files / weights),
            lora=str(files / lora) if lora else None,
            config=str(files / "config"),
        )
    assert sorted(p.name for p in repo.iterdir()) == before


def test_a_config_of_another_architecture_is_named(files, repo, tmp_path):
    tiny.sd_upscale().save_pretrained(tmp_path / "upscale_config")
    with pytest.raises(
        CheckpointError, match="does not match the config from .*cross-attention|input channels"
    ):
        repository.add(
            repo,
            "mine",
            "sd_base",
            str(files / "style_sd2.safetensors"),
            config=str(tmp_path / "upscale_config"),
        )


def test_names_and_existing_models_are_checked(files, repo):
    for bad in ("../up", "a b", "x.tar.gz", "", "-lead"):
        with pytest.raises(repository.ModelError, match="model name"):
            repository.add(repo, bad, "sd_base", str(files / "base"))
    with pytest.raises(repository.ModelError, match="exists; pass FORCE=1"):
        repository.add(repo, "sd_depth", "sd_base", str(files / "base"))


def test_kinds_accept_the_architectures_the_readme_lists():
    assert checkpoints.accepted_architectures("sd_base") == "SD 2.x or SD 1.x"
    assert checkpoints.accepted_architectures("sd_inpaint") == "SD 2.x or SD 1.x"
    assert checkpoints.accepted_architectures("sd_depth") == "SD 2.x"
    assert checkpoints.accepted_architectures("sd_upscale") == "SD 2.x"
    assert [
        checkpoints.required_in_channels(k) for k in ("sd_base", "sd_depth", "sd_inpaint", "sd_upscale")
    ] == [
        4,
        5,
        9,
        7,
    ]


def test_make_model_with_a_lora_from_the_command_line(files, repo):
    result = subprocess.run(
        [
            "make",
            "-s",
            "model",
            "NAME=cli_lora",
            "KIND=sd_base",
            f"WEIGHTS={files / 'base'}",
            f"LORA={files / 'lora' / 'lora.safetensors'}",
            "LORA_SCALE=0.5",
            f"REPOSITORY={repo}",
            f"PY={sys.executable}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((repo / "cli_lora" / "1" / "weights" / "source.json").read_text())
    assert record["lora_scale"] == 0.5 and record["kind"] == "sd_base"
    refused = subprocess.run(
        [
            "make",
            "-s",
            "model",
            "NAME=x",
            "KIND=sd_inpaint",
            f"WEIGHTS={files / 'base'}",
            f"REPOSITORY={repo}",
            f"PY={sys.executable}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "make model:" in refused.stderr and "Traceback" not in refused.stderr
    usage = subprocess.run(
        ["make", "-s", "model", "NAME=x", "KIND=sd_base"], cwd=ROOT, capture_output=True, text=True
    )
    assert usage.returncode == 2 and "usage: make model" in usage.stdout  # WEIGHTS= is required
