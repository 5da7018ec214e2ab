"""Issue 19: workers never die silently (defects 12 and 14).

A bad configuration stops a worker at start with a clear message; ``fimntk serve``'s worker is
started again when it dies, and given up on when it cannot start; with no live worker,
``/readyz`` answers 503 and a queued job fails with ``no-worker`` instead of waiting forever;
the generated admin key is kept and reused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from fimntk.core.config import Settings
from fimntk.service.embedded import kept_admin_key
from fimntk.service.main import create_app
from fimntk.service.worker_supervisor import SupervisedWorker
from tests.service.conftest import ADMIN_KEY, REDIS_URL, REPO, auth, wait_job
from tests.service.models import ARCH, upload_all

_BAD_MODULES = '["no_such_builder_module_issue19"]'


def _until(condition, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_admin_key_kept_0600_and_reused(tmp_path: Path) -> None:
    first = kept_admin_key(tmp_path)
    assert kept_admin_key(tmp_path) == first
    assert (tmp_path / "admin.key").stat().st_mode & 0o777 == 0o600


def test_bad_configuration_stops_the_worker_at_start(settings: Settings) -> None:
    env = {
        **os.environ,
        "FIMNTK_DATA_DIR": str(settings.data_dir),
        "FIMNTK_DATABASE_URL": settings.resolved_database_url,
        "FIMNTK_REDIS_URL": REDIS_URL,
        "FIMNTK_QUEUE_NAME": f"fimntk-bad-{uuid.uuid4().hex[:8]}",
        "FIMNTK_BUILDER_MODULES": _BAD_MODULES,
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "fimntk", "worker"],
        env=env,
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode != 0
    assert b"bad configuration" in done.stderr and b"no_such_builder_module_issue19" in done.stderr


def test_serve_restarts_its_worker_and_gives_up_on_a_bad_one(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    own = settings.model_copy(update={"queue_name": f"fimntk-sup-{uuid.uuid4().hex[:8]}"})
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    worker = SupervisedWorker(own, REDIS_URL, tmp_path / "worker.log")
    worker.start()
    try:
        assert worker.process is not None
        first = worker.process.pid
        os.kill(first, signal.SIGKILL)
        _until(lambda: worker.process is not None and worker.process.pid != first)
        assert worker.restarts == 1 and worker.process.poll() is None
    finally:
        worker.stop()
    assert worker.process.poll() is not None

    monkeypatch.setenv("FIMNTK_BUILDER_MODULES", _BAD_MODULES)
    bad = SupervisedWorker(own, REDIS_URL, tmp_path / "bad.log")
    bad.start()
    try:
        _until(lambda: bad.gave_up, timeout=180)
    finally:
        bad.stop()
    assert b"bad configuration" in (tmp_path / "bad.log").read_bytes()


def test_queued_job_fails_when_no_worker_listens(settings: Settings) -> None:
    lonely = settings.model_copy(
        update={
            "queue_name": f"fimntk-lonely-{uuid.uuid4().hex[:8]}",
            "max_queued_without_worker_s": 1.0,
            "reaper_interval_s": 0.2,
        }
    )
    with TestClient(create_app(lonely)) as client:
        assert client.get("/readyz").status_code == 503
        name = f"lonely-{uuid.uuid4().hex[:6]}"
        response = client.post("/v1/users", json={"name": name}, headers=auth(ADMIN_KEY))
        key = response.json()["api_key"]
        up = upload_all(client, key)
        spec = {
            "model": {**up.spec_model, "architecture": ARCH},
            "dataset": {"blob": up.dataset, "batch_size": 4},
            "metric": "fim",
            "representation": "diag",
            "operations": [{"op": "trace"}],
        }
        job = client.post("/v1/jobs", json=spec, headers=auth(key)).json()
        done = wait_job(client, key, job["id"], timeout=30)
        assert done["status"] == "failed"
        assert done["error"]["type"].endswith("no-worker")
        assert "no worker has listened" in done["error"]["detail"]
