"""extract_features.py: encoders' rows, cropping, text joining, resume/shards, readers, sources.

Everything runs offline on CPU with the tiny encoders and a handful of small proteins."""
import gzip
import io
import json
import os
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

import amma
import extract_features as ef
import gearnet
from conftest import need_shared

THREE = dict(zip(gearnet.RESIDUE_LETTERS, gearnet.RESIDUES))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while this file runs: on a few shared cores OpenMP's waiting threads make
    the many small ops of the tiny encoders up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_ca_pdb(path, seq, drop_ca=()):
    """A C-alpha-only PDB of seq on a helix (3.8 A steps); residues in drop_ca get an N atom only."""
    lines = []
    for i, aa in enumerate(seq):
        t = torch.tensor(i * 100.0 * 3.14159265 / 180)
        x, y, z = 2.3 * torch.cos(t).item(), 2.3 * torch.sin(t).item(), 1.5 * i
        atom = " N  " if i in drop_ca else " CA "
        lines.append(f"ATOM  {i + 1:5d} {atom} {THREE.get(aa, 'UNK')} A{i + 1:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           {atom.strip()[0]}")
    text = "\n".join(lines + ["END"]) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def run(args, tmp_path, name="f"):
    """main() with tiny encoders into tmp_path/name; returns (rc, out dir, summary dict)."""
    out = tmp_path / name
    rc = ef.main([*args, "--encoders", "tiny", "--out", str(out)])
    summary = out / "summary.json"
    return rc, out, json.loads(summary.read_text()) if summary.exists() else None


def load(path):
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- sequences

def test_check_sequence_letters():
    assert ef.check_sequence("ACDEFGHIKLMNPQRSTVWYXBZUO")  # fair-esm's ESM-1b alphabet has tokens for XBZUO
    import esm
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    assert all(alphabet.get_idx(c) != alphabet.unk_idx for c in "XBZUO")
    for bad, letter in [("MK*A", "'*' at position 3"), ("MK1A", "'1' at position 3"), ("mkA", "'m' at position 1")]:
        with pytest.raises(ef.InputError, match=letter):
            ef.check_sequence(bad)
    with pytest.raises(ef.InputError, match="empty"):
        ef.check_sequence("")


def test_esm_rows_crop_and_bad_letters(tmp_path):
    long = ("ACDEFGHIKLMNPQRSTVWY" * 60)[:1100]
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">short\nMKXBZUOAC\n>long\n{long}\n>star\nMK*AC\n>digit\nMK1AC\n>empty\n\n")
    rc, out, s = run(["--source", "fasta", "--fasta", str(fasta), "--modality", "seq"], tmp_path)
    assert rc == 0 and s["done"] == 2
    assert set(s["failed"]) == {"star", "digit", "empty"}
    assert "'*'" in s["failed"]["star"] and "'1'" in s["failed"]["digit"] and "\n" not in s["failed"]["star"]

    short = load(out / "seq" / "short.pt")
    assert short.dtype == torch.float16 and short.shape == (9, 64)        # one row per residue
    enc = ef.load_encoder("seq", ef.ExtractConfig(encoders="tiny"), torch.device("cpu"))
    _, _, tokens = enc.batch_converter([("short", "MKXBZUOAC")])            # <cls> 9 residues <eos>
    with torch.no_grad():
        full = enc.model(tokens, repr_layers=[6])["representations"][6][0]  # (11, 64)
    assert torch.allclose(short.float(), full[1:10], atol=1e-2)            # BOS and EOS dropped
    assert not torch.allclose(short.float(), full[0:9], atol=1e-2)

    assert load(out / "seq" / "long.pt").shape == (1022, 64)               # cropped to the first 1022
    rows = {r["id"]: r for r in amma.read_manifest(out)}
    assert rows["long"]["L"] == 1022 and rows["long"]["L_full"] == "1100"
    assert rows["long"]["sequence"] == long[:1022]
    info = json.loads((out / "info.json").read_text())
    assert info["tiny"] is True and info["encoders"]["seq"].startswith("tiny:") and info["dims"] == {"seq": 64}


def test_crop_applies_to_structure_and_sliding(tmp_path):
    seq = ("ACDEFGHIKLMNPQRSTVWY" * 60)[:1100]
    pdb = write_ca_pdb(tmp_path / "long.pdb", seq)
    p = ef.prepare(ef.Protein("long", structure=pdb), ef.ExtractConfig(), ("seq", "str"))
    assert p.seq == seq[:1022] and p.L_full == 1100 and p.modalities == ("seq", "str")
    assert p.graph_input["ca"].shape == (1022, 3) and len(p.graph_input["residue_type"]) == 1022
    p = ef.prepare(ef.Protein("long", structure=pdb), ef.ExtractConfig(long="sliding"), ("seq", "str"))
    assert p.seq == seq and p.graph_input["ca"].shape == (1100, 3)
    assert ef.windows(1100, 1022) == [(0, 1022), (78, 1100)]
    covered = torch.zeros(3000)
    for a, b in ef.windows(3000, 1022):
        covered[a:b] += 1
    assert covered.min() >= 1 and max(b - a for a, b in ef.windows(3000, 1022)) == 1022


def test_token_batches_budget():
    lengths = [5, 300, 40, 41, 1000, 7]
    batches = ef.token_batches(lengths, 100, extra=2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] + 2 for i in b) * len(b) <= 100
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)                                            # sorted by length


# ----------------------------------------------------------------------------- structures

def test_sequence_vs_structure(tmp_path):
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    write_ca_pdb(tmp_path / "pdb" / "gap.pdb", seq, drop_ca={3, 4})       # two residues without CA
    write_ca_pdb(tmp_path / "pdb" / "sub.pdb.gz", seq)
    write_ca_pdb(tmp_path / "pdb" / "noca.pdb", seq, drop_ca=set(range(len(seq))))
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">gap\n{seq}\n>sub\n{seq[:10]}W{seq[11:]}\n>noca\n{seq}\n>nostruct\n{seq}\n")
    args = ["--source", "fasta", "--fasta", str(fasta), "--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq", "str"]
    rc, out, s = run(args, tmp_path)
    assert rc == 0 and set(s["failed"]) == {"sub", "noca"}
    assert "mismatch" in s["failed"]["sub"] and "noca.pdb" in s["failed"]["noca"]
    rows = {r["id"]: r for r in amma.read_manifest(out)}
    assert rows["gap"]["sequence"] == seq[:3] + seq[5:] and rows["gap"]["L"] == len(seq) - 2  # CA-less dropped
    assert load(out / "seq" / "gap.pt").shape[0] == load(out / "str" / "gap.pt").shape[0] == len(seq) - 2
    assert rows["nostruct"]["modalities"] == ("seq",) and rows["gap"]["modalities"] == ("seq", "str")
    rc, out, s = run(args + ["--on-mismatch", "structure"], tmp_path)
    assert set(s["failed"]) == {"noca"} and s["skipped"] == 2 and s["done"] == 1


def test_pdb_dir_shared(tmp_path, capsys):
    shared = need_shared("data", "pdb")
    pdb = tmp_path / "pdb"
    pdb.mkdir()
    for f in sorted(shared.glob("*.pdb")):
        (pdb / f.name).symlink_to(f)
    lines = (shared / "1AKI-A.pdb").read_text().splitlines()
    (pdb / "noca.pdb").write_text("\n".join(x for x in lines if x[12:16] != " CA ") + "\n")
    rc, out, s = run(["--source", "pdb-dir", "--pdb-dir", str(pdb), "--modality", "seq", "str"], tmp_path)
    err = capsys.readouterr().err
    assert rc == 0 and list(s["failed"]) == ["noca"] and "noca.pdb" in s["failed"]["noca"]
    assert [x for x in err.splitlines() if "noca" in x and x.startswith("error")]   # a one-line error
    rows = amma.read_manifest(out)
    assert sorted(r["id"] for r in rows) == sorted(f.stem for f in shared.glob("*.pdb"))
    for r in rows:
        seq, st = load(out / "seq" / f"{r['id']}.pt"), load(out / "str" / f"{r['id']}.pt")
        n_ca = len(gearnet.read_structure(shared / f"{r['id']}.pdb")["sequence"])
        assert seq.shape[0] == st.shape[0] == r["L"] == n_ca
        assert st.shape[1] == 192 and seq.dtype == st.dtype == torch.float16


def test_gearnet_checkpoint_prefixes(tmp_path):
    model = gearnet.tiny_gearnet(seed=1)
    sd = model.state_dict()
    solver = {"model": {**{"model." + k: v for k, v in sd.items()}, "mlp.layers.0.weight": torch.zeros(3, 192)},
              "optimizer": {}}
    torch.save(solver, tmp_path / "solver.pth")
    stripped = ef.gearnet_state_dict(tmp_path / "solver.pth")
    assert stripped.keys() == sd.keys()
    rebuilt = gearnet.GearNetEdge.from_state_dict(stripped)
    assert rebuilt.config.hidden_dims == (32,) * 6
    torch.save(sd, tmp_path / "plain.pth")
    assert ef.gearnet_state_dict(tmp_path / "plain.pth").keys() == sd.keys()


def test_real_gearnet_checkpoint_matches_torchdrug(tmp_path):
    """--encoders real --gearnet-ckpt with a torchdrug solver checkpoint of the golden GearNet-Edge
    ([64] * 6): the str features are torchdrug's node features (float16)."""
    golden = torch.load(need_shared("golden", "gearnet_torchdrug.pt"), weights_only=True)
    shared = need_shared("data", "pdb")
    cases = sorted(golden["cases"], key=lambda c: c["num_residue"])[:3]
    (tmp_path / "pdb").mkdir()
    for case in cases:
        (tmp_path / "pdb" / case["file"]).symlink_to(shared / case["file"])
    torch.save({"model": {"model." + k: v for k, v in golden["state_dict"].items()}}, tmp_path / "solver.pth")
    out = tmp_path / "f"
    assert ef.main(["--source", "pdb-dir", "--pdb-dir", str(tmp_path / "pdb"), "--modality", "str",
                    "--gearnet-ckpt", str(tmp_path / "solver.pth"), "--out", str(out)]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["tiny"] is False and info["encoders"] == {"str": "gearnet_edge:solver.pth"}
    assert info["dims"] == {"str": 384}
    for case in cases:
        ours = load(out / "str" / f"{Path(case['file']).stem}.pt")
        torch.testing.assert_close(ours.float(), case["node_feature"].half().float(), atol=2e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- text

def test_text_joining():
    cls, sep = 101, 102

    def encode(text):  # one id per word: its length
        return [len(w) for w in text.split()]
    fields = {"Similarity": "aaaa", "Function": "", "ProteinName": "a bb", "SubcellularLocation": "ccc"}
    assert ef.build_text_ids(fields, encode, cls, sep) == [cls, 1, 2, sep, 3, sep, 4]   # order; empty left out
    assert ef.build_text_ids({"Function": "x"}, encode, cls, sep) == [cls, 1]            # one field: no [SEP]
    long = " ".join(["a"] * 200)
    ids = ef.build_text_ids({"ProteinName": long}, encode, cls, sep)
    assert len(ids) == 1 + 128                                                           # 128 per field
    ids = ef.build_text_ids(dict.fromkeys(ef.TEXT_FIELDS, long), encode, cls, sep)
    assert len(ids) == 512 and ids.count(sep) == 3 and ids[0] == cls                   # 512 in all
    last = len(ids) - 1 - ids[::-1].index(sep)
    assert len(ids) - last - 1 == 512 - (1 + 3 * 128 + 3)                               # last field trimmed
    with pytest.raises(ef.InputError, match="no text"):
        ef.build_text_ids({"ProteinName": " ", "Function": ""}, encode, cls, sep)


def test_tiny_text_encoder_tokens():
    enc = ef.load_encoder("func", ef.ExtractConfig(encoders="tiny"), torch.device("cpu"))
    tok = enc.tokenizer
    ids = enc.ids({"ProteinName": "Protein kinase 2", "Function": "", "SubcellularLocation": "Cytoplasm.",
                   "Similarity": "Belongs to the kinase family."})
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2 and ids[-1] != tok.sep_token_id
    assert tok.unk_token_id not in ids and tok.pad_token_id not in ids
    assert tok.decode(ids[1:ids.index(tok.sep_token_id)]) == "protein kinase 2"
    short = ids[:5]
    batched, alone = enc([ids, short]), enc([short])
    assert batched[0].shape == (len(ids), 48) and batched[1].shape == (5, 48)
    assert torch.allclose(batched[1], alone[0], atol=1e-4)                  # padding in a batch changes nothing


# ----------------------------------------------------------------------------- resume and shards

def test_resume_skips_and_rewrites_truncated(tmp_path, monkeypatch, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMKVLAAGIVG\n>c\nMSTNPKPQRK\n")
    args = ["--source", "fasta", "--fasta", str(fasta), "--modality", "seq"]
    rc, out, s = run(args, tmp_path)
    assert s["done"] == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "seq").iterdir()}

    def no_encoder(*a, **k):
        raise AssertionError("the encoder was loaded although every file was finished")
    monkeypatch.setattr(ef, "load_encoder", no_encoder)
    rc, out, s = run(args, tmp_path)
    assert (s["done"], s["skipped"]) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "seq").iterdir()} == mtimes
    monkeypatch.undo()

    data = (out / "seq" / "b.pt").read_bytes()
    (out / "seq" / "b.pt").write_bytes(data[: len(data) // 2])
    rc, out, s = run(args, tmp_path)
    assert (s["done"], s["skipped"]) == (1, 2) and list(s["rewritten"]) == ["b"]
    assert "b" in capsys.readouterr().err
    assert load(out / "seq" / "b.pt").shape == (10, 64)
    assert (out / "seq" / "a.pt").stat().st_mtime_ns == mtimes["a.pt"]
    assert not list((out / "seq").glob(".*tmp"))                           # no temporary files left


def test_shards_cover_every_id_once(tmp_path):
    ids = [f"p{i:02d}" for i in range(11)]
    parts = [ef.shard_ids(ids, i, 3) for i in range(3)]
    assert sorted(x for p in parts for x in p) == ids and sum(map(len, parts)) == len(ids)

    fasta = tmp_path / "x.fasta"
    fasta.write_text("".join(f">{x}\nMKTAYIAK{'G' * i}\n" for i, x in enumerate(ids[:5])))
    for i in range(3):
        args = ["--source", "fasta", "--fasta", str(fasta), "--modality", "seq", "--shard", f"{i}/3"]
        rc, out, s = run(args, tmp_path)
        assert rc == 0 and (out / "manifest.tsv").exists() == (i == 2)      # the last shard merges
    per_shard = []
    for i in range(3):
        lines = (out / f"manifest.shard-{i}-of-3.tsv").read_text().splitlines()[1:]
        per_shard.append([x.split("\t")[0] for x in lines])
    assert sorted(x for p in per_shard for x in p) == ids[:5]
    assert sorted(r["id"] for r in amma.read_manifest(out)) == ids[:5]
    (out / "manifest.tsv").unlink()
    assert ef.main(["--out", str(out), "--merge"]) == 0 and len(amma.read_manifest(out)) == 5


def test_float16_overflow_fails_the_protein(tmp_path, monkeypatch, capsys):
    with pytest.raises(ef.InputError, match=r"max \|value\| 7e\+04"):
        ef.save_tensor(torch.tensor([[1.0, -7e4]]), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())                                     # nothing written
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">big\nMKTAYIAK\n>ok\nMKVLAAGI\n")
    real = ef.SeqEncoder.__call__

    def scaled(self, seqs):  # the protein with 'T' at position 3 gets values beyond float16
        return [r * 1e6 if s[2] == "T" else r for r, s in zip(real(self, seqs), seqs)]
    monkeypatch.setattr(ef.SeqEncoder, "__call__", scaled)
    rc, out, s = run(["--source", "fasta", "--fasta", str(fasta), "--modality", "seq"], tmp_path)
    assert rc == 0 and list(s["failed"]) == ["big"] and "max |value|" in s["failed"]["big"]
    assert [r["id"] for r in amma.read_manifest(out)] == ["ok"] and not (out / "seq" / "big.pt").exists()
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: big: seq: a value")]


def test_shard_info_covers_all_modalities_and_limit_keeps_manifest(tmp_path):
    """Shard 0 has only a protein with text, shard 1 only one without: info.json of the set has both
    modalities (also after --merge alone); a later --limit run does not shrink manifest.tsv."""
    (tmp_path / "pd.tsv").write_text("Entry\tSequence\tProteinName\tFunction\tSubcellularLocation\tSimilarity\n"
                                     "Q1\tMKTAYIAK\tName\t\t\t\nQ2\tMKVLAAGI\t\t\t\t\nQ3\tMSTNPKPQ\t\t\t\t\n")
    base = ["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--modality", "seq", "func"]
    for args in (["--shard", "1/2"], ["--shard", "0/2"]):                 # Q2 alone, then Q1 + Q3
        rc, out, _ = run(base + args, tmp_path)
        assert rc == 0
    info = json.loads((out / "info.json").read_text())
    assert info["dims"] == {"seq": 64, "func": 48} and set(info["encoders"]) == {"seq", "func"}
    assert info["tiny"] is True
    lost = {**info, "dims": {"seq": 64}, "encoders": {"seq": info["encoders"]["seq"]}}
    (out / "info.json").write_text(json.dumps(lost))
    assert ef.main(["--out", str(out), "--merge"]) == 0                   # a lost update is repaired
    assert json.loads((out / "info.json").read_text()) == info

    rc, out, s = run(base, tmp_path, name="g")
    assert rc == 0 and len(amma.read_manifest(out)) == 3
    (out / "seq" / "Q3.pt").write_bytes(b"junk")                            # no longer valid: its row goes
    rc, out, s = run(base + ["--limit", "1"], tmp_path, name="g")
    assert rc == 0 and s["proteins"] == 1
    assert [r["id"] for r in amma.read_manifest(out)] == ["Q1", "Q2"]
    assert json.loads((out / "info.json").read_text())["dims"] == {"seq": 64, "func": 48}


# ----------------------------------------------------------------------------- DeepFRI files

def test_deepfri_ec_files():
    root = need_shared("data", "deepfri")
    terms, labels = ef.read_deepfri_annot(root / "nrPDB-EC_2020.04_annot.tsv")
    assert list(terms) == ["ec"] and len(terms["ec"]) == 538
    ec = labels["ec"]
    # by hand: row "4PR3-A<TAB>3.2.2.9,3.2.2.-"; 3.2.2.9 is the 157th term of the header row, 3.2.2.- the 287th
    assert ec["4PR3-A"] == [156, 286] and terms["ec"][156] == "3.2.2.9" and terms["ec"][286] == "3.2.2.-"
    assert ec["2PVS-A"] == [503, 339] and [terms["ec"][i] for i in ec["2PVS-A"]] == ["3.1.1.-", "3.1.1.3"]
    sizes = {}
    for split in ("train", "valid", "test"):
        path = root / f"nrPDB-EC_2020.04_{split}.txt"
        ids = ef.read_split(path)
        assert len(ids) == len(path.read_text().split()) and all(x in ec for x in ids)
        sizes[split] = len(ids)
    print(f"DeepFRI EC split sizes from the files: {sizes} (paper Table 5: 15,035 / 1,665 / 1,840)")
    identity = ef.read_test_csv(root / "nrPDB-EC_2020.04_test.csv")
    assert set(identity) == set(ef.read_split(root / "nrPDB-EC_2020.04_test.txt"))
    kept = [sum(v[c] for v in identity.values()) for c in ("30", "40", "50", "70", "95")]
    assert kept == [720, 902, 1117, 1476, 1919]
    seqs = dict(ef.read_fasta(root / "nrPDB-EC_2020.04_test_sequences.fasta"))
    assert set(identity) <= set(seqs)


def test_deepfri_go_files(tmp_path):
    root = need_shared("data", "deepfri")
    sizes = {s: len(ef.read_split(root / f"nrPDB-GO_2019.06.18_{s}.txt")) for s in ("train", "valid", "test")}
    print(f"DeepFRI GO split sizes from the files: {sizes} (paper Table 5: 27,581 / 3,061 / 2,991)")
    assert sizes == {s: len((root / f"nrPDB-GO_2019.06.18_{s}.txt").read_text().split()) for s in sizes}
    identity = ef.read_test_csv(root / "nrPDB-GO_2019.06.18_test.csv")
    assert len(identity) == sizes["test"] and sum(v["95"] for v in identity.values()) == sizes["test"]


def test_go_annotation_reader(tmp_path):
    """DeepFRI's GO format (no such file in ../shared): MF, BP, CC blocks, CRLF lines, empty columns."""
    rows = [["### GO-terms (molecular_function)"], ["GO:1", "GO:2"], ["### GO-names (molecular_function)"],
            ["one", "two"], ["### GO-terms (biological_process)"], ["GO:3", "GO:4", "GO:5"],
            ["### GO-names (biological_process)"], ["three", "four", "five"],
            ["### GO-terms (cellular_component)"], ["GO:6"], ["### GO-names (cellular_component)"], ["six"],
            ["### PDB-chain", "GO-terms (molecular_function)", "GO-terms (biological_process)",
             "GO-terms (cellular_component)"],
            ["1ABC-A", "GO:2,GO:1", "GO:5", "GO:6"], ["2DEF-B", "", "GO:3,GO:4"], ["3GHI-C", "GO:2"]]
    path = tmp_path / "x-GO_annot.tsv"
    path.write_text("".join("\t".join(r) + "\r\n" for r in rows))
    terms, labels = ef.read_deepfri_annot(path)
    assert list(terms) == ["go-mf", "go-bp", "go-cc"]
    assert terms == {"go-mf": ["GO:1", "GO:2"], "go-bp": ["GO:3", "GO:4", "GO:5"], "go-cc": ["GO:6"]}
    assert labels["go-mf"] == {"1ABC-A": [1, 0], "2DEF-B": [], "3GHI-C": [1]}
    assert labels["go-bp"] == {"1ABC-A": [2], "2DEF-B": [0, 1], "3GHI-C": []}
    assert labels["go-cc"] == {"1ABC-A": [0], "2DEF-B": [], "3GHI-C": []}


def test_ec_torchdrug_archive(tmp_path, capsys, monkeypatch):
    """torchdrug's layout: <Name>/nrPDB-EC_annot.tsv, nrPDB-EC_test.csv, {train,valid,test}.zip of
    <split>/<PDB>-<chain>_*.pdb; a wrong md5 on EnzymeCommission.zip stops the run."""
    build = tmp_path / "build"
    build.mkdir()
    ids = {"train": ["1AAA-A", "1BBB-A"], "valid": ["2CCC-B"], "test": ["3DDD-A"]}
    for split, names in ids.items():
        with zipfile.ZipFile(build / f"{split}.zip", "w") as z:
            for k, x in enumerate(names):
                write_ca_pdb(build / "tmp.pdb", "MKTAYIAKQRQISFV"[: 10 + k])
                z.write(build / "tmp.pdb", f"{split}/{x}_{k}.pdb")
    annot = "### EC-numbers\r\n1.1.1.1\t2.7.11.1\r\n### PDB-chain\tEC-numbers\r\n" + "".join(
        f"{x}\t{e}\r\n" for x, e in [("1AAA-A", "2.7.11.1"), ("1BBB-A", "1.1.1.1,2.7.11.1"),
                                     ("2CCC-B", "1.1.1.1"), ("3DDD-A", "2.7.11.1")])
    with zipfile.ZipFile(tmp_path / "ec_small.zip", "w") as z:
        z.writestr("EnzymeCommission/nrPDB-EC_annot.tsv", annot)
        z.writestr("EnzymeCommission/nrPDB-EC_test.csv", "PDB-chain,<30%,<40%,<50%,<70%,<95%\n3DDD-A,0,0,1,1,1\n")
        for split in ids:
            z.write(build / f"{split}.zip", f"EnzymeCommission/{split}.zip")
    args = ["--source", "ec", "--data", str(tmp_path / "ec_small.zip"), "--data-dir", str(tmp_path / "data"),
            "--modality", "seq"]
    rc, out, s = run(args, tmp_path)
    assert rc == 0 and s["done"] == 4
    labels = json.loads((out / "labels_ec.json").read_text())
    assert labels["terms"] == ["1.1.1.1", "2.7.11.1"] and labels["source"] == "torchdrug"
    assert labels["splits"] == ids and labels["labels"]["1BBB-A"] == [0, 1]
    assert labels["test_identity"] == {"3DDD-A": {"30": 0, "40": 0, "50": 1, "70": 1, "95": 1}}
    assert load(out / "seq" / "1BBB-A.pt").shape[0] == 11

    (tmp_path / "EnzymeCommission.zip").write_bytes((tmp_path / "ec_small.zip").read_bytes())
    assert ef.main(["--source", "ec", "--data", str(tmp_path / "EnzymeCommission.zip"), "--encoders", "tiny",
                    "--out", str(tmp_path / "g")]) == 2
    assert "md5" in capsys.readouterr().err

    class Response(io.BytesIO):  # --download with --data of another name: the download is md5-checked too
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(ef.urllib.request, "urlopen", lambda url, timeout: Response(b"not torchdrug's zip"))
    assert ef.main(["--source", "ec", "--download", "--data", str(tmp_path / "other.zip"), "--data-dir",
                    str(tmp_path / "dl"), "--encoders", "tiny", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and "other.zip" in err


def test_max_len_is_checked(tmp_path, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    for bad in ("0", "1023"):
        assert ef.main(["--source", "fasta", "--fasta", str(fasta), "--max-len", bad, "--encoders", "tiny",
                        "--out", str(tmp_path / "f")]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert len(err) == 1 and "--max-len" in err[0]


# ----------------------------------------------------------------------------- other sources

def test_alphafold_join_and_unpaired(tmp_path):
    seqs = {"P11111": "MKTAYIAKQRQISF", "P22222": "MSTNPKPQRKTKRN", "P33333": "MVLSPADKTNVKAA"}
    for acc, seq in seqs.items():
        write_ca_pdb(tmp_path / "af" / f"AF-{acc}-F1-model_v4.pdb.gz", seq)
    write_ca_pdb(tmp_path / "af" / "AF-P11111-F1-model_v3.pdb", "MK")          # older version: ignored
    tsv = ["Entry\tSequence\tProteinName\tFunction\tSubcellularLocation\tSimilarity",
           f"P11111\t{seqs['P11111']}\tKinase A\tPhosphorylates things.\tCytoplasm.\t",
           f"P22222\tMSTNPKPQRKTKRW\tOther\t\t\tBelongs to the X family.",       # disagrees with its AF file
           "P44444\tMKVLAAGIVG\tLonely protein\t\tNucleus.\t"]
    (tmp_path / "pd.tsv").write_text("\n".join(tsv) + "\n")
    out = tmp_path / "features" / "pretrain"
    rc = ef.main(["--source", "alphafold", "--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv"),
                  "--unpaired", "--encoders", "tiny", "--out", str(out)])
    assert rc == 0
    sets = {name: {r["id"]: r for r in amma.read_manifest(path)}
            for name, path in [("paired", out), ("seqstr", out.parent / "seqstr"), ("seqfunc", out.parent / "seqfunc")]}
    assert list(sets["paired"]) == ["P11111"] and sets["paired"]["P11111"]["modalities"] == ("seq", "str", "func")
    assert list(sets["seqstr"]) == ["P33333"] and sets["seqstr"]["P33333"]["modalities"] == ("seq", "str")
    assert list(sets["seqfunc"]) == ["P44444"] and sets["seqfunc"]["P44444"]["modalities"] == ("seq", "func")
    assert "P22222" in json.loads((out / "alphafold_mismatch.json").read_text())
    func = load(out / "func" / "P11111.pt")
    assert func.shape[0] == sets["paired"]["P11111"]["L_func"] and func.shape[1] == 48


def test_protdescribe_no_text_and_id_column(tmp_path):
    (tmp_path / "pd.tsv").write_text("Acc\tSequence\tProteinName\tFunction\tSubcellularLocation\tSimilarity\n"
                                     "Q1\tMKTAYIAK\tName\t\t\t\nQ2\tMKVLAAGI\t \t\t\t\n")
    rc = ef.main(["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--encoders", "tiny",
                  "--out", str(tmp_path / "x")])
    assert rc == 2                                                         # no known accession column
    rc, out, s = run(["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--id-column", "Acc",
                      "--modality", "seq", "func"], tmp_path)
    assert rc == 0 and s["failed"] == {} and list(s["notes"]) == ["Q2"] and "no text" in s["notes"]["Q2"]
    rows = {r["id"]: r for r in amma.read_manifest(out)}                  # no text = no func, seq still there
    assert rows["Q1"]["modalities"] == ("seq", "func") and rows["Q2"]["modalities"] == ("seq",)
    assert (out / "seq" / "Q2.pt").exists() and not (out / "func" / "Q2.pt").exists()


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    """Missing paths, a TSV row with a wrong field count, non-UTF-8 text: exit 2 with one error line;
    a truncated .pdb.gz fails only its protein (and the AlphaFold join lists it)."""
    def errors():
        return [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    missing = str(tmp_path / "nope.fasta")
    assert ef.main(["--source", "fasta", "--fasta", missing, "--encoders", "tiny", "--out", str(tmp_path / "a")]) == 2
    err = errors()
    assert len(err) == 1 and "nope.fasta" in err[0]
    assert ef.main(["--source", "pdb-dir", "--pdb-dir", str(tmp_path / "nodir"), "--encoders", "tiny",
                    "--out", str(tmp_path / "a")]) == 2
    assert len(err := errors()) == 1 and "nodir" in err[0]
    (tmp_path / "bad.fasta").write_bytes(b">a\nMK\xff\xfeA\n")
    assert ef.main(["--source", "fasta", "--fasta", str(tmp_path / "bad.fasta"), "--encoders", "tiny",
                    "--out", str(tmp_path / "a")]) == 2
    assert len(err := errors()) == 1 and "bad.fasta" in err[0] and "UTF-8" in err[0]
    (tmp_path / "pd.tsv").write_text("Entry\tSequence\tProteinName\tFunction\tSubcellularLocation\tSimilarity\n"
                                     "Q1\tMKTAYIAK\tName\t\t\t\nQ2\tMKVLAAGI\tName\n")
    assert ef.main(["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--encoders", "tiny",
                    "--out", str(tmp_path / "a")]) == 2
    assert len(err := errors()) == 1 and "pd.tsv:3" in err[0] and "fields" in err[0]

    good = write_ca_pdb(tmp_path / "af" / "AF-P11111-F1-model_v4.pdb.gz", "MKTAYIAKQR")
    cut = tmp_path / "af" / "AF-P22222-F1-model_v4.pdb.gz"
    cut.write_bytes(good.read_bytes()[:40])                                 # truncated gzip: EOFError
    with pytest.raises(ef.InputError, match="unreadable structure"):
        ef.read_structure(cut)
    (tmp_path / "pd.tsv").write_text("Entry\tSequence\tProteinName\tFunction\tSubcellularLocation\tSimilarity\n"
                                     "P11111\tMKTAYIAKQR\tA\t\t\t\nP22222\tMKTAYIAKQR\tB\t\t\t\n")
    out = tmp_path / "p"
    assert ef.main(["--source", "alphafold", "--af-dir", str(tmp_path / "af"), "--protdescribe",
                    str(tmp_path / "pd.tsv"), "--modality", "seq", "--encoders", "tiny", "--out", str(out)]) == 0
    assert "unreadable" in json.loads((out / "alphafold_mismatch.json").read_text())["P22222"]
    rc, out, s = run(["--source", "pdb-dir", "--pdb-dir", str(tmp_path / "af"), "--modality", "seq"], tmp_path)
    assert rc == 0 and list(s["failed"]) == ["AF-P22222-F1-model_v4"] and s["done"] == 1


def test_real_encoders_fail_with_one_line(tmp_path, monkeypatch, capsys):
    def offline(url, dst, **kw):
        assert url == ef.ESM1B_URL
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))    # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    assert ef.main(["--source", "fasta", "--fasta", str(fasta), "--modality", "seq", "--out", str(tmp_path / "f")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]   # (tqdm bars aside)
    assert len(err) == 1 and "--encoders tiny" in err[0] and "esm1b_t33_650M_UR50S" in err[0]
    write_ca_pdb(tmp_path / "pdb" / "a.pdb", "MKTAYIAK")
    assert ef.main(["--source", "pdb-dir", "--pdb-dir", str(tmp_path / "pdb"), "--modality", "str",
                    "--out", str(tmp_path / "g")]) == 2
    assert "--gearnet-ckpt" in capsys.readouterr().err


def test_esm1b_format_checkpoint_loads_safely(tmp_path, monkeypatch):
    """--esm-weights and the hub-cache file go through load_esm1b: weights_only=True, an ESM-1b-format
    checkpoint ({'args': Namespace(arch='roberta_large', ...), 'model': fairseq-named state_dict})."""
    import argparse
    import esm
    args = argparse.Namespace(arch="roberta_large", layers=2, embed_dim=32, ffn_embed_dim=64,
                              attention_heads=4, max_positions=1024, emb_layer_norm_before=True)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    torch.manual_seed(0)
    model = esm.model.esm1.ProteinBertModel(args, alphabet).eval()
    state = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
             for k, v in model.state_dict().items() if not k.startswith("contact_head")}
    state["encoder.sentence_encoder.embed_tokens.weight"][alphabet.mask_idx] = 0   # as fair-esm loads it
    model.embed_tokens.weight.data[alphabet.mask_idx] = 0
    ckpt = tmp_path / "esm1b_tiny.pt"
    torch.save({"args": args, "model": state}, ckpt)

    monkeypatch.setattr(ef, "ESM1B_LAYER", 2)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    out = tmp_path / "f"
    assert ef.main(["--source", "fasta", "--fasta", str(fasta), "--modality", "seq", "--esm-weights", str(ckpt),
                    "--device", "cpu", "--out", str(out)]) == 0
    x = load(out / "seq" / "a.pt")
    _, _, tokens = alphabet.get_batch_converter()([("a", "MKTAYIAK")])
    with torch.no_grad():
        ref = model(tokens, repr_layers=[2])["representations"][2][0, 1:9]
    assert x.shape == (8, 32) and torch.allclose(x.float(), ref, atol=1e-2)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))    # the default path: cached file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / f"{ef.ESM1B_NAME}.pt").write_bytes(ckpt.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert ef.esm1b_checkpoint() == tmp_path / "hub" / "checkpoints" / f"{ef.ESM1B_NAME}.pt"
    assert isinstance(ef.load_esm1b(ef.esm1b_checkpoint())[0], esm.model.esm1.ProteinBertModel)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"args": args, "model": state, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ef.load_esm1b(tmp_path / "evil.pt")


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "features" / "demo-tiny"                  # not features/demo: demo.py's synthetic set
    # the docstring's demo command, made small; data/demo and features/ land in tmp_path
    argv = ["--source", "demo", "--encoders", "tiny", "--demo-n", "6"]
    assert ef.main(argv) == 0
    rows = amma.read_manifest(out)
    assert len(rows) == 6 and all(r["modalities"] == ("seq", "str", "func") for r in rows)
    info = json.loads((out / "info.json").read_text())
    assert info["tiny"] is True and all(v.startswith("tiny:") for v in info["encoders"].values())
    for task, source in [("ec", "demo"), ("go-mf", "demo"), ("go-bp", "demo"), ("go-cc", "demo")]:
        labels = json.loads((out / f"labels_{task}.json").read_text())
        assert labels["task"] == task and labels["source"] == source
        assert sorted(x for s in labels["splits"].values() for x in s) == sorted(r["id"] for r in rows)
        assert all(0 <= i < len(labels["terms"]) for v in labels["labels"].values() for i in v)
        assert set(labels["test_identity"]) == set(labels["splits"]["test"])
    item = amma.FeatureDataset(out)[0]
    assert item["seq"].shape[0] == item["str"].shape[0] and item["func"].shape[1] == info["dims"]["func"]
    assert ef.main(argv) == 0 and json.loads((out / "summary.json").read_text())["skipped"] == 6
    assert "python extract_features.py --source demo --encoders tiny" in ef.__doc__
    assert os.path.exists(tmp_path / "data" / "demo" / "demo.fasta")
