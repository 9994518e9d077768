"""
Speed figures of the kit, printed (and written as JSON): nothing here is asserted by the tests.

    python bench.py --gpu-report         # the one command for a lent GPU (on a CPU: syncs and ops per step)
    python bench.py                      # everything that runs on this machine
    python bench.py --only pretrain      # pretrain | metrics | extract | check | esm-memory | finetune | feed
    python bench.py --steps 6 --json bench.json

gpu-report: GPU, versions, spec bf16 peak beside a measured 8192^3 matmul; pretraining at the paper config
  on synthetic in-memory batches, eager and --compile: p50/p90 step time, proteins/s, % of spec peak at
  140.3 GFLOP per protein-step, kernels per step, GPU busy fraction, attention kernel names (profiler),
  syncs per step (torch.cuda.set_sync_debug_mode), optimiser ms, peak memory, compiled-vs-eager losses;
  EC finetuning with the ESM-1b architecture in the loop: ms per step (forward / backward / optimiser),
  peak memory at 1022 residues, batch 1 and 4, with and without checkpointing; PASS/FAIL per goal. On a
  CPU: host syncs and dispatched ops per training step on the demo (SyncCounter), the CPU proxies.

pretrain: throughput of one AMMA training step (forward, backward, AdamW) at the paper config
  (1280/3072/768 -> D 512, 8 + 3x2 layers, M 160) on random features with realistic lengths
  (L from 50 to 1022, median ~300; 100-250 text tokens), in length-bucketed batches of 4, against a
  loop-per-protein reference built from nn.TransformerEncoder layers; achieved training FLOP/s from
  an analytic count (3 x forward FLOPs) as a fraction of the measured matmul peak (fp32 on CPU, bf16
  autocast on GPU).
metrics: fmax + aupr at the GO-BP test scale (2,991 proteins x 1,943 terms).
extract: proteins/s of the tiny encoders (real sizes on GPU), length-sorted batches against one
  protein at a time, and the share of time outside the encoder forward.
check: the feature-set check before step 1, seconds per 10,000 files (first time and unchanged).
esm-memory: memory of finetuning with ESM-1b in the loop at 1022 residues, batch 1 and 4, with and
  without --esm-checkpointing (saved activations measured in real bf16 forward passes on the CPU).
finetune: steps/s of finetuning with ESM-1b in the loop (random weights) at batch 1 and 4.
feed: the pretraining feed per loader process at paper widths and lengths from the page cache, per-protein
  files and the packed store, against reading the same bytes raw.
"""
import argparse
from dataclasses import dataclass
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import amma
import cache
import runs
from amma import arg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, reps=10):
    """Measured dense matmul FLOP/s: the denominator of the utilisation figures."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def realistic_lengths(n, seed=0):
    """Protein lengths (log-normal, median ~300, clipped to 50..1022) and text lengths (100..250)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.exp(math.log(300) + 0.55 * torch.randn(n, generator=g)).round().clamp(50, 1022).long()
    Lf = torch.randint(100, 251, (n,), generator=g)
    return L.tolist(), Lf.tolist()


def layer_flops(S, D, mlp):
    """Forward FLOPs of one Transformer layer on S tokens: projections, MLP, attention."""
    return 2 * S * (4 * D * D + 2 * mlp * D * D) + 4 * S * S * D


def forward_flops(c, L, Lf):
    """Analytic forward FLOPs of AMMA (asymmetric) on one protein, as the kit computes it."""
    D, mlp = c.D, c.mlp_ratio
    proj = 2 * (L * (c.d_seq * D + D * D) + L * (c.d_str * D + D * D) + Lf * (c.d_func * D + D * D))
    S = 1 + min(c.M, 2 * L + Lf)
    enc = c.n_layers * layer_flops(S, D, mlp)
    ls = 3 * 2 * S * D * D
    dec = c.dec_layers * (layer_flops(L, D, mlp) + 2 * layer_flops(2 * L + Lf, D, mlp))
    heads = 2 * D * (L * c.d_seq + L * c.d_str + Lf * c.d_func)
    return proj + enc + ls + dec + heads


def make_items(c, L, Lf, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": str(i), "seq": torch.randn(l, c.d_seq, generator=g).half(),
             "str": torch.randn(l, c.d_str, generator=g).half(),
             "func": torch.randn(lf, c.d_func, generator=g).half()} for i, (l, lf) in enumerate(zip(L, Lf))]


def kit_batches(c, items, batches, pin=False):
    """Batches as the kit's loader makes them (masks, loss weights, padded lengths), collated before any
    timing: the timed loop is the step alone, fed from (pinned) memory as the loader workers feed it."""
    out = []
    for i, idx in enumerate(batches):
        seeds = [amma.seed_hash(0, 0, i, j) for j in range(len(idx))]
        counts = [[len(items[j]["seq"]), len(items[j]["str"]), len(items[j]["func"])] for j in idx]
        weights = amma.loss_weights(counts, [0] * len(idx), c, seeds)
        batch = amma.collate_pretraining([{**items[j], "seed": sd, "loss_w": w} for j, sd, w in zip(idx, seeds, weights)],
                                         c.M, c.alpha)
        out.append({k: v.pin_memory() if pin and torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def bench_kit(c, items, batches, device, steps):
    """Proteins/s and tokens/s of the kit's batched training step (runs.train_step on loader-made batches)."""
    model = amma.AMMA(c).to(device)
    opt = runs.make_optimizer(model.parameters(), "adamw", device, lr=1e-4, weight_decay=0.05)
    autocast = runs.amp_context("auto", device)
    ready = kit_batches(c, items, batches[: steps + 1], pin=device.type == "cuda")

    def loss_fn(batch):
        with autocast:
            _, loss, logs = model(runs.strip(batch))
        return loss, logs

    n_prot = n_tok = 0
    flops = 0.0
    for i, (idx, batch) in enumerate(zip(batches, ready)):
        if i == 1:  # the first step is warm-up
            sync(device)
            t = time.perf_counter()
        runs.train_step(model, opt, [cache.batch_to(batch, device)], loss_fn, 1, [i])
        if i >= 1:
            n_prot += len(idx)
            n_tok += sum(2 * len(items[j]["seq"]) + len(items[j]["func"]) for j in idx)
            flops += sum(3 * forward_flops(c, len(items[j]["seq"]), len(items[j]["func"])) for j in idx)
    sync(device)
    dt = time.perf_counter() - t
    return {"proteins_per_s": n_prot / dt, "tokens_per_s": n_tok / dt, "flops_per_s": flops / dt, "steps": steps}


class LoopReference(nn.Module):
    """The first implementation the issue mentions: one protein at a time, nn.TransformerEncoder
    layers, no padding. Same widths and FLOPs as the kit; used only as a speed reference."""

    def __init__(self, c):
        super().__init__()
        layer = lambda n: nn.TransformerEncoder(nn.TransformerEncoderLayer(
            c.D, c.n_heads, c.mlp_ratio * c.D, dropout=0.0, activation="gelu", batch_first=True, norm_first=True), n,
            enable_nested_tensor=False)
        self.c = c
        self.proj = nn.ModuleDict({m: amma.Proj(d, c.D) for m, d in c.dims().items()})
        self.enc = layer(c.n_layers)
        self.l = nn.ModuleList(nn.Linear(c.D, c.D) for _ in range(3))
        self.dec = nn.ModuleDict({m: layer(c.dec_layers) for m in amma.MODALITIES})
        self.head = nn.ModuleDict({m: nn.Linear(c.D, d) for m, d in c.dims().items()})

    def forward(self, item, g):
        x = {m: self.proj[m](item[m].float()) for m in amma.MODALITIES}
        tokens = torch.cat([x["seq"], x["str"], x["func"]])
        keep = torch.randperm(len(tokens), generator=g)[: self.c.M]
        z = self.enc(tokens[keep][None])[0]
        L, Lf = len(x["seq"]), len(x["func"])
        loss = 0.0
        for k, (m, span) in enumerate([("seq", L), ("str", 2 * L + Lf), ("func", 2 * L + Lf)]):
            full = torch.zeros(span, self.c.D)
            full[keep[keep < span]] = self.l[k](z)[keep < span]
            out = self.head[m](self.dec[m](full[None])[0][-len(item[m]):])
            loss = loss + ((out - item[m].float()) ** 2).mean()
        return loss


def bench_loop(c, items, steps):
    model = LoopReference(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    n = 4 * steps
    model(items[0], g).backward()
    t = time.perf_counter()
    flops = 0.0
    for i in range(n):
        loss = model(items[i + 1], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        flops += 3 * forward_flops(c, len(items[i + 1]["seq"]), len(items[i + 1]["func"]))
    dt = time.perf_counter() - t
    return {"proteins_per_s": n / dt, "flops_per_s": flops / dt, "steps": n}


def run_pretrain(args, device, report):
    c = amma.AMMAConfig()
    n = 4 * (args.steps + 1) * 8
    L, Lf = realistic_lengths(n)
    items = make_items(c, L, Lf)
    lengths = [2 * l + lf for l, lf in zip(L, Lf)]
    bucketed = cache.bucket_batches(lengths, 4, seed=0, epoch=0)
    shuffled = [list(range(i, i + 4)) for i in range(0, n, 4)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    n_params = sum(p.numel() for p in amma.AMMA(c).parameters())
    print(f"\n== pretraining step, paper config ({n_params / 1e6:.1f}M parameters), device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"   matmul peak ({str(dtype).replace('torch.', '')}): {peak / 1e9:.1f} GFLOP/s")
    rows = {"kit, length-bucketed batches of 4": bench_kit(c, items, bucketed, device, args.steps),
            "kit, random batches of 4": bench_kit(c, items, shuffled, device, args.steps)}
    if device.type == "cpu" and not args.skip_loop:
        rows["loop per protein, nn.TransformerEncoder"] = bench_loop(c, items, max(1, args.steps // 2))
    for name, r in rows.items():
        r["peak_fraction"] = r["flops_per_s"] / peak
        print(f"   {name:42s} {r['proteins_per_s']:7.2f} proteins/s  "
              f"{r.get('tokens_per_s', float('nan')):9.0f} tokens/s  "
              f"{r['flops_per_s'] / 1e9:7.1f} GFLOP/s  = {100 * r['peak_fraction']:5.1f}% of peak")
    mean_flops = sum(3 * forward_flops(c, l, lf) for l, lf in zip(L, Lf)) / n
    best = rows["kit, length-bucketed batches of 4"]["proteins_per_s"]
    hours = 120_000 * 10 / best / 3600
    print(f"   paper pretraining (120k proteins x 10 epochs) at this speed: {hours:.1f} device-hours "
          f"({mean_flops / 1e9:.1f} GFLOP per protein per step)")
    report["pretrain"] = {"device": str(device), "peak_flops": peak, "rows": rows, "paper_run_hours": hours}


def run_metrics(report):
    import metrics
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2991, 1943, generator=g)
    target = (torch.rand(2991, 1943, generator=g) < 0.01).float()
    metrics.fmax(pred, target), metrics.aupr(pred, target)
    t = time.perf_counter()
    metrics.fmax(pred, target), metrics.aupr(pred, target)
    dt = time.perf_counter() - t
    print(f"\n== metrics at GO-BP test scale (2,991 x 1,943): fmax + aupr in {dt:.3f} s")
    report["metrics"] = {"seconds": dt}


class ForwardTimer:
    """Adds up the wall time spent inside the encoders' forward calls during an extraction run."""

    def __init__(self, device):
        import extract_features as ef
        import gearnet
        self.device, self.seconds = device, 0.0
        self.targets = [(ef.SeqEncoder, "__call__"), (ef.TextEncoder, "__call__"), (gearnet.GearNetEdge, "forward")]
        self.saved = [getattr(cls, name) for cls, name in self.targets]

    def __enter__(self):
        for (cls, name), fn in zip(self.targets, self.saved):
            setattr(cls, name, self.timed(fn))
        return self

    def __exit__(self, *exc):
        for (cls, name), fn in zip(self.targets, self.saved):
            setattr(cls, name, fn)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            return out
        return wrapper


def run_extract(args, device, report):
    """extract_features.py end to end on the demo corpus: proteins/s per modality, length-sorted
    token-budget batches against one protein per batch, the share of time outside the forwards, and the
    host time per protein (reading inputs, writing files) with the share of it that ran beside the
    encoders (the reader thread's next chunk, the writer threads) rather than in their way."""
    import contextlib
    import io
    import tempfile
    import extract_features as ef

    n = args.extract_n
    ef.CHUNK = max(8, n // 4)              # several chunks at this scale, so that reading ahead shows (default 2000)
    print(f"\n== extraction, demo corpus ({n} proteins), {args.encoders} encoders, device {device}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--source", "demo", "--encoders", args.encoders, "--device", str(device),
                "--data-dir", tmp]                                           # the demo's raw files: tmp/demo
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ef.main(base + ["--demo-n", "4", "--out", f"{tmp}/warm"])      # imports, first kernels
        base += ["--demo-n", str(n)]
        for batching, extra in [("length-sorted batches", []),
                                ("one protein at a time", ["--toks-per-batch", "1", "--str-toks-per-batch", "1"])]:
            for m in ("seq", "str", "func"):
                ef.HOST_SECONDS.clear()
                with ForwardTimer(device) as timer, contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    t = time.perf_counter()
                    ef.main(base + extra + ["--modality", m, "--out", f"{tmp}/{m}-{len(extra)}"])
                    total = time.perf_counter() - t
                host = ef.HOST_SECONDS["read"] + ef.HOST_SECONDS["write"]
                hidden = max(host - ef.HOST_SECONDS["waited"], 0.0)            # host time spent beside the encoders
                r = {"proteins_per_s": n / total, "forward_s": timer.seconds, "total_s": total,
                     "outside_forward": 1 - timer.seconds / total, "host_ms_per_protein": 1e3 * host / n,
                     "read_ms_per_protein": 1e3 * ef.HOST_SECONDS["read"] / n,
                     "write_ms_per_protein": 1e3 * ef.HOST_SECONDS["write"] / n,
                     "host_overlapped": hidden / host if host else 0.0}
                rows[f"{m}, {batching}"] = r
                print(f"   {m:4s} {batching:24s} {r['proteins_per_s']:7.1f} proteins/s   "
                      f"{100 * r['outside_forward']:4.0f}% of the time outside the encoder forward; host "
                      f"{r['host_ms_per_protein']:.1f} ms per protein (read {r['read_ms_per_protein']:.1f}, write "
                      f"{r['write_ms_per_protein']:.1f}), {100 * r['host_overlapped']:.0f}% of it beside the forwards")
    report["extract"] = rows


def run_check(args, report):
    """cache.check_feature_files (run before step 1 of pretraining and finetuning): seconds per 10,000
    files, first read and again (files unchanged since: only stat), on the demo's file sizes and on the
    paper's (seq 300 x 1280, str 300 x 3072, func 150 x 768, float16: 2.8 MB per protein)."""
    import shutil
    import tempfile
    print("\n== feature-set check before step 1 (every file: loads, rows, width, finite)")
    rows = {}
    sizes = {"demo sizes (64/96/48 wide)": ({"seq": 64, "str": 96, "func": 48}, 2000),
             "paper sizes (1280/3072/768 wide)": ({"seq": 1280, "str": 3072, "func": 768}, args.check_n)}
    for name, (dims, n) in sizes.items():
        root = Path(tempfile.mkdtemp(dir=args.tmp or None))
        try:
            g = torch.Generator().manual_seed(0)
            manifest = []
            for m in dims:
                (root / m).mkdir()
            for i in range(n):
                L, Lf = 300, 150
                for m, d in dims.items():
                    torch.save(torch.randn(Lf if m == "func" else L, d, generator=g).half(), root / m / f"P{i}.pt")
                manifest.append({"id": f"P{i}", "L": L, "L_func": Lf, "modalities": amma.MODALITIES})
            files = 3 * n
            times = []
            for _ in range(2):
                t = time.perf_counter()
                bad = cache.check_feature_files(root, manifest, widths=dims)
                times.append(time.perf_counter() - t)
            assert not bad
            r = {"files": files, "first_s_per_10k": times[0] / files * 1e4, "again_s_per_10k": times[1] / files * 1e4,
                 "mb_per_s": sum(f.stat().st_size for f in root.rglob("*.pt")) / times[0] / 1e6}
            rows[name] = r
            print(f"   {name:32s} {files:6d} files: {r['first_s_per_10k']:6.2f} s per 10k files first "
                  f"({r['mb_per_s']:.0f} MB/s), {r['again_s_per_10k']:5.2f} s per 10k unchanged")
        finally:
            shutil.rmtree(root)
    paper = rows["paper sizes (1280/3072/768 wide)"]
    print(f"   the paper's 120k set (360k files): {paper['first_s_per_10k'] * 36 / 60:.1f} min the first time at "
          f"this disk's speed, {paper['again_s_per_10k'] * 36:.0f} s afterwards")
    report["check"] = rows


def esm1b_architecture(layers=33, dim=1280):
    """fair-esm's ESM-1b (ProteinBertModel, arch roberta_large: 1280 wide, 20 heads, FFN 5120), random weights."""
    import esm
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    args = argparse.Namespace(arch="roberta_large", layers=layers, embed_dim=dim, ffn_embed_dim=4 * dim,
                              attention_heads=20 if dim == 1280 else 4, max_positions=1024, emb_layer_norm_before=True,
                              final_bias=True, token_dropout=False)
    return esm.model.esm1.ProteinBertModel(args, alphabet), alphabet


def saved_bytes(fn, params):
    """Bytes autograd keeps for the backward pass while fn() runs: distinct storages of saved tensors,
    the parameters themselves left out (autocast's bf16 copies of them count: they are new tensors)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def run_esm_memory(args, report):
    """GPU memory of finetuning with ESM-1b in the loop (--esm finetune) at 1022 residues: weights,
    gradients and AdamW moments (fp32) computed from the parameter count, plus the activations autograd
    saves, measured in real bf16-autocast forward passes of the ESM-1b architecture on the CPU at batch 1
    and 2 (batch 4 follows: saved activations are linear in the batch at a fixed length), with and
    without activation checkpointing. The GPU's peak adds the allocator's slack and cuBLAS workspaces."""
    import finetune as ft
    torch.manual_seed(0)
    model, alphabet = esm1b_architecture()
    n_esm = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("contact_head"))
    n_amma = sum(p.numel() for p in amma.AMMAEncoder(amma.AMMAConfig()).parameters())
    static = 16 * (n_trainable + n_amma)                         # fp32 weights + grads + 2 AdamW moments
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i % 20] for i in range(1022))
    print(f"\n== finetuning with ESM-1b in the loop (--esm finetune), 1022 residues, bf16 autocast; {n_esm / 1e6:.0f}M "
          f"ESM-1b + {n_amma / 1e6:.1f}M AMMA encoder parameters (+ head)")
    print(f"   weights + gradients + AdamW moments (fp32): {static / 2 ** 30:.1f} GiB")
    plain, act = list(model.layers), {}
    for checkpointing in (False, True):
        model.layers = nn.ModuleList(plain)
        loop = ft.SeqInLoop(model, alphabet, 33, checkpointing)
        full = ft.FunctionModel(amma.AMMAConfig(), 538, loop).train()              # EC's 538 classes
        for b in (1, 2):
            batch = {"ids": list(range(b)), "sequence": [seq] * b, "str": torch.randn(b, len(seq), 3072),
                     "str_len": torch.full((b,), len(seq))}
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                act[checkpointing, b], _ = saved_bytes(lambda: full(batch), list(full.parameters()))
            if checkpointing:   # a checkpointed layer keeps its input, held by the checkpoint, not by autograd
                act[True, b] += 33 * b * (len(seq) + 2) * 1280 * 4
            print(f"   activations saved for backward, batch {b}, {'with' if checkpointing else 'without'} "
                  f"checkpointing: {act[checkpointing, b] / 2 ** 30:.2f} GiB (forward measured in "
                  f"{time.perf_counter() - t:.0f} s)")
        # linear in the batch: a fixed part (autocast's bf16 copies of the weights) and a part per protein
        act[checkpointing, 4] = act[checkpointing, 1] + 3 * (act[checkpointing, 2] - act[checkpointing, 1])
    rows = {"static_gib": static / 2 ** 30}
    for b in (1, 4):
        layer = (act[False, b] - act[True, b]) / 33        # with checkpointing one layer is rebuilt at a time
        rows[f"peak_b{b}_gib"] = (static + act[False, b]) / 2 ** 30
        rows[f"peak_b{b}_ckpt_gib"] = (static + act[True, b] + layer) / 2 ** 30
        print(f"   batch {b}: about {rows[f'peak_b{b}_gib']:.1f} GiB, {rows[f'peak_b{b}_ckpt_gib']:.1f} GiB with "
              f"--esm-checkpointing (static + saved activations; the GPU adds allocator slack)")
    rows.update({f"activations_b{b}_gib{'_ckpt' if c else ''}": v / 2 ** 30 for (c, b), v in act.items()})
    report["esm_memory"] = rows


def run_finetune(args, device, report):
    """Training steps per second of finetuning with ESM-1b in the loop (the paper's B.2 protocol), the
    ESM-1b architecture with random weights, proteins of the EC test set's mean length (297), at the
    paper's batch sizes 1 (EC, GO-MF, GO-CC) and 4 (GO-BP); bf16 autocast on GPU. The hours of a whole
    finetuning follow from the protein-steps (REPRODUCE.md)."""
    import finetune as ft
    torch.manual_seed(0)
    esm_model, alphabet = esm1b_architecture()
    model = ft.FunctionModel(amma.AMMAConfig(), 538, ft.SeqInLoop(esm_model, alphabet, 33)).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = runs.amp_context("auto", device)
    g = torch.Generator().manual_seed(0)
    L = 297
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i] for i in torch.randint(20, (L,), generator=g).tolist())
    n_esm = sum(p.numel() for p in esm_model.parameters())
    print(f"\n== finetuning step with ESM-1b in the loop ({n_esm / 1e6:.0f}M), {L} residues, device {device}"
          f"{', bf16' if isinstance(autocast, torch.autocast) else ', fp32'}")
    rows = {}
    for b in (1, 4):
        batch = cache.batch_to({"ids": list(range(b)), "sequence": [seq] * b, "str": torch.randn(b, L, 3072),
                               "str_len": torch.full((b,), L)}, device)
        target = (torch.rand(b, 538, generator=g) < 0.01).float().to(device)
        steps = args.finetune_steps
        for i in range(steps + 1):
            if i == 1:
                sync(device)
                t = time.perf_counter()
            with autocast:
                logits = model(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        r = {"steps_per_s": steps / (time.perf_counter() - t)}
        r["proteins_per_s"] = b * r["steps_per_s"]
        r["tflops"] = 6 * n_esm * L * r["proteins_per_s"] / 1e12        # ESM-1b forward + backward dominate
        rows[f"batch {b}"] = r
        print(f"   batch {b}: {r['steps_per_s']:.3f} steps/s, {r['proteins_per_s']:.3f} proteins/s "
              f"(~{r['tflops']:.2f} TFLOP/s in ESM-1b); EC's 1.50M protein-steps: "
              f"{1.5e6 / r['proteins_per_s'] / 3600:.0f} device-hours")
    report["finetune"] = rows


# ----------------------------------------------------------------------------------------------
# host syncs and dispatched ops per training step (the CPU proxies of GPU idling)

class SyncCounter:
    """Counts, between optimizer steps, in this process and outside DataLoader code: host syncs (every
    tensor-to-Python read: .item(), .tolist(), bool(t), float(t), int(t), and every op whose output shape
    depends on the data: nonzero, unique, masked_select, boolean-mask indexing) and all dispatched ops
    (about one kernel launch each on a GPU). A TorchDispatchMode sees the ops; the Python reads are
    wrapped. per_step[i] holds the counts between step i + 1 and step i + 2 (i = 0: steps 1 to 2)."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.per_step, self.active, self.quiet = [], False, 0

    def __enter__(self):
        from torch.optim import optimizer as _optim
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self
        aten = torch.ops.aten
        shape_ops = {getattr(aten, name) for name in ("nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                                                      "masked_select", "argwhere", "nonzero_static") if hasattr(aten, name)}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.active and not counter.quiet:
                    counter.per_step[-1]["ops"] += 1
                    packet = func.overloadpacket
                    boolean_index = packet is aten.index and any(
                        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) if t is not None)
                    if packet in shape_ops or boolean_index or packet is aten._local_scalar_dense:
                        counter.per_step[-1]["syncs"] += 1
                return func(*args, **(kwargs or {}))

        self.saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(method))
        self.next_saved = torch.utils.data.dataloader._BaseDataLoaderIter.__next__
        torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = self._quiet(self.next_saved)
        self.hooks = [_optim.register_optimizer_step_pre_hook(lambda *a: self._pause()),
                      _optim.register_optimizer_step_post_hook(lambda *a: self._start())]
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = self.next_saved
        for h in self.hooks:
            h.remove()
        self.active = False

    def _pause(self):
        self.active = False

    def _start(self):
        self.per_step.append({"syncs": 0, "ops": 0})
        self.active = True

    def _wrap(self, method):
        def read(t, *args, **kwargs):
            if self.active and not self.quiet:
                self.per_step[-1]["syncs"] += 1
            self.quiet += 1                   # the read's own _local_scalar_dense is not counted again
            try:
                return method(t, *args, **kwargs)
            finally:
                self.quiet -= 1
        return read

    def _quiet(self, method):
        def call(*args, **kwargs):
            self.quiet += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.quiet -= 1
        return call

    def mean(self, key, first=2, last=11):
        """Mean per step over steps first..last (the counts between step k and k + 1, k = first - 1 ...)."""
        rows = self.per_step[first - 2:last - 1]
        return sum(r[key] for r in rows) / max(len(rows), 1)


def count_demo_steps(tmp, steps=12):
    """SyncCounter around amma.main and finetune.main (GO-MF from scratch) on the demo's features,
    --num-workers 0: mean syncs and ops per step over steps 2-11, for each."""
    import demo
    import finetune as ft
    root = demo.ensure_demo_features(Path(tmp) / "demo")
    figures = {}
    with SyncCounter() as pre:
        amma.main(["--pretrain", "--features", str(root), "--D", "128", "--n-layers", "3", "--n-heads", "4",
                   "--dec-layers", "1", "--M", "48", "--batch-size", "8", "--epochs", "1", "--limit-steps", str(steps),
                   "--num-workers", "0", "--out", str(Path(tmp) / "pre"), "--device", "cpu"])
    figures["pretrain"] = {k: pre.mean(k) for k in ("syncs", "ops")}
    with SyncCounter() as fine:
        ft.main(["--task", "go-mf", "--from-scratch", "--features", str(root), "--epochs", "1", "--limit-steps",
                 str(steps), "--num-workers", "0", "--out", str(Path(tmp) / "ft"), "--device", "cpu"])
    figures["finetune"] = {k: fine.mean(k) for k in ("syncs", "ops")}
    return figures


# ----------------------------------------------------------------------------------------------
# --gpu-report: one command, one prepared run on a lent GPU (the CPU proxies elsewhere)

SPEC_BF16_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835,
                    "A100": 312, "L40S": 362, "RTX 4090": 165, "RTX 3090": 71, "A6000": 155}   # dense, no sparsity
PRETRAIN_GFLOP = 140.3          # analytic training FLOPs per protein-step at the paper config (README)
GOALS = {"pretrain_proteins_per_s": 2000, "ec_ms_per_step": 8.0}


def spec_peak(name):
    return next((v * 1e12 for k, v in SPEC_BF16_TFLOPS.items() if k.lower() in name.lower()), None)


class Clock:
    """Milliseconds between marks: CUDA events on a GPU (no sync until read), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def profile_steps(step, n, device):
    """Kernels per step, GPU busy fraction and attention kernel names over n steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    wall = time.perf_counter() - t
    events = prof.events()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    if not kernels:                                        # CPU: the dispatched aten ops stand in for kernels
        kernels = [e for e in events if e.name.startswith("aten::")]
    busy = sum(getattr(e, "device_time", 0) or 0 for e in kernels) / 1e6 / wall if device.type == "cuda" else float("nan")
    attention = sorted({e.name for e in kernels if any(k in e.name.lower() for k in ("flash", "fmha", "attention",
                                                                                     "efficient", "sdpa"))})
    return {"kernels_per_step": len(kernels) / n, "busy_fraction": busy, "attention_kernels": attention[:8]}


def count_cuda_syncs(step, n):
    """Host syncs per step as CUDA reports them (torch.cuda.set_sync_debug_mode('warn'))."""
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught) / n


def report_pretrain(args, device, tiny):
    """Pretraining at the paper config (batch 4) on synthetic in-memory batches: eager and compiled."""
    c = amma.AMMAConfig(**(dict(d_seq=32, d_str=48, d_func=16, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24)
                           if tiny else {}))
    n = 4 * (8 if tiny else 64)
    L, Lf = realistic_lengths(n)
    if tiny:
        L, Lf = [max(8, l // 20) for l in L], [max(4, f // 20) for f in Lf]
    items = make_items(c, L, Lf)
    batches = cache.bucket_batches([2 * l + f for l, f in zip(L, Lf)], 4, seed=0, epoch=0)
    ready = kit_batches(c, items, batches, pin=device.type == "cuda")
    autocast = runs.amp_context("auto", device)
    tc = amma.TrainConfig(compile=False)
    results, losses = {}, {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = amma.AMMA(c).to(device)
        opt = runs.make_optimizer(model.parameters(), "adamw", device, lr=1e-4, weight_decay=0.05)
        tc.compile = mode == "compiled"
        net = runs.maybe_compile(model, tc)
        state = {"i": 0, "losses": []}

        def loss_fn(batch):
            with autocast:
                _, loss, logs = net(runs.strip(batch))
            return loss, logs

        def step():
            b = ready[state["i"] % len(ready)]
            loss, _ = runs.train_step(net, opt, [cache.batch_to(b, device)], loss_fn, 1, [state["i"]])
            state["i"] += 1
            state["losses"].append(loss)
            return loss

        t_warm = time.perf_counter()
        for _ in range(len(ready) if mode == "compiled" else 3):              # every shape compiled once
            step()
        sync(device)
        warm = time.perf_counter() - t_warm
        first = [float(x) for x in state["losses"]]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock, t = Clock(device), time.perf_counter()
        clock.mark()
        while time.perf_counter() - t < args.report_seconds:
            step()
            clock.mark()
        ms = clock.intervals()
        opt_clock = Clock(device)
        for _ in range(10):                                                    # the optimiser alone
            opt_clock.mark()
            opt.step()
        opt_clock.mark()
        r = {"warmup_s": round(warm, 1), "steps": len(ms), "p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9)}
        r["proteins_per_s"] = 4e3 / r["p50_ms"]
        peak = spec_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None
        r["spec_peak_fraction"] = r["proteins_per_s"] * PRETRAIN_GFLOP * 1e9 / peak if peak else None
        r["optimizer_ms"] = percentile(opt_clock.intervals(), 0.5)
        r.update(profile_steps(step, 5, device))
        r["syncs_per_step"] = count_cuda_syncs(step, 20) if device.type == "cuda" else None
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        losses[mode] = first
        results[mode] = r
    n_cmp = min(len(losses["eager"]), len(losses["compiled"]))
    results["compiled_vs_eager_max_rel_loss_diff"] = max(
        (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["eager"][:n_cmp], losses["compiled"][:n_cmp])), default=None)
    return results


def report_finetune(args, device, tiny):
    """EC finetuning with the ESM-1b architecture (random weights) in the loop: ms per step split into
    forward / backward / optimiser at batch 1 (297 residues), and peak memory at 1022 residues."""
    import finetune as ft
    esm_model, alphabet = esm1b_architecture(layers=2 if tiny else 33, dim=32 if tiny else 1280)
    L = 30 if tiny else 297
    mc = amma.AMMAConfig(**(dict(d_seq=32, d_str=48, D=32, n_layers=2, n_heads=4) if tiny else {}))

    def build(checkpointing):
        torch.manual_seed(0)
        model = ft.FunctionModel(mc, 538, ft.SeqInLoop(esm_model, alphabet, len(esm_model.layers), checkpointing))
        model = model.to(device).train()
        return model, ft.build_optimizer(model, ft.FinetuneConfig(optimizer="adamw", weight_decay=0.01), device)

    def batch_of(b, n):
        g = torch.Generator().manual_seed(b)
        seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i] for i in torch.randint(20, (n,), generator=g).tolist())
        items = [{"id": str(i), "index": i, "target": (torch.rand(538, generator=g) < 0.01).float(), "seq": None,
                  "func": None, "str": torch.randn(n, mc.d_str, generator=g).half(), "sequence": seq} for i in range(b)]
        return cache.batch_to(ft.collate_task(items, ft.esm_vocab(alphabet)), device)

    autocast = runs.amp_context("auto", device)
    model, opt = build(False)
    batch = batch_of(1, L)
    parts = {"forward": [], "backward": [], "optimizer": []}
    n_steps = 20 if tiny else 300
    for i in range(n_steps + 5):
        clock = Clock(device)
        clock.mark()
        with autocast:
            logits = model(runs.strip(batch))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["target"])
        clock.mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.mark()
        opt.step()
        clock.mark()
        if i >= 5:
            for k, v in zip(parts, clock.intervals()):
                parts[k].append(v)
    r = {k: percentile(v, 0.5) for k, v in parts.items()}
    r["ms_per_step"] = sum(r.values())
    r["ec_hours"] = 1.5e6 * r["ms_per_step"] / 1e3 / 3600        # EC: 15k proteins x 100 epochs at batch 1
    memory = {}
    if device.type == "cuda":
        for b in (1, 4):
            for ck in (False, True):
                del model, opt
                torch.cuda.empty_cache()
                model, opt = build(ck)
                torch.cuda.reset_peak_memory_stats()
                big = batch_of(b, 1022)
                for _ in range(2):
                    with autocast:
                        loss = model(runs.strip(big)).float().sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                memory[f"batch {b}{', checkpointing' if ck else ''}"] = torch.cuda.max_memory_allocated() / 2 ** 30
    r["peak_memory_gib_1022"] = memory
    return r


def run_gpu_report(args, device, report):
    """What a lent GPU is asked: the figures README quotes, and PASS/FAIL against the goals."""
    tiny = args.report_scale == "tiny"
    print(f"== gpu report: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {time.strftime('%Y-%m-%d')}")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    if device.type != "cuda" and not tiny:                         # the CPU proxies
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            figures = count_demo_steps(tmp)
        for k, v in figures.items():
            print(f"   {k} (demo, between optimizer steps 2-11): {v['syncs']:.1f} host syncs per step, "
                  f"{v['ops']:.0f} dispatched ops per step (each about one kernel launch on a GPU)")
        out["cpu_proxies"] = figures
        report["gpu_report"] = out
        return
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = spec_peak(torch.cuda.get_device_name())
        measured = matmul_peak(device, torch.bfloat16, n=8192, reps=20)
        print(f"   bf16 matmul 8192^3: {measured / 1e12:.0f} TFLOP/s; spec dense bf16 peak: "
              f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
        out.update(spec_peak_tflops=peak and peak / 1e12, matmul_tflops=measured / 1e12)
    pre = report_pretrain(args, device, tiny)
    for mode in ("eager", "compiled"):
        r = pre[mode]
        print(f"   pretraining {mode}: p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms per step of 4 -> "
              f"{r['proteins_per_s']:.0f} proteins/s"
              + (f" = {100 * r['spec_peak_fraction']:.1f}% of spec bf16 peak" if r["spec_peak_fraction"] else "")
              + f"; {r['kernels_per_step']:.0f} kernels/step, busy {r['busy_fraction']:.2f}, optimiser "
              f"{r['optimizer_ms']:.2f} ms, syncs/step {r['syncs_per_step']}, peak memory {r['peak_memory_gib']} GiB, "
              f"warm-up {r['warmup_s']} s; attention kernels: {', '.join(r['attention_kernels']) or '-'}")
    print(f"   compiled vs eager losses (same seeds, same batches): max relative difference "
          f"{pre['compiled_vs_eager_max_rel_loss_diff']:.2e}")
    fine = report_finetune(args, device, tiny)
    print(f"   EC finetuning, ESM-1b in the loop, batch 1: {fine['ms_per_step']:.2f} ms per step (forward "
          f"{fine['forward']:.2f}, backward {fine['backward']:.2f}, optimiser {fine['optimizer']:.2f}); EC's 1.5M "
          f"protein-steps: {fine['ec_hours']:.1f} h")
    for k, v in fine["peak_memory_gib_1022"].items():
        print(f"   peak memory at 1022 residues, {k}: {v:.1f} GiB")
    best = max(pre["eager"]["proteins_per_s"], pre["compiled"]["proteins_per_s"])
    verdicts = {"pretraining >= 2,000 proteins/s": best >= GOALS["pretrain_proteins_per_s"],
                "EC finetuning <= 8 ms per step": fine["ms_per_step"] <= GOALS["ec_ms_per_step"]}
    for goal, ok in verdicts.items():
        print(f"   {'PASS' if ok else 'FAIL'}: {goal}")
    out.update(pretrain=pre, finetune=fine, verdicts=verdicts)
    report["gpu_report"] = out


def raw_read(paths, chunk=1 << 24):
    """Bytes per CPU-second of reading `paths` into one reused buffer (page cache -> user memory: the floor
    of any reader)."""
    buf = bytearray(chunk)
    view, total = memoryview(buf), 0
    t = time.process_time()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.process_time() - t)


def memory_copy(n_bytes, total=1 << 30, passes=3):
    """Bytes per CPU-second of copying n_bytes-sized pieces of a resident 1 GB tensor into one reused buffer."""
    src = torch.ones(total // 2, dtype=torch.float16)
    dst, k = torch.empty(n_bytes // 2, dtype=torch.float16), n_bytes // 2
    dst.zero_()
    best = 0.0
    for _ in range(passes):
        t = time.process_time()
        for i in range(len(src) // k):
            dst.copy_(src[i * k:(i + 1) * k])
        best = max(best, (len(src) // k) * k * 2 / (time.process_time() - t))
    return best


def feed_rate(open_set, batches, n_bytes, workers=0, passes=3, threads=False, reopen=True):
    """(proteins/s, bytes/s) of the kit's dataset + collate through a loader as make_loader builds it, the set
    opened afresh each pass (as in a run's first epoch) or, with reopen=False, opened once (as a run's loader
    keeps it from then on, in its threads or its persistent worker processes: the shards stay mapped); the best
    of `passes`. In this process (workers=0): per CPU-second of the process, so other jobs on a shared machine
    do not count; with threads or worker processes: per second of wall time (what the process delivers)."""
    clock = time.process_time if workers == 0 else time.perf_counter
    best, kept = 0.0, None if reopen else open_set()
    for _ in range(passes):
        loader = cache.make_loader(open_set() if reopen else kept, batches, workers, False, cache.collate,
                                   "threads" if threads else "processes")
        t = clock()
        for _ in loader:
            pass
        best = max(best, 1 / (clock() - t))
    return sum(map(len, batches)) * best, n_bytes * best


def bench_feed(args, report):
    """The pretraining feed at the paper's widths (1280/3072/768, float16) and the kit's lengths, from the page
    cache, batches of 4, per loader process: the per-protein .pt files and the packed store (extract_features.py
    --pack), against reading the same bytes raw; and the loader processes a GPU at 2,000-3,000 proteins/s needs."""
    import contextlib
    import gc
    import io
    import shutil
    import tempfile
    import extract_features as ef
    torch.set_num_threads(1)
    n, dims = args.feed_n, {"seq": 1280, "str": 3072, "func": 768}
    L, Lf = realistic_lengths(n, seed=1)
    n_bytes = sum(2 * (l * (dims["seq"] + dims["str"]) + lf * dims["func"]) for l, lf in zip(L, Lf))
    print(f"\n== feed: {n} proteins at paper widths, mean L {sum(L) / n:.0f}, {n_bytes / n / 1e6:.2f} MB per protein, "
          f"{n_bytes / 1e9:.2f} GB per layout; page cache, batches of 4, 1 thread, best of 3, per CPU-second of "
          f"the process (load average {os.getloadavg()[0]:.1f})")
    root = Path(tempfile.mkdtemp(dir=args.tmp or None))
    try:
        files = root / "files"
        g = torch.Generator().manual_seed(0)
        lines = ["id\tL\tL_func\tmodalities"]
        for m in dims:
            (files / m).mkdir(parents=True)
        for i, (l, lf) in enumerate(zip(L, Lf)):
            for m, d in dims.items():
                torch.save(torch.randn(lf if m == "func" else l, d, generator=g).half(), files / m / f"P{i:05d}.pt")
            lines.append(f"P{i:05d}\t{l}\t{lf}\tseq,str,func")
        (files / "manifest.tsv").write_text("\n".join(lines) + "\n")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            t = time.perf_counter()
            assert ef.pack_store(files, root / "store", shard_mb=4096) == 0
            pack_s = time.perf_counter() - t
        sets = {"files": (files, sorted(files.glob("*/*.pt"))),
                "store": (root / "store", sorted((root / "store" / "store").glob("*/*.safetensors")))}
        batches = cache.bucket_batches([2 * l + lf for l, lf in zip(L, Lf)], 4, 0, 0)
        raw = {}
        for name, (_, paths) in sets.items():
            raw_read(paths)                                                    # into the page cache
            raw[name] = max(raw_read(paths) for _ in range(3))
        copy = memory_copy(n_bytes // n)
        print(f"   one memory copy of a protein's bytes (resident memory -> a reused buffer; the ceiling of any one-copy "
              f"feed on this machine): {copy / 1e9:.2f} GB/s = {copy * n / n_bytes:.0f} proteins/s")
        rows = {"memory_copy_gb_per_s": copy / 1e9, "memory_copy_proteins_per_s": copy * n / n_bytes}
        for name, layout, workers, reopen in (("files, cache.collate", "files", 0, True),
                                              ("store, opened afresh (a run's first epoch)", "store", 0, True),
                                              ("store, kept open (the epochs after)", "store", 0, False),
                                              ("store, 1 worker process (wall time)", "store", 1, True),
                                              ("store, 1 process, 2 threads (wall time)", "store", -2, False)):
            per_s, rate = feed_rate(lambda: cache.open_features(sets[layout][0]), batches, n_bytes, abs(workers),
                                    passes=4, threads=workers < 0, reopen=reopen)
            need = [math.ceil(x / per_s) for x in (2000, 3000)]
            rows[name] = {"proteins_per_s": per_s, "gb_per_s": rate / 1e9, "raw_gb_per_s": raw[layout] / 1e9,
                          "ratio": rate / raw[layout], "of_memory_copy": rate / copy, "processes_for_2000_3000": need}
            print(f"   {name:42s} feed: {per_s:.0f} proteins/s per process, {rate / 1e9:.2f} GB/s; raw read "
                  f"{raw[layout] / 1e9:.2f} GB/s (ratio {rate / raw[layout]:.2f}; {rate / copy:.2f} of a memory copy); a GPU at 2,000-3,000 proteins/s "
                  f"needs {need[0]}-{need[1]} loader processes")
        best = max((r for k, r in rows.items() if k.startswith("store") and isinstance(r, dict)),
                   key=lambda r: r["proteins_per_s"])
        met = best["proteins_per_s"] >= 3000 and best["ratio"] >= 0.5
        rows["goal_met"] = met
        print(f"   goal (>= 3,000 proteins/s per loader process, >= 0.5 of the raw read rate): "
              f"{'met' if met else 'NOT met'} on this machine (best: {best['proteins_per_s']:.0f} proteins/s, "
              f"ratio {best['ratio']:.2f})")
        gc.collect()                                                           # no mapping left: the pages can go
        for p in sets["store"][1]:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)                 # only these files leave the cache
            os.close(fd)
        per_s, rate = feed_rate(lambda: cache.open_features(sets["store"][0]), batches, n_bytes, passes=1)
        rows["store_from_disk"] = {"proteins_per_s": per_s, "gb_per_s": rate / 1e9}
        print(f"   store from this machine's disk (its pages dropped first): {per_s:.0f} proteins/s, {rate / 1e9:.2f} GB/s")
        manifest = cache.read_manifest(files)
        for name, (path, _) in sets.items():
            (path / ".checked.tsv").unlink(missing_ok=True)
            t = time.perf_counter()
            assert not cache.check_features(path, manifest)
            rows[f"check_s_{name}"] = time.perf_counter() - t
        print(f"   check before step 1 (cache.check_features) of the {n} proteins: files {rows['check_s_files']:.2f} s "
              f"(every file read: loads, shape, finite), store {rows['check_s_store']:.3f} s (index checksum, "
              f"shard sizes and headers, rows)")
        rows["pack_gb_per_s"] = n_bytes / pack_s / 1e9
        print(f"   extract_features.py --pack (read .pt, check finite, write shards, sha256): "
              f"{n_bytes / pack_s / 1e9:.2f} GB/s")
        report["feed"] = rows
    finally:
        shutil.rmtree(root)

@dataclass
class BenchConfig:
    only: str = arg(None, "one part only", choices=("pretrain", "metrics", "extract", "check", "esm-memory", "finetune",
                                                    "feed"))
    gpu_report: bool = arg(False, "the GPU figures of README (under 5 minutes on one H100/H200); on a CPU: host syncs "
                                  "and dispatched ops per step, the proxies of GPU idling (under 2 minutes)")
    report_seconds: float = arg(60.0, "--gpu-report: timed seconds per pretraining mode")
    report_scale: str = arg("paper", "--gpu-report at tiny sizes: the GPU code path end to end on any device (a smoke "
                                     "test)", choices=("paper", "tiny"))
    steps: int = arg(4, "timed training steps per row (>= 1)")
    skip_loop: bool = arg(False, "skip the loop-per-protein reference")
    json: str = arg("", "also write the figures to this JSON file")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    encoders: str = arg("tiny", "extraction encoders (real needs the downloaded weights)", choices=("tiny", "real"))
    extract_n: int = arg(48, "demo proteins to extract")
    finetune_steps: int = arg(2, "timed finetuning steps per batch size (>= 1)")
    check_n: int = arg(300, "paper-size proteins for the check figure (>= 1)")
    feed_n: int = arg(400, "paper-size proteins for the feed figure (about 3.3 MB each, written twice: per-protein "
                           "files and the store; removed afterwards)")
    tmp: str = arg("", "folder for the temporary files of check and feed (default: the system's)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    amma.add_config_flags(p, BenchConfig)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None and v is not False}
    args = BenchConfig(**given)
    for name in ("steps", "finetune_steps", "check_n", "feed_n", "extract_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: need an integer >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {}
    if args.gpu_report:
        run_gpu_report(args, device, report)
        args.only = "none"
    if args.only in (None, "metrics"):
        run_metrics(report)
    if args.only in (None, "pretrain"):
        run_pretrain(args, device, report)
    if args.only in (None, "extract"):
        run_extract(args, device, report)
    if args.only in (None, "check"):
        run_check(args, report)
    if args.only in (None, "esm-memory"):
        run_esm_memory(args, report)
    if args.only in (None, "finetune"):
        run_finetune(args, device, report)
    if args.only in (None, "feed"):
        bench_feed(args, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
