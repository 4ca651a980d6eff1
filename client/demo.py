"""`make demo`: start tritonserver on model_repository/, call all four models, write images to out/."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from client.triton import TritonClient
from deploy.local.tritonserver import TritonServer


def scene(size: int = 512) -> Image.Image:
    """A synthetic input picture (no download needed): sky, ground, a sun and a house."""
    image = Image.new("RGB", (size, size), (110, 160, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 0.65, size, size], fill=(70, 140, 60))
    draw.ellipse([size * 0.7, size * 0.08, size * 0.88, size * 0.26], fill=(250, 220, 90))
    draw.rectangle([size * 0.2, size * 0.4, size * 0.5, size * 0.7], fill=(180, 80, 60))
    draw.polygon(
        [(size * 0.15, size * 0.4), (size * 0.35, size * 0.22), (size * 0.55, size * 0.4)], fill=(90, 50, 40)
    )
    return image


def center_mask(size: int = 512) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7], fill=255)
    return mask


def run(client: TritonClient, out: Path, seed: int) -> list:
    out.mkdir(parents=True, exist_ok=True)
    source, mask = scene(), center_mask()
    source.save(out / "input.png")
    mask.save(out / "mask.png")
    calls = {  # command: (model, prompt, image inputs)
        "txt2img": ("sd_base", "a watercolor painting of a lighthouse at dawn", {}),
        "depth": ("sd_depth", "a house in a snowy landscape", {"image": source}),
        "inpaint": ("sd_inpaint", "a red balloon", {"image": source, "mask_image": mask}),
        "upscale": ("sd_upscale", "a house, sharp, detailed", {"image": source.resize((128, 128))}),
    }
    written = []
    for name, (model, prompt, images) in calls.items():
        start = time.monotonic()
        for i, data in enumerate(client.generate(model, prompt, images=images, seed=seed)):
            path = out / f"{name}-{i}.jpg"
            path.write_bytes(data)
            written.append(path)
            size = Image.open(path).size
            print(f"{model}: {size[0]}x{size[1]} -> {path} ({time.monotonic() - start:.1f}s)")
    return written


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print("starting tritonserver (log in out/tritonserver.log) ...")
    args.out.mkdir(parents=True, exist_ok=True)
    with TritonServer(
        args.model_repository.resolve(), log_file=(args.out / "tritonserver.log").resolve()
    ) as server:
        run(TritonClient(server.url), args.out, args.seed)
    print("server stopped")


if __name__ == "__main__":
    main()
