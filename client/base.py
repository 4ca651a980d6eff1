"""What every transport shares: the AWS sample's wire format and one call per model."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Dict, List, Optional, Union

from PIL import Image

ImageLike = Union[Image.Image, bytes, str]  # a PIL image, encoded file bytes, or a path


class ModelError(Exception):
    """The model refused or failed a request; `status` is the HTTP status (400: bad input)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def encode_image(image: ImageLike) -> str:
    if isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return base64.b64encode(image).decode("ascii")


def request_body(
    prompt: str, negative_prompt: Optional[str], images: Dict[str, ImageLike], gen_args: Dict[str, Any]
) -> Dict[str, Any]:
    """The KServe v2 JSON body of the AWS sample: each input a BYTES tensor of shape [1, 1]."""
    values = {"prompt": prompt}
    if negative_prompt is not None:
        values["negative_prompt"] = negative_prompt
    values.update({name: encode_image(image) for name, image in images.items()})
    if gen_args:
        values["gen_args"] = json.dumps(gen_args)
    return {
        "inputs": [
            {"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [value]}
            for name, value in values.items()
        ]
    }


def images_from_response(response: Dict[str, Any]) -> List[bytes]:
    """Encoded image files from a KServe v2 JSON response."""
    for output in response["outputs"]:
        if output["name"] == "generated_image":
            return [base64.b64decode(item) for item in output["data"]]
    raise ValueError("response has no generated_image output")


class Client:
    """One method per model; subclasses implement `infer` for their transport."""

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def generate(
        self,
        model: str,
        prompt: str,
        negative_prompt: Optional[str] = None,
        images: Optional[Dict[str, ImageLike]] = None,
        **gen_args: Any,
    ) -> List[bytes]:
        """Encoded image files (JPEG by default; see gen_args output_format)."""
        return images_from_response(
            self.infer(model, request_body(prompt, negative_prompt, images or {}, gen_args))
        )

    def _pil(self, *args, **kwargs) -> List[Image.Image]:
        return [Image.open(io.BytesIO(data)) for data in self.generate(*args, **kwargs)]

    def txt2img(self, prompt: str, negative_prompt: Optional[str] = None, **gen_args) -> List[Image.Image]:
        return self._pil("sd_base", prompt, negative_prompt, **gen_args)

    def depth(self, image: ImageLike, prompt: str, negative_prompt: Optional[str] = None, **gen_args):
        return self._pil("sd_depth", prompt, negative_prompt, {"image": image}, **gen_args)

    def inpaint(
        self,
        image: ImageLike,
        mask_image: ImageLike,
        prompt: str,
        negative_prompt: Optional[str] = None,
        **gen_args,
    ) -> List[Image.Image]:
        return self._pil(
            "sd_inpaint", prompt, negative_prompt, {"image": image, "mask_image": mask_image}, **gen_args
        )

    def upscale(self, image: ImageLike, prompt: str = "", negative_prompt: Optional[str] = None, **gen_args):
        return self._pil("sd_upscale", prompt, negative_prompt, {"image": image}, **gen_args)
