"""The deployment files, checked without Docker: ``docker-compose.yml`` parsed for the
structure the README promises, and the two images' Dockerfiles for their entry points."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from fimntk.core.config import Settings
from tests.service.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


def _workers(compose: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in compose["services"].items() if n.startswith("worker")}


def test_services_and_restart_policy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "api"} <= set(services)
    assert len(_workers(compose)) >= 1
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name


def test_redis_is_persistent_never_evicts_and_has_a_password(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD", command)
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def test_api_and_workers_share_database_queue_and_data(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose["volumes"])
    assert {"fimntk-data", "postgres-data", "redis-data"} <= volumes
    for name in ("api", *_workers(compose)):
        env = services[name]["environment"]
        assert env["FIMNTK_DATABASE_URL"].startswith("postgresql://")
        assert "${REDIS_PASSWORD" in env["FIMNTK_REDIS_URL"]
        assert "fimntk-data:/data" in services[name]["volumes"]
        assert set(services[name]["depends_on"]) == {"redis", "postgres"}
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert services["api"]["environment"]["FIMNTK_ADMIN_KEY"].startswith("${FIMNTK_ADMIN_KEY:?")


def test_one_worker_per_gpu_with_a_device_reservation(compose: dict[str, Any]) -> None:
    seen = []
    for name, service in _workers(compose).items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        (gpu,) = device["device_ids"]
        seen.append(gpu)
        assert service["environment"]["FIMNTK_DEVICE"] == "cuda:0", name
    assert len(seen) == len(set(seen))


def test_workers_get_time_to_finish_their_job(compose: dict[str, Any]) -> None:
    env = next(iter(_workers(compose).values()))["environment"]
    limit = int(re.search(r"(\d+)\}?$", env["FIMNTK_MAX_JOB_TIMEOUT_S"]).group(1))
    assert limit <= Settings().max_job_timeout_s
    for name, service in _workers(compose).items():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert _seconds(service["stop_grace_period"]) > limit, name


def test_the_api_wins_the_cpu_over_the_workers(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"].get("cpu_shares", 1024)  # Docker's default weight
    for name, service in _workers(compose).items():
        assert service.get("cpu_shares", 1024) < api, name


def test_dockerfiles() -> None:
    api = (REPO / "docker" / "Dockerfile.api").read_text()
    worker = (REPO / "docker" / "Dockerfile.worker").read_text()
    assert 'CMD ["python", "-m", "fimntk.service"]' in api
    assert worker.startswith("# ") and "FROM nvidia/cuda:" in worker
    assert 'CMD ["python", "-m", "fimntk.worker"]' in worker
    for text in (api, worker):
        assert "USER fimntk" in text
