"""Object storage behind one small interface: a local folder or S3-compatible storage.

URLs (``SLUICE_ARCHIVE_URL``, ``--from``, ``--restore-from``):

- ``file://PATH`` or a plain path: a local folder. ``file://.sluice/archive`` is relative to the
  working directory, ``file:///var/lib/sluice`` is absolute.
- ``s3://BUCKET[/PREFIX]``: S3 or an S3-compatible store (MinIO) through aioboto3, with the
  endpoint, region and credentials from settings (``SLUICE_S3_*``; without credentials, boto's
  own chain: environment, profile, instance role). Path-style addressing, so MinIO works
  without bucket DNS names.

Keys are ``/``-separated and relative to the store's root (the folder, or the bucket prefix).
A store never retries on its own (botocore's retries are off): a caller that must ride out an
outage, the archiver, retries with backoff itself, so the stall shows in its metrics and logs
instead of hiding inside a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from pipeline.config import Settings
from pipeline.errors import SluiceError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

KeyList = list[str]

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


class StorageError(SluiceError):
    """The object store failed or could not be reached; worth retrying later."""

    retriable = True
    reason = "storage"


class ObjectNotFound(StorageError):
    """No object under that key."""

    retriable = False
    reason = "not-found"


class ObjectStore(Protocol):
    """What Sluice needs from object storage; every method may raise ``StorageError``."""

    @property
    def url(self) -> str:
        """Where the store points, for logs (never credentials)."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there; atomic for readers."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; ``ObjectNotFound`` when there is none."""
        ...

    async def list(self, prefix: str = "") -> KeyList:
        """Every key starting with ``prefix``, sorted."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""
        ...

    async def close(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A folder on the local disk: one file per object, written atomically (temp + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, self._path(key), data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the write failed; its temp file may not exist
                tmp.unlink(missing_ok=True)
            raise StorageError(f"writing {path}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"reading {path}: {exc}") from exc

    async def list(self, prefix: str = "") -> KeyList:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> KeyList:
        # Walk only below the deepest folder the prefix names.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                continue  # a write in progress
            if path.is_file():
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise StorageError(f"deleting {path}: {exc}") from exc

    async def close(self) -> None:
        return None


class S3Store:
    """A bucket (and key prefix) on S3 or an S3-compatible store, through aioboto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        from aiobotocore.config import AioConfig  # boto loads slowly: only when S3 is used

        self._config = AioConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _s3(self) -> S3Client:
        async with self._lock:
            if self._client is None:
                import aioboto3

                session = aioboto3.Session()
                self._client = await self._stack.enter_async_context(
                    session.client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        aws_access_key_id=self._access_key_id,
                        aws_secret_access_key=self._secret_access_key,
                        config=self._config,
                    )
                )
            return self._client

    @contextlib.asynccontextmanager
    async def _errors(self, op: str, key: str) -> AsyncIterator[None]:
        import aiohttp
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            if code in _NOT_FOUND:
                raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc
            raise StorageError(f"s3 {op} {key!r} in {self.url}: {code}: {exc}") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError, EOFError) as exc:
            raise StorageError(f"s3 {op} {key!r} in {self.url}: {exc!r}") from exc

    async def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        async with self._errors("put", key):
            s3 = await self._s3()
            await s3.put_object(Bucket=self.bucket, Key=full, Body=data)

    async def get(self, key: str) -> bytes:
        full = self._key(key)
        async with self._errors("get", key):
            s3 = await self._s3()
            response = await s3.get_object(Bucket=self.bucket, Key=full)
            async with response["Body"] as body:
                return await body.read()

    async def list(self, prefix: str = "") -> KeyList:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        keys: KeyList = []
        async with self._errors("list", prefix):
            s3 = await self._s3()
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][cut:] for obj in page.get("Contents", []) if "Key" in obj)
        return sorted(keys)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        async with self._errors("delete", key):
            s3 = await self._s3()
            await s3.delete_object(Bucket=self.bucket, Key=full)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def open_store(settings: Settings, url: str | None = None) -> ObjectStore:
    """The store an archive URL names (``settings.archive_url`` when ``url`` is None)."""
    url = url or settings.archive_url
    parts = urlsplit(url)
    if parts.scheme == "":
        return LocalStore(Path(url))
    if parts.scheme == "file":
        path = f"{parts.netloc}{parts.path}"
        if not path:
            raise ValueError(f"archive URL {url!r} names no folder")
        return LocalStore(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"archive URL {url!r} names no bucket (s3://BUCKET/PREFIX)")
        key_id = settings.s3_access_key_id
        secret = settings.s3_secret_access_key
        return S3Store(
            parts.netloc,
            parts.path,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=key_id.get_secret_value() if key_id else None,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    raise ValueError(f"unsupported archive URL {url!r}: use file://PATH or s3://BUCKET/PREFIX")
