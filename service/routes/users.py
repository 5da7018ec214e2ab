"""``/v1/users``: the admin creates users, hands out their API keys, lists and revokes them."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from fimntk.contract.schemas import Problem, UserCreate, UserCreated, UserPublic, UsersPublic
from fimntk.core.errors import ConflictError, NotFoundError
from fimntk.service.auth import generate_key, hash_key
from fimntk.service.deps import AdminUser, StateDep
from fimntk.service.openapi import Responses

router = APIRouter(prefix="/v1/users", tags=["users"])

_ADMIN_ONLY: Responses = {
    401: {"model": Problem},
    403: {"model": Problem, "description": "Not admin."},
}


@router.post(
    "",
    status_code=201,
    response_model=UserCreated,
    responses={
        409: {"model": Problem, "description": "A user of that name exists."},
        **_ADMIN_ONLY,
    },
)
def create_user(body: UserCreate, state: StateDep, admin: AdminUser) -> UserCreated:
    """Create a user; its API key is shown only in this response (stored hashed)."""
    key = generate_key()
    user = state.records.create_user(body.name, hash_key(key))
    return UserCreated(id=user.id, name=user.name, api_key=key)


@router.get("", response_model=UsersPublic, responses=_ADMIN_ONLY)
def list_users(state: StateDep, admin: AdminUser) -> UsersPublic:
    """Every user, oldest first, with whether its key was revoked."""
    return UsersPublic(items=[UserPublic(**asdict(u)) for u in state.records.list_users()])


@router.post(
    "/{user_id}/revoke",
    response_model=UserPublic,
    responses={
        404: {"model": Problem, "description": "No such user."},
        409: {"model": Problem, "description": "The admin (its key is configured)."},
        **_ADMIN_ONLY,
    },
)
def revoke_user(user_id: str, state: StateDep, admin: AdminUser) -> UserPublic:
    """Revoke a user's API key at once; the user's jobs, blobs and results stay. Create a new
    user to give the person access again."""
    if user_id == "admin":
        raise ConflictError("the admin key is set by FIMNTK_ADMIN_KEY; change it there", "user_id")
    user = state.records.revoke_user(user_id)
    if user is None:
        raise NotFoundError(f"no user {user_id!r}", "user_id")
    return UserPublic(**asdict(user))
