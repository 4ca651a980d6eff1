"""make env / make package: archives that serve on their own, byte-reproducible, checked before writing."""

import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import ROOT, post, sample_payload

from deploy.aws import package, tarball
from deploy.local.tritonserver import TritonServer
from env import build, contract
from sdmme.spec import MODELS


def test_extracted_archive_serves_from_its_own_environment(dist, packed_env, tmp_path):
    models = tmp_path / "fresh"
    models.mkdir()
    with tarfile.open(dist / "sd_base.tar.gz") as tar:
        tar.extractall(models, filter="tar")
    # The server runs from a copy outside this venv, with a bare PATH; where allowed, the Python that
    # built everything (interpreter, venv, repository) is hidden behind empty mounts.
    wrap = contract.hiding([ROOT, Path(sys.prefix), Path(sys.base_prefix)])
    unpacked = set(Path("/tmp").glob("python_env_*"))  # where Triton extracts environment archives
    with TritonServer(models, isolated=True, wrap=wrap, python_version=packed_env[1]["python"]) as server:
        status, body = post(
            server,
            "/v2/models/sd_base/infer",
            sample_payload(
                prompt="a", gen_args=json.dumps({"num_inference_steps": 2, "height": 64, "width": 64})
            ),
        )
        log = server.log_tail(200_000)
    assert status == 200, body
    assert body["outputs"][0]["shape"] == [1, 1]
    # With a bare PATH the only Python that has torch is the archive's, used in place: the extraction
    # of the archive was the only one.
    assert "sd_base: loaded StableDiffusionPipeline" in log
    new = set(Path("/tmp").glob("python_env_*")) - unpacked  # the backend makes one, empty, at start
    assert not [folder for folder in new if any(folder.iterdir())]
    if os.geteuid() == 0 and shutil.which("unshare"):
        assert wrap, "as root the build environment must be hidden for this proof"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_archive_layout_and_manifest(dist, packed_env, model):
    env_archive, env_manifest = packed_env
    with tarfile.open(dist / f"{model}.tar.gz") as tar:
        names = tar.getnames()
        assert {n.split("/")[0] for n in names} == {model}
        config = tar.extractfile(f"{model}/config.pbtxt").read().decode()
        manifest = json.load(tar.extractfile(f"{model}/sdmme-archive.json"))
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert f'name: "{model}"' in config
    assert 'string_value: "$$TRITON_MODEL_DIRECTORY/sd_env"' in config
    assert f"{model}/1/model.py" in names and f"{model}/sd_env/bin/activate" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(package.PICKLE_SUFFIXES) for n in names if "/sd_env/" not in n)
    assert manifest["python"] == env_manifest["python"] and manifest["model"] == model
    assert manifest["env_sha256"] == tarball.tree_sha256(env_archive) and manifest["weights"] == "tiny"
    assert manifest["kind"] == model
    # The manifest comes first: the first kilobytes tell what the archive is.
    assert names[0] == f"{model}/sdmme-archive.json"
    with open(dist / f"{model}.tar.gz", "rb") as f:
        assert package.read_manifest(io.BytesIO(f.read(4096))) == manifest


def test_only_what_serving_reads_is_shipped(tiny_repository, packed_env, tmp_path):
    """Leftovers of a build (an interrupted download's weights.partial, notes, caches) stay behind."""
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository / "sd_base", repository / "sd_base")
    version = repository / "sd_base" / "1"
    shutil.copytree(version / "weights", version / "weights.partial")
    (repository / "sd_base" / "1" / "notes.txt").write_text("mine")
    (repository / "sd_base" / "README").write_text("mine")
    package.package(repository, ["sd_base"], tmp_path / "dist", packed_env[0])
    with tarfile.open(tmp_path / "dist" / "sd_base.tar.gz") as tar:
        names = tar.getnames()
    ours = [n for n in names if "/sd_env/" not in n]
    assert not [n for n in ours if "partial" in n or "notes" in n or "README" in n]
    assert "sd_base/1/model.py" in names and "sd_base/1/weights/model_index.json" in names


def test_packaging_twice_gives_identical_bytes(tiny_repository, packed_env, dist, tmp_path, capsys):
    package.package(tiny_repository, ["sd_upscale"], tmp_path, packed_env[0])
    assert tarball.sha256(tmp_path / "sd_upscale.tar.gz") == tarball.sha256(dist / "sd_upscale.tar.gz")
    # Stored, not compressed (make package's default): deflate blocks of type 0, so inflating is a copy.
    with open(dist / "sd_upscale.tar.gz", "rb") as f:
        header = f.read(11)
    assert header[:3] == b"\x1f\x8b\x08" and header[10] & 0b110 == 0
    assert (dist / "sd_upscale.tar.gz").stat().st_size > tarball.tree_size([packed_env[0]])
    report = capsys.readouterr().err  # the environment's size by package
    assert f"environment {packed_env[0]}:" in report
    assert report.split(f"environment {packed_env[0]}:")[1].splitlines()[1].split()[-1] == "torch"


def test_slim_archives_leave_the_environment_to_the_image(tiny_repository, packed_env, dist, tmp_path):
    (slim,) = package.package(tiny_repository, ["sd_base"], tmp_path, packed_env[0], "/opt/sdmme/sd_env")
    with tarfile.open(slim) as tar:
        names = tar.getnames()
        config = tar.extractfile("sd_base/config.pbtxt").read().decode()
        manifest = json.load(tar.extractfile("sd_base/sdmme-archive.json"))
    assert not [n for n in names if "sd_env" in n] and "sd_base/1/weights/model_index.json" in names
    assert 'string_value: "/opt/sdmme/sd_env"' in config and manifest["env_path"] == "/opt/sdmme/sd_env"
    assert manifest["env_sha256"] == packed_env[1]["tree_sha256"]  # the environment the image must carry
    assert slim.stat().st_size * 20 < (dist / "sd_base.tar.gz").stat().st_size
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY env/sd_env ${ENV_PATH}" in dockerfile and f"ENV_PATH={package.IMAGE_ENV_PATH}" in dockerfile
    assert f"IMAGE_ENV_PATH ?= {package.IMAGE_ENV_PATH}" in (ROOT / "Makefile").read_text()


def test_environment_is_lean_and_its_bytecode_reproducible(packed_env):
    env_dir = packed_env[0]
    site = next(env_dir.glob("lib/python3*/site-packages"))
    assert sorted(p.name for p in (env_dir / "bin").iterdir()) == sorted(
        ["activate", "python", "python3", f"python{packed_env[1]['python']}"]
    )
    assert not list(site.glob("*/tests")) and not list(site.glob("pip")) and not list(env_dir.rglob("*.a"))
    assert not list(site.glob("*.dist-info/direct_url.json"))  # no path of the build machine
    assert (site / "torch" / "include").is_dir()  # torch.compile builds against these
    pycs = list((site / "diffusers").rglob("*.pyc")) + list((site / "sdmme").rglob("*.pyc"))
    assert pycs and all(p.read_bytes()[4:8] == b"\x01\x00\x00\x00" for p in pycs)  # unchecked hash, no time
    assert not [p for p in pycs if str(env_dir).encode() in p.read_bytes()]


def test_rebuilding_the_environment_gives_the_same_bytes(packed_env, tmp_path):
    again = build.build("relocatable", "torch==2.13.0", output=tmp_path / "sd_env", work=tmp_path / "work")
    assert tarball.tree_sha256(again) == tarball.tree_sha256(packed_env[0])


def fake_env(path, *, activate=True, manifest=True, libpython=True, python="/bin/false"):
    """A small environment directory with only the parts a test asks for."""

    def add(name, data=b"", mode=0o644):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
        (path / name).chmod(mode)

    path.mkdir(parents=True)
    if activate:
        add("bin/activate", b'export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd):$PATH"\n')
        add("bin/python3", f'#!/bin/sh\nexec {python} "$@"\n'.encode(), 0o755)
    if manifest:
        add("sdmme-env.json", json.dumps({"python": "3.11", "builder": "test", "sdmme": "0"}).encode())
    if libpython:
        add("lib/libpython3.11.so.1.0")
    return path


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"activate": False}, "environment has no bin/activate"),
        ({"manifest": False}, "has no sdmme-env.json recording its Python version"),
        ({"libpython": False}, "has no lib/libpython3.X.so.1.0"),
        ({}, "the runtime does not import from the extracted environment"),
    ],
)
def test_env_contract_failures_say_what_to_change(tmp_path, parts, message):
    archive = fake_env(tmp_path / "env", **parts)
    with pytest.raises(contract.ContractError, match=message.replace(".", "\\.")):
        contract.verify(archive, hide=[])


def test_env_with_foreign_modules_is_refused(tmp_path):
    archive = fake_env(tmp_path / "env", python=sys.executable)  # this venv's Python: not self-contained
    with pytest.raises(contract.ContractError, match="imported from outside the environment"):
        contract.verify(archive, hide=[])


def _break(folder, what):
    if what == "no config":
        (folder / "config.pbtxt").unlink()
    elif what == "wrong name":
        text = (folder / "config.pbtxt").read_text()
        (folder / "config.pbtxt").write_text(text.replace(f'name: "{folder.name}"', 'name: "other"'))
    elif what == "env already set":
        with open(folder / "config.pbtxt", "a") as f:
            f.write('parameters: { key: "EXECUTION_ENV_PATH" value: { string_value: "/x" } }\n')
    elif what == "no model.py":
        (folder / "1" / "model.py").unlink()
    elif what == "no kind":
        text = (folder / "config.pbtxt").read_text()
        (folder / "config.pbtxt").write_text(text.replace('string_value: "sd_base"', 'string_value: "sd_xl"'))
    elif what == "no weights":
        shutil.rmtree(folder / "1" / "weights")
    elif what == "pickle":
        (folder / "1" / "weights" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    elif what == "no safetensors":
        for f in (folder / "1" / "weights").rglob("*.safetensors"):
            f.unlink()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("no config", "sd_base: .*config.pbtxt is missing"),
        ("wrong name", 'config.pbtxt must say name: "sd_base"'),
        ("env already set", "already sets EXECUTION_ENV_PATH"),
        ("no model.py", "1/model.py is missing"),
        ("no kind", "config.pbtxt must declare its kind, one of sd_base, .*it says 'sd_xl'"),
        ("no weights", "no weights in .*run `make weights`"),
        ("pickle", "pickled files are never shipped .*diffusion_pytorch_model.bin"),
        ("no safetensors", "holds no .safetensors files"),
    ],
)
def test_failed_model_check_names_the_problem_and_writes_nothing(
    tiny_repository, packed_env, tmp_path, what, message
):
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    _break(repository / "sd_base", what)
    with pytest.raises(package.PackageError, match=message):
        package.package(repository, ["sd_depth", "sd_base"], tmp_path / "dist", packed_env[0])
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_broken_or_missing_environment_stops_packaging(tiny_repository, tmp_path):
    with pytest.raises(package.PackageError, match="missing: run `make env` first"):
        package.package(tiny_repository, ["sd_base"], tmp_path / "dist", tmp_path / "none")
    broken = fake_env(tmp_path / "env", activate=False)
    with pytest.raises(package.PackageError, match="environment has no bin/activate"):
        package.package(tiny_repository, ["sd_base"], tmp_path / "dist", broken)
    assert not (tmp_path / "dist").exists()
