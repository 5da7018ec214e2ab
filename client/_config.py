"""Where the client finds its server and API key: arguments, then ``FIMNTK_URL`` /
``FIMNTK_API_KEY``, then a config file (``FIMNTK_CONFIG``, else
``$XDG_CONFIG_HOME/fimntk/config.toml``, else ``~/.config/fimntk/config.toml``)::

    url = "http://gpu-box.lab:8000"
    api_key = "fk_..."
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fimntk.client.errors import ConfigurationError

DEFAULT_URL = "http://127.0.0.1:8000"


def config_path() -> Path:
    """The config file the client reads (it may not exist)."""
    explicit = os.environ.get("FIMNTK_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fimntk" / "config.toml"


def cache_dir() -> Path:
    """Where downloads go by default: ``$XDG_CACHE_HOME/fimntk`` or ``~/.cache/fimntk``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fimntk"


def _read_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    text = path.read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from exc
        return {k: str(v) for k, v in data.items() if isinstance(v, str)}
    values = {}  # Python 3.10: the flat 'key = "value"' subset is all we need
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


@dataclass(frozen=True)
class ClientConfig:
    """Resolved connection settings.

    Attributes:
        url: Server base URL, without a trailing slash.
        api_key: Bearer API key; ``None`` allows only unauthenticated calls (health).
    """

    url: str
    api_key: str | None

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None) -> ClientConfig:
        """Arguments first, then the environment, then the config file, then the default URL.

        Raises:
            ConfigurationError: A URL without ``http://`` or ``https://``.
        """
        file_values: dict[str, str] | None = None

        def lookup(given: str | None, env: str, key: str) -> str | None:
            nonlocal file_values
            if given:
                return given
            if os.environ.get(env):
                return os.environ[env]
            if file_values is None:
                file_values = _read_file(config_path())
            return file_values.get(key) or None

        resolved_url = lookup(url, "FIMNTK_URL", "url") or DEFAULT_URL
        if not resolved_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"server URL {resolved_url!r} must start with http:// or https://"
            )
        return cls(resolved_url.rstrip("/"), lookup(api_key, "FIMNTK_API_KEY", "api_key"))

    def require_key(self) -> str:
        """The API key.

        Raises:
            ConfigurationError: None configured, with the three ways to give one.
        """
        if not self.api_key:
            raise ConfigurationError(
                "no API key: give one (api_key=... in Python, --key on the command line), set "
                f'FIMNTK_API_KEY, or put api_key = "..." in {config_path()} (a lab admin '
                "makes keys with 'fimntk keys create NAME')"
            )
        return self.api_key
