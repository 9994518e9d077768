"""Shared test helpers: where ../shared lives, a tiny feature-set writer, torchrun and DDP checks."""
import os
import subprocess
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


def torchrun(script, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def assert_same_training(a, b, atol=1e-5):
    """Two runs' checkpoints trained alike: the same gradients (Adam's moments, to float precision of
    each tensor's scale) and, where the optimiser covers every weight (pretraining), the same weights
    wherever the gradient is not float noise: Adam turns a 1e-12 gradient, e.g. of the key bias that
    softmax ignores, into a full +-lr step, so only entries with a real gradient can be compared."""
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    sa, sb = list(a["optimizer"]["state"].values()), list(b["optimizer"]["state"].values())
    assert len(sa) == len(sb)
    for i, (x, y) in enumerate(zip(sa, sb)):
        for moment in ("exp_avg", "exp_avg_sq"):
            scale = x[moment].abs().max()
            assert (x[moment] - y[moment]).abs().max() <= 1e-5 * scale + 1e-12, (i, moment)
    if len(sa) == len(a["model"]):
        for (k, pa), x in zip(a["model"].items(), sa):
            real = x["exp_avg"].abs() > 1e-3 * x["exp_avg"].abs().max()
            assert torch.allclose(pa[real], b["model"][k][real], atol=atol), k
