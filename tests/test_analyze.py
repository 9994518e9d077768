"""analyze.py: Table 1 arithmetic, the analysis outputs on a tiny checkpoint, attention TSV/PDB, collector."""
import json

import pytest
import torch

import amma
import cache
import analyze
from conftest import write_features

SMALL = dict(d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 14-protein feature set and a tiny AMMA and AMMA-contrastive checkpoint (1 epoch, 2 steps)."""
    tmp = tmp_path_factory.mktemp("analyze")
    root = write_features(tmp / "f", [8 + i % 6 for i in range(14)])
    ckpts = {}
    for variant in ("asymmetric", "contrastive"):
        mc = amma.AMMAConfig(**SMALL, variant=variant)
        tc = amma.TrainConfig(features=str(root), out=str(tmp / variant), epochs=1, limit_steps=2,
                              batch_size=4, num_workers=0, lr=1e-3)
        amma.pretrain(mc, tc, quiet=True)
        ckpts[variant] = tmp / variant / "checkpoint.pt"
    return tmp, root, ckpts


def pdb_file(path, L, start=5):
    """A PDB chain of L alanines (N, CA, C, O, CB each) numbered from `start`, residue start+1 with an
    insertion code, one extra residue without a C-alpha atom, and a water."""
    lines, serial = [], 1
    keys = [(str(start + i), "B" if i == 1 else "") for i in range(L)]
    keys.insert(3, (str(start + 50), ""))                       # no CA: not a residue of the features
    for r, (num, icode) in enumerate(keys):
        atoms = ("N",) if num == str(start + 50) else ("N", "CA", "C", "O", "CB")
        for a in atoms:
            lines.append(f"ATOM  {serial:5d}  {a:<3} ALA A{int(num):4d}{icode:1}   "
                         f"{r * 3.8:8.3f}{serial * 0.1:8.3f}{0.0:8.3f}{1.0:6.2f}{55.5:6.2f}           {a[0]}  ")
            serial += 1
    lines.append(f"HETATM{serial:5d}  O   HOH A 900    {1.0:8.3f}{2.0:8.3f}{3.0:8.3f}{1.0:6.2f}{20.0:6.2f}           O  ")
    lines.append("END")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- Table 1 arithmetic (B.5) ----------------------------------------------------------------

def test_relation_matrix_and_cosine():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 16, generator=g)
    r = analyze.relation(z)
    assert r.shape == (4, 4) and torch.allclose(r.diagonal(), torch.ones(4))
    assert torch.allclose(analyze.relation(3 * z), r, atol=1e-6)                 # L2-normalised first
    for rowwise in (False, True):
        assert analyze.relation_cosine(r, r, rowwise=rowwise) == pytest.approx(1.0, abs=1e-6)
        assert analyze.relation_cosine(r, -r, rowwise=rowwise) == pytest.approx(-1.0, abs=1e-6)
        for seed in range(20):
            other = analyze.relation(torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)))
            assert -1.0 <= analyze.relation_cosine(r, other, rowwise=rowwise) <= 1.0
    scores = analyze.table1_scores({"seq": z, "str": z.clone(), "func": 2 * z})
    assert scores == pytest.approx({"seq-str": 1.0, "seq-func": 1.0, "str-func": 1.0}, abs=1e-6)
    assert analyze.relation_cosine(torch.zeros(3, 3), r[:3, :3]) == 0.0          # eps, no NaN
    assert analyze.within_cosine(torch.ones(3, 5) + 0.0 * z[:3, :5]) == pytest.approx(1.0)
    assert analyze.within_cosine(torch.eye(4)) == pytest.approx(0.0)


def test_amma_latents_do_not_depend_on_padding(tiny):
    _, root, ckpts = tiny
    model, config, _ = amma.load_pretrained(ckpts["asymmetric"])
    model.eval()
    ds = cache.FeatureDataset(root, ids=["P000", "P005"])                         # lengths 8 and 13
    both = analyze.amma_latents(model, cache.batch_to(cache.collate([ds[0], ds[1]]), "cpu"))
    alone = analyze.amma_latents(model, cache.batch_to(cache.collate([ds[0]]), "cpu"))
    for m in amma.MODALITIES:
        assert both[m].shape == (2, config.D)
        assert torch.allclose(both[m][0], alone[m][0], atol=1e-5), m


# ---- attention (B.8) -------------------------------------------------------------------------

def test_last_layer_attention_rows_sum_to_one(tiny):
    _, root, ckpts = tiny
    model, _, _ = amma.load_pretrained(ckpts["asymmetric"])
    model.eval()
    batch = cache.batch_to(cache.collate([cache.FeatureDataset(root, ids=["P003"])[0]]), "cpu")
    total, a_seq, a_str, attn = analyze.function_attention(model, batch)
    L, Lf = 11, 6
    assert attn.shape == (SMALL["n_heads"], 1 + 2 * L + Lf, 1 + 2 * L + Lf)
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:2]), atol=1e-5)
    assert total.shape == (L,) and (total >= 0).all()
    assert torch.allclose(total, a_seq + a_str)
    assert float(total.sum()) <= 1.0 + 1e-5                                      # a share of each row


def steer_last_layer(model, key_token, func_tokens, c=20.0):
    """Forward hook on the last Enc_multi layer's qkv: the queries of the token positions in
    func_tokens become u, every other query -u, and the key of token position key_token becomes c u.
    Positions count the [CLS] token (position 0). So the function tokens put almost all their
    attention on key_token and no other query attends to it."""
    attn = model.enc.enc_multi.blocks[-1].attn

    def hook(module, inputs, out):
        B, S, _ = out.shape
        qkv = out.view(B, S, 3, attn.n_heads, -1).clone()                    # [B, S, q/k/v, nh, hs]
        u = torch.ones(qkv.shape[-2:])
        rows = torch.zeros(S, dtype=torch.bool)
        rows[func_tokens] = True
        qkv[:, rows, 0] = u
        qkv[:, ~rows, 0] = -u
        qkv[:, key_token, 1] = c * u
        return qkv.view(B, S, -1)

    return attn.qkv.register_forward_hook(hook)


def test_function_attention_finds_a_steered_residue(tiny, tmp_path):
    """Make one residue's seq slot (then another's str slot) take the function tokens' attention in the
    last layer: analyze ranks that residue first, in function_attention and in the TSV. The token
    positions are computed here (1 + slot, slots seq | str | func), not from analyze's layout."""
    _, root, ckpts = tiny
    model, _, _ = amma.load_pretrained(ckpts["asymmetric"])
    model.eval()
    pid, L, Lf = "P003", 11, 6                                                   # lengths of write_features
    func_tokens = list(range(1 + 2 * L, 1 + 2 * L + Lf))
    batch = cache.batch_to(cache.collate([cache.FeatureDataset(root, ids=[pid])[0]]), "cpu")
    base, _, _, _ = analyze.function_attention(model, batch)
    cfg = analyze.AnalyzeConfig()
    for slot, r in (("seq", int(base.argmin())), ("str", (int(base.argmin()) + 4) % L)):
        assert int(base.argmax()) != r                                           # not first without the hook
        handle = steer_last_layer(model, 1 + r if slot == "seq" else 1 + L + r, func_tokens)
        try:
            total, a_seq, a_str, attn = analyze.function_attention(model, batch)
            _, _, table = analyze.write_attention(cfg, model, root, pid, tmp_path, torch.device("cpu"))
        finally:
            handle.remove()
        steered, other = (a_seq, a_str) if slot == "seq" else (a_str, a_seq)
        assert int(total.argmax()) == r and int(steered.argmax()) == r, slot
        assert steered[r] > 0.999 and other.max() < 1e-3 and total.sum() == pytest.approx(1.0, abs=1e-3)
        assert attn[:, 1 + 2 * L:, 1 + r + (L if slot == "str" else 0)].min() > 0.999   # every head, func query
        assert table[0][:2] == (1, r + 1) and table[0][3] == pytest.approx(float(total[r]))   # TSV: 1-based
        rows = (tmp_path / f"attention_{pid}.tsv").read_text().splitlines()
        assert rows[1].split("\t")[:2] == ["1", str(r + 1)]
    assert torch.equal(analyze.function_attention(model, batch)[0], base)     # hook removed


# ---- the whole analysis: python analyze.py ------------------------------------------------

def test_analysis_outputs(tiny, capsys):
    from threadpoolctl import threadpool_limits

    tmp, root, ckpts = tiny
    pdb = pdb_file(tmp / "P002.pdb", L=10)
    out = tmp / "analysis"
    with threadpool_limits(1):        # t-SNE's OpenMP threads crawl on a busy shared CPU
        (tmp / "sites.tsv").write_text("# id, sites\nP002\t3,4\nP002\t9\nP001\t1\n")
        analyze.main(["--ckpt", str(ckpts["asymmetric"]), "--contrastive-ckpt", str(ckpts["contrastive"]),
                      "--features", str(root), "--out", str(out), "--protein", "P002", "--structure", str(pdb),
                      "--tsne-iter", "250", "--sites", str(tmp / "sites.tsv")])
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "0.865" in printed and "attention_P002.tsv" in printed

    t1 = json.loads((out / "table1.json").read_text())
    assert set(t1["table1"]) == {"initial", "contrastive", "amma"}
    assert t1["batch_size"] == 4 and t1["n_batches"] == 4                        # 14 proteins: 4+4+4+2
    for table in (t1["table1"], t1["table1_rowwise"]):
        for col in table.values():
            assert set(col) == {"seq-str", "seq-func", "str-func"}
            assert all(-1.0 <= v <= 1.0 + 1e-6 for v in col.values())
    assert "| Seq-Str |" in (out / "table1.md").read_text()
    for col in t1["within_modality_cosine"].values():
        assert set(col) == set(amma.MODALITIES) and all(-1.0 <= v <= 1.0 + 1e-6 for v in col.values())

    import matplotlib.image
    for name in ("initial", "amma", "contrastive"):
        png = out / f"tsne_{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).ndim == 3

    rows = [line.split("\t") for line in (out / "attention_P002.tsv").read_text().splitlines()]
    assert rows[0][:4] == ["rank", "residue", "letter", "attention"]
    rows = rows[1:]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    assert sorted(int(r[1]) for r in rows) == list(range(1, 11))                 # every residue once
    att = [float(r[3]) for r in rows]
    assert att == sorted(att, reverse=True) and all(r[2] == "A" for r in rows)
    assert rows[0][6] in {f"A:{5 + i}" for i in range(10)} | {"A:6B"}

    lines = [l for l in (out / "attention_P002.pdb").read_text().splitlines() if l[:6] in ("ATOM  ", "HETATM")]
    assert len(lines) == 10 * 5 + 1 + 1
    per_residue = {}
    for l in lines:
        b = float(l[60:66])                                                      # one B-factor per atom line
        assert l[:60] == next(s for s in pdb.read_text().splitlines() if s[6:11] == l[6:11])[:60]
        per_residue.setdefault(l[21:27], set()).add(b)
    assert all(len(bs) == 1 for bs in per_residue.values())                      # equal within a residue
    top = rows[0][6].split(":")[1]
    assert per_residue[f"A{int(top.rstrip('B')):4d}{'B' if top.endswith('B') else ' '}"] == {100.0}
    assert per_residue["A  55 "] == {0.0} and per_residue["A 900 "] == {0.0}     # no CA / water
    top = json.loads((out / "attention_P002.json").read_text())          # B.8: k = the 3 annotated sites
    assert top["k"] == 3 and top["sites"] == [3, 4, 9] and top["top"] == [int(r[1]) for r in rows[:3]]
    assert top["hits"] == len({3, 4, 9} & set(top["top"])) and "annotated sites" in printed
    by_pdb = {r[6]: float(r[3]) for r in rows}
    for key, bs in per_residue.items():
        rid = f"A:{int(key[1:5])}{key[5].strip()}"
        if rid in by_pdb:
            assert bs.pop() == pytest.approx(100 * by_pdb[rid] / max(att), abs=0.006)


def hand_table1(latents, batch_size):
    """Table 1 (B.5) by hand: latents {m: [n, d]} in analyze's protein order, consecutive batches, a last
    batch of one dropped; L2-normalise, z z^T, cosine of the flattened matrices; mean over batches."""
    n = len(latents["seq"])
    cos = {p: [] for p in ("seq-str", "seq-func", "str-func")}
    for s in range(0, n, batch_size):
        if min(n, s + batch_size) - s < 2:
            continue
        rel = {}
        for m, z in latents.items():
            z = z[s:s + batch_size].double()
            z = z / z.norm(dim=1, keepdim=True)
            rel[m] = (z @ z.T).flatten()
        for p in cos:
            a, b = rel[p.split("-")[0]], rel[p.split("-")[1]]
            cos[p].append(float(a @ b / (a.norm() * b.norm())))
    return {p: sum(v) / len(v) for p, v in cos.items()}


def test_table1_initial_and_amma_columns_by_hand(tiny, tmp_path):
    """Table 1's Initial column recomputed from the feature files, and the AMMA column from l0 of the
    encoder run on each protein alone; zeroing l0 empties the AMMA latents, zeroing l1 changes nothing."""
    _, root, ckpts = tiny
    manifest = [line.split("\t")[0] for line in (root / "manifest.tsv").read_text().splitlines()[1:]]
    order = [manifest[i] for i in torch.randperm(len(manifest), generator=torch.Generator().manual_seed(0))]
    initial = {m: torch.stack([torch.load(root / m / f"{pid}.pt").float().mean(0) for pid in order])
               for m in amma.MODALITIES}
    model, _, ck = amma.load_pretrained(ckpts["asymmetric"])
    model.eval()
    lat = {m: [] for m in amma.MODALITIES}
    with torch.no_grad():
        for pid in order:
            x = {m: torch.load(root / m / f"{pid}.pt").float() for m in amma.MODALITIES}
            batch = {"ids": [pid], **{m: v[None] for m, v in x.items()},
                     **{m + "_len": torch.tensor([len(v)]) for m, v in x.items()}}
            z = model.enc(batch, mask=False)[0][0, 1:]                           # [CLS] dropped: [2L + L', D]
            z0, L = model.l[0](z), len(x["seq"])
            for m, part in zip(amma.MODALITIES, (z0[:L], z0[L:2 * L], z0[2 * L:])):
                lat[m].append(part.mean(0))
    lat = {m: torch.stack(v) for m, v in lat.items()}

    def run_analyze(ckpt, out, batch_size):
        analyze.main(["--ckpt", str(ckpt), "--features", str(root), "--out", str(tmp_path / out),
                      "--tsne-n", "0", "--batch-size", str(batch_size)])
        return json.loads((tmp_path / out / "table1.json").read_text())

    tables = {}
    for bs, n_batches in ((4, 4), (5, 3), (13, 1)):                              # 14 = 4+4+4+2 = 5+5+4 = 13+(1)
        t1 = tables[bs] = run_analyze(ckpts["asymmetric"], f"bs{bs}", bs)
        assert t1["n_batches"] == n_batches
        assert t1["table1"]["initial"] == pytest.approx(hand_table1(initial, bs), abs=1e-5), bs
        assert t1["table1"]["amma"] == pytest.approx(hand_table1(lat, bs), abs=1e-5), bs
    # the batching matters for these numbers (so the check above sees analyze's order and cuts)
    assert hand_table1(initial, 4) != pytest.approx(hand_table1(initial, 5), abs=1e-4)
    assert hand_table1(initial, 4) != pytest.approx(hand_table1({m: z.flip(0) for m, z in initial.items()}, 4), abs=1e-4)

    # AMMA latents are l0's: zero l0 and every latent is 0 (the column reads 0); zero l1 and nothing moves
    zeroed = {}
    for k in (0, 1):
        state = {n: (torch.zeros_like(v) if n in (f"l.{k}.weight", f"l.{k}.bias") else v) for n, v in ck["model"].items()}
        torch.save({**ck, "model": state}, tmp_path / f"l{k}.pt")
        zeroed[k] = run_analyze(tmp_path / f"l{k}.pt", f"l{k}", 4)["table1"]
        m2, _, _ = amma.load_pretrained(tmp_path / f"l{k}.pt")
        ds = cache.FeatureDataset(root, ids=order[:5])
        got = analyze.amma_latents(m2.eval(), cache.batch_to(cache.collate([ds[i] for i in range(5)]), "cpu"))
        want = analyze.amma_latents(model, cache.batch_to(cache.collate([ds[i] for i in range(5)]), "cpu"))
        for m in amma.MODALITIES:
            if k == 0:
                assert torch.equal(got[m], torch.zeros_like(got[m])), m
            else:
                assert torch.equal(got[m], want[m]), m
    base = tables[4]["table1"]
    assert zeroed[0]["amma"] == {"seq-str": 0.0, "seq-func": 0.0, "str-func": 0.0}
    assert all(abs(v) > 0.1 for v in base["amma"].values())
    assert zeroed[1]["amma"] == base["amma"] and zeroed[0]["initial"] == zeroed[1]["initial"] == base["initial"]


def test_missing_features_fall_back_to_demo(tiny, monkeypatch, capsys):
    import demo

    tmp, root, ckpts = tiny
    monkeypatch.setattr(demo, "ensure_demo_features", lambda path="features/demo": root)
    analyze.main(["--ckpt", str(ckpts["asymmetric"]), "--features", str(tmp / "nothing"),
                  "--out", str(tmp / "fallback"), "--tsne-n", "0"])
    assert "built-in demo" in capsys.readouterr().out
    assert (tmp / "fallback" / "table1.json").exists() and not list((tmp / "fallback").glob("*.png"))


def test_checkpoint_kinds_and_widths_are_checked(tiny, tmp_path):
    tmp, root, ckpts = tiny
    with pytest.raises(SystemExit, match="contrastive-ckpt"):
        analyze.main(["--ckpt", str(ckpts["contrastive"]), "--features", str(root), "--out", str(tmp_path)])
    other = write_features(tmp_path / "wide", [8, 9, 10], dims=(16, 20, 8))
    with pytest.raises(SystemExit, match="do not match"):
        analyze.main(["--ckpt", str(ckpts["asymmetric"]), "--features", str(other), "--out", str(tmp_path)])


# ---- collector -------------------------------------------------------------------------------

def test_collector_builds_the_table(tmp_path, capsys):
    def result(fmax, aupr, protocol="esm-finetune", synthetic=False):
        return {"test": {"fmax": fmax, "aupr": aupr}, "protocol": protocol, "synthetic": synthetic,
                "baseline": {"test": {"fmax": 0.40, "aupr": 0.30}}}
    fake = {
        ("amma", "ec"): result(0.887, 0.898),
        ("amma", "go-mf"): {"test": {"Fmax": 0.673, "AUPR": 0.655}, "protocol": "esm-finetune"},
        ("amma", "go-cc"): result(0.498, 0.369),
        ("amma", "go-bp"): result(0.469, 0.336),
        ("symmetric", "ec"): result(0.70, 0.71, protocol="esm-frozen"),
        ("alpha-1-1-1", "ec"): result(0.846, 0.872, synthetic=True),
        ("alpha-1-1-1", "go-mf"): result(0.664, 0.648, synthetic=True),
        ("alpha-1-1-1", "notes"): result(0.1, 0.1),                                 # not a task: ignored
        ("broken", "ec"): {"test": {"accuracy": 0.5}},                              # no metric: skipped
        ("mine", "go-bp"): result(0.3, 0.2),                                        # a run of no paper table
    }
    for (run, task), results in fake.items():
        (tmp_path / run / task).mkdir(parents=True)
        (tmp_path / run / task / "results.json").write_text(json.dumps(results))
    runs = analyze.main(["--collect", str(tmp_path)])
    assert set(runs) == {"amma", "symmetric", "alpha-1-1-1", "mine"}
    assert runs["amma"]["ec"] == pytest.approx([88.7, 89.8]) and runs["amma"]["go-mf"] == pytest.approx([67.3, 65.5])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "broken" in printed
    saved = json.loads((tmp_path / "results_table.json").read_text())
    t2 = {r["row"]: r for r in saved["tables"]["Table 2"]["rows"]}
    assert t2["ours: amma"]["averages"] == ["63.2", "56.5"]                         # ours: from our four tasks
    assert t2["  paper: AMMA-symmetric"]["averages"] == ["52.0", "46.7"]           # the paper's PUBLISHED averages
    assert t2["ours: symmetric"]["averages"] == ["-", "-"]                         # not all tasks: no average
    assert t2["label-frequency baseline"]["cells"][0] == "40.0 / 30.0"
    rows = [r["row"] for r in saved["tables"]["Table 2"]["rows"]]
    assert rows.index("  paper: AMMA") == rows.index("ours: amma") + 1            # the paper's row under ours
    assert any("MIXED PROTOCOLS in Table 2" in n for n in saved["tables"]["Table 2"]["notes"])
    t4 = {r["row"]: r for r in saved["tables"]["Table 4"]["rows"]}
    assert t4["ours: alpha-1-1-1 [synthetic]"]["averages"] == ["75.8"]
    assert t4["  paper: alpha 2 2 1"]["cells"] == ["87.9 / 89.5", "52.4 / 53.6"]
    assert any("[synthetic]" in n for n in saved["tables"]["Table 4"]["notes"])
    assert "Table 3" not in saved["tables"] and "Other runs" in saved["tables"]
    md = (tmp_path / "results_table.md").read_text()
    assert "| paper: AMMA | esm-finetune | 88.7 / 89.8 | 67.3 / 65.5 | 49.8 / 36.9 | 46.9 / 33.6 | 63.2 | 56.5 |" in md


def test_collector_over_seeds_gives_mean_sd_n_and_marks_cells_far_from_the_paper(tmp_path, capsys):
    def result(fmax, aupr, seed):
        return {"test": {"fmax": fmax, "aupr": aupr}, "protocol": "esm-finetune", "seed": seed}
    fake = {"amma/ec/seed-0": result(0.880, 0.890, 0), "amma/ec/seed-1": result(0.884, 0.900, 1),   # SEEDS
            "amma/go-mf/seed-0": result(0.600, 0.655, 0), "amma/go-mf/seed-1": result(0.610, 0.655, 1),
            "noaux/seed-0/ec": result(0.877, 0.901, 0), "noaux/seed-1/ec": result(0.877, 0.901, 1),  # SEED_PRETRAIN
            "esm-1b/go-cc": result(0.477, 0.324, 0),                                             # one seed
            "amma/seed-0/seed-1/ec": result(0.1, 0.1, 0), "seed-0/ec": result(0.1, 0.1, 0)}     # not a layout
    for rel, results in fake.items():
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "results.json").write_text(json.dumps(results))
    runs = analyze.main(["--collect", str(tmp_path)])
    assert set(runs) == {"amma", "noaux", "esm-1b"}
    assert runs["amma"]["ec"] == pytest.approx([88.2, 89.5])                                 # means
    saved = json.loads((tmp_path / "results_table.json").read_text())
    t2 = {r["row"]: r for r in saved["tables"]["Table 2"]["rows"]}
    ec, mf = t2["ours: amma"]["cells"][:2]
    assert ec == "88.2+-0.3 / 89.5+-0.7 (n=2)"                      # 88.7 and 89.8 within 2 SD: no mark
    assert mf == "60.5+-0.7! / 65.5+-0.0 (n=2)"                     # 67.3 is 9 SD away; an exact 65.5 is not
    assert t2["ours: esm-1b"]["cells"][2] == "47.7 / 32.4 (n=1)"    # one seed: no SD, no mark
    assert saved["seeds"]["amma"]["ec"]["n"] == 2 and saved["seeds"]["amma"]["ec"]["seeds"] == [0, 1]
    assert saved["seeds"]["amma"]["ec"]["fmax_sd"] == pytest.approx(0.2828, abs=1e-3)
    assert any("'!' marks" in n and "amma: go-mf" in n for n in saved["tables"]["Table 2"]["notes"])
    t6 = {r["row"]: r for r in saved["tables"]["Table 6"]["rows"]}
    assert t6["ours: noaux"]["cells"][0] == "87.7+-0.0 / 90.1+-0.0 (n=2)"
    assert "(n=2)" in capsys.readouterr().out


def test_attention_with_the_protein_name_as_function_text(tiny, tmp_path, monkeypatch):
    """--name: the function tokens are the name encoded alone (B.8), not the cached whole text."""
    import extract_features as ef
    (tmp_path / "info.json").write_text(json.dumps({"encoders": {"func": ef.TINY_NAMES["func"]}, "tiny": True}))
    feats = analyze.name_features(tmp_path, "Hemoglobin subunit alpha")
    enc = ef.load_encoder("func", type("C", (), {"encoders": "tiny"})(), "cpu")
    assert feats.shape == (len(enc.ids({"ProteinName": "Hemoglobin subunit alpha"})), 48)
    assert torch.allclose(feats, enc([enc.ids({"ProteinName": "Hemoglobin subunit alpha"})])[0])
    tmp, root, ckpts = tiny
    model, _ = analyze.load_model(ckpts["asymmetric"], False, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(analyze, "name_features", lambda r, n: seen.append(n) or torch.ones(3, 8))
    cfg = analyze.AnalyzeConfig(name="Kinase A")
    _, _, named = analyze.write_attention(cfg, model, root, "P002", tmp_path, torch.device("cpu"))
    _, _, whole = analyze.write_attention(analyze.AnalyzeConfig(), model, root, "P002", tmp_path, torch.device("cpu"))
    assert seen == ["Kinase A"] and [r[3] for r in named] != [r[3] for r in whole]
    monkeypatch.undo()
    (tmp_path / "info.json").write_text(json.dumps({"synthetic": True}))
    with pytest.raises(SystemExit, match="synthetic"):
        analyze.name_features(tmp_path, "x")
