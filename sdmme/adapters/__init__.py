"""Adapters: LoRA fine-tunes served on a model that stays loaded, chosen per request (gen_args.lora).

An endpoint hosts hundreds of fine-tunes of a few base models this way: each is a small file in the
model's adapter store (store.py), loaded onto the resident model on first use (a bounded number stay
loaded, least recently used go), and fused into its weights for the calls that name it (fusing.py).
Files are checked when they are added (files.py, `make adapter`) and again when they are loaded.

`Adapters.activate(gen_args["lora"])` before a pipeline call is the one entry point; the runner calls it.
"""

from __future__ import annotations

import json
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

from sdmme.adapters.files import COMPONENTS, AdapterError, Layers, read
from sdmme.adapters.fusing import Fuser
from sdmme.adapters.store import LocalStore, StoreError, open_store
from sdmme.spec import ADAPTER_CACHE_ENV, ADAPTER_STORES_ENV
from sdmme.spec import Adapters as Requested

log = logging.getLogger("sdmme")
FOLDER = "adapters"  # a model's own store: model_repository/<model>/adapters/ (make adapter)
ARCHIVE_MANIFEST = "sdmme-archive.json"  # deploy.package writes it; it names the model an archive holds

__all__ = ["AdapterError", "Adapters", "StoreError", "for_model", "store_location"]


def store_location(setting: str, model: str, folder: Path) -> Optional[str]:
    """Where a model's adapters are: its `adapters` setting (a folder, relative to the model's folder, or
    s3://...), else $SDMME_ADAPTERS/<model>/ (make deploy and the local MME set it), else its adapters/
    folder. None when the setting is "none"."""
    if setting == "none":
        return None
    if setting:
        return setting if "://" in setting else str(folder / setting)
    root = os.environ.get(ADAPTER_STORES_ENV, "")
    if root:
        return f"{root.rstrip('/')}/{model}/"
    return str(folder / FOLDER)


def model_name(folder: Path) -> str:
    """The model an archive holds (its manifest), whatever the folder or TargetModel is called."""
    manifest = folder / ARCHIVE_MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("model") or folder.name
    return folder.name


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
    """The adapters of the model in `folder`, set up as its settings say (pipelines.Settings: adapters,
    max_adapters, adapter_cache_mb); None when it serves none. Named in logs and errors as its archive
    names it (on an endpoint, Triton's name for it is a hash of the TargetModel)."""
    label = model_name(folder)
    location = store_location(settings.adapters, label, folder)
    if location is None:
        return None
    if settings.fuse_qkv:  # from_parameters refuses it too; this guards settings made in code
        raise ValueError(f"{label}: fuse_qkv bypasses the to_q, to_k, to_v that adapters fuse into")
    digest = sha256(location.encode()).hexdigest()[:16]
    cache = Path(os.environ.get(ADAPTER_CACHE_ENV) or Path(tempfile.gettempdir()) / "sdmme-adapters") / digest
    store = open_store(location, cache, int(settings.adapter_cache_mb * 1e6))
    modules = {component: getattr(pipeline, component, None) for component in COMPONENTS}
    log.info("%s: adapters from %s (at most %d loaded at once)", label, location, settings.max_adapters)
    return Adapters(label, store, modules, settings.max_adapters)
