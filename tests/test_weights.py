"""Tiny weights: deterministic, safetensors only, never silently replacing weights from another source."""

import hashlib
import json

import pytest

from sdmme import weights


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
    assert json.loads((first / "source.json").read_text())["hub_id"] == "stabilityai/stable-diffusion-2-depth"


def test_weights_from_another_source_are_not_replaced_without_force(tmp_path):
    dest = weights.weights_dir(tmp_path, "sd_base")
    dest.mkdir(parents=True)
    (dest / weights.SOURCE_FILE).write_text(json.dumps({"source": "hub"}))
    with pytest.raises(SystemExit, match="holds hub weights; pass --force"):
        weights.fill(tmp_path, "sd_base", "tiny")
    assert weights.fill(tmp_path, "sd_base", "tiny", force=True) == dest
    assert json.loads((dest / weights.SOURCE_FILE).read_text())["source"] == "tiny"
