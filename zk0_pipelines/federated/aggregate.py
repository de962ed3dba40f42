"""Zero-copy, fused weighted averaging of client updates into a float32 master copy (the server's FedAvg).

One pass over the replies' received bytes (``fedavg_kernels``: a compiled loop, block by block):

- each reply's array is read through a zero-copy view of its ``bytes`` (``wire.array_view``);
- its update is ``reply - reference`` on the float32 wire (replies carry weights) or the reply itself on the
  bfloat16 wire (replies carry bf16 updates, widened to float32);
- the update's squared L2 norm is accumulated per tensor (for the server-side update validation);
- ``reference + ((w_0 u_0 + w_1 u_1) + ...)`` is computed in float32, in the given (fixed) reply order, and
  written straight into the output ``.npy`` buffer.

The weighted sum is elementwise, in a fixed order, so it is bit-reproducible (independent of the block
size). The output arrays are built in ``io.BytesIO`` buffers whose final ``bytes`` are handed to Flower's
``Array`` without another copy.

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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from zk0_pipelines.federated import fedavg_kernels, wire

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters and the values :func:`retain_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 1024**2  # glibc's maximum: larger blocks still get their own mmap
_TRIM_THRESHOLD_BYTES = 64 * 1024**3


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
    """What :func:`fused_pass` found: per reply, the squared update norm of each tensor; whether every
    output value is finite (read from the output's exponent bits)."""

    squared_norms: list[dict[str, float]]
    finite: bool


def _numpy(view: torch.Tensor) -> np.ndarray:
    """The numpy array sharing a flat float32 or bfloat16 (as its uint16 bit patterns) tensor's memory."""
    if view.dtype == torch.bfloat16:
        return view.view(torch.int16).numpy().view(np.uint16)
    return view.numpy()


def warm_up(num_replies: int, *, replies_are_updates: bool) -> None:
    """Load (or compile) the kernel for ``num_replies`` replies of that wire: a process's first kernel call
    also initialises numba's runtime, which would otherwise delay the first round's aggregation."""
    k = max(1, num_replies)
    part = np.zeros(1, dtype=np.uint16 if replies_are_updates else np.float32)
    fedavg_kernels.tensor_pass(
        np.zeros(1, dtype=np.float32),
        [part] * k,
        np.full(k, 1.0 / k, dtype=np.float32),
        np.empty(1, dtype=np.float32),
        replies_are_updates=replies_are_updates,
    )


def fused_pass(
    reference: Mapping[str, torch.Tensor],
    replies: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    replies_are_updates: bool,
    out: OutputState | None,
    block: int = fedavg_kernels.BLOCK_ELEMENTS,
) -> PassResult:
    """Squared update norms of ``replies`` and (when ``out`` is given) ``reference + sum_i w_i update_i``.

    ``reference`` and each reply map tensor names to flat float32 (reply: or bf16) tensors of equal length;
    ``weights`` are already normalised (one per reply, in aggregation order). With ``out=None`` only the
    norms are computed. ``block``: elements per block of the kernel's loop (does not change the output).
    """
    if len(replies) != len(weights):
        raise ValueError("need one weight per reply")
    if not replies:
        if out is not None:
            raise ValueError("an aggregate needs at least one reply")
        return PassResult(squared_norms=[], finite=True)
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    w32 = np.asarray(weights, dtype=np.float32)
    names = sorted(reference)
    squared: list[dict[str, float]] = [{} for _ in replies]
    finite = True
    for name in names:
        norms, ok = fedavg_kernels.tensor_pass(
            _numpy(reference[name]),
            [_numpy(reply[name]) for reply in replies],
            w32,
            _numpy(out.view(name)) if out is not None else None,
            replies_are_updates=replies_are_updates,
            block=block,
        )
        finite = finite and ok
        for index, value in enumerate(norms):
            squared[index][name] = float(value)
    return PassResult(squared_norms=squared, finite=finite)
