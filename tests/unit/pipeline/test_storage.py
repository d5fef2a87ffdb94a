"""The object-store interface: the local-folder backend and how archive URLs choose a backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.storage import LocalStore, ObjectNotFound, S3Store, StorageError, open_store


async def test_local_store_puts_gets_lists_and_deletes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "archive")
    await store.put("topics/a/partition=0/a+0+0000000000.jsonl.gz", b"zero")
    await store.put("topics/a/partition=1/a+1+0000000000.jsonl.gz", b"one")
    await store.put("topics/b/partition=0/b+0+0000000007.jsonl.gz", b"bee")
    await store.put("top-level", b"x")

    assert await store.get("topics/a/partition=1/a+1+0000000000.jsonl.gz") == b"one"
    assert await store.list("topics/a/") == [
        "topics/a/partition=0/a+0+0000000000.jsonl.gz",
        "topics/a/partition=1/a+1+0000000000.jsonl.gz",
    ]
    assert await store.list("topics/a/partition=1") == [
        "topics/a/partition=1/a+1+0000000000.jsonl.gz"
    ]
    assert len(await store.list()) == 4
    assert await store.list("topics/zzz/") == []

    await store.put("topics/a/partition=1/a+1+0000000000.jsonl.gz", b"replaced")
    assert await store.get("topics/a/partition=1/a+1+0000000000.jsonl.gz") == b"replaced"

    await store.delete("topics/a/partition=1/a+1+0000000000.jsonl.gz")
    await store.delete("topics/a/partition=1/a+1+0000000000.jsonl.gz")  # gone already: fine
    with pytest.raises(ObjectNotFound):
        await store.get("topics/a/partition=1/a+1+0000000000.jsonl.gz")
    assert await store.list("topics/a/") == ["topics/a/partition=0/a+0+0000000000.jsonl.gz"]
    await store.close()


async def test_local_store_leaves_no_temporary_files_and_hides_writes_in_progress(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    await store.put("d/obj", b"data" * 1000)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj"]
    (tmp_path / "d" / ".obj2.1234.tmp").write_bytes(b"half")  # another writer, mid-way
    assert await store.list("d/") == ["d/obj"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/."])
async def test_local_store_refuses_keys_that_escape_or_are_ambiguous(
    tmp_path: Path, key: str
) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match="invalid object key"):
        await store.put(key, b"x")


async def test_local_store_errors_are_storage_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    store = LocalStore(blocker)
    with pytest.raises(StorageError) as info:
        await store.put("a/b", b"x")
    assert info.value.retriable
    with pytest.raises(ObjectNotFound) as missing:
        await LocalStore(tmp_path).get("nothing/here")
    assert not missing.value.retriable


def test_open_store_reads_file_urls_and_plain_paths(tmp_path: Path) -> None:
    settings = Settings()
    default = open_store(settings)
    assert isinstance(default, LocalStore) and default.root == Path(".sluice/archive")
    absolute = open_store(settings, f"file://{tmp_path}/log")
    assert isinstance(absolute, LocalStore) and absolute.root == tmp_path / "log"
    plain = open_store(settings, str(tmp_path / "plain"))
    assert isinstance(plain, LocalStore) and plain.root == tmp_path / "plain"
    relative = open_store(settings, "file://./here")
    assert isinstance(relative, LocalStore) and relative.root == Path("here")


def test_open_store_builds_an_s3_store_from_settings() -> None:
    settings = Settings(
        s3_endpoint_url="http://127.0.0.1:9000",
        s3_region="eu-west-1",
        s3_access_key_id=SecretStr("key"),
        s3_secret_access_key=SecretStr("secret"),
    )
    store = open_store(settings, "s3://bucket/some/prefix/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix")
    assert (store.endpoint_url, store.region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert "secret" not in store.url and "key" not in store.url
    bare = open_store(settings, "s3://bucket")
    assert isinstance(bare, S3Store) and bare.prefix == ""


@pytest.mark.parametrize("url", ["s3:///prefix", "gs://bucket/x", "file://"])
def test_open_store_refuses_urls_it_cannot_serve(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(Settings(), url)
