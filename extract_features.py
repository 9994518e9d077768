"""Extract the frozen uni-modal features AMMA learns from: one float16 .pt per protein and modality.

    features/<set>/seq/<id>.pt    [L, d_seq]   ESM-1b layer 33, BOS/EOS rows dropped
    features/<set>/str/<id>.pt    [L, d_str]   GearNet-Edge node features (row i = same residue as seq)
    features/<set>/func/<id>.pt   [L', d_func] PubMedBERT-abs last hidden state of the joined text
    features/<set>/manifest.tsv   id, L, L_func, modalities, sequence, L_full, structure, chain
    features/<set>/info.json      encoders, dims, tiny, source, max_len, ...
    features/<set>/labels_<task>.json   ec / go / demo: task, terms, labels, splits, test_identity, source
    features/<set>/summary.json   done / skipped / failed (with reasons) of the last run

Commands (tests/test_extract.py runs the first, with --demo-n 6):

    python extract_features.py --source demo --encoders tiny                  # -> features/demo-tiny, offline
    python extract_features.py --source fasta --fasta prot.fasta --pdb-dir pdb/ --out features/mine
    python extract_features.py --source pdb-dir --pdb-dir ../shared/data/pdb --modality seq str \\
        --out features/pdb
    python extract_features.py --source protdescribe --protdescribe uniprot_sprot_filtered.tsv \\
        --modality seq func --out features/protdescribe
    python extract_features.py --source alphafold --af-dir afdb/ --protdescribe uniprot_sprot_filtered.tsv \\
        --gearnet-ckpt mc_gearnet_edge.pth --unpaired --out features/pretrain
        # paired triplets -> features/pretrain; with --unpaired also features/seqstr, features/seqfunc
    python extract_features.py --source ec --download --modality seq str --gearnet-ckpt mc_gearnet_edge.pth \\
        --out features/ec                                   # torchdrug's EnzymeCommission.zip (md5-checked)
    python extract_features.py --source go --data data/GeneOntology.zip --modality seq str --out features/go
    python extract_features.py --source ec --data ../shared/data/deepfri --modality seq --out features/ec
        # DeepFRI's own file set: labels for every chain, features for chains with a sequence (test FASTA)
    python extract_features.py --source ec ... --shard 0/4     # four jobs: --shard 0/4 .. 3/4, then
    python extract_features.py --out features/ec --merge       # (or nothing: the last shard merges)

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
- Labels: every chain of the DeepFRI splits is in labels_<task>.json (GO chains without a term of a
  branch get [] there, as in torchdrug); test_identity holds the test CSV's <30%..<95% columns, and the
  cutoff is applied by finetune.py, not here.
- Resuming: finished files that load are skipped (--overwrite redoes them); a truncated one is reported
  by id and rewritten. Manifest rows of earlier runs whose files are still valid are kept, so a partial
  re-run (--limit) does not shrink manifest.tsv. --shard i/n (i = 0..n-1) takes the ids at positions
  i, i+n, ... of the sorted id list; each shard writes manifest.shard-i-of-n.tsv and the one that
  finds all n present merges them (info.json then lists the dims of every modality of the set).
- ProtDescribe: ProtST reads the columns Sequence, ProteinName, Function, SubcellularLocation,
  Similarity by name; its code names no accession column, so the first of Entry / Accession / ... in
  the header is used (--id-column to name it). AlphaFold files join on it; pairs whose sequences differ
  are left out of every set and listed in alphafold_mismatch.json.
- Exit status: 0 when the run finished (per-protein failures are listed in the summary), 2 when it
  could not start (bad arguments, missing or unreadable input files, encoders that cannot be loaded,
  mixed encoders in one set); --merge
  gives 1 while some shard has not finished.
"""
import argparse
import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import gearnet

MODALITIES = ("seq", "str", "func")
SOURCES = ("fasta", "pdb-dir", "protdescribe", "alphafold", "ec", "go", "demo")
TEXT_FIELDS = ("ProteinName", "Function", "SubcellularLocation", "Similarity")  # ProtST's order
SEQUENCE_FIELD = "Sequence"
ID_COLUMNS = ("Entry", "Accession", "accession", "EntryID", "Entry ID", "id", "ID")  # first found wins
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
EXTRA_RESIDUES = "XBZUO"  # tokens of their own in fair-esm's ESM-1b alphabet
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
ESM1B_NAME, ESM1B_LAYER = "esm1b_t33_650M_UR50S", 33
ESM1B_URL = f"https://dl.fbaipublicfiles.com/fair-esm/models/{ESM1B_NAME}.pt"  # fair-esm's esm/pretrained.py
PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"
TINY_NAMES = {"seq": "tiny:esm2_t6 (random init)", "str": "tiny:gearnet_edge [32]*6 (random init)",
              "func": "tiny:bert_2layer (random init)"}
# torchdrug's archives of the DeepFRI sets (torchdrug/datasets/enzyme_commission.py, gene_ontology.py)
TORCHDRUG_ZIPS = {
    "ec": ("EnzymeCommission", "https://zenodo.org/record/6622158/files/EnzymeCommission.zip",
           "33f799065f8ad75f87b709a87293bc65"),
    "go": ("GeneOntology", "https://zenodo.org/record/6622158/files/GeneOntology.zip",
           "376be1f088cd1fe720e1eaafb701b5cb"),
}
GO_BRANCHES = {"molecular_function": "go-mf", "biological_process": "go-bp", "cellular_component": "go-cc"}
CUTOFF_COLUMNS = {"<30%": "30", "<40%": "40", "<50%": "50", "<70%": "70", "<95%": "95"}
CHUNK = 2000  # proteins read and encoded together; bounds memory on large sets


def _opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class ExtractConfig:
    source: str = _opt("fasta", "where the proteins come from", choices=SOURCES)
    out: str = _opt(None, "feature set directory (default features/<source>; the demo: "
                    "features/demo-tiny, or demo-real; alphafold: the paired set)")
    modality: tuple = _opt(MODALITIES, "modalities to extract (those a protein lacks input for are left out)",
                           nargs="+", choices=MODALITIES)
    encoders: str = _opt("real", "real: ESM-1b, GearNet-Edge, PubMedBERT-abs; tiny: small random-init "
                         "models of the same architectures, offline, for tests and the demo only",
                         choices=("real", "tiny"))
    fasta: str = _opt(None, "FASTA file (--source fasta)")
    pdb_dir: str = _opt(None, "directory of structures <id>.pdb|.cif[.gz] (pdb-dir; optional for fasta, "
                        "protdescribe, ec/go with DeepFRI files)")
    protdescribe: str = _opt(None, "ProtST's uniprot_sprot_filtered.tsv (protdescribe, alphafold; gives "
                             "the text of matching ids for fasta / pdb-dir)")
    id_column: str = _opt(None, f"accession column of --protdescribe (default: first of {', '.join(ID_COLUMNS)})")
    af_dir: str = _opt(None, "directory of AlphaFold DB files AF-<accession>-F1-model_v*.pdb[.gz] (alphafold)")
    unpaired: bool = _opt(False, "alphafold: also write the unpaired sets seqstr (AF only) and seqfunc "
                          "(ProtDescribe only) next to --out")
    data: str = _opt(None, "ec/go: torchdrug's EnzymeCommission.zip / GeneOntology.zip, its extracted "
                     "directory, or a directory of DeepFRI's files (nrPDB-EC_*_annot.tsv, *_train.txt, ...)")
    download: bool = _opt(False, "ec/go: download torchdrug's archive into --data-dir (md5-checked)")
    data_dir: str = _opt("data", "where downloads are stored and archives extracted (also the demo's raw files)")
    demo_n: int = _opt(None, "demo: number of synthetic proteins (default: demo.py's)", type=int)
    gearnet_ckpt: str = _opt(None, "torchdrug GearNet-Edge state_dict, e.g. mc_gearnet_edge.pth (needed "
                             "for real str features; solver checkpoints {'model': ...} work too)")
    esm_weights: str = _opt(None, "local esm1b_t33_650M_UR50S.pt (default: fair-esm's file, downloaded once "
                            "into the torch hub cache; either is loaded with weights_only=True)")
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
    """The run cannot start: one line, exit status 2."""


def log(msg, err=False):
    tqdm.write(msg, file=sys.stderr if err else sys.stdout)


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


def read_protdescribe(path, id_column=None):
    """ProtST's uniprot_sprot_filtered.tsv (header row, tab-separated, read as ProtST reads it).
    Returns (id column, [dict(id, sequence, fields={ProteinName, Function, SubcellularLocation,
    Similarity})]). A row with another number of fields than the header is a FatalError."""
    try:
        return _read_protdescribe(path, id_column)
    except UnicodeDecodeError as e:
        raise FatalError(f"{path}: not UTF-8 text ({e})") from None


def _read_protdescribe(path, id_column):
    csv.field_size_limit(sys.maxsize)
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        if id_column is None:
            id_column = next((c for c in ID_COLUMNS if c in header), None)
        missing = [c for c in (id_column, SEQUENCE_FIELD) if c not in header]
        if missing:
            raise FatalError(f"{path}: no column {' / '.join(str(m) for m in missing)} in the header "
                             f"({', '.join(header)}); name the accession column with --id-column")
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) != len(header):
                raise FatalError(f"{path}:{reader.line_num}: {len(values)} tab-separated fields, the header "
                                 f"has {len(header)} (a tab or newline inside a field?)")
            row = dict(zip(header, values))
            rows.append({"id": row[id_column].strip(), "sequence": row[SEQUENCE_FIELD].strip(),
                         "fields": {k: row.get(k, "") for k in TEXT_FIELDS}})
    return id_column, rows


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


class SeqEncoder:
    """A fair-esm model; __call__(sequences) -> per-residue [L_i, d] float32 (BOS/EOS rows dropped)."""

    def __init__(self, model, alphabet, layer, device):
        self.model, self.alphabet, self.layer, self.device = model.to(device).eval(), alphabet, layer, device
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
    """A torchdrug GearNet state_dict from a plain state_dict file or a solver checkpoint
    ({'model': {'model.layers.0...', 'mlp...'}}): the GearNet keys with their prefix stripped."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    prefixes = {m.group(1) or "" for k in sd
                if (m := re.match(r"^(.*\.)?layers\.0\.self_loop\.weight$", k))}
    if len(prefixes) != 1:
        raise FatalError(f"{path}: expected one GearNet in the state_dict, found "
                         f"{len(prefixes)} ('layers.0.self_loop.weight' under {sorted(prefixes) or 'no prefix'})")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def esm1b_checkpoint():
    """Path of ESM-1b's checkpoint in the torch hub cache, downloaded from fair-esm's URL when not there
    yet (download_url_to_file writes a temporary file and renames it, so a broken download leaves none)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{ESM1B_NAME}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"download {ESM1B_URL} -> {path}")
        torch.hub.download_url_to_file(ESM1B_URL, str(path), progress=True)
    return path


def load_esm1b(path):
    """(model, alphabet) of an ESM-1b-format checkpoint {'args': Namespace, 'model': state_dict} loaded
    with weights_only=True (a file from elsewhere cannot run code; only argparse.Namespace is allowed
    besides tensors). The contact-regression weights are not loaded: only representations are used."""
    import esm
    with torch.serialization.safe_globals([argparse.Namespace]):  # ESM checkpoints hold their args
        data = torch.load(path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        return esm.pretrained.load_model_and_alphabet_core(ESM1B_NAME, data, None)


def encoder_names(cfg):
    if cfg.encoders == "tiny":
        return dict(TINY_NAMES)
    ckpt = Path(cfg.gearnet_ckpt).name if cfg.gearnet_ckpt else "?"
    return {"seq": ESM1B_NAME, "str": f"gearnet_edge:{ckpt}", "func": cfg.text_model}


def load_encoder(modality, cfg, device):
    """The encoder of one modality, loaded on first need. Real weights that cannot be had (offline, no
    --gearnet-ckpt) raise FatalError with one line that suggests --encoders tiny."""
    tiny = cfg.encoders == "tiny"
    try:
        if modality == "seq":
            import esm
            if tiny:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
                    model = esm.model.esm2.ESM2(num_layers=6, embed_dim=64, attention_heads=4, alphabet=alphabet)
                return SeqEncoder(model, alphabet, 6, device)
            model, alphabet = load_esm1b(cfg.esm_weights or esm1b_checkpoint())
            return SeqEncoder(model, alphabet, ESM1B_LAYER, device)
        if modality == "str":
            if tiny:
                model = gearnet.tiny_gearnet(seed=0)
            elif not cfg.gearnet_ckpt:
                raise FatalError("real structure features need --gearnet-ckpt PATH (a torchdrug GearNet-Edge "
                                 "state_dict such as mc_gearnet_edge.pth); or run with --encoders tiny")
            else:
                model = gearnet.GearNetEdge.from_state_dict(gearnet_state_dict(cfg.gearnet_ckpt))
            return model.to(device).eval()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
        if tiny:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
                tokenizer = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True)
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=96, max_position_embeddings=512)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = BertModel(config, add_pooling_layer=False)
            return TextEncoder(tokenizer, model, device)
        return TextEncoder(AutoTokenizer.from_pretrained(cfg.text_model), AutoModel.from_pretrained(cfg.text_model),
                           device)
    except FatalError:
        raise
    except Exception as e:  # no network, missing cache, corrupt file: all end the run the same way
        what = {"seq": ESM1B_NAME, "str": f"GearNet-Edge ({cfg.gearnet_ckpt})", "func": cfg.text_model}[modality]
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise FatalError(f"could not load {what}: {type(e).__name__}: {first} -- without internet or a "
                         "local copy, run with --encoders tiny (small random-init encoders)") from None


# ----------------------------------------------------------------------------- proteins and their files

@dataclass
class Protein:
    id: str
    sequence: str = None      # given sequence (FASTA / TSV), None when only a structure exists
    structure: Path = None    # structure file
    fields: dict = None       # ProtDescribe text fields
    # set by prepare():
    seq: str = ""             # what the sequence encoder sees
    graph_input: dict = None  # read_structure dict, cropped like seq
    L_full: int = 0
    chain: str = ""
    modalities: tuple = ()
    text_ids: list = None
    shapes: dict = field(default_factory=dict)
    note: str = ""            # a modality left out for lack of input (listed in the summary)


def read_structure(path):
    """gearnet.read_structure, with every way a file can be unreadable (bad content, truncated or
    corrupt gzip, I/O, not text) turned into one InputError."""
    try:
        return gearnet.read_structure(path)
    except gearnet.StructureError as e:
        raise InputError(str(e)) from None
    except (OSError, ValueError, IndexError, EOFError, zlib.error) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{path}: unreadable structure ({type(e).__name__}: {e})") from None


def prepare(p, cfg, modalities):
    """Read and check one protein's inputs; InputError (one line) when they are unusable."""
    if not p.id or "/" in p.id or p.id.startswith("."):
        raise InputError(f"id {p.id!r} cannot be a file name")
    seq = p.sequence
    if p.structure is not None:
        s = read_structure(p.structure)
        if seq is not None and seq != s["sequence"]:
            gap = subsequence_gap(s["sequence"], seq)
            if gap is not None:
                what = (f"sequence mismatch: {Path(p.structure).name} residue {gap + 1} ({s['residue_ids'][gap]} "
                        f"{s['sequence'][gap]}) is not in the given sequence in order")
                if cfg.on_mismatch == "skip":
                    raise InputError(what + " (--on-mismatch structure uses the structure's sequence)")
                log(f"warning: {p.id}: {what}; using the structure's sequence", err=True)
        seq, p.chain = s["sequence"], s["chain"]
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
    has_text = p.fields is not None and any((p.fields.get(k) or "").strip() for k in TEXT_FIELDS)
    if "func" in modalities and p.fields is not None and not has_text:
        p.note = f"no text (the fields {', '.join(TEXT_FIELDS)} are all empty): func left out"
    has = {"seq": True, "str": p.graph_input is not None, "func": has_text}
    p.modalities = tuple(m for m in MODALITIES if m in modalities and has[m])
    return p


def save_tensor(x, path):
    """float16 copy of x written to a temporary file next to path, then renamed over it; InputError
    (nothing written) when a value is not finite in float16 (|x| > 65504, or nan/inf already)."""
    y = x.to(torch.float16).contiguous().clone()
    if not torch.isfinite(y).all():
        raise InputError(f"a value is not finite in float16 (max |value| "
                         f"{x.detach().float().abs().max().item():.4g}; float16 holds up to 65504)")
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


MANIFEST_COLUMNS = ("id", "L", "L_func", "modalities", "sequence", "L_full", "structure", "chain")


def manifest_row(p):
    return {"id": p.id, "L": len(p.seq), "L_func": p.shapes.get("func", (0,))[0],
            "modalities": ",".join(p.modalities), "sequence": p.seq, "L_full": p.L_full,
            "structure": str(p.structure or ""), "chain": p.chain}


def write_manifest(path, rows):
    lines = ["\t".join(MANIFEST_COLUMNS)]
    lines += ["\t".join(str(r[c]) for c in MANIFEST_COLUMNS) for r in sorted(rows, key=lambda r: r["id"])]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_manifest_rows(path):
    """{id: row of strings} of a manifest file written by write_manifest ({} when there is none)."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {r["id"]: r for r in rows if r.get("id") and all(r.get(c) is not None for c in MANIFEST_COLUMNS)}


def kept_rows(out, path, todo_ids):
    """Rows of the existing manifest `path` for ids this run did not handle whose feature files are
    still there and valid: a partial re-run (--limit, another input) does not shrink the manifest."""
    kept = []
    for pid, r in read_manifest_rows(path).items():
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
    header, lines = None, []
    for i in range(n):
        rows = (out / f"manifest.shard-{i}-of-{n}.tsv").read_text().splitlines()
        header = header or rows[0]
        lines += [r for r in rows[1:] if r.strip()]
    lines.sort(key=lambda r: r.split("\t", 1)[0])
    write_text_atomic(out / "manifest.tsv", "\n".join([header] + lines) + "\n")
    if names is None:  # --merge alone: the encoder names the shards reported
        names = {}
        for f in sorted(out.glob(f"summary.shard-*-of-{n}.json")):
            names.update(json.loads(f.read_text()).get("encoders", {}))
    write_info(out, list(read_manifest_rows(out / "manifest.tsv").values()), names, union=True)
    log(f"manifest: merged {n} shards into {out / 'manifest.tsv'} ({len(lines)} rows)")
    return len(lines)


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
    for batch in tqdm(token_batches([b - a for _, a, b in segments], cfg.toks_per_batch, extra=2), desc=desc):
        segs = [segments[k] for k in batch]
        try:
            reps = encoder([jobs[j][1][a:b] for j, a, b in segs])
        except Exception as e:  # e.g. out of memory: these proteins fail, the run goes on
            for j, _, _ in segs:
                fail(jobs[j][0], f"{desc}: {type(e).__name__}: {e}")
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
    for batch in tqdm(token_batches(lengths, budget), desc=desc):
        group = [proteins[k] for k in batch]
        try:
            feats = encode(group)
        except Exception as e:
            for p in group:
                fail(p, f"{desc}: {type(e).__name__}: {e}")
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
    """Extract one feature set; returns the summary dict. `encoders` caches loaded models by modality."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_info(out, cfg, modalities)
    for labels in label_sets:
        write_labels(out, **labels)
    encoders = {} if encoders is None else encoders
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    shard_i, shard_n = parse_shard(cfg.shard)

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
    log(f"{out}: {len(todo)} proteins{shard_note}, modalities {' '.join(modalities)}, from {source}")

    def fail(p, reason):
        pid = p if isinstance(p, str) else p.id
        if pid not in failed:
            failed[pid] = reason
            log(f"error: {pid}: {reason}", err=True)

    failed, rewritten, notes, rows, done, skipped = {}, {}, {}, [], 0, 0
    for start in range(0, len(todo), CHUNK):
        ready = []
        for p in tqdm(todo[start:start + CHUNK], desc="inputs"):
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
                    try:
                        p.shapes[m] = check_existing(path, None if m == "func" else len(p.seq))
                        continue
                    except ValueError as e:
                        rewritten[p.id] = str(e)
                        log(f"warning: {p.id}: existing {m} file is corrupt, rewriting ({e})", err=True)
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
            if p.id in failed:
                continue
            rows.append(manifest_row(p))
            done, skipped = done + (p.id in busy), skipped + (p.id not in busy)

    # manifest, info, summary
    for m in modalities:
        if rows and not any(m in r["modalities"].split(",") for r in rows):
            log(f"warning: no protein of {out} ({'this shard' if shard_n > 1 else 'this run'}) has {m} input "
                f"({'structure' if m == 'str' else 'text'}); {m} is left out", err=True)
    names = encoder_names(cfg)
    manifest = out / (f"manifest.shard-{shard_i}-of-{shard_n}.tsv" if shard_n > 1 else "manifest.tsv")
    same_encoders = not encoder_clash(out, names)
    if same_encoders:  # rows of earlier runs (other --limit, other ids) whose files are still valid stay
        rows += kept_rows(out, manifest, {p.id for p in todo})
    base = {"tiny": cfg.encoders == "tiny", "synthetic": False, "source": source, "max_len": cfg.max_len,
            "long": cfg.long, "esm_layer": 6 if cfg.encoders == "tiny" else ESM1B_LAYER,
            "text_fields": list(TEXT_FIELDS)}
    info = write_info(out, rows, names, base, union=shard_n > 1 and same_encoders)
    write_manifest(manifest, rows)
    if shard_n > 1:
        merge_shards(out, shard_n, names)
    summary = {"out": str(out), "shard": f"{shard_i}/{shard_n}", "proteins": len(todo), "done": done,
               "skipped": skipped, "failed": dict(sorted(failed.items())), "rewritten": rewritten,
               "notes": dict(sorted(notes.items())),
               "duplicate_ids": sorted(duplicates),
               "tiny": cfg.encoders == "tiny", "encoders": info["encoders"]}
    name = f"summary.shard-{shard_i}-of-{shard_n}.json" if shard_n > 1 else "summary.json"
    write_text_atomic(out / name, json.dumps(summary, indent=1))
    print_summary(summary, out / name)
    return summary


def print_summary(s, path):
    log(f"summary {s['out']}: {s['proteins']} proteins: done {s['done']}, skipped {s['skipped']} "
        f"(already extracted), failed {len(s['failed'])}, rewritten {len(s['rewritten'])} corrupt")
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


# ----------------------------------------------------------------------------- sources

def texts_by_id(cfg):
    if not cfg.protdescribe:
        return {}
    _, rows = read_protdescribe(cfg.protdescribe, cfg.id_column)
    return {r["id"]: r["fields"] for r in rows}


def require(cfg, *names):
    for name in names:
        if not getattr(cfg, name):
            raise FatalError(f"--source {cfg.source} needs --{name.replace('_', '-')}")


def proteins_fasta(cfg):
    require(cfg, "fasta")
    structures = index_structures(cfg.pdb_dir) if cfg.pdb_dir else {}
    texts = texts_by_id(cfg)
    return [Protein(pid, sequence=seq, structure=structures.get(pid), fields=texts.get(pid))
            for pid, seq in read_fasta(cfg.fasta)]


def proteins_pdb_dir(cfg):
    require(cfg, "pdb_dir")
    texts = texts_by_id(cfg)
    return [Protein(pid, structure=path, fields=texts.get(pid)) for pid, path in index_structures(cfg.pdb_dir).items()]


def proteins_protdescribe(cfg):
    require(cfg, "protdescribe")
    structures = index_structures(cfg.pdb_dir) if cfg.pdb_dir else {}
    _, rows = read_protdescribe(cfg.protdescribe, cfg.id_column)
    return [Protein(r["id"], sequence=r["sequence"], structure=structures.get(r["id"]), fields=r["fields"])
            for r in rows]


AF_NAME = re.compile(r"^AF-(.+)-F1-model_v(\d+)\.(pdb|cif)(\.gz)?$")


def alphafold_sets(cfg):
    """{"paired": [...], "seqstr": [...], "seqfunc": [...]} joined on accession, and the accessions whose
    AF sequence disagrees with ProtDescribe's (left out of every set)."""
    require(cfg, "af_dir", "protdescribe")
    af = {}
    for path in sorted(Path(cfg.af_dir).iterdir()):
        m = AF_NAME.match(path.name)
        if m and (m.group(1) not in af or int(m.group(2)) > af[m.group(1)][0]):
            af[m.group(1)] = (int(m.group(2)), path)
    _, rows = read_protdescribe(cfg.protdescribe, cfg.id_column)
    tsv = {r["id"]: r for r in rows}
    sets, mismatched = {"paired": [], "seqstr": [], "seqfunc": []}, {}
    for acc, (_, path) in tqdm(sorted(af.items()), desc="join"):
        if acc not in tsv:
            sets["seqstr"].append(Protein(acc, structure=path))
            continue
        try:
            af_seq = read_structure(path)["sequence"]
        except InputError as e:
            mismatched[acc] = f"unreadable: {e}"
            continue
        if af_seq != tsv[acc]["sequence"]:
            mismatched[acc] = (f"AF sequence ({len(af_seq)} aa) != ProtDescribe Sequence "
                               f"({len(tsv[acc]['sequence'])} aa)")
            continue
        sets["paired"].append(Protein(acc, sequence=tsv[acc]["sequence"], structure=path, fields=tsv[acc]["fields"]))
    sets["seqfunc"] = [Protein(r["id"], sequence=r["sequence"], fields=r["fields"]) for r in rows if r["id"] not in af]
    log(f"alphafold: {len(af)} AF files, {len(tsv)} ProtDescribe rows: paired {len(sets['paired'])}, "
        f"AF only {len(sets['seqstr'])}, ProtDescribe only {len(sets['seqfunc'])}, "
        f"sequences disagree {len(mismatched)}")
    for acc, why in list(mismatched.items())[:10]:
        log(f"  left out {acc}: {why}")
    return sets, mismatched


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
            raise FatalError(f"could not download {url} ({type(e).__name__}: {e}); fetch it elsewhere and "
                             "pass --data PATH") from None
        os.replace(tmp, zip_path)
    if cfg.download or zip_path.name == f"{name}.zip":  # a download is always checked, whatever its name
        found = md5sum(zip_path)
        if found != md5:
            raise FatalError(f"{zip_path}: md5 {found} is not torchdrug's published {md5}")
    return zip_path


def task_files(cfg, kind):
    """Locate the annotation, splits, test CSV, sequences and structures of the EC or GO set, in
    torchdrug's layout (<Name>/nrPDB-EC_annot.tsv, train.zip -> train/<PDB>-<chain>_*.pdb, ...) or
    DeepFRI's (nrPDB-EC_2020.04_annot.tsv, *_train.txt, *_valid.txt, *_test.txt, *_test.csv,
    *_sequences.fasta)."""
    if not (cfg.data or cfg.download):
        raise FatalError(f"--source {cfg.source} needs --data PATH (zip or directory) or --download")
    root = Path(cfg.data) if cfg.data else None
    if cfg.download or root.suffix == ".zip":
        zip_path = fetch_archive(cfg, kind)
        root = safe_extract(zip_path, Path(cfg.data_dir) / zip_path.stem)
    tag = kind.upper()
    annots = sorted(root.glob(f"*-{tag}*_annot.tsv")) + sorted(root.glob(f"*/*-{tag}*_annot.tsv"))
    if len(annots) != 1:
        raise FatalError(f"{root}: expected one *-{tag}*_annot.tsv, found {[str(a) for a in annots] or 'none'} "
                         f"(DeepFRI's annotation file, e.g. nrPDB-{tag}_*_annot.tsv, or torchdrug's archive)")
    base = annots[0].parent

    def one(pattern):
        found = sorted(base.glob(pattern))
        if len(found) != 1:
            raise FatalError(f"{base}: expected one {pattern}, found {[f.name for f in found] or 'none'}")
        return found[0]
    files = {"annot": annots[0], "test_csv": one(f"*-{tag}*_test.csv"), "splits": {}, "structures": {},
             "fastas": sorted(base.glob(f"*-{tag}*sequences.fasta"))}
    for split in ("train", "valid", "test"):
        if (base / f"{split}.zip").exists() and not (base / split).is_dir():
            safe_extract(base / f"{split}.zip", base)
        if (base / split).is_dir():  # torchdrug: the directory is the split
            index = index_structures(base / split, torchdrug_names=True)
            files["splits"][split] = sorted(index)
            files["structures"].update(index)
        else:
            files["splits"][split] = read_split(one(f"*-{tag}*_{split}.txt"))
    if cfg.pdb_dir:
        for pid, path in index_structures(cfg.pdb_dir, torchdrug_names=True).items():
            files["structures"].setdefault(pid, path)
    files["source"] = "torchdrug" if (base / "train").is_dir() else "deepfri"
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
    ids = [x for s in ("train", "valid", "test") for x in splits[s]]
    texts = texts or {}
    proteins = [Protein(x, sequence=sequences.get(x), structure=files["structures"].get(x), fields=texts.get(x))
                for x in ids if x in sequences or x in files["structures"]]
    log(f"{kind}: {len(ids)} chains in the splits (train/valid/test "
        f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}); {len(proteins)} have a sequence "
        f"or structure and get features, the other {len(ids) - len(proteins)} only labels")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Commands and the choices "
                                     "made: python -c 'import extract_features; help(extract_features)'")
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = ExtractConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    modalities = tuple(m for m in MODALITIES if m in cfg.modality)
    try:
        if cfg.merge:
            if not cfg.out:
                raise FatalError("--merge needs --out")
            return 0 if merge_shards(Path(cfg.out)) is not None else 1
        if not 1 <= cfg.max_len <= 1022:
            raise FatalError(f"--max-len {cfg.max_len}: need 1 <= max-len <= 1022 (ESM-1b's positions)")
        name = f"demo-{cfg.encoders}" if cfg.source == "demo" else cfg.source  # features/demo: demo.py's own set
        out = Path(cfg.out or f"features/{name}")
        if cfg.encoders == "tiny":
            log("encoders: TINY -- small random-init models of the real architectures (ESM-2 6 layers, "
                "GearNet-Edge [32]*6, 2-layer BERT); for tests and the demo, not for results")
        if "seq" in modalities:
            log(f"sequences: {STANDARD_RESIDUES} plus {' '.join(EXTRA_RESIDUES)} (fair-esm's alphabet has tokens "
                "for X B Z U O); any other character fails its protein")
        encoders = {}
        if cfg.source == "alphafold":
            sets, mismatched = alphafold_sets(cfg)
            wanted = {"paired": MODALITIES, "seqstr": ("seq", "str"), "seqfunc": ("seq", "func")}
            targets = {"paired": out, "seqstr": out.parent / "seqstr", "seqfunc": out.parent / "seqfunc"}
            for name in ("paired", "seqstr", "seqfunc") if cfg.unpaired else ("paired",):
                mods = tuple(m for m in modalities if m in wanted[name])
                extract_set(sets[name], targets[name], cfg, mods, f"alphafold:{name}", encoders=encoders)
            write_text_atomic(out / "alphafold_mismatch.json", json.dumps(mismatched, indent=1))
            return 0
        label_sets = []
        if cfg.source in ("ec", "go"):
            proteins, label_sets = task_proteins(cfg, cfg.source, texts=texts_by_id(cfg))
        elif cfg.source == "demo":
            proteins, label_sets = demo_sets(cfg)
        else:
            proteins = {"fasta": proteins_fasta, "pdb-dir": proteins_pdb_dir,
                        "protdescribe": proteins_protdescribe}[cfg.source](cfg)
        extract_set(proteins, out, cfg, modalities, cfg.source, label_sets, encoders)
        return 0
    except FatalError as e:
        log(f"error: {e}", err=True)
        return 2
    except (OSError, UnicodeDecodeError) as e:  # a missing or unreadable input file or directory
        log(f"error: {type(e).__name__}: {e}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
