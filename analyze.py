"""The paper's analyses of a pretrained AMMA (section 4.3, B.4, B.5, B.8), the ablation collector and
the pretraining-test overlap audit. Its own command line (amma.py does not import it):

    python analyze.py --ckpt runs/amma/checkpoint.pt --features features/pretrain \\
        --contrastive-ckpt runs/contrastive/checkpoint.pt --protein P69905 --structure AF-P69905-F1-model_v4.pdb \\
        --sites sites.tsv                       # B.8: the top k residues, k = the protein's annotated sites
    python analyze.py --ckpt runs/demo/checkpoint.pt --features features/demo       # the demo
    python analyze.py --collect runs/           # every finetuning's results.json -> one table, mean +- SD over seeds
    python analyze.py --overlap --pretrain features/pretrain --tasks features/ec features/go \\
        --predictions runs/amma/ec/predictions.npz   # test chains with pretraining neighbours; metrics without them

Outputs (in --out, default <checkpoint dir>/analysis, e.g. runs/amma/analysis):
    table1.json, table1.md      Table 1: cosine similarity of the relation matrices, ours beside the paper's
    tsne_initial.png            t-SNE of the frozen features (Figure 1)
    tsne_amma.png               t-SNE of AMMA's Z'_{m,0} (Figure 4a)
    tsne_contrastive.png        t-SNE of the contrastive z_m of eq. 14 (Figure 4b), with --contrastive-ckpt
    attention_<id>.tsv          residues ranked by function-to-residue attention (B.8)
    attention_<id>.json         the top k residues (k = annotated sites with --sites, else --top-k) and hits
    attention_<id>.pdb          with a structure: a copy whose B-factor column holds that attention
--collect writes <dir>/results_table.json and <dir>/results_table.md; --overlap writes
<out, default runs/overlap>/overlap.json (its choices: overlap.py's docstring).

Choices made where the paper is silent (this list is their one home; README's analysis section
points here):
- Latents. Initial: the frozen features X'_m averaged over length (B.5 names X'; Table 1's caption
  mentions projection layers, but B.5 is the precise text). CL: z_seq, z_str, z_func of eq. 14.
  AMMA: l0 applied to Enc_multi's output with no masking, scattered to the full layout
  (Z'_{m,0} of eq. 3) and averaged over each modality's valid positions.
- Table 1 (B.5): latents L2-normalised, Relation_m = z_m z_m^T per batch, and the cosine similarity of
  two relation matrices taken over the flattened B x B matrices, x.y / max(|x| |y|, 1e-8). The paper
  gives no batch size: we use 4, the pretraining batch size of B.1 (--batch-size). Proteins with all
  three modalities, shuffled with --seed, cut into consecutive batches; a last batch of one protein is
  dropped (its relation matrix is [[1]]). The mean over batches is reported; table1.json also holds the
  row-wise variant (mean cosine of matching rows, torch's cosine_similarity default dim=1) and, per
  modality, the mean cosine between different proteins' latents: when that is near 1 (latents sharing
  one large common direction, as l0 outputs early in training do), every relation matrix is near
  all-ones and the column is near 1 whatever the alignment; a note is printed then.
- t-SNE (B.4): Fig. 1 (the frozen features) on --tsne-n-initial paired proteins (default 1,000, B.4's),
  PCA to 100 components, no scaling (B.4 names none there); Fig. 4a/b on the first --tsne-n of the same
  shuffled proteins (default 500), each modality min-max scaled by its overall min and max, then PCA to
  500 components (capped by the number of proteins and the smallest width); the three modalities'
  points stacked and embedded by one t-SNE. Perplexity
  200 and 2500 iterations as in B.4, scaled down for small sets: perplexity min(200, (points - 1) / 3),
  iterations min(2500, max(250, 2 x points)). Colours as the paper: seq red, str yellow, func blue.
- Attention (B.8): one protein, all three modalities, no masking, batch of one. The last Enc_multi
  layer's attention is averaged over heads and over the function-token queries; a residue's
  attention is the sum of what its seq slot and its str slot receive (both are the same residue).
  The paper used the protein name only as text: --name 'Hemoglobin subunit alpha' does that, encoding
  [CLS] + the name alone with the feature set's text encoder (info.json). Without --name the cached
  features of the whole ProtST text are used (--func-tokens K keeps only the first K tokens).
  B.8 then takes as many top residues as UniProtKB annotates interacting residues: with --sites the
  protein's count is k (and attention_<id>.json says how many of the top k are sites); without it
  k = --top-k (10).
  The PDB copy: every ATOM/HETATM line of a residue gets B = 100 x attention / max attention (so the
  top residue reads 100.00 and the %6.2f column keeps the contrast); residues without features
  (no C-alpha, beyond --max-len, ligands, water) get 0.00.
- Collector: runs/<name>/<task>/results.json for task in ec, go-mf, go-cc, go-bp. Test Fmax and AUPR
  are read from results["test"]["fmax"|"aupr"] (finetune.py's layout), else from "test_fmax" /
  "test_aupr", else top-level "fmax" / "aupr" (keys compared case-insensitively, "f1_max" counts as
  fmax). Values <= 1 are taken as fractions and shown in percent, as in the paper's tables. The runs
  are laid out as the paper's Tables 2, 3, 4 and 6 (ablations.sh's run names), each of ours followed by
  the paper's row with its published averages, then the label-frequency baseline; rows carry their
  protocol (esm-finetune / esm-frozen) and a [synthetic] / [tiny] mark; other runs go to "Other runs".
"""
import argparse
import gzip
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import amma
import cache
import runs
from amma import arg
import overlap
from cache import MODALITIES
from metrics import PAPER_TABLES, TASK_NAMES, TASKS

PAIRS = (("seq", "str"), ("seq", "func"), ("str", "func"))
PAIR_NAMES = {p: f"{p[0].capitalize()}-{p[1].capitalize()}" for p in PAIRS}      # "Seq-Str", ...
COLUMNS = {"initial": "Initial", "contrastive": "CL", "amma": "AMMA"}
PAPER_TABLE1 = {"initial": {"seq-str": 0.865, "seq-func": 0.855, "str-func": 0.947},
                "contrastive": {"seq-str": 0.894, "seq-func": 0.907, "str-func": 0.847},
                "amma": {"seq-str": 1.000, "seq-func": 0.999, "str-func": 0.999}}
TSNE_COLOURS = {"seq": "#d62728", "str": "#e6b800", "func": "#1f77b4"}           # red, yellow, blue

# TASKS, TASK_NAMES and the paper's Tables 2, 3, 4 and 6 (with ablations.sh's run name of each row) live
# in metrics.py, the benchmark's one home.
PAPER_PROTOCOL = "esm-finetune"


@dataclass
class AnalyzeConfig:
    ckpt: str = arg("", 'AMMA checkpoint written by amma.py --pretrain')
    contrastive_ckpt: str = arg("", "AMMA-contrastive checkpoint (amma.py --pretrain --variant contrastive): "
                                    "Table 1's CL column and the contrastive t-SNE")
    features: str = arg("features/pretrain", "feature set (the pretraining set in the paper); the built-in demo "
                                             "is used when it does not exist")
    out: str = arg("", 'output folder (default: <checkpoint dir>/analysis)')
    batch_size: int = arg(4, 'proteins per relation matrix (the paper is silent; 4 = its pretraining batch size)')
    n_proteins: int = arg(0, 'Table 1 on the first N proteins after shuffling (0 = all)')
    tsne_n: int = arg(500, 'paired proteins per Fig. 4 t-SNE panel (AMMA, contrastive; B.4: 500; 0 = skip t-SNE)')
    tsne_n_initial: int = arg(1000, "paired proteins of Fig. 1's t-SNE panel (the frozen features; B.4: 1000)")
    tsne_perplexity: float = arg(0.0, 't-SNE perplexity (0 = min(200, (points - 1) / 3); B.4: 200)')
    tsne_iter: int = arg(0, 't-SNE iterations (0 = min(2500, max(250, 2 x points)); B.4: 2500)')
    protein: str = arg("", "protein id for the function-to-residue attention (default: first with seq, str and "
                           "func)")
    structure: str = arg("", "PDB file of --protein: also write a copy with the attention in the B-factor column "
                             "(default: the manifest's structure column when that file exists)")
    func_tokens: int = arg(0, "attention: use only the first K function-text tokens (0 = all; the paper used the "
                              "name)")
    name: str = arg("", "attention: the protein name as the only function text, as B.8 does (e.g. 'Hemoglobin "
                        "subunit alpha'): encoded alone by the feature set's text encoder (info.json; real "
                        "PubMedBERT needs its weights locally) instead of the cached whole-text tokens")
    sites: str = arg("", "attention: TSV of annotated interacting residues, one line per protein: id<TAB>12,45,46"
                         " (1-based positions of the features' sequence, e.g. UniProtKB binding sites); the top k"
                         " residues are reported with k = the protein's number of sites (B.8) and how many of "
                         "them are sites")
    top_k: int = arg(10, 'attention: residues reported as the top k when --sites gives none for the protein')
    max_len: int = arg(1022, 'residues per protein (as in pretraining)')
    seed: int = arg(0, 'seed of the protein order (Table 1 batches, t-SNE subset) and of t-SNE')
    device: str = arg("", "torch device ('' = cuda if available else cpu)")
    collect: str = arg("", "instead of analysing a checkpoint, gather every <dir>/*/<task>/results.json into one "
                           "table")
    overlap: bool = arg(False, "instead: how many test chains of --tasks have a pretraining protein (--pretrain) "
                               "with an identical sequence or at >= 95/50/30%% identity (MMseqs2), and Fmax/AUPR "
                               "of --predictions without them")
    pretrain: str = arg("", '--overlap: the pretraining feature set (its manifest.tsv sequences)')
    tasks: tuple = arg((), '--overlap: the benchmark feature sets whose labels_<task>.json test chains are audited')
    predictions: tuple = arg((), "--overlap: finetune.py's predictions.npz files, re-scored on the test chains "
                                 "without neighbours")
    threads: int = arg(1, '--overlap: MMseqs2 threads')




# ----------------------------------------------------------------------------------------------
# Table 1 (B.5): relation matrices and their cosine similarity

def relation(z):
    """Relation matrix of L2-normalised latents: z [B, d] -> [B, B]."""
    z = F.normalize(z.float(), dim=-1)
    return z @ z.T


def relation_cosine(ra, rb, eps=1e-8, rowwise=False):
    """Cosine similarity of two relation matrices [B, B]: over the flattened matrices (default), or
    the mean over rows of the row-wise cosines."""
    if rowwise:
        return F.cosine_similarity(ra, rb, dim=1, eps=eps).mean().item()
    a, b = ra.flatten(), rb.flatten()
    return (a @ b / (a.norm() * b.norm()).clamp_min(eps)).item()


def masked_mean(x, lengths):
    """Mean over the first lengths[b] rows: x [B, L, d] -> [B, d]."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]       # [B, L]
    return (x * valid[..., None]).sum(1) / lengths.clamp_min(1)[:, None]


@torch.no_grad()
def amma_latents(model, batch):
    """Z'_{m,0} of eq. 3 (l0 of Enc_multi's output, unmasked, scattered to the full layout) averaged
    over each modality's valid positions: {m: [B, D]}."""
    z, ids, keep, valid, layout, _ = model.enc(batch, mask=False)
    N = valid.shape[1]
    z0 = model.unmask(model.l[0](z[:, 1:]), ids, keep, N)                               # [B, N, D]
    out = {}
    for m in MODALITIES:
        start, length = layout[m]
        if length:
            out[m] = masked_mean(z0[:, start:start + length], batch[m + "_len"])        # [B, D]
    return out


@torch.no_grad()
def contrastive_latents(model, batch):
    """z_seq (after Enc_con), z_str, z_func of eq. 14: {m: [B, D]}."""
    z, _ = model.latents(batch)
    return {m: z[m] for m in MODALITIES if m in z}


def initial_latents(batch):
    """The frozen features X'_m averaged over length: {m: [B, d_m]}."""
    return {m: masked_mean(batch[m], batch[m + "_len"]) for m in MODALITIES if m in batch}


def table1_scores(latents, rowwise=False):
    """Cosine similarities of one batch's relation matrices: {"seq-str": c, "seq-func": c, "str-func": c}."""
    rel = {m: relation(z) for m, z in latents.items()}
    return {f"{a}-{b}": relation_cosine(rel[a], rel[b], rowwise=rowwise) for a, b in PAIRS}


def within_cosine(z):
    """Mean cosine between different proteins' latents of one modality (the off-diagonal of the relation
    matrix). Near 1, every relation matrix is near all-ones and Table 1's cosine is near 1 whatever the
    alignment: a diagnostic kept beside the table."""
    r, B = relation(z), len(z)
    return ((r.sum() - r.diagonal().sum()) / (B * (B - 1))).item()


def paired_ids(root, n, seed):
    """Ids with all three modalities, shuffled with seed, first n (0 = all)."""
    ids = [r["id"] for r in cache.read_manifest(root) if set(MODALITIES) <= set(r["modalities"])]
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [ids[i] for i in perm]
    return ids[:n] if n else ids


def compute_latents(models, dataset, batch_size, n_keep, device, chunk=8):
    """One pass over the dataset. Returns (scores, kept): scores[col][rowwise][pair] = list of per-batch
    cosines over consecutive batches of batch_size (a last batch of one protein is dropped), and
    kept[col][m] = [n_keep, d] latents of the first n_keep proteins (for t-SNE)."""
    scores = {col: {False: {}, True: {}, "within": {}} for col in models}
    kept = {col: {m: [] for m in MODALITIES} for col in models}
    n_seen = 0
    step = batch_size * chunk                                    # forward several relation batches at once
    for start in range(0, len(dataset), step):
        items = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
        batch = cache.batch_to(cache.collate(items), device)
        for col, fn in models.items():
            lat = {m: z.float().cpu() for m, z in fn(batch).items()}                    # {m: [b, d]}
            for s in range(0, len(items), batch_size):
                part = {m: z[s:s + batch_size] for m, z in lat.items()}
                if len(part["seq"]) < 2:
                    continue
                for rowwise in (False, True):
                    for pair, c in table1_scores(part, rowwise).items():
                        scores[col][rowwise].setdefault(pair, []).append(c)
                for m, z in part.items():
                    scores[col]["within"].setdefault(m, []).append(within_cosine(z))
            take = max(0, min(len(items), n_keep - n_seen))
            for m in MODALITIES:
                kept[col][m].append(lat[m][:take])
        n_seen += len(items)
    kept = {col: {m: torch.cat(parts) for m, parts in per_m.items()} for col, per_m in kept.items()}   # [n_keep, d]
    return scores, kept


def table1_markdown(table, paper=PAPER_TABLE1):
    cols = [c for c in COLUMNS if c in table]
    lines = ["| Alignment | " + " | ".join(f"{COLUMNS[c]} (ours) | {COLUMNS[c]} (paper)" for c in cols) + " |",
             "|---" * (1 + 2 * len(cols)) + "|"]
    for a, b in PAIRS:
        key = f"{a}-{b}"
        lines.append(f"| {PAIR_NAMES[(a, b)]} | " +
                     " | ".join(f"{table[c][key]:.3f} | {paper[c][key]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def table1_text(table, paper=PAPER_TABLE1):
    cols = list(COLUMNS)
    lines = ["Alignment  " + "".join(f"{COLUMNS[c] + ' ours (paper)':>22}" for c in cols)]
    for a, b in PAIRS:
        key = f"{a}-{b}"
        cells = [(f"{table[c][key]:.3f}" if c in table else "-") + f" ({paper[c][key]:.3f})" for c in cols]
        lines.append(f"{PAIR_NAMES[(a, b)]:<11}" + "".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# t-SNE (B.4)

def tsne_params(n_points, perplexity=0.0, n_iter=0):
    """B.4's perplexity 200 and 2500 iterations, scaled down for small sets (see the module docstring)."""
    perplexity = perplexity or min(200.0, max(2.0, (n_points - 1) / 3))
    n_iter = n_iter or int(min(2500, max(250, 2 * n_points)))
    return perplexity, n_iter


def tsne_embed(latents, pca_dim, perplexity=0.0, n_iter=0, seed=0, minmax=True):
    """B.4: per modality min-max scaling (Fig. 4; minmax=False for Fig. 1, which B.4 describes with PCA
    only) and PCA, the modalities' points stacked, one 2-D t-SNE.
    latents {m: [n, d_m]} -> ({m: [n, 2] numpy}, info dict)."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(latents["seq"])
    k = min(pca_dim, n, *(z.shape[1] for z in latents.values()))
    parts = []
    for m in MODALITIES:
        x = latents[m].double().numpy()
        if minmax:
            x = (x - x.min()) / max(x.max() - x.min(), 1e-12)              # the modality's min and max
        parts.append(PCA(n_components=k, random_state=seed).fit_transform(x))          # [n, k]
    points = np.concatenate(parts, 0)                                       # [3n, k], modality-major
    perplexity, n_iter = tsne_params(len(points), perplexity, n_iter)
    y = TSNE(n_components=2, perplexity=perplexity, max_iter=n_iter, init="pca", learning_rate="auto",
             random_state=seed).fit_transform(points)                       # [3n, 2]
    info = {"n_proteins": n, "pca_components": k, "perplexity": perplexity, "iterations": n_iter}
    return {m: y[i * n:(i + 1) * n] for i, m in enumerate(MODALITIES)}, info


def plot_tsne(coords, info, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    for m in MODALITIES:
        ax.scatter(coords[m][:, 0], coords[m][:, 1], s=6, alpha=0.6, c=TSNE_COLOURS[m], label=m, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"{info['n_proteins']} proteins, PCA {info['pca_components']}, "
                  f"perplexity {info['perplexity']:.0f}, {info['iterations']} iterations", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# function-to-residue attention (B.8)

@torch.no_grad()
def function_attention(model, batch):
    """Last Enc_multi layer's attention from the function tokens to each residue, for a batch of one
    protein without masking. Returns (per-residue attention [L] = seq slot + str slot, the seq-slot
    part [L], the str-slot part [L], the full map [nh, 1+N, 1+N])."""
    if len(batch["ids"]) != 1:
        raise ValueError("function_attention takes a batch of one protein")
    if not batch.get("func_len", torch.zeros(1)).sum():
        raise ValueError(f"{batch['ids'][0]}: no function tokens, so no function-to-residue attention")
    z, ids, keep, valid, layout, attn = model.enc(batch, mask=False, return_attn=True)
    attn = attn[0]                                                          # [nh, 1+N, 1+N]
    a = attn.mean(0)                                                        # [1+N, 1+N], mean over heads
    L = int(batch["seq_len"][0])
    fs, fl = layout["func"]
    rows = a[1 + fs:1 + fs + fl]                                            # [L', 1+N] function queries
    ss, _ = layout["seq"]
    a_seq = rows[:, 1 + ss:1 + ss + L].mean(0)                              # [L]
    ts, tl = layout["str"]
    a_str = rows[:, 1 + ts:1 + ts + L].mean(0) if tl else torch.zeros_like(a_seq)
    return a_seq + a_str, a_seq, a_str, attn


def residue_keys(residue_ids):
    """'A:12B' -> (chain, number, insertion code) as PDB columns 22, 23-26, 27 hold them."""
    keys = []
    for rid in residue_ids:
        chain, rest = rid.split(":", 1)
        digits = rest.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        keys.append((chain, digits, rest[len(digits):]))
    return keys


def bfactor_pdb(src, dst, values):
    """Copy a PDB file, writing values[(chain, number, icode)] (0.00 for other residues) into the
    B-factor columns 61-66 of every ATOM/HETATM line. Returns the number of lines changed."""
    opener = gzip.open if str(src).endswith(".gz") else open
    with opener(src, "rt") as f:
        lines = f.read().splitlines()
    out, n = [], 0
    for line in lines:
        if line[:6] in ("ATOM  ", "HETATM"):
            key = (line[21:22], line[22:26].strip(), line[26:27].strip())
            line = line.ljust(66)
            line = line[:60] + f"{values.get(key, 0.0):6.2f}" + line[66:]
            n += 1
        out.append(line)
    remark = "REMARK 250 B-FACTOR = 100 x FUNCTION-TO-RESIDUE ATTENTION / MAX (AMMA analyze.py)"
    Path(dst).write_text("\n".join([remark.ljust(80)] + out) + "\n")
    return n


def write_attention(cfg, model, root, pid, out, device):
    """The attention TSV (and PDB copy) of one protein. Returns (tsv path, pdb path or None, rows)."""
    rows = {r["id"]: r for r in cache.read_manifest(root)}
    if pid not in rows:
        raise SystemExit(f"error: protein {pid} is not in {root}/manifest.tsv")
    row = rows[pid]
    ds = cache.open_features(root, ids=[pid], max_len=cfg.max_len, max_text=cfg.func_tokens or 512)
    item = ds[0]
    if cfg.name:                                          # B.8: the name alone as the function text
        item["func"] = name_features(root, cfg.name)[: cfg.func_tokens or 512]
    batch = cache.batch_to(cache.collate([item]), device)
    try:
        total, a_seq, a_str, _ = function_attention(model, batch)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    total, a_seq, a_str = total.cpu(), a_seq.cpu(), a_str.cpu()
    L = len(total)
    letters = row.get("sequence", "")[:L]
    letters = letters if len(letters) == L else "?" * L

    structure, pdb_ids = cfg.structure, [""] * L
    if not structure and row.get("structure") and Path(row["structure"]).exists():
        structure = row["structure"]
        print(f"attention: using the structure named in the manifest, {structure}")
    pdb_path = None
    if structure:
        import gearnet
        name = Path(structure).name.lower().removesuffix(".gz")
        if name.endswith((".cif", ".mmcif")):
            raise SystemExit(f"error: {structure}: the B-factor copy needs a PDB file, not mmCIF")
        chain = row.get("chain") or None
        s = gearnet.read_structure(structure, chain=chain if chain and "," not in chain else None)
        seq = s["sequence"][:L]
        same = len(seq) == L and all(a == b or "X" in (a, b) or "?" in (a, b) for a, b in zip(seq, letters))
        if not same:
            raise SystemExit(f"error: {structure} does not match {pid}'s features: its first {L} residues with "
                             f"a C-alpha atom read {seq[:30]}..., the features' sequence {letters[:30]}...")
        if letters == "?" * L:
            letters = seq
        pdb_ids = s["residue_ids"][:L]
        scaled = 100.0 * total / total.max().clamp_min(1e-12)
        values = dict(zip(residue_keys(pdb_ids), scaled.tolist()))
        pdb_path = out / f"attention_{pid}.pdb"
        bfactor_pdb(structure, pdb_path, values)

    order = sorted(range(L), key=lambda i: (-float(total[i]), i))
    table = [(rank, i + 1, letters[i], float(total[i]), float(a_seq[i]), float(a_str[i]), pdb_ids[i])
             for rank, i in enumerate(order, 1)]
    tsv = out / f"attention_{pid}.tsv"
    lines = ["rank\tresidue\tletter\tattention\tattention_seq\tattention_str\tpdb_residue"]
    lines += [f"{r}\t{i}\t{c}\t{a:.6g}\t{s_:.6g}\t{t:.6g}\t{p}" for r, i, c, a, s_, t, p in table]
    tsv.write_text("\n".join(lines) + "\n")
    return tsv, pdb_path, table


def name_features(root, name):
    """B.8's function text: [CLS] + the protein name's tokens, encoded alone by the feature set's text
    encoder (info.json: the tiny BERT for tiny sets, else the Hugging Face model named there): [L', d]."""
    import types
    import extract_features as ef
    try:
        info = json.loads((Path(root) / "info.json").read_text())
    except (OSError, ValueError):
        info = {}
    model = info.get("encoders", {}).get("func")
    if info.get("synthetic") or not model:
        raise SystemExit(f"error: --name needs the text encoder of {root}'s func features, but "
                         f"{'its features are synthetic' if info.get('synthetic') else 'info.json names none'}; "
                         "use --func-tokens K instead")
    tiny = model == ef.TINY_NAMES["func"]
    try:
        encoder = ef.load_encoder("func", types.SimpleNamespace(encoders="tiny" if tiny else "real",
                                                                text_model=model, precision="fp32"), "cpu")
    except ef.FatalError as e:
        raise SystemExit(f"error: --name: {e}") from None
    return encoder([encoder.ids({"ProteinName": name})])[0]                  # [1 + name tokens, d]


def read_sites(path):
    """{protein id: sorted 1-based residue numbers} from a sites TSV (id<TAB>12,45 or one site per line)."""
    sites = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"error: --sites {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            nums = [int(x) for x in parts[1].replace(" ", "").split(",") if x]
        except (IndexError, ValueError):
            raise SystemExit(f"error: --sites {path}:{n}: expected 'id<TAB>12,45,46' (1-based residue numbers), "
                             f"got {line[:60]!r}") from None
        sites.setdefault(parts[0], set()).update(nums)
    return {k: sorted(v) for k, v in sites.items()}


def top_residues(ranked, sites, k_default):
    """B.8: the top-k residues by attention, k = the number of annotated sites (else k_default), and how
    many of them are sites."""
    k = len(sites) if sites else k_default
    top = ranked[:k]
    return {"k": len(top), "k_from": "annotated sites" if sites else "--top-k", "top": [i for _, i, *_ in top],
            "letters": [c for _, _, c, *_ in top], "sites": sites,
            "hits": len({i for _, i, *_ in top} & set(sites)) if sites else None}


# ----------------------------------------------------------------------------------------------
# the analysis

def load_model(path, want_contrastive, device):
    try:
        model, config, _ = amma.load_pretrained(path, map_location=device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if (config.variant == "contrastive") != want_contrastive:
        flag = "--contrastive-ckpt" if config.variant == "contrastive" else "--ckpt"
        raise SystemExit(f"error: {path} is a '{config.variant}' checkpoint: pass it as {flag}")
    return model.to(device).eval(), config


def check_dims(config, root, path):
    dims = cache.feature_dims(root)
    bad = {m: (d, config.dims()[m]) for m, d in dims.items() if d != config.dims()[m]}
    if bad:
        raise SystemExit(f"error: {root} and {path} do not match (feature width, model width): {bad}")


def tsne_panels(cfg, models, kept, n_tsne, out):
    """B.4's t-SNE pictures, one per column: Fig. 1 = PCA to 100 of the encoders' outputs; Fig. 4 = min-max
    scaling per modality, then PCA to 500. Returns the PNG paths."""
    panels = {"initial": ("frozen features (Fig. 1)", 100, False), "amma": ("AMMA Z'_{m,0} (Fig. 4a)", 500, True),
              "contrastive": ("AMMA-contrastive z_m (Fig. 4b)", 500, True)}
    files = []
    for col in models:
        title, pca_dim, minmax = panels[col]
        first = {m: z[:n_tsne[col]] for m, z in kept[col].items()}               # the same proteins, first n
        coords, info = tsne_embed(first, pca_dim, cfg.tsne_perplexity, cfg.tsne_iter, cfg.seed, minmax)
        path = out / f"tsne_{col}.png"
        plot_tsne(coords, info, f"t-SNE: {title}", path)
        files.append(path)
        print(f"\nt-SNE {col}: {info['n_proteins']} proteins x 3 modalities, PCA {info['pca_components']}"
              f"{', min-max scaled' if minmax else ''}, perplexity {info['perplexity']:.1f}, "
              f"{info['iterations']} iterations")
    return files


def analyze(cfg):
    t0 = time.time()
    if cfg.batch_size < 2:
        raise SystemExit("error: --batch-size must be 2 or more (a relation matrix of one protein is [[1]])")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(cfg.features)
    if not (root / "manifest.tsv").exists():
        import demo
        print(f"no feature set at {root}: analysing the built-in demo instead "
              f"(synthetic features, not real ESM-1b/GearNet/PubMedBERT ones)")
        root = demo.ensure_demo_features("features/demo")
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)

    model, config = load_model(cfg.ckpt, False, device)
    check_dims(config, root, cfg.ckpt)
    models = {"initial": initial_latents, "amma": lambda b: amma_latents(model, b)}
    if cfg.contrastive_ckpt:
        con, con_config = load_model(cfg.contrastive_ckpt, True, device)
        check_dims(con_config, root, cfg.contrastive_ckpt)
        models["contrastive"] = lambda b: contrastive_latents(con, b)
    models = {c: models[c] for c in COLUMNS if c in models}            # Initial, CL, AMMA order

    ids = paired_ids(root, cfg.n_proteins, cfg.seed)
    if len(ids) < 2:
        raise SystemExit(f"error: {root} has {len(ids)} proteins with seq, str and func; Table 1 needs 2 or more")
    dataset = cache.open_features(root, ids=ids, max_len=cfg.max_len)
    print(f"AMMA {config.variant} from {cfg.ckpt} on {root}: {len(ids)} proteins with all three modalities, "
          f"relation batches of {cfg.batch_size}, device {device}")
    n_tsne = {"initial": cfg.tsne_n_initial if cfg.tsne_n else 0, "amma": cfg.tsne_n, "contrastive": cfg.tsne_n}
    scores, kept = compute_latents(models, dataset, cfg.batch_size, max(n_tsne.values()), device)
    n_batches = len(scores["initial"][False]["seq-str"])
    mean = lambda v: sum(v) / len(v)
    table = {c: {p: mean(v) for p, v in scores[c][False].items()} for c in models}
    rowwise = {c: {p: mean(v) for p, v in scores[c][True].items()} for c in models}
    within = {c: {m: mean(v) for m, v in scores[c]["within"].items()} for c in models}
    result = {"table1": table, "table1_rowwise": rowwise, "within_modality_cosine": within, "paper": PAPER_TABLE1,
              "batch_size": cfg.batch_size, "n_batches": n_batches, "n_proteins": len(ids),
              "features": str(root), "ckpt": cfg.ckpt, "contrastive_ckpt": cfg.contrastive_ckpt,
              "variant": config.variant, "seed": cfg.seed,
              "latents": {"initial": "frozen features averaged over length (B.5)",
                          "contrastive": "z_m of eq. 14", "amma": "Z'_{m,0}: l0 outputs, unmasked, averaged (eq. 3)"}}
    (out / "table1.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table1.md").write_text(
        f"Table 1: cosine similarity between relation matrices ({n_batches} batches of {cfg.batch_size}, "
        f"{root})\n\n" + table1_markdown(table))
    files = [out / "table1.json", out / "table1.md"]
    print(f"\nTable 1 (ours, paper in parentheses; {n_batches} batches of {cfg.batch_size}):")
    print(table1_text(table))
    for c, w in within.items():
        if max(w.values()) > 0.9:
            print(f"note: {COLUMNS[c]} latents of different proteins have mean cosine "
                  f"{', '.join(f'{m} {v:.2f}' for m, v in w.items())}: their relation matrices are close to "
                  f"all-ones, so this column is close to 1 whatever the alignment")

    if cfg.tsne_n:
        files += tsne_panels(cfg, models, kept, n_tsne, out)

    pid = cfg.protein or ids[0]
    if not cfg.protein:
        print(f"\nattention: no --protein given, using {pid}")
    tsv, pdb, ranked = write_attention(cfg, model, root, pid, out, device)
    files += [tsv] + ([pdb] if pdb else [])
    top = top_residues(ranked, read_sites(cfg.sites).get(pid) if cfg.sites else None, cfg.top_k)
    runs.atomic_write_text(out / f"attention_{pid}.json", json.dumps({"protein": pid, **top}, indent=1) + "\n")
    files.append(out / f"attention_{pid}.json")
    print(f"\nfunction-to-residue attention of {pid} ({len(ranked)} residues), top {top['k']} ({top['k_from']}): "
          + ", ".join(f"{c}{i}" for c, i in zip(top["letters"], top["top"]))
          + (f"; {top['hits']} of them annotated sites" if top["sites"] is not None else ""))
    print(f"\nwrote ({time.time() - t0:.0f} s):\n" + "\n".join(f"  {f}" for f in files))
    return result


# ----------------------------------------------------------------------------------------------
# collector for ablations.sh

def _find(d, names):
    """First numeric value of a key in names (case-insensitive) in dict d."""
    if not isinstance(d, dict):
        return None
    for k, v in d.items():
        if k.lower() in names and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def read_metrics(results):
    """Test (Fmax, AUPR) from a finetune results dict, in percent (None where missing)."""
    names = {"fmax": {"fmax", "f1_max", "f_max"}, "aupr": {"aupr", "auprc", "area_under_prc"}}
    out = []
    for metric in ("fmax", "aupr"):
        v = _find(results.get("test"), names[metric])
        if v is None:
            v = _find(results, {f"test_{n}" for n in names[metric]})
        if v is None:
            v = _find(results, names[metric])
        out.append(None if v is None else (100.0 * v if v <= 1.0 else v))
    return tuple(out)


def read_run(path):
    """One finetuning's results.json -> dict(fmax, aupr in percent, protocol, synthetic, tiny, baseline)."""
    results = json.loads(path.read_text())
    if not isinstance(results, dict):
        raise ValueError("not a results object")
    fm, au = read_metrics(results)
    base = (results.get("baseline") or {}).get("test") or {}
    return {"fmax": fm, "aupr": au, "protocol": results.get("protocol", "unknown"),
            "synthetic": bool(results.get("synthetic")), "tiny": bool(results.get("tiny")),
            "features": results.get("features", ""), "seed": results.get("seed"), "path": str(path),
            "baseline": [100 * base["fmax"], 100 * base["aupr"]] if "fmax" in base and "aupr" in base else None}


def _cell(pair):
    return " / ".join("-" if v is None else f"{v:.1f}" for v in pair)


def seed_stats(runs):
    """One cell from a run's finetunings over seeds: mean (fmax, aupr), sample SD (None for one seed), n,
    and the per-seed values; protocol, marks and the baseline from all of them."""
    def mean_sd(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, None
        m = sum(vals) / len(vals)
        return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None)
    (fm, fsd), (au, asd) = mean_sd([r["fmax"] for r in runs]), mean_sd([r["aupr"] for r in runs])
    return {"fmax": fm, "aupr": au, "fmax_sd": fsd, "aupr_sd": asd, "n": len(runs),
            "seeds": [r.get("seed") for r in runs], "values": [[r["fmax"], r["aupr"]] for r in runs],
            "protocol": ", ".join(sorted({r["protocol"] for r in runs})),
            "synthetic": any(r["synthetic"] for r in runs), "tiny": any(r["tiny"] for r in runs),
            "features": runs[0]["features"], "baseline": runs[0]["baseline"], "paths": [r["path"] for r in runs]}


def far_from_paper(mean, sd, paper):
    """More than 2 SD of our seeds away from the paper's number (an SD of 0 counts any difference);
    never with one seed (no SD)."""
    if mean is None or sd is None or paper is None:
        return False
    return abs(mean - paper) > 2 * sd if sd > 0 else abs(mean - paper) > 0.05


def _stat_cell(r, paper=None):
    """Our cell: 'mean+-SD / mean+-SD (n=k)', a '!' after a metric more than 2 SD from the paper's."""
    parts = []
    for i, metric in enumerate(("fmax", "aupr")):
        m, sd = r[metric], r[f"{metric}_sd"]
        text = "-" if m is None else f"{m:.1f}" + ("" if sd is None else f"+-{sd:.1f}")
        parts.append(text + ("!" if paper and far_from_paper(m, sd, paper[i]) else ""))
    return " / ".join(parts) + f" (n={r['n']})"


def _our_averages(cells, averages):
    """Our row's averages the way the paper's table takes them: per metric over the tasks (Table 2), or
    over all of the row's numbers (Tables 3, 4, 6); '-' unless every task of the table is there."""
    if any(c is None or None in c for c in cells):
        return ["-"] * len(averages)
    if len(averages) == 2:
        return [f"{sum(c[i] for c in cells) / len(cells):.1f}" for i in (0, 1)]
    return [f"{sum(v for c in cells for v in c) / (2 * len(cells)):.1f}"]


def table_rows(name, spec, found):
    """The rows of one paper table: ours (when run), each followed by the paper's; then the baseline."""
    rows, protocols, marks, flagged = [], set(), set(), []
    for run, label, paper, paper_avg in spec["rows"]:
        if run in found:
            r = found[run]
            cells = [[r[t]["fmax"], r[t]["aupr"]] if t in r else None for t in spec["tasks"]]
            proto = sorted({r[t]["protocol"] for t in spec["tasks"] if t in r})
            mark = "synthetic" if any(r[t]["synthetic"] for t in r) else "tiny" if any(r[t]["tiny"] for t in r) else ""
            protocols.update(proto)
            marks.add(mark)
            stats = {t: {k: r[t][k] for k in ("fmax_sd", "aupr_sd", "n", "seeds", "values")} for t in spec["tasks"]
                     if t in r}
            far = [t for t in stats if paper and far_from_paper(r[t]["fmax"], r[t]["fmax_sd"], paper[t][0])
                   or paper and far_from_paper(r[t]["aupr"], r[t]["aupr_sd"], paper[t][1])]
            if far:
                flagged.append(f"{run}: {', '.join(far)}")
            rows.append({"row": f"ours: {run}" + (f" [{mark}]" if mark else ""), "protocol": ", ".join(proto),
                         "cells": [_stat_cell(r[t], paper.get(t) if paper else None) if t in r else "-"
                                   for t in spec["tasks"]],
                         "averages": _our_averages(cells, spec["averages"]), "values": cells, "seeds": stats})
        if not paper:                                                          # a run of no paper table
            continue
        rows.append({"row": f"  paper: {label}", "protocol": PAPER_PROTOCOL,
                     "cells": [_cell(paper[t]) for t in spec["tasks"]],
                     "averages": [f"{v:.1f}" for v in paper_avg], "values": [list(paper[t]) for t in spec["tasks"]]})
    base = {}
    for run in (r for r, *_ in spec["rows"] if r in found):
        for t in spec["tasks"]:
            if t in found[run] and found[run][t]["baseline"] and t not in base:
                base[t] = found[run][t]["baseline"]
    if base:
        cells = [base.get(t) for t in spec["tasks"]]
        rows.append({"row": "label-frequency baseline", "protocol": "",
                     "cells": [_cell(c) if c else "-" for c in cells],
                     "averages": _our_averages(cells, spec["averages"]), "values": cells})
    notes = []
    if len(protocols) > 1:
        notes.append(f"MIXED PROTOCOLS in {name}: {', '.join(sorted(protocols))} (the paper: {PAPER_PROTOCOL}); "
                     "compare rows of the same protocol only")
    elif protocols and protocols != {PAPER_PROTOCOL}:
        notes.append(f"{name}: our rows ran {protocols.pop()}, the paper's {PAPER_PROTOCOL}")
    if flagged:
        notes.append(f"{name}: '!' marks a mean more than 2 SD (of our seeds) from the paper's number: "
                     + "; ".join(flagged))
    if marks - {""}:
        notes.append(f"{name}: rows marked [synthetic] / [tiny] come from the demo or tiny random-init encoders: "
                     "they test the pipeline and say nothing about real proteins")
    return rows, notes


def format_table(name, spec, rows, markdown=False):
    header = ["Row", "Protocol"] + [TASK_NAMES[t] + " Fmax / AUPR" for t in spec["tasks"]] + list(spec["averages"])
    body = [[r["row"], r["protocol"]] + r["cells"] + r["averages"] for r in rows]
    if markdown:
        lines = [f"### {name}: {spec['title']}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c.strip() for c in b) + " |" for b in body])
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([f"{name}: {spec['title']} (test, percent)", fmt(header)] + [fmt(b) for b in body])


def run_and_task(rel):
    """(run, task) of a results.json path relative to the collected folder: <run>/<task>/results.json,
    <run>/<task>/seed-<s>/results.json (SEEDS) or <run>/seed-<s>/<task>/results.json (SEED_PRETRAIN);
    None for anything else."""
    parts = rel.parts[:-1]
    seeds = [p for p in parts[1:] if p.startswith("seed-")]
    rest = [p for p in parts[1:] if not p.startswith("seed-")]
    if len(parts) not in (2, 3) or parts[0].startswith("seed-") or len(seeds) != len(parts) - 2 or rest[0] not in TASKS:
        return None
    return parts[0], rest[0]


def collect(root):
    """Gather every finetuning's results.json under root (<run>/<task>/, one folder per seed below or
    above the task's with ablations.sh's SEEDS) into the paper's Tables 2, 3, 4 and 6: ours as mean +- SD
    over seeds with n, each followed by the paper's row, then the label-frequency baseline; plus any other
    runs; print them and write <root>/results_table.md and .json."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("results.json")):
        key = run_and_task(path.relative_to(root))
        if key is None:
            continue
        run, task = key
        try:
            r = read_run(path)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}")
            continue
        if r["fmax"] is None and r["aupr"] is None:
            print(f"skipping {path}: no test Fmax/AUPR found")
            continue
        found.setdefault(run, {}).setdefault(task, []).append(r)
    found = {run: {t: seed_stats(rs) for t, rs in tasks.items()} for run, tasks in found.items()}
    if not found:
        raise SystemExit(f"error: no {root}/<run>/<task>/results.json with task in {', '.join(TASKS)}")
    text, md, saved = [], [f"# Results collected from {root}", ""], {}
    tables = dict(PAPER_TABLES)
    known = {run for spec in PAPER_TABLES.values() for run, *_ in spec["rows"]}
    others = sorted(set(found) - known)
    if others:
        tables["Other runs"] = dict(tasks=TASKS, averages=("Avg Fmax", "Avg AUPR"), title="runs of no paper table",
                                    rows=[(run, "-", {}, ()) for run in others])
    for name, spec in tables.items():
        if not any(run in found for run, *_ in spec["rows"]):
            continue
        rows, notes = table_rows(name, spec, found)
        text += [format_table(name, spec, rows)] + [f"note: {n}" for n in notes] + [""]
        md += [format_table(name, spec, rows, markdown=True), ""] + [f"*{n}*" for n in notes] + [""]
        saved[name] = {"tasks": list(spec["tasks"]), "rows": rows, "notes": notes}
    print("\n".join(text))
    (root / "results_table.md").write_text("\n".join(md))
    (root / "results_table.json").write_text(json.dumps(
        {"unit": "percent", "metrics": "test Fmax / AUPR", "tables": saved,
         "runs": {run: {t: [r["fmax"], r["aupr"]] for t, r in tasks.items()} for run, tasks in found.items()},
         "protocols": {run: {t: r["protocol"] for t, r in tasks.items()} for run, tasks in found.items()},
         "seeds": {run: {t: {k: r[k] for k in ("n", "seeds", "fmax_sd", "aupr_sd", "values", "paths")}
                         for t, r in tasks.items()} for run, tasks in found.items()}},
        indent=1) + "\n")
    print(f"wrote {root / 'results_table.md'} and {root / 'results_table.json'} ({len(found)} runs)")
    return {run: {t: [r["fmax"], r["aupr"]] for t, r in tasks.items()} for run, tasks in found.items()}


# ----------------------------------------------------------------------------------------------
# the overlap audit: test chains with a pretraining neighbour, and the metrics without them

def neighbour_sets(entry):
    """{label: ids} of one task's audit entry: identical, then >= 95 / 50 / 30 % (where MMseqs2 ran)."""
    out = {"identical": set(entry["identical"])}
    for t in overlap.THRESHOLDS:
        key = f">={round(100 * t)}"
        if entry[key] is not None:
            out[key] = set(entry[key])
    return out


def rescore(path, report):
    """Fmax / AUPR of one predictions file at its cutoff: all its test chains, then without each neighbour set."""
    import metrics
    data = metrics.load_predictions(path)
    task, cutoff = data["meta"].get("task"), data["meta"].get("cutoff", 95)
    if task not in report["tasks"]:
        raise ValueError(f"{path}: task {task!r} is not among the audited tasks ({', '.join(report['tasks'])})")
    cutoff = cutoff if cutoff in data["test_cutoffs"].tolist() else None
    ids = set(data["test_ids"].tolist())
    rows = {"all test chains": metrics.split_scores(data, "test", cutoff)}
    for label, drop in neighbour_sets(report["tasks"][task]).items():
        rows[f"without {label}"] = metrics.split_scores(data, "test", cutoff, keep=ids - drop)
    return {"file": str(path), "task": task, "cutoff": cutoff, "epoch": data["meta"].get("epoch"), "rows": rows}


def overlap_text(report, rescored):
    cols = ["identical"] + [f">={round(100 * t)}%" for t in overlap.THRESHOLDS]
    lines = [f"Overlap of test chains with the pretraining set {report['pretrain']} ({report['pretrain_proteins']} "
             f"proteins; identity: {report['identity']})", f"{'task':<8}{'test chains':>12}" + "".join(f"{c:>11}" for c in cols)]
    for task, e in report["tasks"].items():
        cells = [len(e["identical"])] + [e[f">={round(100 * t)}"] for t in overlap.THRESHOLDS]
        lines.append(f"{task:<8}{e['test_chains']:>12}" + "".join(f"{'-' if c is None else len(c) if isinstance(c, list) else c:>11}"
                                                                   for c in cells))
    if not report["mmseqs"]:
        lines.append(f"note: the >= 95/50/30% columns need MMseqs2 ({overlap.MMSEQS_HINT}); identical sequences "
                     "were counted without it")
    for r in rescored:
        lines += ["", f"{r['file']} ({r['task']}, epoch {r['epoch']}, test at <{r['cutoff']}% identity): Fmax / AUPR (%)"]
        for label, s in r["rows"].items():
            cell = "-" if s["n"] == 0 else f"{100 * s['fmax']:.1f} / {100 * s['aupr']:.1f}"
            lines.append(f"  {label:<22}{s['n']:>7} chains  {cell}")
    return "\n".join(lines)


def overlap_audit(cfg):
    """analyze.py --overlap: the audit table, the re-scored predictions, overlap.json in --out (default runs/overlap)."""
    if not cfg.pretrain or not cfg.tasks:
        raise SystemExit("error: --overlap needs --pretrain DIR and --tasks DIR [DIR ...]")
    try:
        report = overlap.audit(cfg.pretrain, cfg.tasks, cfg.threads)
        rescored = [rescore(p, report) for p in cfg.predictions]
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(overlap_text(report, rescored))
    out = Path(cfg.out or "runs/overlap")
    out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(out / "overlap.json", json.dumps({**report, "rescored": rescored}, indent=1) + "\n")
    print(f"\nwrote {out / 'overlap.json'}")
    return {**report, "rescored": rescored}


# ----------------------------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description="Table 1, t-SNE and function-to-residue attention of a pretrained "
                                            "AMMA (paper 4.3, B.4, B.5, B.8); --collect gathers finetuning results.")
    for f in fields(AnalyzeConfig):
        name = "--" + f.name.replace("_", "-")
        shown = f.default not in ("", 0, (), False) and "default" not in f.metadata["help"]
        kind = (dict(action="store_true") if isinstance(f.default, bool) else
                dict(nargs="+", type=str) if isinstance(f.default, tuple) else dict(type=type(f.default)))
        p.add_argument(name, default=f.default, help=f.metadata["help"] + (" (default: %(default)s)" if shown else ""),
                       **kind)
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = AnalyzeConfig(**vars(args))
    if cfg.collect:
        return collect(cfg.collect)
    if cfg.overlap:
        return overlap_audit(cfg)
    if not cfg.ckpt:
        build_parser().error("--ckpt is required (or --collect DIR, or --overlap)")
    try:
        return analyze(cfg)
    except (ValueError, FileNotFoundError) as e:  # a truncated feature file, a missing structure: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
