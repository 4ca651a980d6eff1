"""SageMaker's Triton images: which tag runs which Python, and where each image lives.

The Python of a packed environment must equal the Python of the image's backend stub.
"""

from __future__ import annotations

DEFAULT_TAG = "24.09"

# First release of each Python in NGC / SageMaker Triton images (Ubuntu 20.04, 22.04, 24.04).
_PYTHON_FROM = (("24.11", "3.12"), ("23.05", "3.10"), ("00.00", "3.8"))

# Tags from 23.12 on are in the deep-learning-containers account; older ones in per-region accounts.
_DLC_ACCOUNT = "763104351884"
_LEGACY_ACCOUNTS = {"us-east-1": "785573368785"}


def _key(tag: str) -> tuple:
    year, month = tag.split(".")[:2]
    return int(year), int(month)


def python_for(tag: str) -> str:
    for first, python in _PYTHON_FROM:
        if _key(tag) >= _key(first):
            return python
    raise ValueError(f"unknown image tag {tag!r}")


def image_uri(region: str, tag: str = DEFAULT_TAG) -> str:
    if _key(tag) >= _key("23.12"):
        account = _DLC_ACCOUNT
    elif region in _LEGACY_ACCOUNTS:
        account = _LEGACY_ACCOUNTS[region]
    else:
        raise ValueError(f"no known account for sagemaker-tritonserver:{tag} in {region}; use 23.12 or later")
    return f"{account}.dkr.ecr.{region}.amazonaws.com/sagemaker-tritonserver:{tag}-py3"
