"""Miniature replicas of the real inputs, written at test time in their upstream on-disk layout.

Each writer makes a small, deterministic copy of a file set the kit reads in real use, with the layout
(names, folders, header lines, line endings, pickle contents) of the original:

- torchdrug's EnzymeCommission.zip / GeneOntology.zip (torchdrug/datasets/enzyme_commission.py,
  gene_ontology.py): an outer zip with <Name>/nrPDB-EC_annot.tsv (DeepFRI's annotation file: '###'
  header blocks, CRLF lines as csv.writer writes them), <Name>/nrPDB-EC_test.csv (DeepFRI's cutoff
  columns) and <Name>/{train,valid,test}.zip of single-chain PDB files <split>/<PDB>-<chain>_<n>.pdb;
  and the folder torchdrug's utils.extract leaves (X.zip -> X/, train.zip -> train/train/*.pdb, the
  processed .pkl.gz next to the annotation).
- AlphaFold DB: AF-<accession>-F1-model_v<k>.pdb.gz with pLDDT in the B-factor column, and the
  tar archive of them (swissprot_pdb_v<k>.tar, members at its top level, as torchdrug's AlphaFoldDB
  globs them).
- ProtST's uniprot_sprot_filtered.tsv (ProtDescribe): header row, tab-separated, rows with more
  fields than the header; id column name and kind (accession / entry name / none) chosen by the test.
- fair-esm checkpoints: ESM-1b ({'args': fairseq Namespace with arch 'roberta_large', 'model' with
  'encoder.sentence_encoder.' keys}) and ESM-2 ({'cfg': {'model': Namespace}, 'model': ...}), both with
  optimizer state, numpy scalars and an object of a class that exists only while the file is written.
- a PubMedBERT-style local model folder (config.json, vocab.txt, tokenizer files, pytorch_model.bin
  of a BertForMaskedLM).
- GearNet-Edge checkpoints: plain state_dict (GearNet's script/pretrain.py), torchdrug Engine.save
  solver checkpoint ({'model': task state_dict, 'optimizer': ...}) and a DDP one ('module.' keys).

Nothing here is a copy of an upstream file; the contents are random or made up.
"""
import argparse
import gzip
import hashlib
import io
import json
import math
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

import extract_features as ef
import gearnet

AA3 = dict(zip(gearnet.RESIDUE_LETTERS, gearnet.RESIDUES))
AMINO = "ACDEFGHIKLMNPQRSTVWY"
SPLITS = ("train", "valid", "test")


def random_sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    return "".join(AMINO[i] for i in torch.randint(len(AMINO), (n,), generator=g).tolist())


# ----------------------------------------------------------------------------- structure files

def atom_record(serial, name, resname, chain, number, xyz, bfactor, element):
    """One PDB ATOM record in its fixed columns (name in columns 13-16, element in 77-78)."""
    x, y, z = xyz
    padded = f" {name:<3}" if len(name) < 4 else name
    return (f"ATOM  {serial:>5} {padded} {resname:>3} {chain}{number:>4}    {x:8.3f}{y:8.3f}{z:8.3f}"
            f"{1.0:6.2f}{bfactor:6.2f}          {element:>2}")


def backbone(seq, seed):
    """N, CA, C, O positions per residue along a slightly perturbed helix (3.8 A C-alpha steps)."""
    g = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(len(seq), 3, generator=g) - 0.5) * 0.4
    out = []
    for i in range(len(seq)):
        t = math.radians(100.0 * i)
        ca = (2.3 * math.cos(t) + jitter[i, 0].item(), 2.3 * math.sin(t) + jitter[i, 1].item(),
              1.5 * i + jitter[i, 2].item())
        out.append({"N": (ca[0] - 1.2, ca[1] + 0.5, ca[2] - 0.3), "CA": ca,
                    "C": (ca[0] + 1.2, ca[1] + 0.4, ca[2] + 0.3), "O": (ca[0] + 1.9, ca[1] + 1.2, ca[2] + 0.2)})
    return out


def pdb_text(seq, chain="A", seed=0, header=(), bfactors=None):
    """A PDB file of one chain: header lines, N/CA/C/O atoms of every residue, TER, END."""
    lines, serial = list(header), 1
    for i, (aa, atoms) in enumerate(zip(seq, backbone(seq, seed))):
        b = bfactors[i] if bfactors is not None else 20.0
        for name, xyz in atoms.items():
            lines.append(atom_record(serial, name, AA3[aa], chain, i + 1, xyz, b, name[0]))
            serial += 1
    lines.append(f"TER   {serial:>5}      {AA3[seq[-1]]:>3} {chain}{len(seq):>4}")
    return "\n".join(lines + ["END"]) + "\n"


def alphafold_pdb_text(accession, seq, version, seed=0):
    """An AlphaFold DB model file: header records naming the accession, one model, pLDDT as B-factor."""
    g = torch.Generator().manual_seed(seed + 7)
    plddt = (50 + 50 * torch.rand(len(seq), generator=g)).tolist()
    seqres = [f"SEQRES {k // 13 + 1:>3} A {len(seq):>4}  " + " ".join(AA3[a] for a in seq[k:k + 13])
              for k in range(0, len(seq), 13)]
    header = ["HEADER                                            01-JUL-21",
              f"TITLE     ALPHAFOLD MONOMER V{version}.0 PREDICTION FOR PROTEIN ({accession})",
              f"DBREF  XXXX A    1  {len(seq):>4}  UNP    {accession:<8} {accession}_X     1  {len(seq):>4}",
              *seqres, "CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1           1",
              "MODEL        1"]
    text = pdb_text(seq, "A", seed, header, plddt)
    return text.replace("\nEND\n", "\nENDMDL\nEND\n")


MMCIF_COLUMNS = ("group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "label_asym_id",
                 "label_entity_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
                 "B_iso_or_equiv", "auth_seq_id", "auth_comp_id", "auth_asym_id", "auth_atom_id", "pdbx_PDB_model_num")


def mmcif_text(seq, chain="A", seed=0, drop_columns=()):
    """An mmCIF file of one chain as the PDB writes them: data_ block, the _atom_site loop (one atom per
    row, N/CA/C/O of every residue), '#' after the loop. drop_columns: leave those columns out."""
    columns = [c for c in MMCIF_COLUMNS if c not in drop_columns]
    rows, serial = [], 1
    for i, (aa, atoms) in enumerate(zip(seq, backbone(seq, seed))):
        for name, (x, y, z) in atoms.items():
            values = {"group_PDB": "ATOM", "id": serial, "type_symbol": name[0], "label_atom_id": name,
                      "label_alt_id": ".", "label_comp_id": AA3[aa], "label_asym_id": chain, "label_entity_id": 1,
                      "label_seq_id": i + 1, "pdbx_PDB_ins_code": "?", "Cartn_x": f"{x:.3f}", "Cartn_y": f"{y:.3f}",
                      "Cartn_z": f"{z:.3f}", "occupancy": "1.00", "B_iso_or_equiv": "20.00", "auth_seq_id": i + 1,
                      "auth_comp_id": AA3[aa], "auth_asym_id": chain, "auth_atom_id": name, "pdbx_PDB_model_num": 1}
            rows.append(" ".join(str(values[c]) for c in columns))
            serial += 1
    header = ["data_REPL", "#", "_entry.id REPL", "#", "loop_"] + [f"_atom_site.{c}" for c in columns]
    return "\n".join(header + rows + ["#", ""])


def write_gz(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


# ----------------------------------------------------------------------------- AlphaFold DB

def write_alphafold_dir(directory, entries, version=2):
    """AF-<acc>-F1-model_v<version>.pdb.gz for entries {accession: sequence}."""
    directory = Path(directory)
    for k, (acc, seq) in enumerate(sorted(entries.items())):
        write_gz(directory / f"AF-{acc}-F1-model_v{version}.pdb.gz", alphafold_pdb_text(acc, seq, version, seed=k))
    return directory


def write_alphafold_tar(tar_path, directory):
    """The tar archive of an AF folder, members at the top level (swissprot_pdb_v<k>.tar)."""
    tar_path = Path(tar_path)
    with tarfile.open(tar_path, "w") as tf:
        for path in sorted(Path(directory).iterdir()):
            tf.add(path, arcname=path.name)
    return tar_path


# ----------------------------------------------------------------------------- ProtDescribe

PROTDESCRIBE_FIELDS = ("ProteinName", "Function", "SubcellularLocation", "Similarity", "Sequence")


def protdescribe_text(rows, id_column="Entry", extra=()):
    """ProtST's uniprot_sprot_filtered.tsv: a header row, then one tab-separated row per entry.
    rows: [dict(id=..., Sequence=..., ProteinName=..., ...)]; id_column None leaves the id out.
    extra: indices of rows that get stray additional fields at the end (more fields than the header)."""
    header = ([id_column] if id_column else []) + list(PROTDESCRIBE_FIELDS)
    lines = ["\t".join(header)]
    for k, r in enumerate(rows):
        values = ([r["id"]] if id_column else []) + [r.get(f, "") for f in PROTDESCRIBE_FIELDS]
        if k in extra:
            values += ["ECO:0000269|PubMed:12345", "stray"]
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


def protdescribe_rows(entries, names=None):
    """Rows for protdescribe_text from {id: sequence}; names: {id: entry name} (LYSC_CHICK style)."""
    words = ["Lysozyme C", "Kinase A", "Membrane transporter", "Ribosomal protein L22", "Heme oxidase"]
    rows = []
    for k, (pid, seq) in enumerate(sorted(entries.items())):
        rows.append({"id": (names or {}).get(pid, pid), "Sequence": seq, "ProteinName": words[k % len(words)],
                     "Function": f"Catalyzes reaction {k} with ATP." if k % 3 else "",
                     "SubcellularLocation": "Cytoplasm." if k % 2 else "Membrane; Single-pass membrane protein.",
                     "Similarity": f"Belongs to the family {k % 4}."})
    return rows


# ----------------------------------------------------------------------------- DeepFRI files / torchdrug archives

def deepfri_annotation(kind, terms, labels):
    """DeepFRI's annotation TSV as its preprocessing scripts write it (csv.writer, tab, CRLF lines).
    kind "ec": terms [..], labels {chain: [..]}; kind "go": terms {"mf": [..], "bp": [..], "cc": [..]},
    labels {chain: {"mf": [..], ...}}."""
    rows = []
    if kind == "ec":
        rows += [["### EC-numbers"], terms, ["### PDB-chain", "EC-numbers"]]
        rows += [[c, ",".join(t)] for c, t in labels.items()]
    else:
        onts = {"mf": "molecular_function", "bp": "biological_process", "cc": "cellular_component"}
        for key, ont in onts.items():
            rows += [[f"### GO-terms ({ont})"], terms[key], [f"### GO-names ({ont})"],
                     [f"name of {t}" for t in terms[key]]]
        rows.append(["### PDB-chain"] + [f"GO-terms ({ont})" for ont in onts.values()])
        rows += [[c] + [",".join(t.get(k, [])) for k in onts] for c, t in labels.items()]
    return "".join("\t".join(r) + "\r\n" for r in rows)


def test_csv(identity):
    """DeepFRI's *_test.csv: chain, then 0/1 for each sequence-identity cutoff."""
    lines = ["PDB-chain,<30%,<40%,<50%,<70%,<95%"] + [f"{c}," + ",".join(map(str, v)) for c, v in identity.items()]
    return "\n".join(lines) + "\n"


def task_replica(kind, n_per_split=(4, 2, 3), seed=0):
    """A small EC or GO set: {"splits": {split: [(chain, sequence)]}, "annot": text, "test_csv": text,
    "labels": {chain: ...}}, deterministic."""
    splits, k = {}, 0
    for split, n in zip(SPLITS, n_per_split):
        splits[split] = []
        for _ in range(n):
            chain = f"{k + 1}{'ABC'[k % 3]}{k:02d}-{'AB'[k % 2]}"
            splits[split].append((chain, random_sequence(30 + 3 * k, seed + k)))
            k += 1
    chains = [c for s in splits.values() for c, _ in s]
    if kind == "ec":
        terms = ["1.1.1.1", "2.7.11.1", "3.4.21.-", "3.2.2.9"]
        labels = {c: [terms[i % 4], terms[(i + 1) % 4]] if i % 2 else [terms[i % 4]] for i, c in enumerate(chains)}
    else:
        terms = {"mf": ["GO:0003824", "GO:0005524", "GO:0046872"], "bp": ["GO:0008152", "GO:0006810"],
                 "cc": ["GO:0005737", "GO:0016020"]}
        labels = {c: {"mf": [terms["mf"][i % 3]], "bp": [terms["bp"][i % 2]] if i % 3 else [],
                      "cc": [terms["cc"][i % 2]]} for i, c in enumerate(chains)}
    identity = {c: [int(i % 2 == 0), 1, 1, 1, 1] for i, (c, _) in enumerate(splits["test"])}
    return {"splits": splits, "annot": deepfri_annotation(kind, terms, labels), "test_csv": test_csv(identity),
            "labels": labels, "terms": terms}


def zip_bytes(members):
    """A zip (deflated, with folder entries as `zip -r` makes them) of {name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        folders = sorted({"/".join(n.split("/")[:k]) + "/" for n in members for k in range(1, n.count("/") + 1)})
        for folder in folders:
            z.writestr(zipfile.ZipInfo(folder, date_time=(2022, 6, 8, 0, 0, 0)), b"")
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2022, 6, 8, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def write_torchdrug_zip(directory, kind, replica):
    """torchdrug's EnzymeCommission.zip / GeneOntology.zip in `directory`; returns (path, md5)."""
    name = ef.TORCHDRUG_ZIPS[kind][0]
    tag = kind.upper()
    members = {f"{name}/nrPDB-{tag}_annot.tsv": replica["annot"].encode(),
               f"{name}/nrPDB-{tag}_test.csv": replica["test_csv"].encode()}
    for split, chains in replica["splits"].items():
        inner = {f"{split}/{chain}_{n + 1}.pdb": pdb_text(seq, chain[-1], seed=n).encode()
                 for n, (chain, seq) in enumerate(chains)}
        members[f"{name}/{split}.zip"] = zip_bytes(inner)
    path = Path(directory) / f"{name}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(members))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def torchdrug_extract(zip_path):
    """What torchdrug leaves on disk after EnzymeCommission(path) / GeneOntology(path): utils.extract puts
    X.zip's members in X/ (so the data sit in X/<Name>/), each <split>.zip in <split>/ (so the chains sit
    in <split>/<split>/*.pdb), and the dataset pickles itself next to the annotation. Returns X/."""
    zip_path = Path(zip_path)
    outer = zip_path.with_suffix("")
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(outer)
    base = outer / outer.name
    for split in SPLITS:
        with zipfile.ZipFile(base / f"{split}.zip") as z:
            z.extractall(base / split)
    processed = "enzyme_commission.pkl.gz" if outer.name == "EnzymeCommission" else "gene_ontology.pkl.gz"
    (base / processed).write_bytes(gzip.compress(b"torchdrug's processed dataset (not read by the kit)", mtime=0))
    return outer


# ----------------------------------------------------------------------------- checkpoints

class _Pickled:
    """Base of classes that exist only while a replica is written (see foreign_class)."""

    def __init__(self, **state):
        self.__dict__.update(state)


def foreign_class(module, name):
    """A class registered as <module>.<name> (e.g. fairseq.meters.StopwatchMeter) just long enough to pickle
    its objects: unpickling them by reference later fails (the module does not exist) or, with the module
    installed, would run its code. Returns (class, cleanup)."""
    mod = types.ModuleType(module)
    cls = type(name, (_Pickled,), {"__module__": module})
    setattr(mod, name, cls)
    parts = module.split(".")
    added = [".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) not in sys.modules]
    for k, m in enumerate(added):
        sys.modules[m] = mod if m == module else types.ModuleType(m)

    def cleanup():
        for m in added:
            sys.modules.pop(m, None)
    return cls, cleanup


def training_state(params):
    """Optimizer and trainer state as fairseq-style checkpoints carry it: tensors, numpy scalars, and an
    object of a foreign class."""
    meter_cls, cleanup = foreign_class("fairseq.meters", "StopwatchMeter")
    first = next(iter(params.values()))
    state = {
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": np.float64(2.314)}, "num_updates": np.int64(500000)}],
        "extra_state": {"epoch": 14, "val_loss": np.float32(2.31), "train_meters": {"wall": meter_cls(sum=12.5, n=3)},
                        "rng": np.random.RandomState(0).get_state()},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(500000.0), "exp_avg": torch.zeros_like(first),
                                               "exp_avg_sq": torch.zeros_like(first)}},
                                 "param_groups": [{"lr": [1e-4], "betas": (0.9, 0.98), "eps": 1e-8, "params": [0]}]},
    }
    return state, cleanup


def esm_file_keys(state_dict):
    """fair-esm model keys -> the fairseq names its .pt files use."""
    return {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
            for k, v in state_dict.items() if not k.startswith("contact_head")}


def write_esm1b(path, layers=33, dim=32, heads=4, seed=0):
    """An ESM-1b-format checkpoint of a small model (33 layers as ESM-1b, width `dim`); returns the model
    as fair-esm builds it from the file (for reference outputs)."""
    import esm
    args = argparse.Namespace(arch="roberta_large", encoder_layers=layers, encoder_embed_dim=dim,
                              encoder_ffn_embed_dim=2 * dim, encoder_attention_heads=heads, max_positions=1024,
                              dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_fn="gelu",
                              encoder_layerdrop=0.0, token_dropout=True, criterion="masked_lm", task="masked_lm",
                              optimizer="adam", lr=[1e-4], max_tokens=4096, seed=1, data="/data/uniref50")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model_args = argparse.Namespace(arch="roberta_large", layers=layers, embed_dim=dim, ffn_embed_dim=2 * dim,
                                    attention_heads=heads, max_positions=1024, token_dropout=True,
                                    emb_layer_norm_before=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = esm.model.esm1.ProteinBertModel(model_args, alphabet).eval()
    with torch.no_grad():
        model.embed_tokens.weight[alphabet.mask_idx] = 0  # as fair-esm zeroes it on loading
    extra, cleanup = training_state(model.state_dict())
    try:
        torch.save({"args": args, "model": esm_file_keys(model.state_dict()), **extra}, path)
    finally:
        cleanup()
    return model


def write_esm2(path, layers=6, dim=32, heads=4, seed=0):
    """An ESM-2-format checkpoint ({'cfg': {'model': Namespace, ...}, 'model': ...}) of a small model."""
    import esm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, token_dropout=True).eval()
    cfg = {"model": argparse.Namespace(_name="esm2", encoder_layers=layers, encoder_embed_dim=dim,
                                       encoder_ffn_embed_dim=4 * dim, encoder_attention_heads=heads,
                                       token_dropout=True, dropout=0.0, max_positions=1024),
           "task": argparse.Namespace(_name="masked_lm", data="/data/uniref50"),
           "optimization": {"lr": [4e-4], "max_update": 500000}, "common": {"seed": 1, "fp16": True}}
    extra, cleanup = training_state(model.state_dict())
    try:
        torch.save({"cfg": cfg, "model": esm_file_keys(model.state_dict()), **extra}, path)
    finally:
        cleanup()
    return model


class Malicious:
    """Unpickling this runs a shell command (pickle calls what __reduce__ returns)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def write_bert_dir(directory, hidden=32, layers=2, heads=4, seed=0):
    """A PubMedBERT-style model folder: config.json of a BertForMaskedLM, vocab.txt (uncased WordPiece),
    tokenizer_config.json, special_tokens_map.json, pytorch_model.bin ('bert.' and 'cls.' keys)."""
    from transformers import BertConfig, BertForMaskedLM
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ef.tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=512,
                        architectures=["BertForMaskedLM"])
    (directory / "config.json").write_text(config.to_json_string())
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config).eval()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def write_gearnet_checkpoints(directory, hidden=(16, 16, 16), seed=0, n_classes=4):
    """GearNet-Edge weights three ways: plain.pth (script/pretrain.py's torch.save(model.state_dict())),
    solver.pth (torchdrug Engine.save of a MultipleBinaryClassification task: 'model.' GearNet keys, the
    'mlp.' head, and the optimizer) and ddp.pth (the state_dict of a DDP-wrapped model: 'module.' keys).
    Returns ({name: path}, the GearNet state_dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = gearnet.tiny_gearnet(seed=seed, hidden_dims=hidden).state_dict()
    head = {"mlp.layers.0.weight": torch.zeros(sum(hidden), sum(hidden)), "mlp.layers.0.bias": torch.zeros(sum(hidden)),
            "mlp.layers.1.weight": torch.zeros(n_classes, sum(hidden)), "mlp.layers.1.bias": torch.zeros(n_classes)}
    task = {**{f"model.{k}": v for k, v in sd.items()}, **head}
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                   "amsgrad": False, "params": list(range(len(task)))}]}
    paths = {"plain": directory / "plain.pth", "solver": directory / "solver.pth", "ddp": directory / "ddp.pth"}
    torch.save(sd, paths["plain"])
    torch.save({"model": task, "optimizer": optimizer}, paths["solver"])
    torch.save({f"module.{k}": v for k, v in sd.items()}, paths["ddp"])
    return paths, sd
