"""The compiled FedAvg kernels against plain numpy arithmetic, and their handling of NaN/Inf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zk0_pipelines.federated import fedavg_kernels as K


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns of ``values`` (rounded by torch), as the bf16 wire carries them."""
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("n", [0, 1, 7, 8192, 8193, 30001])
def test_weights_pass_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    ref = rng.standard_normal(n).astype(np.float32)
    parts = [ref + 1e-2 * rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    weights = np.array([0.2, 0.5, 0.3], np.float32)
    out = np.empty(n, np.float32)
    squared, finite = K.tensor_pass(ref, parts, weights, out, replies_are_updates=False, block=1000)
    updates = [p - ref for p in parts]  # float32, as the kernel computes them
    expected = ref + ((weights[0] * updates[0] + weights[1] * updates[1]) + weights[2] * updates[2])
    np.testing.assert_array_equal(out, expected)  # same float32 operations in the same order
    for got, u in zip(squared, updates, strict=True):
        assert got == pytest.approx(float(np.sum(u.astype(np.float64) ** 2)), rel=1e-5, abs=1e-12)
    assert finite


def test_bf16_updates_are_widened_exactly() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000).astype(np.float32)
    bits = [_bf16_bits(1e-3 * rng.standard_normal(1000).astype(np.float32)) for _ in range(2)]
    widened = [torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).float().numpy() for b in bits]
    weights = np.array([0.25, 0.75], np.float32)
    out = np.empty_like(ref)
    squared, finite = K.tensor_pass(ref, bits, weights, out, replies_are_updates=True, block=64)
    np.testing.assert_array_equal(out, ref + (weights[0] * widened[0] + weights[1] * widened[1]))
    assert squared[1] == pytest.approx(float(np.sum(widened[1].astype(np.float64) ** 2)), rel=1e-5)
    assert finite


def test_nan_and_inf_reach_the_norms_and_the_finiteness_flag() -> None:
    ref = np.arange(10, dtype=np.float32)
    weights = np.array([0.5, 0.5], np.float32)
    clean = ref + 1
    with_nan = clean.copy()
    with_nan[3] = np.nan
    out = np.empty_like(ref)
    squared, finite = K.tensor_pass(ref, [clean, with_nan], weights, out, replies_are_updates=False)
    assert squared[0] == pytest.approx(10.0) and np.isnan(squared[1]) and not finite

    broken_ref = ref.copy()
    broken_ref[9] = np.inf  # bf16 wire: finite updates, but the master copy is not
    updates = [_bf16_bits(np.full(10, 0.5, np.float32))] * 2
    squared, finite = K.tensor_pass(broken_ref, updates, weights, out, replies_are_updates=True)
    assert np.all(np.isfinite(squared)) and not finite


def test_norms_only_without_an_output() -> None:
    ref = np.zeros(5, np.float32)
    squared, finite = K.tensor_pass(
        ref, [np.full(5, 2.0, np.float32)], np.ones(1, np.float32), None, replies_are_updates=False
    )
    assert squared.tolist() == [20.0] and finite


def test_replies_of_the_wrong_wire_dtype_are_refused() -> None:
    ref = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="uint16"):
        K.tensor_pass(ref, [ref.copy()], np.ones(1, np.float32), None, replies_are_updates=True)
