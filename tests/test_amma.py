"""amma.py: mask sampler invariants, decoder routing, losses, pretraining, resume and DDP."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import amma
from conftest import write_features

SMALL = dict(d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24)


def batch_of(lengths, func_lengths, dims=(12, 20, 8), has_str=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (L, Lf) in enumerate(zip(lengths, func_lengths)):
        s = has_str is None or has_str[i]
        items.append({"id": f"p{i}", "seq": torch.randn(L, dims[0], generator=g),
                      "str": torch.randn(L, dims[1], generator=g) if s else None,
                      "func": torch.randn(Lf, dims[2], generator=g) if Lf else None})
    return amma.batch_to(amma.collate(items), "cpu")


# ---- mask sampler --------------------------------------------------------------------------

def test_keep_mask_counts_padding_and_absent_modalities():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([[300, 300, 200], [12, 12, 0], [40, 0, 30], [5, 5, 3], [100, 100, 0], [160, 0, 0]])
    for _ in range(200):
        keep = amma.keep_mask(counts, 160, (1.0, 2.0, 2.0), g)                 # [B, 3, Lmax]
        assert torch.equal(keep.sum((1, 2)), counts.sum(1).clamp(max=160))     # exactly min(M, tokens)
        pos = torch.arange(keep.shape[-1])
        assert not (keep & (pos >= counts[..., None])).any()                   # never padding / absent
        assert not keep[1, 2].any() and not keep[2, 1].any()


def test_keep_mask_fractions_follow_alpha():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([[400, 400, 400]]).expand(4000, 3)
    for alpha in [(1.0, 2.0, 2.0), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)]:
        keep = amma.keep_mask(counts, 160, alpha, g)
        frac = keep.sum(2).float().mean(0) / 160
        expect = torch.tensor(alpha) / sum(alpha)
        assert torch.allclose(frac, expect, atol=0.01), (alpha, frac)


def test_keep_mask_refills_shortfall_from_other_modalities():
    # seq has only 3 tokens: whatever its budget, str and func must supply the rest
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([[3, 200, 200]]).expand(500, 3)
    keep = amma.keep_mask(counts, 160, (50.0, 1.0, 1.0), g)                   # seq budget ~ 150
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
    z, ids, keep, valid, layout, _ = model.enc(batch, mask=True, generator=torch.Generator().manual_seed(0))
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
    recon, loss, logs = model(batch, generator=torch.Generator().manual_seed(0))
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
    _, loss, logs = model(batch, generator=torch.Generator().manual_seed(0))
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
    seqstr = amma.collate([{**it, "group": 0} for it in [
        {"id": "a", "seq": torch.randn(9, 12), "str": torch.randn(9, 20), "func": None},
        {"id": "b", "seq": torch.randn(6, 12), "str": torch.randn(6, 20), "func": None}]])
    seqfunc = amma.collate([{**it, "group": 1} for it in [
        {"id": "c", "seq": torch.randn(7, 12), "str": None, "func": torch.randn(5, 8)},
        {"id": "d", "seq": torch.randn(11, 12), "str": None, "func": torch.randn(3, 8)}]])
    merged = amma.batch_to(amma.collate_pair(seqstr, seqfunc), "cpu")
    assert merged["group"].tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        _, both, _ = model(merged, mask=False)
        _, l1, logs1 = model(amma.batch_to(seqstr, "cpu"), mask=False)
        _, l2, logs2 = model(amma.batch_to(seqfunc, "cpu"), mask=False)
    assert "loss_func" not in logs1 and "loss_str" not in logs2                # absent modality: no loss
    assert torch.allclose(both, l1 + l2, atol=1e-5)                          # eq. 12
    _, loss, _ = model.train()(merged, generator=torch.Generator().manual_seed(0))
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
    ds = amma.FeatureDataset(root)
    with pytest.raises(ValueError, match="P001.pt: not a readable tensor file"):
        ds[1]


# ---- pretraining loop ----------------------------------------------------------------------

def small_run(features, out, **kw):
    mc = amma.AMMAConfig(**SMALL)
    tc = amma.TrainConfig(features=str(features), out=str(out), batch_size=3, num_workers=0, lr=1e-3, **kw)
    return mc, tc


def test_pretraining_loss_goes_down_and_logs(tmp_path):
    root = write_features(tmp_path / "f", [10 + i % 7 for i in range(24)])
    mc, tc = small_run(root, tmp_path / "run", epochs=10)
    history = amma.pretrain(mc, tc, quiet=True)
    assert history[-1] < 0.75 * history[0]
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss_seq", "loss_str", "loss_func", "lr"} <= set(log[0])
    model, config, ckpt = amma.load_pretrained(tmp_path / "run" / "checkpoint.pt")
    assert config == mc and ckpt["epoch"] == 9


def test_resume_equals_uninterrupted(tmp_path):
    # dropout on: the resumed run must also continue the random stream, not only the weights
    root = write_features(tmp_path / "f", [8 + i % 5 for i in range(12)])
    for out, epochs, resume in [("straight", 2, False), ("resumed", 1, False), ("resumed", 2, True)]:
        mc, tc = small_run(root, tmp_path / out, epochs=epochs, resume=resume)
        mc.dropout = 0.1
        amma.pretrain(mc, tc, quiet=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_unpaired_pretraining_runs(tmp_path):
    seqstr = write_features(tmp_path / "ss", [9, 10, 11, 12], modalities=("seq", "str"))
    seqfunc = write_features(tmp_path / "sf", [7, 8, 9, 10], modalities=("seq", "func"), seed=1)
    mc, tc = small_run("", tmp_path / "run", epochs=1)
    tc.unpaired_seqstr, tc.unpaired_seqfunc, tc.batch_size = str(seqstr), str(seqfunc), 2
    history = amma.pretrain(mc, tc, quiet=True)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(history) == 1 and log[-1]["steps"] == 2
    assert {"loss_seq", "loss_str", "loss_func"} <= set(log[0])


def _ddp_worker(rank, world, port, features, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    mc = amma.AMMAConfig(**{**SMALL, "M": 1000})
    tc = amma.TrainConfig(features=features, out=out, epochs=1, batch_size=2, num_workers=0, device="cpu")
    amma.pretrain(mc, tc, quiet=True)


def test_ddp_two_processes_equal_one_process(tmp_path):
    # equal lengths and M >= all tokens: the two half-batches see exactly what the whole batch sees
    root = write_features(tmp_path / "f", [9, 9, 9, 9])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(root), str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    mc = amma.AMMAConfig(**{**SMALL, "M": 1000})
    tc = amma.TrainConfig(features=str(root), out=str(tmp_path / "one"), epochs=1, batch_size=4, num_workers=0)
    amma.pretrain(mc, tc, quiet=True)
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    # Adam's first moment after one step is 0.1 * gradient: DDP's averaged gradient equals the whole batch's
    for i, state in a["optimizer"]["state"].items():
        assert torch.allclose(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"], atol=1e-8), i
    # parameters agree wherever the gradient is not float noise (Adam turns noise into +-lr steps)
    for (k, pa), state in zip(a["model"].items(), b["optimizer"]["state"].values()):
        real = state["exp_avg"].abs() > 1e-7
        assert torch.allclose(pa[real], b["model"][k][real], atol=1e-6), k
