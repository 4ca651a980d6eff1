"""Adapters applied to the resident model by fusing them into its weights, and undone exactly.

Fused, an adapter adds no kernel to a denoising step (unfused, PEFT adds four per adapted layer, on a
GPU path that is launch-bound; docs/benchmarks.md), and a compiled UNet stays valid: weights change in
place, never their shapes or the modules around them, so nothing recompiles.
Undone exactly: the weights of every layer an adapter touched are kept as loaded and copied back, never
computed back (subtracting a fused delta in fp16 drifts with every switch), so a request without
adapters gets the bytes the model gives alone.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch

from sdmme.adapters.files import Layers


class Fuser:
    def __init__(self, modules: Dict[str, torch.nn.Module]):
        self.layers = {
            f"{component}.{name}": module
            for component, model in modules.items()
            if model is not None
            for name, module in model.named_modules()
        }
        self.cuda = any(
            p.is_cuda for model in modules.values() if model is not None for p in model.parameters()
        )
        self.originals: Dict[str, torch.Tensor] = {}  # the loaded weights of every layer touched so far
        self.fused: tuple = ()  # what the weights hold now: ((adapter id, scale), ...)
        self.modified: set = set()  # the layers whose weights are not the model's own now

    @torch.no_grad()
    def apply(self, adapters: Sequence[Tuple[str, Layers, float]]) -> float:
        """Make the weights the model's own plus these (id, layers, scale) adapters, layer by layer (one
        layer's delta in fp32 at a time); returns the seconds it took, 0 when they are fused already."""
        wanted = tuple((key, scale) for key, _, scale in adapters if scale != 0)
        if wanted == self.fused:
            return 0.0
        start = time.perf_counter()
        parts: Dict[str, List[Tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for _, layers, scale in adapters:
            if scale != 0:
                for name, (a, b, layer_scale) in layers.items():
                    parts.setdefault(name, []).append((a, b, layer_scale * scale))
        for name in self.modified - set(parts):  # back to the model's own, copied not computed
            self.layers[name].weight.copy_(self.originals[name])
        for name, terms in parts.items():
            weight = self.layers[name].weight
            original = self.originals.setdefault(name, weight.detach().clone())
            total = original.to(torch.float32, copy=True)
            for a, b, scale in terms:
                total.add_((b.flatten(1).float() @ a.flatten(1).float()).reshape(weight.shape), alpha=scale)
            weight.copy_(total)  # summed in fp32, rounded once to the weight's dtype
        self.fused, self.modified = wanted, set(parts)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start
