"""ablations.sh: every table row as a command (DRY_RUN), the GPUS pool with resume, and its environment checks."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def ablations(tmp_path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", str(ROOT / "ablations.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_lists_every_row_of_tables_2_3_4_6(tmp_path):
    run = ablations(tmp_path, DRY_RUN=1)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    pretrain = [l for l in lines if "amma.py --pretrain" in l]
    outs = [l.split("--out ")[1].split()[0] for l in pretrain]
    assert outs == [f"runs/{n}" for n in ("amma", "symmetric", "contrastive", "alpha-1-1-1", "alpha-1-2-2",
                                          "alpha-2-1-1", "alpha-2-1-2", "alpha-2-2-1", "noaux", "paired-15",
                                          "unpaired-15")]
    continued = [l for l in pretrain if "--continue-from runs/amma/checkpoint.pt --epochs 15" in l]
    assert len(continued) == 2 and "--unpaired-seqstr features/seqstr" in continued[1]
    finetune = [l for l in lines if "finetune.py --task" in l]
    assert len(finetune) == 3 * 4 + 4 + 2 * 2 + 5 * 2 + 2                     # Tables 2 (+ ESM-1b), 3, 4, 6
    assert not any("--esm" in l for l in finetune)                            # the paper's protocol is the default
    esm = [l for l in finetune if "--baseline esm" in l]
    assert [l.split("--out ")[1].split()[0] for l in esm] == [f"runs/esm-1b/{t}" for t in ("ec", "go-mf", "go-cc", "go-bp")]
    assert not any("--ckpt" in l for l in esm)
    assert all("--resume" in l for l in pretrain + finetune)
    assert lines[-2].endswith("analyze.py --collect runs")
    assert "analyze.py --ckpt runs/amma/checkpoint.pt" in lines[-1] and "amma.py" not in lines[-1]   # its own CLI
    quick = ablations(tmp_path, DRY_RUN=1, QUICK=1, PRETRAIN="features/mine")   # finetuning follows PRETRAIN
    finetune = [l for l in quick.stdout.splitlines() if "finetune.py --task" in l]
    assert finetune and all("--features features/mine" in l and "--lr 2e-4" in l for l in finetune)


def test_seeds_run_every_finetuning_once_per_seed_and_seed_pretrain_every_pretraining(tmp_path):
    lines = ablations(tmp_path, DRY_RUN=1, SEEDS="0 1 2").stdout.splitlines()
    finetune = [l for l in lines if "finetune.py --task" in l]
    assert len(finetune) == 3 * 32
    outs = {l.split("--out ")[1].split()[0]: l.split("--seed ")[1].split()[0] for l in finetune}
    assert len(outs) == 3 * 32 and outs["runs/amma/ec/seed-2"] == "2" and outs["runs/esm-1b/go-bp/seed-1"] == "1"
    pretrain = [l for l in lines if "amma.py --pretrain" in l]
    assert len(pretrain) == 11 and all("--seed 0" in l for l in pretrain)       # one pretraining each
    both = ablations(tmp_path, DRY_RUN=1, SEEDS="0 1", SEED_PRETRAIN=1).stdout.splitlines()
    pretrain = [l for l in both if "amma.py --pretrain" in l]
    assert len(pretrain) == 2 * 11 and "--out runs/amma/seed-1 --seed 1" in " ".join(pretrain)
    assert any("--out runs/paired-15/seed-1 --seed 1" in l and "--continue-from runs/amma/seed-1/checkpoint.pt" in l
               for l in pretrain)
    finetune = [l for l in both if "finetune.py --task" in l]
    assert len(finetune) == 2 * 32 and any("--ckpt runs/noaux/seed-1/checkpoint.pt --seed 1" in l for l in finetune)
    assert "analyze.py --ckpt runs/amma/seed-0/checkpoint.pt --contrastive-ckpt runs/contrastive/seed-0/" in both[-1]
    for env, message in ((dict(SEED_PRETRAIN=1), "set SEEDS too"), (dict(SEEDS="0 x"), "whole numbers")):
        bad = ablations(tmp_path, DRY_RUN=1, **env)
        assert bad.returncode == 2 and message in bad.stderr


def test_quick_pool_runs_side_by_side_and_resumes(tmp_path):
    # two "GPUs" on the CPU: one pretraining, then its two finetunings side by side; a second run redoes nothing
    small = dict(QUICK=1, GPUS="0 1", ONLY="alpha-1-1-1", EPOCHS=1, ANALYZE=0,
                 FT_ARGS="--epochs 1 --batch-size 8 --lr 2e-4 --lr-head 2e-3 --optimizer adamw --num-workers 0 "
                         "--limit-steps 3 --eval-batch-size 64")
    first = ablations(tmp_path, **small)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("[GPU ") == 3
    results = json.loads((tmp_path / "runs/quick/results_table.json").read_text())
    assert set(results["runs"]["alpha-1-1-1"]) == {"ec", "go-mf"}
    rows = [r["row"] for r in results["tables"]["Table 4"]["rows"]]
    assert "ours: alpha-1-1-1 [synthetic]" in rows and "label-frequency baseline" in rows
    log = (tmp_path / "runs/quick/logs/alpha-1-1-1-ec.log").read_text()
    assert "ESM frozen" in log and "synthetic" in log
    pretrain_log = (tmp_path / "runs/quick/logs/alpha-1-1-1.log").read_text()
    assert len(pretrain_log) < 3000, pretrain_log                            # no progress-bar flood in a log file
    again = ablations(tmp_path, **small)
    assert again.returncode == 0
    assert "all 1 epochs are done already" in (tmp_path / "runs/quick/logs/alpha-1-1-1.log").read_text()


def test_a_python_without_torch_is_a_clear_error(tmp_path):
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    run = ablations(tmp_path, PYTHON=bare, QUICK=1)
    assert run.returncode == 2 and "cannot import torch" in run.stderr
