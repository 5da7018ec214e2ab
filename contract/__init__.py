"""The wire contract: the words and shapes that the client, the API and the workers share.

Pydantic and the standard library only (no torch, no web framework, no queue), so that every
package may import it: :mod:`fimntk.contract.vocabulary` holds the shared words (statuses,
metrics, representations, operations, layers, dtypes, problem types).
"""
