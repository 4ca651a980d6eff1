"""CUDA graphs of the eager UNet: one UNet call replayed as one launch instead of hundreds.

A UNet step is hundreds of small kernels and, on an H100 at 512x512, the GPU waits for the host to
launch them (docs/benchmarks.md). `GraphedUNet` takes the UNet's place as its `forward`: per input
signature (shapes, strides, dtypes of the sample, timestep, text embeddings and class labels) it runs
the first call eagerly (the warm-up a capture needs), captures the second into a graph with static input
buffers, and replays that graph from then on, copying each call's inputs in. The timestep is one of
those inputs, so one graph serves every step; the scheduler stays eager.

- At most `max_graphs` graphs are kept, the least recently used dropped first; they share one memory
  pool, so the memory they hold is about that of the largest, plus their static buffers.
- A call it cannot replay (other arguments, a timestep that is not a tensor, a capture that failed)
  runs eagerly: nothing is ever refused for want of a graph.
- Graphs read the weights where they are: adapters fused in place keep them valid. Weights or buffers
  moved to new memory (`unet.to(...)`) or modules replaced or added (PEFT's unfused LoRA layers) drop
  every graph when the next pipeline call starts (`check_weights`), and its calls capture again.
- On CPU there are no CUDA graphs; the same bookkeeping runs with the capture replaced by plain calls
  (`plain_capture`), so tests drive keys, LRU, invalidation and fallbacks there.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from sdmme.settings import Group, Setting

log = logging.getLogger("sdmme")


def _check(settings) -> None:
    if settings.cuda_graphs and settings.compile != "none":
        raise ValueError(
            "config.pbtxt: cuda_graphs captures the eager UNet; compile makes its own graphs "
            "(reduce-overhead): set one of them"
        )


SETTINGS = Group(
    "CUDA graphs",
    (
        Setting(
            "cuda_graphs",
            bool,
            False,
            "Replay the UNet from CUDA graphs, captured per batch and size on their second call (eager "
            "until then); no compile. Off on GPU until make bench-gpu has measured it; on CPU plain calls "
            "stand in.",
        ),
        Setting(
            "max_cuda_graphs",
            int,
            8,
            "CUDA graphs kept per model; the least recently used goes.",
            "a count, 1 or more",
        ),
    ),
    _check,
)

Replay = Tuple[Callable[[], None], torch.Tensor]  # replays the capture; the output it writes


def cuda_capture(forward: Callable[[], torch.Tensor], pool) -> Replay:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = forward()
    return graph.replay, output


def plain_capture(forward: Callable[[], torch.Tensor], pool) -> Replay:
    """The CPU's stand-in: a replay is a plain call into the same static buffers."""
    output = forward()
    return (lambda: output.copy_(forward())), output


class Graph:
    """One captured call: static inputs, copied into before each replay, and its output."""

    def __init__(self, forward: Callable[..., torch.Tensor], inputs: Dict[str, torch.Tensor], capture, pool):
        self.inputs = {name: tensor.clone() for name, tensor in inputs.items()}  # strides kept
        self.replay, self.output = capture(lambda: forward(**self.inputs), pool)

    def __call__(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor)
        self.replay()
        return self.output.clone()  # schedulers keep outputs across steps; the next replay overwrites


def _describe(key) -> str:
    shape, _, dtype, _ = dict(key)["sample"]
    return f"batch {shape[0]}, latents {shape[2]}x{shape[3]}, {str(dtype).replace('torch.', '')}"


class GraphedUNet:
    """The UNet's forward, replayed from graphs where it can be; `install()` puts it in place."""

    def __init__(self, unet, max_graphs: int, capture: Optional[Callable[..., Replay]] = None):
        self.unet = unet
        self.eager = type(unet).forward.__get__(unet)  # the class's own forward, bound
        self.max_graphs = max_graphs
        self.cuda = unet.device.type == "cuda"
        self.capture = capture or (cuda_capture if self.cuda else plain_capture)
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.graphs: collections.OrderedDict[tuple, Graph] = collections.OrderedDict()
        self.warmed: set = set()  # signatures run once eagerly, captured on their next call
        self.failed: Dict[tuple, str] = {}  # signatures whose capture failed: served eagerly
        self.counts = collections.Counter()  # eager, captured, replayed, dropped
        self.weights = self._weights()

    def install(self) -> GraphedUNet:
        self.unet.forward = self  # nn.Module calls self.forward: the instance's wins over the class's
        return self

    def _weights(self) -> tuple:
        """The UNet's modules and where each of its parameters and buffers lives (about 2 ms to walk)."""
        return (
            tuple(id(module) for module in self.unet.modules()),
            tuple(t.data_ptr() for t in self.unet.parameters()),
            tuple(t.data_ptr() for t in self.unet.buffers()),
        )

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, return_dict=True, **rest):
        def eager():
            self.counts["eager"] += 1
            return self.eager(
                sample,
                timestep,
                encoder_hidden_states,
                class_labels=class_labels,
                return_dict=return_dict,
                **rest,
            )

        if any(value is not None for value in rest.values()) or not torch.is_tensor(timestep):
            return eager()
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if class_labels is not None:
            inputs["class_labels"] = class_labels
        key = tuple((name, (tuple(t.shape), t.stride(), t.dtype, t.device)) for name, t in inputs.items())
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._prepare(key, inputs)
            if graph is None:
                return eager()
        else:
            self.graphs.move_to_end(key)
        output = graph(inputs)
        self.counts["replayed"] += 1
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    def check_weights(self) -> None:
        """Drops every graph when the UNet's weights moved to new memory or its modules changed; the
        Runner asks once per pipeline call (a graph reads the addresses it was captured with)."""
        weights = self._weights()
        if weights != self.weights:
            if self.graphs:
                log.info(
                    "UNet weights moved to new memory or modules replaced: %d CUDA graph(s) dropped",
                    len(self.graphs),
                )
                self.counts["dropped"] += len(self.graphs)
            self.graphs.clear()
            self.warmed.clear()
            self.weights = weights

    def _prepare(self, key: tuple, inputs: Dict[str, torch.Tensor]) -> Optional[Graph]:
        """None while the signature has not been warmed up or could not be captured; else its graph."""
        if key in self.failed:
            return None
        if key not in self.warmed:
            self.warmed.add(key)
            return None
        if len(self.graphs) >= self.max_graphs:
            old, _ = self.graphs.popitem(last=False)
            self.warmed.discard(old)
            self.counts["dropped"] += 1
            log.info("CUDA graph for %s dropped (at most %d kept)", _describe(old), self.max_graphs)
        before = torch.cuda.memory_reserved(self.unet.device) if self.cuda else 0
        start = time.perf_counter()
        try:
            graph = Graph(self._forward, inputs, self.capture, self.pool)
        except Exception as e:  # an op that cannot be captured, out of memory: this signature stays eager
            self.failed[key] = f"{type(e).__name__}: {e}"
            if self.cuda:
                torch.cuda.empty_cache()
            log.warning("CUDA graph for %s could not be captured, it runs eagerly: %s", _describe(key), e)
            return None
        self.graphs[key] = graph
        self.counts["captured"] += 1
        grown = (torch.cuda.memory_reserved(self.unet.device) - before) / 2**20 if self.cuda else 0.0
        log.info(
            "CUDA graph for %s captured in %.2fs (+%.0f MiB reserved; %d kept)%s",
            _describe(key),
            time.perf_counter() - start,
            grown,
            len(self.graphs),
            "" if self.cuda else " (CPU: plain calls in its place)",
        )
        return graph

    def _forward(self, **inputs: Any) -> torch.Tensor:
        return self.eager(**inputs, return_dict=False)[0]


def apply(pipeline, settings) -> Optional[str]:
    """Installs the graphs on the pipeline's UNet when the settings say so; what it did, for the log."""
    if not settings.cuda_graphs:
        return None
    graphed = GraphedUNet(pipeline.unet, settings.max_cuda_graphs).install()
    cpu = "" if graphed.cuda else " (no CUDA here: plain calls stand in for graphs)"
    return f"up to {settings.max_cuda_graphs}{cpu}"


def of(unet) -> Optional[GraphedUNet]:
    """The GraphedUNet installed on `unet`, if any."""
    forward = unet.__dict__.get("forward")
    return forward if isinstance(forward, GraphedUNet) else None
