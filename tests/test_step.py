"""The GPU-first training step, proved on the CPU: no host syncs per step (counted), compiled == eager,
the kit's ESM forward == fair-esm's, and amma.py's model part running on its own."""
import re

import pytest
import torch

import amma
import bench
import cache
import finetune as ft
from conftest import ROOT, write_features


# ---- no host syncs ---------------------------------------------------------------------------

def test_training_steps_read_nothing_back_from_the_device(tmp_path):
    """A new .item(), bool(t), boolean-mask index or unique in a step fails here (it was 47 and 6 per step)."""
    figures = bench.count_demo_steps(tmp_path)
    assert figures["pretrain"]["syncs"] <= 0.1, figures
    assert figures["finetune"]["syncs"] <= 0.1, figures
    assert figures["pretrain"]["ops"] > 100                                   # the counter saw the step


def test_sync_counter_counts_what_it_says():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with bench.SyncCounter() as counter:
        for i in range(4):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            x = torch.randn(5)
            loss.item(), bool(x.sum() > 0), x[x > 0], x.tolist()               # 4 syncs in every interval
    assert [r["syncs"] for r in counter.per_step] == [4, 4, 4, 4]


# ---- masks made with the batch ---------------------------------------------------------------

def test_collate_masks_equal_the_encoders_own():
    """keep_ids made in collate (the loader workers) are the ones the encoder draws from the same seeds."""
    torch.manual_seed(0)
    model = amma.AMMA(amma.AMMAConfig(d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24))
    g = torch.Generator().manual_seed(1)
    items = [{"id": f"p{i}", "seq": torch.randn(L, 12, generator=g), "str": torch.randn(L, 20, generator=g),
              "func": torch.randn(Lf, 8, generator=g), "seed": amma.seed_hash(0, 1, 2, i)}
             for i, (L, Lf) in enumerate([(9, 3), (30, 7), (5, 0)])]
    items[2]["func"] = None
    batch = amma.collate_pretraining(items, 24, (1.0, 2.0, 2.0))
    assert batch["seq"].shape[1] == cache.padded_length(30) == 30 and cache.padded_length(37) == 40
    own = model.enc({k: v for k, v in batch.items() if k not in ("keep_ids", "keep")}, seeds=[it["seed"] for it in items])
    made = model.enc(batch)
    assert torch.equal(own.ids, made.ids) and torch.equal(own.keep, made.keep)
    assert made.keep.sum(1).tolist() == [21, 24, 10]                          # min(M, 2L + L')


# ---- torch.compile == eager ------------------------------------------------------------------

def test_compiled_pretraining_equals_eager(tmp_path):
    """--compile (inductor, fullgraph) on the CPU: the logged losses of 4 steps equal eager's to 1e-4
    (relative); the compiled kernels reassociate float sums, so not bit for bit."""
    root = write_features(tmp_path / "f", [20] * 8)                            # one shape: one compilation
    logs = {}
    for how in ("eager", "compiled"):
        mc = amma.AMMAConfig(d_seq=12, d_str=20, d_func=8, D=32, n_layers=1, n_heads=4, dec_layers=1, M=24)
        tc = amma.TrainConfig(features=str(root), out=str(tmp_path / how), batch_size=2, num_workers=0, lr=1e-3,
                              epochs=1, limit_steps=4, log_every=1, compile=how == "compiled")
        amma.pretrain(mc, tc, quiet=True)
        lines = (tmp_path / how / "log.jsonl").read_text().splitlines()
        logs[how] = [float(re.search(r'"loss": ([0-9.e-]+)', l).group(1)) for l in lines if '"step"' in l]
    assert len(logs["eager"]) == 4
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-4)


# ---- ESM in the loop: the kit's forward over fair-esm's weights ------------------------------

@pytest.mark.parametrize("arch", ["esm1b", "esm2"])
def test_esm_forward_equals_fair_esm(tmp_path, arch):
    import replicas
    make = replicas.write_esm1b if arch == "esm1b" else replicas.write_esm2
    model = make(tmp_path / "esm.pt", layers=3)
    import esm
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLE", "ACDEFGHIKLMNPQRSTVWYXBZ"]
    _, _, reference_tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    vocab = ft.esm_vocab(alphabet)
    tokens = ft.esm_tokens(seqs, vocab, cache.padded_length(max(map(len, seqs))))
    assert torch.equal(tokens[:, :reference_tokens.shape[1]], reference_tokens)   # then padding only
    assert (tokens[:, reference_tokens.shape[1]:] == alphabet.padding_idx).all()
    with torch.no_grad():
        for layer in (2, 3):                                                  # inside, and the last (final LN)
            ref = model(reference_tokens, repr_layers=[layer])["representations"][layer]
            ours = ft.esm_representation(model, tokens, layer)
            for b, s in enumerate(seqs):
                n = len(s) + 2
                assert torch.allclose(ours[b, :n], ref[b, :n], atol=1e-5), (arch, layer, (ours[b, :n] - ref[b, :n]).abs().max())


# ---- amma.py's model part, alone ---------------------------------------------------------------

def test_the_model_part_of_amma_py_runs_alone():
    text = (ROOT / "amma.py").read_text()
    marker = text.index("# end of the model")
    namespace = {"__name__": "copied_amma"}
    exec(compile(text[:marker], "amma_model_part", "exec"), namespace)        # a fresh namespace: no amma module
    assert "collate" not in namespace and "FeatureDataset" not in namespace and "tqdm" not in namespace
    torch.manual_seed(0)
    config = namespace["AMMAConfig"](d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24)
    model = namespace["AMMA"](config)
    g = torch.Generator().manual_seed(0)
    batch = {"seq": torch.randn(2, 16, 12, generator=g), "str": torch.randn(2, 16, 20, generator=g),
             "func": torch.randn(2, 6, 8, generator=g), "seq_len": torch.tensor([16, 11]),
             "str_len": torch.tensor([16, 11]), "func_len": torch.tensor([6, 4])}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        _, loss, logs = model(batch, seeds=namespace["protein_seeds"](2, 0, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(logs) == {"loss_seq", "loss_str", "loss_func"}
    assert losses[-1] < 0.6 * losses[0]


def test_loader_threads_give_the_batches_worker_processes_give(tmp_path):
    root = write_features(tmp_path / "f", [5 + i % 9 for i in range(14)])
    ds = cache.FeatureDataset(root)
    batches = [[0, 3], [5, 1, 2], [13], [7, 8, 9, 10], [4, 6, 11, 12]]
    threads = list(cache.make_loader(ds, batches, 2, False, cache.collate, "threads"))
    inline = list(cache.make_loader(ds, batches, 0, False, cache.collate))
    assert [b["ids"] for b in threads] == [b["ids"] for b in inline] == [[f"P{i:03d}" for i in b] for b in batches]
    assert all(torch.equal(a[m], b[m]) for a, b in zip(threads, inline) for m in amma.MODALITIES)
    assert cache.loader_kind("auto", [ds]) == "processes" and cache.loader_kind("threads", [ds]) == "threads"


def test_write_rows_copies_and_zero_pads_over_stale_memory_and_falls_back_to_torch_for_other_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g).half()
    for src in (x, x.float(), x.t().contiguous().t()):                  # memmove; another dtype; not contiguous
        dst = torch.full((8, 6), float("nan"), dtype=torch.float16)          # a reused buffer's stale values
        cache.write_rows(dst, src)
        assert torch.equal(dst[:5], x) and torch.equal(dst[5:], torch.zeros(3, 6, dtype=torch.float16))
    dst = torch.full((4, 6), 7.0, dtype=torch.bfloat16)
    cache.write_rows(dst, None)                                              # absent for this protein: all 0
    assert torch.equal(dst, torch.zeros_like(dst))
    for bad in (torch.zeros(5, 7).half(), torch.zeros(9, 6).half()):              # never a write past the buffer
        with pytest.raises(ValueError, match="do not fit"):
            cache.write_rows(torch.zeros(8, 6).half(), bad)


def test_batch_memory_reuses_a_block_only_when_every_tensor_on_it_is_gone_and_kept_batches_stay_intact(tmp_path):
    mem = cache.BatchMemory(keep=1 << 20)
    a = mem.empty((4, 100), torch.float16)
    first, part = a.data_ptr(), a[1:3]
    a.fill_(1)
    del a                                                                  # a view of it is still alive
    b = mem.empty((4, 100), torch.float16)
    b.fill_(2)
    assert b.data_ptr() != first and torch.all(part == 1)
    second = b.data_ptr()
    del b, part
    again = mem.empty((8, 25), torch.float32), mem.empty((3, 7), torch.bfloat16)          # any dtype, same class
    assert {t.data_ptr() for t in again} == {first, second}
    del again
    blocks = [mem.empty((1 << 18,), torch.uint8) for _ in range(6)]           # 6 x 256 KiB, 1 MiB may wait
    del blocks
    assert mem.idle == 2 * 4096 + 3 * (1 << 18)                              # 3 fit beside the 2 small blocks
    root = write_features(tmp_path / "f", [5 + i % 9 for i in range(14)])
    ds = cache.FeatureDataset(root)
    batches = [[0, 3], [5, 1, 2], [13], [7, 8, 9, 10], [4, 6, 11, 12]] * 3
    for workers, kind in ((0, "processes"), (2, "threads")):
        kept = list(cache.make_loader(ds, batches, workers, False, cache.collate, kind))   # none given back
        for batch, keys in zip(kept, batches):
            for j, k in enumerate(keys):
                item = ds[k]
                for m in amma.MODALITIES:
                    n = len(item[m])
                    assert torch.equal(batch[m][j, :n], item[m]) and not batch[m][j, n:].any()


class _WorkerPids(torch.utils.data.Dataset):
    """Items that say which process made them."""
    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        import os
        return {**self.ds[i], "pid": os.getpid()}


def _pids_collate(items):
    return {**cache.collate(items), "pids": [it["pid"] for it in items]}


def test_a_feed_keeps_its_worker_processes_across_epochs_and_drops_a_partial_epochs_leftovers(tmp_path):
    root = write_features(tmp_path / "f", [5 + i % 9 for i in range(16)])
    ds = cache.FeatureDataset(root)
    plans = [cache.bucket_batches(ds.lengths(), 3, 0, e) for e in range(3)]
    with cache.Feed(_WorkerPids(ds), 2, False, _pids_collate) as feed:
        epochs = []
        for e, plan in enumerate(plans):
            it = feed.epoch(plan)
            epochs.append([next(it) for _ in range(2)] if e == 0 else list(it))     # epoch 0 stops after 2 batches
        workers = feed.loader._iterator._workers
    assert all(not w.is_alive() for w in workers)                                  # the context ended them
    inline = [list(cache.make_loader(_WorkerPids(ds), plan, 0, False, _pids_collate)) for plan in plans]
    for got, want in zip(epochs, inline):
        assert [b["ids"] for b in got] == [b["ids"] for b in want][:len(got)]
        assert all(torch.equal(a[m], b[m]) for a, b in zip(got, want) for m in amma.MODALITIES)
    pids = [{p for b in batches for p in b["pids"]} for batches in epochs]
    assert len(pids[1] | pids[2]) == 2 and pids[0] <= pids[1] | pids[2]             # the same 2 processes throughout
    threads = cache.Feed(ds, 2, False, cache.collate, "threads")
    assert [b["ids"] for b in threads.epoch(plans[1])] == [b["ids"] for b in inline[1]]


def test_the_kit_imports_form_no_circle_and_the_shared_files_need_only_torch():
    """amma.py's model part imports no kit file; cache.py and runs.py need only torch and the standard
    library (cache.py uses runs.py); the kit's imports form no circle; the modality order is one."""
    import ast
    import sys
    kit = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in kit:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = names & kit - {name}
        if name in ("cache", "runs"):
            outside = names - kit - set(sys.stdlib_module_names) - {"torch", "tqdm"}
            assert not outside, (name, outside)
    assert graph["runs"] == set() and graph["cache"] == {"runs"}
    done, stack = set(), []

    def visit(n):
        assert n not in stack, " -> ".join(stack + [n])
        if n not in done:
            stack.append(n)
            for m in sorted(graph[n]):
                visit(m)
            stack.pop()
            done.add(n)
    for n in sorted(graph):
        visit(n)
    text = (ROOT / "amma.py").read_text()
    model_part = ast.parse(text[:text.index("# end of the model")])
    used = {a.name.split(".")[0] for n in model_part.body if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module.split(".")[0] for n in model_part.body if isinstance(n, ast.ImportFrom)}
    assert used <= set(sys.stdlib_module_names) | {"torch"}, used
    assert amma.MODALITIES == cache.MODALITIES
