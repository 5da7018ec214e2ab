"""``/v1/blobs``: content-addressed, streaming uploads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from fimntk.contract.schemas import BlobPublic, Problem
from fimntk.core.errors import NotFoundError, PayloadTooLargeError
from fimntk.core.storage.blobs import check_digest
from fimntk.service.deps import CurrentUser, StateDep
from fimntk.service.openapi import Responses

router = APIRouter(prefix="/v1/blobs", tags=["blobs"])

DigestPath = Annotated[
    str,
    Path(description="'sha256:' and the hex SHA-256 of the body.", examples=["sha256:" + "0" * 64]),
]
_PROBLEMS: Responses = {
    400: {"model": Problem, "description": "Body digest differs from the URL."},
    401: {"model": Problem, "description": "Missing or unknown API key."},
    413: {"model": Problem, "description": "Body larger than the upload cap."},
    422: {"model": Problem, "description": "Malformed digest."},
}


@router.put(
    "/{digest}",
    response_model=BlobPublic,
    status_code=201,
    responses={
        200: {"model": BlobPublic, "description": "Already held for this user."},
        **_PROBLEMS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_blob(
    digest: DigestPath, request: Request, response: Response, state: StateDep, user: CurrentUser
) -> BlobPublic:
    """Upload a blob as the raw request body (not multipart).

    The body is hashed while it is written to a temporary file (by a thread, in 1 MiB
    pieces, while the next piece arrives), refused past the size cap (413) or when its digest
    differs from the URL (400), then renamed into place. Memory use does not depend on the
    size. Uploading a blob the server already holds still requires the body (proof of
    possession) but writes nothing new.
    """
    check_digest(digest)
    cap = state.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise PayloadTooLargeError(f"upload exceeds the limit of {cap} bytes", "body")
    size = await state.blobs.write(digest, request.stream(), cap)
    created = await run_in_threadpool(state.records.add_blob, user.id, digest, size)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/blobs/{digest}"
    return BlobPublic(digest=digest, size=size)


@router.head(
    "/{digest}",
    responses={
        200: {"description": "Held for this user."},
        404: {"description": "Not held for this user: upload it."},
    },
)
def head_blob(digest: DigestPath, state: StateDep, user: CurrentUser) -> Response:
    """Whether the server holds this blob for you, so that a client can skip the upload."""
    check_digest(digest)
    if not state.records.owns_blob(user, digest) or not state.blobs.exists(digest):
        raise NotFoundError(f"no blob {digest}", "digest")
    size = state.blobs.path(digest).stat().st_size
    return Response(status_code=200, headers={"Content-Length": str(size)})
