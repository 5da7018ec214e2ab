"""The shared words of the wire contract, each defined once and imported by the client, the API
and the workers: job statuses, metrics, representations, variants, dtypes, the operations each
representation defines, and the layers and builders an architecture may name.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal, get_args


class JobStatus(str, Enum):
    """Where a job is in its life: ``queued`` → ``running`` → one terminal status.

    A ``str`` enum: members compare equal to their values (``JobStatus.QUEUED == "queued"``), so
    records, JSON documents and query parameters carry the plain strings.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def __str__(self) -> str:
        return self.value


#: Statuses a job never leaves.
TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
#: Statuses of a job that still holds a place in the queue or on a worker, in life order.
IN_FLIGHT_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)

Metric = Literal["fim", "fim_mc", "empirical_fim", "ntk", "hessian", "jacobian"]
METRICS: tuple[str, ...] = get_args(Metric)
#: Metrics computed as a Fisher in some representation (the NTK has none).
FIM_METRICS = frozenset({"fim", "fim_mc", "empirical_fim"})
#: Losses a ``hessian`` job may differentiate, by name (never a user's callable), both summed
#: over examples: ``cross_entropy`` is ``F.cross_entropy(out, y, reduction="sum")`` (integer
#: class targets), ``mse`` is ``½ Σ ‖out − y‖²`` (so its Hessian is n · the ``regression``
#: Fisher for a model linear in its parameters).
HessianLoss = Literal["cross_entropy", "mse"]
HESSIAN_LOSSES: tuple[str, ...] = get_args(HessianLoss)
#: Representations of the loss Hessian (``fimntk.engine.hessian.HESSIAN_REPRESENTATIONS``).
HESSIAN_REPRESENTATIONS = ("dense", "blockdiag", "diag", "implicit")
#: Representations of the Jacobian as a PushForward/PullBack map (``metric="jacobian"``):
#: ``dense`` stores ``J`` ``(c, n, d)`` (``fimntk.engine.PFMapDense``), ``implicit`` stores
#: nothing and runs one forward-mode or backward pass per batch (``PFMapImplicit``).
JACOBIAN_REPRESENTATIONS = ("dense", "implicit")

Representation = Literal[
    "dense", "diag", "blockdiag", "quasidiag", "kfac", "ekfac", "lowrank", "implicit", "mixed"
]
REPRESENTATIONS: tuple[str, ...] = get_args(Representation)
Variant = Literal[
    "classif_logits",
    "classif_binary_logits",
    "classif_logsoftmax",
    "segmentation_logits",
    "regression",
]
VARIANTS: tuple[str, ...] = get_args(Variant)
#: dtypes a job computes in.
ComputeDtype = Literal["float32", "float64"]
#: dtypes a model's parameters may have.
ParamDtype = Literal["float16", "bfloat16", "float32", "float64"]
PARAM_DTYPES: tuple[str, ...] = get_args(ParamDtype)

#: Operations of every stored Fisher representation.
FIM_OPERATIONS = frozenset({"trace", "norm", "get_diag", "to_torch", "mv", "vTMv", "solve"})
#: Estimators (:mod:`fimntk.engine.estimators`), defined on every representation and the NTK.
ESTIMATOR_OPERATIONS = frozenset(
    {"hutchinson_trace", "hutchpp_trace", "hutchinson_diag", "lanczos_eigenpairs", "slq_density"}
)
#: Key of the NTK (an ``FMatDense``) in :data:`OPERATIONS`.
NTK_KEY = "ntk"
#: Operations each representation defines; the NTK is keyed :data:`NTK_KEY`.
OPERATIONS: dict[str, frozenset[str]] = {
    **{rep: FIM_OPERATIONS | ESTIMATOR_OPERATIONS for rep in REPRESENTATIONS},
    # Exact eigendecomposition of a stored matrix: eigenvectors (d, k).
    "dense": FIM_OPERATIONS | ESTIMATOR_OPERATIONS | {"eigenpairs"},
    "lowrank": FIM_OPERATIONS | ESTIMATOR_OPERATIONS | {"eigenpairs"},
    NTK_KEY: frozenset({"trace", "norm", "to_torch", "mv", "vTMv", "eigenpairs"})
    | ESTIMATOR_OPERATIONS,
}
#: Operations of the loss Hessian per representation, keyed ``hessian_<rep>``. The Hessian need
#: not be positive semi-definite: no ``solve``, and ``lanczos_eigenpairs`` / ``eigenpairs`` give
#: the largest *algebraic* eigenvalues (the most positive curvature), not the largest magnitude.
#: The implicit Hessian has only Hessian-vector products, so its trace is Hutchinson's.
HESSIAN_OPERATIONS: dict[str, frozenset[str]] = {
    "hessian_dense": frozenset(
        {"trace", "norm", "get_diag", "to_torch", "mv", "vTMv", "eigenpairs", "lanczos_eigenpairs"}
    ),
    "hessian_blockdiag": frozenset(
        {"trace", "norm", "get_diag", "to_torch", "mv", "vTMv", "lanczos_eigenpairs"}
    ),
    "hessian_diag": frozenset(
        {"trace", "norm", "get_diag", "to_torch", "mv", "vTMv", "lanczos_eigenpairs"}
    ),
    "hessian_implicit": frozenset(
        {"mv", "vTMv", "hutchinson_trace", "hutchpp_trace", "lanczos_eigenpairs", "slq_density"}
    ),
}
OPERATIONS.update(HESSIAN_OPERATIONS)
#: Operations of the Jacobian map per representation, keyed ``jacobian_<rep>``: ``jvp`` pushes a
#: parameter vector ``v`` (d,) forward to ``J v`` (c, n); ``vjp`` pulls a function-space vector
#: ``u`` (c, n) back to ``Jᵀ u`` (d,); ``to_torch`` is the stored ``J`` (c, n, d).
JACOBIAN_OPERATIONS: dict[str, frozenset[str]] = {
    "jacobian_dense": frozenset({"jvp", "vjp", "to_torch"}),
    "jacobian_implicit": frozenset({"jvp", "vjp"}),
}
OPERATIONS.update(JACOBIAN_OPERATIONS)
#: Every operation name a job may ask for.
ALL_OPERATIONS = frozenset().union(*OPERATIONS.values())
#: Public methods of the engine's matrices that are not job operations, and why.
NOT_OPERATIONS: dict[str, str] = {
    "inv": "returns a matrix: keep the representation, download it and invert it locally",
    "inverse": "an alias of inv",
    "from_generator": "a constructor (the job builds the matrix)",
    "pow": "returns a matrix: keep the representation, download it and raise it locally",
    "update_diag": "run by the job itself (the spec's update_diag field)",
    "centered": "run by the job itself (the spec's centering field)",
    "get_dense_tensor": "an alias of to_torch",
    "frobenius_norm": "a deprecated alias of norm",
    "compute_eigendecomposition": "returns the factors' eigenvectors: keep the representation, "
    "download it and decompose it locally",
    "get_eigendecomposition": "returns the factors' eigenvectors: keep the representation, "
    "download it and decompose it locally",
    "size": "known from the model's parameter count (or c and n for the NTK)",
    "eigenvalues": "the whole spectrum: ask eigenpairs or lanczos_eigenpairs for the top k, or "
    "keep the representation, download it and decompose it locally",
    "mm": "returns a matrix: keep the representation, download it and multiply locally",
    "mmap": "returns a map: keep the representation, download it and multiply locally",
    "matmat": "returns a matrix: keep the representation, download it and multiply locally",
    "push_forward": "a product of the Jacobian J, not of the Fisher: metric 'jacobian', op jvp",
    "pull_back": "a product of the Jacobian Jᵀ, not of the Fisher: metric 'jacobian', op vjp",
    "pinv": "returns a matrix: keep the representation, download it and take pinv locally",
    "mapTMmap": "takes a PushForward map: keep both (metric 'jacobian', representation "
    "'dense'), download them and evaluate locally",
}

#: Built-in ``torch.nn`` layers a sequential architecture may use. A static list rather than
#: ``getattr(torch.nn, name)``: a user's string never reaches an arbitrary attribute.
ALLOWED_LAYERS = frozenset(
    {
        "Sequential",
        "Identity",
        "Flatten",
        "Unflatten",
        "Linear",
        "Bilinear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "Embedding",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "RMSNorm",
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Tanh",
        "Sigmoid",
        "Softplus",
        "Softsign",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "LogSigmoid",
        "Softmax",
        "LogSoftmax",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool2d",
        "Upsample",
        "ZeroPad2d",
    }
)
#: Builders shipped with the worker (``fimntk.worker.models``); a lab adds more through
#: ``Settings.builder_modules``.
BUILTIN_BUILDERS = frozenset({"mlp", "cnn", "resnet"})
#: Buffers that built-in layers put in a state dict; they are not parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: Operations of the implicit Fisher that are sums over examples, one per product (so a sharded
#: job computes them on every shard and adds): the others iterate (CG, Lanczos, SLQ) or need
#: the whole matrix and run on one worker.
SHARDED_IMPLICIT_OPERATIONS = frozenset(
    {"trace", "get_diag", "mv", "vTMv", "hutchinson_trace", "hutchinson_diag"}
)
#: Largest ``shards`` a spec may ask for (a server may allow fewer: ``Settings.max_shards``).
MAX_SHARDS = 1024
#: Name of one tensor of dictionary inputs in a dataset or probe blob: ``inputs.<key>`` (a
#: Hugging Face batch's ``input_ids``, ``attention_mask``, ``labels``...).
DICT_INPUT = re.compile(r"^inputs\.([A-Za-z][A-Za-z0-9_]{0,63})$")
#: Most examples of a probe batch.
MAX_PROBE = 16


#: Most labels a job may carry, and the longest key and value (characters).
MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
#: What a label key may hold: letters, digits, ``_``, ``.`` and ``-``, starting with a letter.
LABEL_KEY_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: Labels the server sets on every job (queryable as filter names, not as ``labels.<key>``).
SERVER_LABELS = ("metric", "rep", "variant", "model", "dataset")
