"""
AMMA: asymmetric multi-modal masked autoencoder for proteins (sequence, structure, function text).

One self-contained file (torch + standard library): the model, the Dirichlet mask sampler, the
asymmetric decoders, the losses and the pretraining loop. Names follow the paper: Proj_m, Enc_multi,
l0/l1/l2, Dec_seq/Dec_str/Dec_func, M, alpha.

    python amma.py --pretrain                                   # features/pretrain, or the built-in demo
    python amma.py --pretrain --features features/pretrain --out runs/amma
    python amma.py --pretrain --variant symmetric --out runs/symmetric       # also no-aux, contrastive
    python amma.py --pretrain --alpha 1 1 1 --out runs/alpha111              # Table 4 ablation
    python amma.py --pretrain --resume --out runs/amma                       # continue exactly
    python amma.py --pretrain --init runs/amma/checkpoint.pt --features '' \\
        --unpaired-seqstr features/seqstr --unpaired-seqfunc features/seqfunc  # eq. 12 (B.6)
    torchrun --nproc_per_node 4 amma.py --pretrain                           # DDP (NCCL on GPU, gloo on CPU)
    python amma.py --analyze --ckpt runs/amma/checkpoint.pt --features features/demo   # see analyze.py

Conventions, stated once:
- Masking: keep[b, i] is True for a token the encoder SEES (MAE writes 0 for keep; we use booleans).
- alpha: lambda ~ Dirichlet(alpha) is the share of the M kept tokens per modality, so a LARGER
  alpha_m keeps MORE tokens of modality m on average (mean share alpha_m / sum(alpha)).
- Token layout of one protein: [seq (L) | str (L) | func (L')], padded per batch to [Ls | Ls | Lf].
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from tqdm import tqdm
except ImportError:  # amma.py needs only torch: without tqdm there is no progress bar
    class tqdm:
        def __init__(self, *args, **kwargs): pass
        def update(self, n=1): pass
        def set_postfix(self, **kwargs): pass
        def close(self): pass

MODALITIES = ("seq", "str", "func")

# Which slots each decoder sees (paper eq. 3, eq. 13, eq. 17). Dec_m reads the output of l_k with
# k = MODALITIES.index(m): Dec_seq <- l0, Dec_str <- l1, Dec_func <- l2. A target that is not among
# its own inputs gets query slots (zeros + position + modality embedding).
ROUTING = {
    "asymmetric": {"seq": ("seq",), "str": ("seq", "func"), "func": ("seq", "str")},
    "symmetric": {"seq": ("seq",), "str": ("str",), "func": ("func",)},
    "no-aux": {"seq": ("seq",), "str": ("seq",), "func": ("seq",)},
}
VARIANTS = tuple(ROUTING) + ("contrastive",)


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class AMMAConfig:
    d_seq: int = 1280          # ESM-1b layer 33
    d_str: int = 3072          # GearNet-Edge, 6 x 512, concat_hidden
    d_func: int = 768          # PubMedBERT-abs
    D: int = 512               # width of Proj, Enc_multi and the decoders
    n_layers: int = 8          # Enc_multi (and Enc_con of the contrastive variant)
    n_heads: int = 8
    dec_layers: int = 2        # per decoder
    mlp_ratio: int = 4
    dropout: float = 0.0
    M: int = 160               # tokens kept per protein
    alpha: tuple = (1.0, 2.0, 2.0)   # Dirichlet concentration for (seq, str, func)
    variant: str = "asymmetric"      # asymmetric | symmetric | no-aux | contrastive
    loss_on: str = "all"             # all valid positions (eq. 4) | masked
    tau: float = 0.07                # InfoNCE temperature (contrastive variant; the paper gives none)

    def dims(self):
        return {"seq": self.d_seq, "str": self.d_str, "func": self.d_func}


# ----------------------------------------------------------------------------------------------
# feature cache (the contract with extract_features.py; SPEC.md)

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

    def lengths(self):
        """Tokens per protein in the full layout (2L + L'), for length bucketing."""
        has = {m: m in self.modalities for m in MODALITIES}
        return [min(r["L"], self.max_len) * (1 + (has["str"] and "str" in r["modalities"]))
                + min(r["L_func"], self.max_text) * (has["func"] and "func" in r["modalities"]) for r in self.rows]

    def __getitem__(self, i):
        row = self.rows[i]
        item = {"id": row["id"]}
        for m in MODALITIES:
            x = None
            if m in self.modalities and m in row["modalities"]:
                x = load_tensor(self.root / m / f"{row['id']}.pt")
                x = x[: self.max_text if m == "func" else self.max_len]
            item[m] = x
        if item["str"] is not None and item["seq"] is not None and len(item["str"]) != len(item["seq"]):
            raise ValueError(f"{row['id']}: seq has {len(item['seq'])} rows but str has {len(item['str'])}")
        return item


def collate(items):
    """Pad a list of items into a batch: x [B, L, d] float16/32 and lengths [B] per modality.
    A modality missing from every item is left out; missing for some items has length 0."""
    batch = {"ids": [it["id"] for it in items]}
    for m in MODALITIES:
        xs = [it.get(m) for it in items]
        present = [x for x in xs if x is not None]
        if not present:
            continue
        d, dtype = present[0].shape[1], present[0].dtype
        if any(x.shape[1] != d for x in present):
            raise ValueError(f"{m} features of different widths in one batch: {sorted({x.shape[1] for x in present})}")
        lengths = torch.tensor([0 if x is None else len(x) for x in xs])
        out = torch.zeros(len(items), max(int(lengths.max()), 1), d, dtype=dtype)
        for b, x in enumerate(xs):
            if x is not None:
                out[b, : len(x)] = x
        batch[m], batch[m + "_len"] = out, lengths
    if "group" in items[0]:
        batch["group"] = torch.tensor([it["group"] for it in items])
    return batch


def batch_to(batch, device):
    """Move a batch to `device`; features become float32 (autocast decides the compute dtype)."""
    return {k: (v.to(device, non_blocking=True).float() if k in MODALITIES else
                v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# mask sampler (pure functions of tensors and a torch.Generator)

def dirichlet(alpha, n, generator=None):
    """n draws of lambda ~ Dirichlet(alpha) as normalised Gamma(alpha_m, 1) draws: [n, len(alpha)]."""
    a = torch.as_tensor(alpha, dtype=torch.float64).expand(n, len(alpha)).contiguous()
    g = torch._standard_gamma(a, generator=generator)  # torch.distributions takes no generator
    return (g / g.sum(1, keepdim=True).clamp_min(1e-300)).float()


def budgets(lam, M):
    """round(lambda * M) per modality, rounded by largest remainder so each row sums to exactly M."""
    raw = lam * M                                              # [B, 3]
    b = raw.floor().long()
    short = M - b.sum(1, keepdim=True)                         # [B, 1], 0..2
    order = (raw - b).argsort(1, descending=True).argsort(1)   # rank of each remainder
    return b + (order < short).long()


def sample_keep(counts, M, alpha, generator=None):
    """Which tokens the encoder keeps, for a padded batch.

    counts: [B, 3] valid tokens of (seq, str, func) per protein (0 for an absent modality).
    Returns (key, valid), both [B, 3, Lmax] in the per-modality padded layout: key is a random
    priority, above 2 for each modality's budget of tokens, in [0, 1) for the other valid tokens
    (the refill takes the highest), -1 for padding. `keep_mask` turns it into the boolean mask.
    """
    B = counts.shape[0]
    k = torch.minimum(budgets(dirichlet(alpha, B, generator), M), counts)       # [B, 3] primary
    Lmax = max(int(counts.max()), 1)
    pos = torch.arange(Lmax).expand(B, 3, Lmax)                                 # [B, 3, Lmax]
    valid = pos < counts[..., None]
    noise = torch.rand(B, 3, Lmax, generator=generator)
    rank = noise.masked_fill(~valid, 2.0).argsort(-1).argsort(-1)               # random rank within modality
    primary = rank < k[..., None]
    refill = torch.rand(B, 3, Lmax, generator=generator)                        # in [0, 1)
    return torch.where(primary, 2.0 + refill, torch.where(valid, refill, -1.0)), valid


def keep_mask(counts, M, alpha, generator=None):
    """Boolean keep mask [B, 3, Lmax]: exactly min(M, sum(counts)) True per protein, each modality's
    budget round(lambda_m * M) taken first (at random), shortfalls filled at random from the other
    modalities' remaining tokens; padding and absent modalities are never kept."""
    key, valid = sample_keep(counts, M, alpha, generator)
    B, _, Lmax = key.shape
    T = counts.sum(1).clamp(max=M)                                              # [B] tokens to keep
    order = key.view(B, -1).argsort(1, descending=True)                         # [B, 3*Lmax]
    chosen = torch.arange(3 * Lmax).expand(B, -1) < T[:, None]
    keep = torch.zeros(B, 3 * Lmax, dtype=torch.bool).scatter(1, order, chosen)
    return keep.view(B, 3, Lmax) & valid


# ----------------------------------------------------------------------------------------------
# building blocks

def sinusoid(pos, D):
    """Sinusoidal embedding of integer positions: [...] -> [..., D] (sin on even dims, cos on odd)."""
    freq = torch.exp(torch.arange(0, D, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / D))
    angle = pos.float()[..., None] * freq                                       # [..., D/2]
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(-2)              # [..., D]


class Attention(nn.Module):
    def __init__(self, D, n_heads, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, pad, return_attn=False):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, S, hs)
        allowed = ~pad[:, None, None, :]                                        # (B, 1, 1, S) True = attend
        if return_attn:  # explicit softmax, for the analysis of B.8 only
            a = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            a = a.masked_fill(~allowed, float("-inf")).softmax(-1)              # (B, nh, S, S)
            y = a @ v
        else:            # fused kernel (flash / memory-efficient) where the device has one
            a = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, S, D)                                  # (B, S, D)
        return self.proj(y), a


class Block(nn.Module):
    """Pre-LayerNorm Transformer layer."""

    def __init__(self, D, n_heads, mlp_ratio, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention(D, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(D, mlp_ratio * D), nn.GELU(), nn.Linear(mlp_ratio * D, D), nn.Dropout(dropout))

    def forward(self, x, pad, return_attn=False):
        y, a = self.attn(self.ln1(x), pad, return_attn)
        x = x + y
        return x + self.mlp(self.ln2(x)), a


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm; padding keys are masked out of attention."""

    def __init__(self, n_layers, D, n_heads, mlp_ratio, dropout):
        super().__init__()
        self.blocks = nn.ModuleList(Block(D, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(D)

    def forward(self, x, pad, return_attn=False):
        a = None
        for i, block in enumerate(self.blocks):
            x, a = block(x, pad, return_attn and i == len(self.blocks) - 1)
        return self.ln(x), a


def Proj(d_in, D):
    """Proj_m: two fully connected layers from the frozen feature width to D."""
    return nn.Sequential(nn.Linear(d_in, D), nn.GELU(), nn.Linear(D, D))


# ----------------------------------------------------------------------------------------------
# the encoder side: Proj, embeddings, [CLS], masking, Enc_multi (all that finetuning needs)

class AMMAEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.proj = nn.ModuleDict({m: Proj(d, c.D) for m, d in c.dims().items()})
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), c.D))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.D))
        self.enc_multi = Transformer(c.n_layers, c.D, c.n_heads, c.mlp_ratio, c.dropout)
        nn.init.normal_(self.modality_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, batch, modalities=MODALITIES):
        """Proj + position + modality embedding for every slot of the full layout.
        Returns tokens [B, N, D], valid [B, N] and the layout {m: (start, length)} of each segment."""
        device = self.cls_token.device
        B = len(batch["ids"])
        parts, valid, layout, start = [], [], {}, 0
        for i, m in enumerate(MODALITIES):
            if m not in modalities or m not in batch:
                layout[m] = (start, 0)
                continue
            x, lengths = batch[m], batch[m + "_len"]
            if x.shape[-1] != self.config.dims()[m]:
                raise ValueError(f"{m} features are {x.shape[-1]}-dim but the model expects "
                                 f"{self.config.dims()[m]} (features and checkpoint do not match)")
            pos = torch.arange(x.shape[1], device=device)
            tokens = self.proj[m](x) + sinusoid(pos, self.config.D) + self.modality_embed[i]   # [B, Lm, D]
            parts.append(tokens)
            valid.append(pos[None, :] < lengths[:, None])                      # [B, Lm]
            layout[m] = (start, x.shape[1])
            start += x.shape[1]
        if not parts:
            raise ValueError(f"batch has none of the modalities {modalities}")
        return torch.cat(parts, 1), torch.cat(valid, 1), layout                # [B, N, D], [B, N]

    def keep_ids(self, batch, valid, layout, mask, generator):
        """Indices into the full layout of the tokens the encoder sees: ids [B, K] and their validity [B, K]."""
        B, N = valid.shape
        if not mask:
            return torch.arange(N, device=valid.device).expand(B, N), valid
        counts = torch.stack([batch[m + "_len"] if layout[m][1] else torch.zeros(B, dtype=torch.long, device=valid.device)
                              for m in MODALITIES], 1).cpu()                    # [B, 3]
        keep3 = keep_mask(counts, self.config.M, self.config.alpha, generator)  # [B, 3, Lmax]
        keep = torch.cat([keep3[:, i, : layout[m][1]] for i, m in enumerate(MODALITIES)], 1)  # [B, N]
        K = int(keep.sum(1).max())
        ids = keep.int().sort(dim=1, descending=True, stable=True).indices[:, :K]     # kept first: [B, K]
        return ids.to(valid.device), keep.gather(1, ids).to(valid.device)

    def forward(self, batch, mask=True, generator=None, modalities=MODALITIES, return_attn=False):
        """Enc_multi on [CLS] + the kept tokens. Returns z [B, 1+K, D], ids [B, K], keep [B, K],
        valid [B, N], layout, and the last layer's attention [B, nh, 1+K, 1+K] if asked."""
        tokens, valid, layout = self.embed(batch, modalities)
        ids, keep = self.keep_ids(batch, valid, layout, mask, generator)
        x = tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, K, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)           # [B, 1+K, D]
        pad = torch.cat([torch.zeros_like(keep[:, :1]), ~keep], 1)             # [B, 1+K]
        z, attn = self.enc_multi(x, pad, return_attn)
        return z, ids, keep, valid, layout, attn


# ----------------------------------------------------------------------------------------------
# AMMA: encoder + l0/l1/l2 + the three decoders

class Decoder(nn.Module):
    """Dec_m: two Transformer layers and a linear map to the frozen feature width."""

    def __init__(self, c, d_out):
        super().__init__()
        self.transformer = Transformer(c.dec_layers, c.D, c.n_heads, c.mlp_ratio, c.dropout)
        self.head = nn.Linear(c.D, d_out)

    def forward(self, x, pad, start, length):
        """Reconstruct the `length` target slots from `start` on: [B, length, d_out]."""
        return self.head(self.transformer(x, pad)[0][:, start:start + length])


class AMMA(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if c.variant not in ROUTING:
            raise ValueError(f"AMMA variant must be one of {tuple(ROUTING)}; use AMMAContrastive for 'contrastive'")
        self.enc = AMMAEncoder(c)
        self.l = nn.ModuleList(nn.Linear(c.D, c.D) for _ in MODALITIES)        # l0, l1, l2
        self.dec_modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), c.D))
        self.dec = nn.ModuleDict({m: Decoder(c, d) for m, d in c.dims().items()})
        nn.init.normal_(self.dec_modality_embed, std=0.02)

    def unmask(self, zk, ids, keep, N):
        """Scatter l_k outputs of the kept tokens back to the full layout, zeros at masked slots: [B, N, D]."""
        full = zk.new_zeros(zk.shape[0], N, zk.shape[-1])
        return full.scatter(1, ids[..., None].expand_as(zk), zk * keep[..., None])

    def forward_decoder(self, z, ids, keep, valid, layout, targets=MODALITIES):
        """Reconstructions {m: [B, Lm, d_m]} from the encoder output, routed as ROUTING[variant] says."""
        N, D = valid.shape[1], self.config.D
        recon = {}
        for k, m in enumerate(MODALITIES):
            if m not in targets or layout[m][1] == 0:
                continue
            zk = self.unmask(self.l[k](z[:, 1:]), ids, keep, N)                # Z'_{., k}: [B, N, D]
            inputs = [s for s in ROUTING[self.config.variant][m] if layout[s][1]]
            segments = inputs + ([] if m in inputs else [m])                   # query slots for the target
            xs, pads = [], []
            for s in segments:
                start, length = layout[s]
                x = zk[:, start:start + length] if s in inputs else zk.new_zeros(len(zk), length, D)
                pos = torch.arange(length, device=z.device)
                xs.append(x + sinusoid(pos, D) + self.dec_modality_embed[MODALITIES.index(s)])  # [B, Ls, D]
                pads.append(~valid[:, start:start + length])
            off = sum(layout[s][1] for s in segments[: segments.index(m)])    # where the target slots are
            recon[m] = self.dec[m](torch.cat(xs, 1), torch.cat(pads, 1), off, layout[m][1])  # [B, Lm, d_m]
        return recon

    def forward_loss(self, batch, recon, ids, keep, valid, layout):
        """Eq. 4 (and eq. 12 when the batch holds groups): per group and modality, the MSE over valid
        positions (or masked ones only, with loss_on='masked'), summed. Returns loss and per-modality logs."""
        B, N = valid.shape
        seen = torch.zeros(B, N, dtype=torch.bool, device=valid.device).scatter(1, ids, keep)  # [B, N]
        group = batch.get("group", torch.zeros(B, dtype=torch.long)).to(valid.device)
        loss = sum(xhat.sum() for xhat in recon.values()) * 0.0  # keeps a graph when no term applies
        logs = {}
        for m, xhat in recon.items():
            start, length = layout[m]
            use = valid[:, start:start + length]                                # [B, Lm]
            if self.config.loss_on == "masked":
                use = use & ~seen[:, start:start + length]
            err = (xhat.float() - batch[m]).pow(2).mean(-1)                     # [B, Lm]
            for g in group.unique():
                u = use & (group == g)[:, None]
                if u.any():
                    loss = loss + err[u].mean()
            logs[f"loss_{m}"] = err[use].mean().item() if use.any() else float("nan")
        return loss, logs

    def forward(self, batch, mask=True, generator=None):
        """Returns (reconstructions, loss, logs) — nanoGPT style."""
        z, ids, keep, valid, layout, _ = self.enc(batch, mask, generator)
        recon = self.forward_decoder(z, ids, keep, valid, layout, targets=[m for m in MODALITIES if m in batch])
        loss, logs = self.forward_loss(batch, recon, ids, keep, valid, layout)
        return recon, loss, logs


# ----------------------------------------------------------------------------------------------
# AMMA-contrastive (B.9): length-averaged features, Proj, Enc_con on the sequence side, InfoNCE

def info_nce(zp, zq, tau):
    """Symmetric InfoNCE of eq. 16 on L2-normalised latents [N, D]."""
    logits = F.normalize(zp, dim=-1) @ F.normalize(zq, dim=-1).T / tau          # [N, N]
    target = torch.arange(len(zp), device=zp.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class AMMAContrastive(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.proj = nn.ModuleDict({m: Proj(d, c.D) for m, d in c.dims().items()})
        self.enc_con = Transformer(c.n_layers, c.D, c.n_heads, c.mlp_ratio, c.dropout)

    def latents(self, batch):
        """z_seq, z_str, z_func (eq. 14) and z'_seq [B, D], with has[m] [B] telling which proteins
        have modality m (a modality missing from the batch is left out)."""
        z, has = {}, {}
        for m in MODALITIES:
            if m not in batch:
                continue
            x, n = batch[m], batch[m + "_len"]
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]   # [B, Lm]
            mean = (x * valid[..., None]).sum(1) / n.clamp_min(1)[:, None]        # X'' [B, d_m]
            z[m], has[m] = self.proj[m](mean), n > 0                              # [B, D], [B]
        z["seq'"], has["seq'"] = z["seq"], has["seq"]
        one = torch.zeros(len(z["seq"]), 1, dtype=torch.bool, device=z["seq"].device)
        z["seq"] = self.enc_con(z["seq"][:, None], one)[0][:, 0]                   # [B, D]
        return z, has

    def forward(self, batch, mask=True, generator=None):
        """Eq. 15 over the proteins that have both modalities of each pair: (latents, loss, logs)."""
        z, has = self.latents(batch)
        logs, loss = {}, sum(v.sum() for v in z.values()) * 0.0  # keeps a graph when no pair applies
        for name, (p, q) in {"seq2str": ("seq", "str"), "seq2func": ("seq", "func"), "reg": ("seq", "seq'")}.items():
            both = has[p] & has[q] if q in z else None
            if both is not None and both.sum() > 1:
                l_pq = info_nce(z[p][both], z[q][both], self.config.tau)
                loss, logs[f"loss_{name}"] = loss + l_pq, l_pq.item()
        return z, loss, logs


def build_model(config):
    return AMMAContrastive(config) if config.variant == "contrastive" else AMMA(config)


def read_checkpoint(path, map_location="cpu"):
    """An AMMA pretraining checkpoint: (AMMAConfig, checkpoint dict); a one-line error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (amma.py --pretrain writes runs/<name>/checkpoint.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds code
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an AMMA pretraining checkpoint (no 'model' and 'config')")
    if str(ckpt.get("kind", "")).startswith("finetune"):
        raise ValueError(f"{path} is a finetuning checkpoint; give the pretraining one (runs/<name>/checkpoint.pt)")
    try:
        config = AMMAConfig(**{k: tuple(v) if k == "alpha" else v for k, v in ckpt["config"].items()})
    except TypeError as e:
        raise ValueError(f"{path}: its config does not fit this amma.py ({e})") from None
    if config.variant not in VARIANTS:
        raise ValueError(f"{path}: unknown variant {config.variant!r}")
    return config, ckpt


def load_pretrained(path, map_location="cpu"):
    """Rebuild a pretrained model from its checkpoint: (model, config, checkpoint dict)."""
    config, ckpt = read_checkpoint(path, map_location)
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    return model, config, ckpt


# ----------------------------------------------------------------------------------------------
# pretraining

@dataclass
class TrainConfig:
    features: str = "features/pretrain"   # paired set (seq+str+func); '' for none
    unpaired_seqstr: str = ""             # eq. 12: a seq+str set ...
    unpaired_seqfunc: str = ""            # ... and a seq+func set, stepped together
    out: str = "runs/amma"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    step_size: int = 3                    # StepLR step in epochs (the paper gives only gamma)
    gamma: float = 0.5
    seed: int = 0
    resume: bool = False                  # continue from <out>/checkpoint.pt
    init: str = ""                        # start from this checkpoint's weights (fresh optimiser)
    max_len: int = 1022
    num_workers: int = 2
    log_every: int = 20
    limit_steps: int = 0                  # stop each epoch after this many steps (smoke tests); 0 = all
    device: str = ""                      # '' = cuda if available else cpu


HELP = {
    "D": "width of Proj, Enc_multi and the decoders",
    "n_layers": "Transformer layers of Enc_multi (and Enc_con)",
    "n_heads": "attention heads",
    "dec_layers": "Transformer layers of each decoder",
    "mlp_ratio": "MLP width / D in every Transformer layer",
    "dropout": "dropout in attention and MLPs (the paper gives none)",
    "M": "tokens kept per protein (paper: 160)",
    "alpha": "Dirichlet concentrations for seq str func; a larger alpha_m keeps more of modality m",
    "variant": "asymmetric (AMMA) | symmetric (eq. 13) | no-aux (eq. 17) | contrastive (B.9)",
    "loss_on": "'all' valid positions (eq. 4) or only the 'masked' ones",
    "tau": "InfoNCE temperature of the contrastive variant",
    "features": "paired feature set written by extract_features.py; the built-in demo is used when "
                "it does not exist; '' for none",
    "unpaired_seqstr": "seq+str feature set for the unpaired objective (eq. 12)",
    "unpaired_seqfunc": "seq+func feature set for the unpaired objective (eq. 12)",
    "out": "run directory: checkpoint.pt, log.jsonl",
    "epochs": "epochs (paper: 10)",
    "batch_size": "proteins per step and process (paper: 4)",
    "lr": "AdamW learning rate (paper: 1e-4)",
    "weight_decay": "AdamW weight decay (paper: 0.05)",
    "step_size": "StepLR step size in epochs (the paper gives only gamma; we halve every 3 epochs)",
    "gamma": "StepLR gamma (paper: 0.5)",
    "seed": "seed of the initialisation, batch order and masks",
    "resume": "continue from <out>/checkpoint.pt where it stopped (same result as an uninterrupted run)",
    "init": "initialise the weights from this checkpoint (e.g. the 120k model before the unpaired phase)",
    "max_len": "residues kept per protein (ESM-1b's 1022)",
    "num_workers": "DataLoader worker processes",
    "log_every": "steps between lines of log.jsonl",
    "limit_steps": "cap on steps per epoch (smoke tests); 0 = all",
    "device": "cpu | cuda | cuda:1 ...; default: cuda when available",
}

# The demo model: small enough to learn the synthetic demo in a few CPU minutes.
DEMO = dict(D=128, n_layers=3, n_heads=4, dec_layers=1, M=48, epochs=6, batch_size=8, lr=1e-3,
            step_size=4, num_workers=0, out="runs/demo")


def bucket_batches(lengths, batch_size, seed, epoch, rank=0, world=1):
    """Length-bucketed batches: shuffle, sort by length inside chunks of 50 batches, cut into batches,
    shuffle the batch order. Deterministic in (seed, epoch); rank r of `world` takes batches r::world,
    all ranks the same number."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 50 * batch_size
    order = []
    for i in range(0, len(perm), chunk):
        order += sorted(perm[i:i + chunk], key=lambda j: lengths[j])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    n = len(batches) // world if world > 1 else len(batches)
    return batches[rank::world][:n]


def make_loader(dataset, batches, num_workers, pin, group=None):
    if group is not None:
        dataset = Grouped(dataset, group)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin,
                                       persistent_workers=False)


class Grouped(torch.utils.data.Dataset):
    """Tags each item with a group id (eq. 12 keeps the losses of the two unpaired batches apart)."""

    def __init__(self, dataset, group):
        self.dataset, self.group = dataset, group

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "group": self.group}


def epoch_batches(tc, paired, unpaired, epoch, rank, world, pin):
    """The batches of one epoch and their number: the paired set's, then pairs of a seq+str and a
    seq+func batch merged into one batch with two loss groups (eq. 12)."""
    parts, n = [], 0
    if paired is not None:
        plan = bucket_batches(paired.lengths(), tc.batch_size, tc.seed, epoch, rank, world)
        parts.append(make_loader(paired, plan, tc.num_workers, pin))
        n += len(plan)
    if unpaired is not None:
        a, b = unpaired
        plan_a = bucket_batches(a.lengths(), tc.batch_size, tc.seed + 1, epoch, rank, world)
        plan_b = bucket_batches(b.lengths(), tc.batch_size, tc.seed + 2, epoch, rank, world)
        k = min(len(plan_a), len(plan_b))
        parts.append(map(collate_pair, make_loader(a, plan_a[:k], tc.num_workers, pin, group=0),
                         make_loader(b, plan_b[:k], tc.num_workers, pin, group=1)))
        n += k
    return itertools.chain(*parts), n


def feature_dims(root):
    """Feature widths read from the files of the first protein that has each modality."""
    dims = {}
    for row in read_manifest(root):
        for m in row["modalities"]:
            if m not in dims:
                dims[m] = load_tensor(Path(root) / m / f"{row['id']}.pt").shape[1]
        if len(dims) == 3:
            break
    return dims


def setup_distributed(tc):
    """DDP only when launched by torchrun (RANK set): returns rank, world size, device."""
    if "RANK" not in os.environ:
        device = torch.device(tc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, device
    cuda = torch.cuda.is_available() and tc.device != "cpu"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_plain(config):
    """A dataclass as a dict of plain values (tuples as lists) for checkpoints and JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def pretrain(mc, tc, quiet=False):
    """The pretraining loop. Returns the list of per-epoch mean losses (rank 0) ."""
    rank, world, device = setup_distributed(tc)
    main = rank == 0
    torch.manual_seed(tc.seed)
    out = Path(tc.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # data: the paired set and/or the two unpaired sets stepped together (eq. 12)
    paired = FeatureDataset(tc.features, max_len=tc.max_len) if tc.features else None
    unpaired = None
    if tc.unpaired_seqstr or tc.unpaired_seqfunc:
        if not (tc.unpaired_seqstr and tc.unpaired_seqfunc):
            raise SystemExit("error: --unpaired-seqstr and --unpaired-seqfunc go together (eq. 12)")
        unpaired = (FeatureDataset(tc.unpaired_seqstr, modalities=("seq", "str"), max_len=tc.max_len),
                    FeatureDataset(tc.unpaired_seqfunc, modalities=("seq", "func"), max_len=tc.max_len))
    if paired is None and unpaired is None:
        raise SystemExit("error: no data: give --features and/or the two --unpaired-* sets")

    model = build_model(mc).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma)
    start_epoch, history = 0, []
    ckpt_path = out / "checkpoint.pt"
    if tc.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["config"] != to_plain(mc):
            raise SystemExit(f"error: {ckpt_path} was trained with another model config; use another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        torch.set_rng_state(ckpt["rng"])  # dropout draws from the global generator
        if main and not quiet:
            print(f"resuming from {ckpt_path} after epoch {ckpt['epoch'] + 1}")
    elif tc.init:
        init_model, init_config, _ = load_pretrained(tc.init)
        if to_plain(init_config) != to_plain(mc):
            raise SystemExit(f"error: {tc.init} has another model config than this run")
        model.load_state_dict(init_model.state_dict())

    ddp = world > 1
    # find_unused_parameters: a batch without a modality (unpaired data, missing text) skips its decoder
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = open(out / "log.jsonl", "a") if main else None

    for epoch in range(start_epoch, tc.epochs):
        model.train()
        batches, n_steps = epoch_batches(tc, paired, unpaired, epoch, rank, world, device.type == "cuda")
        n_steps = min(n_steps, tc.limit_steps or n_steps)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not main or quiet, leave=False)
        total, count, t0 = 0.0, 0, time.time()
        for step, batch in enumerate(batches):
            if step == n_steps:
                break
            batch = batch_to(batch, device)
            gen = torch.Generator().manual_seed(((tc.seed * 1000 + epoch) * 1_000_003 + step) * 64 + rank)
            with autocast:
                _, loss, logs = net(batch, generator=gen)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at epoch {epoch + 1} step {step}; stopping")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if main and (count % tc.log_every == 0 or count == n_steps):
                log.write(json.dumps({"epoch": epoch + 1, "step": count, "loss": loss.item(), **logs,
                                      "lr": opt.param_groups[0]["lr"]}) + "\n")
                log.flush()
        bar.close()
        sched.step()
        history.append(total / max(count, 1))
        if main:
            log.write(json.dumps({"epoch": epoch + 1, "epoch_loss": history[-1], "steps": count,
                                  "seconds": round(time.time() - t0, 1)}) + "\n")
            log.flush()
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                         "rng": torch.get_rng_state(),
                         "config": to_plain(mc), "train_config": to_plain(tc)}, ckpt_path)
            if not quiet:
                print(f"epoch {epoch + 1}/{tc.epochs}  loss {history[-1]:.4f}  "
                      f"({count} steps, {time.time() - t0:.0f}s)  -> {ckpt_path}")
    if log:
        log.close()
    if ddp:
        torch.distributed.destroy_process_group()
    return history


def collate_pair(a, b):
    """Merge a seq+str batch and a seq+func batch into one padded batch with two loss groups."""
    items = []
    for batch in (a, b):
        for i, pid in enumerate(batch["ids"]):
            item = {"id": pid, "group": int(batch["group"][i])}
            for m in MODALITIES:
                item[m] = batch[m][i, : batch[m + "_len"][i]] if m in batch and batch[m + "_len"][i] else None
            items.append(item)
    return collate(items)


# ----------------------------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(
        description="AMMA pretraining (and, with --analyze, the analyses of analyze.py).",
        epilog="Defaults are the paper's. Feature widths are read from the files. The demo (used when "
               "--features does not exist) shrinks the model and schedule unless you set those flags yourself.")
    p.add_argument("--pretrain", action="store_true", help="run pretraining")
    p.add_argument("--analyze", action="store_true", help="run analyze.py with the remaining arguments")
    for dc in (AMMAConfig, TrainConfig):
        for f in fields(dc):
            if f.name in ("d_seq", "d_str", "d_func"):
                continue  # always read from the feature files
            name = "--" + f.name.replace("_", "-")
            default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            kw = dict(default=None, help=f"{HELP[f.name]} (default: {default!r})")
            if f.type is bool or isinstance(f.default, bool):
                p.add_argument(name, action="store_true", help=HELP[f.name])
            elif isinstance(f.default, tuple):
                p.add_argument(name, type=float, nargs=3, **kw)
            elif f.name == "variant":
                p.add_argument(name, choices=VARIANTS, **kw)
            elif f.name == "loss_on":
                p.add_argument(name, choices=("all", "masked"), **kw)
            else:
                p.add_argument(name, type=type(f.default), **kw)
    return p


def configs_from_args(args, overrides=None):
    """Dataclass defaults, then `overrides` (the demo preset), then the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    values = {**(overrides or {}), **given}
    mc = AMMAConfig(**{f.name: values[f.name] for f in fields(AMMAConfig) if f.name in values})
    tc = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name in values})
    mc.alpha = tuple(float(a) for a in mc.alpha)
    return mc, tc, given


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--analyze" in argv:
        import analyze  # the analyses live next door to keep this file about the model
        return analyze.main([a for a in argv if a != "--analyze"])
    args = build_parser().parse_args(argv)
    if not args.pretrain:
        build_parser().print_help()
        return None
    overrides = None
    if args.features is not None and args.features and not (Path(args.features) / "manifest.tsv").exists():
        raise SystemExit(f"error: {args.features}/manifest.tsv not found: extract features first "
                         f"(extract_features.py), or leave out --features to run the built-in demo")
    if args.features is None and not (Path(TrainConfig.features) / "manifest.tsv").exists():
        import demo  # the built-in demo corpus (demo.py); not needed with real features
        print(f"no feature set at {TrainConfig.features}: pretraining on the built-in demo instead "
              f"(synthetic or tiny-encoder features, not real ESM-1b/GearNet/PubMedBERT ones)")
        overrides = {**DEMO, "features": str(demo.ensure_demo_features("features/demo"))}
    mc, tc, _ = configs_from_args(args, overrides)
    if tc.features or tc.unpaired_seqstr:
        dims = feature_dims(tc.features or tc.unpaired_seqstr)
        if tc.unpaired_seqfunc:
            dims.update({k: v for k, v in feature_dims(tc.unpaired_seqfunc).items() if k not in dims})
        for m, d in dims.items():
            setattr(mc, f"d_{m}", d)
    n_params = sum(p.numel() for p in build_model(mc).parameters())
    print(f"AMMA {mc.variant}: {n_params / 1e6:.1f}M parameters, dims {mc.dims()}, D={mc.D}, "
          f"M={mc.M}, alpha={mc.alpha}; data {tc.features or ''} {tc.unpaired_seqstr} {tc.unpaired_seqfunc}")
    try:
        history = pretrain(mc, tc)
    except (ValueError, FileNotFoundError) as e:  # bad input files: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    if history:
        print(f"loss: first epoch {history[0]:.4f}, last epoch {history[-1]:.4f}; checkpoint in {tc.out}/checkpoint.pt")
    return history


if __name__ == "__main__":
    main()
