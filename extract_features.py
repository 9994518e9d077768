"""Extract the frozen uni-modal features AMMA learns from: one float16 .pt per protein and modality.

    features/<set>/seq/<id>.pt    [L, d_seq]   ESM-1b (or another fair-esm model): its last layer, BOS/EOS dropped
    features/<set>/str/<id>.pt    [L, d_str]   GearNet-Edge node features (row i = same residue as seq)
    features/<set>/func/<id>.pt   [L', d_func] PubMedBERT-abs last hidden state of the joined text
    features/<set>/manifest.tsv   id, L, L_func, modalities, sequence, L_full, structure, chain, and what each
                                  file was computed from: sha_seq / sha_str / sha_func (checksums of the
                                  sequence, the structure file, the text fields) and enc_seq / enc_str / enc_func
    features/<set>/info.json      encoders, dims, tiny, synthetic, esm_model, esm_weights, esm_layer, source, ...
    features/<set>/labels_<task>.json   ec / go / demo: task, terms, labels, splits, test_identity, source
    features/<set>/summary.json   done / skipped / recomputed / failed (with reasons) of the last run

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
- Sequence letters: the 20 standard residues plus X B Z U O, which fair-esm's ESM-1b alphabet holds as
  tokens of their own (X unknown, B Asx, Z Glx, U selenocysteine, O pyrrolysine). Any other character
  (digits, '*', '-', '.', lowercase) fails that protein with a one-line error; nothing is guessed.
- Long proteins: the first --max-len (1022) residues, in every residue-level modality (torchdrug's
  choice). --long sliding instead averages ESM over windows of 1022 overlapping by half and runs
  GearNet on the whole chain.
- With a structure, the residues that have a C-alpha atom are the sequence (the sequence encoder sees
  exactly the structure's residues). A FASTA/TSV sequence given too must contain the structure's
  residues in order (residues missing from the structure are fine; 'X' matches anything); otherwise
  the protein is reported and skipped (--on-mismatch structure uses the structure's sequence instead).
- Text: ProtST's fields ProteinName, Function, SubcellularLocation, Similarity, each tokenized alone
  without special tokens and cut to 128 tokens, joined as [CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4 (ProtST
  has no trailing [SEP]); empty fields are left out, no inner padding (so features do not depend on the
  batch), at most 512 tokens (the last field is trimmed). A protein whose four fields are all empty
  has no func modality (a note in the summary, not a failure).
- ProtDescribe (ProtST's uniprot_sprot_filtered.tsv) is read as ProtST's UniProtSeqText reads it: csv
  with tab delimiter, the header row names the fields, a row with more fields than the header keeps the
  first ones (a row with fewer gets empty fields; both are counted and reported). ProtST's code names no
  id column; the first of Entry / Accession / ... / EntryName in the header is used (--id-column to name
  it), else the proteins are named row000001, ... by position.
- AlphaFold DB x ProtDescribe (--source alphafold): --af-dir is a directory of AF-<acc>-F1-model_v<k>
  files (newest k per accession) or the tar archive itself (swissprot_pdb_v2.tar, read member by member,
  never extracted). --join auto pairs by accession when the id column holds UniProt accessions (P00698),
  otherwise (no id column, or entry names such as LYSC_CHICK) by exact sequence, as the paper did with
  torchdrug's AlphaFold sequences; pairs whose sequences differ are left out of every set and listed in
  alphafold_mismatch.json. A join that pairs nothing stops the run.
- Labels: every chain of the DeepFRI splits is in labels_<task>.json (GO chains without a term of a
  branch get [] there, as in torchdrug); test_identity holds the test CSV's <30%..<95% columns, and the
  cutoff is applied by finetune.py, not here. torchdrug's archives are extracted the way torchdrug's
  utils.extract does it (X.zip -> X/, train.zip -> train/train/*.pdb), so torchdrug's own extracted
  directory and ours are the same layout, and either can be passed as --data.
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
import csv
import gzip
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import tarfile
import tempfile
import types
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import gearnet
import overlap

MODALITIES = ("seq", "str", "func")
SOURCES = ("fasta", "pdb-dir", "protdescribe", "alphafold", "ec", "go", "demo")
TEXT_FIELDS = ("ProteinName", "Function", "SubcellularLocation", "Similarity")  # ProtST's order
SEQUENCE_FIELD = "Sequence"
# candidate id columns of a ProtDescribe TSV, first found wins (ProtST's code names none)
ID_COLUMNS = ("Entry", "Accession", "accession", "Entry ID", "EntryID", "Entry Name", "EntryName", "entry_name",
              "id", "ID")
UNIPROT_ACCESSION = re.compile(r"^([OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9]([A-Z][A-Z0-9]{2}[0-9]){1,2})(-\d+)?$")
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
EXTRA_RESIDUES = "XBZUO"  # tokens of their own in fair-esm's ESM-1b alphabet
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
ESM1B_NAME = "esm1b_t33_650M_UR50S"
ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{}.pt"  # fair-esm's esm/pretrained.py
ESM1B_URL = ESM_URL.format(ESM1B_NAME)
ESM_NAME = re.compile(r"^(esm1b|esm1v|esm1|esm2)_t(\d+)_")  # fair-esm models with ESM-1b's interface
PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"
TINY_NAMES = {"seq": "tiny:esm2_t6 (random init)", "str": "tiny:gearnet_edge [32]*6 (random init)",
              "func": "tiny:bert_2layer (random init)"}
TINY_ESM_LAYER = 6
# torchdrug's archives of the DeepFRI sets (torchdrug/datasets/enzyme_commission.py, gene_ontology.py)
TORCHDRUG_ZIPS = {
    "ec": ("EnzymeCommission", "https://zenodo.org/record/6622158/files/EnzymeCommission.zip",
           "33f799065f8ad75f87b709a87293bc65"),
    "go": ("GeneOntology", "https://zenodo.org/record/6622158/files/GeneOntology.zip",
           "376be1f088cd1fe720e1eaafb701b5cb"),
}
GO_BRANCHES = {"molecular_function": "go-mf", "biological_process": "go-bp", "cellular_component": "go-cc"}
CUTOFF_COLUMNS = {"<30%": "30", "<40%": "40", "<50%": "50", "<70%": "70", "<95%": "95"}
SPLITS = ("train", "valid", "test")
CHUNK = 2000  # proteins read and encoded together; bounds memory on large sets
EXIT_OK, EXIT_INCOMPLETE, EXIT_FATAL, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_CODES = ("exit status: 0 everything requested was done; 3 finished, but some proteins failed (listed in "
              "summary.json); 2 could not start or nothing to do; 1 --merge while a shard is unfinished")
TINY_HINT = " (--encoders tiny runs small random-init encoders instead: for tests only, the features mean nothing)"


def _opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class ExtractConfig:
    source: str = _opt(None, "where the proteins come from (default: inferred from the one input flag given: "
                       "--fasta, --pdb-dir, --protdescribe, --af-dir with --protdescribe, --data with "
                       "EnzymeCommission / GeneOntology in its name)", choices=SOURCES)
    out: str = _opt(None, "feature set directory (default features/<source>; the demo: "
                    "features/demo-tiny, or demo-real; alphafold: the paired set)")
    modality: tuple = _opt(MODALITIES, "modalities to extract (those a protein lacks input for are left out)",
                           nargs="+", choices=MODALITIES)
    encoders: str = _opt("real", "real: ESM-1b (or --esm-model), GearNet-Edge, PubMedBERT-abs; tiny: small "
                         "random-init models of the same architectures, offline, for tests and the demo only",
                         choices=("real", "tiny"))
    fasta: str = _opt(None, "FASTA file (--source fasta)")
    pdb_dir: str = _opt(None, "directory of structures <id>.pdb|.cif[.gz] (pdb-dir; optional for fasta, "
                        "protdescribe, ec/go with DeepFRI files)")
    protdescribe: str = _opt(None, "ProtST's uniprot_sprot_filtered.tsv (protdescribe, alphafold; gives "
                             "the text of matching ids for fasta / pdb-dir)")
    id_column: str = _opt(None, f"id column of --protdescribe (default: the first of {', '.join(ID_COLUMNS)} "
                          "in its header; none: rows are named row000001, ...)")
    af_dir: str = _opt(None, "AlphaFold DB files AF-<accession>-F1-model_v<k>.pdb[.gz]: a directory, or the "
                       "tar archive itself (e.g. swissprot_pdb_v2.tar; read in place)")
    join: str = _opt("auto", "alphafold: pair AF files with ProtDescribe rows by accession (needs an id column "
                     "of UniProt accessions) or by exact sequence; auto: accession when the id column holds "
                     "accessions, else sequence", choices=("auto", "accession", "sequence"))
    unpaired: bool = _opt(False, "alphafold: also write the unpaired sets seqstr (AF only) and seqfunc "
                          "(ProtDescribe only) next to --out")
    pick: tuple = _opt(None, "alphafold: the paper's pretraining subsets (120000 25000 25000): a seeded random "
                       "choice of PAIRED seq+str+func triplets (-> --out), SEQSTR seq+str proteins from the other "
                       "AF files (-> seqstr/ next to --out) and SEQFUNC seq+func proteins from the other "
                       "ProtDescribe rows (-> seqfunc/), the three disjoint by id and by sequence; the chosen ids "
                       "go to <out>/picks.json",
                       nargs=3, type=int, metavar=("PAIRED", "SEQSTR", "SEQFUNC"))
    seed: int = _opt(0, "random seed of --pick", type=int)
    exclude_similar_to: tuple = _opt(None, "alphafold: leave out every protein whose sequence is identical, or "
                                     "at >= --identity (MMseqs2), to a test chain of these feature sets (e.g. "
                                     "features/ec features/go), before --pick; ids in <out>/excluded_similar.json",
                                     nargs="+", metavar="SET")
    identity: float = _opt(0.95, "sequence identity of --exclude-similar-to (1.0 = identical sequences only, "
                           "no MMseqs2 needed)", type=float)
    data: str = _opt(None, "ec/go: torchdrug's EnzymeCommission.zip / GeneOntology.zip, the directory torchdrug "
                     "or this script extracted it to, or a directory of DeepFRI's files "
                     "(nrPDB-EC_*_annot.tsv, *_train.txt, ...)")
    download: bool = _opt(False, "ec/go: download torchdrug's archive into --data-dir (md5-checked)")
    data_dir: str = _opt("data", "where downloads are stored and archives extracted (also the demo's raw files)")
    demo_n: int = _opt(None, "demo: number of synthetic proteins (default: demo.py's)", type=int)
    esm_model: str = _opt(None, "fair-esm model whose last layer gives the seq features, e.g. "
                          f"{ESM1B_NAME} (the paper's), esm2_t33_650M_UR50D (default: the --esm-weights "
                          f"file's name, as fair-esm names local files, else {ESM1B_NAME})")
    esm_weights: str = _opt(None, "local fair-esm checkpoint (.pt), e.g. esm1b_t33_650M_UR50S.pt: nothing is "
                            "downloaded (default: fair-esm's file, downloaded once into the torch hub cache)")
    gearnet_ckpt: str = _opt(None, "GearNet-Edge weights, e.g. mc_gearnet_edge.pth (needed for real str "
                             "features): a plain state_dict, a torchdrug solver checkpoint {'model': ...} or a "
                             "DDP one ('module.' keys)")
    text_model: str = _opt(PUBMEDBERT, "Hugging Face name or local directory of the text model")
    toks_per_batch: int = _opt(4096, "token budget per ESM / text batch, sorted by length (fair-esm's extract.py)",
                               type=int)
    str_toks_per_batch: int = _opt(1024, "residues per GearNet batch (its line graph grows ~600 edges per "
                                   "residue)", type=int)
    max_len: int = _opt(1022, "residues per protein the encoders see (ESM-1b's limit)", type=int)
    long: str = _opt("crop", "proteins over --max-len: crop to the first max-len residues everywhere, or "
                     "average ESM over overlapping windows (GearNet then sees the whole chain)",
                     choices=("crop", "sliding"))
    on_mismatch: str = _opt("skip", "given sequence disagrees with the structure's residues: skip the "
                            "protein (reported) or use the structure's sequence", choices=("skip", "structure"))
    shard: str = _opt("0/1", "i/n: do only the ids at sorted positions i, i+n, i+2n, ... (i = 0..n-1)")
    merge: bool = _opt(False, "only merge the shard manifests of --out into manifest.tsv")
    overwrite: bool = _opt(False, "recompute files that already exist")
    limit: int = _opt(None, "only the first N ids (sorted), for trial runs", type=int)
    device: str = _opt("auto", "torch device (auto: cuda if available)")


class InputError(ValueError):
    """Bad input for one protein: reported in one line, the run goes on."""


class FatalError(Exception):
    """The run cannot start or has nothing to do: one line, exit status 2."""


def log(msg, err=False):
    tqdm.write(msg, file=sys.stderr if err else sys.stdout)


def progress(iterable, desc, total=None):
    """tqdm bar; when stderr is not a terminal (a log file, a batch job) it updates once a minute at
    most, so redirected logs do not fill with bar updates."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, mininterval=0.1 if tty else 60, maxinterval=10 if tty else 60)


def digest(data):
    """Short checksum (16 hex digits) of bytes or text, for the manifest's provenance columns."""
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=8).hexdigest()


# ----------------------------------------------------------------------------- readers (pure)

def _open(path):
    path = str(path)
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def read_fasta(path):
    """[(id, sequence)] in file order; id = first word of the header line."""
    records, name, chunks = [], None, []
    with _open(path) as f:
        try:
            for line in f:
                line = line.strip()
                if line.startswith(">"):
                    if name is not None:
                        records.append((name, "".join(chunks)))
                    name, chunks = (line[1:].split() or [""])[0], []
                elif line and name is not None:
                    chunks.append(line)
        except UnicodeDecodeError as e:
            raise FatalError(f"{path}: not UTF-8 text ({e})") from None
    if name is not None:
        records.append((name, "".join(chunks)))
    return records


@dataclass
class ProtDescribe:
    """A ProtDescribe TSV as read by read_protdescribe."""
    path: str
    id_column: str          # None: no id column, rows are named row000001, ... by position
    rows: list              # dict(id, sequence, fields={ProteinName, ...}, line)
    longer: int = 0         # rows with more fields than the header (the first ones kept, as ProtST does)
    shorter: int = 0        # rows with fewer fields than the header (the missing ones empty)

    def ids_are_accessions(self):
        """True when most ids look like UniProt accessions (P00698), not entry names (LYSC_CHICK)."""
        if self.id_column is None or not self.rows:
            return False
        sample = self.rows[:1000]
        return sum(bool(UNIPROT_ACCESSION.match(r["id"])) for r in sample) >= 0.9 * len(sample)


def read_protdescribe(path, id_column=None):
    """ProtST's uniprot_sprot_filtered.tsv, read as ProtST's UniProtSeqText.load_tsv reads it: csv with tab
    delimiter, the first row names the fields, and a row with more fields than the header keeps the first
    ones. Fields Sequence, ProteinName, Function, SubcellularLocation, Similarity by name; the id column is
    `id_column`, else the first of ID_COLUMNS in the header, else none (ids row000001, ...)."""
    try:
        return _read_protdescribe(path, id_column)
    except UnicodeDecodeError as e:
        raise FatalError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise FatalError(f"{path}: not a tab-separated table ({e})") from None


def _read_protdescribe(path, id_column):
    csv.field_size_limit(sys.maxsize)
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        if id_column is None:
            id_column = next((c for c in ID_COLUMNS if c in header), None)
        elif id_column not in header:
            raise FatalError(f"{path}: --id-column {id_column!r} is not in the header ({', '.join(header)})")
        if SEQUENCE_FIELD not in header:
            raise FatalError(f"{path}: no column {SEQUENCE_FIELD} in the header ({', '.join(header)}): not "
                             "ProtST's uniprot_sprot_filtered.tsv?")
        table = ProtDescribe(str(path), id_column, [])
        for values in reader:
            if not values:
                continue
            table.longer += len(values) > len(header)
            table.shorter += len(values) < len(header)
            row = dict(zip(header, values[:len(header)]))  # ProtST: "to handle rows with unexpected columns"
            pid = row.get(id_column, "").strip() if id_column else f"row{len(table.rows) + 1:06d}"
            table.rows.append({"id": pid, "sequence": row.get(SEQUENCE_FIELD, "").strip(),
                               "fields": {k: row.get(k, "") for k in TEXT_FIELDS}, "line": reader.line_num})
    if not table.rows:
        raise FatalError(f"{path}: no data rows under the header")
    notes = []
    if table.longer:
        notes.append(f"{table.longer} rows have more fields than the header (the first {len(header)} kept, "
                     "as ProtST does)")
    if table.shorter:
        notes.append(f"{table.shorter} rows have fewer fields than the header (the missing ones are empty)")
    what = f"id column {id_column}" if id_column else "no id column (rows named row000001, ...)"
    log(f"protdescribe: {path}: {len(table.rows)} rows, {what}" + (f"; {'; '.join(notes)}" if notes else ""))
    return table


def read_deepfri_annot(path):
    """DeepFRI's annotation TSV (EC or GO). Returns (terms, labels): terms = {task: [term, ...]} with
    the class index = position, labels = {task: {chain id: [class indices]}}. Tasks: "ec", or
    "go-mf", "go-bp", "go-cc" (the file lists MF, BP, CC in that order). Header blocks:
    '### EC-numbers' / '### GO-terms (<ontology>)' then a row of terms; '### GO-names (...)' then a
    row of names (ignored); '### PDB-chain' then the column names; then one row per chain."""
    terms, labels, columns = {}, {}, None
    with _open(path) as f:
        lines = f.read().splitlines()
    n = 0
    while n < len(lines):
        line = lines[n]
        if line.startswith("### PDB-chain"):
            columns = [_annot_task(c) for c in line.split("\t")[1:]]
            n += 1
            break
        if line.startswith("###"):
            task = _annot_task(line[3:])
            if task is not None and "names" not in line:
                terms[task] = [t for t in lines[n + 1].split("\t") if t]
            n += 2
            continue
        raise ValueError(f"{path}:{n + 1}: expected a '###' header line, got {line[:40]!r}")
    if columns is None:
        raise ValueError(f"{path}: no '### PDB-chain' header line")
    index = {task: {t: i for i, t in enumerate(terms[task])} for task in columns}
    labels = {task: {} for task in columns}
    for lineno, line in enumerate(lines[n:], start=n + 1):
        if not line.strip():
            continue
        values = line.split("\t")
        for task, value in zip(columns, values[1:] + [""] * (len(columns) - len(values) + 1)):
            try:
                labels[task][values[0]] = [index[task][t] for t in value.split(",") if t]
            except KeyError as e:
                raise ValueError(f"{path}:{lineno}: term {e} is not in the {task} term list") from None
    return {task: terms[task] for task in columns}, labels


def _annot_task(text):
    text = text.strip().lower()
    if text.startswith("ec-"):
        return "ec"
    for ontology, task in GO_BRANCHES.items():
        if ontology in text:
            return task
    return None


def read_split(path):
    """Chain ids of a DeepFRI split list (*_train.txt, *_valid.txt, *_test.txt), one per line."""
    with _open(path) as f:
        return [line.strip() for line in f if line.strip()]


def read_test_csv(path):
    """DeepFRI's test CSV (PDB-chain,<30%,<40%,<50%,<70%,<95%) -> {chain: {"30": 0|1, ..., "95": 0|1}};
    1 = kept at that sequence-identity cutoff."""
    with _open(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = [(k, CUTOFF_COLUMNS[h.strip()]) for k, h in enumerate(header) if h.strip() in CUTOFF_COLUMNS]
        return {row[0]: {cut: int(row[k]) for k, cut in cols} for row in reader if row}


# ----------------------------------------------------------------------------- small pure helpers

def check_sequence(seq):
    """The sequence if every letter is one ESM-1b knows; else InputError naming the first bad one."""
    if not seq:
        raise InputError("empty sequence")
    for k, c in enumerate(seq):
        if c not in STANDARD_RESIDUES and c not in EXTRA_RESIDUES:
            hint = " (lowercase is not upper-cased: fix the input)" if c.isalpha() else ""
            raise InputError(f"unknown residue letter {c!r} at position {k + 1}{hint}; allowed: "
                             f"{STANDARD_RESIDUES} and {EXTRA_RESIDUES}")
    return seq


def subsequence_gap(short, long):
    """Index of the first residue of `short` that cannot be matched, in order, in `long` (greedy; 'X'
    in `short` matches anything); None when `short` is a subsequence of `long`."""
    j = 0
    for i, c in enumerate(short):
        while j < len(long) and not (c == long[j] or c == "X"):
            j += 1
        if j == len(long):
            return i
        j += 1
    return None


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


def build_text_ids(fields, encode, cls_id, sep_id, max_field_tokens=128, max_total=512):
    """Token ids [CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4 of ProtST's four fields, in TEXT_FIELDS order.
    `encode(text)` gives a field's ids without special tokens; each field is cut to max_field_tokens,
    empty fields are left out, and the last field is trimmed so the total stays <= max_total."""
    pieces = []
    for name in TEXT_FIELDS:
        text = (fields.get(name) or "").strip()
        ids = list(encode(text))[:max_field_tokens] if text else []
        if ids:
            pieces.append(ids)
    if not pieces:
        raise InputError(f"no text: the fields {', '.join(TEXT_FIELDS)} are all empty")
    out = [cls_id]
    for ids in pieces:
        room = max_total - len(out) - (len(out) > 1)  # a [SEP] precedes every field but the first
        if room <= 0:
            break
        out += ([sep_id] if len(out) > 1 else []) + ids[:room]
    return out


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


def structure_stem(name):
    """'1ABC-A.pdb.gz' -> '1ABC-A'; None for a name that is not a structure file."""
    name = name[:-3] if name.endswith(".gz") else name
    for suffix in STRUCTURE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def index_structures(directory, torchdrug_names=False):
    """{id: path} of the structure files directly in `directory`, id = the file's stem (with
    torchdrug_names, the part before the first '_': '1ABC-A_12.pdb' -> '1ABC-A')."""
    index = {}
    for path in sorted(Path(directory).iterdir()):
        stem = structure_stem(path.name)
        if stem is not None and path.is_file():
            index.setdefault(stem.split("_")[0] if torchdrug_names else stem, path)
    return index


# ----------------------------------------------------------------------------- encoders

TINY_WORDS = """
the of and in to a is by with for from as on or at that this which are be an its it not into
protein proteins enzyme enzymes kinase kinases phosphatase synthase synthetase reductase oxidase
dehydrogenase transferase hydrolase isomerase ligase lyase protease peptidase ribosomal subunit
receptor transporter channel factor domain domains family families subfamily member members belongs
binding binds bind catalyzes catalyzing catalytic activity activation activates inhibits regulation
regulates regulator transcription transcriptional translation replication repair dna rna mrna trna
rrna atp gtp nad nadh nadp nadph coa acid acids amino metal zinc iron magnesium calcium copper heme
membrane membranes cytoplasm cytoplasmic cytosol nucleus nuclear mitochondrion mitochondrial
mitochondria chloroplast plastid secreted extracellular periplasm periplasmic cell wall surface
golgi apparatus endoplasmic reticulum lumen matrix vacuole lysosome peroxisome single pass multi
type i ii iii iv transmembrane integral peripheral side note similarity similar contains sequence
function functions pathway biosynthesis metabolism degradation signaling signal transduction complex
component components cofactor substrate product reaction involved required essential plays role
process processes response stress growth development cell cycle division hydrolysis transport
uptake export import homodimer heterodimer monomer dimer trimer tetramer oligomer interacts
interaction with subunits chain chains alpha beta gamma delta epsilon sigma small large putative
uncharacterized probable hypothetical fragment precursor mature form forms isoform isoforms
specific specifically also may can has have both other some each one two three via during between
through against under upon within without high low level levels expression expressed gene genes
encoded encodes bacterial bacteria viral virus human mouse yeast plant plants serine threonine
tyrosine cysteine histidine lysine arginine glycine alanine proline glutamate aspartate glutamine
methionine sugar glucose phosphate phosphorylation ubiquitin ubiquitination glycosylation lipid
fatty oxidoreductase dehydratase carboxylase decarboxylase aminotransferase methyltransferase
acetyltransferase glycosyltransferase helicase polymerase nuclease endonuclease exonuclease
topoisomerase gyrase ferredoxin cytochrome oxygen electron hydrogen sodium potassium chloride ion
ions water small molecule molecules antibiotic resistance toxin immune defense host
"""
TINY_SUFFIXES = "s es ed ing ase ases ion ions ic al ly ity ated ate ation er ers or ors in ins ein ar".split()


def tiny_vocab():
    """The tiny text encoder's WordPiece vocabulary: BERT's special tokens, single characters (and their
    '##' pieces, so every lowercase ASCII word can be spelled), common biology words and suffixes."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:()[]{}-+/'\"%=<>*_&#@!?~|")
    words = TINY_WORDS.split()
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars[:36]]
             + words + ["##" + s for s in TINY_SUFFIXES])
    return list(dict.fromkeys(vocab))  # a token listed twice would get two ids


# Checkpoints from elsewhere (fair-esm's .pt, GearNet's .pth) are unpickled by SafeUnpickler: every global
# the pickle names is looked up in an allowlist (_safe_globals: torch's own weights_only one -- tensor and storage
# rebuilding, dtypes, OrderedDict, ... -- plus argparse.Namespace, which fair-esm's 'args'/'cfg' are); any
# other global becomes an Unloaded placeholder class: nothing is imported, nothing is called. So a file
# with optimizer state, numpy scalars or classes of someone's training code loads, and a file built to run
# code (os.system in a __reduce__) runs none. torch.load takes it as pickle_module (which requires
# weights_only=False: the allowlist here is the stricter one about code).

class Unloaded:
    """Stands in for an object of a pickled class or function outside SAFE_GLOBALS: whatever the pickle
    passes to it (arguments, state, items) is kept as data, nothing is executed."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.items[len(self.items)] = value

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self):
        return f"<not loaded: {self.qualname}>"


_UNLOADED = {}


def _safe_globals():
    allowed = {"argparse.Namespace": argparse.Namespace, "collections.OrderedDict": OrderedDict,
               "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
               "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
               "torch.Size": torch.Size, "torch.device": torch.device}
    allowed.update({str(t): t for t in (torch.float16, torch.float32, torch.float64, torch.bfloat16,
                                        torch.int64, torch.int32, torch.uint8, torch.bool)})
    try:  # torch's weights_only allowlist (private, present since torch 2.0)
        from torch import _weights_only_unpickler
        allowed.update(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        pass
    return allowed


class SafeUnpickler(pickle.Unpickler):
    safe_globals = None

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if SafeUnpickler.safe_globals is None:
            SafeUnpickler.safe_globals = _safe_globals()
        if key in SafeUnpickler.safe_globals:
            return SafeUnpickler.safe_globals[key]
        if key not in _UNLOADED:
            _UNLOADED[key] = type(f"Unloaded[{key}]", (Unloaded,), {"qualname": key})
        return _UNLOADED[key]


SAFE_PICKLE = types.ModuleType("safe_pickle", "pickle_module for torch.load: SafeUnpickler")
SAFE_PICKLE.Unpickler = SafeUnpickler
SAFE_PICKLE.load = lambda file, **kw: SafeUnpickler(file, **kw).load()


def safe_load(path):
    """torch.load of a checkpoint file through SafeUnpickler, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=SAFE_PICKLE)


def _describe(x):
    return f"a {type(x).__name__}" + (f" with keys {sorted(map(str, x))[:8]}" if isinstance(x, dict) else "")


class SeqEncoder:
    """A fair-esm model; __call__(sequences) -> per-residue [L_i, d] float32 (BOS/EOS rows dropped).
    name / weights: the fair-esm name and the local file it came from ("" for the hub cache)."""

    def __init__(self, model, alphabet, layer, device, name="", weights=""):
        self.model, self.alphabet, self.layer, self.device = model.to(device).eval(), alphabet, layer, device
        self.name, self.weights = name, weights
        self.batch_converter = alphabet.get_batch_converter()
        self.offset = int(alphabet.prepend_bos)

    @torch.no_grad()
    def __call__(self, seqs):
        _, _, tokens = self.batch_converter([(str(k), s) for k, s in enumerate(seqs)])  # (B, T)
        out = self.model(tokens.to(self.device), repr_layers=[self.layer])["representations"][self.layer]
        return [out[k, self.offset:self.offset + len(s)].float().cpu() for k, s in enumerate(seqs)]


class TextEncoder:
    """A BERT tokenizer + model; ids(fields) builds the joined text, __call__(id lists) -> [L'_i, d]."""

    def __init__(self, tokenizer, model, device):
        self.tokenizer, self.model, self.device = tokenizer, model.to(device).eval(), device

    def ids(self, fields):
        def encode(text):
            return self.tokenizer.encode(text, add_special_tokens=False, truncation=True, max_length=128)
        return build_text_ids(fields, encode, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)

    @torch.no_grad()
    def __call__(self, id_lists):
        width = max(len(x) for x in id_lists)
        input_ids = torch.full((len(id_lists), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for k, x in enumerate(id_lists):
            input_ids[k, :len(x)] = torch.tensor(x)
            mask[k, :len(x)] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         token_type_ids=torch.zeros_like(input_ids).to(self.device)).last_hidden_state
        return [out[k, :len(x)].float().cpu() for k, x in enumerate(id_lists)]  # (L'_k, d)


def gearnet_state_dict(path):
    """The GearNet keys, prefix stripped, of a GearNet-Edge checkpoint as GearNet's scripts and torchdrug
    save them: a plain state_dict (script/pretrain.py: torch.save(model.state_dict())), an Engine.save
    solver checkpoint {'model': task state_dict ('model.layers...', 'mlp...'), 'optimizer': ...}, or either
    with DDP's 'module.' prefix. Read with safe_load."""
    sd = safe_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state_dict (dict of tensors), found {_describe(sd)}")
    prefixes = {m.group(1) or "" for k in sd
                if (m := re.match(r"^(.*\.)?layers\.0\.self_loop\.weight$", str(k)))}
    if len(prefixes) != 1:
        raise ValueError(f"expected one GearNet in the state_dict, found {len(prefixes)} "
                         f"('layers.0.self_loop.weight' under {sorted(prefixes) or 'no prefix'})")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- fair-esm models

def esm_model_name(cfg):
    """--esm-model; by default the --esm-weights file's stem (fair-esm's load_model_and_alphabet_local
    names a local model by it), else ESM-1b."""
    if cfg.esm_model:
        return cfg.esm_model
    return Path(cfg.esm_weights).stem if cfg.esm_weights else ESM1B_NAME


def esm_checkpoint(name):
    """Path of fair-esm's checkpoint <name>.pt in the torch hub cache (where fair-esm's own hub loader keeps
    it), downloaded from fair-esm's URL when not there yet (download_url_to_file writes a temporary file and
    renames it, so a broken download leaves none)."""
    if not ESM_NAME.match(name):
        raise FatalError(f"--esm-model {name!r} is not a fair-esm ESM-1b / ESM-1v / ESM-2 name (e.g. {ESM1B_NAME}, "
                         "esm2_t33_650M_UR50D); a local checkpoint goes to --esm-weights PATH")
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"download {ESM_URL.format(name)} -> {path}")
        torch.hub.download_url_to_file(ESM_URL.format(name), str(path), progress=True)
    return path


def load_esm(path, name=ESM1B_NAME):
    """(model, alphabet, layer) of a fair-esm checkpoint file, read with safe_load: only 'args' (ESM-1,
    ESM-1b, ESM-1v: fairseq's Namespace, 'encoder.sentence_encoder.' keys) or 'cfg' (ESM-2: cfg['model'] a
    Namespace) and 'model' are used, whatever else the file holds; built by fair-esm's
    load_model_and_alphabet_core (the format, not the name, picks ESM-2's code). layer = the model's
    last layer. The contact-regression weights are not needed (representations only)."""
    import esm
    data = safe_load(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not ("args" in data or "cfg" in data):
        raise ValueError(f"not a fair-esm checkpoint: expected a dict with 'model' and 'args' (ESM-1b) or 'cfg' "
                         f"(ESM-2), found {_describe(data)}")
    if "cfg" in data:
        cfg = data["cfg"]
        model_cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
        if not isinstance(model_cfg, argparse.Namespace):
            raise ValueError(f"cfg['model'] is {_describe(model_cfg)}, expected an argparse.Namespace (ESM-2 format)")
        payload, core = {"cfg": {"model": model_cfg}, "model": data["model"]}, "esm2"
    else:
        if not isinstance(data["args"], argparse.Namespace):
            raise ValueError(f"'args' is {_describe(data['args'])}, expected an argparse.Namespace (ESM-1b format)")
        payload, core = {"args": data["args"], "model": data["model"]}, name.replace("esm2", "esm1b")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(core, payload, None)
    return model.eval(), alphabet, len(model.layers)


def tiny_esm():
    """(model, alphabet, layer) of the tiny encoder set: an ESM-2 of 6 layers, width 64, seed 0."""
    import esm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        model = esm.model.esm2.ESM2(num_layers=TINY_ESM_LAYER, embed_dim=64, attention_heads=4, alphabet=alphabet)
    return model.eval(), alphabet, TINY_ESM_LAYER


def esm_fix(name, weights):
    """The flag that fixes a failed ESM load."""
    if weights:
        return (f"check --esm-weights {weights}: a fair-esm checkpoint (.pt with 'model' and 'args' or 'cfg'), "
                f"e.g. {ESM_URL.format(name if ESM_NAME.match(name) else ESM1B_NAME)}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if cached.exists():
        return f"the cached {cached} may be damaged: delete it, or pass --esm-weights PATH"
    return (f"no network here? download {ESM_URL.format(name)} elsewhere and pass --esm-weights PATH "
            f"(or put it at {cached})")


def resolve_esm(name, weights=None):
    """(model, alphabet, layer, weights path or "") of a real fair-esm model: from `weights` when given,
    else fair-esm's file in the torch hub cache (downloaded once). FatalError with the full reason and the
    flag that fixes it when it cannot be loaded."""
    try:
        if weights:
            path = Path(weights).resolve()
            model, alphabet, layer = load_esm(path, name)
            m = ESM_NAME.match(name)
            if m and int(m.group(2)) != layer:
                log(f"warning: --esm-weights {weights} holds a {layer}-layer model, the name {name} says "
                    f"{m.group(2)}; its last layer, {layer}, gives the features", err=True)
            return model, alphabet, layer, str(path)
        model, alphabet, layer = load_esm(esm_checkpoint(name), name)
        return model, alphabet, layer, ""
    except FatalError:
        raise
    except Exception as e:  # no network, missing or corrupt file, wrong format: all end the run the same way
        raise FatalError(f"could not load ESM model {name}{f' from {weights}' if weights else ''}: "
                         f"{type(e).__name__}: {full_reason(e)} -- fix: {esm_fix(name, weights)}{TINY_HINT}") from None


def full_reason(e):
    """The whole message of an exception on one line (multi-line messages of transformers / torch joined)."""
    return " ".join(str(e).split()) or "(no message)"


def legacy_esm_name(info):
    """The fair-esm name of an info.json written before esm_model existed (always ESM-1b then)."""
    name = str(info.get("encoders", {}).get("seq", ""))
    return name if ESM_NAME.match(name) else ESM1B_NAME


def is_real_esm(info):
    """True when the feature set's sequence features came from a real fair-esm model (not tiny, not
    demo.py's synthetic features)."""
    return (not info.get("tiny") and not info.get("synthetic")
            and bool(info.get("esm_model") or info.get("encoders", {}).get("seq")))


def load_sequence_encoder(info, esm_weights=None, device="cpu"):
    """(model, alphabet, layer, label): the sequence encoder a feature set's seq features came from, rebuilt
    from its info.json for ESM in the loop (finetune.py --esm finetune). Tiny sets get the tiny ESM-2
    exactly as the tiny extraction builds it; real ones the fair-esm model info["esm_model"] from
    `esm_weights`, else info["esm_weights"], else fair-esm's hub cache / download. FatalError (full reason,
    flag that fixes it) when it cannot be had or does not match the features (layer count, width)."""
    if info.get("synthetic"):
        raise FatalError("the feature set's sequence features are synthetic (demo.py): no sequence encoder made "
                         "them; use --esm frozen, or extract real features")
    if info.get("tiny"):
        model, alphabet, layer = tiny_esm()
        label = TINY_NAMES["seq"]
    else:
        name = info.get("esm_model") or legacy_esm_name(info)
        weights = esm_weights or info.get("esm_weights") or None
        if weights and not Path(weights).exists():
            raise FatalError(f"ESM weights {weights} (from {'--esm-weights' if esm_weights else 'info.json'}) not "
                             f"found: pass --esm-weights PATH of the {name} checkpoint the features were made with")
        model, alphabet, layer, used = resolve_esm(name, weights)
        label = name + (f" ({used})" if used else "")
        want_layer, want_dim = info.get("esm_layer"), info.get("dims", {}).get("seq")
        dim = model.embed_tokens.embedding_dim
        if (want_layer is not None and want_layer != layer) or (want_dim is not None and want_dim != dim):
            raise FatalError(f"{label} has {layer} layers of width {dim}, the features came from layer "
                             f"{want_layer} of width {want_dim}: pass --esm-weights PATH of the model the "
                             "features were made with")
    return model.to(device).eval(), alphabet, layer, label


# ----------------------------------------------------------------------------- loading the encoders

def text_model_name(cfg):
    """--text-model as recorded: a local directory by its absolute path, a hub name as given."""
    path = Path(cfg.text_model).expanduser()
    return str(path.resolve()) if path.is_dir() else cfg.text_model


def encoder_names(cfg):
    if cfg.encoders == "tiny":
        return dict(TINY_NAMES)
    ckpt = Path(cfg.gearnet_ckpt).name if cfg.gearnet_ckpt else "?"
    return {"seq": esm_model_name(cfg), "str": f"gearnet_edge:{ckpt}", "func": text_model_name(cfg)}


def text_fix(cfg):
    path = Path(cfg.text_model).expanduser()
    if path.is_dir():
        return (f"check --text-model {cfg.text_model}: a directory with config.json, vocab.txt (or tokenizer.json) "
                "and the weights (pytorch_model.bin or model.safetensors)")
    if cfg.text_model.startswith(("/", ".", "~")) or cfg.text_model.count("/") > 1:
        return (f"--text-model {cfg.text_model}: no such directory; pass --text-model DIR of a local copy of "
                f"{PUBMEDBERT} (config.json, vocab.txt, weights)")
    return (f"no network here (or HF_HUB_OFFLINE=1)? download {cfg.text_model} elsewhere (e.g. `hf download "
            f"{cfg.text_model} --local-dir DIR`) and pass --text-model DIR")


def load_text_model(name):
    """(tokenizer, model) of a Hugging Face BERT-style model; the pooler, unused, is not built for BERT."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "weights not used: cls.predictions..." is expected
    try:
        config = AutoConfig.from_pretrained(name)
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_encoder(modality, cfg, device):
    """The encoder of one modality, loaded on first need. Weights that cannot be had raise FatalError
    with the full reason and the flag that fixes it (--esm-weights, --text-model, --gearnet-ckpt)."""
    tiny = cfg.encoders == "tiny"
    if modality == "seq":
        if tiny:
            model, alphabet, layer = tiny_esm()
            return SeqEncoder(model, alphabet, layer, device, TINY_NAMES["seq"])
        name = esm_model_name(cfg)
        model, alphabet, layer, weights = resolve_esm(name, cfg.esm_weights)
        log(f"sequence encoder: {name}{f' from {weights}' if weights else ''}, layer {layer} of {layer}")
        return SeqEncoder(model, alphabet, layer, device, name, weights)
    if modality == "str":
        if tiny:
            return gearnet.tiny_gearnet(seed=0).to(device).eval()
        if not cfg.gearnet_ckpt:
            raise FatalError("real structure features need --gearnet-ckpt PATH (GearNet-Edge weights such as "
                             "mc_gearnet_edge.pth from the GearNet repository)" + TINY_HINT)
        try:
            model = gearnet.GearNetEdge.from_state_dict(gearnet_state_dict(cfg.gearnet_ckpt))
        except Exception as e:
            raise FatalError(f"could not load GearNet-Edge from {cfg.gearnet_ckpt}: {type(e).__name__}: "
                             f"{full_reason(e)} -- fix: pass --gearnet-ckpt PATH of a GearNet-Edge state_dict "
                             "(plain, torchdrug solver {'model': ...} or DDP)" + TINY_HINT) from None
        return model.to(device).eval()
    if tiny:
        from transformers import BertConfig, BertModel, BertTokenizerFast
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
            tokenizer = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=96, max_position_embeddings=512)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertModel(config, add_pooling_layer=False)
        return TextEncoder(tokenizer, model, device)
    try:
        tokenizer, model = load_text_model(cfg.text_model)
    except Exception as e:  # no network, missing cache, corrupt file: all end the run the same way
        raise FatalError(f"could not load the text model {cfg.text_model}: {type(e).__name__}: {full_reason(e)} "
                         f"-- fix: {text_fix(cfg)}{TINY_HINT}") from None
    return TextEncoder(tokenizer, model, device)





# ----------------------------------------------------------------------------- proteins and their files

@dataclass(frozen=True)
class ArchiveMember:
    """A structure file inside an uncompressed tar archive (AlphaFold DB's swissprot_pdb_v<k>.tar), read
    in place: its data are `size` bytes at `offset`."""
    archive: Path
    name: str
    offset: int
    size: int

    def __str__(self):
        return f"{self.archive}::{self.name}"


def tar_members(archive):
    """(base name, ArchiveMember) of every regular file in an uncompressed tar, in archive order. Only
    the headers are read (the member list is dropped as it grows, so memory stays flat)."""
    try:
        with tarfile.open(archive, "r:") as tf:
            for member in tf:
                if member.isfile():
                    yield Path(member.name).name, ArchiveMember(Path(archive), member.name, member.offset_data,
                                                                member.size)
                tf.members = []
    except tarfile.ReadError as e:
        raise FatalError(f"{archive}: not an uncompressed tar archive ({e}); AlphaFold DB's "
                         "swissprot_pdb_v<k>.tar is one (its members are .pdb.gz)") from None


def structure_name(ref):
    return Path(ref.name if isinstance(ref, ArchiveMember) else ref).name


def structure_bytes(ref):
    """The content of a structure file (a path or an ArchiveMember), gunzipped when its name ends in .gz."""
    if isinstance(ref, ArchiveMember):
        with open(ref.archive, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise EOFError(f"{ref.archive} ends inside member {ref.name}")
    else:
        data = Path(ref).read_bytes()
    return gzip.decompress(data) if structure_name(ref).endswith(".gz") else data


def read_structure(ref):
    """gearnet.read_structure of a path or an ArchiveMember, plus "sha" (checksum of the file's content),
    with every way a file can be unreadable (bad content, missing columns, cut short, corrupt gzip, I/O,
    not text) turned into one InputError naming the file."""
    try:
        data = structure_bytes(ref)
        s = gearnet.read_structure(str(ref), text=data.decode())
    except gearnet.StructureError as e:
        raise InputError(str(e)) from None
    # UnicodeDecodeError is a ValueError, gzip.BadGzipFile an OSError
    except (OSError, ValueError, IndexError, KeyError, EOFError, zlib.error, tarfile.TarError) as e:
        raise InputError(f"{ref}: unreadable structure ({type(e).__name__}: {e})") from None
    s["sha"] = digest(data)
    return s


def has_text(fields):
    return fields is not None and any((fields.get(k) or "").strip() for k in TEXT_FIELDS)


@dataclass
class Protein:
    id: str
    sequence: str = None      # given sequence (FASTA / TSV), None when only a structure exists
    structure: object = None  # structure file: a Path or an ArchiveMember
    fields: dict = None       # ProtDescribe text fields
    # set by prepare():
    seq: str = ""             # what the sequence encoder sees
    graph_input: dict = None  # read_structure dict, cropped like seq
    L_full: int = 0
    chain: str = ""
    modalities: tuple = ()
    text_ids: list = None
    shapes: dict = field(default_factory=dict)
    sha: dict = field(default_factory=dict)  # modality -> checksum of what its features are computed from
    note: str = ""            # a modality left out for lack of input (listed in the summary)


def prepare(p, cfg, modalities):
    """Read and check one protein's inputs; InputError (one line) when they are unusable. Sets p.sha:
    seq = the sequence the encoder sees (+ the window setting when --long sliding applies), str = the
    structure file's content + the residues used, func = the four text fields."""
    if not p.id or "/" in p.id or p.id.startswith("."):
        raise InputError(f"id {p.id!r} cannot be a file name")
    seq, structure_sha = p.sequence, ""
    if p.structure is not None:
        s = read_structure(p.structure)
        if seq is not None and seq != s["sequence"]:
            gap = subsequence_gap(s["sequence"], seq)
            if gap is not None:
                what = (f"sequence mismatch: {structure_name(p.structure)} residue {gap + 1} ({s['residue_ids'][gap]} "
                        f"{s['sequence'][gap]}) is not in the given sequence in order")
                if cfg.on_mismatch == "skip":
                    raise InputError(what + " (--on-mismatch structure uses the structure's sequence)")
                log(f"warning: {p.id}: {what}; using the structure's sequence", err=True)
        seq, p.chain, structure_sha = s["sequence"], s["chain"], s["sha"]
        p.graph_input = {k: s[k] for k in ("residue_type", "ca", "chain_index")}
    if seq is None:
        raise InputError("no sequence and no structure")
    check_sequence(seq)
    p.L_full = len(seq)
    if cfg.long == "crop" and len(seq) > cfg.max_len:
        seq = seq[:cfg.max_len]
        if p.graph_input is not None:
            p.graph_input = {k: v[:cfg.max_len] for k, v in p.graph_input.items()}
    p.seq = seq
    p.sha["seq"] = digest(seq if len(seq) <= cfg.max_len else f"{seq}|windows{cfg.max_len}")
    if p.graph_input is not None:
        p.sha["str"] = digest(f"{structure_sha}|{len(p.graph_input['ca'])}")
    text = has_text(p.fields)
    if text:
        p.sha["func"] = digest(json.dumps([p.fields.get(k) or "" for k in TEXT_FIELDS]))
    if "func" in modalities and p.fields is not None and not text:
        p.note = f"no text (the fields {', '.join(TEXT_FIELDS)} are all empty): func left out"
    has = {"seq": True, "str": p.graph_input is not None, "func": text}
    p.modalities = tuple(m for m in MODALITIES if m in modalities and has[m])
    return p


def save_tensor(x, path):
    """float16 copy of x written to a temporary file next to path, then renamed over it; InputError
    (nothing written) when a value is NaN or infinite, from the encoder or beyond float16's 65504."""
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise InputError(f"the encoder gave {bad} non-finite values (NaN or inf) in [{', '.join(map(str, x.shape))}]"
                         "; nothing written")
    y = x.to(torch.float16).contiguous().clone()
    if not torch.isfinite(y).all():
        raise InputError(f"a value is not finite in float16 (max |value| "
                         f"{x.detach().float().abs().max().item():.4g}; float16 holds up to 65504); nothing written")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(y, tmp)
    os.replace(tmp, path)


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


def write_text_atomic(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)




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
                check_existing(out / m / f"{pid}.pt", None if m == "func" else int(r["L"]))
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
            dims[m] = check_existing(out / m / f"{row['id']}.pt")[1]
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
        try:
            reps = encoder([jobs[j][1][a:b] for j, a, b in segs])
        except Exception as e:  # e.g. out of memory: these proteins fail, the run goes on
            for j, _, _ in segs:
                fail(jobs[j][0], f"{desc}: {type(e).__name__}: {full_reason(e)}")
            continue
        for (j, a, b), rep in zip(segs, reps):
            if j not in sums:
                sums[j] = rep.new_zeros(len(jobs[j][1]), rep.shape[1])
                counts[j] = rep.new_zeros(len(jobs[j][1]), 1)
            sums[j][a:b] += rep
            counts[j][a:b] += 1
            remaining[j] -= 1
            if remaining[j] == 0:
                save(jobs[j][0], sums.pop(j) / counts.pop(j))


def encode_batches(encode, proteins, lengths, budget, desc, save, fail):
    """Length-sorted batches under a token budget through `encode(group) -> [features]`; a batch that
    fails (e.g. out of memory) fails its proteins and the run goes on."""
    for batch in progress(token_batches(lengths, budget), desc):
        group = [proteins[k] for k in batch]
        try:
            feats = encode(group)
        except Exception as e:
            for p in group:
                fail(p, f"{desc}: {type(e).__name__}: {full_reason(e)}")
            continue
        for p, x in zip(group, feats):
            save(p, x)


def encode_structures(model, proteins, cfg, save, fail):
    """GearNet features; the graphs are built on the CPU (gearnet.protein_graph) and the packed batch
    moves to the model's device once (gearnet.encode_structures)."""
    encode_batches(lambda group: gearnet.encode_structures(model, [p.graph_input for p in group]), proteins,
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


def extract_set(proteins, out, cfg, modalities, source, label_sets=(), encoders=None):
    """Extract one feature set; returns the summary dict. `encoders` caches loaded models by modality.
    FatalError when there is nothing to do or no protein is usable (the summary is written first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_info(out, cfg, modalities)
    for labels in label_sets:
        write_labels(out, **labels)
    encoders = {} if encoders is None else encoders
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    shard_i, shard_n = parse_shard(cfg.shard)
    names = encoder_names(cfg)

    by_id, duplicates = {}, Counter()
    for p in proteins:
        if p.id in by_id:
            duplicates[p.id] += 1
        else:
            by_id[p.id] = p
    if duplicates:
        log(f"warning: {len(duplicates)} ids occur more than once ({', '.join(list(duplicates)[:5])}...); "
            "the first occurrence of each is used", err=True)
    ids = sorted(by_id)[:cfg.limit] if cfg.limit else sorted(by_id)
    todo = [by_id[x] for x in shard_ids(ids, shard_i, shard_n)]
    shard_note = f" (shard {shard_i}/{shard_n})" if shard_n > 1 else ""
    if not todo:
        raise FatalError(f"{out}: no proteins to extract{shard_note} ({len(by_id)} ids in the input"
                         f"{f', --limit {cfg.limit}' if cfg.limit else ''})")
    log(f"{out}: {len(todo)} proteins{shard_note}, modalities {' '.join(modalities)}, from {source}")
    manifest = out / (f"manifest.shard-{shard_i}-of-{shard_n}.tsv" if shard_n > 1 else "manifest.tsv")
    previous = previous_rows(out)
    same_encoders = not encoder_clash(out, names)
    # rows of this manifest for ids not handled yet: kept while the run goes on, so a killed run keeps them
    pending_rows = read_manifest_rows(manifest) if same_encoders else {}

    def fail(p, reason):
        pid = p if isinstance(p, str) else p.id
        if pid not in failed:
            failed[pid] = reason
            log(f"error: {pid}: {reason}", err=True)

    failed, rewritten, recomputed, notes, rows, done, skipped = {}, {}, {}, {}, [], 0, 0
    for start in range(0, len(todo), CHUNK):
        ready = []
        for p in progress(todo[start:start + CHUNK], "inputs"):
            try:
                ready.append(prepare(p, cfg, modalities))
            except InputError as e:
                fail(p, str(e))
                continue
            if p.note:
                notes[p.id] = p.note
        pending = {m: [] for m in MODALITIES}
        for p in ready:
            for m in p.modalities:
                path = out / m / f"{p.id}.pt"
                if path.exists() and not cfg.overwrite:
                    why = stale_reason(p, m, previous, names)
                    if why is None:
                        try:
                            p.shapes[m] = check_existing(path, None if m == "func" else len(p.seq))
                            continue
                        except ValueError as e:
                            rewritten[p.id] = str(e)
                            log(f"warning: {p.id}: existing {m} file is corrupt, rewriting ({e})", err=True)
                    else:
                        recomputed.setdefault(p.id, []).append(f"{m}: {why}")
                pending[m].append(p)
        for m in MODALITIES:
            if pending[m] and m not in encoders:
                encoders[m] = load_encoder(m, cfg, device)
        for p in pending["func"]:
            try:
                p.text_ids = encoders["func"].ids(p.fields)
            except InputError as e:
                fail(p, str(e))
        pending = {m: [p for p in ps if p.id not in failed] for m, ps in pending.items()}

        def saver(m):
            def save(p, x):
                try:
                    save_tensor(x, out / m / f"{p.id}.pt")
                except InputError as e:
                    fail(p, f"{m}: {e}")
                    return
                p.shapes[m] = tuple(x.shape)
            return save
        if pending["seq"]:
            jobs = [(p, p.seq) for p in pending["seq"]]
            encode_residues(encoders["seq"], jobs, cfg, saver("seq"), fail, "seq")
        if pending["str"]:
            encode_structures(encoders["str"], pending["str"], cfg, saver("str"), fail)
        if pending["func"]:
            encode_texts(encoders["func"], pending["func"], cfg, saver("func"), fail)
        busy = {p.id for ps in pending.values() for p in ps}
        for p in ready:
            pending_rows.pop(p.id, None)
            if p.id in failed:
                continue
            rows.append(manifest_row(p, names))
            done, skipped = done + (p.id in busy), skipped + (p.id not in busy)
        for p in todo[start:start + CHUNK]:
            pending_rows.pop(p.id, None)
        if start + CHUNK < len(todo):  # progress so far, for a run that gets killed
            write_manifest(manifest, rows + list(pending_rows.values()))

    # manifest, info, summary
    for m in modalities:
        if rows and not any(m in r["modalities"].split(",") for r in rows):
            log(f"warning: no protein of {out} ({'this shard' if shard_n > 1 else 'this run'}) has {m} input "
                f"({'structure' if m == 'str' else 'text'}); {m} is left out", err=True)
    if same_encoders:  # rows of earlier runs (other --limit, other ids) whose files are still valid stay
        rows += kept_rows(out, read_manifest_rows(manifest), {p.id for p in todo})
    old_info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    base = {"tiny": cfg.encoders == "tiny", "synthetic": False, "source": source, "max_len": cfg.max_len,
            "long": cfg.long, **esm_info(cfg, encoders.get("seq"), old_info), "text_fields": list(TEXT_FIELDS)}
    if "seq" not in modalities and "seq" not in old_info.get("dims", {}):
        base.update(esm_model="", esm_weights="", esm_layer=None)
    info = write_info(out, rows, names, base, union=shard_n > 1 and same_encoders)
    write_manifest(manifest, rows)
    if shard_n > 1:
        merge_shards(out, shard_n, names)
    summary = {"out": str(out), "shard": f"{shard_i}/{shard_n}", "proteins": len(todo), "done": done,
               "skipped": skipped, "recomputed": {k: "; ".join(v) for k, v in sorted(recomputed.items())},
               "failed": dict(sorted(failed.items())), "rewritten": rewritten,
               "notes": dict(sorted(notes.items())), "duplicate_ids": sorted(duplicates),
               "tiny": cfg.encoders == "tiny", "encoders": info["encoders"],
               "exit_status": EXIT_PARTIAL if failed else EXIT_OK}
    name = f"summary.shard-{shard_i}-of-{shard_n}.json" if shard_n > 1 else "summary.json"
    if done + skipped == 0:
        summary["exit_status"] = EXIT_FATAL
    write_text_atomic(out / name, json.dumps(summary, indent=1))
    print_summary(summary, out / name)
    if done + skipped == 0:
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
    for pid, note in list(s["notes"].items())[:5]:
        log(f"  note {pid}: {note}")
    if len(s["notes"]) > 5:
        log(f"  ... {len(s['notes']) - 5} more notes in {path}")
    if s["tiny"]:
        log("  TINY random-init encoders: these features only exercise the pipeline, they mean nothing")
    if s["failed"]:
        log(f"  exit status {EXIT_PARTIAL}: {len(s['failed'])} proteins failed (reasons in {path})", err=True)


# ----------------------------------------------------------------------------- sources

def texts_by_id(cfg):
    if not cfg.protdescribe:
        return {}
    return {r["id"]: r["fields"] for r in read_protdescribe(cfg.protdescribe, cfg.id_column).rows}


def require(cfg, *names):
    for name in names:
        if not getattr(cfg, name):
            raise FatalError(f"--source {cfg.source} needs --{name.replace('_', '-')}")


def structures_in(directory, what, required=True):
    """index_structures(directory); FatalError when it holds none and `required` (what: the flag)."""
    index = index_structures(directory)
    if not index:
        message = (f"{what} {directory}: no structure files (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz) "
                   "directly in it")
        if required:
            raise FatalError(message)
        log(f"warning: {message}; no protein gets str features", err=True)
    return index


def proteins_fasta(cfg):
    require(cfg, "fasta")
    records = read_fasta(cfg.fasta)
    if not records:
        raise FatalError(f"--fasta {cfg.fasta}: no FASTA records (no line starts with '>')")
    structures = structures_in(cfg.pdb_dir, "--pdb-dir", required=False) if cfg.pdb_dir else {}
    texts = texts_by_id(cfg)
    return [Protein(pid, sequence=seq, structure=structures.get(pid), fields=texts.get(pid)) for pid, seq in records]


def proteins_pdb_dir(cfg):
    require(cfg, "pdb_dir")
    structures = structures_in(cfg.pdb_dir, "--pdb-dir")
    texts = texts_by_id(cfg)
    return [Protein(pid, structure=path, fields=texts.get(pid)) for pid, path in structures.items()]


def proteins_protdescribe(cfg):
    require(cfg, "protdescribe")
    structures = structures_in(cfg.pdb_dir, "--pdb-dir", required=False) if cfg.pdb_dir else {}
    return [Protein(r["id"], sequence=r["sequence"], structure=structures.get(r["id"]), fields=r["fields"])
            for r in read_protdescribe(cfg.protdescribe, cfg.id_column).rows]


AF_NAME = re.compile(r"^AF-(.+)-F1-model_v(\d+)\.(pdb|cif)(\.gz)?$")


def alphafold_files(af_dir):
    """{accession: structure} of the newest AF-<acc>-F1-model_v<k> file per accession, from a directory
    (as torchdrug's utils.extract leaves swissprot_pdb_v2.tar: .pdb.gz and their .pdb side by side) or
    from the tar archive itself (members read in place)."""
    source = Path(af_dir)
    if source.is_dir():
        entries = ((path.name, path) for path in sorted(source.iterdir()))
    elif source.is_file():
        entries = tar_members(source)
    else:
        raise FatalError(f"--af-dir {af_dir}: no such directory or tar archive")
    best = {}
    for name, ref in entries:
        m = AF_NAME.match(name)
        if m:
            # newest version first; then .pdb.gz before .pdb before .cif (torchdrug reads the .pdb.gz)
            rank = (int(m.group(2)), m.group(3) == "pdb", bool(m.group(4)))
            if m.group(1) not in best or rank > best[m.group(1)][0]:
                best[m.group(1)] = (rank, ref)
    if not best:
        raise FatalError(f"--af-dir {af_dir}: no AlphaFold DB files (AF-<accession>-F1-model_v<k>.pdb[.gz] or "
                         ".cif[.gz])")
    versions = Counter(rank[0] for rank, _ in best.values())
    log(f"alphafold: {len(best)} accessions in {af_dir} (model versions: "
        f"{', '.join(f'v{v}: {n}' for v, n in sorted(versions.items()))})")
    return {acc: ref for acc, (_, ref) in best.items()}


def choose_join(cfg, table):
    """"accession" or "sequence" for --join (auto: accession when the id column holds UniProt accessions)."""
    if cfg.join == "accession" and table.id_column is None:
        raise FatalError(f"--join accession: {table.path} has no id column ({', '.join(ID_COLUMNS)}); name it "
                         "with --id-column, or use --join sequence")
    if cfg.join != "auto":
        return cfg.join
    if table.ids_are_accessions():
        return "accession"
    why = (f"its id column {table.id_column} holds entry names, not accessions (e.g. {table.rows[0]['id']})"
           if table.id_column else "it has no id column")
    log(f"alphafold: joining by exact sequence ({table.path}: {why})")
    return "sequence"


def alphafold_sets(cfg):
    """AlphaFold DB x ProtDescribe: {"paired", "seqstr" (AF only), "seqfunc" (ProtDescribe only)} lists of
    Proteins, the accessions left out (sequences disagree, unreadable files), the join used and the
    ProtDescribe table. FatalError when nothing pairs."""
    require(cfg, "af_dir", "protdescribe")
    af = alphafold_files(cfg.af_dir)
    table = read_protdescribe(cfg.protdescribe, cfg.id_column)
    join = choose_join(cfg, table)
    sets, left_out, same_id = {"paired": [], "seqstr": [], "seqfunc": []}, {}, 0
    if join == "accession":
        by_id = {}
        for r in table.rows:
            by_id.setdefault(r["id"], r)
        for acc, ref in progress(sorted(af.items()), "join"):
            r = by_id.get(acc)
            if r is None:
                sets["seqstr"].append(Protein(acc, structure=ref))
                continue
            try:
                af_seq = read_structure(ref)["sequence"]
            except InputError as e:
                left_out[acc] = f"unreadable: {e}"
                continue
            if af_seq != r["sequence"]:
                left_out[acc] = f"AF sequence ({len(af_seq)} aa) != ProtDescribe Sequence ({len(r['sequence'])} aa)"
                continue
            sets["paired"].append(Protein(acc, sequence=r["sequence"], structure=ref, fields=r["fields"]))
        used = {p.id for p in sets["paired"]} | set(left_out)
        sets["seqfunc"] = [Protein(r["id"], sequence=r["sequence"], fields=r["fields"])
                           for r in table.rows if r["id"] not in af]
        pd_paired = sum(r["id"] in used and r["id"] not in left_out for r in table.rows)
    else:
        by_seq = {}
        for r in table.rows:
            by_seq.setdefault(r["sequence"], []).append(r)
        paired_seqs = set()
        for acc, ref in progress(sorted(af.items()), "join"):
            try:
                af_seq = read_structure(ref)["sequence"]
            except InputError as e:
                left_out[acc] = f"unreadable: {e}"
                continue
            rows = by_seq.get(af_seq)
            if not rows:
                sets["seqstr"].append(Protein(acc, sequence=af_seq, structure=ref))
                continue
            r = next((x for x in rows if x["id"] == acc), rows[0])  # the row of the same accession, if any
            same_id += r["id"] == acc
            sets["paired"].append(Protein(acc, sequence=af_seq, structure=ref, fields=r["fields"]))
            paired_seqs.add(af_seq)
        sets["seqfunc"] = [Protein(r["id"], sequence=r["sequence"], fields=r["fields"])
                           for r in table.rows if r["sequence"] not in paired_seqs]
        pd_paired = len(table.rows) - len(sets["seqfunc"])
    key = f"accession ({table.id_column})" if join == "accession" else "exact sequence"
    log(f"alphafold: join by {key}: {len(af)} AF files x {len(table.rows)} ProtDescribe rows -> paired "
        f"{len(sets['paired'])} AF files with {pd_paired} ProtDescribe rows"
        + (f" ({same_id} of them also by id)" if join == "sequence" and table.id_column else "")
        + f"; AF only {len(sets['seqstr'])}, ProtDescribe only {len(sets['seqfunc'])}, "
        f"left out {len(left_out)} (sequences disagree or unreadable)")
    for acc, why in list(left_out.items())[:10]:
        log(f"  left out {acc}: {why}")
    if not sets["paired"]:
        example_af, example_pd = sorted(af)[0], table.rows[0]["id"]
        hint = (f"AF accessions (e.g. {example_af}) are not in column {table.id_column} (e.g. {example_pd}); if it "
                "holds entry names (LYSC_CHICK) rather than accessions (P00698), use --join sequence"
                if join == "accession" else "no AF sequence equals a ProtDescribe Sequence (other UniProt release?)")
        if left_out:
            hint += f"; {len(left_out)} accessions matched but were left out ({next(iter(left_out.values()))})"
        raise FatalError(f"alphafold: {cfg.af_dir} and {cfg.protdescribe} pair no protein: {hint}")
    return sets, left_out, join, table


def pick_sets(sets, table, counts, seed):
    """The paper's pretraining subsets: seeded random choices of counts = (paired, seqstr, seqfunc) proteins,
    disjoint by id and by sequence (where known): paired triplets from the pairs; seq+str from the other
    AF files (their text unused); seq+func from the other ProtDescribe rows (their structure unused).
    Returns (picked sets, picks.json content)."""
    rng = random.Random(seed)

    def sample(pool, k, name):
        pool = sorted({p.id: p for p in reversed(pool)}.values(), key=lambda p: p.id)  # one per id
        if k > len(pool):
            log(f"warning: --pick asks for {k} {name} proteins, {len(pool)} are available: all taken", err=True)
        return rng.sample(pool, min(k, len(pool)))

    paired = sample([p for p in sets["paired"] if has_text(p.fields)], counts[0], "paired")
    used_ids, used_seqs = {p.id for p in paired}, {p.sequence for p in paired}
    seqstr_pool = [Protein(p.id, sequence=p.sequence, structure=p.structure) for p in sets["paired"]] + sets["seqstr"]
    seqstr = sample([p for p in seqstr_pool if p.id not in used_ids and p.sequence not in used_seqs], counts[1],
                    "seq+str")
    used_ids |= {p.id for p in seqstr}
    used_seqs |= {p.sequence for p in seqstr if p.sequence}
    seqfunc_pool = [Protein(r["id"], sequence=r["sequence"], fields=r["fields"]) for r in table.rows
                    if has_text(r["fields"])]
    seqfunc = sample([p for p in seqfunc_pool if p.id not in used_ids and p.sequence not in used_seqs], counts[2],
                     "seq+func")
    picked = {"paired": paired, "seqstr": seqstr, "seqfunc": seqfunc}
    record = {"seed": seed, "requested": dict(zip(picked, counts)), "chosen": {k: len(v) for k, v in picked.items()},
              **{k: sorted(p.id for p in v) for k, v in picked.items()}}
    log(f"pick (seed {seed}): paired {len(paired)}, seq+str {len(seqstr)}, seq+func {len(seqfunc)}")
    return picked, record


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_extract(zip_path, dest):
    """Extract a zip into dest, refusing members that would land outside it; returns the members'
    common top-level folder (dest itself when there is none)."""
    dest = Path(dest).resolve()
    marker = dest / f".extracted-{Path(zip_path).name}"
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        if not marker.exists():
            for name in names:
                if not (dest / name).resolve().is_relative_to(dest):
                    raise FatalError(f"{zip_path}: member {name!r} points outside {dest}")
            z.extractall(dest)
            marker.touch()
    tops = {n.split("/")[0] for n in names}
    return dest / tops.pop() if len(tops) == 1 and all("/" in n for n in names) else dest


def fetch_archive(cfg, kind):
    """Path to torchdrug's archive for kind ("ec"/"go"): downloaded (--download) or --data; md5-checked."""
    name, url, md5 = TORCHDRUG_ZIPS[kind]
    data_dir = Path(cfg.data_dir)
    zip_path = Path(cfg.data) if cfg.data else data_dir / f"{name}.zip"
    if cfg.download and not (zip_path.exists() and md5sum(zip_path) == md5):
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = zip_path.with_name(zip_path.name + ".part")
        log(f"download {url} -> {zip_path}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise FatalError(f"could not download {url} ({type(e).__name__}: {e}); no network here? fetch it "
                             "elsewhere and pass --data PATH") from None
        os.replace(tmp, zip_path)
    if cfg.download or zip_path.name == f"{name}.zip":  # a download is always checked, whatever its name
        found = md5sum(zip_path)
        if found != md5:
            raise FatalError(f"{zip_path}: md5 {found} is not torchdrug's published {md5} (a partial download? "
                             "delete it and run again with --download)")
    return zip_path


def find_annotation(root, tag):
    """The one *-<tag>*_annot.tsv at the shallowest depth (0-2) under root: DeepFRI's directory, torchdrug's
    extracted <Name>/ (annotation in <Name>/<Name>/), or the folder torchdrug downloads into."""
    for depth in range(3):
        found = sorted(root.glob("*/" * depth + f"*-{tag}*_annot.tsv"))
        if len(found) == 1:
            return found[0]
        if found:
            raise FatalError(f"{root}: expected one *-{tag}*_annot.tsv, found {[str(a) for a in found]}")
    raise FatalError(f"{root}: no *-{tag}*_annot.tsv in it or two folders below (expected DeepFRI's files, e.g. "
                     f"nrPDB-{tag}_*_annot.tsv, or torchdrug's archive or the folder it extracts it to)")


def split_structures(base, split):
    """{chain id: path} of torchdrug's split folder: train.zip as torchdrug's utils.extract leaves it
    (train/train/*.pdb: the zip's members are train/*.pdb, extracted into a folder named after the zip),
    or train/*.pdb (this kit before it extracted like torchdrug); the zip is extracted torchdrug's way when
    neither exists. None when the split has no folder and no zip (DeepFRI's layout: *_train.txt)."""
    for _ in range(2):
        for folder in (base / split / split, base / split):
            index = index_structures(folder, torchdrug_names=True) if folder.is_dir() else {}
            if index:
                return index
        if not (base / f"{split}.zip").exists():
            break
        safe_extract(base / f"{split}.zip", base / split)
    return {} if (base / split).is_dir() or (base / f"{split}.zip").exists() else None


def task_files(cfg, kind):
    """Locate the annotation, splits, test CSV, sequences and structures of the EC or GO set, in
    torchdrug's layout (<Name>/nrPDB-EC_annot.tsv, train.zip -> train/train/<PDB>-<chain>_*.pdb, ...) or
    DeepFRI's (nrPDB-EC_2020.04_annot.tsv, *_train.txt, *_valid.txt, *_test.txt, *_test.csv,
    *_sequences.fasta). FatalError when a split is empty."""
    if not (cfg.data or cfg.download):
        raise FatalError(f"--source {cfg.source} needs --data PATH (zip or directory) or --download")
    root = Path(cfg.data) if cfg.data else None
    if cfg.download or root.suffix == ".zip":
        zip_path = fetch_archive(cfg, kind)
        root = safe_extract(zip_path, Path(cfg.data_dir) / zip_path.stem)  # as torchdrug: X.zip -> X/
    elif not root.is_dir():
        raise FatalError(f"--data {root}: no such directory or .zip file")
    tag = kind.upper()
    annot = find_annotation(root, tag)
    base = annot.parent

    def one(pattern):
        found = sorted(base.glob(pattern))
        if len(found) != 1:
            raise FatalError(f"{base}: expected one {pattern}, found {[f.name for f in found] or 'none'}")
        return found[0]
    files = {"annot": annot, "test_csv": one(f"*-{tag}*_test.csv"), "splits": {}, "structures": {},
             "fastas": sorted(base.glob(f"*-{tag}*sequences.fasta")), "source": "deepfri"}
    for split in SPLITS:
        index = split_structures(base, split)
        if index is None:
            files["splits"][split] = read_split(one(f"*-{tag}*_{split}.txt"))
        else:  # torchdrug: the folder is the split
            files["splits"][split] = sorted(index)
            files["structures"].update(index)
            files["source"] = "torchdrug"
    counts = "/".join(str(len(files["splits"][s])) for s in SPLITS)
    empty = [s for s in SPLITS if not files["splits"][s]]
    if empty:
        raise FatalError(f"{base}: {kind} splits train/valid/test {counts}: {', '.join(empty)} empty -- expected "
                         f"torchdrug's <split>.zip or <split>/<split>/*.pdb (as torchdrug extracts it), or "
                         f"DeepFRI's *_<split>.txt; a half-extracted folder? delete it and run again")
    if cfg.pdb_dir:
        for pid, path in index_structures(cfg.pdb_dir, torchdrug_names=True).items():
            files["structures"].setdefault(pid, path)
    return files


def task_proteins(cfg, kind, label_source=None, texts=None):
    """Proteins of the EC/GO splits that have a sequence or a structure, and their label sets."""
    files = task_files(cfg, kind)
    try:
        terms, labels = read_deepfri_annot(files["annot"])
        test_identity = read_test_csv(files["test_csv"])
    except (ValueError, KeyError, IndexError) as e:
        raise FatalError(f"{files['annot'].parent}: malformed annotation or test CSV "
                         f"({type(e).__name__}: {e})") from None
    splits = files["splits"]
    sequences = {pid: seq for fasta in files["fastas"] for pid, seq in read_fasta(fasta)}
    label_sets = [dict(task=task, terms=terms[task], labels=labels[task], splits=splits,
                       test_identity=test_identity, source=label_source or files["source"]) for task in terms]
    ids = [x for s in SPLITS for x in splits[s]]
    texts = texts or {}
    proteins = [Protein(x, sequence=sequences.get(x), structure=files["structures"].get(x), fields=texts.get(x))
                for x in ids if x in sequences or x in files["structures"]]
    log(f"{kind}: {len(ids)} chains in the splits (train/valid/test "
        f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}); {len(proteins)} have a sequence "
        f"or structure and get features, the other {len(ids) - len(proteins)} only labels")
    if not proteins:
        raise FatalError(f"{kind}: no chain of the splits has a sequence or a structure: give the structures "
                         "(torchdrug's archive, or --pdb-dir) or DeepFRI's *_sequences.fasta next to the annotation")
    return proteins, label_sets


def demo_sets(cfg):
    """demo.write_corpus into <data-dir>/demo, then its FASTA + pdb/ + protdescribe.tsv + DeepFRI-style
    EC and GO files, as one set with labels_ec / go-mf / go-bp / go-cc."""
    import demo
    work = Path(cfg.data_dir) / "demo"
    demo.write_corpus(work, None if cfg.demo_n is None else demo.make_corpus(n=cfg.demo_n))
    files = dict(fasta=str(work / "demo.fasta"), pdb_dir=str(work / "pdb"),
                 protdescribe=str(work / "protdescribe.tsv"), data=str(work), download=False)
    sub = ExtractConfig(**{**vars(cfg), **files})
    texts = texts_by_id(sub)
    structures = index_structures(sub.pdb_dir)
    proteins = [Protein(pid, sequence=seq, structure=structures.get(pid), fields=texts.get(pid))
                for pid, seq in read_fasta(sub.fasta)]
    label_sets = []
    for kind in ("ec", "go"):
        label_sets += task_proteins(sub, kind, label_source="demo")[1]
    return proteins, label_sets


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


def infer_source(cfg):
    """--source, or the source the input flags name when exactly one reading fits: --af-dir -> alphafold,
    --fasta -> fasta, --data / --download -> ec or go (by the archive's name), --pdb-dir -> pdb-dir,
    --protdescribe -> protdescribe (--pdb-dir with --protdescribe could be either: say which)."""
    if cfg.source:
        return cfg.source
    given = [f"--{n.replace('_', '-')}" for n in ("af_dir", "fasta", "data", "pdb_dir", "protdescribe")
             if getattr(cfg, n)] + (["--download"] if cfg.download else [])
    primary = [g for g in given if g in ("--af-dir", "--fasta", "--data", "--download")]
    if len(primary) > 1:
        raise FatalError(f"{' and '.join(primary)} name different sources: say which with --source")
    if primary == ["--af-dir"]:
        return "alphafold"
    if primary == ["--fasta"]:
        return "fasta"
    if primary:
        name = Path(cfg.data or "").name.lower()
        kinds = [k for k, (zip_name, _, _) in TORCHDRUG_ZIPS.items() if zip_name.lower() in name]
        if len(kinds) == 1:
            return kinds[0]
        raise FatalError(f"{' '.join(primary)}: EC or GO? say --source ec or --source go")
    if given == ["--pdb-dir"]:
        return "pdb-dir"
    if given == ["--protdescribe"]:
        return "protdescribe"
    if given:
        raise FatalError("--pdb-dir with --protdescribe: say --source pdb-dir (the structures, text from the TSV) "
                         "or --source protdescribe (the TSV rows, structures from the directory)")
    raise FatalError("no input: give --fasta, --pdb-dir, --protdescribe, --af-dir with --protdescribe, --data "
                     "(EC/GO), or --source demo")


def main(argv=None):
    """The command line; returns the exit status (EXIT_CODES)."""
    args = build_parser().parse_args(argv)
    cfg = ExtractConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    modalities = tuple(m for m in MODALITIES if m in cfg.modality)
    try:
        if cfg.merge:
            if not cfg.out:
                raise FatalError("--merge needs --out")
            return EXIT_OK if merge_shards(Path(cfg.out)) is not None else EXIT_INCOMPLETE
        if not 1 <= cfg.max_len <= 1022:
            raise FatalError(f"--max-len {cfg.max_len}: need 1 <= max-len <= 1022 (ESM-1b's positions)")
        if cfg.source is None:
            cfg.source = infer_source(cfg)
            log(f"source: {cfg.source} (from the input flags; --source to choose another)")
        if cfg.pick is not None and (cfg.source != "alphafold" or min(cfg.pick) < 0):
            raise FatalError("--pick PAIRED SEQSTR SEQFUNC: counts >= 0, with --source alphafold (--af-dir)")
        name = f"demo-{cfg.encoders}" if cfg.source == "demo" else cfg.source  # features/demo: demo.py's own set
        out = Path(cfg.out or f"features/{name}")
        if cfg.encoders == "tiny":
            log("encoders: TINY -- small random-init models of the real architectures (ESM-2 6 layers, "
                "GearNet-Edge [32]*6, 2-layer BERT); for tests and the demo, not for results")
        if "seq" in modalities:
            log(f"sequences: {STANDARD_RESIDUES} plus {' '.join(EXTRA_RESIDUES)} (fair-esm's alphabet has tokens "
                "for X B Z U O); any other character fails its protein")
        encoders, summaries = {}, []
        if cfg.source == "alphafold":
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
                summaries.append(extract_set(sets[name], targets[name], cfg, mods, f"alphafold:{name}",
                                             encoders=encoders))
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "alphafold_mismatch.json", json.dumps(left_out, indent=1))
        else:
            label_sets = []
            if cfg.source in ("ec", "go"):
                proteins, label_sets = task_proteins(cfg, cfg.source, texts=texts_by_id(cfg))
            elif cfg.source == "demo":
                proteins, label_sets = demo_sets(cfg)
            else:
                proteins = {"fasta": proteins_fasta, "pdb-dir": proteins_pdb_dir,
                            "protdescribe": proteins_protdescribe}[cfg.source](cfg)
            summaries.append(extract_set(proteins, out, cfg, modalities, cfg.source, label_sets, encoders))
        return max(s["exit_status"] for s in summaries) if summaries else EXIT_FATAL
    except FatalError as e:
        log(f"error: {e}", err=True)
        return EXIT_FATAL
    except (OSError, UnicodeDecodeError) as e:  # a missing or unreadable input file or directory
        log(f"error: {type(e).__name__}: {e}", err=True)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
