"""Run NNGeometry's own test files against ``fimntk.nngeometry``.

NNGeometry's tests (tfjgeorge/nngeometry, e.g. commit c04b984) are never copied into this
repository: extract them yourself, then point this script at the folder::

    git --git-dir=<mirror> archive c04b984 tests | tar -x -C /tmp/nngeometry-c04b984
    python -m bench.nngeometry_suite /tmp/nngeometry-c04b984/tests [-- pytest args]

A temporary folder put first on ``sys.path`` holds a pytest plugin that maps every module
``nngeometry[.x]`` to ``fimntk.nngeometry[.x]`` (an import hook: no file of NNGeometry's is
changed), and, when torchvision is not installed (its wheel would replace this torch), a
stand-in ``torchvision`` whose ``datasets.MNIST`` gives fixed random 28×28 images of lit and
dark pixels with MNIST's pixel mean and standard deviation, and labels 0-9 (the tests download
MNIST otherwise; no test compares against MNIST values). The last line printed is ``passed/total``.
``tests/test_nngeometry_suite.py`` runs this when ``FIMNTK_NNGEOMETRY_TESTS`` names the folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from xml.etree import ElementTree

PLUGIN = '''"""Maps ``nngeometry`` and its submodules to ``fimntk.nngeometry``."""
import importlib
import importlib.abc
import importlib.util
import sys


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "nngeometry" or name.startswith("nngeometry."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("fimntk." + spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Alias())
'''

TORCHVISION = '''"""A stand-in for torchvision's MNIST (no download): fixed random images."""
'''

DATASETS = """import torch
from torch.utils.data import Dataset


class MNIST(Dataset):
    def __init__(self, root=None, train=True, download=False, transform=None):
        g = torch.Generator().manual_seed(0 if train else 1)
        n = 1000
        # pixels lit (value 0.857) with probability 0.1525: MNIST's pixel mean 0.1307 and
        # standard deviation 0.3081, which Normalize((0.1307,), (0.3081,)) maps to 0 and 1 as
        # for MNIST (uniform pixels would give every image a large positive mean)
        lit = torch.rand(n, 28, 28, generator=g) < 0.1525
        self.data = lit.to(torch.float32) * 0.857
        self.targets = torch.randint(0, 10, (n,), generator=g)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.data[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])
"""

TRANSFORMS = """import torch


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    def __call__(self, x):
        return torch.as_tensor(x, dtype=torch.get_default_dtype()).reshape(1, 28, 28)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x):
        return (x - self.mean) / self.std
"""


def write_shim(folder: Path) -> None:
    """The import hook plugin, and the torchvision stand-in when torchvision is absent."""
    (folder / "fimntk_nngeometry_alias.py").write_text(PLUGIN)
    if importlib.util.find_spec("torchvision") is None:
        tv = folder / "torchvision"
        tv.mkdir()
        (tv / "__init__.py").write_text(TORCHVISION + "from . import datasets, transforms\n")
        (tv / "datasets.py").write_text(DATASETS)
        (tv / "transforms.py").write_text(TRANSFORMS)


def run(tests: Path, pytest_args: list[str]) -> tuple[int, int, str]:
    """``(passed, total, pytest's output)`` of NNGeometry's tests in ``tests`` on fimntk."""
    if not (tests / "tasks.py").is_file():
        raise SystemExit(f"{tests} is not NNGeometry's tests folder (no tasks.py)")
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp)
        write_shim(shim)
        env = dict(os.environ)
        # fimntk from this checkout, without its tests/ package (which would hide NNGeometry's
        # ``tests.tasks``)
        (shim / "fimntk").symlink_to(repo / "fimntk", target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), str(tests), str(tests.parent)])
        cmd = [sys.executable, "-m", "pytest", str(tests), "-p", "fimntk_nngeometry_alias"]
        cmd += ["-q", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        report = shim / "report.xml"
        cmd += ["--import-mode=append", f"--junit-xml={report}", *pytest_args]
        done = subprocess.run(cmd, cwd=shim, env=env, capture_output=True, text=True)
        out = done.stdout + done.stderr
        passed, total = _counts(report) if report.is_file() else _counts_from_text(out)
    return passed, total, out


def _counts(report: Path) -> tuple[int, int]:
    """``(passed, total)`` from pytest's JUnit report (whatever ``-q``/``-r`` flags were given):
    every ``testcase``, of which those without a failure, error or skip passed."""
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = [{child.tag for child in case} for case in cases]
    bad = {"failure", "error", "skipped"}
    return sum(1 for o in outcomes if not o & bad), len(outcomes)


def _counts_from_text(out: str) -> tuple[int, int]:
    """``(passed, total)`` from pytest's summary line (when no report was written)."""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors)", out)}
    passed = counts.get("passed", 0)
    total = passed + counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return passed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", type=Path, help="NNGeometry's extracted tests/ folder")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    passed, total, out = run(args.tests, args.pytest_args)
    print(out)
    print(f"{passed}/{total}")


if __name__ == "__main__":
    main()
