"""The clients' HTTP behaviour without a server (``httpx.MockTransport``) or against a dead one:
retries with backoff, problem documents as exceptions, idempotent submission, content-addressed
uploads, configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fimntk.client import (
    AsyncClient,
    Client,
    ClientConfig,
    ConfigurationError,
    InvalidInputError,
    ServerUnreachableError,
    ServiceUnavailableError,
)
from fimntk.client._progress import ProgressDisplay
from fimntk.client.errors import APIError
from fimntk.service.embedded import free_port

pytestmark = pytest.mark.timeout(60)
JOB = {"id": "j_1", "status": "queued"}
UNAVAILABLE = {
    "type": "/problems/queue-unavailable",
    "title": "Queue unavailable",
    "status": 503,
    "detail": "cannot reach the queue",
}


def _mock(answers: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        request.read()
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return httpx.MockTransport(handle)


def _client(transport: httpx.BaseTransport, retries: int = 3) -> Client:
    return Client(
        "http://fimntk.test",
        "fk_test",
        retries=retries,
        backoff=0.001,
        progress=False,
        transport=transport,
    )


def test_503_is_retried_then_succeeds() -> None:
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503, json=UNAVAILABLE),
        httpx.Response(503, json=UNAVAILABLE),
        httpx.Response(200, json=JOB),
    ]
    with _client(_mock(answers, seen)) as client:
        assert client.job("j_1") == JOB
    assert len(seen) == 3
    assert seen[0].headers["Authorization"] == "Bearer fk_test"


def test_503_after_the_retries_carries_the_problem() -> None:
    seen: list[httpx.Request] = []
    client = _client(_mock([httpx.Response(503, json=UNAVAILABLE)], seen), retries=2)
    with client, pytest.raises(ServiceUnavailableError) as info:
        client.job("j_1")
    assert len(seen) == 3
    assert info.value.status == 503 and info.value.detail == "cannot reach the queue"


def test_a_problem_document_becomes_an_exception_with_its_field() -> None:
    problem = {
        "type": "/problems/invalid-input",
        "title": "Invalid input",
        "status": 422,
        "detail": "operation 'eigenpairs' is not defined for 'kfac'",
        "field": "operations[0].op",
    }
    seen: list[httpx.Request] = []
    client = _client(_mock([httpx.Response(422, json=problem)], seen))
    with client, pytest.raises(InvalidInputError) as info:
        client.submit({"metric": "fim"})
    assert len(seen) == 1  # not retried
    error = info.value
    assert isinstance(error, ValueError) and error.field == "operations[0].op"
    assert error.problem == problem
    assert str(error) == (
        "Invalid input (422): operation 'eigenpairs' is not defined for "
        "'kfac' [field: operations[0].op]"
    )


def test_a_proxy_error_page_is_still_an_api_error() -> None:
    seen: list[httpx.Request] = []
    page = httpx.Response(502, text="<html>Bad Gateway</html>")
    client = _client(_mock([page], seen), retries=1)
    with client, pytest.raises(APIError, match=r"\(502\): <html>Bad Gateway</html>"):
        client.jobs()
    assert len(seen) == 2


def test_a_retried_submission_keeps_its_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    answers = [httpx.Response(503, json=UNAVAILABLE), httpx.Response(202, json=JOB)]
    with _client(_mock(answers, seen)) as client:
        assert client.submit({"reuse": "j_0"}) == JOB
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 2 and len(keys) == 1


def test_uploads_ask_first() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        request.read()
        held = request.url.path.endswith("a" * 8) or any(r.method == "PUT" for r in seen)
        return httpx.Response(200 if held or request.method == "PUT" else 404)

    body = b"some weights"
    with _client(httpx.MockTransport(handle)) as client:
        digest = client.upload(body)
        assert client.upload(body) == digest
    assert [r.method for r in seen] == ["HEAD", "PUT", "HEAD"]
    assert seen[1].content == body and seen[1].headers["Content-Length"] == str(len(body))
    assert digest.startswith("sha256:") and seen[1].url.path == f"/v1/blobs/{digest}"


class _Counting(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return super().handle_request(request)


def test_a_dead_server_gives_a_clear_connection_error_after_the_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    transport = _Counting()
    client = Client(url, "fk_test", retries=2, backoff=0.01, transport=transport)
    with pytest.raises(ServerUnreachableError) as info:
        client.jobs()
    assert transport.attempts == 3
    assert isinstance(info.value, ConnectionError)
    message = str(info.value)
    assert f"cannot reach the fimntk server at {url} after 3 attempts" in message
    assert "ConnectError" in message and "fimntk serve" in message


def test_the_async_client_retries_and_translates_too() -> None:
    seen: list[httpx.Request] = []
    answers = [httpx.Response(503, json=UNAVAILABLE), httpx.Response(200, json=JOB)]

    async def main() -> None:
        async with AsyncClient(
            "http://fimntk.test",
            "fk_test",
            backoff=0.001,
            progress=False,
            transport=_mock(answers, seen),
        ) as client:
            assert await client.job("j_1") == JOB
        dead = AsyncClient(f"http://127.0.0.1:{free_port()}", "k", retries=1, backoff=0.01)
        with pytest.raises(ServerUnreachableError, match="after 2 attempts"):
            await dead.jobs()
        await dead.close()

    asyncio.run(main())
    assert len(seen) == 2


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], Path]:
    for name in ("FIMNTK_URL", "FIMNTK_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config.toml"
    monkeypatch.setenv("FIMNTK_CONFIG", str(config))

    def write(text: str) -> Path:
        config.write_text(text)
        return config

    return write


def test_configuration_sources_in_order(
    clean_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ClientConfig.resolve() == ClientConfig("http://127.0.0.1:8000", None)
    clean_env('url = "http://file:1/"\napi_key = "fk_file"\n')
    assert ClientConfig.resolve() == ClientConfig("http://file:1", "fk_file")
    monkeypatch.setenv("FIMNTK_URL", "https://env:2")
    monkeypatch.setenv("FIMNTK_API_KEY", "fk_env")
    assert ClientConfig.resolve() == ClientConfig("https://env:2", "fk_env")
    assert ClientConfig.resolve("http://arg:3", "fk_arg") == ClientConfig("http://arg:3", "fk_arg")
    with pytest.raises(ConfigurationError, match="must start with http"):
        ClientConfig.resolve("gpu-box:8000")


def test_a_missing_key_says_where_to_put_one(clean_env: Callable[[str], Path]) -> None:
    with Client(
        "http://fimntk.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, json={}))
    ) as client:
        assert client.health() == {}  # no key needed
        with pytest.raises(ConfigurationError, match=r"FIMNTK_API_KEY.*config\.toml"):
            client.jobs()


def test_the_progress_bar_shows_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    job = {"status": "running", "progress": {"done": 3, "total": 10, "stage": "computing"}}
    quiet = ProgressDisplay(None, "j_quiet")  # pytest's stderr is no terminal
    quiet.update(job)
    quiet.close()
    assert not quiet.interactive and capsys.readouterr().err == ""
    bar = ProgressDisplay(True, "j_0123456789ab")
    bar.update(job)
    bar.update({**job, "progress": {"done": 10, "total": 10, "stage": "computing"}})
    bar.close()
    assert "j_0123456789 running: computing" in capsys.readouterr().err
