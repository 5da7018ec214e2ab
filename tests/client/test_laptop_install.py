"""The laptop install, as a user gets it: the wheel built from this checkout, installed without
extras into a fresh virtual environment that sees torch and the wheel's own requirements only,
then ``from fimntk import Client`` and one job against the real server of these tests.

The environment is made without downloading anything: each distribution of the requirements'
closure (resolved from the wheel's ``Requires-Dist`` against this environment) is linked into a
folder that the new environment's ``.pth`` names. A missing requirement therefore fails here as
an ``ImportError``, as it would on a laptop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fimntk import engine
from tests.client.conftest import Server, make_loader, make_model
from tests.test_import_directions import SERVER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
#: What the base install may require, and nothing else.
BASE = {"torch", "numpy", "safetensors", "pydantic", "httpx", "tqdm"}

_JOB = """
import json, sys, importlib.util
import torch
from torch.utils.data import DataLoader, TensorDataset
from fimntk import Client
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).eval()
gen = torch.Generator().manual_seed(1)
inputs = torch.randn(12, 4, generator=gen)
targets = torch.randint(0, 3, (12,), generator=gen)
loader = DataLoader(TensorDataset(inputs, targets), batch_size=5)
with Client(sys.argv[1], sys.argv[2], progress=False, timeout=300) as client:
    trace = client.trace(model, loader, rep="diag")
import fimntk
missing = [m for m in sys.argv[3].split(",") if importlib.util.find_spec(m) is not None]
print(json.dumps({"trace": float(trace), "fimntk": fimntk.__file__, "server_stack_found": missing}))
"""


def _name(requirement: str) -> str:
    return metadata.distribution(requirement).metadata["Name"].lower().replace("_", "-")


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distributions needed by ``requirements`` (no extras), resolved in this environment."""
    seen: set[str] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        name = _name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement)
    return seen


def _link_distribution(name: str, into: Path) -> None:
    """Link every top-level file or folder of an installed distribution into ``into``."""
    dist = metadata.distribution(name)
    for top in {Path(str(f)).parts[0] for f in dist.files or []}:
        source = Path(str(dist.locate_file(top)))
        target = into / top
        if source.exists() and not target.exists() and not top.startswith(".."):
            target.symlink_to(source)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout's package sources (an in-tree build would
    leave ``build/`` behind)."""
    source = tmp_path_factory.mktemp("source")
    # each link's target folder (fimntk/nngeometry links nngeometry_compat/)
    linked = [link.resolve().name for link in (REPO / "fimntk").iterdir() if link.is_symlink()]
    for name in ("fimntk", *linked):
        shutil.copytree(
            REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    (path,) = out.glob("fimntk-*.whl")
    return path


def test_wheel_has_one_top_level_package_and_the_base_requirements(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            Requirement(line.split(":", 1)[1].strip())
            for line in archive.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        assert any(
            n.startswith("fimntk/core/storage/migrations/versions/") for n in archive.namelist()
        )
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fimntk"}
    base = {r.name.lower() for r in requires if r.marker is None}
    assert base == BASE
    server = {
        r.name.lower()
        for r in requires
        if r.marker is not None and r.marker.evaluate({"extra": "server"})
    }
    assert {
        "fastapi",
        "uvicorn",
        "rq",
        "redis",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "boto3",
        "prometheus-client",
    } <= server


def test_laptop_install_runs_a_job(wheel: Path, server: Server, tmp_path: Path) -> None:
    site, deps = tmp_path / "site", tmp_path / "deps"
    deps.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            Requirement(line.split(":", 1)[1].strip())
            for line in archive.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    closure = _closure(requires)
    assert not {n.replace("-", "_") for n in closure} & SERVER, closure
    for name in closure:
        _link_distribution(name, deps)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    Path(purelib.stdout.strip(), "fimntk-laptop.pth").write_text(f"{site}\n{deps}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(python), "-c", _JOB, server.url, server.keys["alice"], ",".join(sorted(SERVER))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["fimntk"].startswith(str(site))
    assert result["server_stack_found"] == []
    expected = engine.FIM(make_model(), make_loader(), "diag").trace()
    assert result["trace"] == pytest.approx(float(expected), rel=1e-5)
