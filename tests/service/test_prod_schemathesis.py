"""Schemathesis against the OpenAPI spec, in-process over ASGI: every operation with generated
inputs, then stateful sequences following links (e.g. ``POST /v1/jobs`` -> ``GET
/v1/jobs/{job_id}``). No 500, no response that violates the schema.

Examples are bounded so that the whole module takes about a minute on two cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.service.conftest import ADMIN_KEY, auth

pytestmark = pytest.mark.timeout(300)

_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def app(client: TestClient) -> FastAPI:
    return client.app  # type: ignore[return-value]


@pytest.fixture(scope="module")
def user_key(client: TestClient) -> str:
    response = client.post("/v1/users", json={"name": "fuzz"}, headers=auth(ADMIN_KEY))
    return str(response.json()["api_key"])


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _auth(case: Any, key: str) -> dict[str, str]:
    """The real key in place of the generated ``Authorization`` header; none when the case
    left the header out (a negative case testing that it is required: adding it back would
    turn the case valid)."""
    return auth(key) if "Authorization" in (case.headers or {}) else {}


#: A schema-valid request may still be refused for what the schema cannot say (a blob not
#: uploaded, a digest that does not match the body): a 4xx there is right, not a violation.
_EXCLUDED = [positive_data_acceptance]


def test_no_server_error_nor_schema_violation(api_schema: Any, user_key: str, worker: Any) -> None:
    """Every operation of the schema, each with its own Hypothesis run. The operations are
    driven from here rather than by schemathesis' pytest plugin, which reaches into pytest
    internals that pytest 9.2 removed."""
    failures: list[str] = []
    labels: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @_SETTINGS
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            key = ADMIN_KEY if case.path.startswith(("/v1/users", "/v1/admin")) else user_key
            case.call_and_validate(headers=_auth(case, key), excluded_checks=_EXCLUDED)

        try:
            check()
        except Exception as exc:  # one operation's failure must not hide the others'
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}")
    assert len(labels) >= 10, labels
    assert not failures, "\n\n".join(failures)


def test_stateful(api_schema: Any, user_key: str, worker: Any) -> None:
    machine = api_schema.as_state_machine()

    class Machine(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            key = ADMIN_KEY if case.path.startswith(("/v1/users", "/v1/admin")) else user_key
            return {"headers": _auth(case, key)}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=_EXCLUDED)

    Machine.run(
        settings=settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
