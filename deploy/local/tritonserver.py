"""Run the real tritonserver that ships in the `nvidia-pytriton` wheel, without docker.

The wheel carries the server, the Python backend and one stub per Python version; the stub for the
Python that runs the models has to be placed beside the backend, and the interpreter's own libpython
and the wheel's libraries have to be on LD_LIBRARY_PATH (see shared/FACTS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("tritonserver")


def _wheel_root() -> Path:
    """Found without importing pytriton (its client needs packages a wheel installed alone lacks)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed: it carries tritonserver")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def binary() -> Path:
    return _wheel_root() / "bin" / "tritonserver"


def prepare_backends(dest: Path, python_version: str | None = None) -> Path:
    """Copy the wheel's backends into `dest` with the stub for `python_version` (default: this one)."""
    root = _wheel_root()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = dest / "backends"
    shutil.copytree(root / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(stub, backends / "python" / stub.name)
    shutil.copytree(root / "caches", dest / "caches", dirs_exist_ok=True)
    return dest


def _libs() -> Path:
    return _wheel_root().parent.parent / "nvidia_pytriton.libs"


def environment() -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH so that the stub embeds this interpreter and imports from its env."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR"), str(_libs())]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolate(workdir: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the server outside this Python environment, and a bare environment to run it in.

    Models then run only from environments they bring (EXECUTION_ENV_PATH); this venv can be hidden.
    """
    shutil.copytree(_libs(), workdir / "libs")
    (workdir / "bin").mkdir()
    shutil.copy2(binary(), workdir / "bin" / "tritonserver")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/"),
        "LD_LIBRARY_PATH": str(workdir / "libs"),
    }
    return workdir / "bin" / "tritonserver", env


def command(
    server: Path,
    model_repository: Path | None,
    workdir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    extra: list[str] = (),
    auto_complete: bool = False,
) -> list[str]:
    """Without `auto_complete` each model's config.pbtxt is taken as written (make weights and make model
    write it whole), which saves each Python model's auto-complete pass at load."""
    cmd = [
        str(server),
        f"--backend-directory={workdir / 'backends'}",
        f"--cache-directory={workdir / 'caches'}",
        *([] if auto_complete else ["--disable-auto-complete-config"]),
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--log-verbose=0",
    ]
    if model_repository is not None:
        cmd.append(f"--model-repository={model_repository}")
        if not any(flag.startswith("--model-control-mode") for flag in extra):
            # Every model loaded at start, as without model control, and reloadable through the
            # model-control API: a model whose process died is reloaded by the others
            # (sdmme/serving/recovery.py).
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
    return cmd + list(extra)


class TritonServer:
    """A tritonserver child process on free loopback ports; a context manager for tests and tools."""

    def __init__(
        self,
        model_repository: Path | None,
        extra: list[str] = (),
        log_file: Path | None = None,
        ports: tuple[int, int, int] | None = None,
        wrap: list[str] = (),
        isolated: bool = False,
        python_version: str | None = None,
        ready_port: int | None = None,
        ready_path: str = "/v2/health/ready",
        env: dict[str, str] | None = None,
        auto_complete: bool = False,
    ):
        self.workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        prepare_backends(self.workdir, python_version)
        server, self.env = isolate(self.workdir) if isolated else (binary(), environment())
        self.env.update(env or {})
        self.http_port, self.grpc_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.ready_url = f"http://127.0.0.1:{ready_port or self.http_port}{ready_path}"
        self.cmd = list(wrap) + command(
            server,
            model_repository,
            self.workdir,
            self.http_port,
            self.grpc_port,
            self.metrics_port,
            list(extra),
            auto_complete,
        )
        self.log_file = log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 180.0) -> TritonServer:
        log.info("starting %s (log: %s)", " ".join(self.cmd), self.log_file)
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{tail}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Serve a model repository with the pip-installed tritonserver."
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("extra", nargs="*", help="more tritonserver flags, after --")
    args = parser.parse_args()
    workdir = prepare_backends(Path(tempfile.mkdtemp(prefix="tritonserver-")))
    cmd = command(
        binary(),
        args.model_repository.resolve(),
        workdir,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.extra,
    )
    print(f"serving {args.model_repository} on http://127.0.0.1:{args.http_port} (Ctrl-C stops)", flush=True)
    os.execve(cmd[0], cmd, environment())


if __name__ == "__main__":
    main()
