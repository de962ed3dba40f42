"""Zero-copy, fused weighted averaging of client updates into a float32 master copy (the server's FedAvg).

One pass over the replies' received bytes, tensor by tensor and chunk by chunk (a chunk of every reply and of
the reference stays in cache while it is used):

- each reply's array is read through a zero-copy view of its ``bytes`` (``wire.array_view``);
- its update is ``reply - reference`` on the float32 wire (replies carry weights) or the reply itself on the
  bfloat16 wire (replies carry bf16 updates, widened to float32 per chunk);
- the update's squared L2 norm is accumulated per tensor (for the server-side update validation);
- ``acc = update_0 + sum_{i>0} (w_i / w_0) * update_i`` is accumulated in float32 in one preallocated chunk
  buffer, in the given (fixed) reply order, and ``reference + w_0 * acc`` (= ``reference + sum_i w_i *
  update_i``) is written straight into the output ``.npy`` buffer.

The weighted sum is elementwise, in a fixed order, so it is bit-reproducible (independent of the chunk size
and thread count). The output arrays are built in ``io.BytesIO`` buffers whose final ``bytes`` are handed to
Flower's ``Array`` without another copy.

Memory: every round frees ~(clients + 1) x the model's bytes and allocates as much again. glibc returns
freed heap tops to the OS (trim threshold) and serves large blocks with fresh ``mmap`` pages, so each
round would page-fault its whole output and the replies in again (measured: 0.25 s per 400 MB written).
:func:`retain_freed_memory` (called once by the strategy, i.e. in the ServerApp process) raises glibc's
mmap and trim thresholds so freed blocks are reused; the process keeps its per-round peak instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Array, ArrayRecord

from zk0_pipelines.federated import wire

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters and the values :func:`retain_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 1024**2  # glibc's maximum: larger blocks still get their own mmap
_TRIM_THRESHOLD_BYTES = 64 * 1024**3

#: Elements per chunk (1 MiB of float32): the reply/reference/scratch/accumulator chunks stay in cache.
CHUNK_ELEMENTS = 1 << 18


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed heap memory for reuse (module doc); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    log.debug("glibc mallopt (mmap threshold, trim threshold): %s", ok)
    return ok


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]


def _uninitialized_bytes(size: int) -> bytes:
    """A new ``bytes`` of ``size`` uninitialised bytes (C API ``PyBytes_FromStringAndSize(NULL, size)``).

    Only for :class:`OutputState`, which overwrites every byte before anyone reads it: ``bytes(size)``
    would zero-fill ``size`` bytes first, a whole extra pass over the output.
    """
    return _new_bytes(None, size)


@dataclass
class OutputState:
    """Float32 ``.npy`` output buffers, one per tensor, writable through flat tensor views until sealed."""

    shapes: dict[str, tuple[int, ...]]
    _buffers: dict[str, io.BytesIO] = field(default_factory=dict)
    _views: dict[str, torch.Tensor] = field(default_factory=dict)
    _memory: dict[str, memoryview] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, shape in self.shapes.items():
            header = wire.npy_header(shape)
            count = math.prod(shape)
            # the BytesIO is the bytes' sole owner, so getbuffer() writes in place and getvalue() returns it
            buffer = io.BytesIO(_uninitialized_bytes(len(header) + 4 * count))
            memory = buffer.getbuffer()
            memory[: len(header)] = header
            self._buffers[name], self._memory[name] = buffer, memory
            self._views[name] = torch.frombuffer(memory, dtype=torch.float32, count=count, offset=len(header))

    def view(self, name: str) -> torch.Tensor:
        """Flat writable float32 view of tensor ``name``'s output."""
        return self._views[name]

    def seal(self) -> ArrayRecord:
        """Release the views and return the outputs as an ``ArrayRecord`` (numpy ``.npy`` arrays)."""
        self._views.clear()
        for memory in self._memory.values():
            memory.release()
        arrays = {
            name: Array(
                dtype="float32",
                shape=tuple(self.shapes[name]),
                stype=wire.NUMPY_STYPE,
                data=self._buffers[name].getvalue(),
            )
            for name in sorted(self.shapes)
        }
        self._buffers.clear()
        self._memory.clear()
        return ArrayRecord(arrays)


@dataclass
class PassResult:
    """What :func:`fused_pass` found: per reply, the squared update norm of each tensor; output finiteness
    (valid when every aggregated reply's norm is finite, which the caller checks)."""

    squared_norms: list[dict[str, float]]
    finite: bool


def _tensor_pass(
    ref: torch.Tensor,
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    target: torch.Tensor | None,
    *,
    replies_are_updates: bool,
    norms: bool,
    check_output: bool,
    chunk: int,
) -> tuple[list[float], bool]:
    """:func:`fused_pass` for one tensor: squared update norm per reply, and whether the output is finite."""
    ratios = [w / weights[0] for w in weights]
    numel = ref.numel()
    acc = torch.empty(min(chunk, numel), dtype=torch.float32)
    scratch = torch.empty_like(acc)
    dots: list[list[torch.Tensor]] = [[] for _ in parts]
    finite = True
    sub, dot, add = torch.sub, torch.dot, torch.add
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        size = stop - start
        ref_c, acc_c, tmp_c = ref[start:stop], acc[:size], scratch[:size]
        for index, whole in enumerate(parts):
            part = whole[start:stop]
            into = acc_c if index == 0 else tmp_c  # acc = u_0 + sum_i (w_i / w_0) u_i
            if not replies_are_updates:
                update = sub(part, ref_c, out=into)
            elif part.dtype != torch.float32 or index == 0:
                update = into.copy_(part)
            else:
                update = part
            if norms:
                dots[index].append(dot(update, update))
            if target is not None and index > 0:
                acc_c.add_(update, alpha=ratios[index])
        if target is not None:  # reference + w_0 * acc, written straight into the output
            result = add(ref_c, acc_c, alpha=weights[0], out=target[start:stop])
            # a sum is non-finite iff a value is (or it overflows: then look element-wise)
            if check_output and finite and not math.isfinite(float(result.sum())):
                finite = bool(torch.isfinite(result).all())
    squared = [float(torch.stack(d).double().sum()) if d else 0.0 for d in dots]
    return squared, finite


def fused_pass(
    reference: Mapping[str, torch.Tensor],
    replies: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    replies_are_updates: bool,
    out: OutputState | None,
    norms: bool = True,
    chunk: int | None = None,
) -> PassResult:
    """Squared update norms of ``replies`` and (when ``out`` is given) ``reference + sum_i w_i update_i``.

    ``reference`` and each reply map tensor names to flat float32 (reply: or bf16) tensors of equal length;
    ``weights`` are already normalised (one per reply, in aggregation order). With ``out=None`` only the
    norms are computed; with ``norms=False`` only the aggregate. ``chunk``: elements per chunk.
    """
    if len(replies) != len(weights):
        raise ValueError("need one weight per reply")
    if not replies:
        if out is not None:
            raise ValueError("an aggregate needs at least one reply")
        return PassResult(squared_norms=[], finite=True)
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    # Output finiteness. Float32 wire: update = reply - reference, so a non-finite reference value makes
    # every reply's update norm non-finite (the caller rejects them all); with finite updates (|u| < 1.9e19,
    # else u*u overflows) and weight ratios <= 1e6, |w_0 * acc| < 6e25 cannot push a finite reference value
    # past float32's maximum. So the output is finite and only the bfloat16 wire (updates independent of
    # the reference) or extreme weights need the element check (a sum per chunk).
    check_output = out is not None and (replies_are_updates or max(weights) / weights[0] > 1e6)
    names = sorted(reference)

    def one(name: str) -> tuple[list[float], bool]:
        return _tensor_pass(
            reference[name],
            [reply[name] for reply in replies],
            weights,
            out.view(name) if out is not None else None,
            replies_are_updates=replies_are_updates,
            norms=norms,
            check_output=check_output,
            chunk=chunk or CHUNK_ELEMENTS,
        )

    with torch.no_grad():
        results = [one(name) for name in names]
    squared = [
        {name: r[0][index] for name, r in zip(names, results, strict=True)} for index in range(len(replies))
    ]
    return PassResult(squared_norms=squared, finite=all(r[1] for r in results))
