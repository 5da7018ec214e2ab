"""Pure-Python safetensors header validation: every malformed file is a 422 naming the field."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from fimntk.core.errors import InvalidInputError
from fimntk.core.safetensors_header import read_header
from tests.service.conftest import st_bytes


def _raw(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_valid_header(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}))
    header = read_header(path, "model.weights")
    assert header.tensors["a"].shape == (2, 3)
    assert header.tensors["b"].dtype == "I64"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01\x02", "shorter than 8 bytes"),
        (struct.pack("<Q", 10_000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
        (_raw([], b""), "not a JSON object"),  # type: ignore[arg-type]
        (
            _raw({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype",
        ),
        (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (
            _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "outside the data buffer",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "do not hold",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "overlaps",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            "truncated or padded",
        ),
    ],
    ids=[
        "short",
        "length-past-file",
        "bad-json",
        "not-object",
        "dtype",
        "shape",
        "offsets",
        "size-mismatch",
        "overlap",
        "padding",
    ],
)
def test_malformed(tmp_path: Path, body: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(body)
    with pytest.raises(InvalidInputError, match=message) as info:
        read_header(path, "dataset.blob")
    assert info.value.field == "dataset.blob"


def test_truncated_file(tmp_path: Path) -> None:
    body = st_bytes({"w": torch.randn(10, 10)})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(body[:-7])
    with pytest.raises(InvalidInputError, match="outside the data buffer"):
        read_header(path, "model.weights")


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        # Accepted by the header check before issue 19, refused by the safetensors loader.
        (
            {"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "__metadata__",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "gap",
        ),
    ],
)
def test_what_the_loader_refuses_is_refused(
    tmp_path: Path, header: dict, data: bytes, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw(header, data))
    with pytest.raises(InvalidInputError, match=message):
        read_header(path, "model.weights")


def test_header_entries_capped_before_parsing(tmp_path: Path) -> None:
    entries = {
        f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)
    }
    path = tmp_path / "many.safetensors"
    path.write_bytes(_raw(entries, b""))
    with pytest.raises(InvalidInputError, match="more than 16384 tensors"):
        read_header(path, "model.weights")
    assert len(read_header(path, "model.weights", max_entries=100_000).tensors) == 100_000
