"""SageMaker's Triton images: which tag runs which Python, and where each image lives.

The Python of a packed environment must equal the Python of the image's backend stub.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TAG = "25.04"  # Python 3.12: diffusers 0.42 needs >= 3.11 (env/serving.txt)

# First release of each Python in NGC / SageMaker Triton images (Ubuntu 20.04, 22.04, 24.04).
_PYTHON_FROM = (("24.11", "3.12"), ("23.05", "3.10"), ("00.00", "3.8"))

# Tags from 23.12 on: one registry account per region, from a maintained source (the file says which).
_REGISTRIES = json.loads((Path(__file__).with_name("sagemaker_triton_registries.json")).read_text())
# Older tags lived in per-region accounts; only this one is known here.
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
    accounts = _REGISTRIES["registries"] if _key(tag) >= _key("23.12") else _LEGACY_ACCOUNTS
    if region not in accounts:
        raise ValueError(
            f"sagemaker-tritonserver:{tag} is not published in {region} as far as this table knows "
            f"(deploy/aws/sagemaker_triton_registries.json); regions: {', '.join(sorted(accounts))}"
        )
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{accounts[region]}.dkr.ecr.{region}.{domain}/{_REGISTRIES['repository']}:{tag}-py3"


def main() -> None:
    """Print the image URI of a tag in a region (make image builds on it)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--region", required=True)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args()
    print(image_uri(args.region, args.tag))


if __name__ == "__main__":
    main()
