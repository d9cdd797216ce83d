"""Random-weight tensors and a deterministic safetensors writer, for tiny test checkpoints.

Plugins that test a real model loader on a tiny random checkpoint (``kiapi_ideogram4.testing``,
``kiapi_zimage.testing``) share this: BF16 and F32 tensors, FP8 E4M3 Linear weights with a
per-row scale, and a writer whose output is byte-identical for the same tensors. Only numpy is
needed (numpy has no bfloat16 or float8 dtype, so both are encoded by hand), and the
``safetensors`` package is not: the format is simple enough to write directly.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "FP8_E4M3_MAX",
    "Tensor",
    "TensorSink",
    "bf16",
    "f32",
    "fp8_e4m3_codebook",
    "fp8_linear",
    "noise",
    "write_safetensors",
]

# Largest finite float8 e4m3fn value; an FP8 checkpoint's per-row scale is amax / 448.
FP8_E4M3_MAX: Final = 448.0

# Bytes per element per safetensors dtype tag, used to order tensors for alignment.
_ITEMSIZE: Final = {"F32": 4, "BF16": 2, "F8_E4M3": 1}


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor ready for serialisation: safetensors dtype tag, shape and raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def bf16(values: npt.NDArray[np.float32]) -> Tensor:
    """float32 -> bfloat16 bytes, rounding to nearest even (numpy has no bfloat16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)
    return Tensor("BF16", tuple(values.shape), rounded.astype("<u2").tobytes())


def f32(values: npt.NDArray[np.float32]) -> Tensor:
    return Tensor("F32", tuple(values.shape), np.ascontiguousarray(values, dtype="<f4").tobytes())


def fp8_e4m3_codebook() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """All finite float8 e4m3fn values, sorted, with their byte codes (for nearest rounding).

    e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities; only
    S.1111.111 is NaN. -0 (0x80) is dropped so that zero encodes as 0x00.
    """
    codes = np.array([c for c in range(256) if (c & 0x7F) != 0x7F and c != 0x80], dtype=np.uint8)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0x0F
    mantissa = (codes & 0x07).astype(np.float64)
    magnitude = np.where(
        exponent == 0,
        mantissa / 8.0 * 2.0**-6,  # subnormals
        (1.0 + mantissa / 8.0) * np.exp2(exponent.astype(np.float64) - 7.0),
    )
    values = (sign * magnitude).astype(np.float32)
    order = np.argsort(values, kind="stable")
    return values[order], codes[order]


def fp8_linear(
    rng: np.random.Generator,
    codebook: tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]],
    out_features: int,
    in_features: int,
) -> tuple[Tensor, Tensor]:
    """A random Linear weight as (F8_E4M3 codes, F32 per-row scale), like an FP8 checkpoint.

    Std 1/sqrt(in) keeps activations of order one through the random network, so nothing
    overflows bf16 and the output stays finite.
    """
    weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
    weight *= np.float32(1.0 / np.sqrt(in_features))
    amax = np.abs(weight).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(FP8_E4M3_MAX), np.float32(1.0)).astype(np.float32)
    scaled = weight / scale[:, None]
    values, codes = codebook
    # Round to the nearest representable e4m3fn value.
    upper = np.clip(np.searchsorted(values, scaled), 1, len(values) - 1)
    lower = upper - 1
    pick = np.where(scaled - values[lower] <= values[upper] - scaled, lower, upper)
    encoded = codes[pick]
    return (
        Tensor("F8_E4M3", (out_features, in_features), encoded.tobytes()),
        f32(scale),
    )


def noise(
    rng: np.random.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0
) -> npt.NDArray[np.float32]:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    if mean:
        values += np.float32(mean)
    return values


class TensorSink:
    """Collects the tensors of one checkpoint component, drawing them from ``rng`` in call order
    (so the same calls give the same bytes)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.codebook = fp8_e4m3_codebook()
        self.tensors: dict[str, Tensor] = {}

    def fp8_linear(self, name: str, out_features: int, in_features: int, bias: bool) -> None:
        """``name.weight`` F8_E4M3 + ``name.weight_scale`` F32 (+ ``name.bias`` BF16)."""
        if in_features % 64:
            # MLX quantises in groups of 64 along in_features; keep quantize=4/8 working.
            raise AssertionError(f"{name}: in_features {in_features} is not a multiple of 64")
        weight, scale = fp8_linear(self.rng, self.codebook, out_features, in_features)
        self.tensors[f"{name}.weight"] = weight
        self.tensors[f"{name}.weight_scale"] = scale
        if bias:
            self.bf16(f"{name}.bias", (out_features,), std=0.02)

    def bf16_linear(self, name: str, out_features: int, in_features: int, bias: bool) -> None:
        """A BF16 Linear (``name.weight`` (out, in), std 1/sqrt(in); ``name.bias`` if any)."""
        if in_features % 64:
            raise AssertionError(f"{name}: in_features {in_features} is not a multiple of 64")
        self.bf16(f"{name}.weight", (out_features, in_features), std=in_features**-0.5)
        if bias:
            self.bf16(f"{name}.bias", (out_features,), std=0.02)

    def norm(self, name: str, dim: int) -> None:
        # RMSNorm weights multiply directly (not 1 + w), so keep them around one.
        self.bf16(f"{name}.weight", (dim,), std=0.02, mean=1.0)

    def bf16(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        self.tensors[name] = bf16(noise(self.rng, shape, std, mean))


def write_safetensors(
    file: pathlib.Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Serialise ``tensors`` in the safetensors format (metadata ``{"format": "pt"}`` by default).

    Layout: 8-byte little-endian header length, a JSON header (padded with spaces to a
    multiple of 8), then the tensors back to back with no holes. Tensors are ordered by
    decreasing element size, then by name (as the reference implementation does), so every
    tensor starts at an offset aligned to its element size; the fixed order also makes the
    file byte-identical across builds.
    """
    ordered = sorted(tensors.items(), key=lambda item: (-_ITEMSIZE[item[1].dtype], item[0]))
    header: dict[str, Any] = {
        "__metadata__": metadata if metadata is not None else {"format": "pt"}
    }
    offset = 0
    for name, tensor in ordered:
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(tensor.data)],
        }
        offset += len(tensor.data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for chunk in _payloads(ordered):
            handle.write(chunk)


def _payloads(ordered: Iterable[tuple[str, Tensor]]) -> Iterator[bytes]:
    for _, tensor in ordered:
        yield tensor.data
