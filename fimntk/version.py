"""The version of the fimntk distribution, in one place (files and the API report it)."""

__version__ = "0.2.0"
