"""Slices of a batch's examples on a CPU, for the sums over examples that gain from them: the
implicit products (forward mode) and the diagonal (per-example gradients).

A forward-mode pass keeps each layer's output and its tangent; on a CPU their size decides the
speed more than the arithmetic does. Past a few MiB per tensor, the C allocator hands each
activation fresh pages from the kernel (a minor page fault per 4 KiB, zeroed), and the
tensors no longer stay in the caches between the primal and the tangent kernels. Measured on
bench's CNN (``W3``, batches of 128, 2 threads): ~65,000 page faults and 255 ms per ``vᵀFv``;
in slices of 32 examples, none and 150 ms, the arithmetic being the same. The diagonal of
bench's ResNet (``W5``, batches of 64): ~430,000 page faults and 3.0 s, in slices of 32 none
and 2.6 s.

:class:`ExampleSlicer` reads, once, the largest activation one example produces (forward hooks
on every module, on the first two examples of the first batch) and splits each batch into
equal slices whose largest activation takes at most :data:`SLICE_BYTES` (a caller may leave
whole the batches below a size of its own: the implicit products do below 8 MiB, where the
allocator keeps up with a forward-mode pass). It splits only what
it can prove is split by example: every tensor of the batch shares its first dimension, and
the outputs of one and of two examples have one and two rows (a sequence-first input whose
length happens to equal the batch size is not split). A GPU batch is never split: its
allocator caches blocks, and a slice would only idle the device.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fimntk.engine.generator.inputs import map_tensors, tensors_of

#: Bytes of the largest activation of one slice (see the module's docstring): 2.5 MiB kept
#: bench's W3 (100 KB per example) and W5 (64 KB) free of page faults; 4 MiB did not.
SLICE_BYTES = 5 << 19


def examples_in(batch: tuple) -> int | None:
    """The examples of a batch whose tensors all share a first dimension; ``None`` otherwise."""
    tensors = tensors_of(batch)
    sizes = {t.shape[0] for t in tensors if t.dim() > 0}
    if len(sizes) != 1 or any(t.dim() == 0 for t in tensors):
        return None
    return sizes.pop()


def head(batch: tuple, m: int) -> tuple:
    """The first ``m`` examples of a batch whose tensors share their first dimension (the batch
    itself otherwise)."""
    if examples_in(batch) is None:
        return batch
    return map_tensors(batch, lambda t: t[:m])


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):  # Hugging Face's model outputs are dictionaries too
        for v in value.values():
            yield from _tensors(v)


#: Measured bytes one example adds to the largest activation (0: never split):
#: ``{model: {(function key, batch signature): bytes}}``, so that a metric built again on the
#: same model (a sweep, a benchmark) does not probe again.
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(batch: tuple) -> tuple:
    """What the activations of one example depend on: each tensor's shape past the examples
    and its dtype."""
    return tuple((tuple(t.shape[1:]), t.dtype) for t in tensors_of(batch))


class ExampleSlicer:
    """Splits the batches of one model and function into slices of examples (CPU only).

    Args:
        model: The network whose modules' outputs are measured.
        function: ``function(*batch) -> outputs (n, c)``.
        key: What identifies ``function`` across slicers of the same model (measurements are
            remembered per model, key and batch signature).
        slice_bytes: Bytes of the largest activation of one slice (default
            :data:`SLICE_BYTES`).
    """

    def __init__(
        self,
        model: nn.Module,
        function: Callable[..., Tensor],
        key: object = None,
        slice_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.function = function
        self.key = function if key is None else key
        self.slice_bytes = SLICE_BYTES if slice_bytes is None else slice_bytes
        #: Examples per slice of the last batch (``0``: never split; ``None``: not measured).
        self.examples: int | None = None

    def slices(self, batch: tuple, above: int = 0) -> Iterator[tuple]:
        """The batch in equal slices of at most :attr:`examples` examples; whole when its
        largest activation takes at most ``above`` bytes (or fits one slice), when its first
        dimension is not provably the examples, or on a GPU."""
        n = examples_in(batch)
        if n is None or n < 2 or any(t.device.type != "cpu" for t in tensors_of(batch)):
            yield batch
            return
        growth = self._growth_for(batch)
        self.examples = max(1, self.slice_bytes // growth) if growth else 0
        if self.examples == 0 or n <= self.examples or n * growth <= above:
            yield batch
            return
        count = -(-n // self.examples)
        bounds = [i * n // count for i in range(count + 1)]
        for lo, hi in itertools.pairwise(bounds):
            yield map_tensors(batch, operator.itemgetter(slice(lo, hi)))

    def _growth_for(self, batch: tuple) -> int:
        key = (self.key, _signature(batch))
        try:
            known = _MEASURED.setdefault(self.model, {})
        except TypeError:  # a model that cannot be weakly referenced is measured every time
            return self._measure(batch)
        if key not in known:
            known[key] = self._measure(batch)
        return int(known[key])

    def _measure(self, batch: tuple) -> int:
        """The bytes one example adds to the largest module output (outputs of two examples
        less those of one, call by call: a tensor that does not grow with the examples, e.g. a
        broadcast position embedding, does not count). 0 (never split) when the outputs of one
        and two examples do not have one and two rows, or when the probe fails (the pass on the
        whole batch then reports the problem)."""
        sizes: list[list[int]] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            sizes[-1].append(sum(t.numel() * t.element_size() for t in _tensors(output)))

        rows = []
        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a dropout draws nothing
                for m in (1, 2):
                    sizes.append([])
                    rows.append(getattr(self.function(*head(batch, m)), "shape", (None,))[0])
        except Exception:  # a probe: the pass on the whole batch says what is wrong
            return 0
        finally:
            for h in handles:
                h.remove()
        if rows != [1, 2] or len(sizes[0]) != len(sizes[1]):
            return 0
        return max(0, max((b - a for a, b in zip(*sizes)), default=0))
