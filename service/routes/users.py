"""``/v1/users``: the admin creates users and hands out their API keys."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import generate_key, hash_key
from service.deps import AdminUser, StateDep
from service.schemas import Problem, UserCreate, UserCreated

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post(
    "",
    status_code=201,
    response_model=UserCreated,
    responses={401: {"model": Problem}, 403: {"model": Problem, "description": "Not admin."}},
)
def create_user(body: UserCreate, state: StateDep, admin: AdminUser) -> UserCreated:
    """Create a user; its API key is shown only in this response (stored hashed)."""
    key = generate_key()
    user = state.records.create_user(body.name, hash_key(key))
    return UserCreated(id=user.id, name=user.name, api_key=key)
