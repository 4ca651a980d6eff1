"""One set of serving pins (env/serving.txt): everything that installs the serving stack follows it, and
the set resolves for the Python of the image it is chosen for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement

from deploy import containers
from env import build

PINNED = build.pins()


def test_every_serving_package_is_pinned_exactly():
    for name in ("torch", "xformers", "diffusers", "transformers", "accelerate", "numpy"):
        requirement = Requirement(PINNED[name])
        assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "=="
    assert Requirement(PINNED["numpy"]).specifier.contains("1.26.4")  # numpy 2 crashes the backend stub


def test_environment_yml_follows_the_pins_and_the_image_python():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == f"python={containers.python_for(containers.DEFAULT_TAG)}"
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-r env/serving.txt" in pip
    assert not [line for line in pip if re.search(r"[=<>]=", line)], "pins belong in env/serving.txt"


def test_the_no_conda_builder_and_docker_follow_the_pins():
    assert build.requirements("gpu", "torch==2.13.0") == list(PINNED.values())
    cpu = build.requirements("cpu", "torch==2.13.0")
    assert cpu[0] == "torch==2.13.0" and not any(line.startswith(("xformers", "torch=")) for line in cpu[1:])
    assert set(cpu[1:]) == {line for name, line in PINNED.items() if name not in build.GPU_ONLY}
    makefile = (ROOT / "Makefile").read_text()
    docker = makefile[makefile.index("serve-docker:") :].split("\n\n")[0]
    assert "-r /src/env/serving.txt" in docker and "torch==" not in docker and "xformers==" not in docker


def test_runtime_ranges_admit_the_pins():
    import tomllib

    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "runtime"
    ]
    for line in runtime:
        requirement = Requirement(line)
        pinned = PINNED.get(requirement.name.lower())
        if pinned:
            version = str(next(iter(Requirement(pinned).specifier)).version)
            assert requirement.specifier.contains(version), f"{line} refuses the pinned {pinned}"


def test_the_pins_resolve_for_the_image_python(tmp_path):
    """pip's resolver on the registry, for the image's Python, without downloading the wheels."""
    python = containers.python_for(containers.DEFAULT_TAG)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--target",
            str(tmp_path / "t"),
            "--report",
            str(report),
            "-r",
            str(build.PINS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 and "Could not find" not in result.stderr and "conflict" not in result.stderr:
        pytest.skip(f"the package registry did not answer (pip: {result.stderr.strip()[-300:]}); needs PyPI")
    assert result.returncode == 0, (
        f"env/serving.txt does not resolve for Python {python}:\n{result.stderr[-2000:]}"
    )
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert installed["torch"] == str(next(iter(Requirement(PINNED["torch"]).specifier)).version)


def test_make_env_rebuilds_when_its_settings_change(tmp_path):
    """The environment's rule depends on a file of its settings, rewritten only when one changes: a switch
    of flavor or Python rebuilds it, the same settings again do not."""
    makefile = (ROOT / "Makefile").read_text()
    rule = next(line for line in makefile.splitlines() if line.startswith("env/sd_env/sdmme-env.json:"))
    assert "env/sd_env.settings" in rule.split(":")[1]
    (tmp_path / "env").mkdir()
    stamp = tmp_path / "env" / "sd_env.settings"

    def settings(*assignments):
        make = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "env/sd_env.settings"]
        subprocess.run([*make, *assignments], check=True, capture_output=True)
        return stamp.read_text(), stamp.stat().st_mtime_ns

    text, _ = settings("ENV_FLAVOR=gpu", "ENV_PYTHON=python3.12")
    assert "flavor=gpu" in text and "python=python3.12" in text
    old = 1_000_000_000 * 10**9
    os.utime(stamp, ns=(old, old))
    assert settings("ENV_FLAVOR=gpu", "ENV_PYTHON=python3.12") == (text, old)
    text, mtime = settings("ENV_FLAVOR=cpu", "ENV_PYTHON=python3.12")
    assert "flavor=cpu" in text and mtime > old
