"""What travels between server and clients: trainable tensors (Flower ``ArrayRecord``), normalisation stats.

Wire formats (``wire-dtype``):

- ``float32``: the server sends the global trainable weights, clients send back their updated weights and
  Flower's ``FedAvg`` averages them (weighted by ``num-examples``).
- ``bfloat16``: half the bytes. NumPy has no bfloat16, so each tensor travels as raw bf16 bytes in a Flower
  ``Array`` with ``stype = BF16_STYPE``. Clients send back their *update* (local - received) rather than
  their weights, and the server adds the weighted mean update to its float32 master copy: a bf16 rounding of
  full weights would swallow updates smaller than ~1/256 of a weight's magnitude.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

BF16_STYPE = "zk0.torch.bfloat16.raw"
NUMPY_STYPE = "numpy.ndarray"


def encode_state(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Encode named tensors (sorted by name) as an ``ArrayRecord`` in ``wire_dtype``."""
    arrays: dict[str, Array] = {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu")
        if wire_dtype == "float32":
            arrays[name] = Array(tensor.to(torch.float32).contiguous().numpy())
        elif wire_dtype == "bfloat16":
            raw = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
            arrays[name] = Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=BF16_STYPE, data=raw)
        else:
            raise ValueError(f"unknown wire dtype {wire_dtype!r}; expected float32 or bfloat16")
    return ArrayRecord(arrays)


def decode_array(name: str, array: Array) -> torch.Tensor:
    """Decode one ``Array`` (numpy float or raw bf16) to a float32 tensor."""
    if array.stype == BF16_STYPE:
        flat = torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16)
        return flat.reshape(tuple(array.shape)).to(torch.float32)
    if array.stype == NUMPY_STYPE:
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"array '{name}' on the wire has dtype {values.dtype}, expected a float dtype")
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    raise ValueError(f"array '{name}' has unsupported serialization type {array.stype!r}")


def decode_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` to float32 tensors keyed by name."""
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


def weighted_mean(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of states with the same keys (weights normalised here), accumulated in float64."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    keys = set(states[0])
    out: dict[str, torch.Tensor] = {}
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"state key sets differ: {sorted(set(state) ^ keys)[:10]}")
    for key in sorted(keys):
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(torch.float32)
    return out


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx proximal term ``(mu / 2) * ||w - w_global||^2`` over trainable parameters (differentiable)."""
    missing = set(params) ^ set(global_params)
    if missing:
        raise ValueError(f"proximal term: parameter names differ: {sorted(missing)[:10]}")
    if not params:
        return torch.zeros(())
    sq = sum(
        (params[k] - global_params[k].to(params[k].device, params[k].dtype)).pow(2).sum() for k in params
    )
    return 0.5 * float(mu) * sq


# --- normalisation statistics ---------------------------------------------------------------------------


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Serialize lerobot ``meta.stats``-style stats (feature -> stat -> array) to JSON (exact float64)."""
    payload = {
        feature: {name: np.asarray(value, dtype=np.float64).tolist() for name, value in sorted(fs.items())}
        for feature, fs in sorted(stats.items())
    }
    return json.dumps(payload, sort_keys=True)


def stats_from_json(text: str) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`stats_to_json` (arrays as float64 numpy, like lerobot's ``cast_stats_to_numpy``)."""
    raw = json.loads(text)
    return {
        feature: {name: np.asarray(v, dtype=np.float64) for name, v in fs.items()}
        for feature, fs in raw.items()
    }
