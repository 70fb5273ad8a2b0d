#!/usr/bin/env python3
"""Generate the safetensors fixtures of Tests/LycorisFormatsTests/Fixtures.

Needs numpy, safetensors and ml_dtypes, e.g. in a throwaway venv:

    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install numpy safetensors ml_dtypes
    /tmp/stvenv/bin/python scripts/generate_safetensors_fixtures.py

It writes (and overwrites) into the fixture directory:

* ``dtype_<DTYPE>.safetensors``: one file per dtype, written by the reference ``safetensors``
  package, holding known values including the type's specials (+-0, subnormals, +-inf, NaN,
  max/min). The F8 files hold all 256 bit patterns.
* ``metadata.safetensors``, ``scalar.safetensors``, ``zero_size.safetensors``,
  ``empty.safetensors`` (no tensors), ``unaligned.safetensors`` (header length not a multiple of
  8, so the data is unaligned), ``extra_fields.safetensors`` (unknown entry fields, ignored by the
  reference reader).
* ``expected.json``: for every valid file, its metadata, its tensors in file order and each
  tensor's dtype, shape and the expected float32 value of every element as a bit pattern
  (computed by numpy / ml_dtypes ``astype(np.float32)``), so the Swift tests compare real numbers.
* ``swift_writer_golden.safetensors``: the exact bytes the Swift ``SafetensorsWriter`` must
  produce for the tensors in ``golden_tensors()`` (the Swift test rebuilds them and compares
  byte for byte). This script builds the file from the documented format and checks that the
  reference ``safetensors`` package reads it back with the right values, which is the
  "Swift writer output is readable by Python" check, done here so the test suite never needs
  Python.
* ``bad_*.safetensors``: hostile files, each tiny. This script checks that the reference
  implementation rejects each one (or records that it accepts it, see ``REFERENCE_ACCEPTS``).
"""

import json
import os
import struct
import sys

import ml_dtypes
import numpy as np
from safetensors import deserialize, safe_open
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "Tests", "LycorisFormatsTests", "Fixtures")

# Hostile files the reference implementation (safetensors 0.x, serde_json) accepts but this
# package rejects on purpose: serde_json keeps the last of duplicate map keys.
REFERENCE_ACCEPTS = {"bad_duplicate_tensor_key.safetensors"}


def path(name):
    return os.path.join(FIXTURES, name)


def f32_bits(array):
    """The float32 bit patterns numpy / ml_dtypes give for ``array``, as Python ints."""
    return [int(x) for x in np.asarray(array).astype(np.float32).reshape(-1).view(np.uint32)]


# ---------------------------------------------------------------------------------------------
# Valid files

def dtype_arrays():
    f16 = np.float16
    bf16 = ml_dtypes.bfloat16
    f16_specials = np.array(
        [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 0.1, -3.140625, 65504.0, -65504.0,
         np.inf, -np.inf, np.nan,
         2.0 ** -24, -(2.0 ** -24), 1023 * 2.0 ** -24, 2.0 ** -14, 1 + 2.0 ** -10, 0.333],
        dtype=np.float64).astype(f16)
    bf16_specials = np.array(
        [0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 3.0e38, -3.0e38, np.inf, -np.inf, np.nan,
         float(np.finfo(np.float32).tiny), 2.0 ** -133, -(2.0 ** -133), 1 + 2.0 ** -7, 1.0e-40],
        dtype=np.float64).astype(np.float32).astype(bf16)
    f32_specials = np.array(
        [0.0, -0.0, 1.0, -1.0, 0.1, np.float32(np.finfo(np.float32).max), -np.float32(np.finfo(np.float32).max),
         np.finfo(np.float32).tiny, 2.0 ** -149, -(2.0 ** -149), np.inf, -np.inf, np.nan, 16777217.0, 1e-45],
        dtype=np.float32)
    f64_specials = np.array(
        [0.0, -0.0, 1.0, -1.0, 0.1, 1.0 / 3.0, 1e300, -1e300, 1e-300, 5e-324, np.inf, -np.inf, np.nan,
         float(np.finfo(np.float32).max), 3.4028235677973366e38,  # just past float32 max: rounds to inf
         1 + 2.0 ** -24, 1 + 3 * 2.0 ** -24,  # ties to even in float32
         2.0 ** -149, 2.0 ** -150, 1.5 * 2.0 ** -149,  # float32 subnormal rounding
         np.finfo(np.float64).max, 16777217.0],
        dtype=np.float64)
    i64 = np.array([0, 1, -1, 2 ** 24 + 1, 2 ** 53 + 1, 2 ** 63 - 1, -(2 ** 63), 123456789012, -7], dtype=np.int64)
    i32 = np.array([0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 2 ** 24 + 1, 2 ** 24 + 3, 1000, -1000], dtype=np.int32)
    i16 = np.array([0, 1, -1, 32767, -32768, 12345, -12345], dtype=np.int16)
    i8 = np.array([0, 1, -1, 127, -128, 42], dtype=np.int8)
    u8 = np.array([0, 1, 127, 128, 255, 42], dtype=np.uint8)
    bools = np.array([[True, False, True], [False, False, True]], dtype=np.bool_)
    all_bytes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return {
        "F64": f64_specials,
        "F32": f32_specials,
        "F16": f16_specials.reshape(1, -1),
        "BF16": bf16_specials.reshape(2, 8),
        "I64": i64,
        "I32": i32.reshape(3, 3),
        "I16": i16,
        "I8": i8,
        "U8": u8.reshape(2, 3),
        "BOOL": bools,
        "F8_E4M3": all_bytes.view(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": all_bytes.view(ml_dtypes.float8_e5m2),
    }


def describe_file(name):
    """metadata, tensors in file order, and expected f32 bits, read back with the reference reader."""
    with safe_open(path(name), framework="np") as f:
        metadata = f.metadata() or {}
        order = list(f.offset_keys())
    with open(path(name), "rb") as handle:
        blob = handle.read()
    raw = dict(deserialize(blob))
    tensors = []
    numpy_types = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    for key in order:
        info = raw[key]
        array = np.frombuffer(bytes(info["data"]), dtype=numpy_types[info["dtype"]])
        tensors.append({
            "name": key,
            "dtype": info["dtype"],
            "shape": list(info["shape"]),
            "f32_bits": f32_bits(array),
        })
    return {"metadata": metadata, "tensors": tensors}


def write_raw(name, header, data=b"", pad=True):
    """Writes 8-byte N + header (str/bytes/object) + data. Pads the header with spaces if asked."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if isinstance(header, str):
        header = header.encode("utf-8")
    if pad:
        header += b" " * ((8 - len(header) % 8) % 8)
    with open(path(name), "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header + data)


def write_valid_files():
    valid = []
    for dtype, array in dtype_arrays().items():
        name = f"dtype_{dtype}.safetensors"
        save_file({"values": np.ascontiguousarray(array)}, path(name))
        valid.append(name)

    save_file(
        {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([0.5, -0.5], dtype=np.float32)},
        path("metadata.safetensors"),
        metadata={"format": "pt", "ss_network_module": "lycoris.kohya", "unicode": "é ✓ \"quoted\" \\ \n"},
    )
    valid.append("metadata.safetensors")

    save_file(
        {"alpha": np.array(4.0, dtype=np.float32), "on_input": np.array(1, dtype=np.int64)},
        path("scalar.safetensors"),
    )
    valid.append("scalar.safetensors")

    save_file(
        {"empty": np.zeros((0, 3), dtype=np.float32), "after": np.array([7.0], dtype=np.float16)},
        path("zero_size.safetensors"),
    )
    valid.append("zero_size.safetensors")

    save_file({}, path("empty.safetensors"))
    valid.append("empty.safetensors")

    # Header length 61 (odd): the F32/F64/F16 data that follows is not aligned.
    floats = np.array([1.5, -2.25, np.inf], dtype=np.float32).tobytes()
    doubles = np.array([0.1, -1e300], dtype=np.float64).tobytes()
    halves = np.array([1.0, -0.5], dtype=np.float16).tobytes()
    header = json.dumps({
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "b": {"dtype": "F64", "shape": [2], "data_offsets": [12, 28]},
        "c": {"dtype": "F16", "shape": [2], "data_offsets": [28, 32]},
    }, separators=(",", ":"))
    header += " " * (1 if len(header) % 2 == 0 else 0)  # make it odd
    assert len(header) % 2 == 1
    write_raw("unaligned.safetensors", header, floats + doubles + halves, pad=False)
    valid.append("unaligned.safetensors")

    write_raw("extra_fields.safetensors", {
        "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "comment": ["ignored", 1, None]},
    }, np.array([3.0], dtype=np.float32).tobytes())
    valid.append("extra_fields.safetensors")

    expected = {name: describe_file(name) for name in valid}
    # One line per tensor keeps the file small and diffable.
    lines = []
    for name in sorted(expected):
        entry = expected[name]
        tensors = ",\n".join("   " + json.dumps(t, sort_keys=True, ensure_ascii=False) for t in entry["tensors"])
        lines.append(f'  {json.dumps(name)}: {{\n   "metadata": {json.dumps(entry["metadata"], sort_keys=True, ensure_ascii=False)},\n'
                     f'   "tensors": [\n{tensors}\n   ]\n  }}')
    with open(path("expected.json"), "w", encoding="utf-8") as handle:
        handle.write("{\n" + ",\n".join(lines) + "\n}\n")
    with open(path("expected.json"), encoding="utf-8") as handle:
        assert json.load(handle) == expected


# ---------------------------------------------------------------------------------------------
# The golden file of the Swift writer

def golden_tensors():
    """(name, dtype, shape, float64 values or raw int64) in writer order; the Swift test mirrors it.

    Every value is exactly representable as float32 (written as hex so both sides agree), and
    the F16/BF16 ones include exact ties so the round-to-nearest-even encoders must match
    numpy / ml_dtypes bit for bit.
    """
    h = float.fromhex
    return [
        ("z.weight", "F32", [2, 3], [h("0x1p0"), h("-0x1.8p1"), h("0x1.99999ap-4"), 0.0, -0.0, h("0x1.fffffep127")]),
        ("a.bias", "F16", [7], [h("0x1.002p0"),   # tie between 1 and 1+2^-10: even → 1
                                h("0x1.006p0"),   # tie: → 1+2^-9 (even)
                                h("0x1.ffep15"),  # 65520: tie at the top → inf
                                h("0x1.ffdfep15"),  # just below 65520 → 65504
                                h("0x1p-25"),     # tie with 0 → +0
                                h("0x1.8p-24"),   # tie between 1 and 2 subnormal ulps → 2 ulps
                                h("-0x1.0000020p-25")]),  # just past the tie → -2^-24
        ("m\"odd\\name\u00e9", "BF16", [2, 2], [h("0x1.01p0"),  # tie → 1
                                                 h("0x1.03p0"),  # tie → 1+2^-6
                                                 h("0x1.fffffep127"),  # rounds to inf
                                                 h("-0x1.02p-130")]),  # subnormal bf16
        ("scalar", "F64", [], [h("0x1.555556p-2")]),
        ("on_input", "I64", [], 1),
        ("empty", "F32", [0, 4], []),
    ]


GOLDEN_METADATA = {
    "ss_network_module": "lycoris.kohya",
    "format": "pt",
    "tricky": "quote \" backslash \\ newline \n tab \t ctrl \x01 unicode é ✓ 😀",
}


def numpy_values(dtype, values):
    f32 = np.array(values, dtype=np.float64).astype(np.float32)
    if dtype == "F32":
        return f32
    if dtype == "F64":
        return f32.astype(np.float64)
    if dtype == "F16":
        return f32.astype(np.float16)
    if dtype == "BF16":
        return f32.astype(ml_dtypes.bfloat16)
    raise ValueError(dtype)


def write_golden():
    def js(text):
        return json.dumps(text, ensure_ascii=False)

    parts = []
    if GOLDEN_METADATA:
        members = ",".join(f"{js(k)}:{js(GOLDEN_METADATA[k])}" for k in sorted(GOLDEN_METADATA))
        parts.append(f'"__metadata__":{{{members}}}')
    data = b""
    for name, dtype, shape, values in golden_tensors():
        if dtype == "I64":
            blob = np.array(values, dtype=np.int64).tobytes()
        else:
            blob = numpy_values(dtype, values).tobytes()
        begin, end = len(data), len(data) + len(blob)
        data += blob
        shape_text = ",".join(str(d) for d in shape)
        parts.append(f'{js(name)}:{{"dtype":"{dtype}","shape":[{shape_text}],"data_offsets":[{begin},{end}]}}')
    header = ("{" + ",".join(parts) + "}").encode("utf-8")
    header += b" " * ((8 - len(header) % 8) % 8)
    assert header.startswith(b'{"') and len(header) % 8 == 0
    blob = struct.pack("<Q", len(header)) + header + data
    with open(path("swift_writer_golden.safetensors"), "wb") as handle:
        handle.write(blob)

    # The reference reader must accept it and return the same values.
    with safe_open(path("swift_writer_golden.safetensors"), framework="np") as f:
        assert f.metadata() == GOLDEN_METADATA, f.metadata()
        assert list(f.offset_keys()) == [t[0] for t in golden_tensors()]
    raw = dict(deserialize(blob))
    for name, dtype, shape, values in golden_tensors():
        info = raw[name]
        assert info["dtype"] == dtype and list(info["shape"]) == shape, (name, info)
        expected = (np.array(values, dtype=np.int64) if dtype == "I64" else numpy_values(dtype, values)).tobytes()
        assert bytes(info["data"]) == expected, name
    print("swift_writer_golden.safetensors: read back by the reference reader")


# ---------------------------------------------------------------------------------------------
# Hostile files

def f32_entry(begin, end, shape=None, dtype="F32"):
    if shape is None:
        shape = [(end - begin) // 4]
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_hostile_files():
    zeros = lambda n: b"\0" * n  # noqa: E731

    with open(path("bad_header_too_small.safetensors"), "wb") as handle:
        handle.write(b"\x05\0\0\0\0")
    with open(path("bad_empty_file.safetensors"), "wb") as handle:
        handle.write(b"")
    with open(path("bad_header_too_large_2_63.safetensors"), "wb") as handle:
        handle.write(struct.pack("<Q", 2 ** 63) + b"{}      ")
    with open(path("bad_header_too_large_100000001.safetensors"), "wb") as handle:
        handle.write(struct.pack("<Q", 100_000_001) + b"{}      ")
    with open(path("bad_header_length_past_eof.safetensors"), "wb") as handle:
        handle.write(struct.pack("<Q", 1000) + b'{"a":{"dtype":"F32"')

    write_raw("bad_overlapping_offsets.safetensors",
              {"a": f32_entry(0, 16), "b": f32_entry(8, 24)}, zeros(24))
    write_raw("bad_hole_between_tensors.safetensors",
              {"a": f32_entry(0, 8), "b": f32_entry(12, 20)}, zeros(20))
    write_raw("bad_offsets_not_starting_at_zero.safetensors", {"a": f32_entry(4, 12)}, zeros(12))
    write_raw("bad_offsets_end_before_begin.safetensors",
              {"a": f32_entry(0, 8), "b": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, zeros(8))
    write_raw("bad_truncated_buffer.safetensors", {"a": f32_entry(0, 16)}, zeros(8))
    write_raw("bad_trailing_bytes.safetensors", {"a": f32_entry(0, 8)}, zeros(12))
    write_raw("bad_end_offset_overflow.safetensors",
              {"a": {"dtype": "U8", "shape": [2 ** 64 - 1], "data_offsets": [0, 2 ** 64 - 1]}}, zeros(4))
    write_raw("bad_shape_product_overflow.safetensors",
              {"a": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 0]}})
    write_raw("bad_byte_size_overflow.safetensors",
              {"a": {"dtype": "F32", "shape": [2 ** 62], "data_offsets": [0, 0]}})
    write_raw("bad_size_mismatch.safetensors", {"a": f32_entry(0, 12, shape=[4])}, zeros(12))

    write_raw("bad_negative_shape.safetensors", {"a": f32_entry(0, 8, shape=[-1, 2])}, zeros(8))
    write_raw("bad_float_shape.safetensors", {"a": f32_entry(0, 8, shape=[2.0])}, zeros(8))
    write_raw("bad_unknown_dtype.safetensors", {"a": f32_entry(0, 8, dtype="F17")}, zeros(8))
    write_raw("bad_dtype_not_string.safetensors", {"a": f32_entry(0, 8, dtype=32)}, zeros(8))
    write_raw("bad_entry_not_object.safetensors", {"a": [0, 8]}, zeros(8))
    write_raw("bad_missing_data_offsets.safetensors", {"a": {"dtype": "F32", "shape": [2]}}, zeros(8))
    write_raw("bad_three_data_offsets.safetensors",
              {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, zeros(8))
    write_raw("bad_negative_data_offset.safetensors",
              {"a": {"dtype": "F32", "shape": [0], "data_offsets": [-4, 0]}})
    write_raw("bad_data_offset_above_u64.safetensors",
              {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 2 ** 64]}})
    write_raw("bad_metadata_non_string_value.safetensors",
              {"__metadata__": {"format": "pt", "epochs": 10}, "a": f32_entry(0, 8)}, zeros(8))
    write_raw("bad_metadata_not_object.safetensors", {"__metadata__": "pt", "a": f32_entry(0, 8)}, zeros(8))
    write_raw("bad_invalid_utf8.safetensors",
              b'{"a\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', zeros(8))
    write_raw("bad_header_not_object.safetensors", b"[1,2,3]", b"")
    write_raw("bad_truncated_json.safetensors", b'{"a":{"dtype":"F32","shape":[2],"data_offs', b"")
    write_raw("bad_trailing_characters.safetensors", b'{} {}', b"")
    write_raw("bad_duplicate_tensor_key.safetensors",
              b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', zeros(8))
    write_raw("bad_duplicate_field.safetensors",
              b'{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}', zeros(8))
    write_raw("bad_deep_nesting.safetensors", b"[" * 100_000, b"")

    names = sorted(n for n in os.listdir(FIXTURES) if n.startswith("bad_"))
    for name in names:
        with open(path(name), "rb") as handle:
            blob = handle.read()
        try:
            deserialize(blob)
            accepted = True
            detail = "accepted"
        except Exception as error:  # the reference raises SafetensorError (or a ValueError)
            accepted = False
            detail = str(error)[:100]
        if accepted != (name in REFERENCE_ACCEPTS):
            sys.exit(f"{name}: the reference implementation {'accepts' if accepted else 'rejects'} it, "
                     f"not as REFERENCE_ACCEPTS says")
        print(f"{name}: reference {detail}")


def main():
    np.seterr(over="ignore")  # 1e300 → float32 inf and 65520 → float16 inf are intended
    os.makedirs(FIXTURES, exist_ok=True)
    for name in os.listdir(FIXTURES):
        if name.endswith(".safetensors") or name == "expected.json":
            os.remove(path(name))
    write_valid_files()
    write_golden()
    write_hostile_files()
    total = sum(os.path.getsize(path(n)) for n in os.listdir(FIXTURES))
    print(f"{len(os.listdir(FIXTURES))} fixture files, {total} bytes")


if __name__ == "__main__":
    main()
