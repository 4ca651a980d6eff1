"""What the CPU benchmarks print about their machine, and where their reports go."""

from __future__ import annotations

import os
import platform
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def cpu_machine() -> str:
    return f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"


def publish(text: str, docs: bool = True) -> None:
    """Print the report and, unless told not to, append it to docs/benchmarks.md."""
    print(text)
    if docs:
        with open(DOCS, "a") as f:
            f.write(text)
