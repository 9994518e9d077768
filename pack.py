"""
extract_features.py --pack: a finished per-protein feature set packed into the streaming store that
cache.FeatureStore reads (the format is written down in cache.py, beside its reader).

    python extract_features.py --pack features/pretrain                              # -> features/pretrain/store
    python extract_features.py --pack features/pretrain --store-out /nvme/features/pretrain

Every file is checked as it is packed (float16, rows, finite), so the check before step 1 of a store is
cheap by construction; shards are written under <dst>/store.partial and committed by renames at the end;
a rerun resumes from the shards already written; one --pack at a time per destination (a lock file).
"""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import cache
from cache import MODALITIES, feature_file
from sources import EXIT_OK, EXIT_PARTIAL, FatalError, log, progress, write_text_atomic


# The per-protein set packed for streaming (cache.py's FeatureStore reads it; its format is written there):
# per modality, shards of about --store-shard-mb of contiguous float16 rows, one safetensors file each.

def safetensors_header(name, rows, width):
    """Header of a one-tensor float16 safetensors file, padded with spaces (as the format allows) so
    the data starts on a 4 KiB boundary."""
    header = json.dumps({name: {"dtype": "F16", "shape": [rows, width],
                                "data_offsets": [0, 2 * rows * width]}}).encode()
    header += b" " * (-(8 + len(header)) % 4096)
    return len(header).to_bytes(8, "little") + header


def store_plan(rows, dims, shard_bytes):
    """Manifest rows cut, in order, into shards of at least shard_bytes (the last one smaller)."""
    shards, size = [[]], 0
    for r in rows:
        if shards[-1] and size >= shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(r)
        size += sum(2 * dims[m] * (r["L_func"] if m == "func" else r["L"]) for m in r["modalities"])
    return shards


def read_for_store(path, rows, width):
    """A protein's float16 [rows, width] features as packed; ValueError (one line) if it is missing,
    unreadable, of another shape or dtype, or not finite."""
    try:
        x = cache.load_tensor(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    if x.dtype != torch.float16 or tuple(x.shape) != (rows, width):
        raise ValueError(f"{path}: {x.dtype} {tuple(x.shape)}, expected float16 ({rows}, {width})")
    if not torch.isfinite(x.sum(dtype=torch.float32)):          # NaN and inf survive a float32 sum: one fast pass
        raise ValueError(f"{path}: {int((~torch.isfinite(x)).sum())} values are nan or inf")
    return x


def pack_shard(src, work, name, rows, dims):
    """Write <work>/<m>/<name>.safetensors for every modality of these rows (a temporary file, fsync, rename).
    Returns ({id: {m: [start, rows]}}, {m: {rows, bytes, sha256}}, {id: reason} of the bad proteins:
    when there are any, no file of the shard is kept)."""
    entries, files, bad = {r["id"]: {} for r in rows}, {}, {}
    for m in MODALITIES:
        members = [r for r in rows if m in r["modalities"]]
        if not members:
            continue
        total = sum(r["L_func" if m == "func" else "L"] for r in members)
        path = work / m / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        h, start = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            head = safetensors_header(m, total, dims[m])
            f.write(head)
            h.update(head)
            for r in members:
                n = r["L_func" if m == "func" else "L"]
                try:
                    x = read_for_store(src / m / feature_file(r["id"]), n, dims[m])
                except ValueError as e:
                    bad.setdefault(r["id"], str(e))
                    continue
                data = memoryview(x.contiguous().view(torch.uint8).numpy())     # [n, 2 d] bytes, little-endian
                f.write(data)
                h.update(data)
                entries[r["id"]][m] = [start, n]
                start += n
            f.flush()
            os.fsync(f.fileno())
        if bad:
            tmp.unlink()
            continue
        os.replace(tmp, path)
        files[m] = {"rows": total, "bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return entries, files, bad


def copy_set_files(src, dst):
    """The small files of a feature set (manifest.tsv, info.json, labels_*.json, ...) copied next to a store
    written elsewhere (--store-out), each atomically."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and ".shard-" not in f.name:
            tmp = dst / f".{f.name}.{os.getpid()}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dst / f.name)


def commit_store(dst, work, rows, plan, key, done):
    """index.tsv, SHA256SUMS and store.json (written last) into work, then work becomes <dst>/store."""
    lines = ["\t".join(cache.STORE_COLUMNS)]
    for k, shard in enumerate(plan):
        entries = done[f"{k:05d}"]["entries"]
        for r in shard:
            e = entries[r["id"]]
            lines.append("\t".join([r["id"], f"{k:05d}"] + [str(v) for m in MODALITIES for v in e.get(m, ("", ""))]))
    write_text_atomic(work / "index.tsv", "\n".join(lines) + "\n")
    files = {m: {name: rec["files"][m] for name, rec in sorted(done.items()) if m in rec["files"]} for m in MODALITIES}
    files = {m: v for m, v in files.items() if v}
    write_text_atomic(work / "SHA256SUMS", "".join(f"{info['sha256']}  {m}/{name}.safetensors\n"
                                                   for m, v in files.items() for name, info in v.items()))
    meta = {**key, "dtype": "float16", "proteins": len(rows), "shards": len(plan),
            "bytes": sum(i["bytes"] for v in files.values() for i in v.values()),
            "index_sha256": cache.sha256_file(work / "index.tsv"), "files": files}
    for name in done:
        (work / f"{name}.json").unlink()
    (work / "plan.json").unlink()
    write_text_atomic(work / "store.json", json.dumps(meta, indent=1))
    final, old = dst / cache.STORE_DIR, dst / f"{cache.STORE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def store_is_current(dst, rows, key):
    """The store at dst was packed from this manifest, with these dims and shard size, and its files are whole."""
    try:
        meta, _ = cache.read_store_index(dst)
        return all(meta.get(k) == v for k, v in key.items()) and not cache.check_store(dst, rows)
    except (ValueError, KeyError, OSError):
        return False


def pack_store(src, dst=None, shard_mb=4096):
    """extract_features.py --pack SRC [--store-out DST]: the per-protein set SRC packed into DST/store (DST
    defaults to SRC; otherwise SRC's manifest, info and labels are copied to DST, a set of its own). Every
    file is checked (shape, float16, finite) as it is packed: any bad protein stops the commit (exit 3,
    each listed), shards already written are kept and a rerun resumes; an up-to-date store is left as it
    is. One --pack at a time per DST (a lock file). Returns the exit status."""
    import fcntl
    import time
    src, dst = Path(src), Path(dst or src)
    if not (src / "manifest.tsv").exists():
        raise FatalError(f"--pack {src}: {src}/manifest.tsv not found (not a feature set)")
    if sys.byteorder != "little":
        raise FatalError("--pack writes little-endian float16 (safetensors): this machine is big-endian")
    if not shard_mb > 0:
        raise FatalError(f"--store-shard-mb {shard_mb}: need a size > 0")
    try:
        rows = cache.read_manifest(src)
    except ValueError as e:
        raise FatalError(str(e)) from None
    if not rows:
        raise FatalError(f"--pack {src}: manifest.tsv lists no proteins")
    dims = cache.feature_dims(src)
    missing = sorted({m for r in rows for m in r["modalities"]} - set(dims))
    if missing:
        raise FatalError(f"--pack {src}: no width known for {', '.join(missing)} (info.json's dims)")
    dims = {m: dims[m] for m in MODALITIES if m in dims}
    dst.mkdir(parents=True, exist_ok=True)
    lock = open(dst / ".pack.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FatalError(f"--pack: another --pack is writing {dst}/{cache.STORE_DIR}; wait for it") from None
    with lock:
        key = {"format": cache.STORE_FORMAT, "manifest_sha256": cache.sha256_file(src / "manifest.tsv"),
               "dims": dims, "shard_mb": shard_mb}
        if dst != src:
            copy_set_files(src, dst)
        if store_is_current(dst, rows, key):
            log(f"{dst}/{cache.STORE_DIR}: up to date with {src}/manifest.tsv ({len(rows)} proteins); nothing to do")
            return EXIT_OK
        work = dst / f"{cache.STORE_DIR}.partial"
        plan_path = work / "plan.json"
        if work.exists() and (not plan_path.exists() or json.loads(plan_path.read_text()) != key):
            shutil.rmtree(work)                                # another manifest or shard size: start over
        work.mkdir(exist_ok=True)
        write_text_atomic(plan_path, json.dumps(key))
        plan = store_plan(rows, dims, int(shard_mb * 2 ** 20))
        done, bad, t0, resumed = {}, {}, time.time(), 0
        for k, shard in enumerate(progress(plan, "pack")):
            name, record = f"{k:05d}", work / f"{k:05d}.json"
            if record.exists():
                done[name], resumed = json.loads(record.read_text()), resumed + 1
                continue
            entries, files, why = pack_shard(src, work, name, shard, dims)
            bad.update(why)
            if not why:
                done[name] = {"entries": entries, "files": files}
                write_text_atomic(record, json.dumps(done[name]))
        if bad:
            for pid, why in list(bad.items())[:20]:
                log(f"  bad {pid}: {why}", err=True)
            log(f"error: --pack {src}: {len(bad)} proteins have bad feature files (above); nothing committed, "
                f"{len(done)} of {len(plan)} shards kept in {work} for the rerun: re-extract them "
                f"(extract_features.py rewrites bad files), then --pack again", err=True)
            return EXIT_PARTIAL
        meta = commit_store(dst, work, rows, plan, key, done)
    seconds = time.time() - t0
    log(f"{dst}/{cache.STORE_DIR}: {len(rows)} proteins, {len(plan)} shards ({resumed} from an earlier run), "
        f"{meta['bytes'] / 1e9:.2f} GB, {', '.join(f'{m} {d}' for m, d in dims.items())} wide, float16; "
        f"{seconds:.1f} s ({meta['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return EXIT_OK
