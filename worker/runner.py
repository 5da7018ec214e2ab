"""Running one job: load the model and data, compute the representation, run the operations,
store the results — and turn every failure into a problem document on the job record.

The runner lives as long as the worker process, so it keeps a CUDA context, recently used
models and kept representations between jobs. It reads everything from the database by job id;
the queue carries nothing but that id.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException
from safetensors.torch import load_file
from torch import nn

from fimntk import engine
from fimntk.contract import problems
from fimntk.contract.problems import problem
from fimntk.contract.vocabulary import JobStatus
from fimntk.core import logs
from fimntk.core.config import Settings
from fimntk.core.datasets import dataset_path
from fimntk.core.queue import done_channel
from fimntk.core.storage.blobs import LocalBlobStore
from fimntk.core.storage.records import JobRecord, SqlRecordStore, utcnow
from fimntk.core.storage.stores import open_artifact_store
from fimntk.engine.memory import cheaper_representation
from fimntk.worker import artifacts
from fimntk.worker.cache import LRUCache
from fimntk.worker.data import make_loader
from fimntk.worker.errors import JobCanceledError, JobInputError, JobProblemError
from fimntk.worker.hessian import HESSIAN_LOSSES, ProgressLoader
from fimntk.worker.memory_check import (
    activation_bytes,
    check_fits,
    check_hessian_fits,
    check_jacobian_fits,
)
from fimntk.worker.models import DTYPES, load_builders, load_model
from fimntk.worker.outputs import OutputCollector
from fimntk.worker.probe import run_probe

_log = logging.getLogger(__name__)

#: Attributes of the engine's estimates that go into results.
_ESTIMATE_FIELDS = (
    "estimate",
    "stderr",
    "eigenvalues",
    "eigenvectors",
    "residual_norms",
    "grid",
    "density",
)
_PROGRESS_EVERY_S = 0.5
_CANCEL_CHECK_EVERY_S = 1.0


class OperationError(Exception):
    """An operation the representation refused (TypeError, ValueError...) at ``index``."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index = index
        self.detail = detail


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Progress:
    """Progress callback: writes to RQ job meta (throttled, tolerant of Redis blips) and stops
    the job when a stop was requested."""

    def __init__(self, runner: JobRunner, job_id: str) -> None:
        self.runner = runner
        self.job_id = job_id
        self.rq_job = get_current_job()
        self.state: dict[str, Any] = {"done": 0, "total": None, "stage": "loading"}
        self._last_write = 0.0
        self._last_check = time.monotonic()

    def __call__(self, done: int, total: int | None, stage: str) -> None:
        self.check()
        changed = str(stage) != self.state.get("stage")
        self.state = {
            "done": int(done),
            "total": None if total is None else int(total),
            "stage": str(stage),
        }
        now = time.monotonic()
        if (
            changed
            or now - self._last_write >= _PROGRESS_EVERY_S
            or (total is not None and done >= total)
        ):
            self._write(now)

    def stage(self, name: str) -> None:
        """Enter a new stage (always written)."""
        self.check()
        self.state = {**self.state, "stage": name}
        self._write(time.monotonic())

    def check(self) -> None:
        """Raise :class:`JobCanceledError` when the job should stop."""
        if self.runner.stop_requested.is_set():
            raise JobCanceledError(self.job_id)
        now = time.monotonic()
        if now - self._last_check >= _CANCEL_CHECK_EVERY_S:
            self._last_check = now
            record = self.runner.records.get_job(self.job_id)
            if record is not None and record.cancel_requested:
                raise JobCanceledError(self.job_id)

    def _write(self, now: float) -> None:
        self._last_write = now
        if self.rq_job is None:
            return
        try:
            self.rq_job.meta["progress"] = dict(self.state)
            self.rq_job.save_meta()
        except RedisError as exc:  # progress is best effort: never fail a job for it
            _log.warning("could not write progress of %s: %s", self.job_id, exc)


class JobRunner:
    """Runs jobs in the worker process.

    Args:
        settings: Settings (database, data directory, limits, builder modules).
        device: Device to compute on; ``settings.device`` when omitted.
    """

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        self.settings = settings
        self.records = SqlRecordStore(settings.resolved_database_url)
        self.blobs = LocalBlobStore(settings.blobs_dir)
        self.artifacts = open_artifact_store(settings)
        self.builders = load_builders(settings.builder_modules)
        self.device = resolve_device(device or settings.device)
        self.models: LRUCache[nn.Module] = LRUCache(settings.model_cache_size)
        self.representations: LRUCache[Any] = LRUCache(settings.model_cache_size)
        self.stop_requested = threading.Event()
        self.current_job_id: str | None = None
        self.current_record_id: str | None = None
        self._end_current: Callable[[str], None] | None = None
        self.worker_name: str | None = None
        self.on_job_done: Callable[[], None] | None = None
        self._op_progress: _Progress | None = None
        self._outputs = OutputCollector()

    def request_stop(self, job_id: str | None) -> None:
        """Stop the current job if it is ``job_id`` (called from the worker's pub/sub thread)."""
        if job_id is not None and job_id == self.current_job_id:
            self.stop_requested.set()

    def working_on(self, record_id: str | None, end_canceled: Callable[[str], None] | None) -> None:
        """Note the job record the work in flight belongs to (``None`` when idle), and how to
        record it canceled should the :class:`~fimntk.worker.cancel_watchdog.CancelWatchdog`
        stop it."""
        self.current_record_id = record_id
        self._end_current = end_canceled

    def cancel_requested(self, record_id: str) -> bool:
        """Whether the job record ``record_id`` asks for a cancel."""
        record = self.records.get_job(record_id)
        return record is not None and record.cancel_requested

    def end_canceled(self, record_id: str) -> None:
        """Record the job in flight ``canceled`` (from the watchdog's thread)."""
        end = self._end_current
        if end is not None and self.current_record_id == record_id:
            end(record_id)

    # -- one job ----------------------------------------------------------------------------

    def run(self, job_id: str) -> dict[str, Any]:
        """Run a job to a terminal status recorded in the database.

        Args:
            job_id: Job id; the spec is read from the database.

        Returns:
            A small JSON summary for RQ (the result itself is in the database).
        """
        token = logs.job_id.set(job_id)
        clock = time.monotonic()
        summary = {"status": JobStatus.FAILED}
        try:
            summary = self._run(job_id)
        finally:
            logs.job_id.reset(token)
            self._announce(job_id, summary["status"])  # first: a client may be waiting
            if self.on_job_done is not None:
                self.on_job_done()
        _log.info(
            "job %s ended %s",
            job_id,
            summary["status"],
            extra={
                "job_id": job_id,
                "status": summary["status"],
                "duration_s": round(time.monotonic() - clock, 4),
            },
        )
        return summary

    @staticmethod
    def _announce(job_id: str, status: str) -> None:
        """Wake the API's long polls of the job (best effort: they also poll the database)."""
        rq_job = get_current_job()
        if rq_job is None:
            return
        try:
            rq_job.connection.publish(done_channel(job_id), status)
        except RedisError as exc:
            _log.warning("could not announce the end of %s: %s", job_id, exc)

    def _run(self, job_id: str) -> dict[str, Any]:
        record = self.records.get_job(job_id)
        if record is None:
            _log.warning("job %s has no record; skipping", job_id)
            return {"status": "missing"}
        if record.cancel_requested:
            self._finish(job_id, JobStatus.CANCELED)
            return {"status": JobStatus.CANCELED}
        started = self.records.update_job(
            job_id,
            only_if_status=(JobStatus.QUEUED,),
            status=JobStatus.RUNNING,
            started_at=utcnow(),
            worker=self.worker_name,
            progress={"done": 0, "total": None, "stage": "loading"},
        )
        if not started:
            return {"status": record.status}
        self.current_job_id = job_id
        self.stop_requested.clear()
        progress = _Progress(self, job_id)
        timings: dict[str, float] = {}
        self.working_on(
            job_id, lambda rid: self._finish(rid, JobStatus.CANCELED, progress, timings)
        )
        try:
            result = self._execute(record, progress, timings)
        except JobCanceledError:
            self._finish(job_id, JobStatus.CANCELED, progress, timings)
            return {"status": JobStatus.CANCELED}
        except JobTimeoutException:
            limit = record.spec.get("timeout_s")
            self._fail(
                job_id,
                problem(
                    problems.JOB_TIMEOUT,
                    f"the job ran past its limit of {limit} s",
                    "timeout_s",
                ),
                progress,
                timings,
            )
            return {"status": JobStatus.FAILED}
        except BaseException as exc:
            self._fail(job_id, self._problem_for(exc, record), progress, timings)
            if not isinstance(exc, Exception):
                raise
            return {"status": JobStatus.FAILED}
        finally:
            self.current_job_id = None
            self.working_on(None, None)
            self.stop_requested.clear()
        done = self.records.update_job(
            job_id,
            only_if_status=(JobStatus.RUNNING,),
            status=JobStatus.SUCCEEDED,
            finished_at=utcnow(),
            result=result,
            kept=bool(record.spec.get("keep")),
            timings=timings,
            progress={**progress.state, "stage": "done"},
        )
        if not done:
            self.records.store_outputs(job_id, [], {})
            self.artifacts.delete_job(job_id)
        return {"status": JobStatus.SUCCEEDED if done else "abandoned"}

    def _finish(
        self,
        job_id: str,
        status: str,
        progress: _Progress | None = None,
        timings: dict[str, float] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        state = progress.state if progress else {"done": 0, "total": None}
        self.records.update_job(
            job_id,
            only_if_status=(JobStatus.QUEUED, JobStatus.RUNNING),
            status=status,
            finished_at=utcnow(),
            timings=timings or {},
            error=error,
            progress={**state, "stage": status},
        )
        self.records.store_outputs(job_id, [], {})
        self.artifacts.delete_job(job_id)

    def _fail(
        self, job_id: str, error: dict[str, Any], progress: _Progress, timings: dict[str, float]
    ) -> None:
        self._finish(job_id, JobStatus.FAILED, progress, timings, error)

    def _problem_for(self, exc: BaseException, record: JobRecord) -> dict[str, Any]:
        """The problem document of a failure."""
        if isinstance(exc, JobInputError):
            return problem(problems.INVALID_INPUT, exc.detail, exc.field)
        if isinstance(exc, JobProblemError):
            return exc.problem
        if isinstance(exc, OperationError):
            return problem(
                problems.UNSUPPORTED_OPERATION,
                exc.detail,
                f"operations[{exc.index}]",
            )
        if is_out_of_memory(exc):
            oom = self._oom_problem(exc, record)
            self.models.clear()
            self.representations.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return oom
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return problem(
                problems.STORAGE_FULL,
                f"no space left on the artifact store while writing the results "
                f"({exc}); nothing was kept: free space and submit the job again",
            )
        if isinstance(exc, engine.InvalidInputError):
            return problem(problems.INVALID_INPUT, str(exc), "model")
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            return problem(
                problems.WORKER_SHUTDOWN,
                "the worker shut down during the job; submit it again",
            )
        _log.exception("job %s failed unexpectedly", record.id)
        # The log has the whole trace; the problem only the first line (no paths, addresses).
        return problem(problems.INTERNAL_ERROR, f"{type(exc).__name__}: {first_line(exc)}")

    def _oom_problem(self, exc: BaseException, record: JobRecord) -> dict[str, Any]:
        spec = record.spec
        rep = spec.get("representation") or "ntk"
        need = self._estimate(spec)
        need_text = f"about {need / 2**30:.2f} GiB" if need else "an unknown amount"
        alternative = None if rep == "ntk" else cheaper_representation(rep)
        cheaper = (
            "a smaller 'dataset.subset'"
            if alternative is None
            else f"representation {alternative!r} or a smaller batch_size"
        )
        return problem(
            problems.OUT_OF_MEMORY,
            f"{rep!r} needs {need_text} on {self.device} and did not fit "
            f"({type(exc).__name__}); try {cheaper}",
            "representation" if rep != "ntk" else "dataset.subset",
            estimated_bytes=need,
            alternative=alternative,
        )

    def _estimate(self, spec: dict[str, Any]) -> int | None:
        """Estimated memory of the representation, from the engine when it can tell."""
        estimate = getattr(engine, "estimate_memory", None)
        key = self._model_key(spec)
        model = self.models.get(key)
        if estimate is None or model is None:
            return None
        try:
            return int(
                estimate(
                    model,
                    spec.get("representation") or "ntk",
                    output_count(model),
                    spec["dataset"].get("subset"),
                )
            )
        except Exception:  # an estimate is a hint; its failure must not hide the OOM
            return None

    # -- stages -----------------------------------------------------------------------------

    def _execute(
        self, record: JobRecord, progress: _Progress, timings: dict[str, float]
    ) -> dict[str, Any]:
        spec = record.spec
        clock = time.monotonic()
        progress.stage("loading")
        model = self._model(spec)
        dtype = DTYPES[spec["dtype"]]
        needs_targets = spec["metric"] in ("empirical_fim", "hessian")

        def loader() -> Any:
            return self._loader(spec, dtype, needs_targets)

        timings["load_s"] = time.monotonic() - clock
        clock = time.monotonic()
        representation, reused_from = self._representation(record, model, loader, progress)
        timings["compute_s"] = time.monotonic() - clock
        return self.operations_result(record, representation, reused_from, progress, timings)

    def operations_result(
        self,
        record: JobRecord,
        representation: Any,
        reused_from: str | None,
        progress: _Progress,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """Run the job's operations on a computed representation (and keep it if asked).

        Returns:
            The result document.
        """
        spec = record.spec
        clock = time.monotonic()
        progress.stage("operations")
        self._op_progress = progress
        self._outputs = OutputCollector()
        outputs = []
        for i, op in enumerate(spec["operations"]):
            progress.check()
            values = self._operation(record.id, i, op, representation, spec)
            self._outputs.operation(op["op"], values)
            outputs.append({"index": i, "op": op["op"], "outputs": values})
        try:  # a preview never fails a job
            self._outputs.layers(representation)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            _log.warning("no per-layer preview of %s: %s", record.id, exc)
        kept = None
        if spec.get("keep"):
            self.representations.put((record.rep_key, str(self.device)), representation)
            # An implicit Hessian is the model and the loader: nothing to write, kept in memory.
            if artifacts.can_persist() and not isinstance(
                representation, engine.PMatHessianImplicit
            ):
                try:
                    kept = artifacts.save_representation(
                        self.artifacts,
                        record.id,
                        representation,
                        {"job": record.id, "rep_key": record.rep_key},
                    )
                except (TypeError, ValueError, NotImplementedError) as exc:
                    _log.info("representation of %s kept in memory only: %s", record.id, exc)
        timings["operations_s"] = time.monotonic() - clock
        self.records.store_outputs(record.id, self._outputs.scalars, self._outputs.previews)
        return {"operations": outputs, "reused_from": reused_from, "representation_artifact": kept}

    def _model_key(self, spec: dict[str, Any]) -> tuple[str, ...]:
        model = spec["model"]
        return (
            model["weights"],
            json.dumps(model["architecture"], sort_keys=True),
            spec["dtype"],
            str(self.device),
        )

    def _model(self, spec: dict[str, Any]) -> nn.Module:
        key = self._model_key(spec)
        model = self.models.get(key)
        if model is None:
            weights = spec["model"]["weights"]
            model = load_model(
                spec["model"]["architecture"],
                self.blobs.path(weights),
                self.builders,
                self.settings.max_model_bytes,
                self.settings.max_header_bytes,
            )
            model = model.to(device=self.device, dtype=DTYPES[spec["dtype"]])
            self.models.put(key, model)
        probe = spec["model"].get("probe")
        if probe is not None:
            arch_dtype = DTYPES[spec["model"]["architecture"].get("dtype", "float32")]
            run_probe(model, self.blobs.path(probe), arch_dtype)
        return model

    def _loader(self, spec: dict[str, Any], dtype: torch.dtype, needs_targets: bool) -> Any:
        dataset = spec["dataset"]
        if dataset.get("blob"):
            path, field = self.blobs.path(dataset["blob"]), "dataset.blob"
        else:
            path = dataset_path(self.settings.datasets_dir, dataset["name"])
            field = "dataset.name"
        return make_loader(path, dataset, dtype, field, needs_targets)

    def _representation(
        self, record: JobRecord, model: nn.Module, loader: Callable[[], Any], progress: _Progress
    ) -> tuple[Any, str | None]:
        """Reuse a kept representation when the job may, else compute it."""
        spec = record.spec
        key = (record.rep_key, str(self.device))
        if record.reuse_job_id is not None:
            cached = self.representations.get(key)
            if cached is not None:
                return cached, record.reuse_job_id
            if artifacts.can_persist():
                try:
                    return (
                        artifacts.load_representation(self.artifacts, record.reuse_job_id),
                        record.reuse_job_id,
                    )
                except LookupError:
                    _log.info(
                        "kept representation of %s not on disk: recomputing", record.reuse_job_id
                    )
        progress.stage("computing")
        data = loader()
        metric = spec["metric"]
        if metric == "hessian":
            return self._hessian(model, data, spec, progress), None
        if metric == "jacobian":
            return self._jacobian(model, data, spec, progress), None
        check_fits(
            model,
            "ntk" if metric == "ntk" else spec["representation"],
            output_count(model),
            example_count(data),
            self.device,
            working_bytes=activation_bytes(model, data, self.device, DTYPES[spec["dtype"]]),
        )
        common: dict[str, Any] = {"device": self.device, "progress": progress}
        if metric == "ntk":
            return engine.GramMatrix(model, data, **common), None
        common["variant"] = spec["variant"]
        rep_name = spec["representation"]
        if metric == "fim":
            rep = engine.FIM(model, data, rep_name, **common)
        elif metric == "fim_mc":
            rep = engine.FIM_MonteCarlo(
                model, data, rep_name, trials=spec["trials"], seed=spec.get("seed"), **common
            )
        else:
            rep = engine.EmpiricalFIM(model, data, rep_name, centering=spec["centering"], **common)
        if isinstance(rep, engine.EigenvalueCorrection) and spec.get("update_diag", True):
            progress.stage("update_diag")
            rep.update_diag(data)
        return rep, None

    def _hessian(
        self, model: nn.Module, data: Any, spec: dict[str, Any], progress: _Progress
    ) -> Any:
        """The Hessian of the spec's named loss, after checking it fits; progress counts the
        examples of every pass (one per layer for ``blockdiag`` and ``diag``)."""
        rep = spec["representation"]
        check_hessian_fits(
            model,
            rep,
            self.device,
            working_bytes=activation_bytes(model, data, self.device, DTYPES[spec["dtype"]]),
        )
        passes = 1 if rep == "dense" else len(engine.LayerCollection.from_model(model))
        check = self._check_operations if rep == "implicit" else None
        counted = ProgressLoader(data, example_count(data), progress, passes, check)
        return engine.Hessian(
            model, counted, rep, loss=HESSIAN_LOSSES[spec["loss"]], device=self.device
        )

    def _jacobian(
        self, model: nn.Module, data: Any, spec: dict[str, Any], progress: _Progress
    ) -> Any:
        """The Jacobian as a PushForward/PullBack map, after checking it fits: ``dense``
        computes and stores ``J`` ``(c, n, d)`` now (progress per batch); ``implicit`` stores
        nothing, and each ``jvp``/``vjp`` iterates the data once, stopping at the next batch
        when the job is canceled."""
        n = example_count(data)
        check_jacobian_fits(
            model,
            spec["representation"],
            output_count(model),
            n,
            self.device,
            working_bytes=activation_bytes(model, data, self.device, DTYPES[spec["dtype"]]),
        )
        lc = engine.LayerCollection.from_model(model)
        generator = engine.Jacobian(model, lc, device=self.device, progress=progress)
        if spec["representation"] == "dense":
            return engine.PFMapDense(lc, generator=generator, examples=data)
        counted = ProgressLoader(data, n, progress, check=self._check_operations)
        return engine.PFMapImplicit(lc, generator, counted)

    def _check_operations(self) -> None:
        """Stop the job whose operations are running if it should stop."""
        if self._op_progress is not None:
            self._op_progress.check()

    # -- operations -------------------------------------------------------------------------

    def _operation(
        self, job_id: str, index: int, op: dict[str, Any], rep: Any, spec: dict[str, Any]
    ) -> dict[str, Any]:
        name = op["op"]
        prefix = f"op{index}_{name}"
        try:
            if name in ("trace", "norm"):
                return {"value": artifacts.scalar(getattr(rep, name)())}
            if name in ("get_diag", "to_torch"):
                value = getattr(rep, name)()
                gram = name == "to_torch" and spec["metric"] == "ntk"
                self._outputs.tensor(name, "value", value, gram=gram)
                return {"value": self._tensor(job_id, prefix, value)}
            if name in ("jvp", "vjp"):
                vector = self._vector(op["v"], index, rep, spec, function_space=name == "vjp")
                value = rep.jvp(vector) if name == "jvp" else rep.vjp(vector)
                self._outputs.tensor(name, "value", value.get_flat_representation())
                return {"value": self._tensor(job_id, prefix, value.get_flat_representation())}
            if name in ("mv", "vTMv", "solve"):
                v = self._vector(op["v"], index, rep, spec)
                if name == "vTMv":
                    return {"value": artifacts.scalar(rep.vTMv(v))}
                out = rep.mv(v) if name == "mv" else rep.solve(v, regul=op["regul"])
                return {"value": self._tensor(job_id, prefix, out.get_flat_representation())}
            if name == "eigenpairs":
                if isinstance(rep, engine.PMatDense):  # partial solver: progress, cancel
                    evals, evecs = rep.eigenpairs(op["k"], progress=self._op_progress)
                else:
                    evals, evecs = rep.eigenpairs(op["k"])
                self._outputs.tensor(name, "eigenvalues", evals)
                return {
                    "eigenvalues": self._tensor(job_id, f"{prefix}_eigenvalues", evals),
                    "eigenvectors": self._tensor(job_id, f"{prefix}_eigenvectors", evecs),
                }
            return self._estimator(job_id, index, op, rep)
        except (TypeError, ValueError, NotImplementedError) as exc:
            if isinstance(exc, JobInputError):
                raise
            raise OperationError(index, f"{name}: {exc}") from exc

    def _estimator(self, job_id: str, index: int, op: dict[str, Any], rep: Any) -> dict[str, Any]:
        name = op["op"]  # one of the estimator names the job schema allows
        function = getattr(engine.estimators, name)
        accepted = inspect.signature(function).parameters
        kwargs = {k: v for k, v in op.items() if k != "op" and k in accepted}
        estimate = function(rep, **kwargs, progress=self._op_progress)
        outputs: dict[str, Any] = {}
        if isinstance(estimate, engine.estimators.SpectralDensity):
            self._outputs.density(estimate.grid, estimate.density)
        for field in _ESTIMATE_FIELDS:
            value = getattr(estimate, field, None)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                self._outputs.tensor(name, field, value)
                outputs[field] = self._tensor(job_id, f"op{index}_{name}_{field}", value)
            elif isinstance(value, torch.Tensor | float | int):
                outputs[field] = artifacts.scalar(value)
        return outputs

    def _tensor(self, job_id: str, name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, torch.Tensor):
            value = value.get_flat_representation()
        return artifacts.save_tensor(self.artifacts, job_id, name, value)

    def _vector(
        self,
        digest: str,
        index: int,
        rep: Any,
        spec: dict[str, Any],
        function_space: bool = False,
    ) -> Any:
        field = f"operations[{index}].v"
        (tensor,) = load_file(str(self.blobs.path(digest)), device="cpu").values()
        tensor = tensor.to(device=self.device, dtype=DTYPES[spec["dtype"]])
        if not torch.isfinite(tensor).all():
            raise JobInputError("vector holds NaN or infinite values", field)
        if function_space:  # u of a pull back: (c, n), as the map's jvp gives it
            shape = tuple(rep.data.shape[:2]) if isinstance(rep, engine.PFMapDense) else None
            if tensor.dim() != 2 or (shape is not None and tuple(tensor.shape) != shape):
                want = list(shape) if shape is not None else "(c, n)"
                raise JobInputError(
                    f"vector has shape {list(tensor.shape)}; the Jacobian's function space is "
                    f"{want} (outputs, examples)",
                    field,
                )
            return engine.FVector(tensor)
        if spec["metric"] == "ntk":
            c, n = rep.shape[:2]
            if tensor.numel() != c * n:
                raise JobInputError(
                    f"vector has shape {list(tensor.shape)}; the NTK needs ({c}, {n})", field
                )
            return engine.FVector(tensor.reshape(c, n))
        lc = rep.layer_collection
        if tensor.numel() != lc.numel():
            raise JobInputError(
                f"vector has shape {list(tensor.shape)}; the model has {lc.numel()} parameters",
                field,
            )
        return engine.PVector(lc, vector_repr=tensor.reshape(-1))


def output_count(model: nn.Module) -> int:
    """The model's outputs per example as the memory estimates take it: the width of its last
    ``nn.Linear`` (1 without one)."""
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return widths[-1] if widths else 1


def example_count(data: Any) -> int | None:
    """How many examples a loader holds, when its dataset says."""
    dataset = getattr(data, "dataset", None)
    return len(dataset) if dataset is not None else None


_OOM_MARKERS = ("out of memory", "can't allocate memory", "enforce fail at alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a host or CUDA out-of-memory (torch raises some as ``RuntimeError``)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError | engine.MemoryBudgetError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= 200 else text[:197] + "..."
