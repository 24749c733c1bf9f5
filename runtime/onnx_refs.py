"""The files an ONNX graph refers to: its tensors' external-data locations.

A graph may keep its weights in other files (``external_data`` entries of its TensorProtos);
ONNX Runtime and OpenVINO read them from beside the graph. The bundle's integrity covers
every file the runtime reads, so each location must be a file the manifest hashes. This reads
the protobuf wire format directly (torch- and onnx-free), descending only into the messages
that can hold tensors and skipping weight bytes, so a multi-gigabyte graph is scanned quickly.
"""
from __future__ import annotations

import mmap
import os

# Field numbers (onnx.proto3).
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
FUNCTION_NODE = 7
NODE_ATTRIBUTE = 5
ATTRIBUTE_TENSOR, ATTRIBUTE_GRAPH, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS = 5, 6, 10, 11
ATTRIBUTE_SPARSE_TENSOR, ATTRIBUTE_SPARSE_TENSORS = 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1
MAX_DEPTH = 64


class OnnxFormatError(ValueError):
    """A file that is not a well-formed ONNX protobuf where references were looked for."""


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, value start, value end or varint value) of each field."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield number, wire, value, pos
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise OnnxFormatError("a field runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise OnnxFormatError(f"unknown wire type {wire}")
        if pos > end:
            raise OnnxFormatError("a field runs past the end of its message")


def _tensor(data, start: int, end: int, found: list[str]) -> None:
    external, locations = False, []
    for number, wire, a, b in _fields(data, start, end):
        if number == TENSOR_DATA_LOCATION and wire == 0:
            external = a == EXTERNAL
        elif number == TENSOR_EXTERNAL_DATA and wire == 2:
            key = value = None
            for n, w, x, y in _fields(data, a, b):
                if w == 2 and n in (ENTRY_KEY, ENTRY_VALUE):
                    text = bytes(data[x:y]).decode("utf-8", "replace")
                    key, value = (text, value) if n == ENTRY_KEY else (key, text)
            if key == "location":
                locations.append(value or "")
    if external and not locations:
        raise OnnxFormatError("a tensor is stored externally but names no location")
    found += locations


def _graph(data, start: int, end: int, found: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise OnnxFormatError("graphs nested too deeply")
    for number, wire, a, b in _fields(data, start, end):
        if wire != 2:
            continue
        if number == GRAPH_INITIALIZER:
            _tensor(data, a, b, found)
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(data, a, b, found)
        elif number == GRAPH_NODE:
            _node(data, a, b, found, depth)


def _sparse(data, start: int, end: int, found: list[str]) -> None:
    for number, wire, a, b in _fields(data, start, end):
        if wire == 2 and number in (SPARSE_VALUES, SPARSE_INDICES):
            _tensor(data, a, b, found)


def _node(data, start: int, end: int, found: list[str], depth: int) -> None:
    for number, wire, a, b in _fields(data, start, end):
        if number != NODE_ATTRIBUTE or wire != 2:
            continue
        for n, w, x, y in _fields(data, a, b):
            if w != 2:
                continue
            if n in (ATTRIBUTE_TENSOR, ATTRIBUTE_TENSORS):
                _tensor(data, x, y, found)
            elif n in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS):
                _graph(data, x, y, found, depth + 1)
            elif n in (ATTRIBUTE_SPARSE_TENSOR, ATTRIBUTE_SPARSE_TENSORS):
                _sparse(data, x, y, found)


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external-data locations the ONNX model at ``path`` names, sorted and unique."""
    found: list[str] = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise OnnxFormatError("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for number, wire, a, b in _fields(data, 0, size):
                if wire != 2:
                    continue
                if number == MODEL_GRAPH:
                    _graph(data, a, b, found, 0)
                elif number == MODEL_FUNCTIONS:
                    for n, w, x, y in _fields(data, a, b):
                        if n == FUNCTION_NODE and w == 2:
                            _node(data, x, y, found, 0)
    return sorted(set(found))
