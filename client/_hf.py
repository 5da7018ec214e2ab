"""Describe a Hugging Face ``PreTrainedModel`` as an ``hf`` spec (:mod:`fimntk.contract.hf`):
its config (without private keys and what the server decides itself) and the auto class
whose ``from_config`` rebuilds exactly its class."""

from __future__ import annotations

import json
import sys
from typing import Any

from torch import nn

from fimntk.contract.hf import HF_HEADS, HF_MODEL_TYPES, REFUSED_KEYS

#: Config keys that describe where the model came from, not what it is.
_PROVENANCE = frozenset({"transformers_version", "architectures"})


class HFDescribeError(Exception):
    """A Hugging Face model that the ``hf`` spec cannot carry."""


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing
    ``transformers`` when the caller did not)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def describe_hf(model: nn.Module) -> dict[str, Any]:
    """The ``hf`` spec of a ``PreTrainedModel`` (without its dtype).

    Raises:
        HFDescribeError: A model type outside the server's allowlist, remote code, or a class
            no allowed auto class builds.
    """
    import transformers

    config = model.config.to_dict()  # type: ignore[union-attr, operator]
    if config.get("auto_map"):
        raise HFDescribeError("its config has an auto_map (remote code), which servers refuse")
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise HFDescribeError(
            f"model type {model_type!r} is not one the server builds ({sorted(HF_MODEL_TYPES)})"
        )
    for head in sorted(HF_HEADS):
        mapping = getattr(transformers, head)._model_mapping
        if type(model.config) in mapping and mapping[type(model.config)] is type(model):
            break
    else:
        raise HFDescribeError(f"no allowed auto class ({sorted(HF_HEADS)}) builds {type(model)}")
    kept = {
        k: v
        for k, v in config.items()
        if not k.startswith("_") and k not in REFUSED_KEYS and k not in _PROVENANCE
    }
    # Through JSON, as the server reads it (id2label's integer keys become strings).
    return {"kind": "hf", "config": json.loads(json.dumps(kept)), "head": head}
