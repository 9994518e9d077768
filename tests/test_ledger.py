"""The reproduction ledger: every identity cutoff from one run, saved predictions that recompute
results.json exactly, and the ESM-1b baseline row (finetune.py --baseline esm). CPU, small."""
import json
import subprocess
import sys

import numpy as np
import pytest

import amma
import finetune as ft
import metrics
from conftest import ROOT


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo finetuning (small pretraining made here, 2 epochs) in a fresh folder."""
    import demo
    tmp = tmp_path_factory.mktemp("ledger")
    root = demo.ensure_demo_features(tmp / "features/demo")
    mc = amma.AMMAConfig(d_seq=64, d_str=96, d_func=48, D=32, n_layers=1, n_heads=2, dec_layers=1, M=32)
    amma.pretrain(mc, amma.TrainConfig(features=str(root), out=str(tmp / "pre"), epochs=1, batch_size=8,
                                       num_workers=0, limit_steps=3), quiet=True)
    result = ft.main(["--task", "ec", "--features", str(root), "--ckpt", str(tmp / "pre/checkpoint.pt"),
                      "--out", str(tmp / "ec"), "--epochs", "2", "--batch-size", "8", "--lr", "2e-4",
                      "--lr-head", "2e-3", "--num-workers", "0", "--eval-batch-size", "64"])
    return tmp, root, result


def test_results_hold_every_cutoff_and_the_predictions_recompute_them_exactly(demo_run, capsys):
    tmp, root, result = demo_run
    saved = json.loads((tmp / "ec/results.json").read_text())
    labels = json.loads((root / "labels_ec.json").read_text())
    test = labels["splits"]["test"]
    assert list(saved["test_cutoffs"]) == ["30", "40", "50", "70", "95"]
    for c, r in saved["test_cutoffs"].items():                        # each cutoff: the file's chains
        assert r["n"] == sum(labels["test_identity"][x][c] for x in test)
    assert saved["test_cutoffs"]["30"]["n"] < saved["test_cutoffs"]["95"]["n"] == len(test)
    assert {k: saved["test_cutoffs"]["95"][k] for k in ("fmax", "aupr")} == saved["test"]   # the paper's column
    for record in saved["epochs"]:                                    # the whole curve at every cutoff
        assert set(record["test_cutoffs"]) == set(saved["test_cutoffs"])
    best = saved["epochs"][saved["selected_epoch"] - 1]
    assert best["test_cutoffs"] == saved["test_cutoffs"]              # the epoch chosen on validation

    pred = tmp / "ec/predictions.npz"
    with np.load(pred, allow_pickle=False) as z:                      # no pickled object inside
        assert z["test_scores"].dtype == np.float32 and z["test_labels"].dtype == np.uint8
        assert z["test_ids"].tolist() == test and z["test_members"].shape == (len(test), 5)
        assert z["valid_ids"].tolist() == labels["splits"]["valid"]
    capsys.readouterr()
    again = metrics.main([str(pred), "--json"])
    assert again == saved["test_cutoffs"]                             # exactly, not approximately
    assert metrics.main([str(pred), "--cutoff", "95"])["95"] == {**saved["test"], "n": len(test)}
    valid = metrics.main([str(pred), "--split", "valid"])["valid"]
    assert {k: valid[k] for k in ("fmax", "aupr")} == saved["valid"]
    printed = capsys.readouterr().out
    assert "<95%" in printed and f"{100 * saved['valid']['fmax']:.2f}" in printed


def test_metrics_cli_bad_inputs(demo_run, tmp_path):
    pred = demo_run[0] / "ec/predictions.npz"
    cases = [([str(tmp_path / "none.npz")], "not a predictions file"),
             ([str(pred), "--cutoff", "60"], "no 60% cutoff (it has 30, 40, 50, 70, 95)"),
             ([str(pred), "--split", "valid", "--cutoff", "95"], "test split only")]
    (tmp_path / "junk.npz").write_bytes(b"junk")
    cases.append(([str(tmp_path / "junk.npz")], "not a predictions file"))
    for args, message in cases:
        run = subprocess.run([sys.executable, str(ROOT / "metrics.py"), *args], capture_output=True, text=True)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_printed_table_keeps_95_and_adds_every_cutoff(demo_run):
    text = ft.table("ec", demo_run[2])
    assert "88.7 /  89.8" in text                                     # the paper's 95% row
    assert all(f"<{c}%" in text for c in (30, 40, 50, 70, 95))


def test_esm_baseline_on_the_demo_is_the_head_on_frozen_seq_features(demo_run, capsys):
    tmp, root, _ = demo_run
    result = ft.main(["--task", "ec", "--baseline", "esm", "--features", str(root), "--out", str(tmp / "esm"),
                      "--epochs", "1", "--batch-size", "8", "--lr-head", "2e-3", "--num-workers", "0",
                      "--limit-steps", "4"])
    out = capsys.readouterr().out
    assert result["model"] == "ESM-1b baseline (no AMMA)" and result["protocol"] == "esm-frozen"
    assert result["paper"] == pytest.approx({"fmax": 0.869, "aupr": 0.884}) and "ESM-1b (paper, Table 2)" in out
    assert result["trainable_parameters"] == 64 * 64 + 64 + 64 * result["n_classes"] + result["n_classes"]
    assert (tmp / "esm/predictions.npz").exists() and "no AMMA" in out
    with pytest.raises(SystemExit, match="exclude each other"):
        ft.main(["--task", "ec", "--baseline", "esm", "--from-scratch"])


def test_esm_baseline_runs_esm_in_the_loop(tmp_path):
    """On a tiny-encoder set with --esm finetune the baseline trains the tiny ESM-2 with the head."""
    import extract_features as ef
    from test_finetune import feature_set
    info = {"encoders": {"seq": ef.TINY_NAMES["seq"], "str": ef.TINY_NAMES["str"]}, "tiny": True, "synthetic": False}
    root, _ = feature_set(tmp_path / "f", dims=(64, 20, 8), info=info)
    result = ft.main(["--task", "go-mf", "--baseline", "esm", "--esm", "finetune", "--features", str(root),
                      "--out", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
                      "--limit-steps", "2"])
    assert result["protocol"] == "esm-finetune" and result["trainable_parameters"] > 64 * 64 + 64
    best = amma.torch.load(tmp_path / "out/best.pt", weights_only=True)
    assert any(k.startswith("esm.") for k in best["model"]) and not any(k.startswith("enc.") for k in best["model"])


def test_paper_numbers_live_once():
    import analyze
    import demo
    assert ft.TASKS is metrics.TASKS and analyze.TASKS is metrics.TASKS and demo.TASKS is metrics.TASKS
    assert ft.TABLE2 == metrics.PAPER_TABLES["Table 2"]["rows"][0][2] and analyze.PAPER_TABLES is metrics.PAPER_TABLES
