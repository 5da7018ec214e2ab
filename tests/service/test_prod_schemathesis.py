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
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.service.conftest import ADMIN_KEY, auth

pytestmark = pytest.mark.timeout(300)

_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))


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


schema = schemathesis.pytest.from_fixture("api_schema")


#: A schema-valid request may still be refused for what the schema cannot say (a blob not
#: uploaded, a digest that does not match the body): a 4xx there is right, not a violation.
_EXCLUDED = [positive_data_acceptance]


@schema.parametrize()
@_SETTINGS
def test_no_server_error_nor_schema_violation(case: Any, user_key: str, worker: Any) -> None:
    key = ADMIN_KEY if case.path.startswith(("/v1/users", "/v1/admin")) else user_key
    case.call_and_validate(headers=auth(key), excluded_checks=_EXCLUDED)


def test_stateful(api_schema: Any, user_key: str, worker: Any) -> None:
    machine = api_schema.as_state_machine()

    class Machine(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            key = ADMIN_KEY if case.path.startswith(("/v1/users", "/v1/admin")) else user_key
            return {"headers": auth(key)}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=_EXCLUDED)

    Machine.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None,
                                  derandomize=True, database=None,
                                  suppress_health_check=list(HealthCheck)))
