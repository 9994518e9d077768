"""Tests of demo.py: the built-in synthetic corpus, its feature cache and its raw files.

    .venv/bin/python -m pytest -q tests/test_demo.py
"""
import contextlib
import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402

MODALITIES = ("seq", "str", "func")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors only here: one intra-op thread is faster, much so on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus():
    return demo.make_corpus()


@pytest.fixture(scope="module")
def feature_set(tmp_path_factory):
    """The default demo set, written the way amma.py --pretrain gets it; (root, printed line)."""
    root = tmp_path_factory.mktemp("features") / "demo"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert demo.ensure_demo_features(root) == root
    return root, out.getvalue()


def read_manifest(root):
    with open(root / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load(path):
    return torch.load(path, weights_only=True)


def same_corpus(a, b):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys() or not torch.equal(x["ca"], y["ca"]):
            return False
        if any(x[key] != y[key] for key in x if key != "ca"):
            return False
    return True


# ----------------------------------------------------------------------------- determinism

def test_corpus_is_deterministic_per_seed():
    a = demo.make_corpus(48, seed=3)
    demo._families.cache_clear()                   # rebuild the families too, not only members
    b, c = demo.make_corpus(48, seed=3), demo.make_corpus(48, seed=4)
    assert same_corpus(a, b)
    assert not same_corpus(a, c)
    assert [e["sequence"] for e in a] != [e["sequence"] for e in c]


def test_feature_files_are_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        demo.write_synthetic_features(tmp_path / name, n=24, seed=seed)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for name in ["manifest.tsv", "info.json"] + [f"labels_{t}.json" for t in demo.TASKS]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "manifest.tsv").read_bytes() != (c / "manifest.tsv").read_bytes()
    for row in read_manifest(a):
        for m in MODALITIES:
            assert torch.equal(load(a / m / f"{row['id']}.pt"), load(b / m / f"{row['id']}.pt"))
    first = read_manifest(a)[0]["id"]
    assert not torch.equal(load(a / "seq" / f"{first}.pt")[:5], load(c / "seq" / f"{first}.pt")[:5])


# ----------------------------------------------------------------------------- corpus

def test_corpus_entries(corpus):
    assert len(corpus) == 240
    assert [e["id"] for e in corpus] == [f"DEMO{i:04d}-A" for i in range(240)]
    assert sorted({e["family"] for e in corpus}) == list(range(8))
    splits = [e["split"] for e in corpus]
    assert 0.6 < splits.count("train") / 240 < 0.8
    assert splits.count("valid") > 20 and splits.count("test") > 20
    for split in ("train", "valid", "test"):      # every family in every split
        assert len({e["family"] for e in corpus if e["split"] == split}) == 8
    ec = re.compile(r"^\d+\.\d+\.\d+\.(\d+|-)$")
    go = re.compile(r"^GO:\d{7}$")
    for e in corpus:
        L = len(e["sequence"])
        assert 30 <= L <= 170 and set(e["sequence"]) <= set(demo.AA)
        assert e["ca"].shape == (L, 3) and e["ca"].dtype == torch.float32
        assert len(e["positions"]) == L and all(0 <= r < L for r in e["active_site"])
        assert e["fields"].keys() == set(demo.TEXT_FIELDS) and e["fields"]["ProteinName"]
        assert e["ec"] and all(ec.match(t) for t in e["ec"])
        for task in ("go-mf", "go-cc", "go-bp"):
            assert e[task] and all(go.match(t) for t in e[task])
            assert set(e[task]) <= set(demo.task_terms(task))
        assert (e["test_identity"] is None) == (e["split"] != "test")
    # some fields missing, some label noise, some identity cutoffs at 0, "95" always kept
    assert any(not e["fields"]["SubcellularLocation"] for e in corpus)
    assert len({e["fields"]["ProteinName"] for e in corpus}) > 30
    test = [e["test_identity"] for e in corpus if e["split"] == "test"]
    assert all(t["95"] == 1 for t in test) and 0 < sum(t["30"] == 0 for t in test) < len(test) / 2
    for t in test:                                   # kept at a cutoff -> kept at higher ones
        assert [t[c] for c in demo.CUTOFFS] == sorted(t[c] for c in demo.CUTOFFS)


def test_c_alpha_traces_are_plausible_chains(corpus):
    for e in corpus:
        x = e["ca"].double()
        L = len(x)
        bond = (x[1:] - x[:-1]).norm(dim=1)
        assert (bond - 3.8).abs().max() < 1e-3, e["id"]
        d = torch.cdist(x, x)
        far = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=3)
        assert d[far].min() > 2.5, e["id"]                       # no clashes
        rg = (x - x.mean(0)).norm(dim=1).pow(2).mean().sqrt()
        assert rg < 1.5 * 2.2 * L ** 0.38, e["id"]               # compact (globular Rg ~ 2.2 L^0.38)
    # members of one family share the fold: matched residues lie close after superposition
    fam = [e for e in corpus if e["family"] == 0][:2]
    common = sorted(set(fam[0]["positions"]) & set(fam[1]["positions"]) - {-1})
    xa = fam[0]["ca"][[fam[0]["positions"].index(p) for p in common]].double()
    xb = fam[1]["ca"][[fam[1]["positions"].index(p) for p in common]].double()
    assert (xa - xb).norm(dim=1).mean() < 1.0


def test_text_tokens():
    fields = {"ProteinName": "Lysozyme C", "Function": "", "SubcellularLocation": "Secreted.",
              "Similarity": "Belongs to the glycosyl hydrolase 22 family."}
    tokens = [t for t, _, _ in demo.text_tokens(fields)]
    assert tokens == ["[CLS]", "lysozyme", "c", "[SEP]", "secreted", ".", "[SEP]", "belongs",
                      "to", "the", "glycosyl", "hydrolase", "22", "family", "."]


# ----------------------------------------------------------------------------- feature cache

def test_ensure_demo_features_writes_once_then_reuses(feature_set, capsys):
    root, printed = feature_set
    assert printed.count("\n") == 1 and "no real features found" in printed
    assert "synthetic" in printed and str(root) in printed
    assert demo.ensure_demo_features(str(root)) == root
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "using" in line and "synthetic" in line


def test_feature_cache_contract(feature_set, corpus):
    root, _ = feature_set
    info = json.loads((root / "info.json").read_text())
    assert info["synthetic"] is True and info["tiny"] is False
    assert info["dims"] == {"seq": 64, "str": 96, "func": 48}
    assert set(info["encoders"]) == set(MODALITIES)
    rows = read_manifest(root)
    assert list(rows[0])[:5] == ["id", "L", "L_func", "modalities", "sequence"]
    assert [r["id"] for r in rows] == [e["id"] for e in corpus]
    by_id = {e["id"]: e for e in corpus}
    for m in MODALITIES:
        assert {p.stem for p in (root / m).iterdir()} == set(by_id), m   # no stray tmp files
    stacked = {m: [] for m in MODALITIES}
    for r in rows:
        e = by_id[r["id"]]
        L, L_func = int(r["L"]), int(r["L_func"])
        assert r["sequence"] == e["sequence"] and L == len(e["sequence"])
        assert r["modalities"] == "seq,str,func"
        assert L_func == len(demo.text_tokens(e["fields"]))
        for m, rows_m in (("seq", L), ("str", L), ("func", L_func)):
            x = load(root / m / f"{r['id']}.pt")
            assert x.dtype == torch.float16 and x.shape == (rows_m, info["dims"][m]), (r["id"], m)
            assert torch.isfinite(x).all()
            stacked[m].append(x.float())
    for m in MODALITIES:
        std = torch.cat(stacked[m]).std(0)
        assert 0.8 < std.min() and std.max() < 1.2, m


def test_labels_files(feature_set):
    root, _ = feature_set
    ids = {r["id"] for r in read_manifest(root)}
    for task in demo.TASKS:
        lab = json.loads((root / f"labels_{task}.json").read_text())
        assert lab["task"] == task and lab["source"] == "demo"
        assert lab["terms"] == demo.task_terms(task) and len(set(lab["terms"])) == len(lab["terms"])
        assert set(lab["labels"]) == ids
        assert all(v and all(0 <= i < len(lab["terms"]) for i in v) for v in lab["labels"].values())
        splits = lab["splits"]
        assert all(splits[s] for s in ("train", "valid", "test"))
        assert sorted(sum(splits.values(), [])) == sorted(ids)              # disjoint, complete
        assert set(lab["test_identity"]) == set(splits["test"])
        kept = {c: [i for i in splits["test"] if lab["test_identity"][i][c] == 1]
                for c in demo.CUTOFFS}
        assert kept["95"] == splits["test"] and 0 < len(kept["30"]) < len(splits["test"])
        used = {i for v in lab["labels"].values() for i in v}
        assert len(used) > 0.8 * len(lab["terms"])


def _split_tensors(root, corpus, m, split):
    return [load(root / m / f"{e['id']}.pt").float() for e in corpus if (e["split"] == "train") == split]


def test_demo_is_learnable(feature_set, corpus):
    """A linear map seq -> str fitted on training proteins explains much of the held-out
    variance, and nearest-centroid on mean-pooled features finds the family."""
    root, _ = feature_set
    x = torch.cat(_split_tensors(root, corpus, "seq", True))               # (N_train, 64)
    y = torch.cat(_split_tensors(root, corpus, "str", True))               # (N_train, 96)
    w = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    xt = torch.cat(_split_tensors(root, corpus, "seq", False))
    yt = torch.cat(_split_tensors(root, corpus, "str", False))
    pred = torch.cat([xt, torch.ones(len(xt), 1)], 1) @ w
    r2 = 1 - ((pred - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum()
    assert r2 > 0.3, float(r2)
    fam_train = torch.tensor([e["family"] for e in corpus if e["split"] == "train"])
    fam_test = torch.tensor([e["family"] for e in corpus if e["split"] != "train"])
    for m in MODALITIES:
        mean_train = torch.stack([t.mean(0) for t in _split_tensors(root, corpus, m, True)])
        mean_test = torch.stack([t.mean(0) for t in _split_tensors(root, corpus, m, False)])
        centroids = torch.stack([mean_train[fam_train == k].mean(0) for k in range(8)])
        acc = (torch.cdist(mean_test, centroids).argmin(1) == fam_test).float().mean()
        assert acc > 0.8, (m, float(acc))                                   # chance: 0.125


# ----------------------------------------------------------------------------- raw files

def read_fasta(path):
    records, name = {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = ""
        else:
            records[name] += line.strip()
    return records


def read_deepfri_ec(path):
    """As torchdrug's EnzymeCommission.load_annotation reads nrPDB-EC_annot.tsv."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["### EC-numbers"] and rows[2] == ["### PDB-chain", "EC-numbers"]
    return rows[1], {pdb_id: target.split(",") for pdb_id, target in rows[3:]}


def read_deepfri_go(path):
    """As torchdrug's GeneOntology.load_annotation reads nrPDB-GO_annot.tsv (MF, BP, CC)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    branches = ("go-mf", "go-bp", "go-cc")
    terms = {b: rows[4 * i + 1] for i, b in enumerate(branches)}
    names = {b: rows[4 * i + 3] for i, b in enumerate(branches)}
    assert rows[0] == ["### GO-terms (molecular_function)"]
    assert rows[6] == ["### GO-names (biological_process)"]
    assert rows[12][0] == "### PDB-chain"
    labels = {r[0]: {b: r[i + 1].split(",") if r[i + 1] else [] for i, b in enumerate(branches)}
              for r in rows[13:]}
    return terms, names, labels


def test_write_corpus_round_trips(tmp_path):
    corpus = demo.make_corpus(60, seed=5)
    out = demo.write_corpus(tmp_path / "raw", corpus)
    assert out == tmp_path / "raw"
    by_id = {e["id"]: e for e in corpus}
    # FASTA
    assert read_fasta(out / "demo.fasta") == {e["id"]: e["sequence"] for e in corpus}
    # PDB: fixed columns, C-alpha only, one per residue, numbered from 1, chain A
    three = {v: k for k, v in demo.AA3.items()}
    for e in corpus:
        atoms = [l for l in (out / "pdb" / f"{e['id']}.pdb").read_text().splitlines()
                 if l.startswith(("ATOM", "HETATM"))]
        assert len(atoms) == len(e["sequence"])
        xyz = []
        for i, line in enumerate(atoms):
            assert len(line) == 80 and line[:6] == "ATOM  " and int(line[6:11]) == i + 1
            assert line[12:16] == " CA " and line[16] == " " and line[21] == "A"
            assert three[line[17:20]] == e["sequence"][i] and int(line[22:26]) == i + 1
            assert line[26] == " " and line[76:78] == " C"
            assert float(line[54:60]) == 1.0
            xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        assert (torch.tensor(xyz) - e["ca"]).abs().max() < 1e-3
    # ProtDescribe TSV
    with open(out / "protdescribe.tsv", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert reader.fieldnames == ["Entry", "Sequence", *demo.TEXT_FIELDS]
        rows = list(reader)
    assert [r["Entry"] for r in rows] == list(by_id)
    for r in rows:
        e = by_id[r["Entry"]]
        assert r["Sequence"] == e["sequence"] and all(r[f] == e["fields"][f] for f in demo.TEXT_FIELDS)
    # DeepFRI files
    assert b"\r\n" in (out / "demo-EC_annot.tsv").read_bytes()       # csv.writer line ends, as DeepFRI
    terms, ec = read_deepfri_ec(out / "demo-EC_annot.tsv")
    assert terms == demo.task_terms("ec") and ec == {e["id"]: e["ec"] for e in corpus}
    terms, names, go = read_deepfri_go(out / "demo-GO_annot.tsv")
    for task in ("go-mf", "go-bp", "go-cc"):
        assert terms[task] == demo.task_terms(task)
        assert names[task] == [demo.GO_NAMES[t] for t in terms[task]]
        assert {i: v[task] for i, v in go.items()} == {e["id"]: e[task] for e in corpus}
    for prefix in ("demo-EC", "demo-GO"):
        for split in ("train", "valid", "test"):
            listed = (out / f"{prefix}_{split}.txt").read_text().split()
            assert listed == [e["id"] for e in corpus if e["split"] == split]
        with open(out / f"{prefix}_test.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["PDB-chain", "<30%", "<40%", "<50%", "<70%", "<95%"]
        assert {r[0]: dict(zip(demo.CUTOFFS, map(int, r[1:]))) for r in rows[1:]} == {
            e["id"]: e["test_identity"] for e in corpus if e["split"] == "test"}
        test_fasta = (out / f"{prefix}_test_sequences.fasta").read_text()
        assert test_fasta.splitlines()[0].endswith(" nrPDB_test")
        assert read_fasta(out / f"{prefix}_test_sequences.fasta") == {
            e["id"]: e["sequence"] for e in corpus if e["split"] == "test"}


# ----------------------------------------------------------------------------- CLI

def test_main_writes_features_and_raw_corpus(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "f"), "--n", "24", "--seed", "2"]) == 0
    assert len(read_manifest(tmp_path / "f")) == 24
    assert "synthetic" in capsys.readouterr().out
    assert demo.main(["--out", str(tmp_path / "r"), "--raw", "--n", "24"]) == 0
    assert len(list((tmp_path / "r" / "pdb").glob("*.pdb"))) == 24
    assert (tmp_path / "r" / "demo-GO_annot.tsv").exists()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--raw" in capsys.readouterr().out
