"""Results of jobs: scalars inline, tensors as safetensors downloads."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fimntk.contract.schemas import Problem, ResultPublic
from fimntk.service.deps import CurrentUser, StateDep
from fimntk.service.openapi import Responses

router = APIRouter(prefix="/v1/jobs", tags=["results"])

_PROBLEMS: Responses = {
    401: {"model": Problem, "description": "Missing or unknown API key."},
    404: {"model": Problem, "description": "No such job or artifact, or another user's."},
    409: {"model": Problem, "description": "The job has not succeeded."},
}


@router.get("/{job_id}/result", response_model=ResultPublic, responses=_PROBLEMS)
def get_result(job_id: str, state: StateDep, user: CurrentUser) -> ResultPublic:
    """The outputs of each operation of a succeeded job."""
    return state.jobs.result(job_id, user)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "A safetensors file; tensors are named 'value' (or "
            "after the representation's parts).",
        },
        **_PROBLEMS,
    },
)
def get_artifact(job_id: str, name: str, state: StateDep, user: CurrentUser) -> FileResponse:
    """Download a tensor (or a kept representation) as safetensors."""
    state.jobs.get(job_id, user)
    path = state.artifacts.path(job_id, name)
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{job_id}-{name}.safetensors"
    )
