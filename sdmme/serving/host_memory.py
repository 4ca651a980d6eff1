"""A model process's host memory: measured at load, and checked before it, so that a load that cannot fit
is refused with an out-of-memory error (SageMaker answers 507, evicts other models and retries) instead of
loading until the kernel's OOM killer ends the process, and with it every request it holds."""

from __future__ import annotations

import json
import math
import os
import resource
import struct
from pathlib import Path
from typing import Optional

import torch

from sdmme.settings import Group, Setting

GIB = 2**30
SETTINGS = Group(
    "recovery",
    (
        Setting(
            "host_memory_reserve_gib",
            float,
            0.0,
            "Host memory a load leaves free for the other models and the server: a load whose weights would "
            "not fit beside it is refused as out of memory (SageMaker: 507, it evicts and retries).",
            "GiB",
        ),
    ),
)
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    """The most this process has held at once (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cgroup_room() -> Optional[int]:
    """What this container's memory limit (cgroup v2) still allows, if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available() -> int:
    """Memory a new allocation can have without swapping: the kernel's MemAvailable, bounded by the
    container's limit."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    room = int(fields["MemAvailable"].split()[0]) * 1024
    cgroup = _cgroup_room()
    return room if cgroup is None else min(room, cgroup)


def load_bytes(weights: Path, dtype: torch.dtype) -> int:
    """Host memory loading the .safetensors files under `weights` as `dtype` allocates at its peak (only
    their headers are read). A tensor stored in `dtype` stays mapped from its file (page cache, which
    the kernel can reclaim); one converted to `dtype` is allocated, and its file is mapped while that
    happens: every converted weight as `dtype`, plus the largest file that has one. Full-size sd_base
    (fp16 files) on CPU: fp32 6.42 GiB estimated, 6.13-6.44 GiB measured; fp16 0 and 0.06 GiB
    (docs/benchmarks.md)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    stored = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    converted, largest = 0, 0
    for path in weights.rglob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        before = converted
        for name, tensor in header.items():
            if name == "__metadata__" or tensor["dtype"] not in SAFETENSORS_DTYPES:
                continue
            if tensor["dtype"] != stored.get(dtype):
                converted += math.prod(tensor["shape"]) * itemsize
        if converted > before:
            largest = max(largest, path.stat().st_size)
    return converted + largest


def check(name: str, weights: Path, dtype: torch.dtype, reserve_gib: float) -> int:
    """Refuse a load whose weights would not fit beside `reserve_gib` kept free (MemoryError, which
    initialize() reports as "out of memory loading <name>"); returns their bytes."""
    needed, room = load_bytes(weights, dtype), available()
    if needed + reserve_gib * GIB > room:
        raise MemoryError(
            f"its weights take {needed / GIB:.2f} GiB of host memory at the load's "
            f"peak and {reserve_gib:g} GiB stay free (host_memory_reserve_gib); {room / GIB:.2f} GiB "
            "are available"
        )
    return needed


def summary(before: int) -> str:
    return (
        f"host memory {resident() / GIB:.2f} GiB resident (before the load {before / GIB:.2f} GiB, "
        f"peak {peak() / GIB:.2f} GiB)"
    )
