"""Server-side validation of client train replies before aggregation.

A reply is rejected (recorded with its reason, never aggregated) when:

- its ``ArrayRecord`` has a different key set than the global trainable state (missing / unexpected keys);
- an array has the wrong shape, or the wrong dtype / serialisation for the run's ``wire-dtype``;
- an array holds NaN or Inf;
- its metrics lack a positive, finite ``num-examples`` (the FedAvg weight);
- with at least 3 structurally valid replies, its update norm ``||w_client - w_global||`` is more than
  ``max-update-norm-ratio`` times the median update norm of the *other* clients (0 disables the rule).

On the ``float32`` wire a reply carries weights (update = reply - global weights); on ``bfloat16`` it carries
the update itself.

Cost: the structural checks read only metadata and ``.npy`` headers and keep zero-copy views of the data;
the update norms (hence NaN/Inf) come out of the aggregation's single fused pass over the data
(``aggregate.fused_pass``), so validation adds no pass of its own.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from zk0_pipelines.federated import wire

EXPECTED_DTYPE = {"float32": ("float32", wire.NUMPY_STYPE), "bfloat16": ("bfloat16", wire.BF16_STYPE)}


@dataclass
class ReplyCheck:
    """Outcome of the per-reply checks: the rejection reason, or the reply's zero-copy views and weight.

    ``views`` maps tensor names to flat read-only views of the reply's arrays (``wire.array_view``);
    ``norm`` is the update norm once known (:func:`check_norms`).
    """

    reason: str | None
    norm: float | None = None
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the reply passed the per-reply checks."""
        return self.reason is None


def _single_array_record(content: RecordDict) -> ArrayRecord | str:
    records = list(content.array_records.values())
    if len(records) != 1:
        return f"expected one ArrayRecord, got {len(records)}"
    return records[0]


def check_weight(content: RecordDict, weighted_by_key: str) -> str | None:
    """Reason why the reply's FedAvg weight is unusable, or None."""
    metrics = list(content.metric_records.values())
    if len(metrics) != 1 or weighted_by_key not in metrics[0]:
        return f"metrics lack '{weighted_by_key}'"
    value = metrics[0][weighted_by_key]
    if isinstance(value, list) or not math.isfinite(float(value)) or float(value) <= 0:
        return f"'{weighted_by_key}' must be a positive number, got {value!r}"
    return None


def check_structure(
    record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], wire_dtype: str
) -> ReplyCheck:
    """Key set, shapes, dtype/serialisation and payload length of a reply's arrays (no data is read).

    ``shapes``: the global trainable state's tensor shapes. On success ``views`` holds zero-copy flat views.
    """
    keys, expected = set(record), set(shapes)
    if keys != expected:
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        return ReplyCheck(f"wrong key set: missing {missing[:5]}, unexpected {unexpected[:5]}")
    want_dtype, want_stype = EXPECTED_DTYPE[wire_dtype]
    views: dict[str, torch.Tensor] = {}
    for name in sorted(keys):
        array = record[name]
        if tuple(array.shape) != tuple(shapes[name]):
            return ReplyCheck(f"wrong shape for '{name}': {tuple(array.shape)} != {tuple(shapes[name])}")
        if array.dtype != want_dtype or array.stype != want_stype:
            return ReplyCheck(
                f"wrong dtype for '{name}': {array.dtype} ({array.stype}), expected {want_dtype} on the "
                f"{wire_dtype} wire"
            )
        try:
            views[name] = wire.array_view(name, array)
        except (ValueError, RuntimeError) as exc:
            return ReplyCheck(f"undecodable array '{name}': {exc}")
    return ReplyCheck(None, views=views)


def check_norms(check: ReplyCheck, squared: Mapping[str, float]) -> ReplyCheck:
    """Turn the per-tensor squared update norms of a structurally valid reply into its norm or a rejection.

    The update's norm is non-finite iff a value is NaN/Inf or the squares overflow float32.
    """
    for name in sorted(squared):
        if not math.isfinite(squared[name]):
            finite = bool(torch.isfinite(check.views[name]).all())
            what = "an overflowing update" if finite else "NaN/Inf values"
            return ReplyCheck(f"non-finite update: {what} in '{name}'")
    return ReplyCheck(
        None, norm=math.sqrt(math.fsum(squared.values())), views=check.views, weight=check.weight
    )


def check_reply(
    content: RecordDict, shapes: Mapping[str, tuple[int, ...]], wire_dtype: str, weighted_by_key: str
) -> ReplyCheck:
    """The per-reply checks that need no data pass: one ArrayRecord, the FedAvg weight, then the arrays.

    The update norm (hence NaN/Inf) is checked afterwards, from the aggregation pass (:func:`check_norms`).
    """
    record = _single_array_record(content)
    if isinstance(record, str):
        return ReplyCheck(record)
    if (problem := check_weight(content, weighted_by_key)) is not None:
        return ReplyCheck(problem)
    check = check_structure(record, shapes, wire_dtype)
    if check.ok:
        check.weight = float(next(iter(content.metric_records.values()))[weighted_by_key])
    return check


def norm_outliers(norms: Mapping[int, float], ratio: float) -> dict[int, str]:
    """Replies whose update norm exceeds ``ratio`` x the median of the others' norms (needs >= 3 replies)."""
    if ratio <= 0 or len(norms) < 3:
        return {}
    out: dict[int, str] = {}
    for key, norm in norms.items():
        median = statistics.median(v for k, v in norms.items() if k != key)
        if median > 0 and norm > ratio * median:
            out[key] = (
                f"update norm {norm:.4g} > {ratio:g} x the median update norm of the other clients "
                f"({median:.4g})"
            )
    return out


def all_finite(state: Mapping[str, torch.Tensor | np.ndarray]) -> bool:
    """Whether every tensor of ``state`` is finite."""
    return all(bool(np.isfinite(np.asarray(v)).all()) for v in state.values())
