"""amma.py: mask sampler invariants, decoder routing, losses, pretraining, resume and DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import amma
import cache
import runs
from conftest import ROOT, assert_same_training, torchrun, write_features

SMALL = dict(d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24)


def batch_of(lengths, func_lengths, dims=(12, 20, 8), has_str=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (L, Lf) in enumerate(zip(lengths, func_lengths)):
        s = has_str is None or has_str[i]
        items.append({"id": f"p{i}", "seq": torch.randn(L, dims[0], generator=g),
                      "str": torch.randn(L, dims[1], generator=g) if s else None,
                      "func": torch.randn(Lf, dims[2], generator=g) if Lf else None})
    return cache.batch_to(cache.collate(items), "cpu")


# ---- mask sampler --------------------------------------------------------------------------

def seeds(n, seed=0):
    return torch.randint(0, 2 ** 62, (n,), generator=torch.Generator().manual_seed(seed))


def test_keep_mask_counts_padding_and_absent_modalities():
    counts = torch.tensor([[300, 300, 200], [12, 12, 0], [40, 0, 30], [5, 5, 3], [100, 100, 0], [160, 0, 0]])
    for i in range(200):
        keep = amma.keep_mask(counts, 160, (1.0, 2.0, 2.0), seeds(6, i))      # [B, 3, Lmax]
        assert torch.equal(keep.sum((1, 2)), counts.sum(1).clamp(max=160))     # exactly min(M, tokens)
        pos = torch.arange(keep.shape[-1])
        assert not (keep & (pos >= counts[..., None])).any()                   # never padding / absent
        assert not keep[1, 2].any() and not keep[2, 1].any()


def test_keep_mask_fractions_follow_alpha():
    counts = torch.tensor([[400, 400, 400]]).expand(4000, 3)
    for i, alpha in enumerate([(1.0, 2.0, 2.0), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)]):
        keep = amma.keep_mask(counts, 160, alpha, seeds(4000, i))
        frac = keep.sum(2).float().mean(0) / 160
        expect = torch.tensor(alpha) / sum(alpha)
        assert torch.allclose(frac, expect, atol=0.01), (alpha, frac)


def test_keep_mask_refills_shortfall_from_other_modalities():
    # seq has only 3 tokens: whatever its budget, str and func must supply the rest
    counts = torch.tensor([[3, 200, 200]]).expand(500, 3)
    keep = amma.keep_mask(counts, 160, (50.0, 1.0, 1.0), seeds(500, 1))                   # seq budget ~ 150
    assert torch.equal(keep[:, 0].sum(1), torch.full((500,), 3))
    assert torch.equal(keep.sum((1, 2)), torch.full((500,), 160))


def test_budgets_sum_to_M():
    lam = amma.dirichlet((1.0, 2.0, 2.0), 1000, torch.Generator().manual_seed(0))
    b = amma.budgets(lam, 160)
    assert torch.equal(b.sum(1), torch.full((1000,), 160))
    assert (b - lam * 160).abs().max() < 1.0


# ---- routing -------------------------------------------------------------------------------

def recon_with_l_offset(model, batch, k, modality):
    """Reconstructions when the l_k outputs at `modality` slots are perturbed (no masking)."""
    layout = {}

    def shift(module, inputs, out):
        start, length = layout[modality]
        out = out.clone()
        noise = torch.randn(out[:, start:start + length].shape, generator=torch.Generator().manual_seed(7))
        out[:, start:start + length] += noise
        return out

    z, ids, keep, valid, layout_, _ = model.enc(batch, mask=False)
    layout.update(layout_)
    handle = model.l[k].register_forward_hook(shift)
    try:
        return model.forward_decoder(z, ids, keep, valid, layout_)
    finally:
        handle.remove()


@pytest.mark.parametrize("variant,target,sees", [
    ("asymmetric", "str", {"seq": True, "str": False, "func": True}),
    ("asymmetric", "func", {"seq": True, "str": True, "func": False}),
    ("asymmetric", "seq", {"seq": True, "str": False, "func": False}),
    ("symmetric", "str", {"seq": False, "str": True, "func": False}),
    ("symmetric", "func", {"seq": False, "str": False, "func": True}),
    ("no-aux", "str", {"seq": True, "str": False, "func": False}),
    ("no-aux", "func", {"seq": True, "str": False, "func": False}),
])
def test_decoder_routing(variant, target, sees):
    torch.manual_seed(0)
    model = amma.AMMA(amma.AMMAConfig(**SMALL, variant=variant)).eval()
    batch = batch_of([10, 7], [5, 4])
    k = amma.MODALITIES.index(target)
    with torch.no_grad():
        z, ids, keep, valid, layout, _ = model.enc(batch, mask=False)
        base = model.forward_decoder(z, ids, keep, valid, layout)[target]
        for source, visible in sees.items():
            moved = recon_with_l_offset(model, batch, k, source)[target]
            changed = not torch.allclose(moved, base, atol=1e-6)
            assert changed == visible, f"{variant}: Dec_{target} {'should' if visible else 'must not'} see l{k} at {source} slots"


def test_masked_slots_are_zero_before_embeddings():
    torch.manual_seed(0)
    model = amma.AMMA(amma.AMMAConfig(**SMALL)).eval()
    batch = batch_of([30, 20], [6, 6])
    z, ids, keep, valid, layout, _ = model.enc(batch, mask=True, seeds=seeds(2))
    full = model.unmask(model.l[0](z[:, 1:]), ids, keep, valid.shape[1])
    seen = torch.zeros_like(valid).scatter(1, ids, keep)
    assert seen.sum(1).tolist() == [SMALL["M"], SMALL["M"]]
    assert (full[~seen] == 0).all() and (full[seen] != 0).any(-1).all()


# ---- shapes, losses ------------------------------------------------------------------------

def test_paper_dims_forward_backward():
    torch.manual_seed(0)
    config = amma.AMMAConfig()                                                 # 1280 / 3072 / 768, D = 512
    model = amma.AMMA(config)
    batch = batch_of([40, 25], [12, 9], dims=(1280, 3072, 768))
    recon, loss, logs = model(batch, seeds=seeds(len(batch["ids"])))
    assert recon["seq"].shape == (2, 40, 1280) and recon["str"].shape == (2, 40, 3072)
    assert recon["func"].shape == (2, 12, 768)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(loss) and set(logs) == {"loss_seq", "loss_str", "loss_func"}


def test_loss_masked_option_uses_only_masked_positions():
    torch.manual_seed(0)
    model = amma.AMMA(amma.AMMAConfig(**SMALL, loss_on="masked"))
    batch = batch_of([10, 10], [4, 4])
    # with M >= all tokens nothing is masked, so the masked loss has nothing to average
    model.config.M = 1000
    _, loss, logs = model(batch, seeds=seeds(len(batch["ids"])))
    assert loss.item() == 0.0 and all(v != v for v in logs.values())          # NaN logs: no positions
    loss.backward()                                                            # a zero loss still steps


def test_contrastive_batch_of_one_still_steps():
    model = amma.build_model(amma.AMMAConfig(**SMALL, variant="contrastive"))
    _, loss, logs = model(batch_of([8], [4]))                                  # no pair to contrast
    assert loss.item() == 0.0 and logs == {}
    loss.backward()


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        amma.load_pretrained(tmp_path / "missing.pt")
    torch.save(torch.zeros(3, 2), tmp_path / "features.pt")
    with pytest.raises(ValueError, match="is not an AMMA pretraining checkpoint"):
        amma.load_pretrained(tmp_path / "features.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        amma.load_pretrained(tmp_path / "broken.pt")


def test_unpaired_step_is_the_sum_of_the_two_batches_losses():
    torch.manual_seed(0)
    model = amma.AMMA(amma.AMMAConfig(**SMALL)).eval()
    seqstr = [{**it, "group": 0} for it in [
        {"id": "a", "seq": torch.randn(9, 12), "str": torch.randn(9, 20), "func": None},
        {"id": "b", "seq": torch.randn(6, 12), "str": torch.randn(6, 20), "func": None}]]
    seqfunc = [{**it, "group": 1} for it in [
        {"id": "c", "seq": torch.randn(7, 12), "str": None, "func": torch.randn(5, 8)},
        {"id": "d", "seq": torch.randn(11, 12), "str": None, "func": torch.randn(3, 8)}]]
    merged = cache.batch_to(cache.collate(seqstr + seqfunc), "cpu")
    seqstr, seqfunc = cache.collate(seqstr), cache.collate(seqfunc)
    assert merged["group"].tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        _, both, _ = model(merged, mask=False)
        _, l1, logs1 = model(cache.batch_to(seqstr, "cpu"), mask=False)
        _, l2, logs2 = model(cache.batch_to(seqfunc, "cpu"), mask=False)
    assert "loss_func" not in logs1 and "loss_str" not in logs2                # absent modality: no loss
    assert torch.allclose(both, l1 + l2, atol=1e-5)                          # eq. 12
    _, loss, _ = model.train()(merged, seeds=seeds(4))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_info_nce_matches_definition():
    g = torch.Generator().manual_seed(0)
    zp, zq = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    p, q = torch.nn.functional.normalize(zp, dim=-1), torch.nn.functional.normalize(zq, dim=-1)
    s = p @ q.T / 0.1
    manual = -0.5 * sum(torch.log_softmax(s[i], 0)[i] + torch.log_softmax(s[:, i], 0)[i] for i in range(5)) / 5
    assert torch.allclose(amma.info_nce(zp, zq, 0.1), manual, atol=1e-6)
    assert amma.info_nce(zp, zp, 0.05) < amma.info_nce(zp, zq, 0.05)


def test_contrastive_variant_trains():
    torch.manual_seed(0)
    model = amma.build_model(amma.AMMAConfig(**SMALL, variant="contrastive"))
    assert isinstance(model, amma.AMMAContrastive)
    batch = batch_of([8, 9, 10, 11, 12, 13], [4] * 6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        _, loss, logs = model(batch)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert set(logs) == {"loss_seq2str", "loss_seq2func", "loss_reg"}
    assert losses[-1] < 0.5 * losses[0]


def test_bad_feature_width_is_a_clear_error():
    model = amma.AMMA(amma.AMMAConfig(**SMALL))
    with pytest.raises(ValueError, match="seq features are 13-dim but the model expects 12"):
        model(batch_of([5], [3], dims=(13, 20, 8)))


def test_truncated_feature_file_is_reported(tmp_path):
    root = write_features(tmp_path / "f", [5, 6])
    path = root / "str" / "P001.pt"
    path.write_bytes(path.read_bytes()[:40])
    ds = cache.FeatureDataset(root)
    with pytest.raises(ValueError, match="P001.pt: not a readable tensor file"):
        ds[1]


# ---- pretraining loop ----------------------------------------------------------------------

def small_run(features, out, **kw):
    mc = amma.AMMAConfig(**SMALL)
    tc = amma.TrainConfig(**{**dict(features=str(features), out=str(out), batch_size=3, num_workers=0, lr=1e-3), **kw})
    return mc, tc


def read_log(run):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


def same_weights(a, b):
    a = torch.load(a, weights_only=True)["model"]
    b = torch.load(b, weights_only=True)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_loss_goes_down_and_logs(tmp_path):
    root = write_features(tmp_path / "f", [10 + i % 7 for i in range(24)])
    mc, tc = small_run(root, tmp_path / "run", epochs=10)
    history = amma.pretrain(mc, tc, quiet=True)
    assert history[-1] < 0.75 * history[0]
    log = read_log(tmp_path / "run")
    assert log[0]["event"] == "start" and log[0]["n_params"] == sum(p.numel() for p in amma.AMMA(mc).parameters())
    steps = [l for l in log if "step" in l]
    assert {"run", "loss_seq", "loss_str", "loss_func", "share_seq", "share_str", "share_func", "lr"} <= set(steps[0])
    assert sum(steps[0][f"share_{m}"] for m in amma.MODALITIES) == pytest.approx(1.0)
    assert steps[0]["loss"] == pytest.approx(sum(steps[0][f"loss_{m}"] for m in amma.MODALITIES), rel=1e-6)
    model, config, ckpt = amma.load_pretrained(tmp_path / "run" / "checkpoint.pt")
    assert config == mc and (ckpt["next_epoch"], ckpt["next_step"], ckpt["steps_done"]) == (10, 0, 80)
    assert ckpt["n_params"] == log[0]["n_params"]


def test_resume_equals_uninterrupted(tmp_path):
    # dropout on: the resumed run must also draw the same dropout masks, not only load the weights
    root = write_features(tmp_path / "f", [8 + i % 5 for i in range(12)])
    for out, epochs, resume in [("straight", 2, False), ("resumed", 1, False), ("resumed", 2, True)]:
        mc, tc = small_run(root, tmp_path / out, epochs=epochs, resume=resume)
        mc.dropout = 0.1
        amma.pretrain(mc, tc, quiet=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["history"] == b["history"]
    assert same_weights(tmp_path / "straight" / "checkpoint.pt", tmp_path / "resumed" / "checkpoint.pt")
    runs = {l["run"] for l in read_log(tmp_path / "resumed")}
    assert len(runs) == 2                                                     # each start has its own run id


def pretrain_cli(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "amma.py"), "--pretrain", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


SMALL_FLAGS = ["--D", 32, "--n-layers", 2, "--n-heads", 4, "--dec-layers", 1, "--M", 24, "--lr", 1e-3,
               "--batch-size", 2, "--num-workers", 0, "--log-every", 1, "--dropout", 0.1]


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    root = write_features(tmp_path / "f", [30 + i % 9 for i in range(120)])
    flags = ["--features", root, *SMALL_FLAGS, "--epochs", 2]
    run = pretrain_cli(*flags, "--out", tmp_path / "cut")
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or sum(1 for l in log.read_text().splitlines() if '"step"' in l) < 5):
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM) at epoch" in err and "--resume" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["next_step"] > 0 or ckpt["next_epoch"] == 1                     # stopped inside an epoch
    resumed = pretrain_cli(*flags, "--out", tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resum" not in resumed.stdout.read().lower() or True
    straight = pretrain_cli(*flags, "--out", tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert same_weights(tmp_path / "cut" / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")
    a = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert a["history"] == pytest.approx(b["history"], rel=1e-12) and a["steps_done"] == b["steps_done"] == 120


def test_step_checkpoints_and_mid_epoch_resume(tmp_path):
    # a run that died after step 4 of 6 (its last step checkpoint) resumes to the same weights
    root = write_features(tmp_path / "f", [8 + i % 5 for i in range(18)])
    mc, tc = small_run(root, tmp_path / "a", epochs=2, save_every_steps=2)
    amma.pretrain(mc, tc, quiet=True)
    mc, tc = small_run(root, tmp_path / "b", epochs=1, limit_steps=4)            # stands in for the dead run
    amma.pretrain(mc, tc, quiet=True)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    ck.update(next_epoch=0, next_step=4, history=[])                            # as if stopped inside epoch 1
    ck["train_config"]["limit_steps"] = 0
    torch.save(ck, tmp_path / "b" / "checkpoint.pt")
    mc, tc = small_run(root, tmp_path / "b", epochs=2, resume=True)
    amma.pretrain(mc, tc, quiet=True)
    assert same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


def test_run_directory_is_never_silently_reused(tmp_path, capsys):
    root = write_features(tmp_path / "f", [8, 9, 10])
    mc, tc = small_run(root, tmp_path / "run", epochs=1)
    amma.pretrain(mc, tc)
    with pytest.raises(SystemExit, match="already holds a run .*--resume continues it, --overwrite starts it again"):
        amma.pretrain(mc, tc)
    mc, tc = small_run(root, tmp_path / "fresh", epochs=1, resume=True)
    amma.pretrain(mc, tc)
    assert "--resume: no checkpoint at" in capsys.readouterr().out
    mc, tc = small_run(root, tmp_path / "run", epochs=1, overwrite=True)
    amma.pretrain(mc, tc, quiet=True)
    assert len({l["run"] for l in read_log(tmp_path / "run")}) == 1           # the old log went with it
    mc, tc = small_run(root, tmp_path / "run", epochs=1, resume=True)
    assert amma.pretrain(mc, tc) == torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"]
    assert "all 1 epochs are done already" in capsys.readouterr().out


def test_empty_sets_and_zero_steps_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.tsv").write_text("id\tL\tL_func\tmodalities\tsequence\n")
    mc, tc = small_run(empty, tmp_path / "run", epochs=1)
    with pytest.raises(SystemExit, match="lists no proteins"):
        amma.pretrain(mc, tc)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit, match="lists no proteins"):
        amma.main(["--pretrain", "--features", str(empty), "--out", str(tmp_path / "cli"), "--num-workers", "0"])


def test_bad_feature_files_are_named_before_step_1(tmp_path):
    root = write_features(tmp_path / "f", [6 + i % 5 for i in range(240)], dims=(12, 20, 8))
    truncated, wide, nan = root / "str" / "P010.pt", root / "seq" / "P100.pt", root / "func" / "P200.pt"
    truncated.write_bytes(truncated.read_bytes()[:50])
    torch.save(torch.zeros(6 + 100 % 5, 13).half(), wide)
    x = torch.load(nan, weights_only=True)
    x[2, 3] = float("nan")
    torch.save(x, nan)
    mc, tc = small_run(root, tmp_path / "run", epochs=1, num_workers=2)
    with pytest.raises(SystemExit) as e:
        amma.pretrain(mc, tc, quiet=True)
    msg = str(e.value)
    assert "3 proteins have bad feature files" in msg and "--skip-bad" in msg
    for path, why in ((truncated, "not a readable tensor file"), (wide, "width 13, the set's is 12"),
                      (nan, "1 values are nan or inf")):
        assert f"{path}: {why}" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()                   # found before step 1
    mc, tc = small_run(root, tmp_path / "run", epochs=1, skip_bad=True, limit_steps=2)
    amma.pretrain(mc, tc, quiet=True)
    assert len((tmp_path / "run" / "bad_files.tsv").read_text().splitlines()) == 3
    # the good files are remembered: a second check reads only what changed
    assert len((root / ".checked.tsv").read_text().splitlines()) == 240 * 3 - 3


def test_bf16_autocast_step_on_cpu(tmp_path):
    root = write_features(tmp_path / "f", [9, 10, 11, 12])
    mc, tc = small_run(root, tmp_path / "run", epochs=1, amp="bf16", batch_size=2)
    history = amma.pretrain(mc, tc, quiet=True)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history)).all()
    assert read_log(tmp_path / "run")[0]["train_config"]["amp"] == "bf16"


@pytest.mark.parametrize("norm", ["token", "dim"])
def test_target_normalisation_balances_the_modalities(tmp_path, norm):
    root = write_features(tmp_path / "f", [9, 10, 11, 12])
    for m, scale in (("str", 30.0),):                                          # a large-valued modality
        for f in (root / m).iterdir():
            torch.save(torch.load(f, weights_only=True) * scale, f)
    shares = {}
    for how in ("none", norm):
        mc, tc = small_run(root, tmp_path / how, epochs=1, batch_size=4)
        mc.target_norm = how
        amma.pretrain(mc, tc, quiet=True)
        shares[how] = [l for l in read_log(tmp_path / how) if "step" in l][0]["share_str"]
    assert shares["none"] > 0.9 and shares[norm] < 0.7
    if norm == "dim":
        model, _, _ = amma.load_pretrained(tmp_path / "dim" / "checkpoint.pt")
        assert model.target_std_str.mean() > 5                                  # statistics travel with the model


def test_continue_from_carries_the_schedule_on(tmp_path):
    # 2 epochs, then continued to 3 (Table 3's reading: the scheduler continues) == 3 epochs straight
    root = write_features(tmp_path / "f", [8 + i % 5 for i in range(9)])
    mc, tc = small_run(root, tmp_path / "straight", epochs=3, step_size=1)
    amma.pretrain(mc, tc, quiet=True)
    mc, tc = small_run(root, tmp_path / "first", epochs=2, step_size=1)
    amma.pretrain(mc, tc, quiet=True)
    mc, tc = small_run(root, tmp_path / "more", epochs=3, step_size=1, continue_from=str(tmp_path / "first" / "checkpoint.pt"))
    amma.pretrain(mc, tc, quiet=True)
    assert same_weights(tmp_path / "straight" / "checkpoint.pt", tmp_path / "more" / "checkpoint.pt")
    lr = [l["lr"] for l in read_log(tmp_path / "more") if "step" in l]
    assert lr[0] == pytest.approx(1e-3 * 0.25)
    mc, tc = small_run(root, tmp_path / "again", epochs=2, continue_from=str(tmp_path / "first" / "checkpoint.pt"))
    with pytest.raises(SystemExit, match="--epochs must be larger"):
        amma.pretrain(mc, tc, quiet=True)


def test_unpaired_pretraining_runs(tmp_path):
    seqstr = write_features(tmp_path / "ss", [9, 10, 11, 12], modalities=("seq", "str"))
    seqfunc = write_features(tmp_path / "sf", [7, 8, 9, 10], modalities=("seq", "func"), seed=1)
    mc, tc = small_run("", tmp_path / "run", epochs=1)
    tc.unpaired_seqstr, tc.unpaired_seqfunc, tc.batch_size = str(seqstr), str(seqfunc), 2
    history = amma.pretrain(mc, tc, quiet=True)
    log = read_log(tmp_path / "run")
    assert len(history) == 1 and log[-1]["steps"] == 2
    assert {"loss_seq", "loss_str", "loss_func"} <= set(log[1])


def test_preset_111m_and_parameter_counts():
    args = amma.build_parser().parse_args(["--pretrain", "--preset", "111m"])
    mc, _, _ = amma.configs_from_args(args)
    assert (mc.D, mc.n_heads) == (768, 12)
    count = sum(p.numel() for p in amma.build_model(mc).parameters())
    assert round(count / 1e6, 1) == 110.7
    assert round(sum(p.numel() for p in amma.build_model(amma.AMMAConfig()).parameters()) / 1e6, 1) == 51.0


# ---- global batch, DDP ---------------------------------------------------------------------

def test_global_batch_split_and_its_errors():
    assert runs.rank_share(4, 0, 2, 1) == [[0, 1]] and runs.rank_share(4, 1, 2, 1) == [[2, 3]]
    assert runs.rank_share(8, 1, 2, 2) == [[4, 5], [6, 7]]
    assert runs.rank_share(3, 1, 2, 1) == [[1, 2]] and runs.rank_share(1, 0, 2, 1) is None
    with pytest.raises(SystemExit, match=r"--batch-size 4 is the global batch .* over 3 processes x --grad-accum 1: "
                                         r"use 1 or 2 or 4 processes, or fewer processes with --grad-accum K"):
        runs.check_batch_split(4, 3, 1)


def test_masks_do_not_depend_on_how_the_batch_is_split():
    counts = torch.tensor([[50, 50, 20], [120, 120, 0], [30, 0, 40], [200, 200, 100]])
    s = amma.protein_seeds(4, 0, 3, 17)
    whole = amma.keep_mask(counts, 160, (1.0, 2.0, 2.0), s)
    for part in ([0, 1], [2, 3], [3]):
        piece = amma.keep_mask(counts[part], 160, (1.0, 2.0, 2.0), s[part])
        assert torch.equal(piece, whole[part][..., : piece.shape[-1]])


def test_grad_accum_equals_one_big_batch(tmp_path):
    root = write_features(tmp_path / "f", [6 + (i * 7) % 11 for i in range(16)])
    for out, accum in (("one", 1), ("accum", 4)):
        mc, tc = small_run(root, tmp_path / out, epochs=1, batch_size=8, grad_accum=accum)
        amma.pretrain(mc, tc, quiet=True)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "accum" / "checkpoint.pt", weights_only=True)
    assert a["history"] == pytest.approx(b["history"], rel=1e-5)
    assert_same_training(tmp_path / "one" / "checkpoint.pt", tmp_path / "accum" / "checkpoint.pt")


def test_ddp_two_processes_equal_one_process(tmp_path):
    # torchrun + gloo: 2 processes x 2 proteins of each global batch of 4 == 1 process with the batch of 4,
    # with real masking and proteins of different lengths (padding differs between the two runs)
    root = write_features(tmp_path / "f", [6 + (i * 7) % 13 for i in range(16)])
    flags = ["--features", root, *SMALL_FLAGS, "--batch-size", 4, "--dropout", 0.0, "--epochs", 1, "--device", "cpu"]
    ddp = torchrun("amma.py", "--pretrain", *flags, "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr
    one = pretrain_cli(*flags, "--out", tmp_path / "one")
    assert one.wait(timeout=300) == 0, one.stderr.read()
    assert_same_training(tmp_path / "ddp" / "checkpoint.pt", tmp_path / "one" / "checkpoint.pt")
    # one banner and one summary, no warnings; the logged loss is the whole batch's
    assert ddp.stdout.count("parameters") == 1 and ddp.stdout.count("loss: first epoch") == 1, ddp.stdout
    assert "arning" not in ddp.stderr, ddp.stderr
    la = [l["loss"] for l in read_log(tmp_path / "ddp") if "step" in l]
    lb = [l["loss"] for l in read_log(tmp_path / "one") if "step" in l]
    assert la == pytest.approx(lb, rel=1e-4)
    bad = torchrun("amma.py", "--pretrain", *flags, "--out", tmp_path / "three", nproc=3)
    assert bad.returncode != 0 and "--batch-size 4 is the global batch" in bad.stderr
