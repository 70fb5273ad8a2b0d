"""The binary call record (protocol/README.md, "Binary call record"): ``forward`` and
``backward`` of one layer as fixed-layout little-endian records on the server's stdin, answered
by records on its stdout, instead of JSON texts. Offered by the server in
``initialize``'s ``capabilities.call_record``; :class:`~swift_lycoris.server.Server` uses it
when offered unless ``SWIFT_LYCORIS_JSON_CALLS=1`` (or ``Server(call_records=False)``).

The ``struct`` formats below are the layout tables of the spec, field for field
(``python/tests/test_call_record.py`` checks them against protocol/README.md)."""

from __future__ import annotations

import struct


class Slot(int):
    """An integer a request template (:class:`RecordTemplate`, or the JSON
    :class:`~swift_lycoris.server.RequestTemplate`) fills in at each call (its value: the
    slot's position among the values given)."""


MAGIC, VERSION = 0xFF, 1
FORWARD, BACKWARD, TAPES_RELEASE = 1, 2, 3
OK, ERROR = 0, 1
DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}

FORWARD_GRAD, FORWARD_ELEMENTWISE, FORWARD_FULL = 1, 2, 4
BACKWARD_KEEP, BACKWARD_ACCUMULATE, BACKWARD_PARAMETER_GRADS = 1, 2, 4

# One struct per fixed part, named as in the spec.
LAYOUTS = {
    "header": "<BBHIQ",          # magic, version, code (method or status), length, id
    "tensor": "<QBBH",           # offset, dtype, rank, reserved; then rank × u64 extents
    "output": "<QB3x",           # offset, dtype, 3 reserved bytes
    "forward": "<II",            # module handle, flags
    "forward result": "<Q",      # tape (0: none)
    "backward": "<QII",          # tape, flags, parameter_grads (count of outputs that follow)
    "tapes.release": "<I",       # count; then count × u64 tapes (never answered)
    "error": "<iI",              # JSON-RPC code, length of the error object's JSON that follows
}
HEADER = struct.Struct(LAYOUTS["header"])
RELEASE_HEAD = struct.Struct(LAYOUTS["header"] + LAYOUTS["tapes.release"][1:])
FORWARD_RESULT = struct.Struct(LAYOUTS["forward result"])
ERROR_BODY = struct.Struct(LAYOUTS["error"])


class RecordTemplate:
    """One record with every field but the id and a few integers packed once: :meth:`fill`
    packs the id and the `slots` (offsets, the tape) given at each call."""

    def __init__(self, method: int, parts: list[tuple[str, tuple]]):
        """`parts`: (format without byte order, values) in wire order after the header; a
        value that is a :class:`Slot` is filled per call (its value: its position)."""
        fmt = LAYOUTS["header"] + "".join(f for f, _ in parts)
        self._struct = struct.Struct(fmt)
        values = [MAGIC, VERSION, method, self._struct.size, 0]
        for _, part in parts:
            values.extend(part)
        self._slots = [(index, int(value)) for index, value in enumerate(values) if isinstance(value, Slot)]
        self._values = values
        self.method = method

    def fill(self, request_id: int, slot_values) -> bytes:
        values = self._values.copy()
        values[4] = request_id
        for index, slot in self._slots:
            values[index] = slot_values[slot]
        return self._struct.pack(*values)


def _tensor(offset, dtype: str, shape) -> list[tuple[str, tuple]]:
    return [(LAYOUTS["tensor"][1:], (offset, DTYPE_CODES[dtype], len(shape), 0)),
            ("Q" * len(shape), tuple(int(e) for e in shape))]


def _output(offset, dtype: str) -> tuple[str, tuple]:
    return (LAYOUTS["output"][1:], (offset, DTYPE_CODES[dtype]))


def forward_template(handle: int, flags: int, dtype: str, shape, output_dtype: str) -> RecordTemplate:
    """``forward`` of module `handle` on an input of `shape` (slots: 0 the input's offset,
    1 the output's)."""
    return RecordTemplate(FORWARD, [(LAYOUTS["forward"][1:], (handle, flags)), *_tensor(Slot(0), dtype, shape),
                                    _output(Slot(1), output_dtype)])


def backward_template(flags: int, dtype: str, shape, input_dtype: str, parameter_grads: int) -> RecordTemplate:
    """``backward`` of a tape (slot 0) with ∂y of `shape` (slot 1), ∂x (slot 2) and
    `parameter_grads` F32 parameter gradients (slots 3…) written to the arena."""
    outputs = [_output(Slot(3 + i), "F32") for i in range(parameter_grads)]
    return RecordTemplate(BACKWARD, [(LAYOUTS["backward"][1:], (Slot(0), flags, parameter_grads)),
                                     *_tensor(Slot(1), dtype, shape), _output(Slot(2), input_dtype), *outputs])


def tapes_release(tapes: list[int]) -> bytes:
    """A ``tapes.release`` record (never answered: queue it with the next call, as a
    notification)."""
    head = RELEASE_HEAD.pack(MAGIC, VERSION, TAPES_RELEASE, RELEASE_HEAD.size + 8 * len(tapes), 0, len(tapes))
    return head + struct.pack(f"<{len(tapes)}Q", *tapes)
