"""The README's gen_args table, generated from sdmme.spec (`make docs` rewrites it in place)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from sdmme.spec import MODELS

BEGIN, END = "<!-- gen_args:begin -->", "<!-- gen_args:end -->"


def gen_args_table() -> str:
    names = list(MODELS)
    params = {}
    for spec in MODELS.values():
        for p in spec.params:
            params.setdefault(p.name, p)
    lines = [
        "| key | allowed | default | " + " | ".join(f"`{n}`" for n in names) + " | meaning |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for name, param in params.items():
        defaults = []
        for spec in MODELS.values():
            own = spec.params_by_name.get(name)
            defaults.append("—" if own is None else ("null" if own.default is None else f"`{own.default}`"))
        common = {d for d in defaults if d != "—"}
        default = common.pop() if len(common) == 1 else "per model"
        cells = ["✓" if d != "—" else "—" for d in defaults] if default != "per model" else defaults
        allowed, meaning = param.allowed(), param.help
        for spec in MODELS.values():
            own = spec.params_by_name.get(name)
            if own is not None and own.allowed() != param.allowed():
                allowed += f"; `{spec.name}`: {own.allowed()}"
            if own is not None and own.help != param.help:
                meaning += f" `{spec.name}`: {own.help}"
        lines.append(f"| `{name}` | {allowed} | {default} | " + " | ".join(cells) + f" | {meaning} |")
    limits = []
    for spec in MODELS.values():
        if spec.max_image_pixels:
            side = math.isqrt(spec.max_image_pixels)
            limits.append(f"`{spec.name}` {spec.max_image_pixels} pixels ({side}x{side})")
    lines.append("")
    lines.append(f"Largest input image (width x height): {', '.join(limits)}.")
    return "\n".join(lines)


def update(readme: Path) -> None:
    text = readme.read_text()
    block = f"{BEGIN}\n{gen_args_table()}\n{END}"
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    update(Path("README.md"))
