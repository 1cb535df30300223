"""A seeded generator of safetensors files: valid ones, and mutations of them.

``case(seed, index)`` is a pure function of its arguments (its own ``random.Random``), so any case of
any campaign can be rebuilt from the two numbers a report prints. A case is a valid file written
from scratch, then 0 to 3 mutations: structured ones on the header before it is serialised (dtype,
shape, offsets, keys, duplicates, names with NUL/ESC/unicode, deep nesting, metadata), and textual
ones on the bytes after (byte flips, length-field edits, BOM, truncation, trailing bytes).
"""

from __future__ import annotations

import json
import random
import struct

#: every dtype of the format and its bits per element (safetensors 0.8)
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
              "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8}

NAMES = ["w", "model.layers.0.mlp.up_proj.weight", "bias", "é", "名前", "x\x00y", "\x1b[2J", "a/b", ".", "",
         "\u202eevil", "tab\tname", "new\nline", "\U0001f600", "\x7f", "\u0085", "a\\b", "__metadata__x"]
BAD_DTYPES = ["F8", "f32", "Q", "", "F32 ", "E8M0", "F8_E4M3FN", "FP4", "I4", "C128", 5, None, ["F32"], True]
BAD_DIMS = [-1, 1.0, 1e3, "2", None, True, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30, -0.0, [1], {}]
JUNK_VALUES = [None, True, 0, -1, 1.5, "s", [], {}, [1, 2], {"a": 1}, [[[]]], "\x00", 2**70]
INTERESTING_BYTES = [0x00, 0x1B, 0x7F, 0x80, 0xC3, 0xEF, 0xFF, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A,
                     0x20, 0x30, 0x39, 0x2D, 0x2E, 0x65]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _valid_header(rng: random.Random):
    """(header dict, data bytes) of a valid file: offsets in a random order, contiguous from 0."""
    n = rng.choice([0, 1, 1, 2, 2, 3, 4, 6])
    names = set()
    while len(names) < n:
        names.add(rng.choice(NAMES) if rng.random() < 0.3 else f"t{rng.randrange(1000)}")
    names = sorted(names)  # not set order: that changes with PYTHONHASHSEED, and cases must be reproducible
    entries = {}
    for name in names:
        dtype = rng.choice(list(DTYPE_BITS))
        while True:
            shape = [rng.choice([0, 1, 1, 2, 3, 4, 5, 8]) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4]))]
            if _numel(shape) * DTYPE_BITS[dtype] % 8 == 0:
                break
        entries[name] = [dtype, shape, _numel(shape) * DTYPE_BITS[dtype] // 8]
    order = list(names)
    rng.shuffle(order)
    header, off = {}, 0
    for name in order:
        dtype, shape, nb = entries[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    keys = list(header)
    rng.shuffle(keys)
    header = {k: header[k] for k in keys}
    if rng.random() < 0.3:
        header["__metadata__"] = {rng.choice(NAMES + ["format"]): rng.choice(["pt", "", "é", "x\x00"])
                                  for _ in range(rng.randrange(3))}
    data = rng.randbytes(off)
    return header, data


def _pick(rng, header):
    names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    return rng.choice(names) if names else None


def _nested(rng, depth):
    v = rng.choice([0, "x", None])
    for _ in range(depth):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def _mutate_struct(rng: random.Random, header: dict, data: bytes):
    """One structural mutation of the header dict (in place); returns (header, data, label)."""
    name = _pick(rng, header)
    e = header.get(name) if name is not None else None
    kind = rng.randrange(16)
    if e is None or kind == 0:
        # a new entry or a junk root member
        k = rng.choice(NAMES + ["new"])
        header[k] = rng.choice([{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, rng.choice(JUNK_VALUES)])
        return header, data, "add_member"
    if kind == 1:
        e["dtype"] = rng.choice(BAD_DTYPES + list(DTYPE_BITS))
        return header, data, "dtype"
    if kind == 2:
        shape = e.get("shape")
        if isinstance(shape, list):
            op = rng.randrange(4)
            if op == 0 and shape:
                shape[rng.randrange(len(shape))] = rng.choice(BAD_DIMS + [0, 1, 2, 3])
            elif op == 1:
                shape.append(rng.choice([0, 1, 2, 3]))
            elif op == 2 and shape:
                shape.pop(rng.randrange(len(shape)))
            else:
                shape.insert(0, rng.choice(BAD_DIMS))
        return header, data, "shape_dim"
    if kind == 3:
        # shapes both libraries parse but NumPy cannot hold: > 64 dimensions, 2^63-1 times 0
        if rng.random() < 0.5:
            # same element count, so the file stays valid when it was
            e["shape"] = [1] * rng.choice([63, 64, 65, 100, 1000]) + list(e.get("shape") or [])
        else:
            e["shape"] = rng.choice([[2**63 - 1, 0], [0, 2**63 - 1], [2**62, 0, 4], [2**32, 2**32, 0]])
        return header, data, "shape_extreme"
    if kind == 4:
        off = e.get("data_offsets")
        if isinstance(off, list) and len(off) == 2:
            i = rng.randrange(2)
            op = rng.randrange(5)
            if op == 0:
                off[i] += rng.choice([-1, 1, 2, 8])
            elif op == 1:
                off.reverse()
            elif op == 2:
                off[i] = rng.choice(BAD_DIMS)
            elif op == 3:
                off.append(rng.choice([0, 4]))
            else:
                other = _pick(rng, header)
                if other is not None and isinstance(header[other].get("data_offsets"), list):
                    e["data_offsets"] = list(header[other]["data_offsets"])
        return header, data, "offsets"
    if kind == 5:
        k = rng.choice(["dtype", "shape", "data_offsets"])
        e.pop(k, None)
        return header, data, "drop_key"
    if kind == 6:
        # an unknown key: the reference ignores it, pysafe refuses it (never more lenient)
        e[rng.choice(["extra", "dtype2", "\x00"])] = rng.choice(
            [list(range(rng.randrange(200))), _nested(rng, rng.randrange(70)), "x", None])
        return header, data, "unknown_key"
    if kind == 7:
        header[name] = rng.choice(JUNK_VALUES)
        return header, data, "entry_junk"
    if kind == 8:
        md = header.setdefault("__metadata__", {})
        if isinstance(md, dict) and rng.random() < 0.7:
            md[rng.choice(NAMES)] = rng.choice(JUNK_VALUES + ["ok"])
        else:
            header["__metadata__"] = rng.choice(JUNK_VALUES)
        return header, data, "metadata"
    if kind == 9:
        new = rng.choice(NAMES) + rng.choice(["", "\x00", "\x1b", "é", "\ufeff"])
        header[new] = header.pop(name)
        return header, data, "rename"
    if kind == 10:
        e["shape"] = rng.choice([None, "1", 3, {}, [[1]], []])
        return header, data, "shape_type"
    if kind == 11:
        header[name] = dict(reversed(list(e.items())))
        return header, data, "reorder"
    if kind == 12:
        data = data[:-1] if data and rng.random() < 0.5 else data + rng.randbytes(rng.choice([1, 7, 8]))
        return header, data, "data_len"
    if kind == 13:
        # a valid sub-byte/new-dtype entry put in place of an existing one (same byte size when possible)
        dtype = rng.choice(["F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"])
        nb = e["data_offsets"][1] - e["data_offsets"][0] if isinstance(e.get("data_offsets"), list) and \
            len(e["data_offsets"]) == 2 and all(isinstance(x, int) for x in e["data_offsets"]) else 0
        bits = DTYPE_BITS[dtype]
        if nb * 8 % bits == 0:
            e["dtype"], e["shape"] = dtype, [nb * 8 // bits]
        else:
            e["dtype"] = dtype
        return header, data, "new_dtype"
    if kind == 14:
        e["shape"] = [rng.choice([1, 3, 5, 7])] if DTYPE_BITS.get(e.get("dtype"), 8) < 8 else e.get("shape")
        return header, data, "subbyte_partial"
    e["data_offsets"] = rng.choice([None, "0,0", [0], [0, 0, 0], {"a": 0}, [-1, 0], [0.0, 4.0]])
    return header, data, "offsets_type"


def _serialize(rng: random.Random, header: dict) -> bytes:
    seps = rng.choice([(",", ":"), (", ", ": "), (",\n", " : ")])
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5, separators=seps)
    if rng.random() < 0.3:
        text += " " * rng.randrange(8)  # the format pads headers with spaces
    return text.encode("utf-8", "surrogatepass")


def _mutate_text(rng: random.Random, hb: bytes, header: dict):
    """One textual mutation of the serialised header; returns (bytes, label)."""
    kind = rng.randrange(9)
    b = bytearray(hb)
    if kind == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b), "bitflip"
    if kind == 1 and b:
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)
        return bytes(b), "byte"
    if kind == 2:
        return b"\xef\xbb\xbf" + hb, "bom"
    if kind == 3 and header:
        # a duplicate key: repeat one member textually
        k = rng.choice(list(header))
        member = json.dumps({k: header[k]})[1:-1]
        text = hb.decode("utf-8", "surrogateescape")
        if text.endswith("}"):
            return (text[:-1] + ("," if len(header) else "") + member + "}").encode("utf-8", "surrogateescape"), "dup"
        return hb, "dup_skipped"
    if kind == 4 and b:
        i = rng.randrange(len(b))
        del b[i:i + rng.randrange(1, 4)]
        return bytes(b), "delete"
    if kind == 5:
        i = rng.randrange(len(b) + 1)
        ins = rng.choice([b"\x00", b"\x1b[2J", b"\xc3\xa9", b"\\u0000", b"\\ud800", b",", b"]", b"}", b"\"",
                          b"/*c*/", b"1e999", b"-", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
        b[i:i] = ins
        return bytes(b), "insert"
    if kind == 6:
        # escape a key's ASCII letters (same key to JSON, different bytes)
        text = hb.decode("utf-8", "surrogateescape")
        return text.replace('"dtype"', '"\\u0064type"', 1).replace('"w"', '"\\u0077"').encode(
            "utf-8", "surrogateescape"), "escape_key"
    if kind == 7:
        depth = rng.choice([10, 63, 64, 65, 66, 200])
        text = hb.decode("utf-8", "surrogateescape")
        deep = "[" * depth + "]" * depth
        if text.startswith("{") and len(text) > 2:
            return ('{"deep":' + deep + "," + text[1:]).encode("utf-8", "surrogateescape"), "deep"
        return deep.encode(), "deep_root"
    return hb + rng.choice([b" ", b"x", b"{}", b"\x00", b"\n"]), "trailing"


def _frame(rng: random.Random, hb: bytes, data: bytes):
    """len | header | data, sometimes with a wrong length field or cut short; returns (bytes, labels)."""
    labels = []
    n = len(hb)
    if rng.random() < 0.12:
        n = rng.choice([0, 1, n - 1, n + 1, n + 8, n + len(data), n + len(data) + 1, 2**63, 2**64 - 1,
                        100 * 1000 * 1000 + 1, rng.getrandbits(64), rng.getrandbits(16)])
        n = max(0, min(n, 2**64 - 1))
        labels.append("length_field")
    raw = struct.pack("<Q", n) + hb + data
    if rng.random() < 0.08:
        raw = raw[:rng.randrange(len(raw) + 1)]
        labels.append("truncate")
    return raw, labels


def case(seed: int, index: int) -> tuple[bytes, list[str]]:
    """The file of case ``index`` of campaign ``seed`` and the mutations that made it."""
    rng = random.Random(seed * 1_000_003 + index)
    header, data = _valid_header(rng)
    labels = []
    n_struct = rng.choice([0, 0, 1, 1, 1, 2, 3])
    for _ in range(n_struct):
        try:
            header, data, lab = _mutate_struct(rng, header, data)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            lab = "mutation_not_applicable"  # an earlier mutation removed what this one edits
        labels.append(lab)
    hb = _serialize(rng, header)
    if rng.random() < 0.35:
        for _ in range(rng.choice([1, 1, 2])):
            hb, lab = _mutate_text(rng, hb, header)
            labels.append(lab)
    raw, more = _frame(rng, hb, data)
    return raw, labels + more
