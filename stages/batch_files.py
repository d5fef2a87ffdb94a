"""The Files API's storage: each file's bytes and its OpenAI ``file`` object in object storage.

Layout under the store's root (the archive's store, ``SLUICE_ARCHIVE_URL``):

- ``files/<id>/content``: the bytes, as uploaded (or as the batcher wrote them);
- ``files/<id>/file.json``: the ``FileObject``, written after the content, so a file whose
  object exists always has its bytes.

Both the gateway (uploads, downloads, deletes) and the batcher (reads input files, writes output
and error files) use it; any replica of either sees the same files.
"""

from __future__ import annotations

import re
import time
from typing import Final

from pipeline.storage import ObjectNotFound, ObjectStore
from schemas.batch import FileObject, FilePurpose
from schemas.wire import decode, encode

PREFIX: Final = "files"
_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,128}$")


class FileNotFound(ObjectNotFound):
    """No file with that id (never uploaded, deleted, or not a valid file id)."""

    reason = "file-not-found"


def _keys(file_id: str) -> tuple[str, str]:
    if not _ID.match(file_id):
        raise FileNotFound(f"no file {file_id!r}")
    return f"{PREFIX}/{file_id}/content", f"{PREFIX}/{file_id}/file.json"


class FileStore:
    """Files in an ``ObjectStore``; every method may raise ``StorageError``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(
        self, file_id: str, filename: str, purpose: FilePurpose, content: bytes
    ) -> FileObject:
        """Store ``content`` as ``file_id`` (replacing a file of that id) and return its object."""
        content_key, meta_key = _keys(file_id)
        meta = FileObject(
            id=file_id,
            bytes=len(content),
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
        )
        await self.store.put(content_key, content)
        await self.store.put(meta_key, encode(meta))
        return meta

    async def meta(self, file_id: str) -> FileObject:
        _, meta_key = _keys(file_id)
        try:
            return decode(FileObject, await self.store.get(meta_key))
        except ObjectNotFound as exc:
            raise FileNotFound(f"no file {file_id!r}") from exc

    async def content(self, file_id: str) -> bytes:
        """The file's bytes; ``FileNotFound`` when the file (its object) does not exist."""
        content_key, _ = _keys(file_id)
        await self.meta(file_id)  # a deleted file's leftover bytes are not served
        try:
            return await self.store.get(content_key)
        except ObjectNotFound as exc:
            raise FileNotFound(f"no file {file_id!r}") from exc

    async def delete(self, file_id: str) -> None:
        """Remove the file: its object first, so it is gone for readers at once."""
        content_key, meta_key = _keys(file_id)
        await self.meta(file_id)
        await self.store.delete(meta_key)
        await self.store.delete(content_key)

    async def list(self, purpose: str | None = None) -> list[FileObject]:
        """Every file (optionally of one purpose), newest first."""
        files: list[FileObject] = []
        for key in await self.store.list(f"{PREFIX}/"):
            if not key.endswith("/file.json"):
                continue
            try:
                meta = decode(FileObject, await self.store.get(key))
            except ObjectNotFound:
                continue  # deleted while listed
            if purpose is None or meta.purpose == purpose:
                files.append(meta)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=True)
        return files

    async def close(self) -> None:
        await self.store.close()
