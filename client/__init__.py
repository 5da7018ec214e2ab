"""fimntk client: the engine's API computed on the shared GPU service, and the ``fimntk``
command line.

Example::

    from fimntk.client import Client

    client = Client("http://gpu-box:8000", api_key="fk_...")   # or FIMNTK_URL / FIMNTK_API_KEY
    client.vTMv(model, loader, rep="ekfac")                    # v = the model's parameters
    F = client.FIM(model, loader, representation="kfac")       # computed once, kept
    F.trace(), F.solve(v, regul=1e-3), F.download()

Importing this package does not import torch; computations do.

May import: :mod:`fimntk.contract`, :mod:`fimntk.engine` (lazily, to ship models and to return
engine objects), httpx, tqdm, torch. Never: the server's packages (:mod:`fimntk.core`,
:mod:`fimntk.service`, :mod:`fimntk.worker`), except that the command line offers their
``serve`` and ``worker`` commands when the server extra is installed.
"""

from typing import Any

from fimntk.client._async import AsyncClient
from fimntk.client._config import ClientConfig
from fimntk.client._handles import RemoteFIM, RemoteHessian, RemoteNTK, RemotePushForward
from fimntk.client._sync import Client
from fimntk.client.errors import (
    APIError,
    AuthenticationError,
    ClientError,
    ConfigurationError,
    ConflictError,
    DataError,
    InvalidInputError,
    JobCanceledError,
    JobFailedError,
    JobTimeoutError,
    ModelNotSupportedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServerUnreachableError,
    ServiceUnavailableError,
    TooManyJobsError,
)

#: Names that need torch, imported on first use.
_LAZY = ("RemoteDataset", "describe_as", "from_library", "register_builder")

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientConfig",
    "ClientError",
    "ConfigurationError",
    "ConflictError",
    "DataError",
    "InvalidInputError",
    "JobCanceledError",
    "JobFailedError",
    "JobTimeoutError",
    "ModelNotSupportedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RemoteDataset",
    "RemoteFIM",
    "RemoteHessian",
    "RemoteNTK",
    "RemotePushForward",
    "ServerUnreachableError",
    "ServiceUnavailableError",
    "TooManyJobsError",
    "describe_as",
    "from_library",
    "register_builder",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fimntk.client import _shipping

        return getattr(_shipping, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
