"""Where a model's adapters live: a folder, or an S3 prefix fetched into a bounded disk cache.

Either way an adapter is `<name>.safetensors` with its record `<name>.json` (written by make adapter;
the record is written last, so a record means a whole file). Names are immutable, like archives: an
adapter is fetched once, and the first requests for a cold one wait for that one fetch (a file lock,
so instances of a model in other processes wait too). A fetched file is checked against its record
before it is kept: a truncated or corrupt one is never cached.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from sdmme.adapters.files import RECORD, AdapterError, sha256

log = logging.getLogger("sdmme")
SUFFIX = ".safetensors"


class StoreError(Exception):
    """The store did not answer (S3 unreachable, no permission): the requests that needed it fail, and
    may be retried."""


def parse_record(name: str, location: str, text: bytes) -> dict:
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or "sha256" not in record:
        raise AdapterError(
            f"adapter {name} in {location}: its record {name}{RECORD} is not one make adapter writes "
            "(JSON with its bytes and sha256)"
        )
    return record


class LocalStore:
    """A folder: the model's own adapters/ (make adapter writes there), or any path."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.location = str(folder)

    def record(self, name: str) -> Optional[dict]:
        path = self.folder / f"{name}{RECORD}"
        return parse_record(name, self.location, path.read_bytes()) if path.is_file() else None

    def path(self, name: str, record: dict) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def on_disk(self, name: str, record: dict) -> bool:
        return True

    def discard(self, name: str, record: dict) -> None:
        """A bad file stays where its owner put it; nothing of it was kept."""


class S3Store:
    """s3://bucket/prefix/, with a disk cache of at most `cache_bytes` (least recently used go first)."""

    def __init__(self, url: str, cache: Path, cache_bytes: int, client=None):
        parsed = urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.location = f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"
        self.cache, self.cache_bytes = cache, cache_bytes
        self._client = client

    @property
    def s3(self):
        if self._client is None:
            import boto3  # credentials as on any AWS host: the execution role on SageMaker

            self._client = boto3.client("s3")
        return self._client

    def key(self, filename: str) -> str:
        return f"{self.prefix}/{filename}" if self.prefix else filename

    def _failed(self, what: str, error: Exception) -> StoreError:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", type(error).__name__)
        return StoreError(
            f"the adapter store {self.location} did not answer {what} ({code}: {str(error)[:200]})"
        )

    def record(self, name: str) -> Optional[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(f"{name}{RECORD}"))["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise self._failed(f"for {name}{RECORD}", e) from None
        except BotoCoreError as e:
            raise self._failed(f"for {name}{RECORD}", e) from None
        return parse_record(name, self.location, body)

    def _cached(self, name: str, record: dict) -> Path:
        return self.cache / f"{name}-{str(record.get('sha256'))[:16]}{SUFFIX}"

    def on_disk(self, name: str, record: dict) -> bool:
        """Whether path() will find the file in the cache rather than fetch it."""
        return self._cached(name, record).is_file()

    def path(self, name: str, record: dict) -> Path:
        """The adapter's file in the cache, fetched once and checked against its record first."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.cache.mkdir(parents=True, exist_ok=True)
        dest = self._cached(name, record)
        with open(self.cache / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch; the others wait for it, then find the file
            if dest.is_file():
                os.utime(dest)
                return dest
            partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
            start = time.monotonic()
            try:
                self.s3.download_file(self.bucket, self.key(f"{name}{SUFFIX}"), str(partial))
            except (ClientError, BotoCoreError) as e:
                partial.unlink(missing_ok=True)
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    raise AdapterError(
                        f"adapter {name} in {self.location} has a record but no {name}{SUFFIX}: "
                        "upload it again"
                    ) from None
                raise self._failed(f"for {name}{SUFFIX}", e) from None
            size = partial.stat().st_size
            if size != record.get("bytes") or sha256(partial) != record.get("sha256"):
                partial.unlink()
                raise AdapterError(
                    f"adapter {name} in {self.location} is not the file its record describes ({size} bytes; "
                    f"the record says {record.get('bytes')} and its sha256): truncated or corrupt, not kept"
                )
            partial.rename(dest)
            log.info(
                "adapter %s: fetched from %s (%.1f MB in %.2fs)",
                name,
                self.location,
                size / 1e6,
                time.monotonic() - start,
            )
        self._bound(keep=dest)
        return dest

    def discard(self, name: str, record: dict) -> None:
        """A fetched file the model refused (another architecture) is not kept."""
        self._cached(name, record).unlink(missing_ok=True)

    def _bound(self, keep: Path) -> None:
        files = sorted(self.cache.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.cache_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                log.info(
                    "adapter cache %s: deleted %s (least recently used) to stay under %.0f MB",
                    self.cache,
                    path.name,
                    self.cache_bytes / 1e6,
                )


def open_store(location: str, cache: Path, cache_bytes: int):
    if location.startswith("s3://"):
        if not urlparse(location).netloc:
            raise ValueError(f"adapter store {location!r}: an S3 store is s3://bucket/prefix/")
        return S3Store(location, cache, cache_bytes)
    if "://" in location:
        raise ValueError(f"adapter store {location!r}: a folder or s3://bucket/prefix/, nothing else")
    return LocalStore(Path(location))
