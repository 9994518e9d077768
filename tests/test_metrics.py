"""Tests for metrics.py: torchdrug golden values, brute-force references on tied scores, sklearn, edge cases.

Run: python -m pytest -q tests/test_metrics.py   (CPU, a few seconds)
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics import aupr, fmax

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "metrics_torchdrug.pt"


def brute_fmax(pred, target):
    """Slow reference: every distinct score as threshold, precision and recall protein by protein."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, bool)
    n_pos = target.sum(1)  # (P,)
    best = 0.0
    for t in np.unique(pred):
        predicted = pred >= t  # (P, T)
        n_pred, tp = predicted.sum(1), (predicted & target).sum(1)  # (P,), (P,)
        covered = n_pred > 0
        precision = np.mean(tp[covered] / n_pred[covered])
        recall = np.mean(np.where(n_pos > 0, tp / np.maximum(n_pos, 1), 0.0))  # all proteins count
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def brute_aupr(pred, target):
    """Slow reference: sum over distinct thresholds (high to low) of (R - R_prev) * P, all pairs flattened."""
    pred, target = np.asarray(pred, np.float64).ravel(), np.asarray(target, bool).ravel()
    if not target.any():
        return 0.0
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(pred)[::-1]:
        predicted = pred >= t
        tp = np.sum(predicted & target)
        recall = tp / target.sum()
        ap += (recall - prev_recall) * tp / predicted.sum()
        prev_recall = recall
    return ap


def tied_case(seed, shape=(25, 15), rate=0.2):
    """Scores rounded to one decimal (heavy ties, -0.0 and 0.0 included) and sparse labels with empty rows."""
    rng = np.random.default_rng(seed)
    pred = np.round(rng.standard_normal(shape), 1).astype(np.float32)
    target = rng.random(shape) < rate
    target[: shape[0] // 5] = False  # some proteins without any positive label
    return pred, target


def load_golden():
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} not found: torchdrug golden metrics are only in the dev checkout (../shared)")
    return torch.load(GOLDEN, weights_only=True)["cases"]


def has_ties(pred):
    return np.unique(pred.numpy()).size < pred.numel()


def test_golden_without_ties_matches_torchdrug():
    cases = [c for c in load_golden() if not has_ties(c["pred"])]
    assert cases, "golden file has no tie-free case"
    for c in cases:
        assert fmax(c["pred"], c["target"]) == pytest.approx(c["f1_max"], abs=1e-6), c["kind"]
        assert aupr(c["pred"], c["target"]) == pytest.approx(c["auprc_micro"], abs=1e-6), c["kind"]


def test_golden_with_ties():
    """torchdrug steps through tied pairs one by one (NaN or order-dependent): check references instead."""
    from sklearn.metrics import average_precision_score

    cases = [c for c in load_golden() if has_ties(c["pred"])]
    assert cases, "golden file has no case with ties"
    for c in cases:
        pred, target = c["pred"].numpy(), c["target"].numpy()
        expected = average_precision_score(target.ravel(), pred.ravel())
        assert aupr(pred, target) == pytest.approx(expected, abs=1e-9), c["kind"]
        if np.isnan(c["f1_max"]):  # ties within a protein: torchdrug has no value
            assert fmax(pred, target) == pytest.approx(brute_fmax(pred, target), abs=1e-9), c["kind"]
        else:  # a few ties between proteins only, too large for brute_fmax; torchdrug agrees here
            assert fmax(pred, target) == pytest.approx(c["f1_max"], abs=1e-6), c["kind"]


@pytest.mark.parametrize("seed", range(6))
def test_ties_match_brute_force(seed):
    pred, target = tied_case(seed)
    assert np.unique(pred).size < 60  # heavy ties
    assert fmax(pred, target) == pytest.approx(brute_fmax(pred, target), abs=1e-9)
    assert aupr(pred, target) == pytest.approx(brute_aupr(pred, target), abs=1e-12)
    # float64 input takes the dense-rank path instead of float32 bit keys: same values
    assert fmax(pred.astype(np.float64), target) == fmax(pred, target)


@pytest.mark.parametrize("seed", range(4))
def test_aupr_matches_sklearn(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(100 + seed)
    pred = np.round(rng.random((200, 60)), 2)  # ties
    target = rng.random((200, 60)) < 0.05
    expected = average_precision_score(target.ravel(), pred.ravel())
    assert aupr(pred, target) == pytest.approx(expected, abs=1e-12)


def test_protein_without_positives_counts_in_recall():
    pred = np.array([[0.9, 0.1], [0.8, 0.2]])
    target = np.array([[1, 0], [0, 0]])
    # best threshold 0.9: precision 1 (only protein 0 covered), recall (1 + 0) / 2 -> F = 2/3, not 1
    assert fmax(pred, target) == pytest.approx(2 / 3, abs=1e-9)
    assert fmax(pred[:1], target[:1]) == pytest.approx(1.0, abs=1e-9)


def test_all_equal_scores_is_one_threshold():
    rng = np.random.default_rng(7)
    target = rng.random((30, 12)) < 0.3
    target[0] = False
    pred = np.full(target.shape, 0.5, np.float32)
    precision = np.mean(target.sum(1) / 12)  # every term predicted for every protein
    recall = np.mean(target.any(1))
    assert fmax(pred, target) == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-9)
    assert aupr(pred, target) == pytest.approx(target.mean(), abs=1e-12)


def test_no_positives_at_all():
    pred = np.random.default_rng(0).random((5, 4))
    target = np.zeros((5, 4), bool)
    assert fmax(pred, target) == 0.0
    assert aupr(pred, target) == 0.0


def test_logits_and_sigmoid_agree():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.standard_normal((40, 30)) * 3)  # float64: sigmoid keeps them apart
    target = torch.from_numpy(rng.random((40, 30)) < 0.1).long()
    assert fmax(logits, target) == pytest.approx(fmax(torch.sigmoid(logits), target), abs=1e-12)
    assert aupr(logits, target) == pytest.approx(aupr(torch.sigmoid(logits), target), abs=1e-12)


def test_torch_and_numpy_inputs_agree():
    pred, target = tied_case(11)
    values = (fmax(pred, target), aupr(pred, target))
    assert isinstance(values[0], float) and isinstance(values[1], float)
    pred_t, target_t = torch.from_numpy(pred), torch.from_numpy(target).long()
    assert (fmax(pred_t, target_t), aupr(pred_t, target_t)) == values
    ints = (pred * 10).round().astype(np.int64)  # same order as pred, other dtype path
    assert (fmax(ints, target.astype(np.float32)), aupr(ints, target)) == pytest.approx(values, abs=1e-12)
    half = pred_t.bfloat16()  # no numpy bfloat16: converted to float32
    assert fmax(half, target) == pytest.approx(brute_fmax(half.float().numpy(), target), abs=1e-9)
    half = pred.astype(np.float16)
    assert aupr(half, target) == pytest.approx(brute_aupr(half, target), abs=1e-12)


@pytest.mark.parametrize("pred, target, message", [
    (np.zeros((3, 4)), np.zeros((3, 5)), "does not match"),
    (np.zeros(4), np.zeros(4), "2-D"),
    (np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), "2-D"),
    (np.zeros((0, 4)), np.zeros((0, 4)), "entries"),
    (np.array([[0.1, np.nan]]), np.array([[0, 1]]), "NaN"),
    (np.array([[0.1, 0.2]]), np.array([[0, 2]]), "binary"),
    (np.array([["a", "b"]]), np.array([[0, 1]]), "real numbers"),
])
def test_bad_input_raises(pred, target, message):
    for metric in (fmax, aupr):
        with pytest.raises(ValueError, match=message):
            metric(pred, target)
