"""The wire contract: the words and shapes that the client, the API and the workers share.

:mod:`~fimntk.contract.vocabulary` holds the shared words (job statuses, metrics,
representations, the operations of each, layers, builders, dtypes),
:mod:`~fimntk.contract.problems` the catalogue of problem types, and
:mod:`~fimntk.contract.schemas` the request and response bodies of the API.

May import: pydantic and the standard library only (no torch, no web framework, no queue), so
that the client, the API and the workers all can.
"""
