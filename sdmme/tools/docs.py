"""The tables in docs/ that the code declares: gen_args (from sdmme.spec), the model settings (from each
concept's declaration, sdmme.settings), the models' metrics (sdmme.serving.telemetry) and request outcomes
(sdmme.serving.outcomes).
`make docs` rewrites each between its markers, in the page it lives in."""

from __future__ import annotations

import math
from pathlib import Path

from sdmme.serving import outcomes, telemetry
from sdmme.spec import MODELS


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


def settings_table() -> str:
    from sdmme import settings  # the concepts import torch and diffusers: only make docs and tests ask

    return settings.table()


def metrics_table() -> str:
    lines = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    for family in telemetry.FAMILIES.values():
        buckets = f" (buckets {', '.join(f'{b:g}' for b in family.buckets)})" if family.buckets else ""
        labels = ", ".join(f"`{label}`" for label in family.labels)
        lines.append(f"| `{family.name}` | {family.kind.lower()} | {labels} | {family.help}{buckets} |")
    lines += ["", "| outcome | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in outcomes.OUTCOMES.items()]
    return "\n".join(lines)


# marker: (the page it lives in, relative to the repository, the function that writes it)
TABLES = {
    "gen_args": ("docs/serving.md", gen_args_table),
    "settings": ("docs/settings.md", settings_table),
    "metrics": ("docs/operating.md", metrics_table),
}


def render(root: Path) -> dict[Path, str]:
    """Every page that holds a generated table, as `make docs` would write it."""
    pages: dict[Path, str] = {}
    for marker, (page, table) in TABLES.items():
        path = root / page
        text = pages.get(path) or path.read_text()
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        if text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"{page} must hold {begin} ... {end} once: the {marker} table lives there")
        start, stop = text.index(begin), text.index(end) + len(end)
        pages[path] = f"{text[:start]}{begin}\n{table()}\n{end}{text[stop:]}"
    return pages


def update(root: Path) -> None:
    for path, text in render(root).items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"rewrote the generated tables in {path.relative_to(root)}")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m sdmme.tools.docs", description="Rewrite the generated tables in docs/ (make docs)."
    ).parse_args()
    update(Path(__file__).resolve().parents[2])
