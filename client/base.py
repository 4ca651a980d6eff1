"""What every transport shares: the AWS sample's wire format and one call per model."""

from __future__ import annotations

import base64
import io
import json
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

from PIL import Image

from sdmme.spec import BASE64, FILES, WARNINGS

ImageLike = Union[Image.Image, bytes, str]  # a PIL image, encoded file bytes, or a path
Result = Tuple[List[bytes], List[str]]  # encoded image files, and the server's warnings
log = logging.getLogger("client")


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


def with_outputs(body: Dict[str, Any]) -> Dict[str, Any]:
    """The body asking for the base64 images and the warnings (the AWS sample names no output)."""
    return dict(body, outputs=[{"name": BASE64}, {"name": WARNINGS}])


def images_from_response(response: Dict[str, Any]) -> Result:
    """Encoded image files and warnings from a KServe v2 JSON response."""
    outputs = {output["name"]: output["data"] for output in response["outputs"]}
    if BASE64 not in outputs:
        raise ValueError(f"response has no {BASE64} output")
    return [base64.b64decode(item) for item in outputs[BASE64]], list(outputs.get(WARNINGS, []))


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

    return httpclient.InferenceServerClient.generate_request_body(
        binary_inputs(body), outputs=binary_outputs()
    )


def binary_outputs() -> list:
    import tritonclient.http as httpclient

    return [
        httpclient.InferRequestedOutput(FILES, binary_data=True),
        httpclient.InferRequestedOutput(WARNINGS, binary_data=False),
    ]


def images_from_result(result) -> Result:
    """Encoded image files and warnings from a tritonclient InferResult."""
    warnings = result.as_numpy(WARNINGS)
    warnings = (
        []
        if warnings is None
        else [w.decode() if isinstance(w, bytes) else str(w) for w in warnings.reshape(-1)]
    )
    return list(result.as_numpy(FILES).reshape(-1)), warnings


def images_from_binary_response(data: bytes, header_length: Optional[int]) -> Result:
    import tritonclient.http as httpclient

    return images_from_result(
        httpclient.InferenceServerClient.parse_response_body(data, header_length=header_length)
    )


class Client:
    """One method per model; subclasses implement `infer` (JSON) and `infer_binary` for their transport.

    `binary=True`: Triton's binary tensor extension both ways, the images as files rather than base64
    inside JSON (opt-in; the AWS sample's JSON is the default).
    """

    binary = False
    warnings: List[str] = []  # the server's warnings about the last request (also logged)

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def infer_binary(self, model: str, body: Dict[str, Any]) -> Result:
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
        if self.binary:
            files, self.warnings = self.infer_binary(model, body)
        else:
            files, self.warnings = images_from_response(self.infer(model, with_outputs(body)))
        for warning in self.warnings:
            log.warning("%s: %s", model, warning)
        return files

    def _pil(self, *args, **kwargs) -> List[Image.Image]:
        return [Image.open(io.BytesIO(data)) for data in self.generate(*args, **kwargs)]

    # `model`: any model of the method's kind by name (the default one, or one from `make model`).
    def txt2img(
        self, prompt: str, negative_prompt: Optional[str] = None, model: str = "sd_base", **gen_args
    ) -> List[Image.Image]:
        return self._pil(model, prompt, negative_prompt, **gen_args)

    def depth(
        self,
        image: ImageLike,
        prompt: str,
        negative_prompt: Optional[str] = None,
        model: str = "sd_depth",
        **gen_args,
    ):
        return self._pil(model, prompt, negative_prompt, {"image": image}, **gen_args)

    def inpaint(
        self,
        image: ImageLike,
        mask_image: ImageLike,
        prompt: str,
        negative_prompt: Optional[str] = None,
        model: str = "sd_inpaint",
        **gen_args,
    ) -> List[Image.Image]:
        return self._pil(
            model, prompt, negative_prompt, {"image": image, "mask_image": mask_image}, **gen_args
        )

    def upscale(
        self,
        image: ImageLike,
        prompt: str = "",
        negative_prompt: Optional[str] = None,
        model: str = "sd_upscale",
        **gen_args,
    ):
        return self._pil(model, prompt, negative_prompt, {"image": image}, **gen_args)
