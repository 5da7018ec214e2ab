"""Shared machinery of the speed benchmarks: workloads, loader, timing, memory, tables.

A benchmark module builds a list of :class:`Case` (one quantity, one workload, one tool) and
hands it to :func:`run_suite`, which times each case (warm-up, then the median of several runs),
measures its peak memory in a fresh subprocess, checks that every tool computed the same thing
as fimntk (relative error of a canonical tensor), and prints a markdown table plus a summary of
the speed targets. Results also go to ``bench/out/*.csv`` (git-ignored).

Conventions (see ``bench/README.md``): ``F = (1/n) Σ_i E_{y~p(y|x_i)}[∇ log p ∇ log pᵀ]``;
the NTK Gram ``(c, n, c, n)`` is not divided by n; ``ratio = tool seconds / fimntk seconds`` (above
1: fimntk is faster); ``speedup = fastest peer seconds / fimntk seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import importlib
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

QUICK_ENV = "FIMNTK_BENCH_QUICK"
REPEATS_ENV = "FIMNTK_BENCH_REPEATS"
OUT_DIR = Path(__file__).resolve().parent / "out"
FIMNTK = "fimntk"


# ----- workloads -----------------------------------------------------------------------------
class TensorLoader(DataLoader):
    """A ``DataLoader`` over in-memory tensors whose batches are sliced once, shared by every tool.

    No tool pays collation (a ``TensorDataset`` loader spends milliseconds stacking examples,
    as much as a matrix-free product costs); being a ``DataLoader`` it passes NNGeometry's
    ``isinstance`` checks and offers ``dataset``, ``sampler`` and ``batch_size``.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        super().__init__(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
        self._batches = [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        ]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def n(self) -> int:
        return len(self.dataset)


def _mlp(sizes: Sequence[int], act: type[nn.Module]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def mlp_small() -> nn.Module:
    """W1's MLP 64-64-64-10, tanh: 8,970 parameters."""
    return _mlp((64, 64, 64, 10), nn.Tanh)


def mlp_mnist() -> nn.Module:
    """W2's MLP 784-256-256-10, ReLU: 269,322 parameters."""
    return _mlp((784, 256, 256, 10), nn.ReLU)


def cnn_small() -> nn.Module:
    """W3's CNN on 3×32×32: conv3x3(3→16)-relu-conv3x3(16→32)-relu-maxpool2-linear: 67,818."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 14 * 14, 10),
    )


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the identity (or a 1x1 conv-BN shortcut), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.short(x))


def resnet8() -> nn.Module:
    """CIFAR ResNet-8: a 16-channel stem, one basic block per stage (16, 32, 64), BatchNorm
    (evaluated with running statistics), average pooling, a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        _BasicBlock(16, 16, 1),
        _BasicBlock(16, 32, 2),
        _BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class _Encoder(nn.Module):
    """Linear 16→64 on each of the 32 steps, two ``nn.TransformerEncoderLayer`` (d = 64, 4
    heads, feed-forward 128, batch first), mean over the steps, Linear 64→10."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def transformer_encoder() -> nn.Module:
    return _Encoder()


class _GPT2(nn.Module):
    """A small GPT-2 built from a config (no download): 2 blocks, d = 64, 4 heads, vocabulary
    100, 32 positions; the mean of the last hidden states through a Linear 64→10."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model  # bench-only dependency (the hf extra)

        config = GPT2Config(
            vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.gpt2 = GPT2Model(config)
        self.head = nn.Linear(64, 10)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.gpt2(input_ids=ids).last_hidden_state.mean(dim=1))


def gpt2_small() -> nn.Module:
    return _GPT2()


@dataclass(frozen=True)
class Workload:
    """A model and generated data (``torch.randn`` inputs, uniform labels; fixed seeds)."""

    name: str
    description: str
    n: int
    batch_size: int
    input_shape: tuple[int, ...]
    n_classes: int
    builder: Callable[[], nn.Module]
    vocab: int | None = None  # token inputs: uniform ids below ``vocab`` instead of randn

    def model(self, device: str = "cpu") -> nn.Module:
        torch.manual_seed(0)
        return self.builder().to(device).eval()

    def loader(self, device: str = "cpu") -> TensorLoader:
        gen = torch.Generator().manual_seed(1234)
        if self.vocab is None:
            x = torch.randn((self.n, *self.input_shape), generator=gen)
        else:
            x = torch.randint(self.vocab, (self.n, *self.input_shape), generator=gen)
        y = torch.randint(self.n_classes, (self.n,), generator=gen)
        return TensorLoader(x.to(device), y.to(device), self.batch_size)

    def scaled(self, n: int) -> Workload:
        """The same workload on fewer examples (quick mode); the name says so."""
        if n >= self.n:
            return self
        return replace(self, name=f"{self.name}[n={n}]", n=n, batch_size=min(self.batch_size, n))

    @property
    def key(self) -> str:
        return self.name.split("[")[0]


W1 = Workload("W1", "MLP 64-64-64-10 tanh (8,970 params)", 1000, 250, (64,), 10, mlp_small)
W2 = Workload("W2", "MLP 784-256-256-10 relu (269,322 params)", 2000, 250, (784,), 10, mlp_mnist)
W3 = Workload(
    "W3",
    "CNN conv16-conv32-maxpool-linear on 3x32x32 (67,818 params)",
    512,
    128,
    (3, 32, 32),
    10,
    cnn_small,
)
W4 = Workload(
    "W4", "NTK of W1's MLP on 200 examples (2000x2000 Gram)", 200, 200, (64,), 10, mlp_small
)
W5 = Workload(
    "W5",
    "ResNet-8 16-32-64, BatchNorm eval, residual, on 3x32x32 (78,042 params)",
    256,
    64,
    (3, 32, 32),
    10,
    resnet8,
)
W6 = Workload(
    "W6",
    "2 TransformerEncoderLayer d=64 4 heads ff=128, 32 steps of 16 (68,682 params)",
    256,
    64,
    (32, 16),
    10,
    transformer_encoder,
)
W7 = Workload(
    "W7",
    "GPT-2 from a config: 2 blocks d=64 4 heads, vocab 100, 32 tokens (109,194 params)",
    256,
    64,
    (32,),
    10,
    gpt2_small,
    vocab=100,
)
WORKLOADS = {w.name: w for w in (W1, W2, W3, W4, W5, W6, W7)}


def weight_mask(model: nn.Module) -> Tensor:
    """Boolean mask over the flat parameter vector: True on weights, False on biases."""
    return torch.cat(
        [
            torch.full((p.numel(),), not name.endswith("bias"), dtype=torch.bool)
            for name, p in model.named_parameters()
        ]
    )


def random_vector(model: nn.Module, seed: int = 7) -> Tensor:
    """A fixed standard-normal flat vector of the model's parameter count."""
    d = sum(p.numel() for p in model.parameters())
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def split_like(model: nn.Module, flat: Tensor) -> list[Tensor]:
    """A flat vector as a list shaped like ``model.parameters()``."""
    out, start = [], 0
    for p in model.parameters():
        out.append(flat[start : start + p.numel()].reshape(p.shape).to(p))
        start += p.numel()
    return out


# ----- cases ---------------------------------------------------------------------------------
class NotAvailableError(Exception):
    """The tool cannot compute this quantity here (e.g. the representation is not in the engine
    yet); the table shows ``n/a (<message>)``."""


@dataclass
class Prepared:
    """A case ready to time: ``run()`` computes the quantity from scratch; ``canon(result)``
    turns its result into the tensor compared across tools."""

    run: Callable[[], Any]
    canon: Callable[[Any], Tensor]


@dataclass
class Case:
    """One quantity on one workload by one tool.

    Attributes:
        prepare: ``prepare(model, loader) -> Prepared``; may raise :class:`NotAvailableError`.
        reference: the quantity whose fimntk result this case is checked against (default: its
            own). A Monte Carlo estimate is checked against the exact quantity.
        in_target: whether this tool counts among the peers a speed target compares to.
    """

    quantity: str
    workload: Workload
    tool: str
    prepare: Callable[[nn.Module, TensorLoader], Prepared]
    note: str = ""
    reference: str | None = None
    in_target: bool = True

    @property
    def key(self) -> str:
        return f"{self.quantity}|{self.workload.name}|{self.tool}"

    @property
    def group(self) -> tuple[str, str]:
        return (self.quantity, self.workload.name)

    @property
    def ref_group(self) -> tuple[str, str]:
        return (self.reference or self.quantity, self.workload.name)


@dataclass
class Target:
    """fimntk must be ``factor`` times faster than ``against`` (a tool, or the fastest peer)."""

    quantity: str
    workload: str
    factor: float = 1.0
    against: str | None = None

    def describe(self) -> str:
        who = self.against or "fastest peer"
        return f"≥ {self.factor:g}× {who}" if self.factor != 1 else f"≤ {who}'s time"


@dataclass
class Row:
    quantity: str
    workload: str
    tool: str
    seconds: float | None = None
    runs: int = 0
    x_fwd_bwd: float | None = None
    ratio: float | None = None
    rel_err: float | None = None
    ref_tool: str = ""
    peak_mb: float | None = None
    rss_mb: float | None = None
    status: str = "ok"
    note: str = ""
    in_target: bool = True
    extra: dict = field(default_factory=dict)


# ----- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    quick: bool = False
    repeats: int = 3
    warmup: int = 1
    memory: bool = True
    only: str | None = None
    device: str = "cpu"
    threads: int | None = None
    #: quick mode: a warm-up run longer than this (s) is taken as the only measurement.
    slow_s: float = 3.0
    csv: bool = True
    #: fresh processes whose default-allocator peak RSS is reported (median); 0: not measured.
    rss_runs: int = 3


def parse_args(
    description: str, argv: Sequence[str] | None = None, memory_default: bool | None = True
) -> Settings:
    """Command line (and environment) to :class:`Settings`; ``memory_default=None``: measure
    peak memory in full mode only."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get(QUICK_ENV, "") not in ("", "0"),
        help=f"smaller n, fewer runs (or set {QUICK_ENV}=1)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per case (default 3, quick 1; or {REPEATS_ENV})",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before (default 1)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument(
        "--memory",
        dest="memory",
        action="store_true",
        default=memory_default,
        help="measure peak memory (a subprocess per case; default: "
        f"{'full mode only' if memory_default is None else memory_default})",
    )
    mem.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument(
        "--rss-runs",
        type=int,
        default=3,
        help="with --memory, also the peak RSS under glibc's default settings: the "
        "median of this many fresh processes (default 3; 0 skips it)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="regular expression searched in each case's 'quantity|workload|tool' key, "
        "e.g. '^ntk' or 'diag\\|W2'",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; default: torch's own, or 1 when other processes "
        "load the machine (load average ≥ 1); 0 forces torch's own",
    )
    p.add_argument("--no-csv", dest="csv", action="store_false")
    a = p.parse_args(argv)
    repeats = a.repeats or int(os.environ.get(REPEATS_ENV, 0)) or (1 if a.quick else 3)
    memory = (not a.quick) if a.memory is None else a.memory
    threads = a.threads
    if threads is None and a.device == "cpu" and _load() >= 1.0:
        threads = 1
    return Settings(
        quick=a.quick,
        repeats=max(1, repeats),
        warmup=max(0, a.warmup),
        memory=memory,
        only=a.only,
        device=a.device,
        threads=threads or None,
        csv=a.csv,
        rss_runs=max(0, a.rss_runs),
    )


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


# ----- timing and memory ---------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    seconds: float
    runs: int
    result: Any


def time_call(fn: Callable[[], Any], settings: Settings) -> Timing:
    """Warm-up runs, then the median of ``settings.repeats`` timed runs.

    In quick mode a warm-up longer than ``settings.slow_s`` is kept as the single measurement.
    """

    def timed() -> tuple[float, Any]:
        gc.collect()
        _sync(settings.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(settings.device)
        return time.perf_counter() - t0, out

    result = None
    for _ in range(settings.warmup):
        result = None
        elapsed, result = timed()
        if settings.quick and elapsed > settings.slow_s:
            return Timing(elapsed, 1, result)
    times = []
    for _ in range(settings.repeats):
        result = None  # the previous result is freed before the next run
        elapsed, result = timed()
        times.append(elapsed)
    return Timing(statistics.median(times), len(times), result)


def fwd_bwd(model: nn.Module, loader: TensorLoader) -> None:
    """One plain training pass: cross-entropy (sum) forward and backward on every batch."""
    for x, y in loader:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def fwd_bwd_seconds(workload: Workload, settings: Settings) -> float:
    """The baseline: median time of one plain forward+backward pass over the workload's data."""
    model, loader = workload.model(settings.device), workload.loader(settings.device)
    fast = replace(
        settings, repeats=max(settings.repeats, 5), warmup=max(settings.warmup, 1), quick=False
    )
    return time_call(lambda: fwd_bwd(model, loader), fast).seconds


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _proc_status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> float:
    """Give freed heap back to the system and reset the peak-RSS mark (Linux ``clear_refs``);
    return the baseline (current RSS, or ``ru_maxrss`` where the mark cannot be reset)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss = _proc_status_mb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return _maxrss_mb()


def _peak_rss() -> float:
    hwm = _proc_status_mb("VmHWM")
    return _maxrss_mb() if hwm is None else hwm


#: glibc setting of the live measure: blocks of 64 KiB and more are mapped on their own and
#: unmapped when freed, so the resident set follows the memory in use.
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_memory_mb(module: str, key: str, settings: Settings, live: bool = True) -> float | None:
    """Peak memory of one run of case ``key`` of ``module``, above the setup's.

    On CPU: a fresh Python process builds the case, runs one plain forward+backward and the
    case itself once (so neither the allocator's warm state nor one-time costs — lazy imports,
    torch's forward-mode set-up, scripted decompositions — are charged to a tool: the answer is
    the peak of computing the quantity, as the timings are medians after a warm-up), trims the
    heap, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the case again;
    the answer is the peak RSS (``VmHWM``) minus the RSS before (``ru_maxrss`` growth where the
    mark cannot be reset).

    ``live`` (the default) runs that process with :data:`LIVE_ALLOCATOR_ENV`: the peak is then
    that of the memory in use (tensors, LAPACK and oneDNN workspaces), to within 0.1 MB from
    run to run. Under glibc's defaults the heap keeps freed blocks of up to 32 MB resident and
    places the next ones anywhere in it, so the peak RSS also counts pages that only held
    memory freed earlier in the run: it depends on the order of allocations, and varies by tens
    of percent between identical runs (see ``bench/README.md``).
    On CUDA: ``torch.cuda.max_memory_allocated`` growth, in process (``live`` is moot).
    """
    cmd = [sys.executable, "-m", "bench._common", "memprobe", module, key]
    if settings.quick:
        cmd.append("--quick")
    cmd += ["--device", settings.device]
    if settings.threads:
        cmd += ["--threads", str(settings.threads)]
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if live:
        env.update(LIVE_ALLOCATOR_ENV)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line).get("peak_mb")
    return None


def rss_memory_mb(module: str, key: str, settings: Settings) -> float | None:
    """Median over :attr:`Settings.rss_runs` fresh processes of the peak RSS under glibc's
    default settings (see :func:`peak_memory_mb`); None on CUDA or when not asked for."""
    if settings.device.startswith("cuda") or settings.rss_runs < 1:
        return None
    runs = [peak_memory_mb(module, key, settings, live=False) for _ in range(settings.rss_runs)]
    runs = [r for r in runs if r is not None]
    return statistics.median(runs) if runs else None


def _memprobe(module: str, key: str, settings: Settings) -> dict:
    mod = importlib.import_module(module)
    case = next(c for c in mod.build_cases(settings) if c.key == key)
    model = case.workload.model(settings.device)
    loader = case.workload.loader(settings.device)
    fwd_bwd(model, loader)
    prepared = case.prepare(model, loader)
    prepared.run()
    gc.collect()
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
        prepared.run()
        torch.cuda.synchronize()
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20 - before}
    before = _reset_peak_rss()
    prepared.run()
    return {"peak_mb": max(0.0, _peak_rss() - before)}


# ----- the suite -----------------------------------------------------------------------------
def rel_err(a: Tensor, ref: Tensor) -> float:
    """``‖a − ref‖ / ‖ref‖``, accumulated in float64."""
    a = a.detach().reshape(-1).to("cpu", torch.float64)
    ref = ref.detach().reshape(-1).to("cpu", torch.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(ref.shape)}")
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


def _short(err: BaseException) -> str:
    msg = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {msg}"[:120]


def _groups(cases: list[Case]) -> list[list[Case]]:
    """Consecutive cases of the same (quantity, workload)."""
    groups: list[list[Case]] = []
    for c in cases:
        if groups and groups[-1][0].group == c.group:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


@dataclass
class _Entry:
    case: Case
    row: Row
    prepared: Prepared | None = None
    times: list[float] = field(default_factory=list)
    result: Any = None
    done: bool = False

    def call(self, device: str) -> float:
        self.result = None
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        self.result = self.prepared.run()
        _sync(device)
        return time.perf_counter() - t0


def _time_group(entries: list[_Entry], settings: Settings) -> None:
    """Warm every tool up, then interleave their timed runs (round robin), so that a change of
    machine load hits all tools of a quantity alike."""
    for e in entries:
        try:
            for _ in range(settings.warmup):
                elapsed = e.call(settings.device)
                if settings.quick and elapsed > settings.slow_s:
                    e.times, e.done = [elapsed], True
                    break
        except Exception as err:  # a peer failing must not stop the benchmark
            e.row.status, e.done, e.result = f"error: {_short(err)}", True, None
    for _ in range(settings.repeats):
        for e in entries:
            if e.done:
                continue
            try:
                e.times.append(e.call(settings.device))
            except Exception as err:
                e.row.status, e.done, e.result = f"error: {_short(err)}", True, None


def run_suite(cases: list[Case], settings: Settings, module: str) -> list[Row]:
    """Time every case; fill ratios, cross-check errors and (optionally) peak memory."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.only:
        cases = [c for c in cases if re.search(settings.only, c.key)]
    baselines: dict[str, float] = {}
    refs: dict[tuple[str, str], tuple[str, Tensor]] = {}
    groups = _groups(cases)
    last_use = {c.ref_group: gi for gi, grp in enumerate(groups) for c in grp}
    rows: list[Row] = []
    for gi, group in enumerate(groups):
        wl = group[0].workload
        if wl.name not in baselines:
            baselines[wl.name] = fwd_bwd_seconds(wl, settings)
            print(
                f"# {wl.name}: {wl.description}, n={wl.n}, batch {wl.batch_size}: "
                f"fwd+bwd {baselines[wl.name] * 1e3:.1f} ms",
                flush=True,
            )
        entries = []
        for case in group:
            row = Row(case.quantity, wl.name, case.tool, note=case.note, in_target=case.in_target)
            rows.append(row)
            entry = _Entry(case, row)
            try:
                model, loader = wl.model(settings.device), wl.loader(settings.device)
                entry.prepared = case.prepare(model, loader)
            except NotAvailableError as err:
                row.status = f"n/a ({err})"
                continue
            except Exception as err:
                row.status = f"error: {_short(err)}"
                continue
            entries.append(entry)
        _time_group(entries, settings)
        for e in entries:
            row, case = e.row, e.case
            if row.status != "ok" or not e.times:
                continue
            row.seconds, row.runs = statistics.median(e.times), len(e.times)
            row.x_fwd_bwd = row.seconds / baselines[wl.name]
            try:
                canon = e.prepared.canon(e.result).detach().cpu()
                e.result = None
                if case.group not in refs and case.tool == FIMNTK:
                    refs[case.group] = (case.tool, canon)
                if case.ref_group in refs:
                    row.ref_tool, ref = refs[case.ref_group]
                    row.rel_err = rel_err(canon, ref)
                elif case.reference is None:  # fimntk n/a: the first peer is the reference
                    refs[case.group] = (case.tool, canon)
                    row.ref_tool, row.rel_err = case.tool, 0.0
                del canon
            except Exception as err:
                row.note = (row.note + "; " if row.note else "") + f"check failed: {_short(err)}"
        del entries
        for g in [g for g, last in last_use.items() if last == gi]:
            refs.pop(g, None)
        gc.collect()
        for row, case in zip(rows[-len(group) :], group):
            if settings.memory and row.status == "ok":
                row.peak_mb = peak_memory_mb(module, case.key, settings)
                row.rss_mb = rss_memory_mb(module, case.key, settings)
            print(
                f"  {case.key}: {_fmt_s(row.seconds)} {row.status if row.status != 'ok' else ''}",
                flush=True,
            )
    _fill_ratios(rows)
    return rows


def _fill_ratios(rows: list[Row]) -> None:
    fim = {
        (r.quantity, r.workload): r.seconds
        for r in rows
        if r.tool == FIMNTK and r.seconds is not None
    }
    for r in rows:
        base = fim.get((r.quantity, r.workload))
        if r.seconds is not None and base:
            r.ratio = r.seconds / base


# ----- output --------------------------------------------------------------------------------
def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[Row], memory: bool) -> str:
    """Markdown table of the rows."""
    head = [
        "quantity",
        "workload",
        "tool",
        "seconds",
        "× fwd+bwd",
        "ratio (tool s / fimntk s)",
        "rel. err (vs)",
    ]
    if memory:
        head += ["peak MB (live)", "peak RSS MB (glibc default, median)"]
    head += ["runs", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.status != "ok":
            cells = [r.quantity, r.workload, r.tool, r.status, "—", "—", "—"]
        else:
            err = "—" if r.rel_err is None else f"{r.rel_err:.1e} ({r.ref_tool})"
            cells = [
                r.quantity,
                r.workload,
                r.tool,
                _fmt_s(r.seconds),
                _fmt(r.x_fwd_bwd, ".1f"),
                _fmt(r.ratio, ".2f"),
                err,
            ]
        if memory:
            cells += [_fmt(r.peak_mb, ".1f"), _fmt(r.rss_mb, ".0f")]
        cells += [str(r.runs) if r.runs else "—", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: A peak within this fraction (or :data:`MEMORY_SLACK_MB`) of the lowest peer's counts as no
#: higher: the live measure repeats to within 0.1 MB.
MEMORY_SLACK = 0.01
MEMORY_SLACK_MB = 0.1


def _memory_cells(fim: Row, peers: list[Row]) -> list[str]:
    """``fimntk MB / lowest peer MB (tool)`` and whether fimntk's live peak is no higher."""
    measured = [r for r in peers if r.peak_mb is not None]
    if fim.peak_mb is None or not measured:
        return ["—", "—"]
    low = min(measured, key=lambda r: r.peak_mb)
    ok = fim.peak_mb <= low.peak_mb * (1 + MEMORY_SLACK) + MEMORY_SLACK_MB
    return [f"{fim.peak_mb:.1f} / {low.peak_mb:.1f} ({low.tool})", "yes" if ok else "**no**"]


def target_summary(rows: list[Row], targets: list[Target]) -> str:
    """Markdown table: for each target, fimntk's time, the peer's, the speedup, met or missed;
    with measured peaks, fimntk's live peak memory against the lowest peer's, met or missed."""
    memory = any(r.peak_mb is not None for r in rows)
    head = [
        "quantity",
        "workload",
        "target",
        "fimntk",
        "peer",
        "peer s",
        "speedup (peer s / fimntk s)",
        "met",
    ]
    if memory:
        head += ["peak MB (live): fimntk / lowest peer", "memory ≤ lowest peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in targets:
        group = [
            r
            for r in rows
            if r.quantity == t.quantity
            and r.workload.split("[")[0] == t.workload
            and r.seconds is not None
        ]
        if not group:
            continue
        wl = group[0].workload
        fim = next((r for r in group if r.tool == FIMNTK), None)
        peers = [
            r
            for r in group
            if r.tool != FIMNTK and r.in_target and (t.against is None or r.tool == t.against)
        ]
        if not peers:
            continue
        best = min(peers, key=lambda r: r.seconds)
        if fim is None:
            cells = [
                t.quantity,
                wl,
                t.describe(),
                "n/a",
                best.tool,
                _fmt_s(best.seconds),
                "—",
                "n/a",
            ] + (["—", "—"] if memory else [])
            lines.append("| " + " | ".join(cells) + " |")
            continue
        speed = best.seconds / fim.seconds
        cells = [
            t.quantity,
            wl,
            t.describe(),
            _fmt_s(fim.seconds),
            best.tool,
            _fmt_s(best.seconds),
            f"{speed:.2f}",
            "yes" if speed >= t.factor else "**no**",
        ]
        if memory:
            cells += _memory_cells(fim, peers)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], name: str, settings: Settings) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    mode = "quick" if settings.quick else "full"
    path = OUT_DIR / f"{name}_{mode}.csv"
    cols = [
        "quantity",
        "workload",
        "tool",
        "seconds",
        "runs",
        "x_fwd_bwd",
        "ratio",
        "rel_err",
        "ref_tool",
        "peak_mb",
        "rss_mb",
        "status",
        "note",
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([getattr(r, c) for c in cols])
    return path


def report(
    rows: list[Row], targets: list[Target], settings: Settings, name: str, title: str
) -> None:
    """Print the results table and the target summary; write the CSV."""
    mode = "quick" if settings.quick else "full"
    load = _load()
    print(
        f"\n## {title} ({mode} mode; torch {torch.__version__}, {settings.device}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load {load:.1f}; median "
        f"of {settings.repeats} run(s) after {settings.warmup} warm-up)\n"
    )
    print(
        "ratio = tool seconds / fimntk seconds (above 1: fimntk is faster); "
        "rel. err = ‖tool − reference‖/‖reference‖ on the quantity (reference in brackets); "
        "× fwd+bwd = seconds / one plain forward+backward pass over the same data.\n"
    )
    print(table(rows, settings.memory))
    summary = target_summary(rows, targets)
    if summary.count("\n") > 1:
        print("\n### Targets\n")
        print(summary)
    if settings.csv:
        path = write_csv(rows, name, settings)
        print(f"\n(csv: {path.relative_to(OUT_DIR.parent.parent)})")


def check_load(settings: Settings) -> None:
    """Say when other processes keep the cores busy: timings are then noisy, and torch's OpenMP
    threads, spinning against the other processes, can slow a 1 ms pass a hundredfold (seen:
    300×); hence one thread by default on a loaded machine."""
    load, cores = _load(), os.cpu_count() or 1
    if load >= 1.0:
        print(
            f"NOTE: load average {load:.1f} on {cores} cores before the start: timings are "
            f"noisy; torch threads = {torch.get_num_threads()}"
            + (
                " (chosen: 1 on a loaded machine; --threads N to override)"
                if settings.threads == 1
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )


def main(
    module: str,
    name: str,
    title: str,
    build_cases: Callable[[Settings], list[Case]],
    targets: list[Target],
    argv: Sequence[str] | None = None,
    memory_default: bool | None = True,
) -> list[Row]:
    """Parse the command line, run the cases, print the report; return the rows."""
    settings = parse_args(title, argv, memory_default)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    check_load(settings)
    rows = run_suite(build_cases(settings), settings, module)
    report(rows, targets, settings, name, title)
    return rows


def _memprobe_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("module")
    p.add_argument("key")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = Settings(quick=a.quick, device=a.device, threads=a.threads, memory=False)
    print(json.dumps(_memprobe(a.module, a.key, settings)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "memprobe":
        _memprobe_main(sys.argv[2:])
    else:
        print("usage: python -m bench._common memprobe MODULE KEY [--quick]", file=sys.stderr)
        sys.exit(2)
