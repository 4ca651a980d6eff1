"""What every transport shares: the AWS sample's wire format and one call per model."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Dict, List, Optional, Tuple, Union

from PIL import Image

ImageLike = Union[Image.Image, bytes, str]  # a PIL image, encoded file bytes, or a path
BASE64, FILES = "generated_image", "generated_image_bytes"  # the model's outputs (config.pbtxt)


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
        if output["name"] == BASE64:
            return [base64.b64decode(item) for item in output["data"]]
    raise ValueError(f"response has no {BASE64} output")


def binary_inputs(body: Dict[str, Any]) -> list:
    """The JSON body's inputs as tritonclient inputs carried in binary (images stay base64: the contract)."""
    import numpy as np
    import tritonclient.http as httpclient

    inputs = []
    for item in body["inputs"]:
        data = [value.encode() for value in item["data"]]
        tensor = httpclient.InferInput(item["name"], item["shape"], item["datatype"])
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_).reshape(item["shape"]), binary_data=True)
        inputs.append(tensor)
    return inputs


def binary_request(body: Dict[str, Any]) -> Tuple[bytes, int]:
    """The request in Triton's binary tensor extension, asking for the image files in binary.

    Returns the body and the size of its JSON header (the `json-header-size` SageMaker wants).
    """
    import tritonclient.http as httpclient

    outputs = [httpclient.InferRequestedOutput(FILES, binary_data=True)]
    return httpclient.InferenceServerClient.generate_request_body(binary_inputs(body), outputs=outputs)


def images_from_binary_response(data: bytes, header_length: Optional[int]) -> List[bytes]:
    import tritonclient.http as httpclient

    result = httpclient.InferenceServerClient.parse_response_body(data, header_length=header_length)
    return list(result.as_numpy(FILES).reshape(-1))


class Client:
    """One method per model; subclasses implement `infer` (JSON) and `infer_binary` for their transport.

    `binary=True`: Triton's binary tensor extension both ways, the images as files rather than base64
    inside JSON (opt-in; the AWS sample's JSON is the default).
    """

    binary = False

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def infer_binary(self, model: str, body: Dict[str, Any]) -> List[bytes]:
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
        body = request_body(prompt, negative_prompt, images or {}, gen_args)
        return (
            self.infer_binary(model, body) if self.binary else images_from_response(self.infer(model, body))
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
