"""The public surface of :mod:`client`: ``__all__`` pinned, the two clients mirroring each
other name for name, and an import that does not pull in torch."""

from __future__ import annotations

import inspect
import subprocess
import sys

from fimntk import client
from fimntk.client import AsyncClient, Client

EXPORTED = [
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
CLIENT_METHODS = [
    "FIM",
    "Hessian",
    "NTK",
    "PushForward",
    "admin_status",
    "cancel",
    "close",
    "create_user",
    "download",
    "eigenpairs",
    "get_diag",
    "health",
    "job",
    "jobs",
    "mv",
    "norm",
    "ntk",
    "result",
    "revoke_user",
    "search",
    "series",
    "solve",
    "submit",
    "trace",
    "upload",
    "upload_dataset",
    "users",
    "vTMv",
    "wait",
]
#: Methods of the shared base, the same (not awaited) on both clients.
SHARED_METHODS = ["labels"]


def _public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_all_is_pinned() -> None:
    assert sorted(client.__all__) == sorted(EXPORTED)
    for name in client.__all__:
        assert getattr(client, name) is not None


def test_clients_mirror_each_other() -> None:
    sync, async_ = _public(Client), _public(AsyncClient)
    assert sorted(sync) == sorted(async_) == sorted(CLIENT_METHODS + SHARED_METHODS)
    for name in CLIENT_METHODS:
        assert not inspect.iscoroutinefunction(sync[name]), name
        assert inspect.iscoroutinefunction(async_[name]), name
        assert (
            inspect.signature(sync[name]).parameters.keys()
            == inspect.signature(async_[name]).parameters.keys()
        ), name


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, client, client.cli; client.Client('http://x:1', 'k'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
