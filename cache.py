"""
The feature cache: the contract between extract_features.py (which writes it) and amma.py, finetune.py
and analyze.py (which read it), and the batches made from it. Torch and the standard library only.

    <set>/manifest.tsv             id, L, L_func, modalities, ... (one row per protein)
    <set>/info.json                the encoders and the widths (dims) that made the set
    <set>/<m>/<id>.pt              per-protein float16 [L, d_m] tensors, m in seq / str / func
    <set>/store/...                the same set packed for streaming (extract_features.py --pack)

Here: the per-protein files (FeatureDataset) and the store (FeatureStore, open_features), the check
before step 1 (check_features, find_bad_files), padded batches (collate, BatchMemory, padded_length, batch_to),
length-bucketed batch plans (bucket_batches) and the loaders that make them (Feed, make_loader, ThreadLoader).
The masks that pretraining adds to a batch are amma.py's (collate_pretraining).
"""
import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import threading
import weakref
from pathlib import Path

import torch

from runs import last_line, atomic_write_text, rank_world

MODALITIES = ("seq", "str", "func")     # the folders of a feature set, in the model's order (amma.MODALITIES)


# ----------------------------------------------------------------------------------------------
# the feature cache (the contract with extract_features.py; SPEC.md)

SAFE_ID = re.compile(r"[^/\\~\x00-\x1f\x7f]+")  # ids outside it (or too long) get a hashed file name
MAX_NAME_BYTES = 200  # file systems allow 255 bytes; room for '.pt' and the temporary '.<name>.<pid>.tmp'


def feature_file(pid):
    """File name of a protein's features in <set>/<modality>/: '<id>.pt', or, for an id that cannot be a
    file name (over 200 bytes, '/', '\\', '~', control characters, a leading '.'), a stable hashed name
    '<readable prefix>~<16 hex digits of blake2b(id)>.pt'; the manifest keeps the real id. A real id never
    holds '~', so a hashed name is never another protein's. (extract_features.py writes, amma.py and finetune.py read.)"""
    raw = pid.encode("utf-8", "surrogatepass")
    if SAFE_ID.fullmatch(pid) and not pid.startswith(".") and len(raw) <= MAX_NAME_BYTES:
        return f"{pid}.pt"
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", pid.lstrip("."))[:40]
    return f"{prefix}~{hashlib.blake2b(raw, digest_size=8).hexdigest()}.pt"


def load_tensor(path):
    """torch.load a cached tensor safely; a truncated or foreign file is a one-line ValueError."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, pickle errors, EOF: all mean the same thing here
        raise ValueError(f"{path}: not a readable tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{path}: expected a 2-D tensor [tokens, dim], got {type(x).__name__}")
    return x


def read_manifest(root):
    """Rows of features/<set>/manifest.tsv as dicts (L and L_func as ints)."""
    path = Path(root) / "manifest.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run extract_features.py first (or demo.py)")
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    for col in ("id", "L", "L_func", "modalities"):
        if col not in header:
            raise ValueError(f"{path}: column '{col}' missing from the header")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(header):
            raise ValueError(f"{path}:{n}: {len(values)} fields, the header has {len(header)}")
        row = dict(zip(header, values))
        row["L"], row["L_func"] = int(row["L"]), int(row["L_func"])
        row["modalities"] = tuple(m for m in row["modalities"].split(",") if m)
        rows.append(row)
    return rows


def feature_dims_recorded(root):
    """The widths a feature set records: its store's, else info.json's ({} without either)."""
    if is_store(root):
        return store_dims(root)
    try:
        dims = json.loads((Path(root) / "info.json").read_text())["dims"]
        return {m: int(d) for m, d in dims.items() if m in MODALITIES}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def feature_dims(root):
    """The width of each modality of a feature set: as recorded (store, info.json), else the first files'."""
    dims = feature_dims_recorded(root)
    if dims:
        return dims
    for row in read_manifest(root):
        for m in row["modalities"]:
            if m not in dims:
                dims[m] = load_tensor(Path(root) / m / feature_file(row["id"])).shape[1]
        if len(dims) == 3:
            break
    return dims


class FeatureDataset(torch.utils.data.Dataset):
    """Per-protein cached features: {"id", "seq": [L, d], "str": [L, d] | None, "func": [L', d] | None}."""

    def __init__(self, root, ids=None, modalities=MODALITIES, max_len=1022, max_text=512):
        self.root, self.modalities = Path(root), tuple(modalities)
        self.max_len, self.max_text = max_len, max_text
        rows = {r["id"]: r for r in read_manifest(root)}
        if ids is not None:
            missing = [i for i in ids if i not in rows]
            if missing:
                raise ValueError(f"{root}: {len(missing)} ids not in manifest.tsv, e.g. {missing[0]}")
            rows = {i: rows[i] for i in ids}
        self.rows = list(rows.values())
        if "seq" in self.modalities and any("seq" not in r["modalities"] for r in self.rows):
            bad = next(r["id"] for r in self.rows if "seq" not in r["modalities"])
            raise ValueError(f"{root}: protein {bad} has no sequence features (every protein needs seq)")

    def __len__(self):
        return len(self.rows)

    def counts(self):
        """Tokens per protein and modality, [N] lists of 3 ints, as __getitem__ returns them (0 where absent)."""
        return [[min(r["L_func"], self.max_text) if m == "func" else min(r["L"], self.max_len)
                 if m in self.modalities and m in r["modalities"] else 0 for m in MODALITIES] for r in self.rows]

    def lengths(self):
        """Tokens per protein in the full layout (2L + L'), for length bucketing."""
        return [sum(c) for c in self.counts()]

    def read(self, m, pid):
        """One protein's [L, d] features of modality m (FeatureStore reads them from its shards)."""
        return load_tensor(self.root / m / feature_file(pid))

    def __getitem__(self, i):
        row = self.rows[i]
        item = {"id": row["id"]}
        for m in MODALITIES:
            x = None
            if m in self.modalities and m in row["modalities"]:
                x = self.read(m, row["id"])[: self.max_text if m == "func" else self.max_len]
            item[m] = x
        if item["str"] is not None and item["seq"] is not None and len(item["str"]) != len(item["seq"]):
            raise ValueError(f"{row['id']}: seq has {len(item['seq'])} rows but str has {len(item['str'])}")
        return item


# ----------------------------------------------------------------------------------------------
# feature store: the same sets packed for streaming (extract_features.py --pack writes it)
#
#   <set>/store/store.json             format, dims, the manifest's and index's sha256, per shard file: rows, bytes, sha256
#   <set>/store/index.tsv              id, shard, then start and rows in that shard for seq, str, func
#   <set>/store/<m>/<shard>.safetensors   one float16 tensor [rows, d_m]: the proteins' rows back to back
#   <set>/store/SHA256SUMS             `sha256sum -c` of the shard files
# Shards are safetensors files (no pickle; readable by the safetensors and numpy tools) read here with the
# standard library: mmap + torch.frombuffer, so a protein is a view of the page cache and collate's padding
# copy is the only copy. Finiteness is checked once, when the store is written.

STORE_DIR, STORE_FORMAT = "store", "amma-feature-store/1"
STORE_COLUMNS = ("id", "shard") + tuple(f"{m}_{k}" for m in MODALITIES for k in ("start", "rows"))


def is_store(root):
    return (Path(root) / STORE_DIR / "store.json").exists()


def sha256_file(path, chunk=1 << 22):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_store_index(root):
    """(store.json, {m: {id: (shard, start, rows)}}) of a store; ValueError when it is unreadable, another
    format, its index does not match its checksum, or it is stale (manifest.tsv changed since packing)."""
    root = Path(root)
    try:
        meta = json.loads((root / STORE_DIR / "store.json").read_text())
        text = (root / STORE_DIR / "index.tsv").read_text()
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}/{STORE_DIR}: not a readable feature store ({type(e).__name__}: {e})") from None
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{root}/{STORE_DIR}/store.json: format {meta.get('format')!r}, expected {STORE_FORMAT}")
    if sha256_file(root / "manifest.tsv") != meta["manifest_sha256"]:
        raise ValueError(f"{root}/{STORE_DIR} is stale: manifest.tsv changed since it was packed; run "
                         f"extract_features.py --pack {root} again")
    if sha256_file(root / STORE_DIR / "index.tsv") != meta["index_sha256"]:
        raise ValueError(f"{root}/{STORE_DIR}/index.tsv does not match its checksum in store.json: pack it again")
    lines = text.splitlines()
    if lines[0].split("\t") != list(STORE_COLUMNS):
        raise ValueError(f"{root}/{STORE_DIR}/index.tsv: header is not {' '.join(STORE_COLUMNS)}")
    index = {m: {} for m in MODALITIES}
    for line in lines[1:]:
        v = line.split("\t")
        for k, m in enumerate(MODALITIES):
            if v[2 + 2 * k]:
                index[m][v[0]] = (v[1], int(v[2 + 2 * k]), int(v[3 + 2 * k]))
    return meta, index


def shard_header(path):
    """(data offset, dtype, shape) of a one-tensor safetensors file, from its first bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    (name, t), = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return 8 + n + t["data_offsets"][0], t["dtype"], tuple(t["shape"])


def map_shard(path):
    """(mmap, data offset, float16 [rows, d] tensor over it) of a shard file (copy-on-write: nothing is written back)."""
    offset, dtype, (rows, d) = shard_header(path)
    if dtype != "F16":
        raise ValueError(f"{path}: dtype {dtype}, the store holds F16")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return mm, offset, torch.frombuffer(mm, dtype=torch.float16, count=rows * d, offset=offset).view(rows, d)


class FeatureStore(FeatureDataset):
    """FeatureDataset's items read from a packed store: each modality's rows are a view of a mapped shard."""

    def __init__(self, root, ids=None, modalities=MODALITIES, max_len=1022, max_text=512):
        super().__init__(root, ids, modalities, max_len, max_text)
        self.meta, self.index = read_store_index(root)
        self.maps = {}
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
        # a set larger than half the memory streams from disk: ask for each protein's range at once (+10-25%
        # from this machine's disk); a smaller one stays in the page cache, where the call costs ~10%
        self.willneed = getattr(mmap, "MADV_WILLNEED", None) if self.meta["bytes"] > ram / 2 else None
        self.page = mmap.PAGESIZE
        allow_open_files(sum(map(len, self.meta["files"].values())) + 256)

    def __getstate__(self):                       # DataLoader workers map the shards themselves
        return {**self.__dict__, "maps": {}}

    def rows_of(self, m, pid):
        if pid not in self.index[m]:
            raise ValueError(f"{self.root}/{STORE_DIR}: protein {pid} has no {m} rows")
        shard, start, n = self.index[m][pid]
        if (m, shard) not in self.maps:
            self.maps[m, shard] = map_shard(self.root / STORE_DIR / m / f"{shard}.safetensors")
        mm, offset, x = self.maps[m, shard]
        if self.willneed is not None and n:          # from disk: the protein's whole range is read ahead at once
            a = offset + 2 * start * x.shape[1]
            mm.madvise(self.willneed, a - a % self.page, 2 * n * x.shape[1] + a % self.page)
        return x[start:start + n]                                           # [n, d] view, no copy

    read = rows_of                                # FeatureDataset.__getitem__, with the shards' views


def allow_open_files(n):
    """Raise this process's soft limit on open files towards n (each mapped shard holds a descriptor)."""
    try:
        import resource
    except ImportError:                      # not a Unix: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def open_features(root, **kwargs):
    """The feature set at root: a FeatureStore when it has been packed (<root>/store), else FeatureDataset."""
    return (FeatureStore if is_store(root) else FeatureDataset)(root, **kwargs)


_STORES = {}                                 # (root, store.json's mtime) -> FeatureStore, per process


def read_feature(root, m, pid):
    """One protein's [L, d] features of modality m from either layout (a store is opened once per process)."""
    try:
        key = (str(root), (Path(root) / STORE_DIR / "store.json").stat().st_mtime_ns)
    except OSError:
        return load_tensor(Path(root) / m / feature_file(pid))
    if key not in _STORES:
        _STORES[key] = FeatureStore(root)
    return _STORES[key].rows_of(m, pid)


def store_dims(root):
    return dict(json.loads((Path(root) / STORE_DIR / "store.json").read_text())["dims"])


def _check_shard(path, info, width):
    """None when the shard file has store.json's size and an F16 [rows, width] header, else why not."""
    try:
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{path}: {size} bytes, store.json says {info['bytes']}"
        _, dtype, shape = shard_header(path)
    except (OSError, ValueError, KeyError) as e:
        return f"{path}: unreadable ({type(e).__name__}: {e})"
    if (dtype, shape) != ("F16", (info["rows"], width)):
        return f"{path}: {dtype} {shape}, store.json says F16 {(info['rows'], width)}"
    return None


def check_store(root, rows, modalities=MODALITIES, widths=None):
    """check_feature_files for a store, cheap by construction: the index's checksum, every needed shard file's
    size and header against store.json, and each protein's rows and width against the manifest. Values were
    checked finite when the store was written. Returns {id: 'm: reason'} of the bad proteins."""
    root = Path(root)
    meta, index = read_store_index(root)
    widths = meta["dims"] if widths is None else widths
    shard_ok = {(m, name): _check_shard(root / STORE_DIR / m / f"{name}.safetensors", info, meta["dims"][m])
                for m in modalities for name, info in meta["files"].get(m, {}).items()}
    bad = {}
    for r in rows:
        for m in r["modalities"]:
            if m not in modalities:
                continue
            want, loc = r["L_func" if m == "func" else "L"], index[m].get(r["id"])
            why = "not in the store" if loc is None else shard_ok.get((m, loc[0]), f"shard {loc[0]} not in store.json")
            if why is None and loc[2] != want:
                why = f"{loc[2]} rows, the manifest says {want}"
            if why is None and widths.get(m) not in (None, meta["dims"][m]):
                why = f"width {meta['dims'][m]}, the set's is {widths[m]}"
            if why:
                bad.setdefault(r["id"], f"{m}: {why}")
    return bad


def check_features(root, rows, modalities=MODALITIES, widths=None, workers=8):
    """The check before step 1 for either layout: check_store or check_feature_files."""
    if is_store(root):
        return check_store(root, rows, modalities, widths)
    return check_feature_files(root, rows, modalities, widths, workers)


# ----------------------------------------------------------------------------------------------
# batches: padded to a few lengths (made in the loader workers; amma.collate_pretraining adds the masks)

def padded_length(n):
    """n rounded up on a ladder of 8 steps per octave (at most 12.5% padding): an epoch meets a few dozen
    shapes, not one per length, so compiled kernels, CUDA graphs and allocator blocks are reused."""
    step = 1 << max(n.bit_length() - 4, 0)
    return max(-(-n // step) * step, 1)


def _empty(shape, dtype):
    """An uninitialised batch tensor: in shared memory inside a loader worker (as torch's default collate
    does), so the batch is not copied again on its way to the main process; pinned inside a ThreadLoader on a
    GPU machine, so it goes to the device as it is (torch's pinned allocator reuses its blocks); otherwise
    from BatchMemory's reused blocks."""
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    if getattr(_PIN, "on", False):
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return _MEMORY.empty(shape, dtype)


class BatchMemory:
    """Reused memory for batches that are not pinned (a run on the CPU, bench.py on a machine without a GPU).
    Memory fresh from the system costs a page fault and the kernel's zeroing on each page's first write, a
    large share of a store feed's time (REPRODUCE.md, section 3). A batch tensor here is a view of a pooled
    block, which comes back when the last tensor on it is gone (the finalizer of the memoryview its storage
    holds), so a batch that is kept is never written over. Blocks are powers of two bytes (anonymous maps);
    at most `keep` bytes of them wait unused."""

    def __init__(self, keep=1 << 29):
        self.keep, self.free = keep, {}               # block size -> its idle blocks
        self.lock = threading.RLock()                 # a finalizer may run in any thread, this one too

    @property
    def idle(self):
        return sum(size * len(blocks) for size, blocks in self.free.items())

    def empty(self, shape, dtype):
        n = math.prod(shape) * dtype.itemsize
        size = 1 << max(n - 1, 4095).bit_length()
        with self.lock:
            blocks = self.free.get(size)
            block = blocks.pop() if blocks else mmap.mmap(-1, size)
        view = memoryview(block)
        weakref.finalize(view, self._give_back, block, size).atexit = False
        return torch.frombuffer(view, dtype=torch.uint8, count=n).view(dtype).view(shape)

    def _give_back(self, block, size):
        with self.lock:
            if self.idle + size <= self.keep:
                self.free.setdefault(size, []).append(block)


_MEMORY = BatchMemory()


def collate(items, pad=True):
    """Pad a list of items into a batch: ids, x [B, L, d] and lengths [B] per modality (L rounded up by
    padded_length unless pad=False). A modality missing from every item is left out; missing for
    some items has length 0. Items with "loss_w" give loss_w [B, 3], with "group" group [B] (pretraining's)."""
    batch = {"ids": [it["id"] for it in items]}
    for m in MODALITIES:
        xs = [it.get(m) for it in items]
        present = [x for x in xs if x is not None]
        if not present:
            continue
        d, dtype = present[0].shape[1], present[0].dtype
        if any(x.shape[1] != d for x in present):
            raise ValueError(f"{m} features of different widths in one batch: {sorted({x.shape[1] for x in present})}")
        lengths = [0 if x is None else len(x) for x in xs]
        L = max(lengths) if not pad else padded_length(max(lengths))
        out = _empty((len(items), max(L, 1), d), dtype)
        for b, (x, n) in enumerate(zip(xs, lengths)):
            write_rows(out[b], x if n else None)                                 # each row written once
        batch[m], batch[m + "_len"] = out, torch.tensor(lengths)
    if "group" in items[0]:
        batch["group"] = torch.tensor([it["group"] for it in items])
    if "loss_w" in items[0]:
        batch["loss_w"] = torch.tensor([it["loss_w"] for it in items], dtype=torch.float32)    # [B, 3]
    return batch


def write_rows(dst, x):
    """dst[:len(x)] = x and the rest 0, in this thread alone: a plain memmove / memset (GIL released) where both
    are contiguous CPU tensors of one dtype. A loader thread then uses one core, as a worker process does
    (torch gives each 1 intra-op thread), instead of starting torch's intra-op team for every protein, whose
    threads may spin beside the training loop after each copy (OpenMP's default wait; A/B in REPRODUCE.md, section 3)."""
    n = 0 if x is None else len(x)
    if not dst.is_contiguous() or n > len(dst) or (n and x.shape[1:] != dst.shape[1:]):
        rows = "no" if x is None else list(x.shape)
        raise ValueError(f"write_rows: {rows} rows do not fit a {'' if dst.is_contiguous() else 'non-contiguous '}"
                         f"{list(dst.shape)} destination")
    if n and not (x.dtype == dst.dtype and x.is_contiguous() and x.device.type == dst.device.type == "cpu"):
        dst[:n] = x                                                      # another dtype or layout: torch's copy
    elif n:
        ctypes.memmove(dst.data_ptr(), x.data_ptr(), x.numel() * x.element_size())
    rest = dst[n:]
    if rest.numel():
        ctypes.memset(rest.data_ptr(), 0, rest.numel() * rest.element_size())


def batch_to(batch, device):
    """Move a batch to `device` (asynchronously from pinned memory); features become float32 (autocast
    decides the compute dtype)."""
    return {k: (v.to(device, non_blocking=True).float() if k in MODALITIES else
                v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# the batch plan of an epoch: length buckets, deterministic in (seed, epoch)

def bucket_batches(lengths, batch_size, seed, epoch):
    """Length-bucketed global batches: shuffle, sort by length inside chunks of 50 batches, cut into
    batches, shuffle the batch order. Deterministic in (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 50 * batch_size
    order = []
    for i in range(0, len(perm), chunk):
        order += sorted(perm[i:i + chunk], key=lambda j: lengths[j])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def make_loader(dataset, batches, num_workers, pin, collate_fn=collate, kind="processes", persistent=False):
    """The batches of `batches` (lists of keys), in order: worker processes (torch's DataLoader; with
    persistent, they outlive the iteration: Feed), or with kind='threads' threads of this process (ThreadLoader)."""
    if kind == "threads" and num_workers:
        return ThreadLoader(dataset, batches, num_workers, pin, collate_fn)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=pin,
                                       persistent_workers=persistent and num_workers > 0,
                                       prefetch_factor=4 if num_workers else None)


class EpochBatches:
    """A batch sampler whose batches each epoch replaces (a Feed's loader samples through it)."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Feed:
    """A run's loader, made once: feed.epoch(batches) iterates that epoch's batches. Worker processes persist
    across epochs (each opens files and maps store shards once per run, not once per epoch); a partial
    epoch's leftovers are dropped when the next one starts. Use it as a context manager (the workers end)."""

    def __init__(self, dataset, num_workers, pin, collate_fn=collate, kind="processes"):
        self.plan = EpochBatches()
        self.loader = make_loader(dataset, self.plan, num_workers, pin, collate_fn, kind, persistent=True)

    def epoch(self, batches):
        self.plan.batches = list(batches)
        return iter(self.loader)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        workers = getattr(self.loader, "_iterator", None)          # a persistent DataLoader's live iterator
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
        self.loader = None


def loader_kind(kind, datasets):
    """--loader auto: threads for packed stores (their items are views of mapped memory and the copies in
    collate run outside the GIL, so no process hop is needed), worker processes for per-protein files."""
    if kind != "auto":
        return kind
    return "threads" if all(isinstance(ds, FeatureStore) or is_store(getattr(ds, "root", "")) for ds in datasets) \
        else "processes"


_PIN = threading.local()                    # set by ThreadLoader: collate allocates its batch pinned


class ThreadLoader:
    """Batches made by `threads` threads of this process, in order, 2 x threads of them in flight. For a
    packed store this skips the worker processes' copy through fresh shared memory (the slow part of a
    process feed: bench.py --only feed); with pin, collate writes each row straight into pinned memory."""

    def __init__(self, dataset, batches, threads, pin, collate_fn):
        self.dataset, self.batches, self.threads, self.pin, self.collate_fn = dataset, batches, threads, pin, collate_fn

    def make(self, keys):
        _PIN.on = self.pin
        try:
            return self.collate_fn([self.dataset[k] for k in keys])
        finally:
            _PIN.on = False

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        todo = iter(self.batches)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="amma-loader") as pool:
            pending = deque(pool.submit(self.make, keys) for _, keys in zip(range(2 * self.threads), todo))
            while pending:
                batch = pending.popleft().result()
                keys = next(todo, None)
                if keys is not None:
                    pending.append(pool.submit(self.make, keys))
                yield batch


# ----------------------------------------------------------------------------------------------
# the feature-set check before step 1, and the batches' way into the step

def _check_file(path, rows, width):
    try:
        x = load_tensor(path)
    except FileNotFoundError:
        return "missing"
    except ValueError as e:
        return str(e).replace(f"{path}: ", "")
    if x.shape[0] != rows:
        return f"{x.shape[0]} rows, the manifest says {rows}"
    if width is not None and x.shape[1] != width:
        return f"width {x.shape[1]}, the set's is {width}"
    if not torch.isfinite(x).all():
        return f"{int((~torch.isfinite(x)).sum())} values are nan or inf"
    return None


def check_feature_files(root, rows, modalities=MODALITIES, widths=None, workers=8):
    """Every feature file of `rows` (manifest rows) for `modalities`: exists, loads, has the manifest's
    rows (L, or L_func for func) and the set's width, and is finite. Returns {id: 'm: reason'} of the
    bad proteins. Files are read by `workers` threads; a file that passed before with the same size,
    modification time and expected shape is not read again (root/.checked.tsv, where writable).
    Under DDP each process reads 1 / world of the files and the results are gathered."""
    from concurrent.futures import ThreadPoolExecutor
    root = Path(root)
    widths = feature_dims(root) if widths is None else widths
    cache_path = root / ".checked.tsv"
    try:
        cache = set(cache_path.read_text().splitlines())
    except OSError:
        cache = set()
    jobs = []
    for r in rows:
        for m in r["modalities"]:
            if m in modalities:
                path = root / m / feature_file(r["id"])
                try:
                    st = path.stat()
                    key = f"{m}/{r['id']}\t{st.st_size}\t{st.st_mtime_ns}\t{r['L_func' if m == 'func' else 'L']}\t{widths.get(m)}"
                except OSError:
                    key = None
                if key not in cache:
                    jobs.append((r["id"], m, path, r["L_func" if m == "func" else "L"], widths.get(m), key))
    rank, world = rank_world()
    mine = jobs[rank::world]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda j: _check_file(*j[2:5]), mine))
    bad, passed = {}, []
    for (pid, m, _, _, _, key), why in zip(mine, results):
        if why is None:
            passed.append(key)
        else:
            bad.setdefault(pid, f"{m}: {why}")
    if world > 1:
        box = [None] * world
        torch.distributed.all_gather_object(box, (bad, passed))
        bad, passed = {}, []
        for b, p in box:
            bad.update(b)
            passed += p
    cache.update(k for k in passed if k)
    if jobs and rank == 0:
        try:
            atomic_write_text(cache_path, "\n".join(sorted(k for k in cache if k)) + "\n")
        except OSError:
            pass                                                              # a read-only set is checked again next time
    return bad


def find_bad_files(checks, out, skip_bad, is_main):
    """The check before step 1: checks = {name: (root, manifest rows, modalities)}; every process reads
    its share of the files (check_feature_files). Bad files are listed in <out>/bad_files.tsv and are
    an error that names them unless skip_bad. Returns the {(name, id)} of the bad proteins."""
    bad = {}
    for name, (root, rows, modalities) in checks.items():
        bad.update({(name, pid): f"{root}/{why.split(':')[0]}/{feature_file(pid)}: {why.split(': ', 1)[1]}"
                    for pid, why in check_features(root, rows, modalities).items()})
    if bad:
        listing = sorted(bad.values())
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "bad_files.tsv", "\n".join(listing) + "\n")
        if not skip_bad:
            shown = "\n  ".join(listing[:10]) + (f"\n  ... {len(listing) - 10} more" if len(listing) > 10 else "")
            raise SystemExit(f"error: {len(bad)} proteins have bad feature files (all listed in {out}/bad_files.tsv):"
                             f"\n  {shown}\nre-extract them (extract_features.py rewrites bad files), or --skip-bad "
                             f"to leave them out")
    return set(bad)


class BrokenBatch(ValueError):
    """A batch that could not be read after the check before step 1 (a file changed or broke)."""


def micro_batches(loader, n, device):
    """The next n micro-batches of `loader`, each moved to `device` as it is needed."""
    for _ in range(n):
        try:
            batch = next(loader)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise BrokenBatch(last_line(e)) from None
        yield batch_to(batch, device)
