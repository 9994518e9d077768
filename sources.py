"""Where the proteins come from: the readers of every input extract_features.py takes, as Protein records.

    read_fasta, read_protdescribe            FASTA files; ProtST's ProtDescribe TSV (uniprot_sprot_filtered.tsv)
    index_structures, read_structure         folders of PDB / mmCIF files (.gz too), AlphaFold DB tar members
    alphafold_sets, pick_sets                AlphaFold DB x ProtDescribe: the paper's pretraining sets
    task_files, task_proteins                EC / GO: torchdrug's archives or extracted folders, DeepFRI's files
    folder_entries                           the chain policy of a structure folder (--chain, --all-chains)
    proteins_fasta / _pdb_dir / _protdescribe, demo_sets, infer_source   one list of Proteins per --source
    prepare                                  one protein's inputs read and checked, before it is encoded

Nothing here encodes or writes features (extract_features.py does); everything raises InputError (one
protein is unusable: reported, the run goes on) or FatalError (the run cannot start: one line, exit 2).
The error vocabulary that extraction, packing and predict.py share lives here too: InputError,
FatalError, OutputError (a file that cannot be written), write_text_atomic, the EXIT_* statuses.

    import sources
    proteins = sources.proteins_fasta(cfg)        # cfg: extract_features.ExtractConfig
    s = sources.read_structure(Path("1ABC-A.pdb"))

Choices made here:
- Sequence letters: the 20 standard residues plus X B Z U O, which fair-esm's ESM-1b alphabet holds as
  tokens of their own (X unknown, B Asx, Z Glx, U selenocysteine, O pyrrolysine). Any other character
  (digits, '*', '-', '.', lowercase) fails that protein with a one-line error; nothing is guessed.
- Structures: first model; alternate locations ' ', 'A' or '1' only, whatever the occupancy (RDKit's
  reader, which torchdrug uses, keeps those); a non-finite C-alpha coordinate fails the file, naming the
  atom. Modified amino acids (MSE, SEP, TPO, KCX, ...: gearnet.MODIFIED_RESIDUES) are read as their parent
  residue in ATOM and HETATM records alike; other HETATM amino acids (backbone N, CA, C) as unknown 'X'
  (torchdrug keeps every residue with a C-alpha, and reads every name outside its 20 as glycine /
  unknown); a HETATM 'CA' without backbone (a calcium ion) is no residue. Every remapped, unknown or
  dropped residue is counted per protein under "residues" in summary.json; a chain id used twice in a
  file and two files of one id (twin.pdb, twin.pdb.gz) are reported.
- Chains of a structure folder (--pdb-dir; printed at the start): --chain C when given, else the chain
  the file's name names (1ABC-A.pdb -> A), AlphaFold DB files whole (one chain), and any other file must
  hold one chain: a file with several fails by name, or with --all-chains each chain is a protein of its
  own, <id>_<chain>. torchdrug's own EC/GO files are read whole, as torchdrug reads them.
- With a structure, the residues that have a C-alpha atom are the sequence (the sequence encoder sees
  exactly the structure's residues). A FASTA/TSV sequence given too must be the structure's residues
  with some missing (in order; at most max(5, L/50) residues outside common blocks of 4); otherwise the
  protein is reported and skipped, naming both lengths (--on-mismatch structure uses the structure's
  sequence instead when at most that many residues differ; more are an error). Text before the first
  '>' of a FASTA file is an error naming the line.
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
"""
import csv
import dataclasses
import difflib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import gearnet
import runs
from cache import MODALITIES

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
EXTRA_RESIDUES = "XBZUO"  # tokens of their own in fair-esm's ESM-1b alphabet
SOURCES = ("fasta", "pdb-dir", "protdescribe", "alphafold", "ec", "go", "demo")


TEXT_FIELDS = ("ProteinName", "Function", "SubcellularLocation", "Similarity")  # ProtST's order


SEQUENCE_FIELD = "Sequence"


# candidate id columns of a ProtDescribe TSV, first found wins (ProtST's code names none)
ID_COLUMNS = ("Entry", "Accession", "accession", "Entry ID", "EntryID", "Entry Name", "EntryName", "entry_name",
              "id", "ID")


UNIPROT_ACCESSION = re.compile(r"^([OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9]([A-Z][A-Z0-9]{2}[0-9]){1,2})(-\d+)?$")


STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")


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


# ----------------------------------------------------------------------------- errors, log, checksums

class InputError(ValueError):
    """Bad input for one protein: reported in one line, the run goes on."""


EXIT_OK, EXIT_INCOMPLETE, EXIT_FATAL, EXIT_PARTIAL = 0, 1, 2, 3   # the exit statuses of extraction, packing, predict


class FatalError(Exception):
    """The run cannot start or has nothing to do: one line, exit status 2."""


def full_reason(e):
    """The whole message of an exception on one line (multi-line messages of transformers / torch joined)."""
    return " ".join(str(e).split()) or "(no message)"


class OutputError(FatalError):
    """A file of the feature set cannot be written (disk full, read-only, no permission): one line naming
    the path and the free space there; the run stops (exit status 2), nothing partial is left."""

    def __init__(self, path, error):
        reason = error.strerror if isinstance(error, OSError) and error.strerror else full_reason(error)
        super().__init__(f"cannot write {path}: {reason} ({free_space(path)} free there); nothing partial "
                         "is left, run again when there is room (finished files are kept)")


def free_space(path):
    """Free space on the file system of path (its nearest existing folder), e.g. '1.2 GB'."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} B"


def write_text_atomic(path, text):
    """runs.atomic_write_text for the feature set: a temporary file renamed over `path`; OutputError (the
    run stops with exit status 2) when it cannot be written, the temporary file removed."""
    runs.atomic_write(lambda tmp: tmp.write_text(text), path, OutputError)



def log(msg, err=False):
    tqdm.write(msg, file=sys.stderr if err else sys.stdout)


def progress(iterable, desc, total=None):
    """runs.progress over `iterable`: a tqdm bar that updates once a minute at most when stderr is not a
    terminal (a log file, a batch job), so redirected logs do not fill with bar updates."""
    bar = runs.progress(len(iterable) if total is None and hasattr(iterable, "__len__") else total, desc)
    bar.iterable = iterable  # runs.progress counts a total; tqdm iterates over .iterable
    return bar


def digest(data):
    """Short checksum (16 hex digits) of bytes or text, for the manifest's provenance columns."""
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=8).hexdigest()


# ----------------------------------------------------------------------------- readers (pure)

def _open(path):
    path = str(path)
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def read_fasta(path):
    """[(id, sequence)] in file order; id = first word of the header line. Text before the first header
    is a FatalError naming the line (a lost header would silently drop or merge a sequence)."""
    records, name, chunks = [], None, []
    with _open(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if line.startswith(">"):
                    if name is not None:
                        records.append((name, "".join(chunks)))
                    name, chunks = (line[1:].split() or [""])[0], []
                elif line and name is None:
                    raise FatalError(f"{path}:{lineno}: text before the first '>' header ({line[:40]!r}): a "
                                     "header line is missing, or the file is not FASTA")
                elif line:
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


# ----------------------------------------------------------------------------- sequences

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



# ----------------------------------------------------------------------------- structure files

def structure_stem(name):
    """'1ABC-A.pdb.gz' -> '1ABC-A'; None for a name that is not a structure file."""
    name = name[:-3] if name.endswith(".gz") else name
    for suffix in STRUCTURE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def index_structures(directory, torchdrug_names=False):
    """{id: path} of the structure files directly in `directory`, id = the file's stem (with
    torchdrug_names, the part before the first '_': '1ABC-A_12.pdb' -> '1ABC-A'). Two files of one id
    (twin.pdb and twin.pdb.gz): the first in name order is used, the other named in a warning."""
    index, twins = {}, {}
    for path in sorted(Path(directory).iterdir()):
        stem = structure_stem(path.name)
        if stem is not None and path.is_file():
            pid = stem.split("_")[0] if torchdrug_names else stem
            if pid in index:
                twins[pid] = path
            index.setdefault(pid, path)
    if twins:
        shown = ", ".join(f"{twins[x].name} (used: {index[x].name})" for x in list(twins)[:5])
        log(f"warning: {directory}: {len(twins)} files have the id of another file and are ignored: {shown}"
            f"{', ...' if len(twins) > 5 else ''}", err=True)
    return index


CHAIN_IN_NAME = re.compile(r"-([A-Za-z0-9]{1,4})$")  # '1ABC-A', '2PE5-B': the chain named by the file


def folder_entries(index, cfg):
    """The chain policy of a structure folder: {protein id: (path, chain to read or None, rule)}. The chain
    is --chain when given, else the one the file name names ('XXXX-A.pdb'); an AlphaFold DB file is read
    whole (one chain); any other file must hold one chain (prepare() fails it otherwise), or with
    --all-chains each of its chains is a protein of its own, '<id>_<chain>'. Printed once."""
    entries, rules = {}, Counter()
    all_chains = getattr(cfg, "all_chains", False)
    for stem, path in index.items():
        named = CHAIN_IN_NAME.search(stem)
        if getattr(cfg, "chain", None):
            entries[stem] = (path, cfg.chain, "--chain")
        elif AF_NAME.match(Path(path).name):
            entries[stem] = (path, None, "alphafold")
        elif named:
            entries[stem] = (path, named.group(1), "file name")
        else:
            chains = file_chains(path) if all_chains else []
            if len(chains) > 1:
                entries.update({f"{stem}_{c}": (path, c, "--all-chains") for c in chains})
            else:
                entries[stem] = (path, None, "one chain")
        rules[entries[next(reversed(entries))][2]] += 1
    what = {"--chain": f"chain {getattr(cfg, 'chain', None)} (--chain)", "file name": "the chain the name names "
            "(XXXX-A.pdb)", "alphafold": "AlphaFold DB files, read whole", "--all-chains": "multi-chain files "
            "split, one protein <id>_<chain> per chain (--all-chains)", "one chain": "the file's only chain "
            "(a file with several fails: name it XXXX-A.pdb, or --chain, or --all-chains)"}
    if rules:
        log("structures: chain policy: " + "; ".join(f"{n} files: {what[r]}" for r, n in rules.items()))
    return entries


def file_chains(path):
    """The chain ids of the protein residues of a structure file ([] when it cannot be read: the
    error comes when the protein is prepared)."""
    try:
        return read_structure(path)["chain"].split(",")
    except InputError:
        return []


def structure_of(entries, pid):
    """Protein(...) keyword arguments of id `pid` from folder_entries (none when it has no structure)."""
    path, chain, rule = entries.get(pid, (None, None, ""))
    return {"structure": path, "read_chain": chain, "chain_rule": rule}


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


def read_structure(ref, chain=None):
    """gearnet.read_structure of a path or an ArchiveMember (only `chain` when given), plus "sha" (checksum
    of the file's content), with every way a file can be unreadable (bad content, missing columns, cut
    short, corrupt gzip, I/O, not text) turned into one InputError naming the file."""
    try:
        data = structure_bytes(ref)
        s = gearnet.read_structure(str(ref), chain=chain, text=data.decode())
    except gearnet.StructureError as e:
        raise InputError(str(e)) from None
    # UnicodeDecodeError is a ValueError, gzip.BadGzipFile an OSError
    except (OSError, ValueError, IndexError, KeyError, EOFError, zlib.error, tarfile.TarError) as e:
        raise InputError(f"{ref}: unreadable structure ({type(e).__name__}: {e})") from None
    s["sha"] = digest(data)
    return s


# ----------------------------------------------------------------------------- proteins of each source

def has_text(fields):
    return fields is not None and any((fields.get(k) or "").strip() for k in TEXT_FIELDS)


@dataclass
class Protein:
    id: str
    sequence: str = None      # given sequence (FASTA / TSV), None when only a structure exists
    structure: object = None  # structure file: a Path or an ArchiveMember
    fields: dict = None       # ProtDescribe text fields
    read_chain: str = None    # the structure's chain to read (None: the whole file)
    chain_rule: str = ""      # why (folder_entries); "one chain": the file must hold one; "": read whole
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
    residue_report: dict = None  # read_structure's report: residues remapped, unknown, dropped


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
    entries = folder_entries(structures, cfg)
    texts = texts_by_id(cfg)
    return [Protein(pid, sequence=seq, fields=texts.get(pid), **structure_of(entries, pid)) for pid, seq in records]


def proteins_pdb_dir(cfg):
    require(cfg, "pdb_dir")
    entries = folder_entries(structures_in(cfg.pdb_dir, "--pdb-dir"), cfg)
    texts = texts_by_id(cfg)
    return [Protein(pid, fields=texts.get(pid), **structure_of(entries, pid)) for pid in entries]


def proteins_protdescribe(cfg):
    require(cfg, "protdescribe")
    structures = structures_in(cfg.pdb_dir, "--pdb-dir", required=False) if cfg.pdb_dir else {}
    entries = folder_entries(structures, cfg)
    return [Protein(r["id"], sequence=r["sequence"], fields=r["fields"], **structure_of(entries, r["id"]))
            for r in read_protdescribe(cfg.protdescribe, cfg.id_column).rows]


# ----------------------------------------------------------------------------- one protein's inputs, checked

def prepare(p, cfg, modalities):
    """Read and check one protein's inputs; InputError (one line) when they are unusable. Sets p.sha:
    seq = the sequence the encoder sees (+ the window setting when --long sliding applies), str = the
    structure file's content + the residues used, func = the four text fields."""
    if not p.id:
        raise InputError("empty id")
    seq, structure_sha = p.sequence, ""
    if p.structure is not None:
        s = read_structure(p.structure, p.read_chain)
        if p.chain_rule == "one chain" and "," in s["chain"]:
            raise InputError(f"{structure_name(p.structure)} holds chains {s['chain']} and its name names none: "
                             "name it <id>-<chain>.pdb, or pass --chain C, or --all-chains (each chain its own "
                             "protein <id>_<chain>)")
        if seq is not None and seq != s["sequence"]:
            check_pair(p, s, seq, cfg)
        seq, p.chain, structure_sha, p.residue_report = s["sequence"], s["chain"], s["sha"], s["report"]
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


def unmatched_residues(structure_seq, given, min_block=4):
    """How many of the structure's residues have no counterpart in the given sequence: those outside the
    in-order common blocks of >= min_block residues (difflib); unrelated sequences share few such blocks."""
    blocks = difflib.SequenceMatcher(None, structure_seq, given, autojunk=False).get_matching_blocks()
    return len(structure_seq) - sum(b.size for b in blocks if b.size >= min(min_block, len(structure_seq)))


def check_pair(p, s, given, cfg):
    """A given sequence (FASTA / TSV) beside a structure must be the structure's residues with some missing
    (in order, few unmatched); otherwise InputError naming both lengths (--on-mismatch structure: a few
    substitutions are accepted with a warning and the structure's sequence is used; more are an error)."""
    ours = s["sequence"]
    gap, unmatched = subsequence_gap(ours, given), unmatched_residues(ours, given)
    few = max(5, len(ours) // 50)
    if gap is None and unmatched <= few:
        return
    where = (f"residue {gap + 1} ({s['residue_ids'][gap]} {ours[gap]}) is not in the given sequence in order"
             if gap is not None else f"{unmatched} of its residues match nothing in the given sequence")
    what = f"sequence mismatch: {structure_name(p.structure)} has {len(ours)} residues, the given sequence {len(given)}; {where}"
    if cfg.on_mismatch == "skip":
        raise InputError(what + " (--on-mismatch structure uses the structure's sequence)")
    if unmatched > few:
        raise InputError(f"{what}: {unmatched} residues differ, more than {few} substitutions; not the same protein")
    log(f"warning: {p.id}: {what}; using the structure's sequence", err=True)


# ----------------------------------------------------------------------------- AlphaFold DB x ProtDescribe

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


# ----------------------------------------------------------------------------- EC / GO: torchdrug's archives, DeepFRI's files

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
    # chains: each file is read whole, as torchdrug does for its own EC/GO files (EnzymeCommission /
    # GeneOntology call ProteinDataset.load_pdbs -> Protein.from_pdb on the whole file, no chain chosen;
    # the protein's id is the file name before '_'); DeepFRI's files hold the one chain their name names
    proteins = [Protein(x, sequence=sequences.get(x), structure=files["structures"].get(x), fields=texts.get(x))
                for x in ids if x in sequences or x in files["structures"]]
    log(f"{kind}: {len(ids)} chains in the splits (train/valid/test "
        f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}); {len(proteins)} have a sequence "
        f"or structure and get features, the other {len(ids) - len(proteins)} only labels")
    if not proteins:
        raise FatalError(f"{kind}: no chain of the splits has a sequence or a structure: give the structures "
                         "(torchdrug's archive, or --pdb-dir) or DeepFRI's *_sequences.fasta next to the annotation")
    return proteins, label_sets


# ----------------------------------------------------------------------------- the demo, and --source from the flags

def demo_sets(cfg):
    """demo.write_corpus into <data-dir>/demo, then its FASTA + pdb/ + protdescribe.tsv + DeepFRI-style
    EC and GO files, as one set with labels_ec / go-mf / go-bp / go-cc."""
    import demo
    work = Path(cfg.data_dir) / "demo"
    demo.write_corpus(work, None if cfg.demo_n is None else demo.make_corpus(n=cfg.demo_n))
    files = dict(fasta=str(work / "demo.fasta"), pdb_dir=str(work / "pdb"),
                 protdescribe=str(work / "protdescribe.tsv"), data=str(work), download=False)
    sub = dataclasses.replace(cfg, **files)
    texts = texts_by_id(sub)
    structures = index_structures(sub.pdb_dir)
    proteins = [Protein(pid, sequence=seq, structure=structures.get(pid), fields=texts.get(pid))
                for pid, seq in read_fasta(sub.fasta)]
    label_sets = []
    for kind in ("ec", "go"):
        label_sets += task_proteins(sub, kind, label_source="demo")[1]
    return proteins, label_sets


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
