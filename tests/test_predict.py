"""predict.py and embed.py on the demo's tiny encoders: raw files give the scores finetuning computed,
embeddings from raw files equal those from the feature set, sequence-only finetuning and prediction,
bad files named with exit 3, the validation-Fmax threshold against metrics.fmax. CPU, offline, small."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import amma
import cache
import embed
import extract_features as ef
import finetune as ft
import predict as pr
from metrics import fmax

N_DEMO = 96                                   # demo proteins: 8 families, 14 GO test proteins
TINY = dict(D=32, n_layers=1, n_heads=2, dec_layers=1, M=24)
FAST = ("--epochs", "3", "--num-workers", "0", "--batch-size", "8", "--lr", "1e-3", "--lr-head", "1e-2",
        "--eval-batch-size", "64")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's raw files and their tiny-encoder feature set, a tiny pretraining on it, and a seq+str
    GO-MF finetuning from it."""
    tmp = tmp_path_factory.mktemp("predict")
    assert ef.main(["--source", "demo", "--encoders", "tiny", "--demo-n", str(N_DEMO), "--data-dir", str(tmp / "data"),
                    "--out", str(tmp / "f")]) == 0
    dims = cache.feature_dims(tmp / "f")
    mc = amma.AMMAConfig(**{f"d_{m}": d for m, d in dims.items()}, **TINY)
    tc = amma.TrainConfig(features=str(tmp / "f"), out=str(tmp / "pre"), epochs=1, batch_size=8, num_workers=0)
    amma.pretrain(mc, tc, quiet=True)
    ckpt = tmp / "pre" / "checkpoint.pt"
    result = ft.main(["--task", "go-mf", "--features", str(tmp / "f"), "--ckpt", str(ckpt), "--out",
                      str(tmp / "ft"), *FAST])
    raw = tmp / "data" / "demo"
    return dict(tmp=tmp, features=tmp / "f", pre=ckpt, best=tmp / "ft" / "best.pt", result=result, raw=raw,
                test_fasta=raw / "demo-GO_test_sequences.fasta", pdb=raw / "pdb")


def read_json(path):
    return json.loads(Path(path).read_text())


def test_fmax_threshold_matches_metrics():
    """fmax_threshold's F equals metrics.fmax (ties, proteins without labels, integer-valued scores), and
    predicting the terms scoring >= its threshold gives that F."""
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        pred = torch.randn(30, 12, generator=g)
        if trial % 2:
            pred = (pred * 2).round()                                           # many ties
        target = torch.rand(30, 12, generator=g) < 0.25
        target[:3] = False                                                     # proteins without a label
        t, f = ft.fmax_threshold(pred, target)
        assert f == pytest.approx(fmax(pred, target), abs=1e-9)
        hit, n = (pred >= t) & target, (pred >= t).sum(1)
        precision = (hit.sum(1)[n > 0] / n[n > 0]).mean()
        recall = (hit.sum(1) / (target.sum(1) + 1e-10)).mean()
        assert (2 * precision * recall / (precision + recall + 1e-10)).item() == pytest.approx(f, abs=1e-6)


def test_predict_reproduces_finetuning_scores(demo, capsys):
    """predict.py on the demo's raw test FASTA + structures: the scores finetuning's evaluation computes
    for the test proteins from the feature set (same model), to 1e-5; passes = logit >= the stored
    threshold, whose F is the validation Fmax of the selected epoch."""
    ck = torch.load(demo["best"], weights_only=True)
    assert ck["valid_fmax"] == pytest.approx(demo["result"]["valid"]["fmax"], abs=1e-9)
    assert ck["modalities"] == ["seq", "str"] and ck["info"]["tiny"]
    model, ck = pr.load_finetuned(demo["best"], torch.device("cpu"))
    cfg = ft.FinetuneConfig(**ck["config"])
    data, sets, _, _ = ft.load_task(cfg)
    logits = ft.predict(model, sets["test"], cfg, torch.device("cpu"))        # finetuning's evaluation
    expected = dict(zip(sets["test"].ids, torch.sigmoid(logits).tolist()))

    out = demo["tmp"] / "pred"
    rc = pr.main([str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]), "--out",
                  str(out), "--min-score", "0"])
    assert rc == 0
    got = read_json(out / "predictions.json")
    assert [p["id"] for p in got["proteins"]] == sets["test"].ids and not got["failed"]
    for p in got["proteins"]:
        assert p["input"] == "seq+str" and len(p["predictions"]) == len(data["terms"])
        score = {r["term"]: r["score"] for r in p["predictions"]}
        assert np.allclose([score[t] for t in data["terms"]], expected[p["id"]], rtol=0, atol=1e-5)
        for r in p["predictions"]:
            logit = logits[sets["test"].ids.index(p["id"]), data["terms"].index(r["term"])]
            assert r["passes"] == bool(logit >= ck["threshold"])
    tsv = (out / "predictions.tsv").read_text().splitlines()
    assert tsv[0] == "id\tterm\tscore\tpasses\tname\tnamespace\tinput"
    assert len(tsv) == 1 + len(got["proteins"]) * len(data["terms"])

    # the default cut lists the passing terms only; --top-k 2 the two best, whatever they score
    assert pr.main([str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]), "--out",
                    str(out), "--top-k", "2"]) == 0
    top = read_json(out / "predictions.json")["proteins"]
    assert all(len(p["predictions"]) == 2 and p["predictions"][0]["score"] >= p["predictions"][1]["score"] for p in top)
    assert pr.main([str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]), "--out",
                    str(out)]) == 0
    default = read_json(out / "predictions.json")["proteins"]
    assert all(r["passes"] for p in default for r in p["predictions"])
    n_passing = sum(r["passes"] for p in got["proteins"] for r in p["predictions"])
    assert sum(len(p["predictions"]) for p in default) == n_passing
    assert "skipped 14 (up to date)" in capsys.readouterr().out   # later runs reuse <out>/features


def test_embeddings_from_feature_set_equal_raw_files(demo):
    """embed.py on the feature set's test proteins and on the raw files they came from: the same rows,
    for a finetuned best.pt and for the pretraining checkpoint; the sidecar states readout and modalities."""
    ids = [line.split()[0][1:] for line in demo["test_fasta"].read_text().splitlines() if line.startswith(">")]
    (demo["tmp"] / "ids.txt").write_text("\n".join(ids) + "\n")
    for name, ckpt in (("best", demo["best"]), ("pre", demo["pre"])):
        a, b = demo["tmp"] / f"emb-{name}-feat", demo["tmp"] / f"emb-{name}-raw"
        assert embed.main([str(ckpt), "--features", str(demo["features"]), "--ids", str(demo["tmp"] / "ids.txt"),
                           "--out", str(a)]) == 0
        assert embed.main([str(ckpt), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]),
                           "--out", str(b)]) == 0
        assert (a / "ids.txt").read_text().split() == (b / "ids.txt").read_text().split() == ids
        for readout in ("cls", "mean"):
            x, y = np.load(a / f"{readout}.npy"), np.load(b / f"{readout}.npy")
            assert x.shape == (len(ids), TINY["D"]) and x.dtype == np.float32
            assert np.allclose(x, y, rtol=0, atol=1e-5)
        assert not np.allclose(np.load(a / "cls.npy"), np.load(a / "mean.npy"))
        side = read_json(b / "embeddings.json")
        assert side["modalities"] == ["seq", "str"] and set(side["files"]) == {"cls.npy", "mean.npy"}
        assert "[CLS]" in side["files"]["cls.npy"] and "sequence tokens" in side["files"]["mean.npy"]


def test_seq_only_finetune_and_prediction_without_structures(demo):
    """finetune.py --modalities seq beats the label-frequency baseline and reads no structure file;
    predict.py on its model needs only the FASTA."""
    broken = demo["tmp"] / "f-seq"                    # the feature set without its str files: not read
    shutil.copytree(demo["features"], broken, ignore=shutil.ignore_patterns("str"))
    result = ft.main(["--task", "go-mf", "--features", str(broken), "--ckpt", str(demo["pre"]), "--out",
                      str(demo["tmp"] / "ft-seq"), "--modalities", "seq", *FAST])
    assert result["modalities"] == "seq"
    assert result["test"]["fmax"] > result["baseline"]["test"]["fmax"] + 0.02
    best = demo["tmp"] / "ft-seq" / "best.pt"
    out = demo["tmp"] / "pred-seq"
    assert pr.main([str(best), "--fasta", str(demo["test_fasta"]), "--out", str(out)]) == 0
    got = read_json(out / "predictions.json")
    assert len(got["proteins"]) == result["n_proteins"]["test"] and {p["input"] for p in got["proteins"]} == {"seq"}
    assert not (out / "features" / "str").exists()
    # embeddings from sequence alone: --modalities seq, or a seq+str encoder with --allow-seq-only
    emb = demo["tmp"] / "emb-seq"
    fasta = ["--fasta", str(demo["test_fasta"]), "--out", str(emb)]
    assert embed.main([str(demo["pre"]), *fasta, "--modalities", "seq"]) == 0
    assert read_json(emb / "embeddings.json")["modalities"] == ["seq"]
    assert embed.main([str(demo["pre"]), *fasta]) == 2
    assert embed.main([str(demo["pre"]), *fasta, "--allow-seq-only"]) == 0
    side = read_json(emb / "embeddings.json")
    assert side["modalities"] == ["seq", "str"] and len(side["seq_only"]) == side["proteins"] == len(got["proteins"])


def test_missing_structures_stop_or_allow_seq_only(demo, capsys):
    """A seq+str model on a FASTA whose proteins partly lack a structure: those are named and left out
    (exit 3); --allow-seq-only predicts them from sequence and marks them; no structure at all: exit 2."""
    pdb = demo["tmp"] / "some-pdb"
    pdb.mkdir()
    ids = [line.split()[0][1:] for line in demo["test_fasta"].read_text().splitlines() if line.startswith(">")]
    for pid in ids[:5]:
        shutil.copy(demo["pdb"] / f"{pid}.pdb", pdb)
    out = demo["tmp"] / "pred-missing"
    args = [str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(pdb), "--out", str(out)]
    assert pr.main(args) == 3
    got, err = read_json(out / "predictions.json"), capsys.readouterr().err
    assert [p["id"] for p in got["proteins"]] == ids[:5] and sorted(got["failed"]) == sorted(ids[5:])
    assert f"error: {ids[5]}: no structure, and the model uses seq+str" in err and "--allow-seq-only" in err
    assert pr.main(args + ["--allow-seq-only"]) == 0
    got = read_json(out / "predictions.json")
    assert [p["input"] for p in got["proteins"]] == ["seq+str"] * 5 + ["seq"] * (len(ids) - 5)
    assert got["seq_only"] == ids[5:]
    assert pr.main([str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--out", str(out)]) == 2
    assert "no protein could be predicted" in capsys.readouterr().err


RNA = "".join(f"ATOM  {k + 1:5d}  P     {b} R{k + 1:4d}    {3.0 * k:8.3f}{0.0:8.3f}{0.0:8.3f}  1.00  0.00           P\n"
              for k, b in enumerate("AUGC"))


def test_mixed_folder_predicts_good_files_names_bad_ones(demo, capsys):
    """--pdb-dir with plain and gzipped PDB files, an AlphaFold-named one, a corrupt .gz and an RNA chain:
    the good ones predicted, the two bad ones named with their reason, exit 3."""
    mixed = demo["tmp"] / "mixed"
    mixed.mkdir()
    good = sorted(demo["pdb"].iterdir())[:3]
    shutil.copy(good[0], mixed)
    (mixed / f"{good[1].stem}.pdb.gz").write_bytes(gzip.compress(good[1].read_bytes()))
    (mixed / "AF-P12345-F1-model_v4.pdb.gz").write_bytes(gzip.compress(good[2].read_bytes()))
    (mixed / "corrupt.pdb.gz").write_bytes(b"\x1f\x8b not really gzip")
    (mixed / "rna.pdb").write_text(RNA + "END\n")
    out = demo["tmp"] / "pred-mixed"
    assert pr.main([str(demo["best"]), "--pdb-dir", str(mixed), "--out", str(out)]) == 3
    got, err = read_json(out / "predictions.json"), capsys.readouterr().err
    assert sorted(p["id"] for p in got["proteins"]) == sorted([good[0].stem, good[1].stem, "AF-P12345-F1-model_v4"])
    assert sorted(got["failed"]) == ["corrupt", "rna"]
    assert "no protein residue with a C-alpha atom" in got["failed"]["rna"]
    assert "unreadable structure" in got["failed"]["corrupt"]
    assert "error: corrupt:" in err and "error: rna:" in err


def test_term_names_and_bad_inputs(demo, capsys):
    """--go-obo names and namespaces (alt_id too), the enzyme.dat reader; a synthetic-demo checkpoint,
    a pretraining checkpoint, no input and a missing file: one line each, exit 2."""
    terms = torch.load(demo["best"], weights_only=True)["terms"]
    obo = demo["tmp"] / "mini.obo"
    obo.write_text("format-version: 1.2\n\n[Term]\nid: GO:0000001\nalt_id: " + terms[0] + "\nname: first thing\n"
                   "namespace: molecular_function\n\n[Term]\nid: " + terms[1] + "\nname: second thing ! c\n"
                   "namespace: molecular_function\n\n[Typedef]\nid: part_of\nname: part of\n")
    out = demo["tmp"] / "pred-names"
    assert pr.main([str(demo["best"]), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]),
                    "--out", str(out), "--min-score", "0", "--go-obo", str(obo)]) == 0
    rows = {r["term"]: r for r in read_json(out / "predictions.json")["proteins"][0]["predictions"]}
    assert rows[terms[0]]["name"] == "first thing" and rows[terms[1]]["name"] == "second thing"
    assert rows[terms[1]]["namespace"] == "molecular_function" and rows[terms[2]]["name"] == ""
    dat = demo["tmp"] / "enzyme.dat"
    dat.write_text("CC   header\n//\nID   1.1.1.1\nDE   Alcohol\nDE   dehydrogenase.\nCA   x\n//\nID   1.1.1.2\n"
                   "DE   Alcohol dehydrogenase (NADP(+)).\n//\n")
    assert pr.read_enzyme_dat(dat) == {"1.1.1.1": "Alcohol dehydrogenase", "1.1.1.2": "Alcohol dehydrogenase (NADP(+))"}

    synthetic = demo["tmp"] / "synthetic.pt"
    ck = torch.load(demo["best"], weights_only=True)
    torch.save({**ck, "info": {**ck["info"], "synthetic": True, "tiny": False}}, synthetic)
    cases = {str(synthetic): "synthetic features", str(demo["pre"]): "is a pretrain checkpoint",
             str(demo["tmp"] / "nope.pt"): "no such file"}
    for path, message in cases.items():
        assert pr.main([path, "--fasta", str(demo["test_fasta"]), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert pr.main([str(demo["best"]), "--out", str(out)]) == 2
    assert "give --fasta FILE and/or --pdb-dir DIR" in capsys.readouterr().err
    assert pr.main([str(demo["best"]), "--fasta", str(demo["tmp"] / "none.fasta"), "--out", str(out)]) == 2
    assert "none.fasta" in capsys.readouterr().err


def test_predict_with_esm_finetuned_in_the_loop(demo):
    """A best.pt with ESM finetuned in the loop (the paper's protocol; here the tiny ESM-2): predict.py
    rebuilds ESM from the checkpoint, extracts only the structures, and gives finetuning's test scores."""
    out = demo["tmp"] / "ft-loop"
    ft.main(["--task", "go-mf", "--features", str(demo["features"]), "--ckpt", str(demo["pre"]), "--out", str(out),
             *FAST, "--epochs", "1", "--limit-steps", "2", "--esm", "finetune"])
    model, ck = pr.load_finetuned(out / "best.pt", torch.device("cpu"))
    assert ck["config"]["esm"] == "finetune" and model.esm is not None
    cfg = ft.FinetuneConfig(**ck["config"])
    _, sets, _, _ = ft.load_task(cfg)
    expected = torch.sigmoid(ft.predict(model, sets["test"], cfg, torch.device("cpu")))
    pred = demo["tmp"] / "pred-loop"
    assert pr.main([str(out / "best.pt"), "--fasta", str(demo["test_fasta"]), "--pdb-dir", str(demo["pdb"]),
                    "--out", str(pred), "--min-score", "0"]) == 0
    got = read_json(pred / "predictions.json")["proteins"]
    assert [p["id"] for p in got] == sets["test"].ids and not (pred / "features" / "seq").exists()
    for p, row in zip(got, expected):
        score = {r["term"]: r["score"] for r in p["predictions"]}
        assert np.allclose([score[t] for t in ck["terms"]], row.tolist(), rtol=0, atol=1e-5)
