"""Block-wise weight quantization in NumPy: round-to-nearest (RTN), GPTQ, and the MatMulNBits layout.

A weight is the ONNX MatMul constant ``W`` of shape [K, N] (in features, out features). Every
output column n is cut along K into blocks of ``block_size`` values; each block has one scale and
one zero point (asymmetric, the range always holds 0):

    q = clip(round(w / scale) + zero_point, 0, 2^bits - 1)        w ~ (q - zero_point) * scale

Layout written for com.microsoft ``MatMulNBits`` (and read, unchanged, by ``GatherBlockQuantized``
for the tied embedding, through a [N, k_blocks * blob] view):

    B            uint8 [N, k_blocks, block_size * bits / 8]   values packed along K, low bits first
    scales       float32 [N, k_blocks]
    zero_points  uint8 [N, ceil(k_blocks * bits / 8)]        packed the same way (4-bit: two a byte)

K is padded with zeros to a whole number of blocks (the padding is never read by the kernel's output).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") is implemented here, not taken from a library: Intel Neural Compressor 3.x fails on
GPT-2's Conv1D layers and ONNX Runtime's GPTQ path needs INC 2.x (docs/FIELD_NOTES). It quantizes
the input features one at a time in order and spreads each rounding error over the features not yet
quantized, weighted by the inverse Hessian H = X^T X of the MatMul's input X (captured from
calibration text), which minimises ||X W - X Q||^2 rather than ||W - Q||^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    """Unpacked codes of one weight: the arrays ``pack`` turns into MatMulNBits inputs."""

    codes: np.ndarray  # uint8 [N, k_blocks, block_size]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray  # uint8 [N, k_blocks]
    k: int  # the true K (before padding)
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    def dequantize(self) -> np.ndarray:
        """-> float32 [K, N], the weight the kernel computes with."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]  # (N, kb, bs)
        return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :self.k].T)


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two of at least 16, got {block_size}")


def _block_params(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """blocks (..., bs) -> scale (...,) float32, zero point (...,) uint8; the range always holds 0."""
    qmax = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero block: any scale works
    zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
    return scale, zero


def _quantize(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(values / scale) + zero, 0, (1 << bits) - 1).astype(np.uint8)


def _padded_rows(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, Kp] float32 with K padded by zeros to a multiple of block_size."""
    k = w.shape[0]
    kp = -(-k // block_size) * block_size
    out = np.zeros((w.shape[1], kp), dtype=np.float32)
    out[:, :k] = w.T
    return out


def rtn(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round each block to nearest. w: [K, N]."""
    check_block_size(block_size)
    rows = _padded_rows(np.asarray(w, dtype=np.float32), block_size)  # (N, Kp)
    blocks = rows.reshape(rows.shape[0], -1, block_size)  # (N, kb, bs)
    scale, zero = _block_params(blocks, bits)
    codes = _quantize(blocks, scale[..., None], zero[..., None], bits)
    return BlockQuantized(codes, scale, zero, w.shape[0], bits)


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, damp: float = 0.01,
         lazy_block: int = 128) -> BlockQuantized:
    """GPTQ with block-wise (group) scales. w: [K, N]; hessian: [K, K] = sum of x^T x over calibration rows.

    Scales and zero points of a block are taken from the block's weights as they are when the
    algorithm reaches it (after the updates from earlier features), as in the reference code.
    Features are taken in their natural order (no act-order), so the blocks stay contiguous in K,
    which is what MatMulNBits needs.
    """
    check_block_size(block_size)
    k, n = w.shape
    rows = _padded_rows(np.asarray(w, dtype=np.float32), block_size).astype(np.float64)  # (N, Kp)
    kp = rows.shape[1]
    h = np.zeros((kp, kp), dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0  # features never active (and the padding): no information, quantize as zeros
    h[dead, dead] = 1.0
    rows[:, dead] = 0.0
    h[np.diag_indices(kp)] += damp * float(np.mean(np.diag(h)))
    # Upper Cholesky factor of H^-1: row i holds the weights that spread feature i's error.
    hinv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1
    hinv = np.linalg.cholesky(hinv.T @ hinv).T  # H^-1 = L^-T L^-1 -> its upper factor U, H^-1 = U^T U

    kb = kp // block_size
    codes = np.zeros((n, kp), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zeros = np.zeros((n, kb), dtype=np.uint8)
    lazy = max(block_size, (lazy_block // block_size) * block_size)  # a whole number of blocks
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1 = rows[:, i1:i2].copy()  # (N, b)
        err1 = np.zeros_like(w1)
        u1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                scale, zero = _block_params(w1[:, i:i + block_size], bits)
                scales[:, col // block_size], zeros[:, col // block_size] = scale, zero
            q = _quantize(w1[:, i], scale, zero, bits)
            codes[:, col] = q
            deq = (q.astype(np.float64) - zero) * scale
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        rows[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return BlockQuantized(codes.reshape(n, kb, block_size), scales, zeros, k, bits)


def _pack_last(values: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack uint8 values of ``bits`` bits along the last axis, low bits first (pads with ``fill``)."""
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate([values, np.full(values.shape[:-1] + (pad,), fill, np.uint8)], axis=-1)
    v = values.reshape(values.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= v[..., j] << (bits * j)
    return out


def pack(qw: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (B [N, kb, blob], scales [N, kb], zero_points [N, ceil(kb * bits / 8)]) for MatMulNBits.

    Byte for byte what ONNX Runtime's own RTN quantizer (MatMulNBitsQuantizer, asymmetric) writes,
    including the unused zero-point padding (the default zero point, 2^(bits-1)); a test pins it."""
    if qw.bits not in (4, 8):
        raise ValueError(f"only 4 and 8 bits are written, got {qw.bits}")
    return _pack_last(qw.codes, qw.bits), qw.scales, _pack_last(qw.zero_points, qw.bits, 1 << (qw.bits - 1))


def output_error(x: np.ndarray, w: np.ndarray, qw: BlockQuantized) -> float:
    """Relative error of the layer's output on inputs x [M, K]: ||x W - x Q|| / ||x W||."""
    ref = x @ w
    return float(np.linalg.norm(ref - x @ qw.dequantize()) / max(np.linalg.norm(ref), 1e-30))
