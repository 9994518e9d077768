"""extract_features.py --precision: bf16 autocast against exact fp32 on the tiny encoders (CPU); auto is fp32
on the CPU, bit for bit; the precision is part of the encoder names, so one set never mixes two."""
import json

import torch

import extract_features as ef


def extract(tmp_path, out, *args):
    return ef.main(["--source", "demo", "--encoders", "tiny", "--demo-n", "6", "--data-dir", str(tmp_path / "raw"),
                    "--device", "cpu", "--out", str(tmp_path / out), *args])


def test_bf16_against_fp32_on_the_tiny_encoders(tmp_path, capsys):
    for p in ("fp32", "bf16", "auto"):
        assert extract(tmp_path, p, "--precision", p) == 0
    worst = {}
    for m in ef.MODALITIES:
        files = sorted((tmp_path / "fp32" / m).glob("*.pt"))
        assert files
        for f in files:
            a, b, c = (torch.load(tmp_path / p / m / f.name, weights_only=True).float() for p in ("fp32", "bf16", "auto"))
            assert torch.equal(a, c)                                              # auto on the CPU is exact fp32
            worst[m] = max(worst.get(m, 0.0), ((a - b).abs().max() / a.abs().max()).item())
    with capsys.disabled():
        print("\nbf16 vs fp32, largest |difference| / max |feature| over 6 demo proteins: "
              + ", ".join(f"{m} {v:.2e}" for m, v in worst.items()))
    assert 0 < worst["seq"] < 2e-2 and 0 < worst["func"] < 2e-2               # bf16 ran, and stays close
    assert worst["str"] == 0                                                   # GearNet-Edge: fp32 off CUDA
    encoders = json.loads((tmp_path / "bf16" / "info.json").read_text())["encoders"]
    assert encoders["seq"].endswith(" [bf16]") and encoders["func"].endswith(" [bf16]")
    assert not encoders["str"].endswith("]")
    assert extract(tmp_path, "fp32", "--precision", "bf16") == 2             # no mixing in one set
    assert "holds features of other encoders" in capsys.readouterr().err


def test_precision_resolution():
    assert ef.resolve_precision("auto", "cpu") == "fp32" and ef.resolve_precision("tf32", "cpu") == "fp32"
    assert ef.resolve_precision("auto", "cuda") == "bf16" and ef.structure_precision("bf16", "cuda") == "tf32"
    assert ef.structure_precision("bf16", "cpu") == "fp32" and ef.resolve_precision("bf16", "cpu") == "bf16"
    before = torch.backends.cuda.matmul.allow_tf32
    with ef.forward_precision("tf32", "cuda"):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank extracts half the proteins, the set is merged once both
    are done, and manifest, info, labels and every feature file equal a one-process run's."""
    from conftest import torchrun
    assert extract(tmp_path, "one") == 0                                        # also writes the demo's raw files
    raw = tmp_path / "raw" / "demo"
    args = ["--fasta", raw / "demo.fasta", "--pdb-dir", raw / "pdb", "--protdescribe", raw / "protdescribe.tsv",
            "--source", "fasta", "--encoders", "tiny", "--device", "cpu"]
    assert ef.main([str(a) for a in args] + ["--out", str(tmp_path / "single")]) == 0
    run = torchrun("extract_features.py", *args, "--out", tmp_path / "multi")
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = tmp_path / "single", tmp_path / "multi"
    assert (two / "manifest.shard-0-of-2.tsv").exists() and (two / "manifest.shard-1-of-2.tsv").exists()
    assert (one / "manifest.tsv").read_text() == (two / "manifest.tsv").read_text()
    assert json.loads((one / "info.json").read_text()) == json.loads((two / "info.json").read_text())
    files = sorted(p.relative_to(one) for p in one.glob("*/*.pt"))
    assert len(files) > 12 and files == sorted(p.relative_to(two) for p in two.glob("*/*.pt"))
    for f in files:
        assert torch.equal(torch.load(one / f, weights_only=True), torch.load(two / f, weights_only=True)), f
    bad = torchrun("extract_features.py", *args, "--shard", "1/2", "--out", tmp_path / "x")
    assert bad.returncode != 0 and "torchrun splits the proteins over its 2 processes itself" in bad.stderr
