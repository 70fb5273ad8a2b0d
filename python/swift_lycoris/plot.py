"""A loss-curve PNG without plotting libraries: numpy draws, zlib encodes."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _png(pixels: np.ndarray) -> bytes:
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(np.uint8).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_loss_plot(path: str, losses: list[float], width: int = 640, height: int = 360) -> None:
    """Writes the loss per step as a line on a white canvas with axes (log-scaled y when
    the values span more than a decade)."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    margin = 40
    values = np.asarray(losses, dtype=np.float64)
    use_log = values.min() > 0 and values.max() / values.min() > 10
    y = np.log10(values) if use_log else values
    low, high = float(y.min()), float(y.max())
    span = high - low or 1.0
    xs = margin + (np.arange(len(y)) / max(1, len(y) - 1)) * (width - 2 * margin)
    ys = height - margin - (y - low) / span * (height - 2 * margin)
    image[height - margin, margin:width - margin] = 0  # x axis
    image[margin:height - margin + 1, margin] = 0      # y axis
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0, 1, steps):
            px, py = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
            image[max(0, py - 1):py + 2, max(0, px - 1):px + 2] = (200, 40, 40)
    with open(path, "wb") as handle:
        handle.write(_png(image))
