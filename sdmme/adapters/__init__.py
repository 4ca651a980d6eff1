"""Adapters: LoRA fine-tunes served on a model that stays loaded, chosen per request (gen_args.lora).

An endpoint hosts hundreds of fine-tunes of a few base models this way: each is a small file in the
model's adapter store (store.py), loaded onto the resident model on first use (a bounded number stay
loaded, least recently used go), and fused into its weights for the calls that name it (fusing.py).
Files are checked when they are added (files.py, `make adapter`) and again when they are loaded.

`sdmme.adapters.serving.for_model` gives a loaded model its `Adapters`, whose `activate(gen_args["lora"])`
before a pipeline call is the one entry point; the runner calls it. This module holds what the rest of
the project needs without torch: the adapter settings, the environment names deploy sets, where a
model's store is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sdmme.settings import Group, Setting

FOLDER = "adapters"  # a model's own store: model_repository/<model>/adapters/ (make adapter)
# The environment variable that tells every model where the adapter stores are (make deploy and the local
# MME set it to s3://BUCKET/PREFIX/adapters/, where make upload puts them): a model's is <that>/<model>/.
STORES_ENV = "SDMME_ADAPTERS"
CACHE_ENV = "SDMME_ADAPTER_CACHE"  # the disk cache's folder (default: the temporary folder's)


def _check(settings) -> None:
    """Adapters fuse into to_q, to_k and to_v; fuse_qkv replaces them with one new projection."""
    if settings.fuse_qkv and settings.adapters != "none":
        raise ValueError(
            "config.pbtxt: fuse_qkv computes q, k and v with one new projection, so adapters fused into "
            "to_q, to_k and to_v would not count; set adapters to none with it"
        )


SETTINGS = Group(
    "adapters",
    (
        Setting(
            "adapters",
            str,
            "",
            "Where the model's adapters are (docs/models.md): a folder (relative to the model's) or "
            f"s3://bucket/prefix/; none: no adapters. Empty: ${STORES_ENV}/<model>/ when set (make deploy, "
            "the local MME), else the model's adapters/ folder.",
            "a folder, s3://bucket/prefix/, none",
        ),
        Setting(
            "max_adapters",
            int,
            8,
            "Adapters kept loaded on the device; the least recently used goes.",
            "a count, 1 or more",
        ),
        Setting(
            "adapter_cache_mb",
            float,
            4096.0,
            "Disk for adapters fetched from S3; the least recently used file goes.",
            "megabytes",
        ),
    ),
    _check,
)


def store_location(setting: str, model: str, folder: Path) -> Optional[str]:
    """Where a model's adapters are: its `adapters` setting (a folder, relative to the model's folder, or
    s3://...), else $SDMME_ADAPTERS/<model>/ (make deploy and the local MME set it), else its adapters/
    folder. None when the setting is "none"."""
    if setting == "none":
        return None
    if setting:
        return setting if "://" in setting else str(folder / setting)
    root = os.environ.get(STORES_ENV, "")
    if root:
        return f"{root.rstrip('/')}/{model}/"
    return str(folder / FOLDER)
