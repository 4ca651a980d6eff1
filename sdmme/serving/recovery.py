"""A model that can no longer serve comes back by itself, inside tritonserver, through Triton's own
model-control API (the Python backend's `load_model`/`unload_model`; explicit model control, as `make
serve`, the local MME and SageMaker run).

Triton 2.51 never restarts a dead model process (the Python backend's restart was removed in 2024) and
keeps reporting it ready, so each model keeps a `Guard`:

- It registers its process in a folder shared by the models of one tritonserver (named after the server's
  pid), and a watchdog thread looks at the others' entries. A sibling whose process is gone (killed by
  the OOM killer, a native crash) while Triton still has it loaded is reloaded by whichever model claims
  it first.
- A model that hits a sticky device error (the CUDA context is unusable: every later call would fail too)
  declares itself broken: its requests get UNAVAILABLE (HTTP 503) saying it restarts and to retry, and it
  is reloaded, by a sibling or, alone, by itself.

A model alone on its server whose process dies has nobody left to reload it (a limitation,
docs/recovery.md). The reload costs the other models nothing but the reloading thread's wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("sdmme")

# Errors after which a CUDA context cannot run anything again (CUDA's "sticky" errors): only a new
# process recovers. Out of memory is not one of them.
STICKY_ERRORS = (
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert triggered",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ECC error",
    "hardware stack error",
    "an illegal address",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)
# Test hook: a folder; a file named after a model there makes that model's next call fail with a sticky
# device error, as a GPU fault would (tests set it; nothing a caller sends can).
FAULTS_ENV = "SDMME_TEST_FAULTS"
SELF_RELOAD_GRACE = 3  # watchdog intervals a broken model leaves its siblings to reload it first
RETRY_AFTER_S = 30.0  # a failed reload is tried again after this long


def is_sticky(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in STICKY_ERRORS)


class FaultHook:
    """Wraps a Runner: raises a sticky device error on the call after a fault file appeared."""

    def __init__(self, runner, name: str, folder: Path):
        self._runner, self._file = runner, folder / name.replace("/", "_")

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._runner, attribute)

    def __call__(self, *args, **kwargs):
        if self._file.exists():
            self._file.unlink()
            raise RuntimeError(
                f"CUDA error: an illegal memory access was encountered (injected by {FAULTS_ENV})"
            )
        return self._runner(*args, **kwargs)


def with_fault_hook(runner, name: str):
    folder = os.environ.get(FAULTS_ENV)
    return FaultHook(runner, name, Path(folder)) if folder else runner


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie: with the pid
    it names one process, never a later one that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def registry_folder(server_pid: int) -> Path:
    """One per tritonserver process (its pid and start time: a killed server's entries never reach a
    later one), in /dev/shm where there is one (the Python backend's own shared memory is there): the
    same for every process on the machine, whatever its TMPDIR."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return base / f"sdmme-models-{server_pid}-{_start_time(server_pid)}"


class Guard:
    """One model's entry among its server's models and its watchdog (one daemon thread)."""

    def __init__(self, name: str, control, interval_s: float = 1.0, server_pid: Optional[int] = None):
        self.name, self.control, self.interval = name, control, interval_s
        self.folder = registry_folder(server_pid or os.getppid())  # the stub's parent is tritonserver
        self.entry = self.folder / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".json")
        self.pid = os.getpid()
        self.broken: Optional[str] = None
        self._broken_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"sdmme-guard-{name}", daemon=True)

    def start(self) -> Guard:
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self._write({})
        self._thread.start()
        return self

    def _write(self, extra: dict) -> None:
        record = {"name": self.name, "pid": self.pid, "start": _start_time(self.pid), **extra}
        temporary = self.entry.with_suffix(f".{self.pid}.tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(self.entry)

    def declare_broken(self, reason: str) -> None:
        """From now on every request is answered UNAVAILABLE; a sibling (or this model) reloads it."""
        if self.broken is not None:
            return
        self.broken, self._broken_at = reason, time.monotonic()
        log.error(
            "%s: broken, it cannot serve any more (%s): every request gets 503 until it is reloaded",
            self.name,
            reason,
        )
        self._write({"broken": reason})

    def stop(self) -> None:
        """A clean unload: the entry goes, unless a newer process of this model wrote it already."""
        self._stop.set()
        try:
            if json.loads(self.entry.read_text()).get("pid") == self.pid:
                self.entry.unlink()
        except (OSError, ValueError):
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._look()
            except Exception:  # the watchdog outlives anything one look runs into
                log.exception("%s: the watchdog's look at its siblings failed", self.name)

    def _look(self) -> None:
        for entry in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue  # being replaced or claimed
            if record.get("retry_after", 0) > time.time():
                continue
            own = record.get("pid") == self.pid
            if own and not (
                self.broken and time.monotonic() - self._broken_at > SELF_RELOAD_GRACE * self.interval
            ):
                continue
            if not own and record.get("broken") is None and _start_time(record["pid"]) == record["start"]:
                continue  # alive and well
            self._reload(entry, record)

    def _reload(self, entry: Path, record: dict) -> None:
        name = record["name"]
        claimed = entry.with_suffix(f".claimed-{self.pid}")
        try:
            entry.rename(claimed)  # one claimer wins; the others find the entry gone
        except OSError:
            return
        why = record.get("broken") or f"its process {record['pid']} is gone"
        if not self.control.is_model_ready(name):
            log.info("%s: %s was unloaded (%s): nothing to reload", self.name, name, why)
            claimed.unlink()
            return
        log.warning("%s: reloading %s (%s)", self.name, name, why)
        start = time.monotonic()
        try:
            # A plain load of a loaded model may do nothing; unload and load always gives a new process
            # (requests in between get 404 for a fraction of a second).
            self.control.load_model(model_name=name)
            if not self._reloaded(entry, record):
                self.control.unload_model(model_name=name)
                self.control.load_model(model_name=name)
        except Exception as e:
            log.error(
                "%s: reloading %s failed (%s: %s); trying again in %.0fs",
                self.name,
                name,
                type(e).__name__,
                e,
                RETRY_AFTER_S,
            )
            claimed.write_text(json.dumps({**record, "retry_after": time.time() + RETRY_AFTER_S}))
            if not entry.exists():
                claimed.replace(entry)
            return
        claimed.unlink(missing_ok=True)
        log.warning("%s: %s reloaded in %.1fs and serving again", self.name, name, time.monotonic() - start)

    @staticmethod
    def _reloaded(entry: Path, record: dict) -> bool:
        try:
            return json.loads(entry.read_text()).get("pid") != record["pid"]
        except (OSError, ValueError):
            return False
