"""fimntk: Fisher Information Matrices and Neural Tangent Kernels of PyTorch networks.

One distribution, four packages by role:

* :mod:`fimntk.engine`: the library (torch only): ``from fimntk.engine import FIM, NTK``.
* :mod:`fimntk.client`: the service's client and the ``fimntk`` command line:
  ``from fimntk import Client``.
* :mod:`fimntk.service` and :mod:`fimntk.worker`: the API and the GPU workers; their
  dependencies come with the ``server`` extra (``pip install "fimntk[server]"``).

Importing :mod:`fimntk` imports nothing else; the names below load their package on first use.
"""

from __future__ import annotations

from typing import Any

from fimntk.version import __version__

#: Names re-exported from :mod:`fimntk.client`, imported on first use.
_CLIENT_NAMES = ("AsyncClient", "Client", "ClientConfig", "RemoteFIM", "RemoteNTK")

__all__ = [*_CLIENT_NAMES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from fimntk import client

        return getattr(client, name)
    raise AttributeError(f"module 'fimntk' has no attribute {name!r}")
