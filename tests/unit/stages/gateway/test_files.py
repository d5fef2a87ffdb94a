"""The Files API and the Batches API's refusals, in-process: files in a temporary folder, no Kafka
(creating a batch for real is the integration tests' work)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.unit.stages.gateway.fakes import AUTH, MakeHttp

CONTENT = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


@pytest.fixture
async def files_http(make_http: MakeHttp, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    client, _, _ = make_http(archive_url=f"file://{tmp_path}", files_max_bytes=4096)
    async with client:
        yield client


async def upload(
    http: httpx.AsyncClient, content: bytes = CONTENT, purpose: str = "batch"
) -> httpx.Response:
    return await http.post(
        "/v1/files",
        headers=AUTH,
        files={"file": ("in.jsonl", content)},
        data={"purpose": purpose},
    )


async def test_a_file_is_uploaded_described_downloaded_listed_and_deleted(
    files_http: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await upload(files_http)
    assert response.status_code == 200, response.text
    meta = response.json()
    file_id = meta["id"]
    assert meta | {"id": "", "created_at": 0} == {
        "id": "",
        "object": "file",
        "bytes": len(CONTENT),
        "created_at": 0,
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
    assert (tmp_path / "files" / file_id / "content").read_bytes() == CONTENT
    got = await files_http.get(f"/v1/files/{file_id}", headers=AUTH)
    assert got.json() == meta
    content = await files_http.get(f"/v1/files/{file_id}/content", headers=AUTH)
    assert content.content == CONTENT
    listed = await files_http.get("/v1/files", headers=AUTH, params={"purpose": "batch"})
    assert [f["id"] for f in listed.json()["data"]] == [file_id]

    deleted = await files_http.delete(f"/v1/files/{file_id}", headers=AUTH)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        gone = await files_http.get(path, headers=AUTH)
        assert gone.status_code == 404
        assert gone.json()["error"]["message"] == f"No such File object: {file_id}"
    assert (await files_http.delete(f"/v1/files/{file_id}", headers=AUTH)).status_code == 404


@pytest.mark.parametrize("file_id", ["file-nothere", "../etc", "file-a%2F..%2Fb"])
async def test_unknown_or_malformed_file_ids_are_404(
    files_http: httpx.AsyncClient, file_id: str
) -> None:
    response = await files_http.get(f"/v1/files/{file_id}", headers=AUTH)
    assert response.status_code == 404


async def test_uploads_are_refused_clearly(files_http: httpx.AsyncClient) -> None:
    wrong = await upload(files_http, purpose="fine-tune")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    big = await upload(files_http, content=b"x" * 5000)
    assert big.status_code == 413 and "the limit is 4096 bytes" in big.json()["error"]["message"]
    no_file = await files_http.post("/v1/files", headers=AUTH, data={"purpose": "batch"})
    assert no_file.status_code == 400
    json_body = await files_http.post("/v1/files", headers=AUTH, json={"purpose": "batch"})
    assert json_body.status_code == 400
    assert "multipart/form-data" in json_body.json()["error"]["message"]
    assert (await files_http.post("/v1/files")).status_code == 401


async def test_batches_refuse_what_cannot_run(files_http: httpx.AsyncClient) -> None:
    file_id = (await upload(files_http)).json()["id"]
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    for change, param in (
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ):
        response = await files_http.post("/v1/batches", headers=AUTH, json=body | change)
        assert response.status_code == 400, change
        assert response.json()["error"]["param"] == param
    missing = await files_http.post(
        "/v1/batches", headers=AUTH, json=body | {"input_file_id": "file-gone"}
    )
    assert missing.status_code == 404
    unknown = await files_http.get("/v1/batches/batch_nothere", headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "No such Batch object: batch_nothere"
    cancel = await files_http.post("/v1/batches/batch_nothere/cancel", headers=AUTH)
    assert cancel.status_code == 404
    listed = await files_http.get("/v1/batches", headers=AUTH, params={"limit": 101})
    assert listed.status_code == 400
