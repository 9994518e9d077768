"""finetune.py: test cutoffs on DeepFRI labels, checkpoint loading, ESM in the loop, evaluation
gathering, bad input, and the demo against the label-frequency baseline. CPU, offline, small."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import amma
import cache
import extract_features as ef
import finetune as ft
from conftest import assert_same_training, need_shared, torchrun, write_features

DIMS = (12, 20, 8)
TINY = dict(D=16, n_layers=1, n_heads=2, dec_layers=1, M=12)


def write_labels(root, ids, task="go-mf", n_terms=5, **extra):
    """labels_<task>.json: class = protein number mod n_terms (+ one shared class); 60/20/20 split."""
    labels = {x: sorted({i % n_terms, 0}) for i, x in enumerate(ids)}
    n = len(ids)
    splits = {"train": ids[: n * 6 // 10], "valid": ids[n * 6 // 10: n * 8 // 10], "test": ids[n * 8 // 10:]}
    data = {"task": task, "terms": [f"T{i}" for i in range(n_terms)], "labels": labels, "splits": splits,
            "test_identity": {x: {"95": 1, "50": int(k % 2 == 0)} for k, x in enumerate(splits["test"])},
            "source": "test", **extra}
    (Path(root) / f"labels_{task}.json").write_text(json.dumps(data))
    return data


def feature_set(root, n=10, dims=DIMS, info=None):
    write_features(root, [8 + (3 * i) % 7 for i in range(n)], dims=dims)
    if info is not None:
        (Path(root) / "info.json").write_text(json.dumps(info))
    return root, write_labels(root, [f"P{i:03d}" for i in range(n)])


def pretrain_tiny(features, out, dims=DIMS, variant="asymmetric", **model):
    mc = amma.AMMAConfig(d_seq=dims[0], d_str=dims[1], d_func=dims[2], variant=variant, **{**TINY, **model})
    tc = amma.TrainConfig(features=str(features), out=str(out), epochs=1, batch_size=4, num_workers=0)
    amma.pretrain(mc, tc, quiet=True)
    return Path(out) / "checkpoint.pt"


def run(tmp_path, *args):
    return ft.main(["--task", "go-mf", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "out"),
                    "--epochs", "1", "--num-workers", "0", "--batch-size", "2", *args])


# ---- labels and cutoffs ------------------------------------------------------------------------

def test_cutoffs_on_deepfri_ec_labels(tmp_path):
    """labels_ec.json as extract_features.py writes it from DeepFRI's files (its readers are tested in
    test_extract.py): finetune keeps 720 / 902 / 1,117 / 1,476 / 1,919 test chains at 30..95%."""
    root = need_shared("data", "deepfri")
    terms, labels = ef.read_deepfri_annot(root / "nrPDB-EC_2020.04_annot.tsv")
    splits = {s: ef.read_split(root / f"nrPDB-EC_2020.04_{s}.txt") for s in ("train", "valid", "test")}
    identity = ef.read_test_csv(root / "nrPDB-EC_2020.04_test.csv")
    ef.write_labels(tmp_path, "ec", terms["ec"], labels["ec"], splits, identity, "deepfri")
    data = ft.read_labels(tmp_path / "labels_ec.json", "ec")
    kept = [len(ft.apply_cutoff(data["splits"]["test"], data["test_identity"], c)) for c in ft.CUTOFFS]
    assert kept == [720, 902, 1117, 1476, 1919]
    # the dense targets put each chain's classes at the term list's positions (3.2.2.9 and 3.2.2.-)
    y = ft.label_matrix(["4PR3-A", "2PVS-A"], data["labels"], len(data["terms"]))
    assert y.shape == (2, 538) and y.sum().item() == 4
    assert [data["terms"][i] for i in y[0].nonzero().flatten().tolist()] == ["3.2.2.9", "3.2.2.-"]


def test_bad_labels_give_one_line_errors(tmp_path, capsys):
    root, data = feature_set(tmp_path / "f")
    path = root / "labels_go-mf.json"
    cases = {"unknown term": ({**data, "labels": {**data["labels"], "P000": ["GO:nope"]}}, "not in the file's"),
             "index out of range": ({**data, "labels": {**data["labels"], "P001": [5]}}, "classes are 0..4"),
             "another task": ({**data, "task": "go-bp"}, "not 'go-mf'"),
             "unlabelled id": ({**data, "labels": {k: v for k, v in data["labels"].items() if k != "P000"}},
                               "no labels entry")}
    for name, (bad, message) in cases.items():
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=message):
            run(tmp_path, "--from-scratch")
    path.unlink()
    with pytest.raises(SystemExit, match="labels_go-mf.json not found"):
        run(tmp_path, "--from-scratch")
    with pytest.raises(SystemExit) as e:                           # argparse: not a task
        ft.main(["--task", "go-xx", "--from-scratch"])
    assert e.value.code == 2 and "invalid choice: 'go-xx'" in capsys.readouterr().err
    term = ft.read_labels  # term strings from the term list are accepted and mapped to their index
    path.write_text(json.dumps({**data, "labels": {**data["labels"], "P000": ["T3", 1]}}))
    assert term(path, "go-mf")["labels"]["P000"] == [3, 1]
    assert ft.apply_cutoff(data["splits"]["test"], data["test_identity"], 50) == data["splits"]["test"][::2]


# ---- pretrained checkpoints --------------------------------------------------------------------

def test_pretrained_checkpoint_loads_encoder_only(tmp_path):
    root, _ = feature_set(tmp_path / "f")
    ckpt = pretrain_tiny(root, tmp_path / "pre")
    mc, pre = ft.read_pretrained(ckpt)
    state = pre["model"]
    model = ft.FunctionModel(mc, 5)
    missing, unexpected = ft.load_backbone(model, state)
    assert sorted(missing) == sorted(f"head.{k}" for k in model.head.state_dict())
    assert unexpected and all(k.startswith(("l.", "dec.", "dec_modality_embed")) for k in unexpected)
    assert any(k.startswith("dec.") for k in unexpected) and "l.0.weight" in unexpected
    enc = {k[len("enc."):]: v for k, v in state.items() if k.startswith("enc.")}
    assert all(torch.equal(v, model.enc.state_dict()[k]) for k, v in enc.items())

    # features of other widths than the checkpoint's: one clear line
    other, _ = feature_set(tmp_path / "g", dims=(12, 24, 8))
    with pytest.raises(SystemExit, match=r"str features of width 20, but .* has 24"):
        ft.main(["--task", "go-mf", "--features", str(other), "--ckpt", str(ckpt), "--out", str(tmp_path / "o"),
                 "--num-workers", "0"])
    # a finetuning checkpoint is not a pretraining one
    result = run(tmp_path, "--ckpt", str(ckpt), "--limit-steps", "1")
    assert result["pretrained"] == str(ckpt) and result["selected_epoch"] == 1
    with pytest.raises(SystemExit, match="is a finetuning checkpoint"):
        ft.read_pretrained(tmp_path / "out" / "checkpoint.pt")


def test_contrastive_checkpoint_finetunes_sequence_latent(tmp_path):
    root, _ = feature_set(tmp_path / "f")
    ckpt = pretrain_tiny(root, tmp_path / "pre", variant="contrastive")
    mc, pre = ft.read_pretrained(ckpt)
    model = ft.FunctionModel(mc, 5)
    missing, unexpected = ft.load_backbone(model, pre["model"])
    assert all(k.startswith("head.") for k in missing) and not unexpected
    result = run(tmp_path, "--ckpt", str(ckpt), "--limit-steps", "2")
    assert result["model_config"]["variant"] == "contrastive"


def test_resume_equals_uninterrupted_run(tmp_path):
    """2 epochs straight vs 1 epoch, then --resume to 2 (same seed, CPU): the same weights, optimiser
    state and per-epoch numbers. Learning rates are raised so that epoch 2 moves the weights visibly, and
    the encoder has dropout so that the random state must be carried over as well."""
    root, _ = feature_set(tmp_path / "f")
    ckpt = str(pretrain_tiny(root, tmp_path / "pre", dropout=0.1))
    fast = ("--ckpt", ckpt, "--lr", "1e-3", "--lr-head", "1e-2")
    straight = run(tmp_path, *fast, "--out", str(tmp_path / "straight"), "--epochs", "2")
    first = run(tmp_path, *fast, "--out", str(tmp_path / "split"), "--epochs", "1")
    after_one = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    resumed = run(tmp_path, *fast, "--out", str(tmp_path / "split"), "--epochs", "2", "--resume")
    assert [e["epoch"] for e in first["epochs"]] == [1] and [e["epoch"] for e in resumed["epochs"]] == [1, 2]

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["next_epoch"] == b["next_epoch"] == 2 and a["model"].keys() == b["model"].keys()
    moved = [k for k, v in a["model"].items() if not torch.equal(v, after_one["model"][k])]
    assert "head.0.weight" in moved and "enc.enc_multi.blocks.0.attn.qkv.weight" in moved   # epoch 2 trained
    differ = {k: (v - b["model"][k]).abs().max().item() for k, v in a["model"].items()
              if not torch.allclose(v, b["model"][k], rtol=0, atol=1e-6)}
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for (k, s), s2 in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):   # Adam moments, step
        assert all(torch.allclose(s[n], s2[n], rtol=0, atol=1e-6) for n in s), k
    assert a["scheduler"] == b["scheduler"]
    best_a = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    best_b = torch.load(tmp_path / "split" / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.allclose(v, best_b["model"][k], rtol=0, atol=1e-6) for k, v in best_a["model"].items())

    saved = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "split")}
    assert saved["split"]["epochs"] == resumed["epochs"] and saved["straight"]["epochs"] == straight["epochs"]
    for ea, eb in zip(saved["straight"]["epochs"], saved["split"]["epochs"], strict=True):
        for key in ("epoch", "lr", "lr_head"):
            assert ea[key] == eb[key]
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], abs=1e-6)
        for split in ("valid", "test"):
            assert ea[split] == pytest.approx(eb[split], abs=1e-6), (ea["epoch"], split)
    assert saved["straight"]["selected_epoch"] == saved["split"]["selected_epoch"]
    assert saved["straight"]["test"] == pytest.approx(saved["split"]["test"], abs=1e-6)

    assert saved["split"]["n_proteins"]["train"] == 6 and saved["split"]["n_proteins"]["test"] == 2
    assert saved["split"]["seed"] == 0
    assert saved["split"]["config"]["optimizer"] == "adam" and saved["split"]["config"]["weight_decay"] == 0.0  # GO-MF
    with pytest.raises(SystemExit, match="other settings"):
        run(tmp_path, *fast, "--out", str(tmp_path / "split"), "--epochs", "3", "--resume", "--lr", "2e-3")


# ---- ESM in the loop ---------------------------------------------------------------------------

def esm_step(checkpointing):
    """One optimiser step of a finetuning model with the tiny ESM-2 in the loop: the loop module, its
    weights before the step, the gradients and the optimiser's parameter ids."""
    esm = ef.load_encoder("seq", ef.ExtractConfig(encoders="tiny"), torch.device("cpu"))
    loop = ft.SeqInLoop(esm.model, esm.alphabet, esm.layer, checkpointing)
    mc = amma.AMMAConfig(d_seq=loop.width, d_str=20, d_func=8, **TINY)
    torch.manual_seed(0)
    model = ft.FunctionModel(mc, 3, loop)
    cfg = ft.FinetuneConfig(optimizer="adamw", weight_decay=0.01)
    opt = ft.build_optimizer(model, cfg)
    seqs = ["MKTAYIAKQR", "GSHMLE"]
    g = torch.Generator().manual_seed(0)
    items = [{"id": f"p{i}", "index": i, "seq": None, "func": None, "sequence": s,
              "str": torch.randn(len(s), 20, generator=g)} for i, s in enumerate(seqs)]
    batch = ft.collate_task(items)
    before = {k: v.clone() for k, v in loop.state_dict().items()}
    enc_before = model.enc.enc_multi.blocks[0].attn.qkv.weight.clone()
    model.train()
    loss = F.binary_cross_entropy_with_logits(model(batch), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in loop.named_parameters() if p.grad is not None}
    opt.step()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not torch.equal(enc_before, model.enc.enc_multi.blocks[0].attn.qkv.weight)
    return loop, before, grads, in_opt


def test_esm_finetune_updates_esm_and_checkpointing_changes_nothing():
    loop, before, grads, in_opt = esm_step(checkpointing=False)
    after = loop.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert all(id(p) in in_opt for p in loop.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in loop.model.contact_head.parameters())   # unused head: frozen
    ckpt_loop, _, ckpt_grads, _ = esm_step(checkpointing=True)
    assert isinstance(ckpt_loop.model.layers[0], ft.Checkpointed)
    renamed = {k.replace(".layer.", ".", 1) if k.startswith("model.layers.") else k: v for k, v in ckpt_grads.items()}
    assert renamed.keys() == grads.keys()
    assert all(torch.allclose(grads[k], renamed[k], atol=1e-6) for k in grads)   # same gradients, less memory


def test_esm_finetune_from_the_command_line(tmp_path):
    """--esm finetune on a tiny-encoder feature set: sequences from manifest.tsv, the tiny ESM-2 (64-dim)."""
    info = {"encoders": {"seq": ef.TINY_NAMES["seq"], "str": ef.TINY_NAMES["str"]}, "tiny": True, "synthetic": False}
    root, _ = feature_set(tmp_path / "f", dims=(64, 20, 8), info=info)
    ckpt = str(pretrain_tiny(root, tmp_path / "pre", dims=(64, 20, 8)))
    result = run(tmp_path, "--ckpt", ckpt, "--esm", "finetune", "--limit-steps", "2")
    assert result["tiny"] and result["config"]["esm"] == "finetune" and result["protocol"] == "esm-finetune"
    auto = run(tmp_path, "--ckpt", ckpt, "--limit-steps", "2", "--out", str(tmp_path / "auto"))
    assert auto["protocol"] == "esm-frozen"                                      # tiny features: the fast protocol
    (tmp_path / "f" / "info.json").write_text(json.dumps({**info, "tiny": False, "synthetic": True}))
    with pytest.raises(SystemExit, match="needs features made by ESM"):
        run(tmp_path, "--ckpt", ckpt, "--esm", "finetune", "--overwrite")


# ---- evaluation gathering ----------------------------------------------------------------------

def test_eval_shards_gather_each_protein_once_in_order(tmp_path):
    root, _ = feature_set(tmp_path / "f", n=11)
    cfg = ft.FinetuneConfig(task="go-mf", features=str(root), eval_batch_size=3, num_workers=0)
    _, sets, _, _ = ft.load_task(cfg)
    ds = ft.TaskSet(root, sets["train"].rows, [f"P{i:03d}" for i in range(11)], torch.zeros(11, 5), False, 1022)
    torch.manual_seed(0)
    model = ft.FunctionModel(amma.AMMAConfig(d_seq=12, d_str=20, d_func=8, **TINY), 5).eval()
    with torch.no_grad():
        one = torch.cat([model(cache.batch_to(ft.collate_task([ds[k]]), "cpu")) for k in range(len(ds))])  # one by one
    assert torch.allclose(ft.predict(model, ds, cfg, torch.device("cpu")), one, atol=1e-5)
    for world in (2, 3, 4, 16):
        shards = [ft.shard(len(ds), r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(len(ds)))        # no padding, no duplicates
        parts = [(s, one[s]) for s in reversed(shards)]                             # any gather order
        assert torch.equal(ft.merge_predictions(parts, len(ds)), one)
    with pytest.raises(RuntimeError, match="exactly once"):
        ft.merge_predictions([([0, 1, 2], one[:3]), ([2, 3], one[2:4])], 4)             # a padded sampler's duplicate


# ---- the demo ----------------------------------------------------------------------------------

def test_demo_beats_label_frequency_baseline(tmp_path, monkeypatch, capsys):
    """The demo path of `python finetune.py --task go-mf` (no features/go), with a small pretraining
    made here and fewer epochs: our test Fmax clearly above the label-frequency baseline's."""
    import demo
    monkeypatch.chdir(tmp_path)
    root = demo.ensure_demo_features("features/demo")
    mc = amma.AMMAConfig(d_seq=64, d_str=96, d_func=48, D=32, n_layers=1, n_heads=2, dec_layers=1, M=32)
    amma.pretrain(mc, amma.TrainConfig(features=str(root), out="runs/small", epochs=1, batch_size=8,
                                       num_workers=0, limit_steps=4), quiet=True)
    result = ft.main(["--task", "go-mf", "--demo", "--ckpt", "runs/small/checkpoint.pt", "--epochs", "6"])
    out = capsys.readouterr().out
    assert "built-in demo" in out and "label-frequency baseline" in out and "67.3 /  65.5" in out
    ours, base = result["test"]["fmax"], result["baseline"]["test"]["fmax"]
    print(f"demo (reduced): test Fmax {ours:.3f} vs label-frequency baseline {base:.3f}")
    assert result["synthetic"] and result["demo"] and ours > base + 0.2
    assert (tmp_path / "runs" / "small" / "go-mf" / "results.json").exists()


# ---- global batch, DDP, interruption, precision, readout, bad input -----------------------------

def test_ddp_two_processes_equal_one_process(tmp_path):
    # GO-BP's protocol: global batch 4 split over 2 gloo processes == one process with the batch of 4
    root, _ = feature_set(tmp_path / "f", n=20)
    ckpt = pretrain_tiny(root, tmp_path / "pre")
    flags = ["--task", "go-mf", "--features", root, "--ckpt", ckpt, "--epochs", 2, "--batch-size", 4,
             "--num-workers", 0, "--lr", "1e-3", "--lr-head", "1e-2", "--device", "cpu"]
    ddp = torchrun("finetune.py", *flags, "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("finetuning ") == 1 and ddp.stdout.count("selected epoch") == 1, ddp.stdout
    assert "arning" not in ddp.stderr, ddp.stderr
    one = ft.main([str(x) for x in flags] + ["--out", str(tmp_path / "one")])
    assert_same_training(tmp_path / "ddp" / "checkpoint.pt", tmp_path / "one" / "checkpoint.pt")
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for ea, eb in zip(two["epochs"], one["epochs"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-5)
        assert ea["test"] == pytest.approx(eb["test"], abs=1e-5)
    bad = torchrun("finetune.py", *flags, "--batch-size", 1, "--out", tmp_path / "b1")
    assert bad.returncode != 0 and "--batch-size 1 is the global batch" in bad.stderr
    assert "independent runs side by side" in bad.stderr


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    root, _ = feature_set(tmp_path / "f", n=150)
    ckpt = pretrain_tiny(root, tmp_path / "pre")
    flags = ["--task", "go-mf", "--features", root, "--ckpt", ckpt, "--epochs", 2, "--batch-size", 1,
             "--num-workers", 0, "--lr", "1e-3", "--lr-head", "1e-2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    def cli(*extra):
        return subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *map(str, flags + list(extra))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    cut = cli("--out", tmp_path / "cut", "--save-every-steps", 1)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "cut" / "checkpoint.pt").exists():
        time.sleep(0.02)
    time.sleep(0.1)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=120)
    assert cut.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert 0 < state["next_step"] or state["next_epoch"] == 1
    resumed = cli("--out", tmp_path / "cut", "--save-every-steps", 1, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    straight = cli("--out", tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    a = json.loads((tmp_path / "cut" / "results.json").read_text())
    b = json.loads((tmp_path / "straight" / "results.json").read_text())
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-9)
        assert ea["valid"] == eb["valid"] and ea["test"] == eb["test"]
    wa = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_autocast_and_mean_readout_on_cpu(tmp_path):
    root, _ = feature_set(tmp_path / "f")
    ckpt = str(pretrain_tiny(root, tmp_path / "pre"))
    bf16 = run(tmp_path, "--ckpt", ckpt, "--amp", "bf16", "--out", str(tmp_path / "bf16"))
    assert bf16["config"]["amp"] == "bf16" and 0 <= bf16["test"]["fmax"] <= 1
    cls = run(tmp_path, "--ckpt", ckpt, "--out", str(tmp_path / "cls"))
    mean = run(tmp_path, "--ckpt", ckpt, "--readout", "mean", "--out", str(tmp_path / "mean"))
    assert mean["readout"] == "mean" and cls["readout"] == "cls"
    assert mean["epochs"][0]["train_loss"] != cls["epochs"][0]["train_loss"]


def test_bad_feature_files_and_empty_splits_are_named_before_step_1(tmp_path):
    root, _ = feature_set(tmp_path / "f")
    ckpt = str(pretrain_tiny(root, tmp_path / "pre"))
    x = torch.load(root / "str" / "P003.pt", weights_only=True)
    x[0, 0] = float("inf")
    torch.save(x, root / "str" / "P003.pt")
    with pytest.raises(SystemExit, match=r"(?s)1 proteins have bad feature files.*str/P003.pt: 1 values are nan or inf"):
        run(tmp_path, "--ckpt", ckpt)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    result = run(tmp_path, "--ckpt", ckpt, "--skip-bad", "--out", str(tmp_path / "skip"))
    assert result["n_proteins"]["train"] == 5
    data = json.loads((root / "labels_go-mf.json").read_text())
    data["splits"]["valid"] = ["NOPE"]
    data["labels"]["NOPE"] = [0]
    (root / "labels_go-mf.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="no valid protein of labels_go-mf.json has features"):
        run(tmp_path, "--ckpt", ckpt, "--out", str(tmp_path / "empty"))
