"""Wire formats of the API: pydantic models, JSON only (the request and response bodies).

Nothing here names code: a model is a weights blob plus a JSON architecture (built-in
``torch.nn`` layers, or a builder name from the server's registry); a dataset is a blob or a
server-side name; the loader is described by parameters. The families follow one pattern per
resource: ``JobCreate`` (what a client sends), ``JobPublic``/``JobsPublic`` (what it reads).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, model_validator

from fimntk.contract.arguments import (
    MAX_MODULES,
    ArgumentError,
    check_architecture_size,
)
from fimntk.contract.graph import MAX_GRAPH_MODULES, MAX_GRAPH_PARAMS, MAX_NODES
from fimntk.contract.vocabulary import (
    LABEL_KEY_PATTERN,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_SHARDS,
    SHARDED_IMPLICIT_OPERATIONS,
    ComputeDtype,
    HessianLoss,
    JobStatus,
    Metric,
    ParamDtype,
    Representation,
    Variant,
)

Digest = Annotated[
    str,
    Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="SHA-256 of a blob uploaded with PUT /v1/blobs/{digest}.",
        examples=["sha256:" + "0" * 64],
    ),
]


#: A job's labels: at most ``MAX_LABELS`` string pairs, keys matching ``LABEL_KEY_PATTERN``.
Labels = Annotated[
    dict[
        Annotated[str, Field(pattern=LABEL_KEY_PATTERN)],
        Annotated[str, Field(max_length=MAX_LABEL_VALUE)],
    ],
    Field(
        max_length=MAX_LABELS,
        description=f"String labels (at most {MAX_LABELS}; keys of letters, digits, '_', '.', "
        f"'-' up to 64 characters; values up to {MAX_LABEL_VALUE}), e.g. experiment and run.",
        examples=[{"experiment": "sweep1", "run": "seed0"}],
    ),
]

#: A seed torch accepts (``torch.manual_seed``'s range); past it, torch raises at run time.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerSpec(_Strict):
    """One built-in ``torch.nn`` layer, by type and constructor arguments."""

    type: str = Field(
        max_length=64,
        description="Class name in torch.nn, e.g. 'Linear', 'Conv2d', 'ReLU'.",
        examples=["Linear"],
    )
    args: list[JsonValue] = Field(default_factory=list, max_length=16, examples=[[4, 8]])
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, max_length=16, examples=[{"bias": True}]
    )
    layers: list[LayerSpec] | None = Field(
        default=None, description="Children, only for type 'Sequential' (nesting allowed)."
    )


class SequentialArchitecture(_Strict):
    """An ``nn.Sequential`` of built-in layers; state-dict keys are ``0.weight``, ``2.bias``...

    At most ``MAX_DEPTH`` nested levels and ``MAX_MODULES`` modules, checked on the raw JSON
    before the layers are parsed."""

    kind: Literal["sequential"]
    layers: list[LayerSpec] = Field(min_length=1, max_length=MAX_MODULES)
    dtype: ParamDtype = Field(default="float32", description="dtype of the parameters.")

    @model_validator(mode="before")
    @classmethod
    def _bounded_tree(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("layers"), list):
            try:
                check_architecture_size(data["layers"], "layers")
            except ArgumentError as exc:
                raise ValueError(str(exc)) from None
        return data


class BuilderArchitecture(_Strict):
    """A model from the server's builder registry (built in: mlp, cnn, resnet)."""

    kind: Literal["builder"]
    name: str = Field(max_length=64, examples=["mlp"])
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict,
        max_length=32,
        examples=[{"in_features": 4, "hidden": [8], "out_features": 3}],
    )
    dtype: ParamDtype = "float32"


class GraphNode(_Strict):
    """One node of a graph architecture (:mod:`fimntk.contract.graph`)."""

    name: str = Field(max_length=64, examples=["add"])
    op: Literal["placeholder", "module", "function", "method", "param", "output"]
    target: str | None = Field(default=None, max_length=1100, examples=["operator.add"])
    args: list[JsonValue] = Field(default_factory=list, max_length=16)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict, max_length=16)


class GraphModule(_Strict):
    """A module of a graph architecture: an allowed ``torch.nn`` layer, or ``"Module"`` for a
    container (a custom module traced through)."""

    name: str = Field(max_length=1100, examples=["layer1.0.conv1"])
    type: str = Field(max_length=64, examples=["Conv2d"])
    args: list[JsonValue] = Field(default_factory=list, max_length=16)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict, max_length=16)


class GraphTensor(_Strict):
    """A parameter (or buffer) held directly by a container, used by ``param`` nodes."""

    name: str = Field(max_length=1100, examples=["block.scale"])
    shape: list[int] = Field(max_length=8)
    buffer: bool = False


class GraphArchitecture(_Strict):
    """A traced model: modules rebuilt from the allowlist and a DAG of allowlisted
    operations, run by the server's own interpreter. State-dict keys are the modules' paths."""

    kind: Literal["graph"]
    modules: list[GraphModule] = Field(default_factory=list, max_length=MAX_GRAPH_MODULES)
    params: list[GraphTensor] = Field(default_factory=list, max_length=MAX_GRAPH_PARAMS)
    nodes: list[GraphNode] = Field(min_length=2, max_length=MAX_NODES)
    dtype: ParamDtype = "float32"


class HFArchitecture(_Strict):
    """A Hugging Face model built with ``<head>.from_config(config)`` (eager attention, no
    remote code); the server needs the ``hf`` extra."""

    kind: Literal["hf"]
    config: dict[str, JsonValue] = Field(
        max_length=256, examples=[{"model_type": "bert", "hidden_size": 32}]
    )
    head: str = Field(max_length=64, examples=["AutoModelForSequenceClassification"])
    dtype: ParamDtype = "float32"


class LibraryArchitecture(_Strict):
    """A model of torchvision (``get_model``) or timm (``create_model``), by an allowlisted
    name and without pretrained weights; the server needs the library installed."""

    kind: Literal["library"]
    library: Literal["torchvision", "timm"]
    name: str = Field(max_length=64, examples=["resnet18"])
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, max_length=8, examples=[{"num_classes": 10}]
    )
    dtype: ParamDtype = "float32"


Architecture = Annotated[
    SequentialArchitecture
    | BuilderArchitecture
    | GraphArchitecture
    | HFArchitecture
    | LibraryArchitecture,
    Field(discriminator="kind"),
]


class ModelSpec(_Strict):
    """A weights blob (safetensors state dict) and the architecture it must match exactly,
    with an optional probe: a few inputs and the model's own outputs on them, which the
    worker reproduces before computing anything."""

    weights: Digest
    architecture: Architecture
    probe: Digest | None = Field(
        default=None,
        description="Safetensors blob of 'inputs' (or 'inputs.<key>' for dict inputs) and "
        "'outputs' of the model in eval mode; the job fails with probe-mismatch unless the "
        "rebuilt model reproduces them.",
    )


class DatasetSpec(_Strict):
    """A dataset (a safetensors blob with ``inputs`` and optional ``targets``, or a name from
    the server's data directory) and the loader parameters."""

    blob: Digest | None = None
    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", examples=["mnist-1k"]
    )
    batch_size: int = Field(default=32, ge=1, le=65536)
    subset: int | None = Field(default=None, ge=1, description="Use this many examples.")
    seed: Seed = Field(default=0, description="Seed of the subset draw.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.blob is None) == (self.name is None):
            raise ValueError("give exactly one of 'blob' and 'name'")
        return self


class _Op(_Strict):
    pass


class TraceOp(_Op):
    """:math:`\\mathrm{tr}(M)`."""

    op: Literal["trace"]


class NormOp(_Op):
    """Frobenius norm."""

    op: Literal["norm"]


class GetDiagOp(_Op):
    """Diagonal, shape (d,)."""

    op: Literal["get_diag"]


class ToTorchOp(_Op):
    """The dense matrix: (d, d) for a FIM, (c, n, c, n) for the NTK."""

    op: Literal["to_torch"]


class VTMvOp(_Op):
    """:math:`v^\\top M v` for a vector blob of shape (d,)."""

    op: Literal["vTMv"]
    v: Digest


class MvOp(_Op):
    """:math:`M v`: v of shape (d,) for a FIM, (c, n) or (c·n,) for the NTK."""

    op: Literal["mv"]
    v: Digest


class SolveOp(_Op):
    """:math:`(M + \\lambda I)^{-1} v`."""

    op: Literal["solve"]
    v: Digest
    regul: float = Field(gt=0, examples=[1e-3])


class JvpOp(_Op):
    """Push forward (metric 'jacobian'): :math:`J v` of shape (c, n) for a parameter-space
    vector blob ``v`` of shape (d,)."""

    op: Literal["jvp"]
    v: Digest


class VjpOp(_Op):
    """Pull back (metric 'jacobian'): :math:`J^\top u` of shape (d,) for a function-space
    vector blob ``v`` = u of shape (c, n) (c outputs, n examples in the dataset's order)."""

    op: Literal["vjp"]
    v: Digest


class EigenpairsOp(_Op):
    """Top-k eigenpairs of the NTK (eigenvectors (k, c, n)) or of a dense or low-rank FIM
    (eigenvectors (d, k))."""

    op: Literal["eigenpairs"]
    k: int = Field(ge=1, le=4096)


class HutchinsonTraceOp(_Op):
    """Hutchinson estimate of the trace, with its standard error."""

    op: Literal["hutchinson_trace"]
    n_samples: int = Field(default=100, ge=1, le=100_000)
    seed: Seed = 0


class HutchppTraceOp(_Op):
    """Hutch++ estimate of the trace."""

    op: Literal["hutchpp_trace"]
    n_matvecs: int = Field(default=99, ge=3, le=100_000)
    seed: Seed = 0


class HutchinsonDiagOp(_Op):
    """Hutchinson estimate of the diagonal."""

    op: Literal["hutchinson_diag"]
    n_samples: int = Field(default=100, ge=1, le=100_000)
    seed: Seed = 0


class LanczosEigenpairsOp(_Op):
    """Top-k eigenpairs by Lanczos."""

    op: Literal["lanczos_eigenpairs"]
    k: int = Field(ge=1, le=4096)
    n_iter: int | None = Field(default=None, ge=2, le=100_000)
    seed: Seed = 0


class SlqDensityOp(_Op):
    """Spectral density by stochastic Lanczos quadrature."""

    op: Literal["slq_density"]
    n_probes: int = Field(default=10, ge=1, le=10_000)
    n_iter: int = Field(default=30, ge=2, le=10_000)
    seed: Seed = 0


Operation = Annotated[
    TraceOp
    | NormOp
    | GetDiagOp
    | ToTorchOp
    | VTMvOp
    | MvOp
    | SolveOp
    | JvpOp
    | VjpOp
    | EigenpairsOp
    | HutchinsonTraceOp
    | HutchppTraceOp
    | HutchinsonDiagOp
    | LanczosEigenpairsOp
    | SlqDensityOp,
    Field(discriminator="op"),
]

_JOB_EXAMPLE: dict[str, Any] = {
    "model": {
        "weights": "sha256:" + "a" * 64,
        "architecture": {
            "kind": "sequential",
            "layers": [
                {"type": "Linear", "args": [4, 8]},
                {"type": "ReLU"},
                {"type": "Linear", "args": [8, 3]},
            ],
        },
    },
    "dataset": {"blob": "sha256:" + "b" * 64, "batch_size": 16},
    "metric": "fim",
    "representation": "kfac",
    "variant": "classif_logits",
    "operations": [{"op": "trace"}, {"op": "vTMv", "v": "sha256:" + "c" * 64}],
    "keep": True,
    "labels": {"experiment": "sweep1", "run": "seed0"},
    "step": 1000,
}


class JobCreate(_Strict):
    """A job: what to compute (metric, representation) on what (model, dataset), and which
    operations to run on the result. With ``reuse``, model, dataset and metric settings come
    from a kept job and may be left out."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_JOB_EXAMPLE]})

    model: ModelSpec | None = None
    dataset: DatasetSpec | None = None
    metric: Metric | None = None
    representation: Representation | None = Field(
        default=None, description="Required for the FIM metrics; none for 'ntk'."
    )
    variant: Variant = "classif_logits"
    trials: int = Field(default=1, ge=1, le=1000, description="Monte Carlo trials (fim_mc).")
    seed: Seed | None = Field(default=None, description="Seed of the Monte Carlo draw (fim_mc).")
    centering: bool = Field(default=False, description="Centre gradients (empirical_fim).")
    loss: HessianLoss | None = Field(
        default=None,
        description="The loss whose Hessian a 'hessian' job computes, summed over examples: "
        "'cross_entropy' (integer class targets) or 'mse' (½‖out − y‖²). Required for metric "
        "'hessian', refused for the others.",
    )
    dtype: ComputeDtype = "float32"
    update_diag: bool | None = Field(
        default=None, description="ekfac only: re-estimate the diagonal (default true)."
    )
    operations: list[Operation] = Field(default_factory=list, max_length=64)
    keep: bool = Field(default=False, description="Store the representation for reuse.")
    reuse: str | None = Field(default=None, max_length=64, description="Id of a kept job to reuse.")
    timeout_s: int | None = Field(default=None, ge=1, description="Job time limit.")
    labels: Labels = Field(default_factory=dict)
    step: int | None = Field(
        default=None,
        ge=0,
        le=2**62,
        description="Training step (checkpoint) the weights come from, for series over training.",
    )
    shards: Annotated[int, Field(ge=1, le=MAX_SHARDS)] | Literal["auto"] = Field(
        default=1,
        description=(
            "Split the examples into this many fixed ranges computed by any workers and added "
            "(the result does not depend on how many workers run them); 'auto' picks one shard "
            "below the size where splitting cannot pay (Settings.shard_min_work)."
        ),
        examples=[4, "auto"],
    )

    @model_validator(mode="after")
    def _coherent(self) -> JobCreate:
        if self.reuse is not None:
            self.check_shards()
            return self
        for name in ("model", "dataset", "metric"):
            if getattr(self, name) is None:
                raise ValueError(f"'{name}' is required unless 'reuse' is given")
        self.check_metric_fields()
        return self

    def check_metric_fields(self) -> None:
        """Check the fields that depend on the metric.

        Raises:
            ValueError: A field that the metric requires is missing, or one it ignores is set.
        """
        if self.metric == "ntk":
            if self.representation is not None:
                raise ValueError("'representation' must be omitted for metric 'ntk'")
        elif self.representation is None:
            raise ValueError(f"'representation' is required for metric {self.metric!r}")
        if self.trials != 1 and self.metric != "fim_mc":
            raise ValueError("'trials' applies to metric 'fim_mc' only")
        if self.update_diag is not None and self.representation != "ekfac":
            raise ValueError("'update_diag' applies to representation 'ekfac' only")
        self.check_shards()

    def check_shards(self) -> None:
        """Refuse shards where they cannot apply.

        Raises:
            ValueError: Shards with ``reuse``, or with an implicit Fisher and an operation that
                is not a sum over examples.
        """
        if self.shards == 1:
            return
        if self.reuse is not None:
            raise ValueError("'shards' does not apply with 'reuse' (nothing is computed again)")
        if self.representation == "implicit":
            bad = sorted({op.op for op in self.operations} - SHARDED_IMPLICIT_OPERATIONS)
            if bad:
                raise ValueError(
                    f"'shards' with representation 'implicit' needs operations that add over "
                    f"examples ({sorted(SHARDED_IMPLICIT_OPERATIONS)}); {bad} iterate over "
                    "products and run on one worker: use shards=1"
                )


class Progress(BaseModel):
    """Examples done out of total in the current stage (tasks for a sharded job)."""

    done: int = 0
    total: int | None = None
    stage: str = "queued"
    shards: int | None = Field(
        default=None,
        description="Shards of a sharded job (done and total then count its tasks); null for "
        "a job on one worker.",
    )


class Problem(BaseModel):
    """An RFC 7807 problem document."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    field: str | None = None


class JobLinks(BaseModel):
    """Links of a job."""

    self: str
    result: str
    cancel: str


class JobPublic(BaseModel):
    """A job as clients see it."""

    id: str
    status: JobStatus
    owner: str
    metric: str
    representation: str | None
    model: str
    dataset: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    timings: dict[str, float]
    error: Problem | None
    kept: bool
    reused_from: str | None
    labels: dict[str, str] = Field(default_factory=dict)
    step: int | None = None
    spec: dict[str, Any]
    links: JobLinks


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class TensorRef(BaseModel):
    """A tensor stored as a safetensors artifact (one tensor named 'value')."""

    name: str
    shape: list[int]
    dtype: str
    href: str


class OperationResult(BaseModel):
    """Outputs of one operation: scalars inline (non-finite ones as "nan", "inf", "-inf"),
    tensors as links."""

    index: int
    op: str
    outputs: dict[str, float | str | TensorRef]


class ResultPublic(BaseModel):
    """The result of a succeeded job."""

    job_id: str
    metric: str
    representation: str | None
    reused_from: str | None
    operations: list[OperationResult]
    representation_artifact: str | None = Field(
        description="Download link of the kept representation, when one was saved."
    )


class BlobPublic(BaseModel):
    """An uploaded blob."""

    digest: str
    size: int


class UserCreate(_Strict):
    """A new API user (admin only)."""

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$",
        examples=["alice"],
    )


class UserCreated(BaseModel):
    """A created user and its API key, shown once."""

    id: str
    name: str
    api_key: str


class UserPublic(BaseModel):
    """A user as the admin sees it (never its key)."""

    id: str
    name: str
    is_admin: bool
    revoked: bool = Field(description="Whether the API key was revoked.")
    created_at: datetime | None


class UsersPublic(BaseModel):
    """Every user, oldest first."""

    items: list[UserPublic]


class QueueStatus(BaseModel):
    """The job queue as the admin sees it."""

    name: str
    reachable: bool = Field(description="Whether Redis answered.")
    depth: int | None = Field(description="Jobs waiting; null when Redis is unreachable.")
    shards_in_flight: int | None = Field(
        default=None,
        description="Shard tasks of sharded jobs running now (by heartbeat); null when Redis "
        "is unreachable.",
    )


class WorkerStatus(BaseModel):
    """A live worker, from its heartbeat."""

    name: str
    state: str = Field(description="'idle' or 'busy'.")
    job_id: str | None = Field(description="The job it is running.")
    device: str | None = None
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    last_heartbeat: datetime | None = None
    jobs_done: int = 0


class FailureSummary(BaseModel):
    """A recently failed job."""

    id: str
    owner: str
    metric: str
    representation: str | None
    worker: str | None
    finished_at: datetime | None
    error: Problem | None


class ReaperStatus(BaseModel):
    """How lost workers are detected."""

    heartbeat_ttl_s: float
    interval_s: float
    max_detection_s: float = Field(
        description="A job whose worker died ends 'failed' (worker lost) within this time."
    )


class AdminStatus(BaseModel):
    """Queue, workers, jobs by status and recent failures (``GET /v1/admin/status``)."""

    queue: QueueStatus
    workers: list[WorkerStatus]
    jobs: dict[str, int] = Field(description="Number of jobs of each status.")
    recent_failures: list[FailureSummary]
    reaper: ReaperStatus


_ISO_DATETIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
)


def _iso_only(value: Any) -> Any:
    """Refuse what pydantic would read as a Unix time: the API speaks ISO 8601 only."""
    if isinstance(value, str) and not _ISO_DATETIME.match(value):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2025-01-31T12:00:00Z")
    return value


#: A date-time query parameter, ISO 8601 only.
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_only)]


#: Most jobs in one page of a search, and most points of one series.
MAX_SEARCH_PAGE = 500
MAX_SERIES_POINTS = 5000


class SearchRequest(_Strict):
    """A search over stored jobs (``POST /v1/results:search``); see the filter grammar in
    :mod:`fimntk.contract.filters`."""

    filter: str = Field(
        default="",
        max_length=4000,
        description="Clauses joined by AND: `name op literal`, ops = != < <= > >= IN LIKE; "
        "names labels.<key>, scalars.<key>, id, status, metric, rep, variant, model, dataset, "
        "n, step, created_at, finished_at. Text in single quotes.",
        examples=["labels.run = 'seed0' AND rep IN ('kfac', 'ekfac') AND step >= 1000"],
    )
    order_by: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="created_at, finished_at, step, n, id, status, metric or rep; '-' first for "
        "descending. Default: newest first.",
        examples=[["-step"]],
    )
    page_size: int = Field(default=100, ge=1, le=MAX_SEARCH_PAGE)
    page_token: str | None = Field(default=None, max_length=512)


class SearchRow(BaseModel):
    """A job found by a search, with its labels and whole-model scalars (null: not finite)."""

    id: str
    status: str
    owner: str
    metric: str
    rep: str | None
    variant: str | None
    model: str
    dataset: str
    n: int | None = Field(description="Examples the job runs over (a server-set label).")
    step: int | None
    created_at: datetime | None
    finished_at: datetime | None
    labels: dict[str, str]
    scalars: dict[str, float | None]


class SearchPage(BaseModel):
    """A page of search results."""

    items: list[SearchRow]
    next_page_token: str | None = Field(description="Pass as page_token for the next page.")


class SeriesLine(BaseModel):
    """One line of a chart: the values of the group_by names, and points [x, y, job id]."""

    group: dict[str, str | None]
    name: str = Field(description="The group's values joined for a legend.")
    points: list[tuple[float | str, float | None, str]]


class SeriesPublic(BaseModel):
    """Series of a scalar against step or time (``format=series``)."""

    key: str
    x: str
    series: list[SeriesLine]


class LabelCount(BaseModel):
    """A label key or value and how many of the user's jobs carry it."""

    value: str
    jobs: int


class LabelList(BaseModel):
    """Label keys or values, for filter autocompletion."""

    items: list[LabelCount]
