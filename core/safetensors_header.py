"""Pure-Python validation of safetensors headers: no torch, no tensor is read.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
end of the header), then the data buffer. :func:`read_header` checks all of it against the file
size, so a truncated file, a header length past the end, an unknown dtype or overlapping
offsets are refused before anything is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fimntk.core.errors import InvalidInputError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a header.

    Attributes:
        dtype: Safetensors dtype code, e.g. ``F32``.
        shape: Tensor shape.
        begin: Start offset in the data buffer.
        end: End offset in the data buffer.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header.

    Attributes:
        tensors: Entries by tensor name.
        metadata: The optional ``__metadata__`` string map.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


#: Bytes a kept :class:`Header` takes per tensor entry besides its name (the dict slot, the
#: :class:`TensorInfo` and its shape tuple), as CPython lays them out; an upper estimate.
_ENTRY_OVERHEAD = 400


def header_bytes(header: Header) -> int:
    """Memory a parsed header holds, estimated from above: names, shapes, metadata."""
    tensors = sum(
        _ENTRY_OVERHEAD + len(name) + 8 * len(info.shape) for name, info in header.tensors.items()
    )
    metadata = sum(_ENTRY_OVERHEAD + len(k) + len(v) for k, v in header.metadata.items())
    return tensors + metadata + _ENTRY_OVERHEAD


#: Most tensors a header may list (``Settings.max_header_entries``): a large Hugging Face model
#: has a few thousand.
MAX_HEADER_ENTRIES = 16384


def read_header(
    path: Path,
    field: str,
    max_header_bytes: int = 100 * 1024 * 1024,
    max_entries: int = MAX_HEADER_ENTRIES,
) -> Header:
    """Read and validate the header of a safetensors file.

    Args:
        path: File to read.
        field: Spec field that names this file, reported in errors.
        max_header_bytes: Largest header length accepted.
        max_entries: Most tensors accepted, counted before the JSON is parsed.

    Returns:
        The validated header.

    Raises:
        InvalidInputError: The file is truncated, its header is not valid JSON, a dtype is
            unknown, a shape is not a list of non-negative integers, or offsets fall outside the
            data buffer, overlap, leave a gap, or disagree with shape and dtype; or the header
            lists more than ``max_entries`` tensors.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInputError("not a safetensors file: shorter than 8 bytes", field)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise InvalidInputError(
                f"safetensors header length {n} runs past the end of the file ({size} bytes)",
                field,
            )
        if n > max_header_bytes:
            raise InvalidInputError(f"safetensors header of {n} bytes is too large", field)
        raw = f.read(n)
    if raw.count(b"data_offsets") > max_entries:
        raise InvalidInputError(f"safetensors header lists more than {max_entries} tensors", field)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(
            f"safetensors header is not valid JSON (at byte {getattr(exc, 'pos', '?')})", field
        ) from None
    if not isinstance(doc, dict):
        raise InvalidInputError("safetensors header is not a JSON object", field)
    return _parse_entries(doc, size - 8 - n, field)


def _parse_entries(doc: dict[str, Any], data_size: int, field: str) -> Header:
    """Validate header entries against the size of the data buffer."""
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInputError("safetensors __metadata__ must map strings to strings", field)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _parse_entry(name, entry, data_size, field)
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items())
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise InvalidInputError(f"tensor {_short(name)} overlaps another tensor's bytes", field)
        if begin > cursor:
            # The safetensors loader refuses holes in the data buffer: refuse them here too.
            raise InvalidInputError(
                f"tensor {_short(name)} starts at byte {begin}, leaving a gap after byte {cursor}",
                field,
            )
        cursor = end
    if cursor != data_size:
        raise InvalidInputError(
            f"tensors cover {cursor} bytes but the data buffer holds {data_size}: "
            "truncated or padded file",
            field,
        )
    return Header(tensors, dict(metadata))


def _short(name: str) -> str:
    """A tensor name quoted and bounded to 60 characters (problems never echo long input)."""
    return repr(name) if len(name) <= 60 else repr(name[:57] + "...")


def _parse_entry(name: str, entry: Any, data_size: int, field: str) -> TensorInfo:
    """Validate one tensor entry."""
    if not isinstance(entry, dict):
        raise InvalidInputError(f"tensor {_short(name)}: entry is not an object", field)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise InvalidInputError(f"tensor {_short(name)}: unknown dtype {dtype!r}", field)
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise InvalidInputError(
            f"tensor {_short(name)}: shape must be non-negative integers", field
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InvalidInputError(f"tensor {_short(name)}: data_offsets must be two integers", field)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise InvalidInputError(
            f"tensor {_short(name)}: data_offsets [{begin}, {end}] outside the data buffer "
            f"of {data_size} bytes",
            field,
        )
    info = TensorInfo(dtype, tuple(shape), begin, end)
    if end - begin != info.numel * DTYPE_SIZES[dtype]:
        raise InvalidInputError(
            f"tensor {_short(name)}: {end - begin} bytes do not hold "
            f"shape {list(shape)} of {dtype}",
            field,
        )
    return info
