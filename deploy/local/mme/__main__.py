"""`make mme BUCKET=... PREFIX=... MME_PORT=8080`: a local SageMaker multi-model endpoint in the foreground.

boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8080").invoke_endpoint(
    EndpointName="sd-mme", TargetModel="sd_base.tar.gz", ContentType="application/json", Body=...)
"""

import argparse
import logging
import signal
import tempfile
from pathlib import Path

from deploy.local.mme import frontend
from deploy.local.mme.service import LocalEndpoint


def _stop(signum, frame):
    raise SystemExit(f"local MME: stopping on signal {signum} (models unloaded, tritonserver stopped)")


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background, where SIGINT is ignored
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="sd-mme/models", help="ModelDataUrl is s3://BUCKET/PREFIX/")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--endpoint-name", default="sd-mme")
    parser.add_argument(
        "--max-models", type=int, default=4, help="models kept loaded; the LRU one is unloaded"
    )
    parser.add_argument(
        "--root", type=Path, help="where archives are extracted (default: a temporary folder)"
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument(
        "--python-version", help="the archives' environment Python, e.g. 3.12 (default: this Python's)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Triton's metrics on this loopback port (SAGEMAKER_TRITON_ALLOW_METRICS, as make deploy "
        "METRICS=1 sets it); default: off, as on SageMaker",
    )
    args = parser.parse_args()
    metrics = {}
    if args.metrics_port:
        metrics = {frontend.ALLOW_METRICS: "true", frontend.METRICS_PORT: str(args.metrics_port)}
    root = args.root or Path(tempfile.mkdtemp(prefix="sdmme-mme-"))
    with LocalEndpoint(
        args.bucket,
        args.prefix,
        root,
        args.port,
        args.endpoint_name,
        args.max_models,
        s3_endpoint_url=args.endpoint_url,
        python_version=args.python_version,
        env=metrics,
    ) as endpoint:
        print(
            f"local MME {args.endpoint_name} on {endpoint.url} serving s3://{args.bucket}/{args.prefix}/ "
            "(Ctrl-C stops)"
            + (f"; metrics on http://127.0.0.1:{args.metrics_port}/metrics" if metrics else ""),
            flush=True,
        )
        endpoint.serve_forever()


if __name__ == "__main__":
    main()
