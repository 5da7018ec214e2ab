"""``fimntk`` against the real service: submit (JSON and YAML, with ``@file`` uploads),
status, wait, result, jobs, cancel, keys, the admin overview, and ``--help`` everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fimntk import engine
from fimntk.client import cli
from fimntk.client.errors import NotFoundError
from tests.client.conftest import BATCH, Server, make_loader, make_model
from tests.service.conftest import REPO

pytestmark = pytest.mark.timeout(120)
COMMANDS = [
    ["serve"],
    ["worker"],
    ["demo"],
    ["submit"],
    ["status"],
    ["wait"],
    ["result"],
    ["jobs"],
    ["cancel"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "revoke"],
]
ARCH = {
    "kind": "sequential",
    "layers": [
        {"type": "Linear", "args": [4, 6]},
        {"type": "Tanh"},
        {"type": "Linear", "args": [6, 3]},
    ],
}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    assert "example:\n  fimntk " in capsys.readouterr().out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def as_alice(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("FIMNTK_URL", server.url)
    monkeypatch.setenv("FIMNTK_API_KEY", server.keys["alice"])
    return server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights, data and a vector as safetensors files beside the specs."""
    root = tmp_path_factory.mktemp("specs")
    model = make_model()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(root / "weights.safetensors"),
    )
    inputs, targets = make_loader().dataset.tensors
    save_file({"inputs": inputs, "targets": targets}, str(root / "data.safetensors"))
    d = sum(p.numel() for p in model.parameters())
    save_file({"vector": torch.linspace(-1, 1, d)}, str(root / "v.safetensors"))
    return root


def _spec(**changes: Any) -> dict[str, Any]:
    spec = {
        "model": {"weights": "@weights.safetensors", "architecture": ARCH},
        "dataset": {"blob": "@data.safetensors", "batch_size": BATCH},
        "metric": "fim",
        "representation": "dense",
        "operations": [{"op": "trace"}, {"op": "vTMv", "v": "@v.safetensors"}, {"op": "get_diag"}],
    }
    return spec | changes


def test_submit_wait_status_result(
    as_alice: Server, files: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    reference = engine.FIM(make_model(), make_loader(), "dense")
    (files / "job.json").write_text(json.dumps(_spec()))
    code, out, _ = _run(capsys, "submit", str(files / "job.json"), "--wait")
    assert code == 0, out
    lines = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    torch.testing.assert_close(
        torch.tensor(float(lines["[0] trace.value"])), reference.trace(), rtol=1e-4, atol=1e-6
    )
    assert lines["[2] get_diag.value"].startswith("tensor float32 [51]")

    (files / "job.yaml").write_text(yaml.safe_dump(_spec(operations=[{"op": "get_diag"}])))
    code, out, _ = _run(capsys, "submit", str(files / "job.yaml"))
    job_id = out.strip()
    assert code == 0 and job_id.startswith("j_")
    assert _run(capsys, "wait", job_id)[:2] == (0, f"{job_id} succeeded\n")
    code, out, _ = _run(capsys, "status", job_id)
    assert code == 0 and "status          succeeded" in out and "progress        done" in out
    status = json.loads(_run(capsys, "status", job_id, "--json")[1])
    assert status["id"] == job_id and status["representation"] == "dense"

    code, out, _ = _run(capsys, "result", job_id, "--out", str(tmp_path / "out"))
    assert code == 0 and f"saved to {tmp_path / 'out'}" in out
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    name = saved["operations"][0]["outputs"]["value"]["name"]
    diag = load_file(str(tmp_path / "out" / f"{name}.safetensors"))["value"]
    torch.testing.assert_close(diag, reference.get_diag(), rtol=1e-4, atol=1e-6)

    code, out, _ = _run(capsys, "jobs", "--status", "succeeded", "--rep", "dense")
    assert code == 0 and job_id in out and out.startswith("ID ")
    listed = json.loads(_run(capsys, "jobs", "--json", "--limit", "1")[1])
    assert [j["id"] for j in listed] == [job_id]


def test_failures_and_cancel(
    as_alice: Server, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "bad.json").write_text(
        json.dumps(_spec(dataset={"blob": "@data.safetensors", "batch_size": BATCH, "subset": 100}))
    )
    code, out, err = _run(capsys, "submit", str(files / "bad.json"), "--wait")
    assert code == 1
    assert (
        "failed: Invalid input (422): subset 100 exceeds the 12 examples "
        "[field: dataset.subset]" in err
    )
    failed_id = err.splitlines()[-1].split()[0]
    code, _, err = _run(capsys, "cancel", failed_id)
    assert code == 1 and "Conflict (409)" in err and "already failed" in err
    (files / "refused.json").write_text(
        json.dumps(_spec(representation="kfac", operations=[{"op": "eigenpairs", "k": 2}]))
    )
    code, _, err = _run(capsys, "submit", str(files / "refused.json"))
    assert code == 1 and "[field: operations[0].op]" in err

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    save_file(
        {k: v.contiguous() for k, v in wide.state_dict().items()}, str(files / "wide.safetensors")
    )
    save_file({"inputs": torch.randn(4000, 4)}, str(files / "big.safetensors"))
    architecture = {
        "kind": "sequential",
        "layers": [
            {"type": "Linear", "args": [4, 256]},
            {"type": "Tanh"},
            {"type": "Linear", "args": [256, 10]},
        ],
    }
    (files / "slow.json").write_text(
        json.dumps(
            _spec(
                model={"weights": "@wide.safetensors", "architecture": architecture},
                dataset={"blob": "@big.safetensors", "batch_size": 50},
                operations=[{"op": "trace"}],
            )
        )
    )
    code, out, _ = _run(capsys, "submit", str(files / "slow.json"))
    slow_id = out.strip()
    code, out, _ = _run(capsys, "cancel", slow_id)
    assert code == 0 and slow_id in out
    code, _, err = _run(capsys, "wait", slow_id, "--timeout", "60")
    assert code == 1 and f"{slow_id} canceled" in err


def test_keys_and_the_admin_overview(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FIMNTK_URL", server.url)
    admin = ["--key", server.keys["admin"]]
    code, out, _ = _run(capsys, "keys", "create", "bob", *admin)
    assert code == 0
    bob_id = out.split()[1]
    bob_key = out.splitlines()[1].removeprefix("api key: ")
    assert _run(capsys, "jobs", "--key", bob_key)[:2] == (0, "no jobs\n")
    code, out, _ = _run(capsys, "keys", "list", *admin)
    assert code == 0 and any(bob_id in line and "active" in line for line in out.splitlines())
    code, out, _ = _run(capsys, "keys", "revoke", bob_id, *admin)
    assert code == 0 and f"revoked the key of {bob_id} (bob)" in out
    code, _, err = _run(capsys, "jobs", "--key", bob_key)
    assert code == 1 and "Authentication required (401): unknown API key" in err
    users = json.loads(_run(capsys, "keys", "list", "--json", *admin)[1])
    assert {u["name"]: u["revoked"] for u in users}["bob"] is True
    code, _, err = _run(capsys, "keys", "revoke", "admin", *admin)
    assert code == 1 and "FIMNTK_ADMIN_KEY" in err
    code, _, err = _run(capsys, "keys", "create", "eve", "--key", server.keys["alice"])
    assert code == 1 and "Forbidden (403)" in err

    code, out, _ = _run(capsys, "status", *admin)
    assert code == 0 and out.startswith(f"queue {server.settings.queue_name}: reachable")
    assert "workers (1):" in out and "recent failures" in out
    code, _, err = _run(capsys, "status", "--key", server.keys["alice"])
    assert code == 1 and "needs the admin key" in err

    def missing(self: Any) -> Any:
        raise NotFoundError({"status": 404, "title": "Not Found", "detail": "Not Found"})

    monkeypatch.setattr(cli.Client, "admin_status", missing)
    code, _, err = _run(capsys, "status", *admin)
    assert code == 1 and "no admin overview" in err


def test_reading_commands_need_no_torch(server: Server) -> None:
    code = (
        "import sys; from client.cli import main; rc = main(['jobs', '--limit', '2']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    env = {
        **os.environ,
        "FIMNTK_URL": server.url,
        "FIMNTK_API_KEY": server.keys["alice"],
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(("ID ", "no jobs"))


def test_submit_uploads_a_probe_and_a_wrong_one_fails_the_job(
    as_alice: Server, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = make_loader().dataset.tensors[0][:3]
    with torch.no_grad():
        outputs = make_model()(inputs)
    for name, shift in (("probe", 0.0), ("bad-probe", 1.0)):
        save_file(
            {"inputs": inputs, "outputs": outputs + shift}, str(files / f"{name}.safetensors")
        )
    model = {"weights": "@weights.safetensors", "architecture": ARCH}
    (files / "good.json").write_text(
        json.dumps(_spec(model={**model, "probe": "@probe.safetensors"}))
    )
    assert _run(capsys, "submit", str(files / "good.json"), "--wait")[0] == 0
    (files / "bad.json").write_text(
        json.dumps(_spec(model={**model, "probe": "@bad-probe.safetensors"}))
    )
    code, out, err = _run(capsys, "submit", str(files / "bad.json"), "--wait")
    assert code != 0 and "differ from the client" in out + err, (out, err)
