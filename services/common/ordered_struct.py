"""Encodes JSON-like data as google.protobuf.Struct wire bytes, keeping key order.

A Struct is a map, and protobuf serializes maps in hash order; Envoy's transcoder prints
entries in wire order. Answers whose documented JSON is an ordered object keyed by data
(tags sorted by confidence) are therefore encoded here, entry by entry, in order."""

from __future__ import annotations

import math
import struct
from typing import Any


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    # Wire type 2: length-delimited.
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    if value is None:
        return _varint(1 << 3) + _varint(0)  # null_value = NULL_VALUE
    if isinstance(value, bool):
        return _varint(4 << 3) + _varint(int(value))
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("JSON numbers must be finite")
        return _varint(2 << 3 | 1) + struct.pack("<d", float(value))
    if isinstance(value, str):
        return _field(3, value.encode())
    if isinstance(value, dict):
        return _field(5, struct_bytes(value))
    if isinstance(value, (list, tuple)):
        return _field(6, b"".join(_field(1, _value(item)) for item in value))
    raise TypeError(f"cannot encode {type(value).__name__} as a protobuf Value")


def struct_bytes(data: dict[str, Any]) -> bytes:
    """Struct wire bytes whose entries follow the dict's order."""
    return b"".join(_field(1, _field(1, str(key).encode()) + _field(2, _value(value))) for key, value in data.items())
