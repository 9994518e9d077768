"""
Finetune a pretrained AMMA encoder on protein function prediction (paper B.2): EC, GO-MF, GO-CC, GO-BP.

seq + str features enter the fusion encoder without masking, the [CLS] output (first token) goes to
two fully connected layers (Linear(D, D), ReLU, Linear(D, classes)), and binary cross-entropy with
logits is taken over the task's classes. ESM, Proj, the fusion encoder and the head are trained
together (the paper's protocol, the default on real ESM features); --esm frozen keeps ESM out of it.

    python finetune.py --task go-mf                       # no features/go: the built-in demo (see below)
    python finetune.py --task ec --ckpt runs/amma/checkpoint.pt            # features/ec, the paper's protocol
    python finetune.py --task go-bp --ckpt runs/amma/checkpoint.pt --cutoff 50   # test chains <50% identity
    python finetune.py --task go-cc --from-scratch                         # no pretraining (a baseline)
    python finetune.py --task ec --baseline esm                            # Table 2's ESM-1b row (no AMMA)
    python metrics.py runs/amma/ec/predictions.npz                         # recompute results.json's numbers
    python finetune.py --task ec --ckpt runs/amma/checkpoint.pt --esm frozen     # cached ESM features (fast)
    python finetune.py --task go-bp --ckpt runs/amma/checkpoint.pt --esm-checkpointing   # less GPU memory
    python finetune.py --task ec --ckpt runs/amma/checkpoint.pt --resume         # continue after a stop
    torchrun --nproc_per_node 4 finetune.py --task go-bp --ckpt runs/amma/checkpoint.pt   # 4 x 1 of GO-BP's 4

Data: features/ec (task ec) or features/go (go-*), written by extract_features.py, and its
labels_<task>.json (terms, class indices per protein, train/valid/test splits, test_identity).
Every test chain is scored; a cutoff c keeps the chains whose test_identity[id][c] is 1 (a chain
without an entry is kept, as torchdrug does). results.json's "test" is the --cutoff one (95, the
paper's), "test_cutoffs" holds every cutoff of the file (30 40 50 70 95, torchdrug's test_cutoffs),
all at the epoch selected on validation. Output: runs/<name>/<task>/ (name = the checkpoint's
folder, 'scratch' with --from-scratch, 'esm-1b' with --baseline esm): results.json (valid and test
Fmax / AUPR per epoch, the epoch selected by validation Fmax, config, seed, proteins per split,
whether tiny/synthetic features were used, a label-frequency baseline, the protocol),
predictions.npz (the selected epoch's valid and test logits, labels, ids and cutoff membership,
metrics.py's format: `python metrics.py PATH` gives results.json's numbers), checkpoint.pt (every
epoch, every 30 minutes and on SIGTERM / Ctrl-C, for --resume) and best.pt (weights of the selected epoch). A table in the layout of the
paper's Table 2 is printed at the end.

Demo: with no --features, no --ckpt and no features/ec|go (or with --demo), the run uses the
built-in synthetic demo (demo.ensure_demo_features("features/demo")), the demo pretraining
runs/demo/checkpoint.pt (made first with amma.py's DEMO preset when absent) and a demo finetuning
preset (DEMO_FT), and prints our Fmax next to the label-frequency baseline (every term scored by its
train-set frequency). It takes under a minute on 2 CPU cores, the pretraining included; run again, it shows the finished run.

Choices, stated once (the README repeats them):
- Paper settings per task are the defaults (PAPER): batch 1 (EC, GO-MF, GO-CC) / 4 (GO-BP); 100 epochs
  EC, 50 GO; AdamW for EC and GO-BP, Adam for GO-MF and GO-CC; ExponentialLR gamma 0.95 per epoch.
- Learning rates: the paper gives 1e-5 for Enc_multi, Enc_seq and Proj_str and 1e-4 for the head. We
  put EVERY pretrained parameter at --lr 1e-5 (also Proj_seq, the learned modality embeddings and
  [CLS]; and ESM with --esm finetune) and the head at --lr-head 1e-4. From scratch uses the same groups.
- Weight decay: the paper names the optimisers only; we use torch's defaults for them, on every
  parameter: Adam 0 and AdamW 0.01 (--weight-decay overrides).
- Protocol: --esm auto (default) runs the sequence encoder in the loop, trained with the rest (the
  paper's B.2, 'esm-finetune'), when info.json says the features came from a real fair-esm model: the
  model named there (ESM-1b layer 33 by default, BOS/EOS dropped, first 1022 residues), rebuilt from
  the weights recorded there or --esm-weights, on the manifest's 'sequence' column; its unused heads
  (lm_head, contact_head) stay frozen. Otherwise (the synthetic demo, tiny features) and with --esm
  frozen it reads the cached sequence features ('esm-frozen', fast, not the paper's protocol).
- Batches are global (--batch-size is the paper's number): under torchrun the processes split each
  batch and the loss is the whole batch's mean, so 1, 2 or 4 processes give the same training at
  GO-BP's batch of 4; the batch-1 tasks cannot be split (run them side by side, one per GPU).
- An AMMA-contrastive checkpoint is finetuned on its sequence latent Enc_con(Proj_seq(mean seq))
  (eq. 14); structure features are not used there, as in its pretraining the sequence side is the encoder.
- Epoch selection: the epoch with the best validation Fmax (the first one on ties); its test numbers
  are reported. Test metrics are computed every epoch (cheap) so results.json has the whole curve.
- Evaluation under DDP: rank r scores proteins r, r + world, ... (no padding), the shards are
  gathered with all_gather_object and put back in order, so every protein counts exactly once.
"""
import argparse
import contextlib
import io
import json
import os
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import amma
import cache
import runs
from amma import arg
from metrics import CUTOFFS, TASKS, aupr, cutoff_members, fmax, paper_row, save_predictions

PAPER = {  # B.2
    "ec": dict(batch_size=1, epochs=100, optimizer="adamw"),
    "go-mf": dict(batch_size=1, epochs=50, optimizer="adam"),
    "go-cc": dict(batch_size=1, epochs=50, optimizer="adam"),
    "go-bp": dict(batch_size=4, epochs=50, optimizer="adamw"),
}
TABLE2 = paper_row("Table 2", "amma")            # AMMA's row, percent (metrics.PAPER_TABLES is the one home)
TABLE2_ESM = paper_row("Table 2", "esm-1b")      # the ESM-1b row (--baseline esm)
WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01}   # torch's defaults; the paper gives none
# The demo finetuning: the synthetic demo (168 train proteins) learns in well under a CPU minute.
DEMO_FT = dict(epochs=6, batch_size=8, lr=2e-4, lr_head=2e-3, optimizer="adamw", num_workers=0, eval_batch_size=64)
MODALITY_SETS = ("seq,str", "seq")   # --modalities
UNUSED_KEYS = ("l.", "dec.", "dec_modality_embed", "target_")   # pretraining-only parts of an AMMA checkpoint


@dataclass
class FinetuneConfig(amma.RunConfig):
    task: str = arg("go-mf", "downstream task", choices=TASKS)
    ckpt: str = arg("", "AMMA pretraining checkpoint (runs/<name>/checkpoint.pt)")
    from_scratch: bool = arg(False, "random-init encoder instead of --ckpt (a no-pretraining baseline)")
    baseline: str = arg("", "esm: Table 2's ESM-1b row, no AMMA: the sequence encoder's per-residue outputs, "
                        "averaged over residues, into the same two-layer head, trained with the paper's B.2 "
                        "settings (ESM in the loop on real features; on synthetic/tiny features without a "
                        "real ESM, the head on the frozen cached seq features, marked esm-frozen)",
                        choices=("", "esm"))
    features: str = arg("", "feature set with labels_<task>.json (default features/ec for ec, features/go for go-*)")
    out: str = arg("", "output folder (default runs/<checkpoint folder>/<task>, runs/scratch/<task>)")
    esm: str = arg("auto", "finetune: ESM in the loop on the manifest's sequences, trained with the rest (the "
                    "paper's B.2 protocol); frozen: the cached sequence features, ESM not updated (faster); auto: "
                    "finetune when info.json says the features came from a real ESM model, else frozen",
                    choices=("auto", "finetune", "frozen"))
    esm_weights: str = arg("", "local weights of the feature set's ESM model for --esm finetune (default: the "
                            "path in info.json, else fair-esm's cache/download)")
    esm_checkpointing: bool = arg(False, "activation checkpointing of the ESM layers (--esm finetune): much "
                                   "less memory for about a third more time")
    modalities: str = arg("seq,str", "what the encoder sees: seq,str (the paper) or seq (sequence alone: no "
                           "structure is read; pretraining saw proteins without one, eq. 12)", choices=MODALITY_SETS)
    readout: str = arg("cls", "protein vector for the head: cls (the [CLS] output, B.2) or mean (mean of the "
                        "sequence tokens' outputs; [CLS]'s own output is unsupervised in pretraining)", choices=("cls", "mean"))
    cutoff: int = arg(95, "test-set sequence identity cutoff (%%): keep chains with test_identity[id][cutoff] == 1",
                       choices=CUTOFFS)
    epochs: int = arg(None, "epochs (paper: 100 EC, 50 GO)")
    batch_size: int = arg(None, "GLOBAL proteins per step (paper: 1 EC/GO-MF/GO-CC, 4 GO-BP): torchrun's "
                           "processes split it")
    grad_accum: int = arg(1, "micro-batches per process and step (the same global batch in smaller pieces)")
    optimizer: str = arg(None, "paper: adamw for EC and GO-BP, adam for GO-MF and GO-CC", choices=("adam", "adamw"))
    lr: float = arg(1e-5, "lr of every pretrained parameter (Proj, embeddings, [CLS], Enc_multi, ESM)")
    lr_head: float = arg(1e-4, "lr of the two-layer head")
    weight_decay: float = arg(None, "weight decay of all parameters (default: torch's, adam 0, adamw 0.01)")
    gamma: float = arg(0.95, "ExponentialLR decay per epoch")
    eval_batch_size: int = arg(16, "proteins per evaluation batch (sorted by length)")
    max_len: int = arg(1022, "residues per protein (the first max_len are kept)")
    seed: int = arg(0, "random seed (head init, batch order, dropout)")
    log_every: int = arg(50, "steps between reads of the loss from the device (the progress bar's figure)")
    demo: bool = arg(False, "use the built-in demo (automatic when the feature set does not exist)")


# ----------------------------------------------------------------------------------------------
# labels and splits (labels_<task>.json, written by extract_features.write_labels and demo.py)

def read_labels(path, task):
    """labels_<task>.json with every class given as an index into its term list (term strings are
    mapped); one-line SystemExit on a missing file, another task, unknown terms or bad indices."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: {path} not found: extract_features.py --source {'ec' if task == 'ec' else 'go'} "
                         "writes it next to the features")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None
    missing = [k for k in ("terms", "labels", "splits") if k not in data]
    if missing:
        raise SystemExit(f"error: {path}: no {', '.join(missing)} entry")
    if data.get("task", task) != task:
        raise SystemExit(f"error: {path} holds labels of task {data['task']!r}, not {task!r}")
    terms = data["terms"]
    index = {t: i for i, t in enumerate(terms)}
    labels = {}
    for pid, ys in data["labels"].items():
        labels[pid] = []
        for y in ys:
            if isinstance(y, str) and y in index:
                y = index[y]
            elif isinstance(y, str):
                raise SystemExit(f"error: {path}: protein {pid} has term {y!r}, which is not in the file's "
                                 f"{len(terms)} terms")
            if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(terms):
                raise SystemExit(f"error: {path}: protein {pid} has class {y!r}, but the classes are "
                                 f"0..{len(terms) - 1} (one per term)")
            labels[pid].append(y)
    for split in ("train", "valid", "test"):
        ids = data["splits"].get(split)
        if not ids and split != "test":
            raise SystemExit(f"error: {path}: the {split} split is empty")
        unlabelled = [x for x in ids or [] if x not in labels]
        if unlabelled:
            raise SystemExit(f"error: {path}: {len(unlabelled)} {split} ids have no labels entry, e.g. {unlabelled[0]}")
    return {**data, "labels": labels}


def apply_cutoff(test_ids, test_identity, cutoff):
    """Test ids kept at a sequence-identity cutoff: those whose test_identity[id][str(cutoff)] is 1
    (all of them when the file has no test_identity; a chain without an entry is kept)."""
    if not test_identity:
        return list(test_ids)
    key = str(cutoff)
    if not any(key in v for v in test_identity.values()):
        raise SystemExit(f"error: test_identity has no '{key}' column: cutoffs in the file are "
                         f"{sorted({k for v in test_identity.values() for k in v})}")
    if test_ids and not any(x in test_identity for x in test_ids):
        raise SystemExit("error: no test id has a test_identity entry (do the id formats differ?): --cutoff "
                         "would keep every test chain")
    return [x for x in test_ids if int(test_identity.get(x, {}).get(key, 1)) == 1]


def label_matrix(ids, labels, n_classes):
    """Dense 0/1 targets [len(ids), n_classes]."""
    y = torch.zeros(len(ids), n_classes)
    for i, pid in enumerate(ids):
        y[i, labels[pid]] = 1.0
    return y


# ----------------------------------------------------------------------------------------------
# data

class TaskSet(torch.utils.data.Dataset):
    """One split: cached features of `ids` (seq, unless ESM runs in the loop, and str where present),
    the row k of the split's label matrix, and the residue sequence when ESM runs in the loop."""

    def __init__(self, root, rows, ids, targets, esm_in_loop, max_len, modalities=("seq", "str")):
        self.root, self.rows, self.ids, self.targets = Path(root), rows, list(ids), targets
        self.esm_in_loop, self.max_len, self.modalities = esm_in_loop, max_len, tuple(modalities)
        self.cached = tuple(m for m in (("str",) if esm_in_loop else ("seq", "str")) if m in self.modalities)
        self.lengths = [min(rows[x]["L"], max_len) for x in self.ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        row = self.rows[self.ids[k]]
        item = {"id": row["id"], "index": k, "target": self.targets[k], "seq": None, "str": None, "func": None}
        for m in self.cached:
            if m in row["modalities"]:
                item[m] = cache.read_feature(self.root, m, row["id"])[: self.max_len]
        if self.esm_in_loop:
            item["sequence"] = row["sequence"][: self.max_len]
        n = {m: len(item[m]) for m in ("seq", "str", "sequence") if item.get(m) is not None}
        if len(set(n.values())) > 1:
            raise ValueError(f"{self.root}: protein {row['id']}: lengths differ ({n}); re-extract it")
        return item


def collate_task(items, vocab=None):
    """cache.collate (ids, seq/str [B, L, d], lengths [B]) plus index [B] and target [B, C]; with ESM in the
    loop also its tokens [B, W + 2] (vocab: esm_vocab), made here in the loader worker."""
    batch = cache.collate(items)
    batch["index"] = torch.tensor([it["index"] for it in items])
    if "target" in items[0]:
        batch["target"] = torch.stack([it["target"] for it in items])
    if "sequence" in items[0] and vocab is None:                 # tokenised by the model (a host step)
        batch["sequence"] = [it["sequence"] for it in items]
    elif "sequence" in items[0]:
        width = batch["str"].shape[1] if "str" in batch else cache.padded_length(max(len(it["sequence"]) for it in items))
        batch["tokens"] = esm_tokens([it["sequence"] for it in items], vocab, width)
        batch["seq_len"] = torch.tensor([len(it["sequence"]) for it in items])
    return batch


def esm_vocab(alphabet):
    """What tokenising needs of a fair-esm Alphabet, as plain data (for the loader workers): a byte ->
    token table (unknown letters -> <unk>), the special tokens and whether BOS / EOS are added."""
    table = torch.full((256,), alphabet.unk_idx, dtype=torch.long)
    for tok, i in alphabet.tok_to_idx.items():
        if len(tok) == 1:
            table[ord(tok)] = i
    return dict(table=table, pad=alphabet.padding_idx, bos=alphabet.cls_idx, eos=alphabet.eos_idx,
                prepend_bos=bool(alphabet.prepend_bos), append_eos=bool(alphabet.append_eos))


def esm_tokens(sequences, vocab, width):
    """Token ids [B, bos + width + eos] as fair-esm's BatchConverter makes them (BOS, residues, EOS,
    padding), the residues padded to `width` (a padded_length: few shapes); one table look-up per protein."""
    bos, eos = int(vocab["prepend_bos"]), int(vocab["append_eos"])
    tokens = torch.full((len(sequences), bos + width + eos), vocab["pad"], dtype=torch.long)
    for b, s in enumerate(sequences):
        ids = vocab["table"][torch.frombuffer(bytearray(s.encode("ascii", "replace")), dtype=torch.uint8).long()]
        tokens[b, bos:bos + len(s)] = ids
        if bos:
            tokens[b, 0] = vocab["bos"]
        if eos:
            tokens[b, bos + len(s)] = vocab["eos"]
    return tokens


def read_info(root):
    try:
        return json.loads((Path(root) / "info.json").read_text())
    except (OSError, ValueError):
        return {}


def load_task(cfg):
    """Labels, splits (test after the cutoff) and one TaskSet per split; prints what was left out.
    --esm auto is resolved here, from the set's info.json (esm_protocol)."""
    root = Path(cfg.features)
    if not (root / "manifest.tsv").exists():
        source = "ec" if cfg.task == "ec" else "go"
        raise SystemExit(f"error: no feature set at {root} (manifest.tsv missing): run extract_features.py --source "
                         f"{source} --out {root} first (without --features and --ckpt: the built-in demo)")
    info = read_info(root)
    cfg.esm = esm_protocol(cfg, info)
    data = read_labels(root / f"labels_{cfg.task}.json", cfg.task)
    splits = {s: list(data["splits"].get(s) or []) for s in ("train", "valid", "test")}
    n_test_all = len(splits["test"])
    at_cutoff = apply_cutoff(splits["test"], data.get("test_identity") or {}, cfg.cutoff)   # checks the column
    if len(at_cutoff) < n_test_all:
        print(f"test: {len(at_cutoff)} of {n_test_all} chains at <{cfg.cutoff}% identity (reported as 'test'); every "
              "chain is scored, each cutoff a subset (results.json test_cutoffs)")
    rows = {r["id"]: r for r in cache.read_manifest(root)}
    needed = "str" if cfg.esm == "finetune" else "seq"
    if cfg.esm == "finetune" and any(not r.get("sequence") for r in rows.values()):
        raise SystemExit(f"error: {root}/manifest.tsv has no 'sequence' for some proteins: --esm finetune needs it")
    missing = {}
    for s, ids in splits.items():
        keep = [x for x in ids if x in rows and (needed in rows[x]["modalities"] or cfg.esm == "finetune")]
        missing[s] = len(ids) - len(keep)
        splits[s] = keep
        if missing[s]:
            print(f"note: {missing[s]} of {len(ids)} {s} proteins have no features in {root}: left out")
    for s in ("train", "valid", "test"):
        if not splits[s]:
            raise SystemExit(f"error: no {s} protein of labels_{cfg.task}.json has features in {root}")
    n_classes = len(data["terms"])
    sets = {s: TaskSet(root, rows, ids, label_matrix(ids, data["labels"], n_classes), cfg.esm == "finetune",
                       cfg.max_len, cfg.modalities.split(",")) for s, ids in splits.items()}
    counts = {**{s: len(ids) for s, ids in splits.items()}, "test_before_cutoff": n_test_all,
              "left_out_no_features": missing}
    return data, sets, info, counts


def encoder_dims(root, esm, modalities=("seq", "str")):
    """seq/str widths the encoder will see (ESM's width when it runs in the loop): info.json's, else read
    from the files of `modalities` only (--modalities seq opens no structure file)."""
    dims = {m: d for m, d in cache.feature_dims_recorded(root).items() if m in modalities}
    for row in cache.read_manifest(root) if len(dims) < len(modalities) else ():
        for m in [m for m in modalities if m in row["modalities"] and m not in dims]:
            dims[m] = cache.load_tensor(Path(root) / m / cache.feature_file(row["id"])).shape[1]
        if len(dims) == len(modalities):
            break
    if esm is not None:
        dims["seq"] = esm.width
    return dims


# ----------------------------------------------------------------------------------------------
# model

class SeqInLoop(nn.Module):
    """A fair-esm model run on token ids made in the loader (collate_task): per-residue features of one
    layer, BOS/EOS dropped, [B, W, d] with zeros past each length. Its forward is the kit's own over
    fair-esm's modules (esm_layer_outputs): attention through scaled_dot_product_attention (fused kernels,
    bf16 softmax under autocast) and no host round trip. Its heads (lm_head, contact_head) and any layer
    after `layer` are frozen: the representation does not use them. checkpointing=True recomputes each
    layer's activations in the backward pass instead of storing them (memory of one layer, not 33)."""

    def __init__(self, model, alphabet, layer, checkpointing=False):
        super().__init__()
        self.model, self.layer = model, layer
        self.vocab = esm_vocab(alphabet)
        self.bos = int(alphabet.prepend_bos)
        self.width = model.embed_tokens.embedding_dim
        tied = {id(p) for p in model.embed_tokens.parameters()}
        frozen = [model.lm_head, getattr(model, "contact_head", None), *model.layers[layer:]]
        for head in frozen:
            for p in head.parameters() if head is not None else ():
                if id(p) not in tied:
                    p.requires_grad_(False)
        if checkpointing:
            model.layers = nn.ModuleList(Checkpointed(layer) for layer in model.layers)

    def forward(self, tokens, lengths):
        rep = esm_representation(self.model, tokens, self.layer)                       # [B, T, d]
        W = tokens.shape[1] - self.bos - int(self.vocab["append_eos"])
        x = rep[:, self.bos:self.bos + W]                                              # [B, W, d]
        valid = torch.arange(W, device=x.device)[None, :] < lengths[:, None]           # [B, W]
        return {"seq": x * valid[..., None], "seq_len": lengths}


def esm_attention(attn, x, allowed):
    """fair-esm's MultiheadAttention (q scaled, rotary for ESM-2) as one scaled_dot_product_attention.
    x [B, T, E]; allowed [B, 1, 1, T] (True = attend) or None."""
    B, T, E = x.shape
    H = attn.num_heads
    q, k, v = (proj(x).view(B, T, H, E // H).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = q * attn.scaling                                                               # (B, H, T, hd)
    if attn.rot_emb is not None:
        q, k = attn.rot_emb(q, k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)       # (B, H, T, hd)
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, E))


def esm_layer(layer, x, allowed):
    """fair-esm's pre-LN TransformerLayer: attention and the GELU MLP, each with its residual."""
    x = x + esm_attention(layer.self_attn, layer.self_attn_layer_norm(x), allowed)
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))              # erf GELU, as fair-esm


def esm_representation(model, tokens, layer):
    """The representation fair-esm returns for `layer` (model(tokens, repr_layers=[layer])), computed by
    the kit: embeddings (ESM-2's token-dropout scaling, ESM-1b's learned positions), the layers up to
    `layer` and, for the last one, emb_layer_norm_after. Padding tokens are masked as keys; no `.any()`."""
    if any(getattr(l, "layer", l).self_attn.bias_k is not None for l in model.layers):              # ESM-1 (not 1b): fair-esm's forward
        return model(tokens, repr_layers=[layer])["representations"][layer]
    padding = tokens.eq(model.padding_idx)                                             # [B, T]
    x = model.embed_scale * model.embed_tokens(tokens)
    if getattr(model, "token_dropout", False) or getattr(getattr(model, "args", None), "token_dropout", False):
        masked = tokens.eq(model.mask_idx)
        x = x.masked_fill(masked[..., None], 0.0)
        observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)
        x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
    if getattr(model, "embed_positions", None) is not None:                          # ESM-1b
        x = x + model.embed_positions(tokens)
        if getattr(model, "emb_layer_norm_before", None):
            x = model.emb_layer_norm_before(x)
    x = x * (1 - padding[..., None].type_as(x))
    allowed = ~padding[:, None, None, :]                                               # (B, 1, 1, T)
    for l in model.layers[:layer]:
        if isinstance(l, Checkpointed) and l.training and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(esm_layer, l.layer, x, allowed, use_reentrant=False)
        else:
            x = esm_layer(getattr(l, "layer", l), x, allowed)
    return model.emb_layer_norm_after(x) if layer == len(model.layers) else x


class Checkpointed(nn.Module):
    """A layer whose activations are recomputed in the backward pass (torch.utils.checkpoint)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def esm_protocol(cfg, info):
    """'finetune' (ESM in the loop, the paper's B.2) or 'frozen' (cached features), resolving --esm auto
    from info.json: finetune when the features came from a real fair-esm model."""
    import extract_features as ef
    if cfg.esm != "auto":
        return cfg.esm
    return "finetune" if ef.is_real_esm(info) else "frozen"


def build_esm(info, cfg, device):
    """The sequence encoder that made the feature set (info.json), for ESM in the loop: the model named
    there from --esm-weights, the weights path in info.json or fair-esm's cache; the tiny ESM-2 for
    tiny sets."""
    import extract_features as ef
    if info.get("synthetic") or not info.get("encoders", {}).get("seq"):
        raise SystemExit(f"error: --esm finetune needs features made by ESM, but {cfg.features} has "
                         f"{'synthetic' if info.get('synthetic') else 'no info.json with'} sequence features; "
                         "use --esm frozen")
    try:
        model, alphabet, layer, label = ef.load_sequence_encoder(info, cfg.esm_weights or None, "cpu")
    except ef.FatalError as e:
        raise SystemExit(f"error: {e}") from None
    return SeqInLoop(model, alphabet, layer, cfg.esm_checkpointing), label


def with_esm(esm, batch, device):
    """The batch with ESM's per-residue features as its seq (tokens from collate_task, or made here)."""
    if "tokens" not in batch:                                                  # sequences not tokenised in collate
        width = cache.padded_length(max(map(len, batch["sequence"])))
        batch = {**batch, "tokens": esm_tokens(batch["sequence"], esm.vocab, width).to(device),
                 "seq_len": torch.tensor([len(s) for s in batch["sequence"]], device=device)}
    return {**batch, **esm(batch["tokens"], batch["seq_len"])}


class FunctionModel(nn.Module):
    """The pretrained encoder, its protein vector (readout 'cls': the [CLS] output of Enc_multi, B.2;
    'mean': the mean of its sequence tokens' outputs; AMMA-contrastive: the sequence latent) and two
    fully connected layers giving one logit per class."""

    def __init__(self, mc, n_classes, esm=None, readout="cls", modalities=("seq", "str")):
        super().__init__()
        self.contrastive, self.readout, self.modalities = mc.variant == "contrastive", readout, tuple(modalities)
        if self.contrastive:
            self.con = amma.AMMAContrastive(mc)
            unused = [self.con.proj["str"], self.con.proj["func"]]
        else:
            self.enc = amma.AMMAEncoder(mc)
            unused = [self.enc.proj["func"]]
        for module in unused:            # loaded with the checkpoint, never in the graph: frozen
            module.requires_grad_(False)
        self.esm = esm
        self.head = nn.Sequential(nn.Linear(mc.D, mc.D), nn.ReLU(), nn.Linear(mc.D, n_classes))

    def readouts(self, batch):
        """The protein vectors before the head: {"cls": [CLS] output [B, D], "mean": mean of the sequence
        tokens' outputs [B, D]} (AMMA-contrastive: {"latent": the sequence latent [B, D]}) and the
        modules the batch left out of the graph."""
        if self.esm is not None:
            batch = with_esm(self.esm, batch, self.head[0].weight.device)
        if self.contrastive:
            z, _ = self.con.latents({"seq": batch["seq"], "seq_len": batch["seq_len"]})
            return {"latent": z["seq"]}, []                                    # [B, D]
        z = self.enc(batch, mask=False, modalities=self.modalities)[0]        # [B, 1+N, D], seq slots first
        n = batch["seq_len"]
        valid = torch.arange(batch["seq"].shape[1], device=z.device)[None, :] < n[:, None]   # [B, Ls]
        mean = (z[:, 1:1 + valid.shape[1]] * valid[..., None]).sum(1) / n[:, None]          # [B, D]
        idle = [] if "str" in batch and "str" in self.modalities else [self.enc.proj["str"]]  # no structure
        return {"cls": z[:, 0], "mean": mean}, idle                            # [CLS]: [B, D]

    def forward(self, batch):
        vectors, idle = self.readouts(batch)
        h = vectors["latent" if self.contrastive else self.readout]            # [B, D]
        with torch.autocast(h.device.type, enabled=False):  # fp32 logits: bf16 would tie many scores
            return self.head(h.float()) + amma.touch(idle)                     # [B, classes]


class EsmBaseline(nn.Module):
    """Table 2's ESM-1b row: no AMMA. The sequence encoder's per-residue outputs (ESM in the loop, or the
    cached seq features when it is frozen) averaged over the residues, into the same two fully
    connected layers as FunctionModel (Linear(d, d), ReLU, Linear(d, classes)) with d = the encoder's width."""

    contrastive = False

    def __init__(self, d, n_classes, esm=None):
        super().__init__()
        self.esm = esm
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, n_classes))

    def forward(self, batch):
        if self.esm is not None:
            batch = with_esm(self.esm, batch, self.head[0].weight.device)
        x, n = batch["seq"], batch["seq_len"]                                         # [B, L, d], [B]
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]       # [B, L]
        h = (x * valid[..., None]).sum(1) / n.clamp_min(1)[:, None]                   # [B, d]
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float())                                               # [B, classes]


def start_name(cfg, mc):
    """What the banner says is finetuned."""
    if cfg.baseline:
        return "the ESM-1b baseline (no AMMA: mean of the sequence encoder's outputs + the two-layer head)"
    return f"{'from scratch' if not cfg.ckpt else cfg.ckpt} ({mc.variant}, D={mc.D})"


def read_pretrained(path):
    """An AMMA pretraining checkpoint: (AMMAConfig, checkpoint); one-line SystemExit otherwise."""
    try:
        mc, ckpt = amma.read_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt.get("steps_done", 1) == 0:
        raise SystemExit(f"error: {path} holds an untrained model (its run did 0 steps)")
    return mc, ckpt


def check_dims(mc, dims, ckpt, features):
    for m, d in dims.items():
        if getattr(mc, f"d_{m}") != d:
            raise SystemExit(f"error: {ckpt} was pretrained on {m} features of width {getattr(mc, f'd_{m}')}, "
                             f"but {features} has {d}: pretrain on the same encoders' features")


def load_backbone(model, state_dict):
    """Load the pretrained weights into a FunctionModel. Returns (missing, unexpected) keys; anything
    but the head (and ESM) missing, or more than l/dec parts unexpected, is a one-line SystemExit."""
    prefix = "con." if model.contrastive else ""
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in state_dict.items()}, strict=False)
    bad = [k for k in missing if not k.startswith(("head.", "esm."))]
    bad += [k for k in unexpected if not k.startswith(UNUSED_KEYS)]
    if bad:
        raise SystemExit(f"error: checkpoint does not fit the finetuning model: {len(bad)} keys differ, e.g. {bad[0]}")
    return missing, unexpected


def build_optimizer(model, cfg, device=None):
    """Two groups: every trainable non-head parameter at cfg.lr, the head at cfg.lr_head (frozen ones left
    out); fused on a GPU."""
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr_head}]
    device = device or model.head[0].weight.device
    return runs.make_optimizer(groups, cfg.optimizer, torch.device(device), weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------
# evaluation: every protein exactly once under DDP

def shard(n, rank, world):
    """The indices rank `rank` scores: rank, rank + world, ... (no padding, no duplicates)."""
    return list(range(rank, n, world))


def merge_predictions(parts, n):
    """[(indices, predictions [k, C])] from every rank -> predictions [n, C] in index order."""
    idx = [i for ids, _ in parts for i in ids]
    if sorted(idx) != list(range(n)):
        raise RuntimeError(f"evaluation shards hold {len(idx)} predictions for {n} proteins "
                           f"({len(set(idx))} distinct): each must be scored exactly once")
    preds = torch.cat([p for _, p in parts])                                  # [n, C] in shard order
    out = torch.empty_like(preds)
    out[torch.tensor(idx, dtype=torch.long)] = preds
    return out


@torch.no_grad()
def predict(model, dataset, cfg, device, rank=0, world=1, autocast=None):
    """Logits [len(dataset), C] (every rank returns the full, ordered matrix)."""
    model.eval()
    mine = sorted(shard(len(dataset), rank, world), key=lambda k: dataset.lengths[k])
    batches = [mine[i:i + cfg.eval_batch_size] for i in range(0, len(mine), cfg.eval_batch_size)]
    vocab = model.esm.vocab if getattr(model, "esm", None) is not None else None
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate_task, vocab=vocab),
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    ids, preds = [], [torch.zeros(0, dataset.targets.shape[1])]
    for batch in loader:
        ids += batch["index"].tolist()
        with autocast or contextlib.nullcontext():
            preds.append(model(cache.batch_to(batch, device)).float().cpu())
    parts = [(ids, torch.cat(preds))]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (ids, torch.cat(preds)))
    return merge_predictions(parts, len(dataset))


def scores(pred, target):
    return {"fmax": fmax(pred, target), "aupr": aupr(pred, target)}


def fmax_threshold(pred, target):
    """(threshold, fmax): the score at which the protein-centric F-score of metrics.fmax is largest (the
    highest such score on ties), computed the same way (paper eqs. 5-9) by a plain sort of all pairs.
    pred [P, C] scores or logits, target [P, C] 0/1. Proteins predict the terms scoring >= threshold."""
    pred, target = torch.as_tensor(pred).double(), torch.as_tensor(target).bool()
    P, C = pred.shape
    order = pred.argsort(dim=1, descending=True, stable=True)                  # [P, C] each row best first
    hit = target.gather(1, order).double()                                     # [P, C]
    k = torch.arange(1, C + 1, dtype=torch.float64)                            # [C] rank in the row
    precision = hit.cumsum(1) / k                                              # [P, C] TP_k / k
    d_precision = precision - F.pad(precision, (1, 0))[:, :-1]                 # [P, C] change when pair k enters
    first = (k == 1).double().expand(P, C)                                     # [P, C] protein enters the average
    d_recall = hit / (target.sum(1, keepdim=True) + 1e-10)                     # [P, C]
    score = pred.gather(1, order).reshape(-1)                                  # [P * C]
    ranked = score.argsort(descending=True, stable=True)                       # all pairs, best first
    s = score[ranked]
    ends = torch.cat([s[1:] != s[:-1], torch.ones(1, dtype=torch.bool)]).nonzero().flatten()   # last of each tie
    p = d_precision.reshape(-1)[ranked].cumsum(0)[ends] / first.reshape(-1)[ranked].cumsum(0)[ends]
    r = d_recall.reshape(-1)[ranked].cumsum(0)[ends] / P
    f = 2 * p * r / (p + r + 1e-10)                                            # [thresholds]
    best = int(f.argmax())                                                     # the first maximum
    return float(s[ends[best]]), float(f[best])


def predictor_fields(cfg, info, valid_logits, valid_targets):
    """What predict.py and embed.py need in best.pt besides the weights: the validation-Fmax threshold
    (on the logits), the task, the modalities, the readout and the feature set's info.json (encoders)."""
    threshold, f = fmax_threshold(valid_logits, valid_targets)
    return {"task": cfg.task, "threshold": threshold, "valid_fmax": f, "modalities": cfg.modalities.split(","),
            "readout": cfg.readout, "features": cfg.features, "info": info}

def cutoff_rows(sets, data):
    """{cutoff: bool [test proteins]} of the test set as scored (metrics.cutoff_members)."""
    return cutoff_members(sets["test"].ids, data.get("test_identity") or {})


def cutoff_counts(sets, data, cutoff):
    """counts entries for the test set: 'test' = chains at --cutoff, 'test_scored' = all scored,
    'test_at_cutoff' = {cutoff: chains}."""
    members = cutoff_rows(sets, data)
    n = {str(c): int(m.sum()) for c, m in members.items()}
    return {"test": n.get(str(cutoff), len(sets["test"])), "test_scored": len(sets["test"]), "test_at_cutoff": n}


def epoch_metrics(pred, sets, data, cutoff):
    """One epoch's metrics: valid, test at --cutoff (the reported one) and test at every cutoff of the
    file ({'30': {fmax, aupr, n}, ...}); the test set holds every test chain, each cutoff a subset."""
    members = cutoff_rows(sets, data)
    target = sets["test"].targets
    at = {}
    for c, m in members.items():
        rows = torch.from_numpy(m)
        at[str(c)] = {**scores(pred["test"][rows], target[rows]), "n": int(m.sum())} if m.any() else \
            {"fmax": None, "aupr": None, "n": 0}
    test = {k: at[str(cutoff)][k] for k in ("fmax", "aupr")} if str(cutoff) in at else scores(pred["test"], target)
    return {"valid": scores(pred["valid"], sets["valid"].targets), "test": test, "test_cutoffs": at}


def write_predictions(path, pred, sets, data, cfg, epoch):
    """predictions.npz of one epoch (the selected one): valid and test ids, logits, labels and the test
    chains' cutoff membership (metrics.py's format; `python metrics.py PATH` recomputes results.json)."""
    splits = {sp: (sets[sp].ids, pred[sp], sets[sp].targets) for sp in ("valid", "test")}
    meta = {"task": cfg.task, "epoch": epoch, "cutoff": cfg.cutoff, "seed": cfg.seed, "features": cfg.features,
            "pretrained": cfg.ckpt or None, "baseline": cfg.baseline or None, "protocol": f"esm-{cfg.esm}",
            "scores": "logits (float32)"}
    return save_predictions(path, splits, cutoff_rows(sets, data), data["terms"], meta)


def frequency_baseline(sets):
    """Every term scored by its train-set frequency, the same for every protein (a naive baseline)."""
    freq = sets["train"].targets.mean(0)                                     # [C]
    return {s: scores(freq.expand(len(sets[s]), -1), sets[s].targets) for s in ("valid", "test")}


# ----------------------------------------------------------------------------------------------
# output

def table(task, result):
    """Table 2's layout: Fmax / AUPR in percent, the paper's row (AMMA, or ESM-1b for --baseline esm)
    and ours for this task at the reported cutoff (95%, the paper's); then every cutoff of the run."""
    def cell(f, a):
        return f"{f:5.1f} / {a:5.1f}"
    esm_row = result.get("model", "").startswith("ESM")
    rows = [("ESM-1b (paper, Table 2)" if esm_row else "AMMA (paper, Table 2: ESM-1b finetuned)",
             {t: cell(*(TABLE2_ESM if esm_row else TABLE2)[t]) for t in TASKS})]
    what = "demo, synthetic" if result["synthetic"] else "tiny encoders" if result["tiny"] else result["features"]
    rows.append((f"ours ({what}; {PROTOCOLS[result['protocol']]}; epoch {result['selected_epoch']})",
                 {task: cell(100 * result["test"]["fmax"], 100 * result["test"]["aupr"])}))
    base = result["baseline"]["test"]
    rows.append(("label frequency baseline", {task: cell(100 * base["fmax"], 100 * base["aupr"])}))
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'Fmax / AUPR (%)':<{w}}" + "".join(f"{t.upper():>15}" for t in TASKS)]
    lines += [f"{name:<{w}}" + "".join(f"{cells.get(t, '-'):>15}" for t in TASKS) for name, cells in rows]
    return "\n".join(lines + cutoff_table(task, result))


def cutoff_table(task, result):
    """Our test Fmax / AUPR at every identity cutoff of the run (the epoch selected on validation)."""
    at = result.get("test_cutoffs") or {}
    if not at:
        return []
    lines = [f"\n{task.upper()} test at each sequence-identity cutoff (epoch {result['selected_epoch']}, chosen on "
             f"validation; the paper reports <95%):", f"{'cutoff':>8} {'chains':>7} {'Fmax':>7} {'AUPR':>7}"]
    for c, r in sorted(at.items(), key=lambda kv: int(kv[0])):
        f, a = ("-", "-") if r["n"] == 0 else (f"{100 * r['fmax']:.1f}", f"{100 * r['aupr']:.1f}")
        lines.append(f"{'<' + c + '%':>8} {r['n']:>7} {f:>7} {a:>7}")
    return lines


PROTOCOLS = {"esm-finetune": "ESM finetuned in the loop (B.2)", "esm-frozen": "ESM frozen, cached features"}


def default_out(cfg):
    if cfg.out:
        return Path(cfg.out)
    if cfg.baseline:
        return Path("runs/demo-esm-1b" if cfg.demo else "runs/esm-1b") / cfg.task
    return (Path(cfg.ckpt).parent if cfg.ckpt else Path("runs/demo-scratch" if cfg.demo else "runs/scratch")) / cfg.task


def write_json(obj, path):
    runs.atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


SAME_ON_RESUME = ("task", "ckpt", "from_scratch", "baseline", "features", "esm", "modalities", "readout", "cutoff", "batch_size", "optimizer",
                  "lr", "lr_head", "weight_decay", "gamma", "max_len", "seed")


# ----------------------------------------------------------------------------------------------
# the finetuning loop

def screen_task(sets, cfg, out, main, say):
    """The feature files of every split, checked before step 1 (cache.find_bad_files); with --skip-bad the
    bad proteins are left out (loudly for the test split: its metric changes)."""
    train = sets["train"]
    rows = [train.rows[x] for x in sorted({x for ds in sets.values() for x in ds.ids})]
    bad = {pid for _, pid in cache.find_bad_files({"task": (train.root, rows, train.cached)}, out, cfg.skip_bad, main)}
    for name, ds in list(sets.items()):
        keep = [k for k, x in enumerate(ds.ids) if x not in bad]
        if len(keep) == len(ds):
            continue
        say(f"--skip-bad: {len(ds) - len(keep)} {name} proteins left out (bad feature files, {out}/bad_files.tsv)"
            + ("; the TEST SET IS SMALLER than the benchmark's, so its numbers are not comparable" if name == "test" else ""))
        sets[name] = TaskSet(ds.root, ds.rows, [ds.ids[k] for k in keep], ds.targets[keep], ds.esm_in_loop, ds.max_len,
                             ds.modalities)
        if not len(sets[name]):
            raise SystemExit(f"error: no {name} protein is left after --skip-bad")
    return sets


def finetune(cfg, quiet=False):
    """Train, evaluate every epoch, select by validation Fmax; returns the results dict (rank 0)."""
    rank, world, device = runs.setup_distributed(cfg)
    ended = False
    try:
        with runs.RunLock(default_out(cfg), enabled=rank == 0):
            result = _finetune(cfg, quiet, rank, world, device)
        ended = True
        return result
    finally:
        runs.leave_distributed(world, ended)


def build_function_model(cfg, info, n_classes, device):
    """The pretrained encoder (or a fresh one), ESM in the loop with --esm finetune, and the head."""
    torch.manual_seed(cfg.seed)
    mc, pre = read_pretrained(cfg.ckpt) if cfg.ckpt else (None, None)
    esm, esm_name = build_esm(info, cfg, device) if cfg.esm == "finetune" else (None, "")
    dims = encoder_dims(cfg.features, esm, cfg.modalities.split(","))
    if cfg.ckpt:
        check_dims(mc, dims, cfg.ckpt, cfg.features)
    else:
        model_fields = {f.name for f in fields(amma.AMMAConfig)}
        size = {k: v for k, v in amma.DEMO.items() if k in model_fields} if cfg.demo else {}   # demo: demo model
        mc = amma.AMMAConfig(**size, **{f"d_{m}": d for m, d in dims.items()})
    model = EsmBaseline(dims["seq"], n_classes, esm) if cfg.baseline else \
        FunctionModel(mc, n_classes, esm, cfg.readout, cfg.modalities.split(","))
    if cfg.ckpt:
        load_backbone(model, pre["model"])
    if ("str" not in dims or cfg.modalities == "seq") and hasattr(model, "enc"):   # no structure used
        model.enc.proj["str"].requires_grad_(False)
    return model.to(device), mc, esm_name


def banner(cfg, mc, model, counts, n_classes, n_params, world, device, autocast, esm_name, info):
    lines = [f"finetuning {start_name(cfg, mc)}, {n_params / 1e6:.1f}M "
             f"trainable) on {cfg.task}: {n_classes} classes, train/valid/test {counts['train']}/{counts['valid']}/"
             f"{counts['test']} (test at <{cfg.cutoff}% identity, of {counts['test_before_cutoff']}); {cfg.optimizer}, "
             f"global batch {cfg.batch_size} = {world} process(es) x {cfg.grad_accum}, {cfg.epochs} epochs, lr {cfg.lr:g} / "
             f"head {cfg.lr_head:g}, wd {cfg.weight_decay:g}; readout {cfg.readout}; modalities {cfg.modalities}; {device}"
             f"{', bf16' if isinstance(autocast, torch.autocast) else ''}{', compiled' if cfg.compile or cfg.cuda_graphs else ''}"]
    esm = model.esm
    lines.append(f"protocol: {PROTOCOLS['esm-' + cfg.esm]}" + (
        f" ({esm_name}, layer {esm.layer}{', activation checkpointing' if cfg.esm_checkpointing else ''})" if esm else
        " (--esm finetune runs ESM in the loop, the paper's B.2)"))
    if info.get("tiny") or info.get("synthetic"):
        lines.append(f"note: {cfg.features} holds {'synthetic' if info.get('synthetic') else 'tiny random-init encoder'} "
                     f"features: the numbers say nothing about real proteins")
    return "\n".join(lines)


def evaluate(model, sets, data, cfg, device, rank, world, autocast, epoch, state, t0, lrs):
    """Score valid and test after an epoch: the epoch's record (appended to state['history']); True when
    it is the best so far by validation Fmax."""
    pred = {sp: predict(model, sets[sp], cfg, device, rank, world, autocast) for sp in ("valid", "test")}
    record = {"epoch": epoch + 1, "train_loss": state["epoch_loss"] / max(state["epoch_steps"], 1), "lr": lrs[0],
              "lr_head": lrs[1], **epoch_metrics(pred, sets, data, cfg.cutoff), "seconds": round(time.time() - t0, 1)}
    state["history"].append(record)
    best = state["best"]
    if best is None or record["valid"]["fmax"] > best["valid"]["fmax"]:
        state["best"] = {k: record[k] for k in ("epoch", "valid", "test", "test_cutoffs")}
        return record, True, pred
    return record, False, pred


def epoch_line(record, cfg, best):
    v, t = record["valid"], record["test"]
    return (f"epoch {record['epoch']}/{cfg.epochs}  loss {record['train_loss']:.4f}  valid Fmax {100 * v['fmax']:.1f} "
            f"AUPR {100 * v['aupr']:.1f}  test Fmax {100 * t['fmax']:.1f} AUPR {100 * t['aupr']:.1f}  "
            f"({record['seconds']:.0f}s){'  *' if best else ''}")


def _finetune(cfg, quiet, rank, world, device):
    is_main = rank == 0
    say = print if is_main and not quiet else (lambda *a, **k: None)
    runs.check_batch_split(cfg.batch_size, world, cfg.grad_accum, hint="; a batch-1 task (EC, GO-MF, GO-CC in "
                           "the paper) uses several GPUs best as independent runs side by side, one per GPU "
                           "(GPUS=\"0 1 2 3\" bash ablations.sh)")
    out = default_out(cfg)
    resume_path = runs.prepare_out(out, cfg.resume, cfg.overwrite, is_main, say,
                                   files=("checkpoint.pt", "best.pt", "results.json", "predictions.npz"))
    data, sets, info, counts = load_task(cfg)
    sets = screen_task(sets, cfg, out, is_main, say)
    counts.update({s: len(ds) for s, ds in sets.items()})
    counts.update(cutoff_counts(sets, data, cfg.cutoff))
    n_classes = len(data["terms"])
    model, mc, esm_name = build_function_model(cfg, info, n_classes, device)
    opt = build_optimizer(model, cfg, device)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
    state = dict(next_epoch=0, next_step=0, history=[], best=None, epoch_loss=0.0, epoch_steps=0, steps_done=0)
    if resume_path:
        ck = torch.load(resume_path, map_location="cpu", weights_only=True)
        runs.check_same(ck["config"], runs.to_plain(cfg), SAME_ON_RESUME, resume_path)
        runs.load_training_state(ck, model, opt, sched, state)
        say(f"resuming from {resume_path} at epoch {state['next_epoch'] + 1}, step {state['next_step']}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    autocast = runs.amp_context(cfg.amp, device)
    say(banner(cfg, mc, model, counts, n_classes, n_params, world, device, autocast, esm_name, info))
    if state["next_epoch"] >= cfg.epochs and state["best"] is not None:
        say(f"{out}: all {cfg.epochs} epochs are done already; its results:")
    net = runs.maybe_compile(runs.wrap_ddp(model, world), cfg)
    train, baseline = sets["train"], frequency_baseline(sets)
    collate_fn = partial(collate_task, vocab=model.esm.vocab if model.esm else None)
    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    def save(next_epoch, next_step):
        state.update(next_epoch=next_epoch, next_step=next_step)
        if is_main and state["steps_done"]:
            runs.atomic_save({"kind": "finetune", "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), **state, "config": runs.to_plain(cfg),
                              "model_config": runs.to_plain(mc)}, ckpt_path)

    result, last_save = None, time.time()
    feed = cache.Feed(train, cfg.num_workers, device.type == "cuda", collate_fn, cache.loader_kind(cfg.loader, [train]))
    with runs.Interrupt() as stop, feed:
        for epoch in range(state["next_epoch"], cfg.epochs):
            t0 = time.time()
            net.train()
            plan, steps, n_steps, loader = finetuning_epoch(cfg, train, state, epoch, rank, world, feed)
            bar = runs.progress(n_steps, f"epoch {epoch + 1}/{cfg.epochs}", not is_main or quiet, state["next_step"])
            meter = runs.Meter([], device, state["epoch_loss"] if is_main else 0.0)
            for s, parts in steps:
                norm = len(plan[s]) * n_classes                                 # BCE: mean over the global batch
                seeds = [amma.seed_hash(cfg.seed, epoch, s, rank * cfg.grad_accum + k) for k in range(len(parts))]
                batches = cache.micro_batches(loader, len(parts), device)
                loss, _ = runs.train_step(net, opt, batches, partial(bce_loss, net, autocast, norm), world, seeds)
                meter.add(loss, {}, s)
                state.update(epoch_steps=state["epoch_steps"] + 1, steps_done=state["steps_done"] + 1)
                bar.update(1)
                if runs.read_point(cfg, state, s, n_steps, world, stop, last_save):
                    last_save = runs.at_read_point(meter, cfg, state, stop, save, ckpt_path, epoch, s, n_steps, last_save,
                                                   bar, lambda interval: interval[0] / max(meter.steps, 1), is_main)
            bar.close()
            lrs = [g["lr"] for g in opt.param_groups]
            sched.step()
            record, is_best, pred = evaluate(model, sets, data, cfg, device, rank, world, autocast, epoch, state, t0, lrs)
            if is_best and is_main:
                write_predictions(out / "predictions.npz", pred, sets, data, cfg, epoch + 1)
                runs.atomic_save({"kind": "finetune-best", "model": model.state_dict(), "epoch": epoch,
                                  "config": runs.to_plain(cfg), "model_config": runs.to_plain(mc),
                                  "terms": data["terms"], **predictor_fields(cfg, info, pred["valid"],
                                                                             sets["valid"].targets)}, best_path)
            save(epoch + 1, 0)
            last_save = time.time()
            say(epoch_line(record, cfg, is_best))
            if is_main:
                result = results_dict(cfg, mc, data, info, counts, state, baseline, world, n_params)
                write_json(result, out / "results.json")
    return finish(cfg, mc, data, info, counts, state, baseline, world, n_params, out, result, is_main, say)


def finetuning_epoch(cfg, train, state, epoch, rank, world, feed):
    """One epoch's length-bucketed global batches from where the run stands, this process's steps and
    its micro-batches from the run's feed."""
    if epoch != state["next_epoch"] or state["next_step"] == 0:
        state.update(next_epoch=epoch, next_step=0, epoch_loss=0.0, epoch_steps=0)
    plan = cache.bucket_batches(train.lengths, cfg.batch_size, cfg.seed, epoch)
    n_steps = min(len(plan), cfg.limit_steps or len(plan))
    steps, _ = runs.epoch_steps(plan, state["next_step"], n_steps, rank, world, cfg.grad_accum)
    micro = [[plan[s][j] for j in part] for s, parts in steps for part in parts]
    return plan, steps, n_steps, feed.epoch(micro)


def bce_loss(net, autocast, norm, batch):
    """A micro-batch's share of the global batch's mean binary cross-entropy (fp32 logits)."""
    with autocast:
        logits = net(runs.strip(batch))                                       # [b, C]
    return F.binary_cross_entropy_with_logits(logits.float(), batch["target"], reduction="sum") / norm, {}


def finish(cfg, mc, data, info, counts, state, baseline, world, n_params, out, result, is_main, say):
    """results.json (also for a finished run resumed) and the table; None on ranks other than 0."""
    if not is_main:
        return None
    if state["best"] is None:
        raise SystemExit(f"error: no epoch was trained (--epochs {cfg.epochs})")
    if result is None:   # nothing left to train (a finished run resumed)
        result = results_dict(cfg, mc, data, info, counts, state, baseline, world, n_params)
        write_json(result, out / "results.json")
    best = state["best"]
    say(f"selected epoch {best['epoch']} (best validation Fmax {100 * best['valid']['fmax']:.1f}); "
        f"results in {out / 'results.json'}")
    say(table(cfg.task, result))
    return result


def results_dict(cfg, mc, data, info, counts, state, baseline, world, n_params):
    best = state["best"]
    paper = TABLE2_ESM if cfg.baseline else TABLE2
    return {"task": cfg.task, "protocol": f"esm-{cfg.esm}", "readout": "mean" if cfg.baseline else cfg.readout,
            "modalities": cfg.modalities, "model": "ESM-1b baseline (no AMMA)" if cfg.baseline else "AMMA",
            "selected_epoch": best["epoch"], "valid": best["valid"], "test": best["test"],
            "test_cutoffs": best.get("test_cutoffs", {}), "predictions": "predictions.npz",
            "baseline": {"name": "label frequency (train-set frequency of each term)", **baseline},
            "paper": dict(zip(("fmax", "aupr"), (v / 100 for v in paper[cfg.task]))),
            "epochs": state["history"], "epochs_planned": cfg.epochs, "n_proteins": counts,
            "n_classes": len(data["terms"]), "cutoff": cfg.cutoff, "seed": cfg.seed,
            "global_batch": cfg.batch_size, "processes": world, "grad_accum": cfg.grad_accum,
            "trainable_parameters": n_params, "features": cfg.features, "tiny": bool(info.get("tiny")),
            "synthetic": bool(info.get("synthetic")), "demo": cfg.demo, "encoders": info.get("encoders", {}),
            "labels_source": data.get("source", ""), "pretrained": cfg.ckpt or None,
            "config": runs.to_plain(cfg), "model_config": runs.to_plain(mc)}


# ----------------------------------------------------------------------------------------------
# the demo's pretraining and the command line

def ensure_demo_pretrain(features, out="runs/demo"):
    """runs/demo/checkpoint.pt, made first (or finished) with amma.py's DEMO preset on `features`."""
    path = Path(out) / "checkpoint.pt"
    if path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("next_epoch", 0) >= amma.DEMO["epochs"]:
            print(f"demo pretraining: using {path}")
            return path
    print(f"demo pretraining: {'finishing' if path.exists() else 'running'} amma.py's demo pretraining "
          f"into {path} first")
    args = amma.build_parser().parse_args(["--pretrain"] + ["--resume"] * path.exists())
    mc, tc, _ = amma.configs_from_args(args, {**amma.DEMO, "features": str(features), "out": out})
    for m, d in cache.feature_dims(features).items():
        setattr(mc, f"d_{m}", d)
    amma.pretrain(mc, tc)
    return path


def build_parser():
    p = argparse.ArgumentParser(
        description="Finetune AMMA on EC / GO-MF / GO-CC / GO-BP (paper B.2) and report Fmax and AUPR.",
        epilog="Commands:\n" + __doc__.split("\n\n")[2] + "\n\nFlags left out take the paper's setting for the "
               "task (demo: the demo preset).", formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in amma.flag_order(FinetuneConfig):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        plain = f.default is None or isinstance(f.default, bool) or f.default == ""
        shown = "" if plain else f" (default: {f.default})"
        kw = dict(default=None, help=meta["help"] + shown)
        if f.name == "task":
            p.add_argument(name, required=True, choices=meta["choices"], help=meta["help"])
        elif isinstance(f.default, bool):
            p.add_argument(name, action="store_true", **kw)
        else:
            per_task = {"epochs": int, "batch_size": int, "weight_decay": float, "optimizer": str}   # default None
            typ = per_task.get(f.name, type(f.default))
            p.add_argument(name, type=typ, choices=meta.get("choices"), **kw)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if sum(map(bool, (args.ckpt, args.from_scratch, args.baseline))) > 1:
        raise SystemExit("error: --ckpt, --from-scratch and --baseline exclude each other")
    values = dict(PAPER[args.task])
    default_features = "features/ec" if args.task == "ec" else "features/go"
    if args.demo or not (args.features or args.ckpt or (Path(default_features) / "manifest.tsv").exists()):
        import demo  # the built-in demo corpus; not needed with real features
        rank = int(os.environ.get("RANK", 0))
        ckpt = Path("runs/demo/checkpoint.pt")
        ready = Path("features/demo/manifest.tsv").exists() and (args.ckpt or args.from_scratch or args.baseline
                                                                   or ckpt.exists())
        if "RANK" in os.environ and not ready:
            raise SystemExit("error: under torchrun the demo needs its data and pretraining made first: run "
                             f"python finetune.py --task {args.task} once without torchrun")
        with contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext():
            if args.features:                    # --demo on a set of its own (e.g. features/demo-tiny)
                print(f"demo preset {DEMO_FT} on {args.features}")
                root = args.features
            else:
                print(f"no feature set at {default_features}: finetuning on the built-in demo instead (synthetic "
                      f"features, demo preset {DEMO_FT}; the numbers say nothing about real proteins)")
                root = str(demo.ensure_demo_features("features/demo"))
            if not args.ckpt and not args.from_scratch and not args.baseline:
                values["ckpt"] = str(ensure_demo_pretrain(root))
        values.update(DEMO_FT, features=root, demo=True)
    elif not args.ckpt and not args.from_scratch and not args.baseline:
        raise SystemExit("error: give --ckpt runs/<name>/checkpoint.pt (an AMMA pretraining), --from-scratch or "
                         "--baseline esm")
    values.update(given)
    values.setdefault("features", default_features)
    values.setdefault("weight_decay", WEIGHT_DECAY[values["optimizer"]])
    cfg = FinetuneConfig(**values)
    if cfg.demo and not cfg.overwrite:   # the demo continues (or shows) its own run: the command can be repeated
        cfg.resume = cfg.resume or (default_out(cfg) / "checkpoint.pt").exists()
    try:
        result = finetune(cfg)
    except (ValueError, FileNotFoundError) as e:  # a truncated feature file, a bad label: one line
        raise SystemExit(f"error: {runs.last_line(e)}") from None
    if result is not None and cfg.demo:
        ours, base = result["test"]["fmax"], result["baseline"]["test"]["fmax"]
        print(f"demo: test Fmax {100 * ours:.1f} (ours) vs {100 * base:.1f} (label-frequency baseline)")
    return result


if __name__ == "__main__":
    runs.run_as_script(main)
