"""Command line: `python -m client {txt2img,depth,inpaint,upscale} PROMPT [options]`.

Every gen_args option comes from sdmme.spec, with its type, range or choices and default.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import List, Optional

from PIL import Image

from client.base import Client, ModelError
from sdmme.spec import MAX_STACKED_ADAPTERS, MODELS, AdapterParam, Param

COMMANDS = {"txt2img": "sd_base", "depth": "sd_depth", "inpaint": "sd_inpaint", "upscale": "sd_upscale"}


def _option(param: Param) -> str:
    return "--" + param.name.replace("_", "-")


def _adapter(param: AdapterParam, text: str) -> dict:
    """NAME or NAME:SCALE, checked as the server will."""
    name, _, scale = text.partition(":")
    item = {"name": name} if not scale else {"name": name, "scale": _number(scale)}
    try:
        param.validate([item])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return item


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (NAME:SCALE, e.g. ink:0.8)") from None


def adapters_arg(items: List[dict]):
    """One adapter at its default scale as a name (the simple form), else the list."""
    return items[0]["name"] if len(items) == 1 and "scale" not in items[0] else items


def _add_param(parser: argparse.ArgumentParser, param: Param) -> None:
    if isinstance(param, AdapterParam):
        parser.add_argument(
            "--lora",
            dest=param.name,
            action="append",
            type=lambda text: _adapter(param, text),
            default=argparse.SUPPRESS,
            metavar="NAME[:SCALE]",
            help=f"{param.help} Repeat to stack (at most {MAX_STACKED_ADAPTERS}); SCALE in [0, 2], "
            "default 1.",
        )
        return

    def parse(text: str):
        if param.nullable and text.lower() in ("null", "none"):
            return None
        value = param.type(text)
        try:
            return param.validate(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    default = "null" if param.default is None else param.default
    parser.add_argument(
        _option(param),
        dest=param.name,
        type=parse,
        default=argparse.SUPPRESS,
        metavar=param.type.__name__.upper(),
        help=f"{param.help} Allowed: {param.allowed()}. Default: {default}.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    transport = parser.add_argument_group("where to send requests")
    transport.add_argument(
        "--url", default="127.0.0.1:8000", help="tritonserver HTTP address (default %(default)s)"
    )
    transport.add_argument("--endpoint-name", help="call this SageMaker endpoint instead of tritonserver")
    transport.add_argument(
        "--endpoint-url", help="SageMaker runtime URL (e.g. the local MME, http://127.0.0.1:8080)"
    )
    transport.add_argument("--region", help="AWS region of the endpoint (default: the AWS configuration's)")
    transport.add_argument(
        "--model-version",
        help="with --endpoint-name: TargetModel <model>-VERSION.tar.gz (make upload VERSION=)",
    )
    transport.add_argument(
        "--binary",
        action="store_true",
        help="Triton's binary tensor extension (images as files, not base64 in JSON); default: JSON",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the images (default %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command, model in COMMANDS.items():
        spec = MODELS[model]
        sub = commands.add_parser(command, help=f"{model}: {spec.description}")
        sub.add_argument("prompt", nargs="?" if model == "sd_upscale" else None, default="")
        sub.add_argument(
            "--model",
            default=model,
            help=f"a model of this kind by name, e.g. one from `make model` (default {model})",
        )
        sub.add_argument("--negative-prompt")
        for name in spec.image_inputs:
            sub.add_argument(
                "--" + name.replace("_", "-"), required=True, type=Path, help=f"{name} file (PNG/JPEG/WebP)"
            )
        for param in spec.params:
            _add_param(sub, param)
    return parser


def make_client(args: argparse.Namespace) -> Client:
    if args.endpoint_name:
        from client.endpoint import EndpointClient

        return EndpointClient(
            args.endpoint_name,
            endpoint_url=args.endpoint_url,
            region=args.region,
            binary=args.binary,
            model_version=args.model_version,
        )
    from client.triton import TritonClient

    return TritonClient(args.url, binary=args.binary)


def run(args: argparse.Namespace, client: Client) -> List[Path]:
    spec = MODELS[COMMANDS[args.command]]
    gen_args = {p.name: getattr(args, p.name) for p in spec.params if hasattr(args, p.name)}
    if "lora" in gen_args:
        gen_args["lora"] = adapters_arg(gen_args["lora"])
    images = {name: getattr(args, name).read_bytes() for name in spec.image_inputs}
    encoded = client.generate(args.model, args.prompt, args.negative_prompt, images, **gen_args)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, data in enumerate(encoded):
        extension = Image.open(io.BytesIO(data)).format.lower().replace("jpeg", "jpg")
        path = args.out / f"{args.command}-{i}.{extension}"
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # the server's warnings
    try:
        for path in run(args, make_client(args)):
            print(path)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
