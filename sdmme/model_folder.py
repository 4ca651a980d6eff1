"""A model folder, as Triton, the packager and the model itself read it; its config.pbtxt written from the
spec.

    <name>/config.pbtxt          the contract of its kind (sdmme/spec.py), and its parameters
    <name>/1/model.py            the same three lines in every model (sdmme.triton_model)
    <name>/1/weights/            the diffusers layout, fp16 safetensors, with source.json
    <name>/1/compile/            compile artifacts (sdmme.pipeline.compile_artifacts), when built
    <name>/adapters/             its adapters (sdmme.adapters), when it has any
    <name>/sdmme-archive.json    in an archive only: the model it holds (make package writes it)

A model's contract (inputs, outputs, batching) follows from its kind alone, so config.pbtxt is written
by the commands that make model folders (`make weights`, `make model`) from the spec, and only its
`parameters` are the operator's: rewriting a folder keeps them. Nothing compares two copies of the
contract. Light: the packager and the clients read folders without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

from sdmme.spec import MODELS, OUTPUTS

CONFIG = "config.pbtxt"
VERSION = "1"
MODEL_PY = "model.py"
WEIGHTS = "weights"
MANIFEST = "sdmme-archive.json"
# The config.pbtxt parameter that says which of MODELS a model is: its pipeline, inputs and gen_args.
# Model names are free (`make model`); the kind is what the shared model code needs.
KIND_PARAMETER = "kind"
MAX_BATCH_SIZE = 8  # requests per execute(); batching.MAX_IMAGES_PER_CALL bounds the images of a call

MODEL_PY_TEXT = '''"""Every model's model.py: the shared implementation; config.pbtxt's `kind` parameter says
what it is."""

from sdmme.triton_model import DiffusionModel


class TritonPythonModel(DiffusionModel):
    pass
'''

_PARAMETER = re.compile(
    r'parameters:\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', re.S
)


def weights_dir(folder: Path) -> Path:
    return folder / VERSION / WEIGHTS


def parameters_in(config_text: str) -> Dict[str, str]:
    """The `parameters` a config.pbtxt sets (string values, as Triton hands them to the model)."""
    return dict(_PARAMETER.findall(config_text))


def parameters_text(parameters: Dict[str, str]) -> str:
    """config.pbtxt lines setting these `parameters` (what parameters_in reads back)."""
    return "".join(
        f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        for key, value in parameters.items()
    )


def kind_in(config_text: str) -> Optional[str]:
    """The kind a config.pbtxt declares, or None."""
    return parameters_in(config_text).get(KIND_PARAMETER)


def config_text(name: str, kind: str, parameters: Optional[Dict[str, str]] = None) -> str:
    """The whole config.pbtxt of a model of `kind`: its contract from the spec, then `parameters`."""
    spec = MODELS[kind]
    inputs = ",\n".join(
        f'  {{ name: "{item}" data_type: TYPE_STRING dims: [ 1 ]'
        + (" optional: true" if item not in spec.required_inputs else "")
        + " }"
        for item in spec.inputs
    )
    outputs = ",\n".join(f'  {{ name: "{item}" data_type: TYPE_STRING dims: [ -1 ] }}' for item in OUTPUTS)
    others = {k: v for k, v in (parameters or {}).items() if k != KIND_PARAMETER}
    return f"""name: "{name}"
# Written from sdmme/spec.py by make weights and make model: edit only the parameters at the end.
backend: "python"
# What this model is (sdmme/spec.py): its pipeline, inputs and gen_args. The name is free.
{parameters_text({KIND_PARAMETER: kind}).rstrip()}
max_batch_size: {MAX_BATCH_SIZE}
input [
{inputs}
]
# generated_image: base64 of each image (the AWS sample's JSON). generated_image_bytes: the image files
# themselves, for Triton's binary tensor extension. warnings: what the caller should know (e.g. a prompt
# cut to the text encoder's 77 tokens). A request gets what it asks for; naming none, base64 alone.
output [
{outputs}
]
# Requests that arrive while a call runs are queued and batched into the next execute(); a lone request
# waits at most 5 ms for company (0.5% of a 1 s request). The queue is bounded: when full, a request is
# refused at once ("Exceeds maximum queue size"), and one that waited 30 s is refused then, so that with
# the 30 s time budget (time_budget_s) no request outlives SageMaker's 60 s.
dynamic_batching {{
  max_queue_delay_microseconds: 5000
  default_queue_policy {{ max_queue_size: 32 timeout_action: REJECT default_timeout_microseconds: 30000000 }}
}}
# No instance_group: Triton gives one instance per GPU where there are GPUs, else one CPU instance.
# The model's settings (docs/settings.md), kept when make weights or make model writes this file again:
{parameters_text(others)}"""


def write(
    folder: Path, kind: str, parameters: Optional[Dict[str, str]] = None, name: Optional[str] = None
) -> Path:
    """`folder` as the model `name` (default: the folder's) of `kind`: config.pbtxt from the spec and
    1/model.py. The parameters its config.pbtxt set are kept unless `parameters` are given."""
    config = folder / CONFIG
    if parameters is None:
        parameters = parameters_in(config.read_text()) if config.is_file() else {}
    (folder / VERSION).mkdir(parents=True, exist_ok=True)
    config.write_text(config_text(name or folder.name, kind, parameters))
    (folder / VERSION / MODEL_PY).write_text(MODEL_PY_TEXT)
    return folder


def in_repository(repository: Path) -> Dict[str, str]:
    """Every model folder in a repository and its kind."""
    return {
        config.parent.name: kind_in(config.read_text()) or "unknown"
        for config in sorted(repository.glob(f"*/{CONFIG}"))
    }


def name_of(folder: Path) -> str:
    """The model a folder holds: its archive's manifest says, whatever the folder or TargetModel is
    called (on an endpoint, Triton's name for it is a hash of the TargetModel)."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("model") or folder.name
    return folder.name
