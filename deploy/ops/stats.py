"""`make stats`: a table per model from a Triton metrics port, for a person at a terminal.

Reads the models' own metrics (sdmme_*, sdmme/serving/telemetry.py) and Triton's beside them (nv_inference_*):
requests by outcome, latency percentiles estimated from the histograms as Prometheus'
histogram_quantile does, queueing, seconds per denoising step, batching, adapter hits, load time and
memory. Counts are since each model's first load on that server.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import urllib.request
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

Labels = Tuple[Tuple[str, str], ...]
Samples = Dict[str, Dict[Labels, float]]  # metric name -> labels -> value

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """Prometheus' text format: every sample by name and labels."""
    samples: Samples = defaultdict(dict)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name, _, labels, value = match.groups()
        pairs = tuple(
            sorted((k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in _LABEL.findall(labels or ""))
        )
        samples[name][pairs] = float(value)
    return samples


def metric_names(expr: str) -> List[str]:
    """The sdmme_* and nv_* metrics a PromQL expression reads."""
    return re.findall(r"\b((?:sdmme|nv)_[a-z0-9_]+)\b", expr)


def scrape(url: str, timeout: float = 10.0) -> Samples:
    if "://" not in url:
        url = f"http://{url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of a metric's samples whose labels include `match`."""
    return sum(
        value
        for labels, value in samples.get(name, {}).items()
        if all(dict(labels).get(k) == v for k, v in match.items())
    )


def by_label(samples: Samples, name: str, label: str, **match: str) -> Dict[str, float]:
    values: Dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, {}).items():
        named = dict(labels)
        if all(named.get(k) == v for k, v in match.items()):
            values[named.get(label, "")] += value
    return dict(values)


def quantile(samples: Samples, name: str, q: float, **match: str) -> Optional[float]:
    """The q-quantile of a histogram, interpolated in its bucket (Prometheus' histogram_quantile)."""
    buckets = sorted(
        (float(le), count) for le, count in by_label(samples, f"{name}_bucket", "le", **match).items()
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # above the largest finite bucket: its bound is all that is known
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def mean(samples: Samples, name: str, **match: str) -> Optional[float]:
    count = total(samples, f"{name}_count", **match)
    return total(samples, f"{name}_sum", **match) / count if count else None


def models(samples: Samples) -> List[str]:
    names = set(by_label(samples, "sdmme_requests_total", "model"))
    names |= set(by_label(samples, "sdmme_load_seconds", "model"))
    return sorted(names)


def rows(samples: Samples) -> List[Dict[str, str]]:
    def seconds(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"

    table = []
    for model in models(samples):
        outcomes = by_label(samples, "sdmme_requests_total", "outcome", model=model)
        errors = {k: v for k, v in outcomes.items() if k != "ok" and v}
        adapters = by_label(samples, "sdmme_adapter_uses_total", "source", model=model)
        uses, hits = sum(adapters.values()), adapters.get("device", 0)
        triton_queue_us = total(samples, "nv_inference_queue_duration_us", model=model)
        triton_requests = total(samples, "nv_inference_request_success", model=model) + total(
            samples, "nv_inference_request_failure", model=model
        )
        gpu = total(samples, "sdmme_gpu_memory_bytes", model=model, pool="reserved")
        batch = mean(samples, "sdmme_group_size", model=model)
        loads = by_label(samples, "sdmme_load_seconds", "instance", model=model, phase="total")
        waits = [triton_queue_us / 1e6 / triton_requests] if triton_requests else []
        waits.append(mean(samples, "sdmme_queue_seconds", model=model) or 0.0)
        table.append(
            {
                "model": model,
                "requests": f"{sum(outcomes.values()):.0f}",
                "ok": f"{outcomes.get('ok', 0):.0f}",
                "errors": ", ".join(f"{k} {v:.0f}" for k, v in sorted(errors.items())) or "-",
                "images": f"{total(samples, 'sdmme_images_total', model=model):.0f}",
                "p50 s": seconds(quantile(samples, "sdmme_request_seconds", 0.5, model=model)),
                "p99 s": seconds(quantile(samples, "sdmme_request_seconds", 0.99, model=model)),
                "queue s": seconds(sum(waits)),  # Triton's queue, then behind earlier calls: means
                "s/step": seconds(mean(samples, "sdmme_step_seconds", model=model)),
                "batch": "-" if batch is None else f"{batch:.1f}",
                "adapter hits": f"{100 * hits / uses:.0f}% of {uses:.0f}" if uses else "-",
                "load s": seconds(max(loads.values(), default=None)),
                "host GiB": f"{total(samples, 'sdmme_host_memory_bytes', model=model) / 2**30:.2f}",
                "GPU GiB": f"{gpu / 2**30:.2f}" if gpu else "-",
            }
        )
    return table


def render(table: List[Dict[str, str]]) -> str:
    if not table:
        return "no sdmme model has published metrics on this port yet (none loaded, or metrics off)"
    columns = list(table[0])
    widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in table]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="127.0.0.1:8002", help="the metrics port (make serve's: 8002)")
    parser.add_argument("--every", type=float, help="print again every this many seconds (Ctrl-C stops)")
    args = parser.parse_args(argv)
    while True:
        try:
            samples = scrape(args.url)
        except OSError as e:
            raise SystemExit(
                f"make stats: no metrics at {args.url} ({e}); is a server running there?"
            ) from None
        print(time.strftime("%H:%M:%S"), args.url)
        print(render(rows(samples)), flush=True)
        if not args.every:
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main(sys.argv[1:])
