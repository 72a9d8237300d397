"""Object storage: one interface, two backends (a local directory, and S3 / MinIO via `minio`)."""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlparse

from percept.errors import DependencyUnavailable, NotFound

# Streamed copies move this much at a time.
COPY_CHUNK_BYTES = 1024 * 1024
# S3 multipart part size for streamed uploads: the minimum S3 allows; minio keeps up to 3 in flight.
S3_PART_BYTES = 5 * 1024 * 1024


def object_key_for(sha256: str, prefix: str = "images") -> str:
    """Content address of a blob: fan out on the first hex digits so no directory grows huge."""
    return f"{prefix}/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def import_key_for(sha256: str) -> str:
    """Where an imported checkpoint zip is kept: the gateway's upload and `percept models import` name the
    same bytes the same way, so both store them once."""
    return object_key_for(sha256, prefix="imports")


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def put_file(self, key: str, file: BinaryIO, length: int, content_type: str = "application/octet-stream") -> None:
        """Store `length` bytes read from `file` (from its current position) in chunks, never whole in memory."""

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix` (a folder, e.g. `checkpoints/sd15/`), sorted."""
        ...

    def delete(self, key: str) -> None: ...

    def ping(self) -> None:
        """Raise DependencyUnavailable when the store cannot be reached."""


class _Limited:
    """At most `length` bytes of a file, read in chunks."""

    def __init__(self, file: BinaryIO, length: int) -> None:
        self.file, self.left = file, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        chunk = self.file.read(size) if size else b""
        self.left -= len(chunk)
        return chunk


class LocalObjectStore:
    """A directory on local disk; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} escapes the store")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def put_file(self, key: str, file: BinaryIO, length: int, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            shutil.copyfileobj(_Limited(file, length), tmp, COPY_CHUNK_BYTES)
        if os.path.getsize(tmp.name) != length:
            os.unlink(tmp.name)
            raise ValueError(f"the file ended before {length} bytes; nothing was stored under {key}")
        os.replace(tmp.name, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"Object {key} does not exist.", code="object_not_found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root.resolve()
        root = self.root.resolve()
        return sorted(path.relative_to(root).as_posix() for path in folder.rglob("*")
                      if path.is_file()) if folder.is_dir() else []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DependencyUnavailable(f"Object storage directory is not writable: {exc}",
                                        code="storage_unavailable") from exc


class S3ObjectStore:
    """An S3 bucket (MinIO in production, moto's server in tests), created on first use."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, region: str | None = None) -> None:
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        # Fail fast when the store is down instead of retrying for minutes inside a request.
        http = PoolManager(timeout=Timeout(connect=2, read=30), retries=Retry(total=1, backoff_factor=0.2),
                           maxsize=32)
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http)
        self.bucket = bucket
        self._bucket_ready = False

    def _call(self, fn, *args, **kwargs):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            if not self._bucket_ready:
                if not self.client.bucket_exists(self.bucket):
                    self.client.make_bucket(self.bucket)
                self._bucket_ready = True
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"Object {args[1] if len(args) > 1 else ''} does not exist.",
                               code="object_not_found") from None
            raise
        except (HTTPError, OSError) as exc:
            raise DependencyUnavailable(f"Object storage is unreachable: {exc.__class__.__name__}.",
                                        code="storage_unavailable") from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(self.client.put_object, self.bucket, key, BytesIO(data), len(data),
                   content_type=content_type)

    def put_file(self, key: str, file: BinaryIO, length: int, content_type: str = "application/octet-stream") -> None:
        # Over S3_PART_BYTES minio sends a multipart upload, reading one part at a time from the file.
        self._call(self.client.put_object, self.bucket, key, file, length, content_type=content_type,
                   part_size=S3_PART_BYTES)

    def get(self, key: str) -> bytes:
        def read(bucket: str, name: str) -> bytes:
            response = self.client.get_object(bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(read, self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.stat_object, self.bucket, key)
            return True
        except NotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        return sorted(item.object_name for item in self._call(
            lambda: list(self.client.list_objects(self.bucket, prefix=folder, recursive=True))))

    def delete(self, key: str) -> None:
        self._call(self.client.remove_object, self.bucket, key)

    def ping(self) -> None:
        self._call(lambda: None)


def object_store_from_url(url: str) -> ObjectStore:
    """`file:///abs/dir` or `s3://ACCESS:SECRET@host:port/bucket?secure=true&region=...`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalObjectStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        query = parse_qs(parsed.query)
        bucket = parsed.path.strip("/")
        if not bucket or not parsed.hostname:
            raise ValueError("storage URL must look like s3://ACCESS:SECRET@host:port/bucket")
        endpoint = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
        return S3ObjectStore(
            endpoint,
            access_key=unquote(parsed.username or ""),
            secret_key=unquote(parsed.password or ""),
            bucket=bucket,
            secure=query.get("secure", ["false"])[0].lower() in ("1", "true", "yes"),
            region=query.get("region", [None])[0],
        )
    raise ValueError(f"unsupported storage URL scheme {parsed.scheme!r}: use file:// or s3://")


class StoredCache:
    """A `percept.predictor.FeatureCache` in object storage, under `prefix/`; a miss is None."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/")

    def _key(self, key: str) -> str:
        if not key or ".." in key or key.startswith("/"):
            raise ValueError(f"not a cache key: {key!r}")
        return f"{self.prefix}/{key}"

    def get(self, key: str) -> bytes | None:
        full = self._key(key)
        return self.store.get(full) if self.store.exists(full) else None

    def put(self, key: str, data: bytes) -> None:
        self.store.put(self._key(key), data)


HASH_CHUNK_BYTES = 1024 * 1024


def store_content_addressed(store: ObjectStore, file: BinaryIO, length: int, key_for: Callable[[str], str],
                            content_type: str = "application/octet-stream") -> tuple[str, str]:
    """Hash a (spooled) upload in chunks and store it under the key its sha256 gives, unless it is there
    already; the upload is never held in memory whole. Returns (sha256, key)."""
    file.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
        digest.update(chunk)
    sha256 = digest.hexdigest()
    key = key_for(sha256)
    if not store.exists(key):
        file.seek(0)
        store.put_file(key, file, length, content_type=content_type)
    return sha256, key
