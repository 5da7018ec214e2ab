"""Pure-Python safetensors header validation: every malformed file is a 422 naming the field."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from fimntk.core.config import Settings
from fimntk.core.errors import InvalidInputError
from fimntk.core.safetensors_header import header_bytes, read_header
from fimntk.service.jobs import JobService
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


def _many(tmp_path: Path, entries: int, name_length: int) -> Path:
    header = {
        f"{i:0{name_length}d}": {
            "dtype": "F32",
            "shape": [1, 1],
            "data_offsets": [4 * i, 4 * i + 4],
        }
        for i in range(entries)
    }
    raw = json.dumps(header).encode()
    path = tmp_path / f"many-{entries}-{name_length}.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * entries))
    return path


@pytest.mark.parametrize("name_length", [8, 2000])
def test_header_bytes_bounds_what_a_parsed_header_holds(tmp_path: Path, name_length: int) -> None:
    path = _many(tmp_path, 3000, name_length)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    header = read_header(path, "model.weights")
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held <= header_bytes(header) <= 4 * held


def test_the_api_header_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    budget = 2 * 1024 * 1024
    jobs = JobService.__new__(JobService)
    jobs.settings = Settings(data_dir=tmp_path, header_cache_bytes=budget)
    jobs._headers, jobs._header_sizes = {}, {}
    for i in range(20):
        jobs._remember_header(f"d{i}", read_header(_many(tmp_path, 1000 + i, 40), "w"))
        assert sum(header_bytes(h) for h in jobs._headers.values()) <= budget
    assert "d19" in jobs._headers and "d0" not in jobs._headers  # the oldest went first
    huge = read_header(_many(tmp_path, 8000, 300), "w")
    assert header_bytes(huge) > budget
    jobs._remember_header("huge", huge)
    assert "huge" not in jobs._headers
