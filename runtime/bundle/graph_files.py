"""What an ONNX graph file makes a backend read besides itself: the external-data locations of its tensors.

Found by walking the protobuf wire format along the paths where ONNX keeps tensors (initializers, sparse
initializers, tensor attributes of nodes, and the same inside subgraphs, functions and training info), so the
runtime checks them without the onnx package. The file is memory-mapped; weights stored in it are skipped,
never copied.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

MAX_DEPTH = 64  # nested messages (graphs inside attributes inside graphs ...)

# message kind -> {field number: kind of the embedded message} (onnx.proto; fields not listed are skipped)
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # external_data: StringStringEntryProto (key 1, value 2)
    "entry": {},
}


class GraphFileError(ValueError):
    """The file is not a well-formed protobuf message."""


def external_data_locations(path: str | os.PathLike[str]) -> set[str]:
    """Every `location` of external data that the ONNX file at `path` names (GraphFileError if malformed)."""
    found: set[str] = set()
    with open(Path(path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                _walk(view, 0, len(view), "model", found, 0)
            finally:
                view.release()
    return found


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise GraphFileError(f"a varint is cut off or too long at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(data: memoryview, pos: int, end: int, kind: str, found: set[str], depth: int) -> None:
    """Walk the message data[pos:end] of `kind`, adding external-data locations to `found`."""
    if depth > MAX_DEPTH:
        raise GraphFileError(f"messages nested deeper than {MAX_DEPTH}")
    children = _CHILDREN[kind]
    entry: dict[int, str] = {}
    while pos < end:
        tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            stop = pos + length
            if stop > end:
                raise GraphFileError(f"a field of {length} bytes at byte {pos} runs past its message")
            if kind == "entry" and field in (1, 2):
                try:
                    entry[field] = bytes(data[pos:stop]).decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise GraphFileError(f"an external-data entry is not UTF-8: {bad}") from None
            elif field in children:
                _walk(data, pos, stop, children[field], found, depth + 1)
            pos = stop
        else:
            raise GraphFileError(f"wire type {wire} at byte {pos} (not an ONNX file?)")
        if pos > end:
            raise GraphFileError(f"a field runs past its message at byte {end}")
    if entry.get(1) == "location":
        found.add(entry.get(2, ""))
