"""The reproduction ledger: every identity cutoff from one run, saved predictions that recompute
results.json exactly, and the ESM-1b baseline row (finetune.py --baseline esm). CPU, small."""
import json
import subprocess
import sys

import numpy as np
import pytest

import amma
import cache
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


# ---- the overlap audit ------------------------------------------------------------------------

def mutate(seq, fraction, seed):
    """seq with round(fraction * len) positions changed to another residue (no insertions)."""
    import random
    rng = random.Random(seed)
    s = list(seq)
    for i in rng.sample(range(len(s)), round(fraction * len(s))):
        s[i] = rng.choice([a for a in "ACDEFGHIKLMNPQRSTVWY" if a != s[i]])
    return "".join(s)


@pytest.fixture(scope="module")
def planted(demo_run):
    """A pretraining 'set' (manifest only): 40 random sequences, exact copies of three test chains and 97%
    copies of two more, all five from two families; the other families' test chains have no neighbour."""
    import random
    tmp, root, _ = demo_run
    rows = {r["id"]: r for r in cache.read_manifest(root)}
    test = json.loads((root / "labels_ec.json").read_text())["splits"]["test"]
    families = sorted({rows[x]["family"] for x in test})
    near = [x for x in test if rows[x]["family"] in families[:2]]
    exact, close = near[:3], near[3:5]
    rng = random.Random(1)
    seqs = {f"R{i:03d}": "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(60, 150)))
            for i in range(40)}
    seqs.update({f"X_{x}": rows[x]["sequence"] for x in exact})
    seqs.update({f"M_{x}": mutate(rows[x]["sequence"], 0.03, k) for k, x in enumerate(close)})
    pre = tmp / "pretrain"
    pre.mkdir()
    (pre / "manifest.tsv").write_text("id\tL\tL_func\tmodalities\tsequence\n" + "".join(
        f"{k}\t{len(s)}\t0\tseq\t{s}\n" for k, s in seqs.items()))
    clean = [x for x in test if rows[x]["family"] not in families[:2]]
    return pre, root, exact, close, clean


def test_overlap_exact_part_runs_without_mmseqs(planted, monkeypatch, capsys):
    import analyze
    import overlap
    pre, root, exact, close, _ = planted
    monkeypatch.setattr(overlap, "mmseqs", lambda: None)
    report = analyze.main(["--overlap", "--pretrain", str(pre), "--tasks", str(root), "--out", str(pre.parent / "ov0")])
    assert set(report["tasks"]) == {"ec", "go-mf", "go-cc", "go-bp"}
    for entry in report["tasks"].values():
        assert entry["identical"] == sorted(exact) and entry[">=95"] is None and entry[">=30"] is None
    out = capsys.readouterr().out
    assert "apt-get install mmseqs2" in out and "need MMseqs2" in out
    with pytest.raises(SystemExit, match="needs --pretrain"):
        analyze.main(["--overlap", "--tasks", str(root)])
    with pytest.raises(SystemExit, match="no 'sequence' column"):
        (pre.parent / "noseq").mkdir(exist_ok=True)
        (pre.parent / "noseq/manifest.tsv").write_text("id\tL\tL_func\tmodalities\nP1\t3\t0\tseq\n")
        analyze.main(["--overlap", "--pretrain", str(pre.parent / "noseq"), "--tasks", str(root)])


def test_overlap_audit_finds_every_planted_neighbour_and_rescores_without_them(planted, demo_run):
    import analyze
    import overlap
    if overlap.mmseqs() is None:
        pytest.skip("mmseqs not installed (apt-get install mmseqs2): the MMseqs2 part of the audit is not tested")
    pre, root, exact, close, clean = planted
    pred = demo_run[0] / "ec/predictions.npz"
    report = analyze.main(["--overlap", "--pretrain", str(pre), "--tasks", str(root), "--predictions", str(pred),
                           "--out", str(pre.parent / "ov")])
    ec = report["tasks"]["ec"]
    assert ec["identical"] == sorted(exact)
    assert ec[">=95"] == sorted(exact + close)                        # exactly the planted ones
    assert set(ec[">=95"]) <= set(ec[">=50"]) <= set(ec[">=30"])
    assert not set(ec[">=30"]) & set(clean)                           # the random sequences match nothing
    assert report["identical_pairs"] == {x: [f"X_{x}"] for x in sorted(exact)}
    rows = report["rescored"][0]["rows"]
    n = rows["all test chains"]["n"]
    assert rows["without identical"]["n"] == n - 3 and rows["without >=95"]["n"] == n - 5
    data = metrics.load_predictions(pred)
    keep = ~np.isin(data["test_ids"], exact + close)
    assert rows["without >=95"]["fmax"] == metrics.fmax(data["test_scores"][keep], data["test_labels"][keep])
    assert json.loads((pre.parent / "ov/overlap.json").read_text())["tasks"]["ec"][">=95"] == ec[">=95"]


def test_exclude_similar_to_leaves_out_the_planted_proteins(planted):
    import extract_features as ef
    import overlap
    if overlap.mmseqs() is None:
        pytest.skip("mmseqs not installed (apt-get install mmseqs2): --identity below 1 needs it")
    pre, root, exact, close, _ = planted
    seqs = overlap.read_sequences(pre)
    sets = {"paired": [ef.Protein(k, sequence=s) for k, s in seqs.items() if not k.startswith("R0")],
            "seqstr": [ef.Protein("NOSEQ")] + [ef.Protein(k, sequence=s) for k, s in seqs.items() if k.startswith("R0")]}
    table = ef.ProtDescribe("t.tsv", "id", [{"id": k, "sequence": s, "fields": {}} for k, s in seqs.items()])
    said = []
    sets2, table2, dropped = overlap.exclude_similar(sets, table, [root], 0.95, said.append)
    assert dropped == sorted([f"X_{x}" for x in exact] + [f"M_{x}" for x in close])
    assert not sets2["paired"] and len(sets2["seqstr"]) == 41 and len(table2.rows) == len(seqs) - 5
    assert "5 of 45 proteins" in said[0] and "1 proteins without a known sequence" in said[0]
    _, _, only_exact = overlap.exclude_similar(sets, table, [root], 1.0, said.append)
    assert only_exact == sorted(f"X_{x}" for x in exact)


def test_extract_pick_excludes_proteins_identical_to_test_chains(tmp_path):
    """extract_features.py --pick ... --exclude-similar-to SET --identity 1.0 (no MMseqs2 needed): the two
    accessions whose sequence is a test chain's are never picked; their ids are recorded."""
    import extract_features as ef
    import replicas
    accs = [f"P{10000 + k}" for k in range(8)]
    seqs = {a: replicas.random_sequence(16 + k, 300 + k) for k, a in enumerate(accs)}
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "manifest.tsv").write_text("id\tL\tL_func\tmodalities\tsequence\n" + "".join(
        f"T{k}\t{len(seqs[a])}\t0\tseq\t{seqs[a]}\n" for k, a in enumerate(accs[:2])))
    (bench / "labels_ec.json").write_text(json.dumps({"splits": {"train": [], "valid": [], "test": ["T0", "T1"]}}))
    af = replicas.write_alphafold_dir(tmp_path / "af", seqs)
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(replicas.protdescribe_rows(seqs)))
    out = tmp_path / "pretrain"
    rc = ef.main(["--af-dir", str(af), "--protdescribe", str(tmp_path / "pd.tsv"), "--pick", "8", "0", "0",
                  "--exclude-similar-to", str(bench), "--identity", "1.0", "--modality", "seq", "--encoders", "tiny",
                  "--out", str(out)])
    assert rc == 0
    assert sorted(r["id"] for r in cache.read_manifest(out)) == accs[2:]
    assert json.loads((out / "excluded_similar.json").read_text())["excluded"] == accs[:2]
    rc = ef.main(["--af-dir", str(af), "--protdescribe", str(tmp_path / "pd.tsv"), "--pick", "8", "0", "0",
                  "--exclude-similar-to", str(tmp_path / "nothing"), "--modality", "seq", "--encoders", "tiny",
                  "--out", str(tmp_path / "p2")])
    assert rc == 2                                                    # one line, the kit's "could not start"
