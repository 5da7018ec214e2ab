"""The HTTP API (FastAPI): uploads, jobs, results, listings, admin, health and metrics.

:func:`fimntk.service.main.create_app` builds the app; ``routes/`` holds one router per
resource, :mod:`~fimntk.service.jobs` the job logic between routes and stores,
:mod:`~fimntk.service.problem_handlers` the one mapping of errors to problem+json, and
:mod:`~fimntk.service.embedded` the one-machine ``fimntk serve``.

May import: :mod:`fimntk.contract`, :mod:`fimntk.core`, FastAPI, Starlette, uvicorn, Redis, RQ,
Prometheus. Never: torch, the engine or the worker (the API computes nothing and answers a status
request without torch), nor the client.
"""
