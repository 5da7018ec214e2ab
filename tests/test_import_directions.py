"""Which packages may load which stacks, checked in fresh interpreters (``sys.modules`` after the
import): a laptop's client and engine load nothing of the server, the worker nothing of the web.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Top-level modules of the web framework.
WEB = frozenset({"fastapi", "starlette", "uvicorn"})
#: Top-level modules of the server stack the base (laptop) install does not have.
SERVER = WEB | frozenset(
    {
        "rq",
        "redis",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "boto3",
        "botocore",
        "prometheus_client",
        "pydantic_settings",
        "fakeredis",
        "httptools",
        "uvloop",
    }
)

_DESCRIBE_A_MODEL = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from fimntk.client._shipping import ship_data, ship_model
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
ship_model(model)
ship_data(DataLoader(TensorDataset(torch.randn(5, 3)), batch_size=2))
"""

#: (what runs, stacks it must not load)
CASES = {
    "fimntk": ("import fimntk", SERVER | {"torch"}),
    "contract": ("import fimntk.contract.vocabulary", SERVER | {"torch"}),
    "engine": ("import fimntk.engine", SERVER),
    "client": ("import fimntk.client; from fimntk import Client", SERVER | {"torch"}),
    "client-describes-a-model": (_DESCRIBE_A_MODEL, SERVER),
    "client-cli": (
        "from fimntk.client.cli import build_parser; build_parser()",
        SERVER | {"torch"},
    ),
    "worker": (
        "import fimntk.worker.compute_worker, fimntk.worker.runner, fimntk.worker.tasks",
        WEB,
    ),
}


def loaded_top_level(code: str) -> set[str]:
    """Top-level module names in ``sys.modules`` after running ``code`` in a new interpreter."""
    probe = (
        f"{code}\nimport sys, json\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_loads_no_forbidden_stack(case: str) -> None:
    code, forbidden = CASES[case]
    loaded = loaded_top_level(code)
    assert "fimntk" in loaded
    assert not loaded & forbidden, f"{case} loaded {sorted(loaded & forbidden)}"


def test_the_probe_sees_a_forbidden_import() -> None:
    """The check itself: importing the API does load the web framework."""
    assert {"fastapi", "starlette"} <= loaded_top_level("import fimntk.service.main")
