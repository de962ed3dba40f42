"""What travels between server and clients: trainable tensors (Flower ``ArrayRecord``).

Wire formats (``wire-dtype``):

- ``float32``: the server sends the global trainable weights, clients send back their updated weights and
  Flower's ``FedAvg`` averages them (weighted by ``num-examples``). Encoded and decoded by Flower itself
  (``ArrayRecord(torch_state_dict=...)`` / ``to_torch_state_dict``).
- ``bfloat16``: half the bytes. NumPy has no bfloat16, so each tensor travels as raw bf16 bytes in a Flower
  ``Array`` with ``stype = BF16_STYPE``. Clients send back their *update* (local - received) rather than
  their weights, and the server adds the weighted mean update to its float32 master copy: a bf16 rounding of
  full weights would swallow updates smaller than ~1/256 of a weight's magnitude.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

BF16_STYPE = "zk0.torch.bfloat16.raw"

# array_view wraps immutable ``bytes`` (read-only by construction, never written through): torch's warning
# about non-writable buffers is expected there and only there.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)
NUMPY_STYPE = "numpy.ndarray"


def encode_state(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Encode named tensors (sorted by name) as an ``ArrayRecord`` in ``wire_dtype``.

    float32: Flower's own state-dict conversion (one ``.npy`` ``Array`` per tensor); bfloat16: raw bf16
    bytes per tensor (``BF16_STYPE``).
    """
    if wire_dtype == "float32":
        return ArrayRecord(
            torch_state_dict={
                name: state[name].detach().to("cpu", torch.float32).contiguous() for name in sorted(state)
            }
        )
    if wire_dtype != "bfloat16":
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; expected float32 or bfloat16")
    arrays: dict[str, Array] = {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu")
        raw = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        arrays[name] = Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=BF16_STYPE, data=raw)
    return ArrayRecord(arrays)


def _npy_layout(name: str, data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, data offset)`` of an ``.npy`` payload, read from its header only (no data copied)."""
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != b"\x93NUMPY":
        raise ValueError(f"array '{name}' is not an .npy payload")
    major = view[6]
    if major not in (1, 2, 3):
        raise ValueError(f"array '{name}' has an unsupported .npy version {major}")
    size_bytes = 2 if major == 1 else 4
    header_len = int.from_bytes(view[8 : 8 + size_bytes], "little")
    offset = 8 + size_bytes + header_len
    dtype, shape, fortran_order = _parse_npy_header(bytes(view[:offset]))
    if fortran_order and len(shape) > 1:
        raise ValueError(f"array '{name}' is Fortran-ordered")
    return dtype, shape, offset


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """numpy's own (safe) header parser, cached: every round repeats the same few headers."""
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(fp)
    return np.dtype(dtype), tuple(int(d) for d in shape), bool(fortran_order)


def array_view(name: str, array: Array) -> torch.Tensor:
    """Zero-copy, read-only flat view of an ``Array``'s data: float32 (numpy wire) or bfloat16 (raw bf16).

    The tensor shares memory with ``array.data`` (immutable ``bytes``): never write to it. Raises
    ``ValueError`` when the payload is not float32/bf16 or its length does not match its declared shape.
    """
    if array.stype == BF16_STYPE:
        dtype, count, offset, width = torch.bfloat16, math.prod(array.shape), 0, 2
    elif array.stype == NUMPY_STYPE:
        np_dtype, shape, offset = _npy_layout(name, array.data)
        if np_dtype != np.dtype("<f4"):
            raise ValueError(f"array '{name}' on the wire has dtype {np_dtype}, expected float32")
        if shape != tuple(array.shape):
            raise ValueError(
                f"array '{name}': .npy header shape {shape} != declared shape {tuple(array.shape)}"
            )
        dtype, count, width = torch.float32, math.prod(shape), 4
    else:
        raise ValueError(f"array '{name}' has unsupported serialization type {array.stype!r}")
    if len(array.data) != offset + width * count:
        raise ValueError(
            f"array '{name}' holds {len(array.data) - offset} data bytes, expected {width * count}"
        )
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.data, dtype=dtype, count=count, offset=offset)


def _float32(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ValueError(f"array '{name}' on the wire has dtype {tensor.dtype}, expected a float dtype")
    return tensor.to(torch.float32)


def decode_array(name: str, array: Array) -> torch.Tensor:
    """Decode one ``Array`` (numpy float or raw bf16) to a float32 tensor (a private copy)."""
    if array.stype == BF16_STYPE:
        return array_view(name, array).reshape(tuple(array.shape)).to(torch.float32)
    if array.stype == NUMPY_STYPE:
        return _float32(name, torch.from_numpy(array.numpy()))
    raise ValueError(f"array '{name}' has unsupported serialization type {array.stype!r}")


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` (version 1.0) header ``numpy.save`` writes for a C-ordered float32 array of ``shape``."""
    fp = io.BytesIO()
    np.lib.format.write_array_header_1_0(fp, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return fp.getvalue()


def decode_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` to float32 tensors keyed by name (float32 wire: Flower's conversion)."""
    if all(array.stype == NUMPY_STYPE for array in record.values()):
        return {name: _float32(name, t) for name, t in record.to_torch_state_dict().items()}
    return {name: decode_array(name, array) for name, array in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Serialized array bytes in ``record`` (what Flower chunks and sends, headers excluded)."""
    return int(sum(len(array.data) for array in record.values()))


def sub_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``a - b`` per key (key sets must match)."""
    if set(a) != set(b):
        raise ValueError(f"state key sets differ: {sorted(set(a) ^ set(b))[:10]}")
    return {k: a[k].to(torch.float32) - b[k].to(torch.float32) for k in a}


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of ``state``."""
    total = sum(float(t.to(torch.float64).pow(2).sum()) for t in state.values())
    return math.sqrt(total)


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx proximal term ``(mu / 2) * ||w - w_global||^2`` over trainable parameters (differentiable).

    Fused: one ``_foreach_sub`` and one ``_foreach_norm`` over all tensors (autograd-aware), not a Python
    loop of per-tensor kernels.
    """
    missing = set(params) ^ set(global_params)
    if missing:
        raise ValueError(f"proximal term: parameter names differ: {sorted(missing)[:10]}")
    if not params:
        return torch.zeros(())
    names = sorted(params)
    current = [params[k] for k in names]
    anchor = [global_params[k].to(params[k].device, params[k].dtype) for k in names]
    return proximal_term_lists(current, anchor, mu)


def proximal_term_lists(current: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """:func:`proximal_term` over two aligned, non-empty tensor lists (``anchor`` detached)."""
    norms = torch._foreach_norm(torch._foreach_sub(current, anchor))
    return 0.5 * float(mu) * torch.stack(norms).square().sum()


def update_norm(current: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """Global L2 norm of ``current - start`` over aligned tensor lists (fused kernels, float64 sums)."""
    if not current:
        return 0.0
    norms = torch._foreach_norm(torch._foreach_sub(current, start), 2, dtype=torch.float64)
    return float(torch.linalg.vector_norm(torch.stack(norms)))
