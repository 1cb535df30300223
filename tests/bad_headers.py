"""The smallest safetensors files that trip each header-validation condition (STYLE.md §7).

Not a test module (no ``test_`` prefix): ``test_bad_input.py`` imports it. Each builder takes a
directory, writes one file there and returns its path. :data:`CASES` lists every case with the
``HeaderError.code`` it must raise and the message fragments it must contain (besides the file
name, which every message carries).

Format (engine.md §2): 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [b, e]}, "__metadata__": {str: str}}``, then the data
section; offsets are relative to the start of the data section.

``header_overflow`` (8 + N overflowing a u64) has no case: the 100 MB cap (``header_too_large``) is
checked first, so no length field that passes the cap can overflow; the check is defence in depth.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: every code of csrc/io/safetensors.h, namespace header_code, except the unreachable header_overflow
REACHABLE_CODES = (
    "file_too_small",
    "header_too_large",
    "header_out_of_file",
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "invalid_entry",
    "invalid_metadata",
    "unknown_dtype",
    "invalid_shape",
    "size_mismatch",
    "offsets_not_contiguous",
    "data_size_mismatch",
)

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the format's own cap, kMaxHeaderBytes


def raw_file(path: Path, header: bytes, data: bytes = b"", *, declared: int | None = None) -> Path:
    """Write ``len | header | data``; ``declared`` overrides the length field (default len(header))."""
    n = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def json_file(path: Path, header: object, data: bytes = b"") -> Path:
    """Write a file whose header is ``header`` serialised as compact JSON."""
    return raw_file(path, json.dumps(header, separators=(",", ":")).encode(), data)


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- builders, in the order the reader checks ------------------------------------------------------
def file_too_small(d: Path) -> Path:
    p = d / "too_small.safetensors"
    p.write_bytes(b"\x02\x00\x00")  # 3 bytes: not even the length field
    return p


def empty_file(d: Path) -> Path:
    p = d / "empty.safetensors"
    p.write_bytes(b"")
    return p


def header_too_large(d: Path) -> Path:
    return raw_file(d / "huge_header.safetensors", b"{}", declared=MAX_HEADER_BYTES + 1)


def header_longer_than_file(d: Path) -> Path:
    # the length field says 100 bytes but only 2 follow it
    return raw_file(d / "short_header.safetensors", b"{}", declared=100)


def invalid_utf8(d: Path) -> Path:
    return raw_file(d / "latin1.safetensors", b'{"w\xe9ight":{}}')


def invalid_json(d: Path) -> Path:
    return raw_file(d / "cut_json.safetensors", b'{"w":{"dtype":"F32"')


def duplicate_keys(d: Path) -> Path:
    e = json.dumps(entry("F32", [1], 0, 4))
    return raw_file(d / "dup_keys.safetensors", f'{{"w":{e},"w":{e}}}'.encode(), b"\x00" * 4)


def top_level_array(d: Path) -> Path:
    return json_file(d / "array.safetensors", [{"dtype": "F32", "shape": [], "data_offsets": [0, 4]}], b"\x00" * 4)


def entry_not_object(d: Path) -> Path:
    return json_file(d / "entry_str.safetensors", {"w": "F32"})


def entry_missing_offsets(d: Path) -> Path:
    return json_file(d / "no_offsets.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, b"\x00" * 4)


def metadata_not_string(d: Path) -> Path:
    return json_file(d / "meta_int.safetensors", {"__metadata__": {"format": 1}, "w": entry("F32", [1], 0, 4)},
                     b"\x00" * 4)


def unknown_dtype(d: Path) -> Path:
    return json_file(d / "f12.safetensors", {"w": entry("F12", [1], 0, 4)}, b"\x00" * 4)


def negative_shape(d: Path) -> Path:
    return json_file(d / "neg_shape.safetensors", {"w": entry("F32", [-1, 2], 0, 8)}, b"\x00" * 8)


def float_shape(d: Path) -> Path:
    return json_file(d / "float_shape.safetensors", {"w": entry("F32", [2.5, 2], 0, 20)}, b"\x00" * 20)


def lying_header(d: Path) -> Path:
    # shape [2, 2] F32 is 16 bytes, but the offsets span 12
    return json_file(d / "lying.safetensors", {"w": entry("F32", [2, 2], 0, 12)}, b"\x00" * 12)


def begin_after_end(d: Path) -> Path:
    return json_file(d / "reversed.safetensors", {"w": entry("F32", [2], 8, 0)}, b"\x00" * 8)


def overlapping_offsets(d: Path) -> Path:
    return json_file(d / "overlap.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
                     b"\x00" * 12)


def gap_in_offsets(d: Path) -> Path:
    return json_file(d / "gap.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)},
                     b"\x00" * 20)


def truncated_data(d: Path) -> Path:
    # the last tensor ends at data offset 16, but only 8 data bytes are present
    return json_file(d / "truncated.safetensors", {"w": entry("F32", [4], 0, 16)}, b"\x00" * 8)


def trailing_bytes(d: Path) -> Path:
    return json_file(d / "trailing.safetensors", {"w": entry("F32", [4], 0, 16)}, b"\x00" * 20)


def truncate_file(path: Path, keep: int) -> Path:
    """Cut an existing (valid) file to ``keep`` bytes, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@dataclass(frozen=True)
class Case:
    """One malformed file: how to build it, the code it must raise, and what the message must say."""

    id: str
    build: Callable[[Path], Path]
    code: str
    fragments: tuple[str, ...] = field(default_factory=tuple)


CASES = [
    Case("file_too_small", file_too_small, "file_too_small", ("is 3 bytes", "at least 8")),
    Case("empty_file", empty_file, "file_too_small", ("is 0 bytes",)),
    Case("header_too_large", header_too_large, "header_too_large",
         (str(MAX_HEADER_BYTES + 1), str(MAX_HEADER_BYTES))),
    Case("header_longer_than_file", header_longer_than_file, "header_out_of_file", ("100 bytes", "only 10 bytes")),
    Case("invalid_utf8", invalid_utf8, "invalid_utf8", ("UTF-8", "invalid byte 0x", "at header byte")),
    Case("invalid_json", invalid_json, "invalid_json", ("not valid JSON",)),
    Case("duplicate_keys", duplicate_keys, "invalid_json", ("duplicate key 'w'",)),
    Case("top_level_array", top_level_array, "not_object", ("JSON object", "array")),
    Case("entry_not_object", entry_not_object, "invalid_entry", ("'w'", "string")),
    Case("entry_missing_offsets", entry_missing_offsets, "invalid_entry", ("'w'", "missing data_offsets")),
    Case("metadata_not_string", metadata_not_string, "invalid_metadata", ("__metadata__['format']", "number")),
    Case("unknown_dtype", unknown_dtype, "unknown_dtype", ("'w'", "'F12'", "BF16")),
    Case("negative_shape", negative_shape, "invalid_shape", ("'w'", "non-negative integers", "found -1")),
    Case("float_shape", float_shape, "invalid_shape", ("'w'", "non-negative integers", "found 2.5")),
    Case("lying_header", lying_header, "size_mismatch", ("'w'", "[2, 2]", "(16 bytes)", "[0, 12]", "span 12")),
    Case("begin_after_end", begin_after_end, "offsets_not_contiguous", ("'w'", "[8, 0]", "begin > end")),
    Case("overlapping_offsets", overlapping_offsets, "offsets_not_contiguous",
         ("'b'", "begin at 4", "previous tensor 'a' ends at 8", "overlap")),
    Case("gap_in_offsets", gap_in_offsets, "offsets_not_contiguous", ("'b'", "begin at 12", "previous tensor 'a' ends at 8", "gap")),
    Case("truncated_data", truncated_data, "data_size_mismatch", ("end at data offset 16", "holds 8 bytes",
                                                                    "truncated")),
    Case("trailing_bytes", trailing_bytes, "data_size_mismatch", ("end at data offset 16", "holds 20 bytes",
                                                                  "trailing")),
]

__all__ = ["CASES", "Case", "REACHABLE_CODES", "MAX_HEADER_BYTES", "raw_file", "json_file", "entry",
           "truncate_file"]
