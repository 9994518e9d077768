"""extract_features.py --precision: bf16 autocast against exact fp32 on the tiny encoders (CPU); auto is fp32
on the CPU, bit for bit; the precision is part of the encoder names, so one set never mixes two."""
import json

import pytest
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
        print(f"\nbf16 vs fp32, largest |difference| / max |feature| over 6 demo proteins: "
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
