"""Numba kernels of the server's fused FedAvg pass: one read of every received byte, one write of the output.

For one tensor, blockwise (a block of the reference, of the accumulator and of each reply stays in L1/L2):

    u_k = reply_k - reference        (float32 wire: replies carry weights)
    u_k = float32(reply_k)           (bfloat16 wire: replies carry bf16 updates, widened exactly)
    squared[k] += sum(u_k * u_k)     (per-tensor squared update norm, for the server-side validation)
    out = reference + ((w_0 u_0 + w_1 u_1) + ...)   (fixed reply order, float32)

Why a compiled kernel: the same work as torch ops is 3 passes per reply (sub, dot, axpy) plus a final add,
each a separate sweep of a chunk; fused, the loop streams each reply once (``bench/aggregation.py``).

Floating point: ``fastmath`` is limited to ``reassoc`` (so the per-block squared-norm sums vectorise; norms
feed validation thresholds and metrics only) and ``nsz``. No ``nnan``/``ninf``: a NaN or Inf in a reply must
reach its norm (and be rejected); the output's finiteness is read from its bits (integer ops). No
``contract``: the output is the same IEEE sequence of roundings in the vector body and in the remainder
loop, so it is independent of the block size (bit-reproducible, tested).

One kernel serves both wires: ``_as_update`` is resolved per reply dtype when the kernel is compiled
(float32 weights minus the reference; bf16 bit patterns widened, minus a zero block: ``x - 0 == x``).

Compilation: the replies are passed as a tuple of arrays (a numba typed List would cost ~1.7 s of list
compilation in every new process, and ~0.1 ms per call), so the kernel is specialised per wire dtype and
number of replies: the first call for a new pair compiles it (about 2-3 s) and ``cache=True`` keeps the
machine code in ``__pycache__`` for every later process.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

_FASTMATH = {"reassoc", "nsz"}
_EXPONENT = np.uint32(0x7F800000)

#: Elements per block: reference, accumulator and reply blocks (32 KiB each) stay in the core's cache.
BLOCK_ELEMENTS = 8192


def _as_update(part, ref, bits, zeros):  # pragma: no cover - typed by the overload below
    """A reply block as ``(values, base)`` with ``update = values - base``."""
    raise NotImplementedError


@overload(_as_update, jit_options={"fastmath": _FASTMATH})
def _as_update_impl(part, ref, bits, zeros):
    """Chosen when compiling, by the reply's dtype: float32 weights minus the reference, or bf16 bit
    patterns widened exactly to float32 (the 16 bits become the high half) minus nothing."""
    if part.dtype == types.uint16:

        def widened(part, ref, bits, zeros):
            m = part.shape[0]
            for j in range(m):
                bits[j] = np.uint32(part[j]) << np.uint32(16)
            return bits[:m].view(np.float32), zeros[:m]

        return widened
    return lambda part, ref, bits, zeros: (part, ref)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, boundscheck=False)
def _fused_pass(ref, parts, weights, out, squared, block):  # pragma: no cover - compiled
    """The module's loop over one tensor; returns whether every output value is finite."""
    n = ref.shape[0]
    size = min(block, n)
    acc = np.empty(size, np.float32)
    bits = np.empty(size, np.uint32)
    zeros = np.zeros(size, np.float32)
    out_bits = out.view(np.uint32)  # exponent all ones: Inf or NaN
    non_finite = 0
    for start in range(0, n, block):
        m = min(block, n - start)
        r = ref[start : start + m]
        a = acc[:m]
        for k in range(len(parts)):
            values, base = _as_update(parts[k][start : start + m], r, bits, zeros)
            w = weights[k]
            s = np.float32(0.0)
            if k == 0:
                for j in range(m):
                    d = values[j] - base[j]
                    s += d * d
                    a[j] = w * d
            else:
                for j in range(m):
                    d = values[j] - base[j]
                    s += d * d
                    a[j] += w * d
            squared[k] += s
        if out.shape[0] > 0:
            o = out[start : start + m]
            for j in range(m):
                o[j] = r[j] + a[j]
            ob = out_bits[start : start + m]
            for j in range(m):
                non_finite += (ob[j] & _EXPONENT) == _EXPONENT
    return non_finite == 0


def tensor_pass(
    ref: np.ndarray,
    parts: list[np.ndarray],
    weights: np.ndarray,
    out: np.ndarray | None,
    *,
    replies_are_updates: bool,
    block: int = BLOCK_ELEMENTS,
) -> tuple[np.ndarray, bool]:
    """Squared update norm per reply (float64) and, into ``out``, ``ref + sum_k weights[k] * u_k``.

    ``ref`` and ``out``: flat float32; ``parts``: flat float32 replies (weights) or, with
    ``replies_are_updates``, flat uint16 bf16 bit patterns (updates); ``weights``: float32, one per part.
    With ``out=None`` only the norms are computed. Returns ``(squared_norms, output_is_finite)``.
    """
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    squared = np.zeros(len(parts), dtype=np.float64)
    if ref.shape[0] == 0 or not parts:
        return squared, True
    expected = np.uint16 if replies_are_updates else np.float32
    if any(part.dtype != expected for part in parts):
        raise TypeError(f"replies must be {np.dtype(expected)} arrays, got {[str(p.dtype) for p in parts]}")
    target = out if out is not None else np.empty(0, dtype=np.float32)
    finite = _fused_pass(ref, tuple(parts), weights, target, squared, block)
    return squared, bool(finite) if out is not None else True
