"""Shared test helpers: where ../shared lives, and a tiny feature-set writer."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# The tests run tiny models: one thread is as fast, and it avoids OpenMP threads spinning against
# each other (100x slower steps) whenever anything else runs on a 2-core machine.
torch.set_num_threads(1)


def need_shared(*parts):
    """Path inside ../shared, or skip the test with the reason (a fresh clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the reference data in ../shared exists only in the dev checkout")
    return path


def write_features(root, lengths, dims=(12, 20, 8), func_len=6, modalities=("seq", "str", "func"), seed=0):
    """A small feature cache in the layout of SPEC.md: one protein per entry of `lengths`."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    rows = ["id\tL\tL_func\tmodalities\tsequence"]
    W = [torch.randn(4, d, generator=torch.Generator().manual_seed(99)) / 2 for d in dims]   # fixed maps
    for i, L in enumerate(lengths):
        pid = f"P{i:03d}"
        shared = torch.randn(L, 4, generator=g)                       # per-residue factors all modalities see
        protein = shared.mean(0) + torch.randn(func_len, 4, generator=g)    # text tokens: protein + token factors
        feats = {"seq": shared @ W[0], "str": (shared @ W[1]).tanh(), "func": protein @ W[2]}
        for m in modalities:
            (root / m).mkdir(parents=True, exist_ok=True)
            torch.save(feats[m].half(), root / m / f"{pid}.pt")
        rows.append(f"{pid}\t{L}\t{func_len if 'func' in modalities else 0}\t{','.join(modalities)}\t{'A' * L}")
    (root / "manifest.tsv").write_text("\n".join(rows) + "\n")
    return root
