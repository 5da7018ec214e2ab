"""Artifacts in an S3-compatible store, against moto's S3 server on loopback: two "boxes"
(stores with separate caches) share results, and a worker writes artifacts the API serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from safetensors.torch import load

from fimntk.core.errors import NotFoundError
from fimntk.core.storage.s3 import S3ArtifactStore
from fimntk.service.embedded import free_port
from tests.service.conftest import REDIS_URL, auth
from tests.service.prod import cleanup_queue, start_worker, stop_process
from tests.service.test_prod_faults import _settings, stack

pytestmark = pytest.mark.timeout(120)
BUCKET = "fimntk-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(name, value)
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    mp.undo()


def test_two_boxes_share_artifacts(s3_endpoint: str, tmp_path: Path) -> None:
    box_a = S3ArtifactStore(BUCKET, "lab", tmp_path / "a", s3_endpoint)
    box_b = S3ArtifactStore(BUCKET, "lab", tmp_path / "b", s3_endpoint)
    staged = box_a.staging_path("j_1", "value")
    staged.write_bytes(b"tensor bytes")
    box_a.publish("j_1", "value", staged)
    assert not staged.exists()
    assert box_b.path("j_1", "value").read_bytes() == b"tensor bytes"
    with pytest.raises(NotFoundError):
        box_b.path("j_1", "other")
    with pytest.raises(NotFoundError):
        box_b.path("../etc", "value")
    assert box_a.check_ready(0) is None
    assert "fewer than" in (box_a.check_ready(2**62) or "")
    box_a.delete_job("j_1")
    with pytest.raises(NotFoundError):
        S3ArtifactStore(BUCKET, "lab", tmp_path / "c", s3_endpoint).path("j_1", "value")


def test_worker_writes_to_s3_and_the_api_serves_it(
    s3_endpoint: str, tmp_path: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path / "api", REDIS_URL).model_copy(
        update={"artifact_url": f"s3://{BUCKET}/e2e", "s3_endpoint_url": s3_endpoint}
    )
    with stack(settings) as s:
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            job = s.submit(representation="diag", operations=[{"op": "get_diag"}])
            assert s.wait(job["id"])["status"] == "succeeded"
        finally:
            stop_process(worker)
            cleanup_queue(redis_client, settings.queue_name, s.jobs)
        keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
            Bucket=BUCKET, Prefix=f"e2e/{job['id']}/"
        )["Contents"]
        assert [k["Key"] for k in keys] == [f"e2e/{job['id']}/op0_get_diag.safetensors"]
        result = s.client.get(f"/v1/jobs/{job['id']}/result", headers=auth(s.key)).json()
        href = result["operations"][0]["outputs"]["value"]["href"]
        body = s.client.get(href, headers=auth(s.key))
        assert body.status_code == 200
        assert load(body.content)["value"].numel() == 6 * 4 + 6 + 3 * 6 + 3
        assert not any((settings.data_dir / "artifacts").glob("j_*"))
