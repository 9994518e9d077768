"""Protein function prediction metrics: protein-centric Fmax and pair-centric AUPR.

Usage:
    from metrics import fmax, aupr
    f = fmax(pred, target)   # pred: [proteins, terms] scores or logits; target: same shape, 0/1 or bool
    a = aupr(pred, target)   # both return a Python float

pred and target may be torch tensors (any device, any float dtype) or numpy arrays. Only the order
of the scores matters, so logits and sigmoid(logits) give the same values (as does any strictly
increasing map): no sigmoid is needed. Prefer logits: a float32 sigmoid saturates (every logit
above about 17 becomes 1.0) and so turns distinct logits into ties.

Definitions (paper eqs. 5-9). Thresholds t are the distinct score values; tied scores form one step.
For protein i:  TP_i(t) = #{terms j: pred_ij >= t, target_ij = 1},   n_i(t) = #{terms j: pred_ij >= t},
                pos_i   = #{terms j: target_ij = 1}.
    precision(t) = mean of TP_i(t) / n_i(t) over the proteins with n_i(t) >= 1
    recall(t)    = mean of TP_i(t) / (pos_i + 1e-10) over all N proteins
                   (a protein without positive labels counts in N, with recall 0)
    fmax         = max over t of 2 precision(t) recall(t) / (precision(t) + recall(t) + 1e-10)
    aupr         = average precision of all (protein, term) pairs flattened into one ranking:
                   sum over t of (R(t) - R(t_prev)) P(t), as sklearn's average_precision_score.
No positive label at all: fmax = 0.0 (recall is 0 at every threshold) and aupr = 0.0.
All-equal scores: a single threshold, every term predicted for every protein.

The 1e-10 terms are torchdrug's: on inputs without tied scores, fmax equals torchdrug 0.2.1's
metrics.f1_max(pred, target) and aupr equals metrics.area_under_prc(pred.flatten(),
target.flatten()). torchdrug instead steps through tied pairs one at a time, in sort order, so on
ties its f1_max can be NaN and both can depend on that order.

How: fmax turns the scores into 32-bit integer keys that sort like them (descending) and packs a
key and a position into one uint64, so that a plain np.sort orders pairs with their positions.
One sort per protein row gives each pair's change to its protein's precision; one sort of all
pairs puts those changes in threshold order, and cumulative sums give precision and recall at
every threshold. F1 is read only at thresholds that add a true positive: a step without one
keeps recall and cannot raise precision, so it never holds the maximum. aupr sorts the positive
and the negative scores apart and counts, for each positive, the pairs scored at least as high.
GO-BP test size (2,991 x 1,943 float32): fmax + aupr take about 0.6-0.9 s of CPU time on one core
of the (slow, shared) dev machine. float32 and narrower inputs get bit keys; float64 and wide ints
are ranked with an argsort first, about 2-3 times slower.
"""
import numpy as np
import torch

_HIGH = np.uint64(0xFFFFFFFF00000000)  # packed uint64: high half = score key, low half = position


def _as_numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _check(pred, target):
    """pred as a [P, T] numpy array of real numbers, target as a [P, T] bool array."""
    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.ndim != 2:
        raise ValueError(f"pred must be 2-D [proteins, terms], got shape {pred.shape}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {target.shape} does not match pred shape {pred.shape}")
    if not 0 < pred.size < 2**31:
        raise ValueError(f"pred must have between 1 and 2**31 - 1 entries, got shape {pred.shape}")
    if pred.dtype.kind not in "biuf":  # bool, signed, unsigned, float
        raise ValueError(f"pred must hold real numbers, got dtype {pred.dtype}")
    if pred.dtype.kind == "f" and np.isnan(pred).any():
        raise ValueError(f"pred has {int(np.isnan(pred).sum())} NaN scores")
    if target.dtype != bool:
        ones = target == 1
        if np.count_nonzero(ones) + np.count_nonzero(target == 0) != target.size:
            raise ValueError("target must be binary (0/1 or bool)")
        target = ones
    return pred, target


def _descending_keys(pred):
    """uint64 [P, T] with a zero low half; the high half sorts ascending as pred sorts descending,
    and two keys are equal exactly when the scores are."""
    key = np.empty(pred.shape, np.uint64)  # (P, T)
    if np.can_cast(pred.dtype, np.float32):  # float16/32, bool, <= 16-bit ints: exact in float32
        x = np.add(pred, 0.0, dtype=np.float32)  # + 0.0 turns -0.0 into +0.0 so that they tie
        key[...] = x.view(np.uint32)
        # IEEE floats order as sign-magnitude integers: a negative score keeps its bits (larger
        # magnitude, larger key); a non-negative one flips its 31 magnitude bits.
        np.bitwise_xor(key, np.uint64(0x7FFFFFFF), out=key, where=key < 2**31)
    else:  # float64, wide ints: dense ranks (slower: an argsort)
        flat = pred.ravel()
        order = np.argsort(flat)  # (n,) ascending
        ranked = flat[order]  # (n,)
        rank = np.empty(flat.size, np.int64)
        rank[order] = np.cumsum(np.append(False, ranked[1:] != ranked[:-1]))  # (n,) ascending dense rank
        key.reshape(-1)[...] = rank[order[-1]] - rank
    key <<= np.uint64(32)
    return key


def fmax(pred, target):
    """Protein-centric maximum F-score over thresholds; see the module docstring."""
    pred, target = _check(pred, target)
    if not target.any():
        return 0.0  # recall is 0 at every threshold
    n_prot, n_terms = pred.shape
    k = np.arange(1, n_terms + 1, dtype=np.float64)  # (T,) rank within a row, from 1

    # 1) Each protein's terms, best score first; low half: 2 * term + target bit.
    key = _descending_keys(pred)  # (P, T)
    key |= np.arange(n_terms, dtype=np.uint64) << np.uint64(1)
    key |= target
    key.sort(axis=1)
    hit = np.empty(key.shape, np.uint8)  # (P, T) target bit in row order
    np.bitwise_and(key, np.uint64(1), out=hit, casting="unsafe")
    d_precision = hit.astype(np.float64)  # (P, T)
    np.cumsum(d_precision, axis=1, out=d_precision)  # (P, T) TP_k: true positives in the top k
    n_pos = d_precision[:, -1].copy()  # (P,)
    # The k-th pair of a row changes its protein's precision by TP_k/k - TP_(k-1)/(k-1)
    # = (hit_k k - TP_k) / (k (k-1)); the first pair brings the protein into the average with hit_1.
    np.negative(d_precision, out=d_precision)
    np.add(d_precision, k, out=d_precision, where=hit.view(bool))
    d_precision[:, 1:] /= k[1:] * k[:-1]
    d_precision[:, 0] = hit[:, 0]

    # 2) All pairs, best score first; low half: 2 * position in the row-sorted layout + target bit.
    key &= _HIGH
    key += (np.arange(n_prot, dtype=np.uint64) * np.uint64(2 * n_terms))[:, None]
    key += np.arange(0, 2 * n_terms, 2, dtype=np.uint64)
    key |= hit
    top = key[:, 0].copy()  # (P,) each protein's best pair
    ranked = key.reshape(-1)  # (n,) a view: sorting it sorts key
    ranked.sort()
    np.bitwise_and(ranked, np.uint64(1), out=hit.reshape(-1), casting="unsafe")
    hits = np.flatnonzero(hit)  # (H,) ranks of the positive pairs

    # F1 only at thresholds that add a true positive: the last pair of each tie group holding one.
    ends = np.searchsorted(ranked, ranked[hits] | ~_HIGH, side="right") - 1  # (H,) nondecreasing
    ends = ends[np.append(ends[1:] != ends[:-1], True)]  # (K,)
    tp = np.searchsorted(hits, ends, side="right")  # (K,) positives ranked at or above each end
    covered = np.searchsorted(np.sort(np.searchsorted(ranked, top)), ends, side="right")  # (K,) covered
    ranked &= ~_HIGH
    ranked >>= np.uint64(1)
    pos = ranked.view(np.int64)  # (n,) row-sorted position of each ranked pair (reuses key)
    precision_sum = d_precision.reshape(-1)[pos]  # (n,)
    np.cumsum(precision_sum, out=precision_sum)
    p = precision_sum[ends] / covered  # (K,)
    weight = 1.0 / (n_pos + 1e-10)  # (P,) recall gained per true positive of each protein
    recall_sum = np.cumsum(weight[pos[hits] // n_terms])  # (H,)
    r = recall_sum[tp - 1] / n_prot  # (K,)
    return float(np.max(2 * p * r / (p + r + 1e-10)))


def aupr(pred, target):
    """Pair-centric area under the precision-recall curve (average precision); see the module docstring."""
    pred, target = _check(pred, target)
    pos = pred[target]  # (n_pos,)
    if pos.size == 0:
        return 0.0
    neg = pred[~target]  # (n_neg,)
    pos.sort()
    neg.sort()
    tp = pos.size - np.searchsorted(pos, pos, side="left")  # (n_pos,) positives scored >= each positive
    fp = neg.size - np.searchsorted(neg, pos, side="left")  # (n_pos,) negatives scored >= it
    return float(np.mean(tp / (tp + fp)))  # sum over thresholds of (R - R_prev) P
