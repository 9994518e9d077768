"""The feature store (extract_features.py --pack, cache.FeatureStore): a run on the store equals the same run on
the per-protein files bit for bit; packing refuses bad files, resumes, is idempotent and locked."""
import fcntl
import json

import pytest
import torch

import amma
import cache
import extract_features as ef
from conftest import write_features

SMALL = dict(d_seq=12, d_str=20, d_func=8, D=32, n_layers=2, n_heads=4, dec_layers=1, M=24, dropout=0.1)


def pack(src, *args):
    return ef.main(["--pack", str(src), *map(str, args)])


def test_store_items_are_the_files_rows_and_safetensors_reads_them(tmp_path):
    root = write_features(tmp_path / "f", [5 + i % 7 for i in range(20)], modalities=("seq", "str"))
    assert pack(root, "--store-out", tmp_path / "s", "--store-shard-mb", 0.002) == 0
    meta = json.loads((tmp_path / "s" / "store" / "store.json").read_text())
    assert meta["shards"] > 2 and meta["dims"] == {"seq": 12, "str": 20}
    files, store = cache.FeatureDataset(root), cache.open_features(tmp_path / "s")
    assert isinstance(store, cache.FeatureStore) and store.counts() == files.counts()
    for i in range(len(files)):
        a, b = files[i], store[i]
        assert b["func"] is None and all(torch.equal(a[m], b[m]) for m in ("seq", "str"))
    import mmap
    store.willneed = mmap.MADV_WILLNEED                                   # as for a set larger than half the memory
    assert all(torch.equal(files[i]["str"], store[i]["str"]) for i in range(len(files)))
    st = pytest.importorskip("safetensors.torch")                      # the shards are plain safetensors files
    shard = st.load_file(tmp_path / "s" / "store" / "str" / "00001.safetensors")["str"]
    ours = torch.cat([store[i]["str"] for i in range(len(store)) if store.index["str"][store.rows[i]["id"]][0] == "00001"])
    assert shard.dtype == torch.float16 and torch.equal(shard, ours)
    assert cache.feature_dims(tmp_path / "s") == {"seq": 12, "str": 20}
    assert torch.equal(cache.read_feature(tmp_path / "s", "str", "P003"), files[3]["str"])


def test_pretraining_on_the_store_equals_the_files_bit_for_bit(tmp_path):
    root = write_features(tmp_path / "f", [6 + i % 9 for i in range(24)])
    assert pack(root, "--store-out", tmp_path / "s", "--store-shard-mb", 0.01) == 0
    runs = {}
    for name, features, workers in (("files", root, 0), ("store", tmp_path / "s", 0), ("store2", tmp_path / "s", 2),
                                    ("files2", root, 2)):                  # 2 threads; 2 worker processes, kept
        mc = amma.AMMAConfig(**SMALL)
        tc = amma.TrainConfig(features=str(features), out=str(tmp_path / name), epochs=2, batch_size=4,
                              num_workers=workers, lr=1e-3)
        runs[name] = amma.pretrain(mc, tc, quiet=True)
    ckpt = {n: torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in runs}
    for n in ("store", "store2", "files2"):
        assert runs[n] == runs["files"]
        assert all(torch.equal(v, ckpt[n]["model"][k]) for k, v in ckpt["files"]["model"].items()), n


def test_finetuning_on_a_packed_task_set_equals_the_files(tmp_path):
    import finetune as ft
    from test_finetune import feature_set, pretrain_tiny
    root, _ = feature_set(tmp_path / "f")
    ckpt = pretrain_tiny(root, tmp_path / "pre")
    assert pack(root, "--store-out", tmp_path / "s") == 0
    results = [ft.main(["--task", "go-mf", "--features", str(f), "--ckpt", str(ckpt), "--out", str(tmp_path / o),
                        "--epochs", "2", "--num-workers", w, "--batch-size", "2"])
               for f, o, w in ((root, "a", "0"), (tmp_path / "s", "b", "0"), (root, "c", "2"))]  # c: worker processes
    assert results[0]["test"] == results[1]["test"] == results[2]["test"]


def test_pack_refuses_nan_keeps_finished_shards_and_resumes(tmp_path, capsys):
    root = write_features(tmp_path / "f", [8] * 12)
    x = torch.load(root / "str" / "P010.pt", weights_only=True)
    good = x.clone()
    x[2, 3] = float("nan")
    torch.save(x, root / "str" / "P010.pt")
    assert pack(root, "--store-shard-mb", 0.001) == 3                    # 1 KiB: 6 shards of 2 proteins
    err = capsys.readouterr().err
    assert "bad P010:" in err and "1 values are nan or inf" in err and "nothing committed" in err
    assert not cache.is_store(root) and (root / "store.partial" / "00000.json").exists()
    torch.save(good, root / "str" / "P010.pt")
    assert pack(root, "--store-shard-mb", 0.001) == 0
    assert "12 proteins, 6 shards (5 from an earlier run)" in capsys.readouterr().out
    assert cache.is_store(root) and not (root / "store.partial").exists()
    assert cache.check_features(root, cache.read_manifest(root)) == {}
    store = cache.open_features(root)
    assert torch.equal(store[10]["str"], good)
    before = (root / "store" / "store.json").stat().st_mtime_ns
    assert pack(root, "--store-shard-mb", 0.001) == 0                    # up to date: left as it is
    assert (root / "store" / "store.json").stat().st_mtime_ns == before


def test_check_before_step_1_names_a_damaged_store_and_a_stale_one(tmp_path):
    root = write_features(tmp_path / "f", [8] * 6)
    assert pack(root, "--store-shard-mb", 0.001) == 0
    shard = next((root / "store" / "seq").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])                          # truncated
    bad = cache.check_features(root, cache.read_manifest(root))
    assert bad and all(why.startswith(f"seq: {shard}: ") and "bytes, store.json says" in why for why in bad.values())
    mc = amma.AMMAConfig(**SMALL)
    tc = amma.TrainConfig(features=str(root), out=str(tmp_path / "run"), epochs=1, batch_size=2, num_workers=0)
    with pytest.raises(SystemExit, match="proteins have bad feature files"):
        amma.pretrain(mc, tc, quiet=True)
    (root / "manifest.tsv").write_text((root / "manifest.tsv").read_text() + "\n")
    with pytest.raises(ValueError, match=r"store is stale: manifest.tsv changed since it was packed; run "
                                         r"extract_features.py --pack"):
        cache.open_features(root)


def test_pack_bad_input_and_a_second_packer_are_one_line_errors(tmp_path, capsys):
    assert pack(tmp_path / "none") == 2
    assert "manifest.tsv not found (not a feature set)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.tsv").write_text("id\tL\tL_func\tmodalities\n")
    assert pack(tmp_path / "empty") == 2 and "lists no proteins" in capsys.readouterr().err
    root = write_features(tmp_path / "f", [8] * 3)
    assert pack(root, "--store-shard-mb", 0) == 2 and "need a size > 0" in capsys.readouterr().err
    with open(root / ".pack.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert pack(root) == 2 and "another --pack is writing" in capsys.readouterr().err
    assert pack(root) == 0


def test_analyze_reads_a_packed_set_like_the_files(tmp_path):
    import analyze
    root = write_features(tmp_path / "f", [6 + i % 5 for i in range(10)])
    mc = amma.AMMAConfig(**{**SMALL, "dropout": 0.0})
    amma.pretrain(mc, amma.TrainConfig(features=str(root), out=str(tmp_path / "pre"), epochs=1, limit_steps=2,
                                       batch_size=4, num_workers=0), quiet=True)
    assert pack(root, "--store-out", tmp_path / "s") == 0
    tables = []
    for features, out in ((root, "a"), (tmp_path / "s", "b")):
        analyze.main(["--ckpt", str(tmp_path / "pre" / "checkpoint.pt"), "--features", str(features),
                      "--out", str(tmp_path / out), "--tsne-n", "0", "--batch-size", "4"])
        tables.append(json.loads((tmp_path / out / "table1.json").read_text())["table1"])
    assert tables[0] == tables[1]
