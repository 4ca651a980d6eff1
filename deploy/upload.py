"""`make upload BUCKET=... PREFIX=...`: the model archives to s3://BUCKET/PREFIX/ (the MME ModelDataUrl).

An object whose stored sha256 equals the local archive's is skipped. An object that differs is never
replaced silently: an MME instance that has a model cached keeps serving it after its S3 object
changes, so the upload stops before sending anything and says to upload under a new name (`--version`)
or to pass `--replace`. Multipart uploads are managed by boto3 and aborted on failure, so a failed
upload leaves no object behind and can simply be re-run.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Dict, List, Optional

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from tqdm import tqdm

from deploy import tarball
from deploy.package import MANIFEST, read_manifest

SHA_KEY = "sha256"  # x-amz-meta-sha256
PYTHON_KEY = "python"  # x-amz-meta-python: the archive's env Python, checked by deploy
ENV_KEY = "env"  # x-amz-meta-env: "bundled", or the image path a slim archive's environment must be at


def s3_client(endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """boto3 reads AWS_ENDPOINT_URL itself; an explicit endpoint wins."""
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)


def archive_manifest(path: Path) -> Dict:
    with open(path, "rb") as f:
        manifest = read_manifest(f)
    if manifest is None:
        raise ValueError(f"{path} does not start with its {MANIFEST}: build it with `make package`")
    return manifest


def key_for(prefix: str, path: Path, version: Optional[str] = None) -> str:
    """`<prefix>/<model>.tar.gz`, or `<prefix>/<model>-<version>.tar.gz`: the TargetModel callers name."""
    name = path.name if not version else path.name.replace(".tar.gz", f"-{version}.tar.gz")
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


MISSING = ""  # remote_sha of a key with no object


def remote_sha(s3, bucket: str, key: str) -> Optional[str]:
    """The stored sha256; None for an object without one; MISSING when there is no object."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)["Metadata"].get(SHA_KEY)
    except ClientError as e:
        if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return MISSING
        raise


class Refused(Exception):
    """Uploading would replace objects that differ; nothing was sent."""


def upload(
    s3,
    archives: List[Path],
    bucket: str,
    prefix: str,
    config: Optional[TransferConfig] = None,
    callback=None,
    version: Optional[str] = None,
    replace: bool = False,
) -> Dict[str, str]:
    """Returns {key: "uploaded" | "replaced" | "unchanged"}; raises Refused before sending anything when
    an object differs and `replace` is not given."""
    plan = []
    for path in archives:
        key = key_for(prefix, path, version)
        digest = tarball.sha256(path)
        plan.append((path, key, digest, remote_sha(s3, bucket, key)))
    differing = [key for _, key, digest, remote in plan if remote not in (MISSING, digest)]
    if differing and not replace:
        raise Refused(
            "these objects exist and differ from the local archives: "
            + ", ".join(f"s3://{bucket}/{k}" for k in differing)
            + ". An MME instance that has one loaded keeps serving the old model until it unloads it, so "
            "replacing it changes what callers get at an unknown time. Upload under a new name instead "
            "(make upload VERSION=2 gives <model>-2.tar.gz; callers switch TargetModel), or pass --replace "
            "(make upload REPLACE=1) if you accept that."
        )
    outcome = {}
    for path, key, digest, remote in plan:
        if remote == digest:
            print(f"s3://{bucket}/{key}: unchanged (sha256 {digest[:16]}), skipped", file=sys.stderr)
            outcome[key] = "unchanged"
            continue
        manifest = archive_manifest(path)
        metadata = {
            SHA_KEY: digest,
            PYTHON_KEY: manifest["python"],
            ENV_KEY: manifest.get("env_path", "bundled"),
        }
        size = path.stat().st_size
        with tqdm(total=size, unit="B", unit_scale=True, desc=path.name, file=sys.stderr) as bar:

            def progress(n: int) -> None:
                bar.update(n)
                if callback:
                    callback(n)

            s3.upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"Metadata": metadata},
                Config=config or TransferConfig(),
                Callback=progress,
            )
        print(f"s3://{bucket}/{key}: uploaded {size / 1e6:,.1f} MB", file=sys.stderr)
        outcome[key] = "uploaded" if remote == MISSING else "replaced"
    return outcome


MANIFEST_BYTES = 64 * 1024  # the manifest is the first member: well inside the first 64 KiB


def catalog(s3, bucket: str, prefix: str) -> List[Dict]:
    """Every model under s3://bucket/prefix/: its TargetModel, kind (from the manifest at the start of
    the archive, read with one ranged GET) and size. What an MME on that prefix can serve."""
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith(".tar.gz"):
                continue
            head = s3.get_object(Bucket=bucket, Key=item["Key"], Range=f"bytes=0-{MANIFEST_BYTES - 1}")
            manifest = read_manifest(io.BytesIO(head["Body"].read())) or {}
            found.append(
                {
                    "target_model": item["Key"][len(prefix) :],
                    "kind": manifest.get("kind", "unknown"),
                    "bytes": item["Size"],
                }
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="sd-mme/models")
    parser.add_argument("--dist", type=Path, default=Path("dist"))
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--region")
    parser.add_argument("--version", help="upload as <model>-VERSION.tar.gz (a new TargetModel)")
    parser.add_argument("--replace", action="store_true", help="replace objects that differ (see above)")
    parser.add_argument("--list", action="store_true", help="list the models under the prefix and exit")
    args = parser.parse_args()
    if args.list:
        for item in catalog(s3_client(args.endpoint_url, args.region), args.bucket, args.prefix):
            print(f"{item['target_model']:40} {item['kind']:12} {item['bytes'] / 1e6:10,.1f} MB")
        return
    archives = sorted(args.dist.glob("*.tar.gz"))
    if not archives:
        raise SystemExit(f"make upload: no archives in {args.dist}: run `make package` first")
    s3 = s3_client(args.endpoint_url, args.region)
    try:
        upload(s3, archives, args.bucket, args.prefix, version=args.version, replace=args.replace)
    except Refused as e:
        raise SystemExit(f"make upload: refused: {e}") from None
    print(f"ModelDataUrl: s3://{args.bucket}/{args.prefix.strip('/')}/")


if __name__ == "__main__":
    main()
