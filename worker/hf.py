"""Hugging Face models from ``hf`` specs (:mod:`fimntk.contract.hf`): ``from_config`` only.

No weights are downloaded and no remote code runs: the config (already checked) names a model
type of ``transformers``' own registry, the head comes from a static allowlist, and attention
is the eager implementation, whose per-layer modules the engine differentiates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fimntk.contract.hf import HF_HEADS
from fimntk.worker.errors import JobInputError


def build_hf(arch: Mapping[str, Any], where: str) -> nn.Module:
    """``<head>.from_config(config, attn_implementation="eager")`` on the current device.

    Args:
        arch: A checked ``hf`` architecture.
        where: Its field path.

    Raises:
        JobInputError: ``transformers`` missing on this worker, or a config it refuses.
    """
    try:
        import transformers
    except ImportError:
        raise JobInputError(
            "this server cannot build Hugging Face models: install the 'hf' extra "
            "(pip install 'fimntk[hf]') on its workers, or send a graph spec",
            f"{where}.kind",
        ) from None
    head = arch["head"]
    assert head in HF_HEADS  # checked before; the allowlist, never a free attribute name
    config = dict(arch["config"])
    try:
        cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        model = getattr(transformers, head).from_config(cfg, attn_implementation="eager")
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise JobInputError(
            f"transformers cannot build {head} from this config: {lines[0][:200]}",
            f"{where}.config",
        ) from None
    if not isinstance(model, nn.Module):
        raise JobInputError(f"{head} did not return a module", f"{where}.head")
    return model
