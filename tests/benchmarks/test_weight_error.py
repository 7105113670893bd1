"""Tests of the weight forms and errors of benchmarks/weight_error.py, on hand-made matrices."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ROOT

# Rows with mean|w| = 0.25 and 0.5; no entry sits on a threshold or gives a zero residual.
W = torch.tensor([[0.1, -0.2, 0.3, -0.4],
                  [1.0, 0.6, -0.2, 0.2]], dtype=torch.float64)


@pytest.fixture(scope="module")
def weight_error():
    """benchmarks/weight_error.py as a module (it imports its sibling calibration_effect.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location("weight_error", ROOT / "benchmarks" / "weight_error.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_per_row_binary_is_mean_abs_times_sign(weight_error):
    expected = torch.tensor([[0.25, -0.25, 0.25, -0.25], [0.5, 0.5, -0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(weight_error.per_row_binary(W), expected)


def test_two_plane_by_hand(weight_error):
    # row 0: residual (-0.15, 0.05, 0.05, -0.15), alpha2 = 0.1; row 1: residual (0.5, 0.1, 0.3, -0.3), alpha2 = 0.3
    expected = torch.tensor([[0.15, -0.15, 0.35, -0.35], [0.8, 0.8, -0.2, 0.2]], dtype=torch.float64)
    assert torch.allclose(weight_error.two_plane_binary(W), expected)


def test_ternary_by_hand(weight_error):
    # row 0: delta = 0.175 keeps 0.2, 0.3, 0.4 (alpha 0.3); row 1: delta = 0.35 keeps 1.0, 0.6 (alpha 0.8)
    expected = torch.tensor([[0.0, -0.3, 0.3, -0.3], [0.8, 0.8, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(weight_error.ternary(W), expected)


def test_row_column_is_exact_when_abs_weight_has_rank_one(weight_error):
    weight = torch.tensor([[1.0, -2.0, 0.5], [-2.0, -4.0, 1.0]], dtype=torch.float64)  # |W| = (1, 2)^T (1, 2, 0.5)
    assert torch.allclose(weight_error.row_column_binary(weight), weight)
    # per_row is the rank-1 candidate (alpha, 1): the best rank-1 fit of |W| is at least as close
    assert weight_error.relative_error(W, weight_error.row_column_binary(W)) <= \
        weight_error.relative_error(W, weight_error.per_row_binary(W)) + 1e-12


def test_least_squares_scale_matches_lstsq_and_identity(weight_error):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha = weight_error.least_squares_scale(W, x.T @ x)
    for row in range(2):
        basis = (x @ torch.sign(W[row])).unsqueeze(1)  # the one regressor X s_o
        solution = torch.linalg.lstsq(basis, x @ W[row]).solution
        assert torch.allclose(alpha[row], solution)
    # G = I: the weight-space least-squares scale is mean|w|, i.e. the per-row form
    assert torch.allclose(weight_error.least_squares_binary(W, torch.eye(4, dtype=torch.float64)),
                          weight_error.per_row_binary(W))


def test_relative_error_in_output_and_weight_space(weight_error):
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    approximation = weight_error.ternary(W)
    direct = torch.linalg.norm(x @ W.T - x @ approximation.T) / torch.linalg.norm(x @ W.T)
    assert weight_error.relative_error(W, approximation, x.T @ x) == pytest.approx(direct.item(), rel=1e-12)
    plain = torch.linalg.norm(W - approximation) / torch.linalg.norm(W)
    assert weight_error.relative_error(W, approximation) == pytest.approx(plain.item(), rel=1e-12)


def test_outlier_columns_keeps_the_highest_energy_input_exact(weight_error):
    gram = torch.diag(torch.tensor([1.0, 2.0, 3.0, 9.0], dtype=torch.float64))  # input 3 carries the most energy
    # a quarter of 4 columns: input 3 kept; the others per row, alpha = mean of |0.1, 0.2, 0.3| and |1.0, 0.6, 0.2|
    expected = torch.tensor([[0.2, -0.2, 0.2, -0.4], [0.6, 0.6, -0.6, 0.2]], dtype=torch.float64)
    assert torch.allclose(weight_error.outlier_columns_binary(W, gram, fraction=0.25), expected)
