"""The Hugging Face spec: ``{"kind": "hf", "config": {...}, "head": "AutoModelFor..."}``,
checked without ``transformers``.

The server builds ``<head>.from_config(config, attn_implementation="eager")``: no download, no
remote code. The config is a bounded JSON object of a model type the engine handles; keys that
reach outside the architecture (``auto_map``, private ``_...`` keys, the attention backend) are
refused, and so are strings that look like paths or URLs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fimntk.contract.arguments import ArgumentError

#: Model types whose layers the engine knows (``engine/layers``), by ``config.model_type``.
HF_MODEL_TYPES = frozenset({"bert", "gpt2", "vit", "llama"})
#: Auto classes a spec may name as its head.
HF_HEADS = frozenset(
    {
        "AutoModel",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForCausalLM",
        "AutoModelForMaskedLM",
        "AutoModelForImageClassification",
    }
)
#: Config keys refused: remote code, and what the server decides itself.
REFUSED_KEYS = frozenset(
    {
        "auto_map",
        "trust_remote_code",
        "attn_implementation",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "custom_pipelines",
        "name_or_path",
    }
)
MAX_CONFIG_KEYS = 256
MAX_CONFIG_DEPTH = 3
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_STRING = re.compile(r"^[A-Za-z0-9_\- .,:]{0,64}$")


def check_hf(arch: Mapping[str, Any], where: str) -> None:
    """Check an ``hf`` architecture's head and config.

    Args:
        arch: The raw ``model.architecture``.
        where: Its field path.

    Raises:
        ArgumentError: Naming the offending key and what to do.
    """
    head = arch.get("head")
    if not isinstance(head, str) or head not in HF_HEADS:
        raise ArgumentError(f"the head must be one of {sorted(HF_HEADS)}", f"{where}.head")
    config = arch.get("config")
    if not isinstance(config, Mapping):
        raise ArgumentError("expected an object", f"{where}.config")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise ArgumentError(
            f"model_type must be one of {sorted(HF_MODEL_TYPES)} (the types the engine "
            "handles); for another model, trace it as a graph or register a builder",
            f"{where}.config.model_type",
        )
    _check_object(config, f"{where}.config", 0)


def _check_object(obj: Mapping[str, Any], where: str, depth: int) -> None:
    if len(obj) > MAX_CONFIG_KEYS:
        raise ArgumentError(f"more than {MAX_CONFIG_KEYS} keys", where)
    for key, value in obj.items():
        at = f"{where}.{key}" if isinstance(key, str) and _KEY.match(key) else where
        if depth == 0 and (not isinstance(key, str) or not _KEY.match(key)):
            raise ArgumentError("config keys are identifiers (private '_' keys are refused)", where)
        if depth == 0 and key in REFUSED_KEYS:
            raise ArgumentError(
                f"{key!r} is refused: the server runs no remote code and chooses the "
                "attention and dtype itself; remove it",
                at,
            )
        if depth > 0 and (not isinstance(key, str) or not _STRING.match(key)):
            raise ArgumentError("keys are short strings without '/' or quotes", where)
        _check_value(value, at, depth)


def _check_value(value: Any, where: str, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise ArgumentError("integers are within ±2**53", where)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError("numbers are finite", where)
        return
    if isinstance(value, str):
        if not _STRING.match(value):
            raise ArgumentError(
                "strings are at most 64 letters, digits, spaces or '_-.,:' (no paths or URLs)",
                where,
            )
        return
    if depth >= MAX_CONFIG_DEPTH:
        raise ArgumentError(f"values nest more than {MAX_CONFIG_DEPTH} deep", where)
    if isinstance(value, list):
        if len(value) > MAX_CONFIG_KEYS:
            raise ArgumentError(f"more than {MAX_CONFIG_KEYS} entries", where)
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        _check_object(value, where, depth + 1)
        return
    raise ArgumentError("expected a JSON value", where)
