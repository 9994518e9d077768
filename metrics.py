"""Protein function prediction metrics: protein-centric Fmax and pair-centric AUPR.

Usage:
    from metrics import fmax, aupr
    f = fmax(pred, target)   # pred: [proteins, terms] scores or logits; target: same shape, 0/1 or bool
    a = aupr(pred, target)   # both return a Python float

    python metrics.py runs/amma/ec/predictions.npz               # Fmax / AUPR at every identity cutoff
    python metrics.py runs/amma/ec/predictions.npz --cutoff 50   # one cutoff (test chains <50% identity)
    python metrics.py runs/amma/ec/predictions.npz --split valid --json

The predictions file (finetune.py writes it beside results.json, for the selected epoch) is a .npz
read with allow_pickle=False: per split <split>_ids (str), <split>_scores (float32 logits
[proteins, terms]), <split>_labels (uint8 0/1, same shape); test_cutoffs (int [K]) and
test_members (bool [test proteins, K]: the chain is in the test set at that cutoff); terms (str)
and meta (a JSON string: task, epoch, ...). Recomputing from it gives results.json's numbers
exactly (the same float32 logits, the same functions).

This file is also the one home of the benchmark's names and of the paper's published numbers
(TASKS, CUTOFFS, PAPER_TABLES): finetune.py, analyze.py and demo.py import them from here.

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
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

TASKS = ("ec", "go-mf", "go-cc", "go-bp")
TASK_NAMES = {"ec": "EC", "go-mf": "GO-MF", "go-cc": "GO-CC", "go-bp": "GO-BP"}
CUTOFFS = (30, 40, 50, 70, 95)   # test-set sequence-identity cutoffs (%) of DeepFRI's nrPDB, torchdrug's test_cutoffs
# The paper's results tables (percent, test Fmax / AUPR at the 95% cutoff) with their PUBLISHED averages,
# and which of ablations.sh's runs stands for each row. Tables 4 and 6 pretrain on a 22k subset of the
# 120k set; Table 6's AMMA row is Table 4's alpha 1 2 2. Every finetuning there ran ESM-1b in the loop (B.2).
PAPER_TABLES = {
    "Table 2": dict(tasks=TASKS, averages=("Avg Fmax", "Avg AUPR"), title="function prediction, 120k pretraining", rows=[
        ("amma", "AMMA", {"ec": (88.7, 89.8), "go-mf": (67.3, 65.5), "go-cc": (49.8, 36.9), "go-bp": (46.9, 33.6)}, (63.2, 56.5)),
        ("symmetric", "AMMA-symmetric", {"ec": (71.6, 74.9), "go-mf": (52.0, 52.3), "go-cc": (48.8, 35.1),
                                         "go-bp": (35.5, 24.3)}, (52.0, 46.7)),
        ("contrastive", "AMMA-contrastive", {"ec": (87.7, 89.5), "go-mf": (65.2, 61.3), "go-cc": (44.3, 28.2),
                                             "go-bp": (28.2, 17.3)}, (56.4, 49.1)),
        ("esm-1b", "ESM-1b", {"ec": (86.9, 88.4), "go-mf": (65.9, 63.0), "go-cc": (47.7, 32.4), "go-bp": (45.2, 33.2)},
         (61.4, 54.3))]),
    "Table 3": dict(tasks=("ec", "go-mf"), averages=("Average",), title="15 epochs, with extra unpaired data", rows=[
        ("paired-15", "120k paired, 0k unpaired", {"ec": (88.1, 89.7), "go-mf": (66.4, 64.6)}, (77.2,)),
        ("unpaired-15", "120k paired, 50k unpaired", {"ec": (88.2, 90.4), "go-mf": (66.9, 64.6)}, (77.5,))]),
    "Table 4": dict(tasks=("ec", "go-mf"), averages=("Average",), title="Dirichlet alpha (seq str func), 22k subset", rows=[
        ("alpha-1-1-1", "alpha 1 1 1", {"ec": (84.6, 87.2), "go-mf": (66.4, 64.8)}, (75.8,)),
        ("alpha-1-2-2", "alpha 1 2 2", {"ec": (87.7, 89.8), "go-mf": (66.4, 64.2)}, (77.0,)),
        ("alpha-2-1-1", "alpha 2 1 1", {"ec": (73.0, 75.9), "go-mf": (65.1, 63.2)}, (69.3,)),
        ("alpha-2-1-2", "alpha 2 1 2", {"ec": (86.7, 89.2), "go-mf": (65.9, 64.7)}, (76.6,)),
        ("alpha-2-2-1", "alpha 2 2 1", {"ec": (87.9, 89.5), "go-mf": (52.4, 53.6)}, (70.9,))]),
    "Table 6": dict(tasks=("ec", "go-mf"), averages=("Average",), title="auxiliary decoder inputs, 22k subset", rows=[
        ("alpha-1-2-2", "AMMA", {"ec": (87.7, 89.8), "go-mf": (66.4, 64.2)}, (77.0,)),
        ("noaux", "AMMA-w/o auxiliary", {"ec": (87.7, 90.1), "go-mf": (65.0, 63.6)}, (76.6,))]),
}


def paper_row(table, run):
    """{task: (Fmax, AUPR) in percent} of one row of a paper table, by ablations.sh's run name."""
    return next(cells for name, _, cells, _ in PAPER_TABLES[table]["rows"] if name == run)

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


# ----------------------------------------------------------------------------------------------
# saved predictions (finetune.py writes them; this file's command line recomputes the metrics)

def cutoff_members(ids, test_identity, cutoffs=CUTOFFS):
    """{cutoff: bool [len(ids)]}: test chain k is in the test set at that cutoff when
    test_identity[id][str(cutoff)] is 1; a chain without an entry is kept (torchdrug's rule). Only the
    cutoffs the file has a column for; without test_identity every chain is kept at every cutoff."""
    if not test_identity:
        return {c: np.ones(len(ids), bool) for c in cutoffs}
    present = {k for v in test_identity.values() for k in v}
    return {c: np.array([int(test_identity.get(x, {}).get(str(c), 1)) == 1 for x in ids], bool)
            for c in cutoffs if str(c) in present}


def save_predictions(path, splits, members, terms, meta):
    """splits: {split: (ids, scores [n, C], labels [n, C])}; members: {cutoff: bool [n_test]}; written
    atomically as an uncompressed-pickle-free .npz (see the module docstring)."""
    arrays = {"terms": np.array(list(terms), dtype=str), "meta": np.array(json.dumps(meta))}
    for split, (ids, scores, labels) in splits.items():
        arrays[f"{split}_ids"] = np.array(list(ids), dtype=str)
        arrays[f"{split}_scores"] = _as_numpy(scores).astype(np.float32, copy=False)
        arrays[f"{split}_labels"] = _as_numpy(labels).astype(np.uint8)
    cut = sorted(members)
    arrays["test_cutoffs"] = np.array(cut, dtype=np.int64)
    n_test = len(arrays["test_ids"]) if "test_ids" in arrays else 0
    arrays["test_members"] = (np.stack([members[c] for c in cut], 1) if cut else np.ones((n_test, 0), bool))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_predictions(path):
    """A predictions file as a dict of numpy arrays ('meta' parsed); one-line ValueError on a bad file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a predictions file ({e})") from None
    missing = [k for k in ("meta", "test_ids", "test_scores", "test_labels", "test_cutoffs", "test_members")
               if k not in data]
    if missing:
        raise ValueError(f"{path}: not a predictions file (no {', '.join(missing)})")
    data["meta"] = json.loads(str(data["meta"]))
    return data


def split_scores(data, split="test", cutoff=None, keep=None):
    """Fmax / AUPR (and n) of one split of a loaded predictions file: the test chains at `cutoff` (None:
    all), and only the ids in `keep` when given."""
    ids, pred, target = data[f"{split}_ids"], data[f"{split}_scores"], data[f"{split}_labels"]
    rows = np.ones(len(ids), bool)
    if cutoff is not None:
        cut = data["test_cutoffs"].tolist()
        if split != "test":
            raise ValueError("--cutoff applies to the test split only")
        if cutoff not in cut:
            raise ValueError(f"the file has no {cutoff}% cutoff (it has {', '.join(map(str, cut)) or 'none'})")
        rows &= data["test_members"][:, cut.index(cutoff)]
    if keep is not None:
        rows &= np.isin(ids, np.array(sorted(keep), dtype=str))
    if not rows.any():
        return {"fmax": None, "aupr": None, "n": 0}
    return {"fmax": fmax(pred[rows], target[rows]), "aupr": aupr(pred[rows], target[rows]), "n": int(rows.sum())}


def recompute(data, split="test", cutoff=None):
    """{'<cutoff>': scores} of every cutoff in the file (test), or {split: scores} (valid / one cutoff)."""
    if split == "test" and cutoff is None:
        return {str(c): split_scores(data, "test", c) for c in data["test_cutoffs"].tolist()}
    return {str(cutoff) if cutoff is not None else split: split_scores(data, split, cutoff)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Recompute Fmax and AUPR from a predictions file (finetune.py writes "
                                            "predictions.npz beside results.json): every test cutoff by default.")
    p.add_argument("predictions", help="predictions.npz written by finetune.py")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which split (default: test)")
    p.add_argument("--cutoff", type=int, default=None, help="one test identity cutoff in %% (default: every one "
                                                            "the file has: 30 40 50 70 95)")
    p.add_argument("--json", action="store_true", help="print JSON (fractions, full precision) instead of a table")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        data = load_predictions(args.predictions)
        result = recompute(data, args.split, args.cutoff)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if all(r["n"] == 0 for r in result.values()):
        raise SystemExit(f"error: {args.predictions}: no {args.split} protein to score")
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    meta = data["meta"]
    print(f"{args.predictions}: task {meta.get('task', '?')}, epoch {meta.get('epoch', '?')}, {args.split}")
    print(f"{'cutoff':>8} {'n':>6} {'Fmax':>8} {'AUPR':>8}")
    for key, r in result.items():
        name = f"<{key}%" if key.isdigit() else key
        cells = ["-", "-"] if r["n"] == 0 else [f"{100 * r['fmax']:.2f}", f"{100 * r['aupr']:.2f}"]
        print(f"{name:>8} {r['n']:>6} {cells[0]:>8} {cells[1]:>8}")
    return result


if __name__ == "__main__":
    main()
