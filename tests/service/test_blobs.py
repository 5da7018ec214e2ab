"""Uploads: streaming, digest check, size cap, HEAD, ownership, authentication, and the
store's chunked hashing and writing with cleanup on failure."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from fimntk.core.config import Settings
from fimntk.core.errors import BadRequestError, PayloadTooLargeError
from fimntk.core.storage.blobs import WRITE_CHUNK, LocalBlobStore
from tests.service.conftest import MAX_UPLOAD, auth, digest_of


def _tmp_files(settings: Settings) -> list[str]:
    return os.listdir(settings.blobs_dir / "tmp")


def test_upload_then_head(client: TestClient, users: dict[str, str]) -> None:
    body = os.urandom(300_000)
    digest = digest_of(body)
    url = f"/v1/blobs/{digest}"
    assert client.head(url, headers=auth(users["alice"])).status_code == 404
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    response = client.put(url, content=chunks, headers=auth(users["alice"]))
    assert response.status_code == 201, response.text
    assert response.json() == {"digest": digest, "size": len(body)}
    head = client.head(url, headers=auth(users["alice"]))
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(body))
    again = client.put(url, content=body, headers=auth(users["alice"]))
    assert again.status_code == 200


def test_other_user_cannot_see_blob(client: TestClient, users: dict[str, str]) -> None:
    body = os.urandom(1000)
    url = f"/v1/blobs/{digest_of(body)}"
    assert client.put(url, content=body, headers=auth(users["alice"])).status_code == 201
    assert client.head(url, headers=auth(users["bob"])).status_code == 404
    assert client.head(url, headers=auth(users["admin"])).status_code == 200
    # Bob proves possession by uploading the same bytes, and then holds it too.
    assert client.put(url, content=body, headers=auth(users["bob"])).status_code == 201
    assert client.head(url, headers=auth(users["bob"])).status_code == 200


def test_digest_mismatch(client: TestClient, users: dict[str, str], settings: Settings) -> None:
    body = b"hello"
    wrong = digest_of(b"other")
    response = client.put(f"/v1/blobs/{wrong}", content=body, headers=auth(users["alice"]))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "digest"
    assert client.head(f"/v1/blobs/{wrong}", headers=auth(users["alice"])).status_code == 404
    assert _tmp_files(settings) == []


def test_oversize_streamed(client: TestClient, users: dict[str, str], settings: Settings) -> None:
    body = b"x" * (MAX_UPLOAD + 1)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length
    response = client.put(
        f"/v1/blobs/{digest_of(body)}", content=chunks, headers=auth(users["alice"])
    )
    assert response.status_code == 413
    assert response.json()["field"] == "body"
    assert _tmp_files(settings) == []


def test_oversize_declared(client: TestClient, users: dict[str, str]) -> None:
    body = b"x" * (MAX_UPLOAD + 1)
    response = client.put(
        f"/v1/blobs/{digest_of(body)}", content=body, headers=auth(users["alice"])
    )
    assert response.status_code == 413


def test_malformed_digest(client: TestClient, users: dict[str, str]) -> None:
    response = client.put("/v1/blobs/md5:abc", content=b"x", headers=auth(users["alice"]))
    assert response.status_code == 422
    assert response.json()["field"] == "digest"


def test_missing_and_wrong_key(client: TestClient) -> None:
    url = f"/v1/blobs/{digest_of(b'x')}"
    missing = client.put(url, content=b"x")
    assert missing.status_code == 401
    assert missing.json()["field"] == "Authorization"
    wrong = client.put(url, content=b"x", headers=auth("fk_not-a-key"))
    assert wrong.status_code == 401
    assert client.get("/v1/jobs", headers=auth("nope")).status_code == 401


def test_only_admin_creates_users(client: TestClient, users: dict[str, str]) -> None:
    response = client.post("/v1/users", json={"name": "eve"}, headers=auth(users["alice"]))
    assert response.status_code == 403


def test_healthz_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "database": True, "queue": True}
    schema = client.get("/openapi.json").json()
    assert "examples" in schema["components"]["schemas"]["JobCreate"]
    assert "/v1/jobs/{job_id}/cancel" in schema["paths"]


def _pieces(body: bytes, fail_after: int | None = None) -> AsyncIterator[bytes]:
    """``body`` in 64 KiB pieces, as the server receives it; a disconnect after
    ``fail_after`` bytes when given."""

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            if fail_after is not None and start >= fail_after:
                raise ClientDisconnect()
            yield body[start : start + 65536]

    return pieces()


def test_store_streams_several_write_chunks(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    body = os.urandom(2 * WRITE_CHUNK + 12345)
    digest = digest_of(body)
    assert asyncio.run(store.write(digest, _pieces(body), len(body))) == len(body)
    assert store.path(digest).read_bytes() == body
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("case", ["too-large", "disconnect", "wrong-digest"])
def test_store_leaves_nothing_on_failure(tmp_path: Path, case: str) -> None:
    store = LocalBlobStore(tmp_path)
    body = os.urandom(2 * WRITE_CHUNK + 12345)
    digest = digest_of(b"other" if case == "wrong-digest" else body)
    cap = WRITE_CHUNK + 1 if case == "too-large" else len(body)
    fail_after = WRITE_CHUNK + 65536 if case == "disconnect" else None
    expected = {
        "too-large": PayloadTooLargeError,
        "disconnect": ClientDisconnect,
        "wrong-digest": BadRequestError,
    }[case]
    with pytest.raises(expected):
        asyncio.run(store.write(digest, _pieces(body, fail_after), cap))
    assert not store.exists(digest)
    assert os.listdir(tmp_path / "tmp") == []
