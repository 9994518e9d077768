"""Extract the frozen uni-modal features AMMA learns from: one float16 .pt per protein and modality.

    features/<set>/seq/<id>.pt    [L, d_seq]   ESM-1b (or another fair-esm model): its last layer, BOS/EOS dropped
    features/<set>/str/<id>.pt    [L, d_str]   GearNet-Edge node features (row i = same residue as seq)
    features/<set>/func/<id>.pt   [L', d_func] PubMedBERT-abs last hidden state of the joined text
    features/<set>/manifest.tsv   id, L, L_func, modalities, sequence, L_full, structure, chain, and what each
                                  file was computed from: sha_seq / sha_str / sha_func (checksums of the
                                  sequence, the structure file, the text fields) and enc_seq / enc_str / enc_func
    features/<set>/info.json      encoders, dims, tiny, synthetic, esm_model, esm_weights, esm_layer, source, ...
    features/<set>/labels_<task>.json   ec / go / demo: task, terms, labels, splits, test_identity, source
    features/<set>/summary.json   done / skipped / recomputed / failed (with reasons) of the last run, residues
                                  remapped or dropped per protein, temporary files of dead processes removed

Commands (tests/test_extract.py runs the first, with --demo-n 6; --source is inferred from the input flags):

    python extract_features.py --source demo --encoders tiny                  # -> features/demo-tiny, offline
    python extract_features.py --fasta prot.fasta --pdb-dir pdb/ --out features/mine
    python extract_features.py --pdb-dir ../shared/data/pdb --modality seq str --out features/pdb
    python extract_features.py --protdescribe uniprot_sprot_filtered.tsv --modality seq func --out features/pd
    python extract_features.py --af-dir swissprot_pdb_v2.tar --protdescribe uniprot_sprot_filtered.tsv \\
        --gearnet-ckpt mc_gearnet_edge.pth --pick 120000 25000 25000 --seed 0 --out features/pretrain
        # the paper's pretraining data: 120k paired triplets -> features/pretrain, 25k seq+str -> features/seqstr,
        # 25k seq+func -> features/seqfunc, disjoint and seeded; the chosen ids in features/pretrain/picks.json
    python extract_features.py --source ec --download --modality seq str --gearnet-ckpt mc_gearnet_edge.pth \\
        --out features/ec                                   # torchdrug's EnzymeCommission.zip (md5-checked)
    python extract_features.py --source go --data data/GeneOntology.zip --modality seq str --out features/go
    python extract_features.py --source ec --data ~/scratch/protein-datasets/EnzymeCommission ...
        # the directory torchdrug itself extracted (EnzymeCommission/EnzymeCommission/train/train/*.pdb, ...)
    python extract_features.py --source ec --data ../shared/data/deepfri --modality seq --out features/ec
        # DeepFRI's own file set: labels for every chain, features for chains with a sequence (test FASTA)
    python extract_features.py --source ec ... --shard 0/4     # four jobs: --shard 0/4 .. 3/4, then
    python extract_features.py --out features/ec --merge       # (or nothing: the last shard merges)
    torchrun --nproc_per_node 8 extract_features.py --source ec ...   # the same split over 8 GPUs, merged at the end
    python extract_features.py --pack features/pretrain        # -> features/pretrain/store: float16 shards for
        # streaming (--store-out DIR: a set of its own elsewhere); amma.py, finetune.py, analyze.py read either layout

Encoders: real by default -- fair-esm's esm1b_t33_650M_UR50S (--esm-model names another fair-esm model,
e.g. esm2_t33_650M_UR50D; features are its last layer), GearNet-Edge from --gearnet-ckpt, PubMedBERT-abs
through transformers (--text-model: a Hugging Face name or a local directory). Offline machines: pass
--esm-weights PATH (the fair-esm .pt) and --text-model DIR (config.json, vocab.txt, weights); nothing is
downloaded then. Checkpoints are read by an unpickler that imports and calls nothing outside a short
allowlist (tensor rebuilding, OrderedDict, argparse.Namespace, ...): anything else in the file (optimizer
state, numpy scalars, classes of the training code) becomes an inert placeholder, so only 'args'/'cfg'
and 'model' matter and a file from elsewhere cannot run code. --encoders tiny: small random-init models of
the same architectures, offline, for tests and the demo only (labelled as such everywhere).

Choices made here:
- Long proteins: the first --max-len (1022) residues, in every residue-level modality (torchdrug's
  choice). --long sliding instead averages ESM over windows of 1022 overlapping by half and runs
  GearNet on the whole chain.
- Text: ProtST's fields ProteinName, Function, SubcellularLocation, Similarity, each tokenized alone
  without special tokens and cut to 128 tokens, joined as [CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4 (ProtST
  has no trailing [SEP]); empty fields are left out, no inner padding (so features do not depend on the
  batch), at most 512 tokens (the last field is trimmed). A protein whose four fields are all empty
  has no func modality (a note in the summary, not a failure).
- Reading the inputs (sequence letters, structures and their chains, modified residues, FASTA/structure
  pairs, ProtDescribe's columns, AlphaFold DB x ProtDescribe, torchdrug's archives, DeepFRI's labels):
  see sources.py's docstring.
- File names: <id>.pt; an id that cannot be a file name (over 200 bytes, '/', '\\', '~', control
  characters, a leading '.') is stored as <readable prefix>~<16 hex digits of its blake2b>.pt
  (feature_file); the manifest keeps the real id.
- Writing: every file goes to a temporary file that is renamed over it. A write that fails (disk full,
  read-only, no permission) stops the run with one line naming the path and the free space there (exit
  2), its temporary file removed; finished files are kept. Temporary files that dead processes left
  (.<id>.pt.<pid>.tmp, manifest.tsv.<pid>.tmp) are removed at the next start and listed in summary.json.
  --out is checked before any input is read.
- Resuming: a finished file is skipped when its manifest row records the same input checksum and encoder
  (and the file loads); a changed input (one residue, a new structure file, other text) is recomputed and
  listed under "recomputed"; a truncated file is reported by id and rewritten; --overwrite redoes all.
  The manifest is rewritten after every chunk of proteins, so a killed run loses at most one chunk.
  Manifest rows of earlier runs whose files are still valid are kept, so a partial re-run (--limit)
  does not shrink manifest.tsv. --shard i/n (i = 0..n-1) takes the ids at positions i, i+n, ... of the
  sorted id list; each shard writes manifest.shard-i-of-n.tsv and the one that finds all n present
  merges them (info.json then lists the dims of every modality of the set).
- Exit status: 0 when everything requested was done (or was already up to date); 3 when the run finished
  but some proteins failed (each listed with its reason in summary.json); 2 when the run could not start
  or found nothing to do (bad arguments, missing or unreadable inputs, no usable protein, a join or split
  that is empty, encoders that cannot be loaded, mixed encoders in one set); 1 from --merge while some
  shard has not finished.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import gearnet
from amma import arg
from cache import MODALITIES, feature_file  # the feature-cache contract lives in cache.py
# the readers live in sources.py; imported by name so that extract_features.<name> keeps working for callers
from sources import (  # noqa: F401
    AF_NAME, CUTOFF_COLUMNS, EXIT_FATAL, EXIT_INCOMPLETE, EXIT_OK, EXIT_PARTIAL, EXTRA_RESIDUES, GO_BRANCHES,
    ID_COLUMNS, SEQUENCE_FIELD, SOURCES, SPLITS, STANDARD_RESIDUES, STRUCTURE_SUFFIXES, TEXT_FIELDS,
    TORCHDRUG_ZIPS, UNIPROT_ACCESSION, ArchiveMember, FatalError, InputError, OutputError, ProtDescribe,
    Protein, alphafold_files, alphafold_sets, check_pair, check_sequence, choose_join, demo_sets, digest,
    fetch_archive, find_annotation, folder_entries, free_space, full_reason, has_text, index_structures,
    infer_source, log, md5sum, pick_sets, prepare, progress, proteins_fasta, proteins_pdb_dir,
    proteins_protdescribe, read_deepfri_annot, read_fasta, read_protdescribe, read_split, read_structure,
    read_test_csv, require, safe_extract, split_structures, structure_bytes, structure_name, structure_of,
    structure_stem, structures_in, subsequence_gap, tar_members, task_files, task_proteins, texts_by_id,
    unmatched_residues, write_text_atomic)
import overlap
from pack import pack_store
from runs import run_as_script

# the encoders live in encoders.py; imported by name so that extract_features.<name> keeps working
from encoders import (  # noqa: F401
    ESM1B_NAME, ESM_URL, ESM1B_URL, ESM_NAME, PUBMEDBERT, TINY_NAMES, TINY_ESM_LAYER, TINY_HINT, TINY_WORDS,
    TINY_SUFFIXES, tiny_vocab, Unloaded, _UNLOADED, _safe_globals, SafeUnpickler, SAFE_PICKLE, safe_load,
    _describe, SeqEncoder, TextEncoder, gearnet_state_dict, esm_model_name, esm_checkpoint, load_esm, tiny_esm,
    esm_fix, resolve_esm, legacy_esm_name, is_real_esm, load_sequence_encoder, text_model_name,
    encoder_names, text_fix, load_text_model, load_encoder, resolve_precision, tf32_matmuls, forward_precision,
    structure_precision, with_precision, build_text_ids)

CHUNK = 2000  # proteins read and encoded together; bounds memory on large sets
EXIT_CODES = ("exit status: 0 everything requested was done; 3 finished, but some proteins failed (listed in "
              "summary.json); 2 could not start or nothing to do; 1 --merge while a shard is unfinished")


@dataclass
class ExtractConfig:
    source: str = arg(None, "where the proteins come from (default: inferred from the one input flag given: "
                       "--fasta, --pdb-dir, --protdescribe, --af-dir with --protdescribe, --data with "
                       "EnzymeCommission / GeneOntology in its name)", choices=SOURCES)
    out: str = arg(None, "feature set directory (default features/<source>; the demo: "
                    "features/demo-tiny, or demo-real; alphafold: the paired set)")
    modality: tuple = arg(MODALITIES, "modalities to extract (those a protein lacks input for are left out)",
                           nargs="+", choices=MODALITIES)
    encoders: str = arg("real", "real: ESM-1b (or --esm-model), GearNet-Edge, PubMedBERT-abs; tiny: small "
                         "random-init models of the same architectures, offline, for tests and the demo only",
                         choices=("real", "tiny"))
    fasta: str = arg(None, "FASTA file (--source fasta)")
    pdb_dir: str = arg(None, "directory of structures <id>.pdb|.cif[.gz] (pdb-dir; optional for fasta, "
                        "protdescribe, ec/go with DeepFRI files)")
    protdescribe: str = arg(None, "ProtST's uniprot_sprot_filtered.tsv (protdescribe, alphafold; gives "
                             "the text of matching ids for fasta / pdb-dir)")
    id_column: str = arg(None, f"id column of --protdescribe (default: the first of {', '.join(ID_COLUMNS)} "
                          "in its header; none: rows are named row000001, ...)")
    af_dir: str = arg(None, "AlphaFold DB files AF-<accession>-F1-model_v<k>.pdb[.gz]: a directory, or the "
                       "tar archive itself (e.g. swissprot_pdb_v2.tar; read in place)")
    join: str = arg("auto", "alphafold: pair AF files with ProtDescribe rows by accession (needs an id column "
                     "of UniProt accessions) or by exact sequence; auto: accession when the id column holds "
                     "accessions, else sequence", choices=("auto", "accession", "sequence"))
    unpaired: bool = arg(False, "alphafold: also write the unpaired sets seqstr (AF only) and seqfunc "
                          "(ProtDescribe only) next to --out")
    pick: tuple = arg(None, "alphafold: the paper's pretraining subsets (120000 25000 25000): a seeded random "
                       "choice of PAIRED seq+str+func triplets (-> --out), SEQSTR seq+str proteins from the other "
                       "AF files (-> seqstr/ next to --out) and SEQFUNC seq+func proteins from the other "
                       "ProtDescribe rows (-> seqfunc/), the three disjoint by id and by sequence; the chosen ids "
                       "go to <out>/picks.json",
                       nargs=3, type=int, metavar=("PAIRED", "SEQSTR", "SEQFUNC"))
    seed: int = arg(0, "random seed of --pick", type=int)
    exclude_similar_to: tuple = arg(None, "alphafold: leave out every protein whose sequence is identical, or "
                                     "at >= --identity (MMseqs2), to a test chain of these feature sets (e.g. "
                                     "features/ec features/go), before --pick; ids in <out>/excluded_similar.json",
                                     nargs="+", metavar="SET")
    identity: float = arg(0.95, "sequence identity of --exclude-similar-to (1.0 = identical sequences only, "
                           "no MMseqs2 needed)", type=float)
    data: str = arg(None, "ec/go: torchdrug's EnzymeCommission.zip / GeneOntology.zip, the directory torchdrug "
                     "or this script extracted it to, or a directory of DeepFRI's files "
                     "(nrPDB-EC_*_annot.tsv, *_train.txt, ...)")
    download: bool = arg(False, "ec/go: download torchdrug's archive into --data-dir (md5-checked)")
    data_dir: str = arg("data", "where downloads are stored and archives extracted (also the demo's raw files)")
    demo_n: int = arg(None, "demo: number of synthetic proteins (default: demo.py's)", type=int)
    esm_model: str = arg(None, "fair-esm model whose last layer gives the seq features, e.g. "
                          f"{ESM1B_NAME} (the paper's), esm2_t33_650M_UR50D (default: the --esm-weights "
                          f"file's name, as fair-esm names local files, else {ESM1B_NAME})")
    esm_weights: str = arg(None, "local fair-esm checkpoint (.pt), e.g. esm1b_t33_650M_UR50S.pt: nothing is "
                            "downloaded (default: fair-esm's file, downloaded once into the torch hub cache)")
    gearnet_ckpt: str = arg(None, "GearNet-Edge weights, e.g. mc_gearnet_edge.pth (needed for real str "
                             "features): a plain state_dict, a torchdrug solver checkpoint {'model': ...} or a "
                             "DDP one ('module.' keys)")
    text_model: str = arg(PUBMEDBERT, "Hugging Face name or local directory of the text model")
    toks_per_batch: int = arg(None, "token budget per ESM / text batch, sorted by length (default: 4096 as "
                               "fair-esm's extract.py; 32768 on a GPU with >= 40 GB)", type=int)
    str_toks_per_batch: int = arg(None, "residues per GearNet batch (its line graph grows ~600 edges per "
                                   "residue; default: 1024; 8192 on a GPU with >= 40 GB)", type=int)
    graphs: str = arg("auto", "where GearNet's residue graphs are built: auto = on the encoder's device (a GPU "
                       "when there is one), cpu", choices=("auto", "cpu"))
    read_workers: int = arg(None, "processes that read and check the inputs (structure parsing) ahead of the "
                             "encoders (default: 0 on the CPU: one reader thread; min(8, cores - 1) beside a GPU)",
                             type=int)
    write_threads: int = arg(None, "threads that write the feature files while the encoders go on (0: each "
                              "file written before the next batch; default: 1 on a GPU, 0 on the CPU, where "
                              "the encoders use every core)", type=int)
    max_len: int = arg(1022, "residues per protein the encoders see (ESM-1b's limit)", type=int)
    long: str = arg("crop", "proteins over --max-len: crop to the first max-len residues everywhere, or "
                     "average ESM over overlapping windows (GearNet then sees the whole chain)",
                     choices=("crop", "sliding"))
    on_mismatch: str = arg("skip", "given sequence disagrees with the structure's residues: skip the "
                            "protein (reported) or use the structure's sequence (a few substitutions at most)",
                            choices=("skip", "structure"))
    chain: str = arg(None, "structure folders: the chain to read from every file (default: the chain the file "
                      "name names, 1ABC-A.pdb -> A; else the file's only chain)")
    all_chains: bool = arg(False, "structure folders: a file with several chains and no chain in its name gives "
                            "one protein per chain, <id>_<chain> (default: such a file fails)")
    shard: str = arg("0/1", "i/n: do only the ids at sorted positions i, i+n, i+2n, ... (i = 0..n-1)")
    merge: bool = arg(False, "only merge the shard manifests of --out into manifest.tsv")
    overwrite: bool = arg(False, "recompute files that already exist")
    limit: int = arg(None, "only the first N ids (sorted), for trial runs", type=int)
    device: str = arg("auto", "torch device (auto: cuda if available)")
    pack: str = arg(None, "only pack the finished per-protein set DIR into a feature store DIR/store (large "
                     "float16 shards for streaming; amma.py, finetune.py and analyze.py read either layout); "
                     "resumable, an up-to-date store is left as it is", metavar="DIR")
    store_out: str = arg(None, "--pack: write the store (with the set's manifest, info and labels) to this "
                          "directory instead of DIR itself", metavar="DIR")
    precision: str = arg("auto", "encoder forward passes: bf16 autocast, tf32 matmuls (CUDA) or exact fp32; auto: "
                          "bf16 on CUDA, fp32 on the CPU (features are saved in float16 either way; the precision "
                          "is part of the encoder names in info.json, so one set never mixes two)",
                          choices=("auto", "bf16", "tf32", "fp32"))
    store_shard_mb: float = arg(4096, "--pack: MiB of features per shard (all modalities together: about 1/3 in "
                                 "the seq file, 2/3 in str, 1/15 in func)", type=float)


# ----------------------------------------------------------------------------- small pure helpers

def token_batches(lengths, toks_per_batch, extra=0):
    """Indices grouped into batches, sorted by length, each batch's (max length + extra) x size within
    the budget (fair-esm's FastaBatchedDataset.get_batch_indices); an over-budget item is alone."""
    batches, buf, width = [], [], 0
    for length, i in sorted((n, i) for i, n in enumerate(lengths)):
        length += extra
        if buf and max(width, length) * (len(buf) + 1) > toks_per_batch:
            batches.append(buf)
            buf, width = [], 0
        width = max(width, length)
        buf.append(i)
    if buf:
        batches.append(buf)
    return batches


def windows(length, size):
    """(start, end) windows of `size` covering range(length), overlapping by half a window."""
    if length <= size:
        return [(0, length)]
    stride = size // 2
    starts = list(range(0, length - size, stride)) + [length - size]
    return [(s, s + size) for s in starts]


def parse_shard(text):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FatalError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise FatalError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def shard_ids(ids, i, n):
    """The ids at positions i, i+n, ... of the sorted list: each id in exactly one shard."""
    return [x for k, x in enumerate(sorted(ids)) if k % n == i]


# feature_file (the file name of a protein's features) lives in cache.py, the feature-cache contract.


def save_tensor(x, path):
    """float16 copy of x written to a temporary file next to path, then renamed over it; InputError
    (nothing written) when a value is NaN or infinite, from the encoder or beyond float16's 65504."""
    # finite in float16 <=> |x| < 65520 (65504 and up round to 65504 below it, to inf from it); a NaN fails the
    # comparison too, so one fast reduction over x checks everything (isfinite on float16 is 10x slower)
    if x.numel() and not bool(x.detach().abs().amax() < 65520):
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise InputError(f"the encoder gave {bad} non-finite values (NaN or inf) in "
                             f"[{', '.join(map(str, x.shape))}]; nothing written")
        raise InputError(f"a value is not finite in float16 (max |value| "
                         f"{x.detach().float().abs().max().item():.4g}; float16 holds up to 65504); nothing written")
    y = torch.empty(x.shape, dtype=torch.float16).copy_(x)    # one copy: contiguous, its own storage, on the CPU
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(y, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise OutputError(path, e) from None


def check_existing(path, length=None):
    """Shape of a finished feature file; ValueError (one line) if it is unreadable or the wrong shape.
    The file is memory-mapped, so only its header is read (a truncated file still fails: its zip
    directory at the end is gone)."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip errors, pickle errors, EOF: all mean the same thing here
        raise ValueError(f"{path}: not a readable tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{path}: expected a 2-D tensor [tokens, dim], got {type(x).__name__}")
    if x.dtype != torch.float16 or (length is not None and x.shape[0] != length):
        raise ValueError(f"{path}: {x.dtype} {tuple(x.shape)}, expected float16 with {length} rows")
    return tuple(x.shape)


TEMP_NAME = re.compile(r"^\.?(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # .<id>.pt.<pid>.tmp, manifest.tsv.<pid>.tmp


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def remove_stale_temps(out):
    """Remove the temporary files that dead processes (killed, out of disk) left in `out` and its modality
    folders; returns their names (reported in the log and summary.json). Files of living processes (another
    shard writing now) are left alone."""
    removed = []
    for folder in (out, *(out / m for m in MODALITIES)):
        for path in sorted(folder.glob("*.tmp")) if folder.is_dir() else ():
            m = TEMP_NAME.match(path.name)
            if m and not pid_alive(int(m.group("pid"))):
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(out)))
    if removed:
        log(f"{out}: removed {len(removed)} temporary files of dead processes ({', '.join(removed[:3])}"
            f"{', ...' if len(removed) > 3 else ''})", err=True)
    return removed


BASE_COLUMNS = ("id", "L", "L_func", "modalities", "sequence", "L_full", "structure", "chain")
# provenance: sha_<m> = checksum of what <m>'s features were computed from, enc_<m> = the encoder
MANIFEST_COLUMNS = BASE_COLUMNS + tuple(f"sha_{m}" for m in MODALITIES) + tuple(f"enc_{m}" for m in MODALITIES)


def manifest_row(p, names):
    row = {"id": p.id, "L": len(p.seq), "L_func": p.shapes.get("func", (0,))[0],
           "modalities": ",".join(p.modalities), "sequence": p.seq, "L_full": p.L_full,
           "structure": str(p.structure or ""), "chain": p.chain}
    for m in MODALITIES:
        row[f"sha_{m}"] = p.sha.get(m, "") if m in p.modalities else ""
        row[f"enc_{m}"] = names.get(m, "") if m in p.modalities else ""
    return row


def write_manifest(path, rows):
    lines = ["\t".join(MANIFEST_COLUMNS)]
    lines += ["\t".join(str(r.get(c, "")) for c in MANIFEST_COLUMNS) for r in sorted(rows, key=lambda r: r["id"])]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_manifest_rows(path):
    """{id: row of strings} of a manifest file written by write_manifest ({} when there is none). Rows of
    manifests written before the provenance columns existed lack sha_* / enc_*."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {r["id"]: r for r in rows if r.get("id") and all(r.get(c) is not None for c in BASE_COLUMNS)}


def previous_rows(out):
    """{id: row} of every manifest in `out` (manifest.tsv and shard manifests, the newest file winning):
    what the existing feature files were computed from."""
    files = [out / "manifest.tsv", *out.glob("manifest.shard-*-of-*.tsv")]
    rows = {}
    for path in sorted((f for f in files if f.exists()), key=lambda f: f.stat().st_mtime_ns):
        rows.update(read_manifest_rows(path))
    return rows


def stale_reason(p, m, previous, names):
    """Why the existing file of (p, m) must be recomputed although it loads, or None when it is up to date:
    its manifest row records another input checksum or encoder, or it has no row (a killed run's last
    chunk). Rows of older manifests without checksums: only a changed sequence counts."""
    row = previous.get(p.id)
    if row is None:
        return "no manifest row records what the file was computed from"
    if row.get(f"sha_{m}"):
        if row[f"sha_{m}"] != p.sha.get(m):
            return {"seq": "the sequence changed", "str": "the structure file changed",
                    "func": "the text changed"}[m]
        if row.get(f"enc_{m}") and row[f"enc_{m}"] != names.get(m):
            return f"made by {row[f'enc_{m}']}"
        return None
    if m != "func" and row.get("sequence") and row["sequence"] != p.seq:
        return "the sequence changed"
    return None


def kept_rows(out, rows, todo_ids):
    """Manifest rows of earlier runs (`rows`: id -> row) for ids this run did not handle whose feature files
    are still there and valid: a partial re-run (--limit, another input) does not shrink the manifest."""
    kept = []
    for pid, r in rows.items():
        if pid in todo_ids:
            continue
        try:
            for m in filter(None, r["modalities"].split(",")):
                check_existing(out / m / feature_file(pid), None if m == "func" else int(r["L"]))
        except (ValueError, OSError):
            continue
        kept.append(r)
    return kept


def write_info(out, rows, names=None, base=None, union=False):
    """info.json with dims / encoders of every modality some row has (read from one of its files);
    union: keep what info.json already lists (shards each see only their own rows)."""
    path = out / "info.json"
    old = json.loads(path.read_text()) if path.exists() and union else {}
    dims, encoders = dict(old.get("dims", {})), dict(old.get("encoders", {}))
    for m in MODALITIES:
        row = next((r for r in rows if m in r["modalities"].split(",")), None)
        if row is not None:
            dims[m] = check_existing(out / m / feature_file(row["id"]))[1]
            encoders[m] = (names or {}).get(m) or encoders.get(m, "?")
    dims = {m: dims[m] for m in MODALITIES if m in dims}
    info = {"encoders": {m: encoders.get(m, "?") for m in dims}, "dims": dims}
    info.update({k: v for k, v in {**old, **(base or {})}.items() if k not in info})
    write_text_atomic(path, json.dumps(info, indent=1))
    return info


def esm_info(cfg, encoder, old):
    """info.json's sequence-encoder fields, which finetune.py needs to rebuild the model for ESM in the loop
    (load_sequence_encoder): from the encoder loaded in this run, else from the set's info.json (same
    encoder: check_info refuses mixing), else from the name."""
    if cfg.encoders == "tiny":
        return {"esm_model": TINY_NAMES["seq"], "esm_weights": "", "esm_layer": TINY_ESM_LAYER}
    name = esm_model_name(cfg)
    if encoder is not None:
        return {"esm_model": name, "esm_weights": encoder.weights, "esm_layer": encoder.layer}
    if old.get("esm_model") == name:
        return {k: old.get(k) for k in ("esm_model", "esm_weights", "esm_layer")}
    m = ESM_NAME.match(name)
    return {"esm_model": name, "esm_weights": str(Path(cfg.esm_weights).resolve()) if cfg.esm_weights else "",
            "esm_layer": int(m.group(2)) if m else None}


def merge_shards(out, n=None, names=None):
    """Merge manifest.shard-*-of-n.tsv into manifest.tsv when all n are there, and bring info.json's
    dims / encoders up to every modality of the merged rows; returns the row count or None (names
    the missing shards)."""
    shard_files = sorted(out.glob("manifest.shard-*-of-*.tsv"))
    counts = {int(m.group(1)) for f in shard_files if (m := re.search(r"-of-(\d+)\.tsv$", f.name))}
    if n is None:
        if len(counts) != 1:
            raise FatalError(f"{out}: found shard manifests for n = {sorted(counts) or 'none'}; expected one n")
        n = counts.pop()
    missing = [i for i in range(n) if not (out / f"manifest.shard-{i}-of-{n}.tsv").exists()]
    if missing:
        log(f"manifest: shards {missing} of {n} not finished yet; manifest.tsv is written by the last shard "
            f"or by --merge")
        return None
    rows = {}
    for i in range(n):
        rows.update(read_manifest_rows(out / f"manifest.shard-{i}-of-{n}.tsv"))
    write_manifest(out / "manifest.tsv", list(rows.values()))
    if names is None:  # --merge alone: the encoder names the shards reported
        names = {}
        for f in sorted(out.glob(f"summary.shard-*-of-{n}.json")):
            names.update(json.loads(f.read_text()).get("encoders", {}))
    write_info(out, list(rows.values()), names, union=True)
    log(f"manifest: merged {n} shards into {out / 'manifest.tsv'} ({len(rows)} rows)")
    return len(rows)


def write_labels(out, task, terms, labels, splits, test_identity, source):
    """labels_<task>.json: terms (class index = position), class indices per id, splits, test cutoffs."""
    ids = [x for split in ("train", "valid", "test") for x in splits[split]]
    payload = {"task": task, "terms": terms, "labels": {x: labels.get(x, []) for x in ids},
               "splits": splits, "test_identity": {x: test_identity[x] for x in splits["test"] if x in test_identity},
               "source": source}
    write_text_atomic(out / f"labels_{task}.json", json.dumps(payload))
    log(f"labels: {out / f'labels_{task}.json'}: {len(terms)} classes, train/valid/test "
        f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}")


# ----------------------------------------------------------------------------- extraction

def encode_residues(encoder, jobs, cfg, save, fail, desc):
    """Per-residue features of jobs [(protein, sequence)] under the token budget; ESM windows are
    averaged when --long sliding left a protein over max_len."""
    segments = [(j, a, b) for j, (_, s) in enumerate(jobs) for a, b in windows(len(s), cfg.max_len)]
    remaining = Counter(j for j, _, _ in segments)
    sums, counts = {}, {}
    for batch in progress(token_batches([b - a for _, a, b in segments], cfg.toks_per_batch, extra=2), desc):
        segs = [segments[k] for k in batch]
        done = run_isolated(lambda part: encoder([jobs[j][1][a:b] for j, a, b in part]), segs,
                            lambda seg, reason: fail(jobs[seg[0]][0], f"{desc}: {reason}"))
        for (j, a, b), rep in done:
            if j not in sums:
                sums[j] = rep.new_zeros(len(jobs[j][1]), rep.shape[1])
                counts[j] = rep.new_zeros(len(jobs[j][1]), 1)
            sums[j][a:b] += rep
            counts[j][a:b] += 1
            remaining[j] -= 1
            if remaining[j] == 0:
                save(jobs[j][0], sums.pop(j) / counts.pop(j))


def run_isolated(encode, items, fail):
    """[(item, output)] of encode(items); when the batch raises (one bad protein, out of memory), each
    item is retried alone, so only the items that fail alone are lost: fail(item, reason) names them."""
    try:
        return list(zip(items, encode(items)))
    except Exception as e:  # any error of an encoder: the run goes on
        if len(items) == 1:
            fail(items[0], f"{type(e).__name__}: {full_reason(e)}")
            return []
    return [pair for item in items for pair in run_isolated(encode, [item], fail)]


def encode_batches(encode, proteins, lengths, budget, desc, save, fail):
    """Length-sorted batches under a token budget through `encode(group) -> [features]`; a protein that
    breaks its batch is retried alone (run_isolated) and fails by name, the rest of the batch is kept."""
    for batch in progress(token_batches(lengths, budget), desc):
        group = [proteins[k] for k in batch]
        for p, x in run_isolated(encode, group, lambda q, reason: fail(q, f"{desc}: {reason}")):
            save(p, x)


def encode_structures(model, proteins, cfg, save, fail):
    """GearNet features; each protein's graph is built on the model's device (--graphs auto) or on the
    CPU (gearnet.protein_graph), then the batch is packed into one graph (gearnet.encode_structures)."""
    graph_device = "cpu" if cfg.graphs == "cpu" else None
    run = lambda group: gearnet.encode_structures(model, [p.graph_input for p in group], graph_device)
    device = next(model.parameters()).device
    encode_batches(lambda group: with_precision(structure_precision(cfg.precision, device), device, run, group), proteins,
                   [len(p.seq) for p in proteins], cfg.str_toks_per_batch, "str", save, fail)


def encode_texts(encoder, proteins, cfg, save, fail):
    encode_batches(lambda group: encoder([p.text_ids for p in group]), proteins,
                   [len(p.text_ids) for p in proteins], cfg.toks_per_batch, "func", save, fail)


def encoder_clash(out, names, modalities=MODALITIES):
    """{modality: (encoder in out/info.json, names[modality])} where the two differ."""
    path = out / "info.json"
    old = json.loads(path.read_text()).get("encoders", {}) if path.exists() else {}
    return {m: (old[m], names[m]) for m in modalities if m in old and m in names and old[m] != names[m]}


def check_info(out, cfg, modalities):
    """Refuse to mix features of different encoders in one set (unless --overwrite)."""
    if cfg.overwrite:
        return
    clash = encoder_clash(out, encoder_names(cfg), modalities)
    if clash:
        raise FatalError(f"{out} holds features of other encoders ({clash}); use another --out or --overwrite")


# The main path: main() picks the source's reader in sources.py (a list of Proteins), then extract_set() per
# feature set: for each chunk of CHUNK proteins, prepare() reads and checks the inputs, files_to_write()
# decides which files are missing or stale, encode_pending() runs the encoders and save_tensor() writes;
# finish_set() then writes the manifest, info.json and summary.json.

@dataclass
class Tally:
    """What one extract_set run found, per protein id: the summary's lists, and the manifest rows so far."""
    failed: dict = field(default_factory=dict)      # id -> reason (the protein is left out)
    rewritten: dict = field(default_factory=dict)   # id -> why its existing file was unreadable
    recomputed: dict = field(default_factory=dict)  # id -> [modality: why its input changed]
    notes: dict = field(default_factory=dict)       # id -> a modality left out for lack of input
    rows: list = field(default_factory=list)        # manifest rows of the proteins handled
    done: int = 0                                   # proteins with at least one file written
    skipped: int = 0                                # proteins whose files were all up to date
    residues: dict = field(default_factory=dict)    # id -> read_structure's report (remapped / dropped residues)
    stale_temps_removed: list = field(default_factory=list)  # temporary files of dead processes, removed

    def fail(self, p, reason):
        """Leave protein p (or an id) out with a one-line reason; the first reason counts."""
        pid = p if isinstance(p, str) else p.id
        if pid not in self.failed:
            self.failed[pid] = reason
            log(f"error: {pid}: {reason}", err=True)


def unique_proteins(proteins):
    """({id: first Protein of that id}, Counter of the ids given more than once); warns about the second."""
    by_id, duplicates = {}, Counter()
    for p in proteins:
        if p.id in by_id:
            duplicates[p.id] += 1
        else:
            by_id[p.id] = p
    if duplicates:
        log(f"warning: {len(duplicates)} ids occur more than once ({', '.join(list(duplicates)[:5])}...); "
            "the first occurrence of each is used", err=True)
    return by_id, duplicates


def files_to_write(ready, out, cfg, previous, names, tally):
    """{modality: [Protein]} whose feature file must be (re)computed. A file is kept when its manifest row
    records the same input and encoder (stale_reason) and it loads with the right shape; otherwise it is
    recomputed (input changed: tally.recomputed) or rewritten (unreadable: tally.rewritten)."""
    pending = {m: [] for m in MODALITIES}
    for p in ready:
        for m in p.modalities:
            path = out / m / feature_file(p.id)
            if path.exists() and not cfg.overwrite:
                why = stale_reason(p, m, previous, names)
                if why is None:
                    try:
                        p.shapes[m] = check_existing(path, None if m == "func" else len(p.seq))
                        continue
                    except ValueError as e:
                        tally.rewritten[p.id] = str(e)
                        log(f"warning: {p.id}: existing {m} file is corrupt, rewriting ({e})", err=True)
                else:
                    tally.recomputed.setdefault(p.id, []).append(f"{m}: {why}")
            pending[m].append(p)
    return pending


def encode_pending(pending, encoders, out, cfg, device, tally):
    """Encode and save every pending (modality, protein), loading each encoder on first need. A protein
    that fails (bad text, non-finite features) is in tally.failed and has no row."""
    for m in MODALITIES:
        if pending[m] and m not in encoders:
            encoders[m] = load_encoder(m, cfg, device)
    for p in pending["func"]:
        try:
            p.text_ids = encoders["func"].ids(p.fields)
        except InputError as e:
            tally.fail(p, str(e))
    pending = {m: [p for p in ps if p.id not in tally.failed] for m, ps in pending.items()}
    cfg = token_budgets(cfg, device)

    threads = cfg.write_threads if cfg.write_threads is not None else int(torch.device(device).type == "cuda")
    with Writer(out, tally, max(threads, 0)) as writer:
        if pending["seq"]:
            jobs = [(p, p.seq) for p in pending["seq"]]
            encode_residues(encoders["seq"], jobs, cfg, writer.saver("seq"), tally.fail, "seq")
        if pending["str"]:
            encode_structures(encoders["str"], pending["str"], cfg, writer.saver("str"), tally.fail)
        if pending["func"]:
            encode_texts(encoders["func"], pending["func"], cfg, writer.saver("func"), tally.fail)
    return {p.id for ps in pending.values() for p in ps}


def token_budgets(cfg, device):
    """cfg with --toks-per-batch / --str-toks-per-batch as given, else sized for the device: 4096 / 1024 (CPU,
    small GPUs), 8 x that on a GPU with 40 GB or more (fair-esm's 4096 tokens fill a fraction of an H100)."""
    device = torch.device(device)
    big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 40 * 2 ** 30
    return dataclasses.replace(cfg, toks_per_batch=cfg.toks_per_batch or (32768 if big else 4096),
                               str_toks_per_batch=cfg.str_toks_per_batch or (8192 if big else 1024))


HOST_SECONDS = Counter()   # seconds reading inputs, writing files, and the encoding thread waiting for either
                           # (bench.py --only extract: the rest of read + write ran beside the encoders)


def waited(fn, *args):
    """fn(*args), its duration counted as time the encoders waited for the host (HOST_SECONDS['waited'])."""
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        HOST_SECONDS["waited"] += time.perf_counter() - t


class Writer:
    """Feature files written by `threads` background threads while the encoders go on (0: inline).
    At most `depth` files wait (their tensors are held); results are taken in submission order, in the
    caller's thread: a non-finite tensor leaves its protein out (tally.fail), any other error (a full
    disk: OutputError) stops the run, at the latest when the block ends."""

    def __init__(self, out, tally, threads=1, depth=32):
        self.out, self.tally, self.depth = out, tally, depth
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="writer") if threads else None
        self.waiting = deque()

    def saver(self, m):
        return lambda p, x: self.submit(m, p, x)

    def submit(self, m, p, x):
        job = (m, p, tuple(x.shape))
        if self.pool is None:
            self.settle(job, waited(_timed_save, x, self.out / m / feature_file(p.id)))
            return
        self.waiting.append((job, self.pool.submit(_timed_save, x, self.out / m / feature_file(p.id))))
        while len(self.waiting) > self.depth:
            self.take()

    def take(self):
        job, future = self.waiting.popleft()
        self.settle(job, waited(future.result))

    def settle(self, job, error):
        m, p, shape = job
        if error is None:
            p.shapes[m] = shape
        else:
            self.tally.fail(p, f"{m}: {error}")

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        try:
            while self.waiting:
                if kind is None:
                    self.take()
                else:                                  # already failing: let the writes end, keep that error
                    self.waiting.popleft()[1].exception()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def _timed_save(x, path):
    """save_tensor; None, or the InputError that left the tensor unwritten (other errors propagate)."""
    t = time.perf_counter()
    try:
        save_tensor(x, path)
        return None
    except InputError as e:
        return e
    finally:
        HOST_SECONDS["write"] += time.perf_counter() - t


def read_inputs(chunk, cfg, modalities, bar=True, pool=None):
    """[(protein, None or its InputError)] of a chunk: each protein's inputs read and checked (prepare:
    structure parsing, sequence checks), here or by the processes of `pool` (--read-workers). Runs in a
    reader thread for the next chunk while this one is encoded (extract_set); only proteins are touched
    here, the tally is the caller's."""
    t = time.perf_counter()
    if pool is not None:
        done = list(pool.map(read_one, chunk, [cfg] * len(chunk), [modalities] * len(chunk), chunksize=16))
    else:
        done = [read_one(p, cfg, modalities) for p in (progress(chunk, "inputs") if bar else chunk)]
    HOST_SECONDS["read"] += time.perf_counter() - t
    return done


def read_one(p, cfg, modalities):
    try:
        return prepare(p, cfg, modalities), None
    except InputError as e:
        return p, e


def reader_pool(cfg, device):
    """The processes that read inputs ahead (--read-workers; default: none on the CPU, where the encoders
    use every core, up to 8 beside a GPU), or None. Started with spawn: the encoders' CUDA state is not forked."""
    n = cfg.read_workers
    if n is None:
        n = min(8, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0
    if n <= 0:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))


def extract_chunk(inputs, out, cfg, modalities, ctx, tally):
    """One chunk of proteins, read (read_inputs): find the files to (re)compute, encode them, and add a
    manifest row for every protein that did not fail."""
    ready = []
    for p, error in inputs:
        if error is not None:
            tally.fail(p, str(error))
            continue
        ready.append(p)
        if p.note:
            tally.notes[p.id] = p.note
        if p.residue_report:
            tally.residues[p.id] = p.residue_report
    pending = files_to_write(ready, out, cfg, ctx["previous"], ctx["names"], tally)
    busy = encode_pending(pending, ctx["encoders"], out, cfg, ctx["device"], tally)
    for p in ready:
        if p.id not in tally.failed:
            tally.rows.append(manifest_row(p, ctx["names"]))
            tally.done, tally.skipped = tally.done + (p.id in busy), tally.skipped + (p.id not in busy)


def extract_set(proteins, out, cfg, modalities, source, label_sets=(), encoders=None):
    """Extract one feature set; returns the summary dict. `encoders` caches loaded models by modality.
    FatalError when there is nothing to do or no protein is usable (the summary is written first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out)
    check_info(out, cfg, modalities)
    for labels in label_sets:
        write_labels(out, **labels)
    shard_i, shard_n = parse_shard(cfg.shard)
    by_id, duplicates = unique_proteins(proteins)
    ids = sorted(by_id)[:cfg.limit] if cfg.limit else sorted(by_id)
    todo = [by_id[x] for x in shard_ids(ids, shard_i, shard_n)]
    shard_note = f" (shard {shard_i}/{shard_n})" if shard_n > 1 else ""
    if not todo:
        raise FatalError(f"{out}: no proteins to extract{shard_note} ({len(by_id)} ids in the input"
                         f"{f', --limit {cfg.limit}' if cfg.limit else ''})")
    log(f"{out}: {len(todo)} proteins{shard_note}, modalities {' '.join(modalities)}, from {source}")
    manifest = out / (f"manifest.shard-{shard_i}-of-{shard_n}.tsv" if shard_n > 1 else "manifest.tsv")
    names = encoder_names(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = {"previous": previous_rows(out), "names": names, "device": device,
           "encoders": {} if encoders is None else encoders}
    same_encoders = not encoder_clash(out, names)
    # rows of this manifest for ids not handled yet: kept while the run goes on, so a killed run keeps them
    pending_rows = read_manifest_rows(manifest) if same_encoders else {}
    tally = Tally(stale_temps_removed=stale)
    chunks = [todo[start:start + CHUNK] for start in range(0, len(todo), CHUNK)]
    workers = reader_pool(cfg, device)
    with ThreadPoolExecutor(1, thread_name_prefix="inputs") as reader, workers or contextlib.nullcontext():
        inputs = waited(read_inputs, chunks[0], cfg, modalities, True, workers)   # chunk k + 1 is read while k encodes
        for k, chunk in enumerate(chunks):
            ahead = reader.submit(read_inputs, chunks[k + 1], cfg, modalities, False, workers) \
                if k + 1 < len(chunks) else None
            extract_chunk(inputs, out, cfg, modalities, ctx, tally)
            for p in chunk:
                pending_rows.pop(p.id, None)
            if ahead is not None:  # progress so far, for a run that gets killed
                write_manifest(manifest, tally.rows + list(pending_rows.values()))
                inputs = waited(ahead.result)
    return finish_set(out, cfg, modalities, source, todo, tally, ctx, manifest, same_encoders, duplicates)


def finish_set(out, cfg, modalities, source, todo, tally, ctx, manifest, same_encoders, duplicates):
    """After the last chunk: manifest (with the still-valid rows of earlier runs), info.json, the shard
    merge, summary.json; FatalError when no protein was usable."""
    shard_i, shard_n = parse_shard(cfg.shard)
    rows = tally.rows
    for m in modalities:
        if rows and not any(m in r["modalities"].split(",") for r in rows):
            log(f"warning: no protein of {out} ({'this shard' if shard_n > 1 else 'this run'}) has {m} input "
                f"({'structure' if m == 'str' else 'text'}); {m} is left out", err=True)
    if same_encoders:  # rows of earlier runs (other --limit, other ids) whose files are still valid stay
        rows += kept_rows(out, read_manifest_rows(manifest), {p.id for p in todo})
    old_info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    base = {"tiny": cfg.encoders == "tiny", "synthetic": False, "source": source, "max_len": cfg.max_len,
            "long": cfg.long, **esm_info(cfg, ctx["encoders"].get("seq"), old_info), "text_fields": list(TEXT_FIELDS)}
    if "seq" not in modalities and "seq" not in old_info.get("dims", {}):
        base.update(esm_model="", esm_weights="", esm_layer=None)
    info = write_info(out, rows, ctx["names"], base, union=shard_n > 1 and same_encoders)
    write_manifest(manifest, rows)
    if shard_n > 1:
        merge_shards(out, shard_n, ctx["names"])
    failed, usable = tally.failed, tally.done + tally.skipped
    summary = {"out": str(out), "shard": f"{shard_i}/{shard_n}", "proteins": len(todo), "done": tally.done,
               "skipped": tally.skipped, "recomputed": {k: "; ".join(v) for k, v in sorted(tally.recomputed.items())},
               "failed": dict(sorted(failed.items())), "rewritten": tally.rewritten,
               "notes": dict(sorted(tally.notes.items())), "duplicate_ids": sorted(duplicates),
               "residues": dict(sorted(tally.residues.items())), "stale_temps_removed": tally.stale_temps_removed,
               "tiny": cfg.encoders == "tiny", "encoders": info["encoders"],
               "exit_status": EXIT_PARTIAL if failed else EXIT_OK}
    name = f"summary.shard-{shard_i}-of-{shard_n}.json" if shard_n > 1 else "summary.json"
    if usable == 0:
        summary["exit_status"] = EXIT_FATAL
    write_text_atomic(out / name, json.dumps(summary, indent=1))
    print_summary(summary, out / name)
    if usable == 0:
        first = next(iter(failed.items()), ("", "?"))
        raise FatalError(f"{out}: none of the {len(todo)} proteins is usable (all failed; e.g. {first[0]}: "
                         f"{first[1]}); see {out / name}")
    return summary


def print_summary(s, path):
    log(f"summary {s['out']}: {s['proteins']} proteins: done {s['done']} (of which {len(s['recomputed'])} "
        f"recomputed: input changed), skipped {s['skipped']} (up to date), failed {len(s['failed'])}, "
        f"rewritten {len(s['rewritten'])} corrupt")
    for pid, why in list(s["recomputed"].items())[:10]:
        log(f"  recomputed {pid}: {why}")
    for pid, reason in list(s["failed"].items())[:20]:
        log(f"  failed {pid}: {reason}")
    if len(s["failed"]) > 20:
        log(f"  ... {len(s['failed']) - 20} more in {path}")
    if s["residues"]:
        log(f"  residues: {len(s['residues'])} proteins had residues remapped, read as unknown or dropped "
            f"(modified residues, ions, missing C-alpha; counts per protein under 'residues' in {path})")
    for pid, note in list(s["notes"].items())[:5]:
        log(f"  note {pid}: {note}")
    if len(s["notes"]) > 5:
        log(f"  ... {len(s['notes']) - 5} more notes in {path}")
    if s["tiny"]:
        log("  TINY random-init encoders: these features only exercise the pipeline, they mean nothing")
    if s["failed"]:
        log(f"  exit status {EXIT_PARTIAL}: {len(s['failed'])} proteins failed (reasons in {path})", err=True)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_CODES + ". Commands "
                                     "and the choices made: python -c 'import extract_features; "
                                     "help(extract_features)'")
    for f in fields(ExtractConfig):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        if f.default is not None:
            shown = " ".join(f.default) if isinstance(f.default, tuple) else f.default
            meta["help"] += f" (default: {shown})"
        parser.add_argument(flag, default=f.default, **meta)
    return parser


def check_out(out):
    """--out must be a folder this process can write, or a path that can become one; FatalError (one line)
    otherwise. Nothing is created here (a run that fails on its inputs leaves no empty folder)."""
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FatalError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FatalError(f"--out {out}: {probe} is not writable (read-only file system or no permission)")


def extract_alphafold(cfg, out, modalities, encoders):
    """--source alphafold: the paired set into `out` (and, with --unpaired or --pick, seqstr/ and seqfunc/
    beside it); the join's left-out accessions in alphafold_mismatch.json. Returns the summaries."""
    summaries = []
    sets, left_out, join, table = alphafold_sets(cfg)
    if cfg.exclude_similar_to:   # overlap.py: pretraining proteins too close to the benchmarks' test chains
        sets, table, _ = overlap.exclude_similar(sets, table, cfg.exclude_similar_to, cfg.identity, log, out,
                                                 FatalError)
    names = ("paired", "seqstr", "seqfunc") if cfg.unpaired else ("paired",)
    if cfg.pick is not None:
        sets, record = pick_sets(sets, table, cfg.pick, cfg.seed)
        names = [n for n, k in zip(("paired", "seqstr", "seqfunc"), cfg.pick) if k > 0]
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "picks.json", json.dumps({"join": join, **record}, indent=1))
    wanted = {"paired": MODALITIES, "seqstr": ("seq", "str"), "seqfunc": ("seq", "func")}
    targets = {"paired": out, "seqstr": out.parent / "seqstr", "seqfunc": out.parent / "seqfunc"}
    for name in names:
        mods = tuple(m for m in modalities if m in wanted[name])
        if not sets[name]:
            log(f"warning: alphafold: the {name} set is empty; nothing written to {targets[name]}", err=True)
            continue
        summaries.append(extract_set(sets[name], targets[name], cfg, mods, f"alphafold:{name}", encoders=encoders))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "alphafold_mismatch.json", json.dumps(left_out, indent=1))
    return summaries


def main(argv=None):
    """The command line; returns the exit status (EXIT_CODES)."""
    args = build_parser().parse_args(argv)
    cfg = ExtractConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (cfg.merge or cfg.pack or TORCHRUN_RANK):
        return extract_torchrun(sys.argv[1:] if argv is None else argv, cfg)   # torchrun: rank r of n is --shard r/n
    modalities = tuple(m for m in MODALITIES if m in cfg.modality)
    try:
        if cfg.merge:
            if not cfg.out:
                raise FatalError("--merge needs --out")
            return EXIT_OK if merge_shards(Path(cfg.out)) is not None else EXIT_INCOMPLETE
        if cfg.pack:
            return pack_store(cfg.pack, cfg.store_out, cfg.store_shard_mb)
        if not 1 <= cfg.max_len <= 1022:
            raise FatalError(f"--max-len {cfg.max_len}: need 1 <= max-len <= 1022 (ESM-1b's positions)")
        if cfg.source is None:
            cfg.source = infer_source(cfg)
            log(f"source: {cfg.source} (from the input flags; --source to choose another)")
        if cfg.pick is not None and (cfg.source != "alphafold" or min(cfg.pick) < 0):
            raise FatalError("--pick PAIRED SEQSTR SEQFUNC: counts >= 0, with --source alphafold (--af-dir)")
        name = f"demo-{cfg.encoders}" if cfg.source == "demo" else cfg.source  # features/demo: demo.py's own set
        out = Path(cfg.out or f"features/{name}")
        check_out(out)  # before any reading: a bad --out is a one-line error at once
        if cfg.encoders == "tiny":
            log("encoders: TINY -- small random-init models of the real architectures (ESM-2 6 layers, "
                "GearNet-Edge [32]*6, 2-layer BERT); for tests and the demo, not for results")
        if "seq" in modalities:
            log(f"sequences: {STANDARD_RESIDUES} plus {' '.join(EXTRA_RESIDUES)} (fair-esm's alphabet has tokens "
                "for X B Z U O); any other character fails its protein")
        encoders = {}  # loaded once, shared by the sets of one run
        if cfg.source == "alphafold":  # up to three sets (paired, seqstr, seqfunc) from one join
            summaries = extract_alphafold(cfg, out, modalities, encoders)
        else:
            label_sets = []
            if cfg.source in ("ec", "go"):
                proteins, label_sets = task_proteins(cfg, cfg.source, texts=texts_by_id(cfg))
            elif cfg.source == "demo":
                proteins, label_sets = demo_sets(cfg)
            else:
                proteins = {"fasta": proteins_fasta, "pdb-dir": proteins_pdb_dir,
                            "protdescribe": proteins_protdescribe}[cfg.source](cfg)
            summaries = [extract_set(proteins, out, cfg, modalities, cfg.source, label_sets, encoders)]
        return max(s["exit_status"] for s in summaries) if summaries else EXIT_FATAL
    except FatalError as e:
        log(f"error: {e}", err=True)
        return EXIT_FATAL
    except (OSError, UnicodeDecodeError) as e:  # a missing or unreadable input file or directory
        log(f"error: {type(e).__name__}: {e}", err=True)
        return EXIT_FATAL


# ----------------------------------------------------------------------------- torchrun

TORCHRUN_RANK = []          # [rank] while this process runs its shard under torchrun


def extract_torchrun(argv, cfg):
    """torchrun --nproc_per_node N extract_features.py ... (several nodes too): rank r of n runs this command
    as --shard r/n, on cuda:LOCAL_RANK when there is CUDA (rank 0 first fetches and unpacks torchdrug's
    archives alone, --download / --data zip); the shard that finishes last merges the shard
    manifests into manifest.tsv (as for --shard jobs started by hand), and the ranks wait for each other so
    that the run ends with the merged set. Returns the worst rank's exit status on every rank."""
    import torch.distributed as dist
    rank, world, local = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if cfg.shard != "0/1":
        log(f"error: --shard {cfg.shard} under torchrun: torchrun splits the proteins over its {world} processes "
            f"itself (leave --shard out)", err=True)
        return EXIT_FATAL
    extra = ["--shard", f"{rank}/{world}"]
    if torch.cuda.is_available() and not any(a == "--device" or a.startswith("--device=") for a in argv):
        extra += ["--device", f"cuda:{local}"]
    dist.init_process_group("gloo")                      # only exit statuses travel: gloo, CPU tensors
    TORCHRUN_RANK.append(rank)
    try:
        if rank == 0 and (cfg.download or cfg.data):     # torchdrug's archives: fetched and unpacked once
            try:
                source = infer_source(cfg)
                if source in ("ec", "go"):
                    task_files(cfg, source)
            except (FatalError, OSError, ValueError):
                pass                                     # every rank's main() reports it the same way
        dist.barrier()
        status = main(list(argv) + extra)
        worst = torch.tensor([status])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)     # also the barrier: every shard is written
        return int(worst)
    finally:
        TORCHRUN_RANK.clear()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_as_script(main)
