"""The real code path end to end on format-exact replicas of the real inputs, with the network cut.

`--encoders real` loads the replica ESM-1b (fair-esm's file layout, with training state), the replica
PubMedBERT folder and the replica GearNet-Edge solver checkpoint; every source (FASTA, PDB folder,
ProtDescribe, AlphaFold folder and tar, torchdrug's EC zip and the folder torchdrug extracts it to,
GO zip) is extracted; then amma.py pretrains two steps on the paired set and finetune.py trains EC and
GO-MF two steps on the frozen features, and EC again without --esm: on real-ESM features that is the
paper's protocol, ESM-1b (rebuilt from info.json) trained in the loop. Any attempt to open a network
connection fails the test."""
import json
import math
import socket

import pytest
import torch

import amma
import cache
import extract_features as ef
import finetune
import replicas


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: Hugging Face in offline mode, torch hub downloads and every socket connection refused."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network disabled by the test (connection to {address})")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("ESM download attempted"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield attempts
    assert attempts == [], f"network connections attempted: {attempts}"


def test_real_encoders_on_replicas_of_every_source_then_pretrain_and_finetune(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)                                   # runs/ of the finetuning defaults land here
    weights = tmp_path / "weights"
    weights.mkdir()
    esm_path = weights / f"{ef.ESM1B_NAME}.pt"
    replicas.write_esm1b(esm_path, layers=33, dim=32)
    bert = replicas.write_bert_dir(weights / "BiomedNLP-PubMedBERT-base-uncased-abstract", hidden=32)
    gearnet_ckpts, _ = replicas.write_gearnet_checkpoints(weights / "gearnet", hidden=(16, 16, 16))
    real = ["--encoders", "real", "--esm-weights", str(esm_path), "--text-model", str(bert),
            "--gearnet-ckpt", str(gearnet_ckpts["solver"]), "--device", "cpu"]

    def extract(name, *args):
        out = tmp_path / "features" / name
        assert ef.main([*args, *real, "--out", str(out)]) == 0, name
        info = json.loads((out / "info.json").read_text())
        assert info["tiny"] is False and info["synthetic"] is False and ef.is_real_esm(info)
        assert (info["esm_model"], info["esm_weights"], info["esm_layer"]) == (ef.ESM1B_NAME, str(esm_path), 33)
        assert info["encoders"]["seq"] == ef.ESM1B_NAME
        return out, info

    # inputs
    accs = ["P00698", "P69905", "P04637", "Q9Y6K9", "O15530", "P12345", "P31749"]
    seqs = {a: replicas.random_sequence(24 + 3 * k, 300 + k) for k, a in enumerate(accs)}
    data = tmp_path / "data"
    af = replicas.write_alphafold_dir(data / "afdb", {a: seqs[a] for a in accs[:6]})
    tar = replicas.write_alphafold_tar(data / "swissprot_pdb_v2.tar", af)
    pd_path = data / "uniprot_sprot_filtered.tsv"
    pd_path.write_text(replicas.protdescribe_text(replicas.protdescribe_rows({a: seqs[a] for a in accs[1:]}),
                                                  "Entry", extra={2}))
    (data / "prot.fasta").write_text("".join(f">{a}\n{seqs[a]}\n" for a in accs[:3]))
    (data / "pdb").mkdir()
    for k, a in enumerate(accs[:3]):
        (data / "pdb" / f"{a}.pdb").write_text(replicas.pdb_text(seqs[a], seed=k))
    ec_zip, ec_md5 = replicas.write_torchdrug_zip(data / "dl", "ec", replicas.task_replica("ec", seed=1))
    go_zip, go_md5 = replicas.write_torchdrug_zip(data / "dl", "go", replicas.task_replica("go", seed=2))
    monkeypatch.setitem(ef.TORCHDRUG_ZIPS, "ec", (*ef.TORCHDRUG_ZIPS["ec"][:2], ec_md5))
    monkeypatch.setitem(ef.TORCHDRUG_ZIPS, "go", (*ef.TORCHDRUG_ZIPS["go"][:2], go_md5))
    ec_folder = replicas.torchdrug_extract(ec_zip)

    # every source through the real encoders
    out, info = extract("fasta", "--fasta", str(data / "prot.fasta"), "--pdb-dir", str(data / "pdb"),
                        "--protdescribe", str(pd_path))
    assert info["dims"] == {"seq": 32, "str": 48, "func": 32}
    rows = {r["id"]: r for r in cache.read_manifest(out)}
    assert rows["P69905"]["modalities"] == ("seq", "str", "func") and rows["P00698"]["modalities"] == ("seq", "str")
    extract("pdb", "--pdb-dir", str(data / "pdb"), "--modality", "seq", "str")
    extract("protdescribe", "--protdescribe", str(pd_path), "--modality", "seq", "func")
    paired, info = extract("pretrain", "--af-dir", str(af), "--protdescribe", str(pd_path), "--pick", "4", "1", "1")
    assert len(cache.read_manifest(paired)) == 4 and info["dims"] == {"seq": 32, "str": 48, "func": 32}
    assert len(cache.read_manifest(paired.parent / "seqstr")) == len(cache.read_manifest(paired.parent / "seqfunc")) == 1
    from_tar, _ = extract("pretrain_tar", "--af-dir", str(tar), "--protdescribe", str(pd_path))
    picked = [r["id"] for r in cache.read_manifest(paired)]
    assert len(cache.read_manifest(from_tar)) == 5 and set(picked) <= {r["id"] for r in cache.read_manifest(from_tar)}
    for m in ("seq", "str", "func"):                             # the tar, read in place, gives what its folder gives
        assert all(torch.equal(torch.load(from_tar / m / f"{i}.pt", weights_only=True),
                               torch.load(paired / m / f"{i}.pt", weights_only=True)) for i in picked)
    ec, _ = extract("ec", "--data", str(ec_zip), "--data-dir", str(data), "--modality", "seq", "str")
    ec_dir, _ = extract("ec_dir", "--source", "ec", "--data", str(ec_folder), "--modality", "seq", "str")
    assert (ec / "labels_ec.json").read_text() == (ec_dir / "labels_ec.json").read_text()
    go, _ = extract("go", "--data", str(go_zip), "--data-dir", str(data), "--modality", "seq", "str")

    # pretraining on the paired set, finetuning on EC and GO-MF (frozen ESM features)
    history = amma.main(["--pretrain", "--features", str(paired), "--out", str(tmp_path / "runs" / "amma"),
                         "--epochs", "1", "--limit-steps", "2", "--batch-size", "2", "--num-workers", "0"])
    assert history and all(math.isfinite(h) for h in history)
    ckpt = tmp_path / "runs" / "amma" / "checkpoint.pt"
    for task, features in (("ec", ec), ("go-mf", go)):
        out = tmp_path / "runs" / "amma" / task
        finetune.main(["--task", task, "--ckpt", str(ckpt), "--features", str(features), "--epochs", "1",
                       "--limit-steps", "2", "--num-workers", "0", "--esm", "frozen", "--out", str(out)])
        result = json.loads((out / "results.json").read_text())
        assert math.isfinite(result["test"]["fmax"]) and math.isfinite(result["test"]["aupr"]), task

    # the paper's protocol by default on real-ESM features: ESM-1b (the replica, rebuilt from info.json) in the loop
    out = tmp_path / "runs" / "amma" / "ec-default"
    result = finetune.main(["--task", "ec", "--ckpt", str(ckpt), "--features", str(ec), "--epochs", "1",
                            "--limit-steps", "2", "--batch-size", "2", "--num-workers", "0", "--out", str(out)])
    assert result["protocol"] == "esm-finetune" and result["config"]["esm"] == "finetune"
    tuned = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    start = replicas.write_esm1b(tmp_path / "again.pt", layers=33, dim=32).state_dict()
    key = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[f"esm.model.{key}"], start[key])             # ESM-1b itself was trained
