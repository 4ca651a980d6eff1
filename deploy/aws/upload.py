"""`make upload BUCKET=... PREFIX=...`: the model archives to s3://BUCKET/PREFIX/ (the MME ModelDataUrl),
and each model's adapters to s3://BUCKET/PREFIX/adapters/<model>/ (where the endpoint's models look).

An object whose stored sha256 equals the local file's is skipped. An object that differs is never
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
from typing import Dict, List, Optional, Sequence, Tuple

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from tqdm import tqdm

from deploy.aws import tarball
from deploy.aws.package import MANIFEST, read_manifest

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


ADAPTERS = "adapters"  # s3://BUCKET/PREFIX/adapters/<model>/<name>.safetensors and <name>.json


def adapters_root(bucket: str, prefix: str) -> str:
    """The S3 location of every model's adapter store (make deploy and the local MME tell the models)."""
    prefix = prefix.strip("/")
    return f"s3://{bucket}/{prefix}/{ADAPTERS}/" if prefix else f"s3://{bucket}/{ADAPTERS}/"


def adapter_files(repository: Path) -> List[Tuple[Path, str]]:
    """Each model's adapters as (file, key under the prefix); a file before its record, which goes last
    because a record tells a model its file is whole."""
    files = []
    for config in sorted(repository.glob(f"*/{ADAPTERS}/*.json")):
        model, name = config.parent.parent.name, config.name[: -len(".json")]
        for path in (config.with_suffix(".safetensors"), config):
            if not path.is_file():
                raise ValueError(f"{config.parent}: {name}.safetensors is missing beside its record")
            files.append((path, f"{ADAPTERS}/{model}/{path.name}"))
    return files


def upload(
    s3,
    archives: List[Path],
    bucket: str,
    prefix: str,
    config: Optional[TransferConfig] = None,
    callback=None,
    version: Optional[str] = None,
    replace: bool = False,
    adapters: Sequence[Tuple[Path, str]] = (),
) -> Dict[str, str]:
    """Archives, then `adapters` ((file, key under the prefix), from adapter_files). Returns {key:
    "uploaded" | "replaced" | "unchanged"}; raises Refused before sending anything when an object
    differs and `replace` is not given."""
    plan = []
    for path in archives:
        plan.append((path, key_for(prefix, path, version), True))
    for path, relative in adapters:
        plan.append((path, f"{prefix.strip('/')}/{relative}" if prefix.strip("/") else relative, False))
    plan = [
        (path, key, tarball.sha256(path), remote_sha(s3, bucket, key), is_archive)
        for path, key, is_archive in plan
    ]
    differing = [key for _, key, digest, remote, _ in plan if remote not in (MISSING, digest)]
    if differing and not replace:
        raise Refused(
            "these objects exist and differ from the local files: "
            + ", ".join(f"s3://{bucket}/{k}" for k in differing)
            + ". An MME instance that has one loaded keeps serving the old one until it unloads it, so "
            "replacing it changes what callers get at an unknown time. Upload under a new name instead "
            "(make upload VERSION=2 gives <model>-2.tar.gz; an adapter: make adapter NAME=<new name>; "
            "callers switch), or pass --replace (make upload REPLACE=1) if you accept that."
        )
    outcome = {}
    for path, key, digest, remote, is_archive in plan:
        if remote == digest:
            print(f"s3://{bucket}/{key}: unchanged (sha256 {digest[:16]}), skipped", file=sys.stderr)
            outcome[key] = "unchanged"
            continue
        metadata = {SHA_KEY: digest}
        if is_archive:
            manifest = archive_manifest(path)
            metadata.update({PYTHON_KEY: manifest["python"], ENV_KEY: manifest.get("env_path", "bundled")})
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
    """Every model under s3://bucket/prefix/: its TargetModel, kind and compile artifacts (from the
    manifest at the start of the archive, read with one ranged GET), size and adapters. What an MME
    on that prefix can serve."""
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    found, adapters = [], {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            parts = item["Key"][len(prefix) :].split("/")
            if len(parts) == 3 and parts[0] == ADAPTERS and parts[2].endswith(".json"):
                adapters.setdefault(parts[1], []).append(parts[2][: -len(".json")])
            if not item["Key"].endswith(".tar.gz"):
                continue
            head = s3.get_object(Bucket=bucket, Key=item["Key"], Range=f"bytes=0-{MANIFEST_BYTES - 1}")
            manifest = read_manifest(io.BytesIO(head["Body"].read())) or {}
            found.append(
                {
                    "target_model": item["Key"][len(prefix) :],
                    "kind": manifest.get("kind", "unknown"),
                    "bytes": item["Size"],
                    "model": manifest.get("model", "unknown"),
                    "compile_artifacts": manifest.get("compile_artifacts", []),
                }
            )
    for item in found:
        item["adapters"] = sorted(adapters.get(item["model"], []))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="sd-mme/models")
    parser.add_argument("--dist", type=Path, default=Path("dist"))
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="whose models' adapters/ go too"
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--region")
    parser.add_argument("--version", help="upload as <model>-VERSION.tar.gz (a new TargetModel)")
    parser.add_argument("--replace", action="store_true", help="replace objects that differ (see above)")
    parser.add_argument("--list", action="store_true", help="list the models under the prefix and exit")
    args = parser.parse_args()
    if args.list:
        for item in catalog(s3_client(args.endpoint_url, args.region), args.bucket, args.prefix):
            adapters = ", ".join(item["adapters"]) or "-"
            compiled = "; ".join(f"{a['mode']} for {a['device']}" for a in item["compile_artifacts"]) or "-"
            print(
                f"{item['target_model']:40} {item['kind']:12} {item['bytes'] / 1e6:10,.1f} MB"
                f"  adapters: {adapters}  compile artifacts: {compiled}"
            )
        return
    archives = sorted(args.dist.glob("*.tar.gz"))
    try:
        adapters = adapter_files(args.repository)
    except ValueError as e:
        raise SystemExit(f"make upload: {e}") from None
    if not archives and not adapters:
        raise SystemExit(f"make upload: no archives in {args.dist} (run `make package`) and no adapters")
    s3 = s3_client(args.endpoint_url, args.region)
    try:
        upload(
            s3,
            archives,
            args.bucket,
            args.prefix,
            version=args.version,
            replace=args.replace,
            adapters=adapters,
        )
    except Refused as e:
        raise SystemExit(f"make upload: refused: {e}") from None
    print(f"ModelDataUrl: s3://{args.bucket}/{args.prefix.strip('/')}/")
    if adapters:
        print(f"adapters: {adapters_root(args.bucket, args.prefix)}<model>/ (live on a running endpoint now)")


if __name__ == "__main__":
    main()
