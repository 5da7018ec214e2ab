"""The GPU workers: RQ workers that run jobs with the engine and store what they produce.

:mod:`~fimntk.worker.compute_worker` is the worker process (one per GPU), calling
:func:`fimntk.worker.tasks.run_job` by dotted path with a job id; :mod:`~fimntk.worker.runner`
runs one job (model, data, representation, operations, results); :mod:`~fimntk.worker.models`
builds models from JSON, never from user code.

May import: :mod:`fimntk.engine`, :mod:`fimntk.contract`, :mod:`fimntk.core`, torch, RQ, Redis.
Never: FastAPI or Starlette (the web layer), nor the client.
"""
