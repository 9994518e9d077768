"""extract_features.py: encoders' rows, cropping, text joining, resume/shards, readers, sources.

Everything runs offline on CPU with the tiny encoders and a handful of small proteins."""
import errno
import gzip
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

import cache
import extract_features as ef
import gearnet
import replicas
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
    assert rc == ef.EXIT_PARTIAL == 3 and s["done"] == 2 and s["exit_status"] == 3   # some proteins failed
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
    rows = {r["id"]: r for r in cache.read_manifest(out)}
    assert rows["long"]["L"] == 1022 and rows["long"]["L_full"] == "1100"
    assert rows["long"]["sequence"] == long[:1022]
    info = json.loads((out / "info.json").read_text())
    assert info["tiny"] is True and info["encoders"]["seq"].startswith("tiny:") and info["dims"] == {"seq": 64}
    assert info["synthetic"] is False and info["esm_model"] == ef.TINY_NAMES["seq"] and info["esm_layer"] == 6
    assert info["esm_weights"] == "" and not ef.is_real_esm(info)


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
    assert rc == 3 and set(s["failed"]) == {"sub", "noca"}
    assert "mismatch" in s["failed"]["sub"] and "noca.pdb" in s["failed"]["noca"]
    rows = {r["id"]: r for r in cache.read_manifest(out)}
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
    assert rc == 3 and list(s["failed"]) == ["noca"] and "noca.pdb" in s["failed"]["noca"]
    assert [x for x in err.splitlines() if "noca" in x and x.startswith("error")]   # a one-line error
    rows = cache.read_manifest(out)
    assert sorted(r["id"] for r in rows) == sorted(f.stem for f in shared.glob("*.pdb"))
    for r in rows:
        seq, st = load(out / "seq" / f"{r['id']}.pt"), load(out / "str" / f"{r['id']}.pt")
        n_ca = len(gearnet.read_structure(shared / f"{r['id']}.pdb")["sequence"])
        assert seq.shape[0] == st.shape[0] == r["L"] == n_ca
        assert st.shape[1] == 192 and seq.dtype == st.dtype == torch.float16


def test_gearnet_checkpoints_as_gearnet_and_torchdrug_save_them(tmp_path):
    """Plain state_dict (GearNet's script/pretrain.py), torchdrug Engine.save solver checkpoint ('model.'
    keys + 'mlp.' head + optimizer) and a DDP one ('module.'): the same GearNet keys come out, sizes inferred."""
    paths, sd = replicas.write_gearnet_checkpoints(tmp_path, hidden=(16, 16, 16))
    for name, path in paths.items():
        stripped = ef.gearnet_state_dict(path)
        assert stripped.keys() == sd.keys(), name
        assert all(torch.equal(stripped[k], sd[k]) for k in sd)
        assert gearnet.GearNetEdge.from_state_dict(stripped).config.hidden_dims == (16, 16, 16)
    torch.save({"model": {**{f"a.{k}": v for k, v in sd.items()}, **{f"b.{k}": v for k, v in sd.items()}}},
               tmp_path / "two.pth")
    with pytest.raises(ValueError, match="expected one GearNet"):
        ef.gearnet_state_dict(tmp_path / "two.pth")


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
    assert sorted(r["id"] for r in cache.read_manifest(out)) == ids[:5]
    (out / "manifest.tsv").unlink()
    assert ef.main(["--out", str(out), "--merge"]) == 0 and len(cache.read_manifest(out)) == 5


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
    assert rc == 3 and list(s["failed"]) == ["big"] and "max |value|" in s["failed"]["big"]
    assert [r["id"] for r in cache.read_manifest(out)] == ["ok"] and not (out / "seq" / "big.pt").exists()
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
    assert rc == 0 and len(cache.read_manifest(out)) == 3
    (out / "seq" / "Q3.pt").write_bytes(b"junk")                            # no longer valid: its row goes
    rc, out, s = run(base + ["--limit", "1"], tmp_path, name="g")
    assert rc == 0 and s["proteins"] == 1
    assert [r["id"] for r in cache.read_manifest(out)] == ["Q1", "Q2"]
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
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(b"not torchdrug's zip"))
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
           "P22222\tMSTNPKPQRKTKRW\tOther\t\t\tBelongs to the X family.",        # disagrees with its AF file
           "P44444\tMKVLAAGIVG\tLonely protein\t\tNucleus.\t"]
    (tmp_path / "pd.tsv").write_text("\n".join(tsv) + "\n")
    out = tmp_path / "features" / "pretrain"
    rc = ef.main(["--source", "alphafold", "--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv"),
                  "--unpaired", "--encoders", "tiny", "--out", str(out)])
    assert rc == 0
    sets = {name: {r["id"]: r for r in cache.read_manifest(path)}
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
    rc = ef.main(["--protdescribe", str(tmp_path / "pd.tsv"), "--encoders", "tiny", "--out", str(tmp_path / "x")])
    assert rc == 0                             # no known id column: rows named by position, no "column None" error
    assert [r["id"] for r in cache.read_manifest(tmp_path / "x")] == ["row000001", "row000002"]
    rc, out, s = run(["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--id-column", "Acc",
                      "--modality", "seq", "func"], tmp_path)
    assert rc == 0 and s["failed"] == {} and list(s["notes"]) == ["Q2"] and "no text" in s["notes"]["Q2"]
    rows = {r["id"]: r for r in cache.read_manifest(out)}                  # no text = no func, seq still there
    assert rows["Q1"]["modalities"] == ("seq", "func") and rows["Q2"]["modalities"] == ("seq",)
    assert (out / "seq" / "Q2.pt").exists() and not (out / "func" / "Q2.pt").exists()


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    """Missing paths, a TSV without a Sequence column, non-UTF-8 text: exit 2 with one error line;
    a truncated .pdb.gz fails only its protein (exit 3; the AlphaFold join lists it)."""
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
    (tmp_path / "pd.tsv").write_text("Entry\tSeq\tProteinName\tFunction\tSubcellularLocation\tSimilarity\n"
                                     "Q1\tMKTAYIAK\tName\t\t\t\n")
    assert ef.main(["--source", "protdescribe", "--protdescribe", str(tmp_path / "pd.tsv"), "--encoders", "tiny",
                    "--out", str(tmp_path / "a")]) == 2
    assert len(err := errors()) == 1 and "pd.tsv" in err[0] and "no column Sequence" in err[0]

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
    assert rc == 3 and list(s["failed"]) == ["AF-P22222-F1-model_v4"] and s["done"] == 1


# ----------------------------------------------------------------------------- loading the encoders

def test_loading_errors_give_the_full_reason_and_the_flag(tmp_path, monkeypatch, capsys):
    """Offline without a cached ESM-1b, a broken --esm-weights, a text model that is not there, no or a broken
    --gearnet-ckpt: exit 2, one error line holding the whole reason and the flag that fixes it first
    (--encoders tiny only as a second hint)."""
    def errors():
        return [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]

    def offline(url, dst, **kw):
        assert url == ef.ESM1B_URL
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution (second part of the reason)")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))    # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    assert ef.main(["--fasta", str(fasta), "--modality", "seq", "--out", str(tmp_path / "f")]) == 2
    (err,) = errors()
    assert "esm1b_t33_650M_UR50S" in err and "second part of the reason" in err and "no network" in err
    assert ef.ESM1B_URL in err and err.index("--esm-weights") < err.index("--encoders tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert ef.main(["--fasta", str(fasta), "--modality", "seq", "--esm-weights", str(tmp_path / "junk.pt"),
                    "--out", str(tmp_path / "f")]) == 2
    (err,) = errors()
    assert "junk.pt" in err and "--esm-weights" in err
    assert ef.main(["--fasta", str(fasta), "--modality", "seq", "--esm-model", "esm_msa1b_t12_100M_UR50S",
                    "--out", str(tmp_path / "f")]) == 2
    assert "not a fair-esm ESM-1b / ESM-1v / ESM-2 name" in errors()[0]

    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(replicas.protdescribe_rows({"P11111": "MKTAYIAK"})))
    assert ef.main(["--protdescribe", str(tmp_path / "pd.tsv"), "--modality", "func", "--text-model",
                    str(tmp_path / "pubmedbert"), "--out", str(tmp_path / "g")]) == 2
    (err,) = errors()
    assert "no such directory" in err and "--text-model DIR" in err and "--encoders tiny" in err

    write_ca_pdb(tmp_path / "pdb" / "a.pdb", "MKTAYIAK")
    assert ef.main(["--pdb-dir", str(tmp_path / "pdb"), "--modality", "str", "--out", str(tmp_path / "h")]) == 2
    assert "--gearnet-ckpt PATH" in errors()[0]
    assert ef.main(["--pdb-dir", str(tmp_path / "pdb"), "--modality", "str", "--gearnet-ckpt",
                    str(tmp_path / "junk.pt"), "--out", str(tmp_path / "h")]) == 2
    (err,) = errors()
    assert "junk.pt" in err and "--gearnet-ckpt PATH" in err


def test_text_model_offline_names_the_download(tmp_path, monkeypatch, capsys):
    """The default hub name, offline and not cached: the error says to download it elsewhere and pass
    --text-model DIR, with transformers' whole message."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(replicas.protdescribe_rows({"P11111": "MKTAYIAK"})))
    assert ef.main(["--protdescribe", str(tmp_path / "pd.tsv"), "--modality", "func", "--out", str(tmp_path / "g")]) == 2
    (err,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert ef.PUBMEDBERT in err and "--text-model DIR" in err and "download" in err


def test_esm1b_checkpoint_with_training_state_loads_and_runs_nothing(tmp_path, monkeypatch):
    """fair-esm's ESM-1b layout (args Namespace, 'encoder.sentence_encoder.' keys) plus optimizer state, numpy
    scalars and an object of a class that no longer exists: only 'args' and 'model' are used, the features are
    fair-esm's model's last layer. fair-esm 2.0.0's own local loader cannot read it under torch >= 2.6. A pickle
    that would run a command (os.system / exec in __reduce__) loads with the command as inert data."""
    import esm
    path = tmp_path / f"{ef.ESM1B_NAME}.pt"
    ref = replicas.write_esm1b(path)
    with pytest.raises(Exception, match="Weights only load failed"):
        esm.pretrained.load_model_and_alphabet_local(str(path))
    data = ef.safe_load(path)
    assert isinstance(data["extra_state"]["train_meters"]["wall"], ef.Unloaded)
    assert "fairseq.meters.StopwatchMeter" in repr(data["extra_state"]["train_meters"]["wall"])
    model, alphabet, layer = ef.load_esm(path)
    assert layer == 33 and isinstance(model, esm.model.esm1.ProteinBertModel)

    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    out = tmp_path / "f"
    assert ef.main(["--fasta", str(fasta), "--modality", "seq", "--esm-weights", str(path), "--device", "cpu",
                    "--out", str(out)]) == 0
    _, _, tokens = alphabet.get_batch_converter()([("a", "MKTAYIAK")])
    with torch.no_grad():
        expected = ref(tokens, repr_layers=[33])["representations"][33][0, 1:9]
    x = load(out / "seq" / "a.pt")
    assert x.shape == (8, 32) and torch.allclose(x.float(), expected, atol=1e-2)
    info = json.loads((out / "info.json").read_text())
    assert (info["esm_model"], info["esm_weights"], info["esm_layer"]) == (ef.ESM1B_NAME, str(path.resolve()), 33)
    assert info["encoders"]["seq"] == ef.ESM1B_NAME and info["tiny"] is False and ef.is_real_esm(info)

    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 file format, as old checkpoints are
    torch.save({"args": data["args"], "model": data["model"]}, legacy, _use_new_zipfile_serialization=False)
    assert ef.load_esm(legacy)[2] == 33

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"args": data["args"], "model": data["model"], "x": replicas.Malicious(f"touch {marker}"),
                "y": Exec(f"open({str(marker)!r}, 'w')")}, evil)
    assert ef.load_esm(evil)[2] == 33 and not marker.exists()
    assert isinstance(ef.safe_load(evil)["x"], ef.Unloaded) and not marker.exists()
    torch.save({"args": replicas.Malicious(f"touch {marker}"), "model": data["model"]}, evil)
    with pytest.raises(ValueError, match="'args' is a Unloaded"):
        ef.load_esm(evil)
    assert not marker.exists()

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))    # the default: fair-esm's cache
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert ef.resolve_esm(ef.ESM1B_NAME)[2:] == (33, "")


class Exec:
    """Unpickling this would run Python code through exec."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_esm2_by_name_and_rebuilding_the_encoder_from_info(tmp_path, monkeypatch):
    """--esm-model esm2_t6_8M_UR50D with an ESM-2-format file (cfg + model): its last layer, its width in
    info.json; load_sequence_encoder(info) rebuilds the same model (weights moved: --esm-weights override;
    gone: FatalError naming --esm-weights; another model: refused), the tiny one as the tiny extraction."""
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    ref = replicas.write_esm2(path, layers=6, dim=32)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFV\n")
    out = tmp_path / "f"
    assert ef.main(["--fasta", str(fasta), "--modality", "seq", "--esm-model", "esm2_t6_8M_UR50D", "--esm-weights",
                    str(path), "--out", str(out)]) == 0
    info = json.loads((out / "info.json").read_text())
    assert (info["esm_model"], info["esm_layer"], info["dims"]) == ("esm2_t6_8M_UR50D", 6, {"seq": 32})
    x = load(out / "seq" / "a.pt")

    def features(model, alphabet, layer):
        _, _, tokens = alphabet.get_batch_converter()([("a", "MKTAYIAKQRQISFV")])
        with torch.no_grad():
            return model(tokens, repr_layers=[layer])["representations"][layer][0, 1:16]
    import esm
    assert torch.allclose(x.float(), features(ref, esm.data.Alphabet.from_architecture("ESM-1b"), 6), atol=1e-2)
    model, alphabet, layer, label = ef.load_sequence_encoder(info)
    assert layer == 6 and "esm2_t6_8M_UR50D" in label and str(path.resolve()) in label
    assert torch.allclose(x.float(), features(model, alphabet, layer), atol=1e-2)

    moved = tmp_path / "moved.pt"
    path.rename(moved)
    with pytest.raises(ef.FatalError, match="--esm-weights PATH"):
        ef.load_sequence_encoder(info)
    assert ef.load_sequence_encoder(info, esm_weights=str(moved))[2] == 6
    replicas.write_esm1b(tmp_path / "other.pt", layers=4, dim=16)
    with pytest.raises(ef.FatalError, match="4 layers of width 16, the features came from layer 6 of width 32"):
        ef.load_sequence_encoder(info, esm_weights=str(tmp_path / "other.pt"))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))    # no esm_weights: the hub cache
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    moved.rename(tmp_path / "hub" / "checkpoints" / path.name)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    assert ef.load_sequence_encoder({**info, "esm_weights": ""})[3] == "esm2_t6_8M_UR50D"

    tiny_info = {"tiny": True, "synthetic": False, "esm_model": ef.TINY_NAMES["seq"], "esm_layer": 6}
    model, alphabet, layer, label = ef.load_sequence_encoder(tiny_info)
    enc = ef.load_encoder("seq", ef.ExtractConfig(encoders="tiny"), torch.device("cpu"))
    assert label.startswith("tiny:") and layer == enc.layer == 6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), enc.model.state_dict().values()))
    with pytest.raises(ef.FatalError, match="synthetic"):
        ef.load_sequence_encoder({"synthetic": True, "tiny": False})
    assert not ef.is_real_esm({"synthetic": True, "encoders": {"seq": "synthetic"}})


def test_source_is_inferred_from_the_one_input_flag(tmp_path, capsys):
    def infer(**kw):
        return ef.infer_source(ef.ExtractConfig(**kw))
    assert infer(fasta="x.fa") == "fasta" and infer(fasta="x.fa", pdb_dir="d", protdescribe="t") == "fasta"
    assert infer(pdb_dir="d") == "pdb-dir" and infer(protdescribe="t") == "protdescribe"
    assert infer(af_dir="af", protdescribe="t") == "alphafold" and infer(source="demo") == "demo"
    assert infer(data="dl/EnzymeCommission.zip") == "ec" and infer(data="x/GeneOntology") == "go"
    for kw, words in [({"fasta": "x", "af_dir": "af"}, "--af-dir and --fasta"),
                      ({"pdb_dir": "d", "protdescribe": "t"}, "say --source pdb-dir"),
                      ({"data": "somewhere"}, "EC or GO"), ({}, "no input")]:
        with pytest.raises(ef.FatalError, match=words):
            infer(**kw)
    assert ef.main(["--pdb-dir", "d", "--protdescribe", "t", "--encoders", "tiny"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(err) == 1 and "--source" in err[0]
    write_ca_pdb(tmp_path / "pdb" / "a.pdb", "MKTAYIAK")
    rc, out, s = run(["--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq"], tmp_path)
    assert rc == 0 and json.loads((out / "info.json").read_text())["source"] == "pdb-dir"


# ----------------------------------------------------------------------------- nothing to do, partial runs

def test_runs_that_find_nothing_usable_exit_2(tmp_path, capsys, monkeypatch):
    """Empty FASTA, empty directory, no AF file, a join that pairs nothing, an empty split, a shard without
    ids, every protein failing: exit 2 with the reason (and the likely fix) in one line."""
    def fails(args, *words, per_protein=0):
        assert ef.main([*args, "--encoders", "tiny", "--out", str(tmp_path / "o")]) == 2, args
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert len(err) == 1 + per_protein and all(w in err[-1] for w in words), err
    (tmp_path / "empty.fasta").write_text("\n")
    fails(["--fasta", str(tmp_path / "empty.fasta")], "no FASTA records")
    (tmp_path / "empty").mkdir()
    fails(["--pdb-dir", str(tmp_path / "empty")], "no structure files")
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(replicas.protdescribe_rows({"P11111": "MKTAYIAKQR"})))
    fails(["--af-dir", str(tmp_path / "empty"), "--protdescribe", str(tmp_path / "pd.tsv")], "no AlphaFold DB files")
    replicas.write_alphafold_dir(tmp_path / "af", {"P22222": "MSTNPKPQRKTKRN"})
    fails(["--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv")], "pair no protein",
          "--join sequence")
    fails(["--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv"), "--join", "sequence"],
          "pair no protein", "no AF sequence equals")
    (tmp_path / "bad.fasta").write_text(">a\nMK*A\n>b\nMK1A\n")
    fails(["--fasta", str(tmp_path / "bad.fasta")], "none of the 2 proteins is usable", "a: unknown residue",
          per_protein=2)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["exit_status"] == 2
    (tmp_path / "ok.fasta").write_text(">a\nMKTA\n>b\nMKVL\n")
    fails(["--fasta", str(tmp_path / "ok.fasta"), "--shard", "4/5"], "no proteins to extract", "shard 4/5")

    rep = replicas.task_replica("ec")
    zip_path, md5 = replicas.write_torchdrug_zip(tmp_path / "dl", "ec", rep)
    root = replicas.torchdrug_extract(zip_path)
    for f in (root / "EnzymeCommission" / "valid" / "valid").iterdir():
        f.unlink()
    (root / "EnzymeCommission" / "valid.zip").unlink()
    fails(["--source", "ec", "--data", str(root)], "train/valid/test 4/0/3", "valid empty")


def test_a_set_file_that_cannot_be_written_stops_extraction_with_its_own_error(tmp_path, monkeypatch):
    """write_text_atomic (manifest, info, summary): OutputError (exit status 2), no temporary file left."""
    def full(self, *args, **kwargs):
        Path.write_bytes(self, b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ef.OutputError, match=r"cannot write .*manifest.tsv: No space left on device \(.* free there\)"):
        ef.write_text_atomic(tmp_path / "manifest.tsv", "id\n")
    assert not list(tmp_path.iterdir())


def test_save_tensor_refuses_what_float16_cannot_hold_and_keeps_what_it_can(tmp_path):
    ef.save_tensor(torch.tensor([[65519.0, -65519.0, 1.5]]), tmp_path / "ok.pt")       # rounds to +-65504
    assert torch.load(tmp_path / "ok.pt", weights_only=True).tolist() == [[65504.0, -65504.0, 1.5]]
    for bad in (65520.0, -1e6):
        with pytest.raises(ef.InputError, match="not finite in float16"):
            ef.save_tensor(torch.tensor([[1.0, bad]]), tmp_path / "x.pt")
    with pytest.raises(ef.InputError, match="1 non-finite values"):
        ef.save_tensor(torch.tensor([[1.0, float("-inf")]]), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    view = torch.randn(6, 4).half()[2:4]                                       # a view: only its rows are saved
    ef.save_tensor(view, tmp_path / "v.pt")
    y = torch.load(tmp_path / "v.pt", weights_only=True)
    assert torch.equal(y, view) and y.untyped_storage().nbytes() == 16


def test_nan_from_an_encoder_fails_that_protein(tmp_path, monkeypatch, capsys):
    """NaN or inf from an encoder (not only float16 overflow) is never written: the protein fails by name."""
    with pytest.raises(ef.InputError, match="2 non-finite values"):
        ef.save_tensor(torch.tensor([[1.0, float("nan"), float("inf")]]), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">nan\nMKTAYIAK\n>ok\nMKVLAAGI\n")
    write_ca_pdb(tmp_path / "pdb" / "nan.pdb", "MKTAYIAK")
    write_ca_pdb(tmp_path / "pdb" / "ok.pdb", "MKVLAAGI")
    real = ef.SeqEncoder.__call__

    def broken(self, seqs):  # the protein with 'T' at position 3 comes out as NaN
        return [r * float("nan") if s[2] == "T" else r for r, s in zip(real(self, seqs), seqs)]
    monkeypatch.setattr(ef.SeqEncoder, "__call__", broken)
    rc, out, s = run(["--fasta", str(fasta), "--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq", "str"], tmp_path)
    assert rc == 3 and list(s["failed"]) == ["nan"] and "non-finite" in s["failed"]["nan"]
    assert not (out / "seq" / "nan.pt").exists() and [r["id"] for r in cache.read_manifest(out)] == ["ok"]
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: nan: seq: the encoder gave")]


def test_mmcif_without_a_coordinate_column_or_cut_short_fails_per_file(tmp_path, capsys):
    seq = "MKTAYIAKQRQISF"
    d = tmp_path / "pdb"
    d.mkdir()
    (d / "good.cif").write_text(replicas.mmcif_text(seq))
    (d / "nox.cif").write_text(replicas.mmcif_text(seq, drop_columns=("Cartn_x",)))
    text = replicas.mmcif_text(seq)
    (d / "cut.cif").write_text(text[: text.index("ATOM 30 ") + 30])                 # ends mid-row
    rc, out, s = run(["--source", "pdb-dir", "--pdb-dir", str(d), "--modality", "seq", "str"], tmp_path)
    assert rc == 3 and s["done"] == 1 and set(s["failed"]) == {"nox", "cut"}
    assert "no Cartn_x column" in s["failed"]["nox"] and "nox.cif" in s["failed"]["nox"]
    assert "mid-row" in s["failed"]["cut"] and "cut short" in s["failed"]["cut"]
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(err) == 2


def test_progress_bars_update_rarely_in_logs(monkeypatch):
    class Log(io.StringIO):
        def isatty(self):
            return False
    monkeypatch.setattr(ef.sys, "stderr", Log())
    bar = ef.progress(range(3), "x")
    assert bar.mininterval >= 30 and bar.maxinterval >= 30
    bar.close()


# ----------------------------------------------------------------------------- provenance and re-extraction

def test_changed_inputs_are_recomputed(tmp_path, capsys):
    """The manifest records checksums of what each file came from; one residue changed (same length), a new
    structure file, other text: those files are recomputed, the rest skipped. Rows of older manifests without
    checksums only compare the sequence; a file without a manifest row (killed run) is recomputed."""
    seq_a, seq_b = "MKTAYIAKQRQISF", "MSTNPKPQRKTKRN"
    write_ca_pdb(tmp_path / "pdb" / "a.pdb", seq_a)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">a\n{seq_a}\n>b\n{seq_b}\n")
    rows = replicas.protdescribe_rows({"a": seq_a, "b": seq_b})
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(rows))
    args = ["--fasta", str(fasta), "--pdb-dir", str(tmp_path / "pdb"), "--protdescribe", str(tmp_path / "pd.tsv")]
    rc, out, s = run(args, tmp_path)
    assert rc == 0 and s["done"] == 2
    manifest = {r["id"]: r for r in cache.read_manifest(out)}
    assert manifest["a"]["sha_str"] and manifest["b"]["sha_str"] == "" and manifest["a"]["enc_seq"] == ef.TINY_NAMES["seq"]
    assert manifest["a"]["sha_seq"] == ef.digest(seq_a) and manifest["b"]["sha_func"]
    before = {p.name: load(p) for p in (out / "seq").iterdir()}

    fasta.write_text(f">a\n{seq_a}\n>b\n{seq_b[:5]}W{seq_b[6:]}\n")               # one residue, same length
    rc, out, s = run(args, tmp_path)
    assert (rc, s["done"], s["skipped"]) == (0, 1, 1) and s["recomputed"] == {"b": "seq: the sequence changed"}
    assert not torch.equal(load(out / "seq" / "b.pt"), before["b.pt"])
    assert torch.equal(load(out / "seq" / "a.pt"), before["a.pt"])
    assert {r["id"]: r for r in cache.read_manifest(out)}["b"]["sha_seq"] == ef.digest(f"{seq_b[:5]}W{seq_b[6:]}")

    text = (tmp_path / "pdb" / "a.pdb").read_text()
    (tmp_path / "pdb" / "a.pdb").write_text(text.replace("  1.00  0.00", "  1.00 50.00", 1))  # same residues
    rows[0]["Function"] = "Another function."
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(rows))
    rc, out, s = run(args, tmp_path)
    assert s["recomputed"] == {"a": "str: the structure file changed; func: the text changed"} and s["done"] == 1

    rc, out, s = run(args, tmp_path)
    assert (s["done"], s["skipped"], s["recomputed"]) == (0, 2, {})
    lines = (out / "manifest.tsv").read_text().splitlines()                    # a manifest of an older version
    header = lines[0].split("\t")
    keep = [i for i, c in enumerate(header) if not c.startswith(("sha_", "enc_"))]
    (out / "manifest.tsv").write_text("\n".join("\t".join(x.split("\t")[i] for i in keep) for x in lines) + "\n")
    rc, out, s = run(args, tmp_path)
    assert (s["done"], s["skipped"]) == (0, 2)
    lines = (out / "manifest.tsv").read_text().splitlines()                    # a killed run: b's row missing
    (out / "manifest.tsv").write_text("\n".join(x for x in lines if not x.startswith("b\t")) + "\n")
    rc, out, s = run(args, tmp_path)
    assert s["recomputed"] == {"b": "seq: no manifest row records what the file was computed from; "
                                    "func: no manifest row records what the file was computed from"}


# ----------------------------------------------------------------------------- replicas of the real inputs

@pytest.mark.parametrize("kind", ["ec", "go"])
def test_torchdrug_extracted_folder_gives_what_the_zip_gives(tmp_path, monkeypatch, kind):
    """--data pointing at the folder torchdrug's utils.extract leaves (X/<Name>/train/train/*.pdb, a
    .pkl.gz next to the annotation), or at the folder above it, gives the zip's ids, splits, labels and
    features; the zip itself is now extracted the same way torchdrug does."""
    rep = replicas.task_replica(kind)
    zip_path, md5 = replicas.write_torchdrug_zip(tmp_path / "dl", kind, rep)
    monkeypatch.setitem(ef.TORCHDRUG_ZIPS, kind, (*ef.TORCHDRUG_ZIPS[kind][:2], md5))   # the replica's checksum
    rc, from_zip, s = run(["--source", kind, "--data", str(zip_path), "--data-dir", str(tmp_path / "data"),
                           "--modality", "seq"], tmp_path, "zip")
    assert rc == 0 and s["done"] == 9
    name = ef.TORCHDRUG_ZIPS[kind][0]
    replicas.torchdrug_extract(zip_path)
    for data, out in [(tmp_path / "dl" / name, "dir"), (tmp_path / "dl", "above")]:
        rc, folder, s = run(["--source", kind, "--data", str(data), "--modality", "seq"], tmp_path, out)
        assert rc == 0 and s["done"] == 9, data
        tasks = ["ec"] if kind == "ec" else ["go-mf", "go-bp", "go-cc"]
        for task in tasks:
            a, b = (json.loads((d / f"labels_{task}.json").read_text()) for d in (from_zip, folder))
            assert a == b and a["source"] == "torchdrug"
        assert a["splits"] == {s: [c for c, _ in rep["splits"][s]] for s in ef.SPLITS}
        for r in cache.read_manifest(from_zip):
            assert torch.equal(load(from_zip / "seq" / f"{r['id']}.pt"), load(folder / "seq" / f"{r['id']}.pt"))
    labels = json.loads((from_zip / f"labels_{tasks[0]}.json").read_text())
    chain = rep["splits"]["train"][1][0]
    want = rep["labels"][chain] if kind == "ec" else rep["labels"][chain]["mf"]
    terms = rep["terms"] if kind == "ec" else rep["terms"]["mf"]
    assert sorted(labels["terms"][i] for i in labels["labels"][chain]) == sorted(want) and labels["terms"] == terms
    assert labels["test_identity"][rep["splits"]["test"][1][0]]["30"] == 0
    assert sorted(p.name for p in (tmp_path / "data" / name / name / "train" / "train").glob("*.pdb")) == \
        sorted(p.name for p in (tmp_path / "dl" / name / name / "train" / "train").glob("*.pdb"))


@pytest.mark.parametrize("id_column,kind", [("Entry", "accession"), ("Accession", "accession"),
                                            ("EntryName", "entry name"), (None, "none")])
def test_protdescribe_rows_and_the_alphafold_join(tmp_path, capsys, id_column, kind):
    """ProtST's TSV read as ProtST reads it (a row with more fields than the header keeps the first ones);
    AlphaFold files pair by accession when the id column holds accessions, else by exact sequence; the
    counts of both sides are printed; AF-only and ProtDescribe-only proteins form the unpaired sets."""
    accs = ["P00698", "P69905", "Q9Y6K9", "O15530", "P04637", "P12345"]
    seqs = {a: replicas.random_sequence(20 + 2 * k, 100 + k) for k, a in enumerate(accs)}
    replicas.write_alphafold_dir(tmp_path / "af", {a: seqs[a] for a in accs[:4]})
    names = {a: f"PROT{k}_HUMAN" for k, a in enumerate(accs)} if kind == "entry name" else None
    rows = replicas.protdescribe_rows({a: seqs[a] for a in accs[2:]}, names)
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(rows, id_column, extra={1}))
    table = ef.read_protdescribe(tmp_path / "pd.tsv")
    assert table.id_column == id_column and table.longer == 1 and len(table.rows) == 4
    second = table.rows[1]                                           # the row with two fields too many
    assert second["sequence"] == rows[1]["Sequence"] and second["fields"]["Similarity"] == rows[1]["Similarity"]
    out = tmp_path / "features" / "pretrain"
    rc, _, _ = run(["--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv"), "--unpaired",
                    "--modality", "seq", "func"], tmp_path, "features/pretrain")
    printed = capsys.readouterr().out
    assert rc == 0
    join = "accession" if kind == "accession" else "exact sequence"
    assert f"join by {join}" in printed and "paired 2 AF files with 2 ProtDescribe rows" in printed
    ids = {name: sorted(r["id"] for r in cache.read_manifest(path))
           for name, path in [("paired", out), ("seqstr", out.parent / "seqstr"), ("seqfunc", out.parent / "seqfunc")]}
    assert ids["paired"] == ["O15530", "Q9Y6K9"] and ids["seqstr"] == ["P00698", "P69905"]
    af_seqs = {seqs[a] for a in accs[:4]}
    assert ids["seqfunc"] == sorted(r["id"] for r in table.rows if r["sequence"] not in af_seqs)
    assert kind != "none" or ids["seqfunc"] == ["row000002", "row000003"]
    if kind == "entry name":
        assert "(0 of them also by id)" in printed
        assert ef.main(["--af-dir", str(tmp_path / "af"), "--protdescribe", str(tmp_path / "pd.tsv"), "--join",
                        "accession", "--encoders", "tiny", "--out", str(tmp_path / "x")]) == 2
        assert "--join sequence" in capsys.readouterr().err


def test_alphafold_folder_as_torchdrug_leaves_it(tmp_path):
    """torchdrug's AlphaFoldDB extracts swissprot_pdb_v2.tar and then every .pdb.gz next to itself; older model
    versions may lie around: one structure per accession, the newest version, the .pdb.gz."""
    af = replicas.write_alphafold_dir(tmp_path / "af", {"P00698": "MKALIVLGLV", "P69905": "MVLSPADKTN"})
    for gz in list(af.glob("*.pdb.gz")):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))          # utils.extract(gz_file)
    replicas.write_alphafold_dir(af, {"P00698": "MKALIVLGLV"}, version=1)
    files = ef.alphafold_files(af)
    assert {a: p.name for a, p in files.items()} == {"P00698": "AF-P00698-F1-model_v2.pdb.gz",
                                                     "P69905": "AF-P69905-F1-model_v2.pdb.gz"}
    tar = replicas.write_alphafold_tar(tmp_path / "swissprot_pdb_v2.tar", af)
    members = ef.alphafold_files(tar)
    assert {a: m.name for a, m in members.items()} == {a: p.name for a, p in files.items()}
    assert all(ef.read_structure(members[a])["sequence"] == ef.read_structure(files[a])["sequence"] for a in files)
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(ef.FatalError, match="not an uncompressed tar"):
        ef.alphafold_files(tmp_path / "x.tar.gz")


def test_rows_with_extra_fields_are_cut_as_protst_cuts_them(tmp_path):
    header = ["Entry", "Sequence", "ProteinName", "Function", "SubcellularLocation", "Similarity"]
    values = ["P11111", "MKTAYIAK", "Name", "Function part one", "part two after a stray tab", "Cytoplasm.", "Fam."]
    (tmp_path / "pd.tsv").write_text("\t".join(header) + "\n" + "\t".join(values) + "\nP22222\tMKVL\tShort\n")
    table = ef.read_protdescribe(tmp_path / "pd.tsv")
    protst = dict(zip(header, values[:len(header)]))             # UniProtSeqText.load_tsv: values[:len(fields)]
    assert table.rows[0]["fields"] == {k: protst[k] for k in ef.TEXT_FIELDS}
    assert table.rows[0]["fields"]["SubcellularLocation"] == "part two after a stray tab"
    assert (table.longer, table.shorter) == (1, 1) and table.rows[1]["fields"]["Function"] == ""


def test_pick_the_paper_subsets_from_a_folder_or_the_tar(tmp_path):
    """--pick PAIRED SEQSTR SEQFUNC --seed: seeded, disjoint (ids and sequences), picks.json; the tar archive
    (read in place) gives what its folder gives; a re-run picks the same and skips everything."""
    accs = [f"P{10000 + k}" for k in range(10)]
    seqs = {a: replicas.random_sequence(16 + k, 200 + k) for k, a in enumerate(accs)}
    af = replicas.write_alphafold_dir(tmp_path / "af", {a: seqs[a] for a in accs[:8]})
    tar = replicas.write_alphafold_tar(tmp_path / "swissprot_pdb_v2.tar", af)
    (tmp_path / "pd.tsv").write_text(replicas.protdescribe_text(replicas.protdescribe_rows(
        {a: seqs[a] for a in accs[2:]})))
    picks = {}
    for source in (af, tar):
        out = tmp_path / "out" / source.name / "pretrain"
        rc = ef.main(["--af-dir", str(source), "--protdescribe", str(tmp_path / "pd.tsv"), "--pick", "3", "2", "2",
                      "--seed", "0", "--modality", "seq", "--encoders", "tiny", "--out", str(out)])
        assert rc == 0
        picks[source.name] = json.loads((out / "picks.json").read_text())
        sets = {k: sorted(r["id"] for r in cache.read_manifest(p)) for k, p in
                [("paired", out), ("seqstr", out.parent / "seqstr"), ("seqfunc", out.parent / "seqfunc")]}
        assert {k: picks[source.name][k] for k in sets} == sets
        assert [len(v) for v in sets.values()] == [3, 2, 2]
        assert not (set(sets["paired"]) & set(sets["seqstr"]) or set(sets["paired"]) & set(sets["seqfunc"])
                    or set(sets["seqstr"]) & set(sets["seqfunc"]))
        assert set(sets["paired"]) <= set(accs[2:8]) and set(sets["seqfunc"]) <= set(accs[2:])
        structure = {r["id"]: r["structure"] for r in cache.read_manifest(out)}
        assert all(("::" in v) == (source == tar) for v in structure.values())
    assert picks["af"] == picks["swissprot_pdb_v2.tar"]
    rc = ef.main(["--af-dir", str(tar), "--protdescribe", str(tmp_path / "pd.tsv"), "--pick", "3", "2", "2",
                  "--modality", "seq", "--encoders", "tiny", "--out", str(tmp_path / "out" / tar.name / "pretrain")])
    summary = json.loads((tmp_path / "out" / tar.name / "pretrain" / "summary.json").read_text())
    assert rc == 0 and (summary["done"], summary["skipped"]) == (0, 3)
    other = tmp_path / "seed1" / "pretrain"
    assert ef.main(["--af-dir", str(af), "--protdescribe", str(tmp_path / "pd.tsv"), "--pick", "3", "0", "0",
                    "--seed", "1", "--modality", "seq", "--encoders", "tiny", "--out", str(other)]) == 0
    assert not (other.parent / "seqstr").exists() and json.loads((other / "picks.json").read_text())["seed"] == 1
    assert ef.main(["--fasta", "x.fasta", "--pick", "1", "1", "1", "--encoders", "tiny"]) == 2


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "features" / "demo-tiny"                  # not features/demo: demo.py's synthetic set
    # the docstring's demo command, made small; data/demo and features/ land in tmp_path
    argv = ["--source", "demo", "--encoders", "tiny", "--demo-n", "6"]
    assert ef.main(argv) == 0
    rows = cache.read_manifest(out)
    assert len(rows) == 6 and all(r["modalities"] == ("seq", "str", "func") for r in rows)
    info = json.loads((out / "info.json").read_text())
    assert info["tiny"] is True and all(v.startswith("tiny:") for v in info["encoders"].values())
    for task, source in [("ec", "demo"), ("go-mf", "demo"), ("go-bp", "demo"), ("go-cc", "demo")]:
        labels = json.loads((out / f"labels_{task}.json").read_text())
        assert labels["task"] == task and labels["source"] == source
        assert sorted(x for s in labels["splits"].values() for x in s) == sorted(r["id"] for r in rows)
        assert all(0 <= i < len(labels["terms"]) for v in labels["labels"].values() for i in v)
        assert set(labels["test_identity"]) == set(labels["splits"]["test"])
    item = cache.FeatureDataset(out)[0]
    assert item["seq"].shape[0] == item["str"].shape[0] and item["func"].shape[1] == info["dims"]["func"]
    assert ef.main(argv) == 0 and json.loads((out / "summary.json").read_text())["skipped"] == 6
    assert "python extract_features.py --source demo --encoders tiny" in ef.__doc__
    assert os.path.exists(tmp_path / "data" / "demo" / "demo.fasta")



def test_inputs_read_ahead_and_files_written_behind_give_the_sequential_set(tmp_path, monkeypatch):
    """Chunks whose inputs are read ahead (by reader processes) while the one before encodes, and feature
    files written by writer threads, give the set a plain sequential run gives, file for file."""
    from concurrent.futures import Future

    class Inline:                                                             # an executor that runs each job at once
        def __init__(self, *args, **kwargs): pass
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def submit(self, fn, *args):
            f = Future()
            f.set_result(fn(*args))
            return f
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ef, "CHUNK", 3)                                       # 3 chunks: 2 of them read ahead
    base = ["--source", "demo", "--encoders", "tiny", "--demo-n", "7"]
    with monkeypatch.context() as m:
        m.setattr(ef, "ThreadPoolExecutor", Inline)
        assert ef.main(base + ["--out", "seq", "--write-threads", "0", "--graphs", "cpu"]) == 0
    ef.HOST_SECONDS.clear()
    assert ef.main(base + ["--out", "piped", "--write-threads", "2", "--graphs", "auto", "--read-workers", "2"]) == 0
    assert ef.HOST_SECONDS["read"] > 0 and ef.HOST_SECONDS["write"] > 0
    a, b = tmp_path / "seq", tmp_path / "piped"
    assert (a / "manifest.tsv").read_text() == (b / "manifest.tsv").read_text()
    files = sorted(p.relative_to(a) for p in a.glob("*/*.pt"))
    assert len(files) == 21 and files == sorted(p.relative_to(b) for p in b.glob("*/*.pt"))
    for f in files:
        assert torch.equal(torch.load(a / f, weights_only=True), torch.load(b / f, weights_only=True)), f


# ----------------------------------------------------------------------------- issue 18: batch-wide failures, chains,
# names, disk full, residues, pairs

def chains_pdb(path, chains, het=()):
    """A C-alpha PDB with several chains {chain: sequence}; het: (position in the first chain, residue name,
    record) replacing that residue (e.g. (2, "KCX", "HETATM"), with N and C atoms so it is an amino acid)."""
    lines, serial = [], 0
    for c, (chain, seq) in enumerate(chains.items()):
        for i, aa in enumerate(seq):
            t = torch.tensor(i * 100.0 * 3.14159265 / 180)
            x, y, z = 2.3 * torch.cos(t).item() + 30 * c, 2.3 * torch.sin(t).item(), 1.5 * i
            record, name = "ATOM  ", THREE[aa]
            for pos, resname, rec in het:
                if c == 0 and pos == i:
                    record, name = f"{rec:<6}", resname
            for atom, dx in (("N", -1.0), ("CA", 0.0), ("C", 1.0)):
                serial += 1
                lines.append(f"{record}{serial:5d}  {atom:<3} {name} {chain}{i + 1:4d}    "
                             f"{x + dx:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           {atom[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + ["END"]) + "\n")
    return path


def test_one_bad_structure_or_batch_member_fails_alone(tmp_path, monkeypatch, capsys):
    """Issue 18.2: a NaN coordinate in one of six files failed all six ('bincount only supports ...');
    now that file fails at reading, naming the atom, and a protein that breaks an encoder batch is retried
    alone: only it fails, by name, the rest of its batch is kept."""
    for k in range(5):
        write_ca_pdb(tmp_path / "pdb" / f"good{k}.pdb", replicas.random_sequence(20 + k, k))
    bad = write_ca_pdb(tmp_path / "pdb" / "nan.pdb", "MKTAYIAKQR")
    lines = bad.read_text().splitlines()
    lines[3] = lines[3][:38] + f"{'nan':>8}" + lines[3][46:]
    bad.write_text("\n".join(lines) + "\n")
    rc, out, s = run(["--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq", "str"], tmp_path)
    assert rc == 3 and list(s["failed"]) == ["nan"] and s["done"] == 5
    assert "nan.pdb: atom CA of ALA A:4 has a non-finite coordinate" in s["failed"]["nan"]

    real = ef.SeqEncoder.__call__

    def breaks_its_batch(self, seqs):
        if any(x.startswith("MW") for x in seqs):
            raise RuntimeError("index out of range in self")
        return real(self, seqs)
    monkeypatch.setattr(ef.SeqEncoder, "__call__", breaks_its_batch)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMWVLAAGI\n>c\nMSTNPKPQ\n")
    rc, out, s = run(["--fasta", str(fasta), "--modality", "seq"], tmp_path, "batch")
    assert rc == 3 and list(s["failed"]) == ["b"] and s["done"] == 2
    assert s["failed"]["b"] == "seq: RuntimeError: index out of range in self"


def test_chain_policy_for_structure_folders(tmp_path, capsys):
    """Issue 18.3: a two-chain '...-A.pdb' became one concatenated protein; now the chain the name names is
    read, a multi-chain file without one fails by name (or --all-chains: one protein per chain, or --chain)."""
    a, b = "MKTAYIAKQRQISFVK", "GSHMLEDPVDAF"
    chains_pdb(tmp_path / "pdb" / "2AB-A.pdb", {"A": a, "B": b})
    chains_pdb(tmp_path / "pdb" / "multi.pdb", {"A": a, "B": b})
    args = ["--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq", "str"]
    rc, out, s = run(args, tmp_path)
    rows = {r["id"]: r for r in cache.read_manifest(out)}
    assert rc == 3 and rows["2AB-A"]["sequence"] == a and rows["2AB-A"]["chain"] == "A"
    assert list(s["failed"]) == ["multi"] and "holds chains A,B" in s["failed"]["multi"]
    assert "chain policy" in capsys.readouterr().out
    rc, out, s = run(args + ["--all-chains"], tmp_path, "all")
    rows = {r["id"]: r for r in cache.read_manifest(out)}
    assert rc == 0 and sorted(rows) == ["2AB-A", "multi_A", "multi_B"] and rows["multi_B"]["sequence"] == b
    rc, out, s = run(args + ["--chain", "B"], tmp_path, "b")
    assert rc == 0 and {r["id"]: r["sequence"] for r in cache.read_manifest(out)} == {"2AB-A": b, "multi": b}


def test_ids_that_cannot_be_file_names_get_hashed_names(tmp_path):
    """Issue 18.4: a 300-byte FASTA id ended the run with 'File name too long' and lost the batch; now such
    ids (and '/', '~', a leading '.') are stored under a stable hashed name, the manifest keeps the id."""
    long_id, odd = "P" * 300, "sp/P12345/.."
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">{long_id}\nMKTAYIAK\n>{odd}\nMKVLAAGI\n>ok\nMSTNPKPQ\n")
    rc, out, s = run(["--fasta", str(fasta), "--modality", "seq"], tmp_path)
    assert rc == 0 and s["done"] == 3
    assert sorted(r["id"] for r in cache.read_manifest(out)) == sorted([long_id, odd, "ok"])
    assert ef.feature_file("ok") == "ok.pt" and ef.feature_file(long_id) == ef.feature_file(long_id)
    for pid in (long_id, odd):
        name = ef.feature_file(pid)
        assert "~" in name and len(name.encode()) < 100 and "/" not in name and not name.startswith(".")
        assert load(out / "seq" / name).shape == (8, 64)
    assert ef.feature_file(long_id) != ef.feature_file("P" * 301)
    ds = cache.FeatureDataset(out, modalities=("seq",))                     # the readers find them too
    assert {ds[i]["id"]: ds[i]["seq"].shape for i in range(3)}[long_id] == (8, 64)
    assert cache.check_feature_files(out, ds.rows, ("seq",)) == {}


def test_disk_full_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """Issue 18.5: a full disk gave a torch traceback and left '.ID.pt.PID.tmp' behind; now one line naming
    the path and the free space, exit 2, no temporary file; temporary files of dead processes are removed
    (and listed) at the next start, those of living ones kept."""
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMKVLAAGI\n")
    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    rc, out, s = run(["--fasta", str(fasta), "--modality", "seq"], tmp_path)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "free there" in err[0]
    assert f"{out / 'seq'}" in err[0] and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    dead = out / "seq" / ".a.pt.999999999.tmp"
    dead.write_bytes(b"x")
    (out / "manifest.tsv.999999999.tmp").write_text("x")
    alive = out / "seq" / f".b.pt.{os.getppid()}.tmp"                         # another process writing now
    alive.write_bytes(b"x")
    rc, out, s = run(["--fasta", str(fasta), "--modality", "seq"], tmp_path)
    assert rc == 0 and sorted(s["stale_temps_removed"]) == ["manifest.tsv.999999999.tmp", "seq/.a.pt.999999999.tmp"]
    assert not dead.exists() and alive.exists()
    alive.unlink()
    (tmp_path / "file").write_text("x")
    assert ef.main(["--fasta", str(fasta), "--encoders", "tiny", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_modified_residues_are_counted_in_the_summary(tmp_path):
    """Issue 18.7: a HETATM KCX vanished (L 129 -> 128) and ATOM MSE became X; now both are read as their
    parent residue, and every remapped or dropped residue is counted per protein in summary.json."""
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV"
    chains_pdb(tmp_path / "pdb" / "mod.pdb", {"A": seq}, het=[(2, "KCX", "HETATM"), (5, "MSE", "ATOM")])
    rc, out, s = run(["--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq"], tmp_path)
    row = cache.read_manifest(out)[0]
    assert rc == 0 and row["L"] == len(seq) and row["sequence"] == seq[:2] + "K" + seq[3:5] + "M" + seq[6:]
    assert s["residues"] == {"mod": {"remapped": {"KCX->LYS": 1, "MSE->MET": 1}}}


def test_fasta_pairs_headers_and_twin_files(tmp_path, capsys):
    """Issue 18.8-10: a FASTA sequence unrelated to its structure (4,000 vs 129 residues) was accepted and
    replaced; text before the first '>' was dropped; twin.pdb beside twin.pdb.gz kept one silently."""
    seq = replicas.random_sequence(129, 1)
    write_ca_pdb(tmp_path / "pdb" / "far.pdb", seq)
    write_ca_pdb(tmp_path / "pdb" / "twin.pdb", "MKTAYIAK")
    write_ca_pdb(tmp_path / "pdb" / "twin.pdb.gz", "MKTAYIAK")
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">far\n{replicas.random_sequence(4000, 2)}\n>twin\nMKTAYIAK\n")
    for extra in ([], ["--on-mismatch", "structure"]):
        rc, out, s = run(["--fasta", str(fasta), "--pdb-dir", str(tmp_path / "pdb"), "--modality", "seq", *extra],
                         tmp_path)
        assert rc == 3 and list(s["failed"]) == ["far"]
        assert "far.pdb has 129 residues, the given sequence 4000" in s["failed"]["far"]
    assert "twin.pdb.gz (used: twin.pdb)" in capsys.readouterr().err
    fasta.write_text("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV\n>a\nMKVLAAGI\n")
    assert ef.main(["--fasta", str(fasta), "--encoders", "tiny", "--out", str(tmp_path / "h")]) == 2
    assert f"{fasta}:1: text before the first '>' header" in capsys.readouterr().err
