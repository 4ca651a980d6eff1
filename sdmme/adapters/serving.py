"""Adapters on a loaded model: read from its store onto the device (a bounded number stay, least recently
used go), fused into the weights for the calls that name them."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from sdmme import model_folder
from sdmme.adapters import CACHE_ENV, store_location
from sdmme.adapters.files import COMPONENTS, AdapterError, Layers, read
from sdmme.adapters.fusing import Fuser
from sdmme.adapters.store import LocalStore, open_store
from sdmme.spec import Adapters as Requested

log = logging.getLogger("sdmme")


@dataclass
class Resident:
    """An adapter loaded onto the model's device."""

    key: str  # name and sha256: what is fused is told apart by content, not name alone
    layers: Layers


class Adapters:
    def __init__(self, label: str, store, modules: Dict[str, torch.nn.Module], max_resident: int):
        self.label, self.store, self.modules = label, store, modules
        self.max_resident = max_resident
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self.fuser = Fuser(modules)
        self.device = next(modules["unet"].parameters()).device
        # Told (name, source) for each adapter a call uses, source one of telemetry.ADAPTER_SOURCES.
        self.on_use: Callable[[str, str], None] = lambda name, source: None

    def activate(self, requested: Optional[Requested]) -> None:
        """Make the model serve exactly these (name, scale) adapters, or none; raises AdapterError
        (a caller's 400) or StoreError (the store failed) naming the adapter."""
        chosen = [(name, *self._get(name), scale) for name, scale in requested or ()]
        seconds = self.fuser.apply([(adapter.key, adapter.layers, scale) for _, adapter, _, scale in chosen])
        for name, _, source, _ in chosen:
            self.on_use(name, source)
        if seconds:
            what = ", ".join(f"{name}@{scale:g}" for name, scale in requested or ())
            done = f"fused {what}" if what else "back to the model alone"
            log.info("%s: %s in %.3fs", self.label, done, seconds)

    def _get(self, name: str) -> Tuple[Resident, str]:
        """The adapter on the device, and where it came from: device (already there), disk or s3."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name], "device"
        start = time.monotonic()
        record = self.store.record(name)
        if record is None:
            listing = (
                "its adapters are the .safetensors files there (make adapter MODEL=<model> adds one)"
                if isinstance(self.store, LocalStore)
                else "make models BUCKET=... PREFIX=... (or the local MME's GET /models) lists its adapters"
            )
            raise AdapterError(
                f"unknown adapter {name} for {self.label}: it is not in {self.store.location}; {listing}"
            )
        source = "disk" if self.store.on_disk(name, record) else "s3"
        path = self.store.path(name, record)
        try:
            layers = read(path, record, self.modules, name, self.store.location)
        except AdapterError:
            self.store.discard(name, record)
            raise
        layers = {key: (a.to(self.device), b.to(self.device), s) for key, (a, b, s) in layers.items()}
        size = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in layers.values())
        adapter = Resident(f"{name}:{record['sha256']}", layers)
        self.resident[name] = adapter
        while len(self.resident) > self.max_resident:
            evicted, _ = self.resident.popitem(last=False)
            log.info(
                "%s: adapter %s unloaded (least recently used; %d stay loaded)",
                self.label,
                evicted,
                self.max_resident,
            )
        log.info(
            "%s: adapter %s loaded from %s (%d layers, rank %s, %.1f MB on %s) in %.2fs",
            self.label,
            name,
            self.store.location,
            len(layers),
            record.get("rank", "?"),
            size / 1e6,
            self.device,
            time.monotonic() - start,
        )
        return adapter, source


def for_model(folder: Path, settings, pipeline) -> Optional[Adapters]:
    """The adapters of the model in `folder`, set up as its settings say (adapters, max_adapters,
    adapter_cache_mb); None when it serves none. Named in logs and errors as its archive names it (on an
    endpoint, Triton's name for it is a hash of the TargetModel)."""
    label = model_folder.name_of(folder)
    location = store_location(settings.adapters, label, folder)
    if location is None:
        return None
    digest = sha256(location.encode()).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "sdmme-adapters") / digest
    store = open_store(location, cache, int(settings.adapter_cache_mb * 1e6))
    modules = {component: getattr(pipeline, component, None) for component in COMPONENTS}
    log.info("%s: adapters from %s (at most %d loaded at once)", label, location, settings.max_adapters)
    return Adapters(label, store, modules, settings.max_adapters)
