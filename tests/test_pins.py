"""One set of serving pins (env/serving.txt): everything that installs the serving stack follows it, and
the set resolves for the Python of the image it is chosen for."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml
from helpers import ROOT
from packaging.requirements import Requirement

from deploy.aws import containers
from env import build, lock

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


def test_the_lock_holds_the_pins_and_the_builders_use_it():
    locked = lock.read()
    for name, line in PINNED.items():
        assert locked[name] == str(next(iter(Requirement(line).specifier)).version), name
    assert build.constraints("gpu") == ["-c", str(build.LOCK)]
    assert build.constraints("cpu") == ["-c", str(build.DEV_LOCK)]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-c env/serving.lock" in pip


def test_the_pins_resolve_for_the_image_python_exactly_as_locked():
    """pip's resolver on the registry, for the image's Python, without downloading the wheels: with the
    lock as constraints it must give the lock, nothing more or less (a stale lock fails here: `make lock`)."""
    python = containers.python_for(containers.DEFAULT_TAG)
    try:
        resolved = lock.resolve(build.requirements("gpu", ""), python, constraints=build.LOCK)
    except lock.ResolveError as e:
        if not e.registry:
            pytest.skip(f"the package registry did not answer (pip: {str(e)[-300:]}); needs PyPI")
        pytest.fail(f"env/serving.txt does not resolve for Python {python} with env/serving.lock:\n{e}")
    assert resolved == lock.read()


MAKEFILE_TORCH = re.search(r"^TORCH \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def comparable(versions):
    """Less torch, and what only a CUDA build of it brings (a machine without the CPU wheel gets that)."""
    cuda_only = re.compile(r"^(torch|triton|nvidia-.*)$")
    return {name.replace("_", "-"): v for name, v in versions.items() if not cuda_only.match(name)}


def test_this_venv_is_what_the_dev_lock_says():
    """`make venv` installs with env/dev.lock: every package in it at the locked version (a venv made
    before a `make lock` fails here: `make venv` installs again)."""
    from importlib.metadata import version

    locked = lock.read(build.DEV_LOCK)
    assert {"diffusers", "moto", "pytest", "transformers"} <= set(locked) and "torch" not in locked
    assert {name: version(name) for name in locked} == locked
    for name, line in PINNED.items():  # the venv and the cpu env run the serving pins
        if name not in build.GPU_ONLY:
            assert locked[name] == str(next(iter(Requirement(line).specifier)).version), name


def test_the_dev_extra_resolves_exactly_as_locked():
    """As for production's lock: resolved again with env/dev.lock as constraints, pyproject.toml's dev
    extra gives the lock, nothing more or less (after a change to the extras: `make lock`)."""
    try:
        resolved = lock.resolve(
            lock.dev_requirements(MAKEFILE_TORCH), lock.this_python(), constraints=build.DEV_LOCK
        )
    except lock.ResolveError as e:
        if not e.registry:
            pytest.skip(f"the package registry did not answer (pip: {str(e)[-300:]}); needs PyPI")
        pytest.fail(f"the dev extra does not resolve with env/dev.lock:\n{e}")
    assert comparable(resolved) == comparable(lock.read(build.DEV_LOCK))


@pytest.mark.parametrize(
    ("failing", "message"),
    [("gpu", "env/serving.txt does not resolve"), ("dev", "pyproject.toml's dev extra does not resolve")],
)
def test_make_lock_keeps_both_locks_when_a_resolution_fails(tmp_path, monkeypatch, failing, message):
    """A set that does not resolve (here a version that does not exist) is an error that quotes pip, and
    neither lock is written: both are resolved before either is."""
    locks = {"LOCK": tmp_path / "serving.lock", "DEV_LOCK": tmp_path / "dev.lock"}
    for name, path in locks.items():
        path.write_text(f"# the old {name}\nsix==1.16.0\n")
        monkeypatch.setattr(build, name, path)
    missing, fine = ["diffusers==0.0.999"], ["six==1.16.0"]
    monkeypatch.setattr(build, "requirements", lambda flavor, torch: missing if failing == "gpu" else fine)
    monkeypatch.setattr(lock, "dev_requirements", lambda torch: missing if failing == "dev" else fine)
    with pytest.raises(SystemExit) as e:
        lock.main(["--torch", MAKEFILE_TORCH])
    if "Could not find" not in str(e.value):
        pytest.skip(f"the package registry did not answer ({str(e.value)[-300:]}); needs PyPI")
    assert str(e.value).startswith(f"make lock: {message}:") and "diffusers==0.0.999" in str(e.value)
    assert {name: path.read_text() for name, path in locks.items()} == {
        name: f"# the old {name}\nsix==1.16.0\n" for name in locks
    }


def test_make_lock_rewrites_a_lock_only_when_it_changes(tmp_path):
    """The venv and make env depend on the locks: an unchanged resolution leaves the file untouched."""
    path = tmp_path / "dev.lock"
    lock.write(path, "# header\n", {"b": "2", "a": "1", "torch": "9"}, leave_out=("torch",))
    assert path.read_text() == "# header\na==1\nb==2\n"
    old = 1_000_000_000 * 10**9
    os.utime(path, ns=(old, old))
    lock.write(path, "# header\n", {"a": "1", "b": "2"})
    assert path.stat().st_mtime_ns == old
    lock.write(path, "# header\n", {"a": "1", "b": "3"})
    assert path.read_text().endswith("b==3\n") and path.stat().st_mtime_ns > old


def test_make_env_rebuilds_when_its_settings_change(tmp_path):
    """The environment's rule depends on a file of its settings, rewritten only when one changes: a switch
    of flavor or Python rebuilds it, the same settings again do not, nor TORCH for the gpu flavor."""
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
    assert settings("ENV_FLAVOR=gpu", "ENV_PYTHON=python3.12", "TORCH=torch==2.11.0") == (text, old)
    text, mtime = settings("ENV_FLAVOR=cpu", "ENV_PYTHON=python3.12")
    assert "flavor=cpu" in text and "torch=" in text and mtime > old
    os.utime(stamp, ns=(old, old))
    text, mtime = settings("ENV_FLAVOR=cpu", "ENV_PYTHON=python3.12", "TORCH=torch==2.11.0")
    assert "torch=torch==2.11.0" in text and mtime > old


def test_make_venv_installs_the_torch_asked_for(tmp_path):
    """`make venv TORCH=...` on an existing venv reinstalls: TORCH is a file the venv's rule depends on,
    rewritten only when TORCH changes."""
    makefile = (ROOT / "Makefile").read_text()
    rule = next(line for line in makefile.splitlines() if line.startswith("$(VENV)/.installed:"))
    assert "$(VENV)/torch.setting" in rule.split(":")[1]
    stamp = tmp_path / ".venv" / "torch.setting"

    def setting(torch):
        make = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), ".venv/torch.setting"]
        subprocess.run([*make, f"TORCH={torch}"], check=True, capture_output=True)
        return stamp.read_text(), stamp.stat().st_mtime_ns

    text, _ = setting("torch==2.13.0")
    assert text == "torch==2.13.0\n"
    old = 1_000_000_000 * 10**9
    os.utime(stamp, ns=(old, old))
    assert setting("torch==2.13.0") == (text, old)
    text, mtime = setting("torch==2.11.0")
    assert text == "torch==2.11.0\n" and mtime > old
