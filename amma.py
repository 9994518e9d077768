"""
AMMA: asymmetric multi-modal masked autoencoder for proteins (sequence, structure, function text).

The model reads top to bottom as the paper does: the conventions, the config, the Dirichlet mask
sampler, the building blocks, AMMA (forward_encoder, forward_decoder, forward_loss), the variants and
the checkpoint reader. That part is self-contained (torch + standard library) and runs alone: copy it
up to the line "end of the model" into your own code. After that line come the pretraining data plan
(masks and loss weights per batch), the pretraining loop and the command line; they use the feature
cache of cache.py and the run plumbing of runs.py (shared with finetune.py; torch + stdlib as well).
Names follow the paper: Proj_m, Enc_multi, l0/l1/l2, Dec_seq/Dec_str/Dec_func, M, alpha.

    python amma.py --pretrain                                   # features/pretrain, or the built-in demo
    python amma.py --pretrain --features features/pretrain --out runs/amma
    python amma.py --pretrain --variant symmetric --out runs/symmetric       # also no-aux, contrastive
    python amma.py --pretrain --alpha 1 1 1 --out runs/alpha111              # Table 4 ablation
    python amma.py --pretrain --preset 111m --out runs/amma-111m             # D 768, 12 heads: 110.7M
    python amma.py --pretrain --resume --out runs/amma                       # continue exactly, mid-epoch too
    python amma.py --pretrain --continue-from runs/amma/checkpoint.pt --epochs 15 --features '' \
        --unpaired-seqstr features/seqstr --unpaired-seqfunc features/seqfunc --out runs/unpaired-15  # Table 3
    python amma.py --pretrain --compile                                      # torch.compile'd step (GPU)
    torchrun --nproc_per_node 2 amma.py --pretrain                           # DDP: 2 x 2 proteins of each batch of 4

The analyses of the paper (Table 1, Figure 1, B.8) are analyze.py's: python analyze.py --help.

Conventions, stated once:
- Masking: keep[b, i] is True for a token the encoder SEES (MAE writes 0 for keep; we use booleans).
- alpha: lambda ~ Dirichlet(alpha) is the share of the M kept tokens per modality, so a LARGER
  alpha_m keeps MORE tokens of modality m on average (mean share alpha_m / sum(alpha)).
- Token layout of one protein: [seq (L) | str (L) | func (L')], padded per batch to [Ls | Ls | Lf].
- Batches are global: --batch-size is the paper's number, and world processes x grad_accum micro-batches
  split it. Every random draw is a function of (seed, epoch, step) and the protein's position in the
  global batch (masks) or the micro-batch's index (dropout), and losses are weighted by the whole
  batch's positions, so a split batch trains exactly as the whole one, and --resume continues exactly.
- A training step reads nothing back from the device: masks and loss weights are made with the batch
  (in the DataLoader workers), losses are summed on the device and read every --log-every steps.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def arg(default, help, **kw):
    """A config field with its command-line help (and choices): the one flag convention of the kit."""
    return field(default=default, metadata=dict(help=help, **kw))


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class AMMAConfig:
    d_seq: int = arg(1280, "width of the sequence features (ESM-1b layer 33)")
    d_str: int = arg(3072, "width of the structure features (GearNet-Edge, 6 x 512, concat_hidden)")
    d_func: int = arg(768, "width of the function-text features (PubMedBERT-abs)")
    D: int = arg(512, "width of Proj, Enc_multi and the decoders")
    n_layers: int = arg(8, "Transformer layers of Enc_multi (and Enc_con)")
    n_heads: int = arg(8, "attention heads")
    dec_layers: int = arg(2, "Transformer layers of each decoder")
    mlp_ratio: int = arg(4, "MLP width / D in every Transformer layer")
    dropout: float = arg(0.0, "dropout in attention and MLPs (the paper gives none)")
    M: int = arg(160, "tokens kept per protein (paper: 160)")
    alpha: tuple = arg((1.0, 2.0, 2.0), "Dirichlet concentrations for seq str func; a larger alpha_m keeps "
                       "more of modality m")
    variant: str = arg("asymmetric", "asymmetric (AMMA) | symmetric (eq. 13) | no-aux (eq. 17) | contrastive (B.9)",
                       choices=VARIANTS)
    loss_on: str = arg("all", "'all' valid positions (eq. 4) or only the 'masked' ones", choices=("all", "masked"))
    tau: float = arg(0.07, "InfoNCE temperature of the contrastive variant (the paper gives none)")
    con_sim: str = arg("cosine", "contrastive similarity: cosine of L2-normalised latents, or the plain dot "
                       "product of eq. 16", choices=("cosine", "dot"))
    target_norm: str = arg("none", "reconstruction targets: none (eq. 4), token (each token standardised over its "
                           "dims, MAE's norm_pix_loss) or dim (each feature dimension standardised by set statistics)",
                           choices=("none", "token", "dim"))

    def dims(self):
        return {"seq": self.d_seq, "str": self.d_str, "func": self.d_func}


# ----------------------------------------------------------------------------------------------
# mask sampler (pure functions of tensors and a torch.Generator; run on the CPU, with the batch)

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


def seed_hash(*keys):
    """A 62-bit seed from integer keys (splitmix64 steps): keys that differ anywhere give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 2


def protein_seeds(n, *keys):
    """One mask seed per protein of a global batch: seed_hash(*keys, j) for positions j < n, as a [n] tensor."""
    return torch.tensor([seed_hash(*keys, j) for j in range(n)], dtype=torch.long)


def keep_priorities(counts, M, alpha, seeds):
    """Random priorities from which keep_mask picks the tokens the encoder keeps.

    counts: [B, 3] valid tokens of (seq, str, func) per protein (0 for an absent modality).
    seeds: [B] one seed per protein: a protein's lambda and token priorities are drawn from its own
    generator and depend on nothing else in the batch, so a global batch split over GPUs (or into
    micro-batches) gets exactly the masks it gets in one piece.
    Returns (key, valid), both [B, 3, Lmax] in the per-modality padded layout: key is above 2 for each
    modality's budget of tokens, in [0, 1) for the other valid tokens (the refill takes the highest),
    -1 for padding.
    """
    counts = counts.tolist()                                                    # CPU bookkeeping, per protein
    B, Lmax = len(counts), max(max((max(c) for c in counts), default=1), 1)
    lam, u = [], []
    for b in range(B):                                                          # per protein, not per token
        g = torch.Generator().manual_seed(int(seeds[b]))
        n = max(max(counts[b]), 1)
        lam.append(dirichlet(alpha, 1, g))                                      # [1, 3]
        u.append(F.pad(torch.rand(2, 3, n, generator=g), (0, Lmax - n)))       # [2, 3, Lmax]
    counts = torch.tensor(counts, dtype=torch.long).view(B, 3)
    lam, u = torch.cat(lam).view(B, 3), torch.stack(u).view(B, 2, 3, Lmax)
    k = torch.minimum(budgets(lam, M), counts)                                  # [B, 3] primary
    pos = torch.arange(Lmax).expand(B, 3, Lmax)                                 # [B, 3, Lmax]
    valid = pos < counts[..., None]
    rank = u[:, 0].masked_fill(~valid, 2.0).argsort(-1).argsort(-1)             # random rank within modality
    primary = rank < k[..., None]
    refill = u[:, 1]                                                            # in [0, 1)
    return torch.where(primary, 2.0 + refill, torch.where(valid, refill, -1.0)), valid


def keep_mask(counts, M, alpha, seeds):
    """Boolean keep mask [B, 3, Lmax]: exactly min(M, sum(counts)) True per protein, each modality's
    budget round(lambda_m * M) taken first (at random), shortfalls filled at random from the other
    modalities' remaining tokens; padding and absent modalities are never kept."""
    key, valid = keep_priorities(counts, M, alpha, seeds)
    B, _, Lmax = key.shape
    T = torch.as_tensor(counts).sum(1).clamp(max=M)                             # [B] tokens to keep
    order = key.view(B, -1).argsort(1, descending=True)                         # [B, 3*Lmax]
    chosen = torch.arange(3 * Lmax).expand(B, -1) < T[:, None]
    keep = torch.zeros(B, 3 * Lmax, dtype=torch.bool).scatter(1, order, chosen)
    return keep.view(B, 3, Lmax) & valid


def keep_indices(counts, widths, M, alpha, seeds):
    """The encoder's input for a padded batch: which slots of the full layout it sees.

    counts [B, 3] valid tokens per modality; widths: the padded length of each modality's segment in
    the layout (0 for a modality the batch lacks). Returns ids [B, K] (K = min(M, layout length): a
    static shape) and keep [B, K]: the kept slots first in layout order, then distinct unkept slots
    marked False (so scattering back never writes one slot twice)."""
    keep3 = keep_mask(counts, M, alpha, seeds)                                  # [B, 3, Lmax]
    Lmax = keep3.shape[-1]
    keep3 = F.pad(keep3, (0, max(max(widths) - Lmax, 0)))
    keep = torch.cat([keep3[:, i, :w] for i, w in enumerate(widths)], 1)        # [B, N]
    K = min(M, keep.shape[1])
    ids = keep.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :K]   # kept first: [B, K]
    return ids, keep.gather(1, ids)


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
        """pad [B, S] True at padding keys, or None when no slot is padding (the flash kernel's case)."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, S, hs)
        allowed = None if pad is None else ~pad[:, None, None, :]              # (B, 1, 1, S) True = attend
        if return_attn:  # explicit softmax, for the analysis of B.8 only
            a = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            a = (a if allowed is None else a.masked_fill(~allowed, float("-inf"))).softmax(-1)   # (B, nh, S, S)
            y = a @ v
        else:            # fused kernel (flash without a mask, memory-efficient with one)
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


def token_counts(batch, layout=None):
    """Valid tokens per protein and modality [B, 3] (0 for a modality the batch or the protein lacks)."""
    any_len = next(batch[m + "_len"] for m in MODALITIES if m + "_len" in batch)
    B, device = len(any_len), any_len.device
    return torch.stack([batch[m + "_len"] if m in batch and (layout is None or layout[m][1])
                        else torch.zeros(B, dtype=torch.long, device=device) for m in MODALITIES], 1)


def touch(modules):
    """0 x one entry of every parameter of `modules`: added to a loss, it puts parameters that a batch
    did not use (a decoder of an absent modality) into the graph with a zero gradient, so DDP needs
    no find_unused_parameters (and prints no warning about it)."""
    return sum(p.view(-1)[:1].sum() for mod in modules for p in mod.parameters() if p.requires_grad) * 0.0


# ----------------------------------------------------------------------------------------------
# the encoder side: Proj, embeddings, [CLS], masking, Enc_multi (all that finetuning needs)

class Encoded(NamedTuple):
    """What the encoder returns. z [B, 1+K, D] ([CLS] first), ids [B, K] (slots of the full layout it
    saw), keep [B, K] (False for padding), valid [B, N] (real tokens of the full layout), layout
    {m: (start, length)}, attn: the last layer's attention [B, nh, 1+K, 1+K] when asked for."""
    z: torch.Tensor
    ids: torch.Tensor
    keep: torch.Tensor
    valid: torch.Tensor
    layout: dict
    attn: torch.Tensor = None


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

    def keep_ids(self, batch, valid, layout, mask, seeds):
        """Slots the encoder sees: ids [B, K] and keep [B, K]. The batch's own (made in collate, on the
        CPU, with the batch) when it has them; else drawn here from `seeds` (a host round trip)."""
        B, N = valid.shape
        if not mask:
            return torch.arange(N, device=valid.device).expand(B, N), valid
        if "keep_ids" in batch:
            return batch["keep_ids"], batch["keep"]
        if seeds is None:                                                      # no seeds given: fresh draws
            seeds = torch.randint(0, 2 ** 62, (B,))
        widths = [layout[m][1] for m in MODALITIES]
        ids, keep = keep_indices(token_counts(batch, layout).cpu(), widths, self.config.M, self.config.alpha, seeds)
        return ids.to(valid.device), keep.to(valid.device)

    def forward(self, batch, mask=True, seeds=None, modalities=MODALITIES, return_attn=False):
        """Enc_multi on [CLS] + the kept tokens: an Encoded. seeds: [B] per-protein mask seeds
        (protein_seeds), used when the batch has no keep_ids; None draws them from torch's RNG."""
        tokens, valid, layout = self.embed(batch, modalities)
        ids, keep = self.keep_ids(batch, valid, layout, mask, seeds)
        x = tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, K, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)           # [B, 1+K, D]
        pad = None if mask and batch.get("all_kept") else torch.cat([torch.zeros_like(keep[:, :1]), ~keep], 1)
        z, attn = self.enc_multi(x, pad, return_attn)                          # [B, 1+K, D]
        return Encoded(z, ids, keep, valid, layout, attn)


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
        if c.target_norm not in ("none", "token", "dim"):
            raise ValueError(f"target_norm must be none, token or dim, not {c.target_norm!r}")
        if c.target_norm == "dim":  # per-dimension mean / std of the frozen features, set before step 1
            for m, d in c.dims().items():
                self.register_buffer(f"target_mean_{m}", torch.zeros(d))
                self.register_buffer(f"target_std_{m}", torch.ones(d))

    def forward_encoder(self, batch, mask=True, seeds=None):
        return self.enc(batch, mask, seeds)

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

    def target(self, batch, m):
        """The reconstruction target of modality m: the frozen features, normalised as target_norm says
        (token: each token over its dims, MAE's norm_pix_loss; dim: each dimension by set statistics)."""
        x = batch[m]
        if self.config.target_norm == "token":
            return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
        if self.config.target_norm == "dim":
            return (x - getattr(self, f"target_mean_{m}")) / getattr(self, f"target_std_{m}")
        return x

    def forward_loss(self, batch, recon, ids, keep, valid, layout, weights=None):
        """Eq. 4 (and eq. 12 when the batch holds groups): per group and modality, the squared error
        averaged over feature dimensions and over valid positions (or masked ones only, with
        loss_on='masked'), summed over groups and modalities. As tensor ops: each position of protein b
        in modality m weighs weights[b, m] = 1 / (positions of b's group in m). weights [B, 3] come with
        the batch for the whole global batch (loss_weights): the loss is then this micro-batch's share
        of the global batch's loss, and the shares of all processes and micro-batches add up to it.
        Without them they are computed from this batch. Returns the loss and {loss_<m>: its part}
        (detached device tensors; NaN for a modality with no position to average)."""
        B, N = valid.shape
        seen = torch.zeros(B, N, dtype=torch.bool, device=valid.device).scatter(1, ids, keep)  # [B, N]
        loss = sum(xhat.sum() for xhat in recon.values()) * 0.0  # keeps a graph when no term applies
        uses = {}
        for m in recon:
            start, length = layout[m]
            uses[m] = valid[:, start:start + length] & (~seen[:, start:start + length]
                                                        if self.config.loss_on == "masked" else True)  # [B, Lm]
        if weights is None:
            weights = self.batch_weights(batch, uses)
        parts = {}
        for m, xhat in recon.items():
            err = (xhat.float() - self.target(batch, m).float()).pow(2).mean(-1)  # [B, Lm]
            w = uses[m] * weights[:, MODALITIES.index(m), None]                   # [B, Lm]
            term = (err * w).sum()
            loss = loss + term
            parts[f"loss_{m}"] = torch.where((w > 0).any(), term, torch.nan).detach()
        return loss, parts

    @staticmethod
    def batch_weights(batch, uses):
        """weights [B, 3] from this batch alone: 1 / positions of the protein's loss group (0 if none)."""
        group = batch.get("group")
        B = next(iter(uses.values())).shape[0]
        device = next(iter(uses.values())).device
        same = torch.ones(B, B, device=device) if group is None else \
            (group.to(device)[:, None] == group.to(device)[None, :]).float()   # [B, B] same loss group
        w = torch.zeros(B, 3, device=device)
        for m, use in uses.items():
            n = same @ use.sum(1).float()                                      # [B] positions in b's group
            w[:, MODALITIES.index(m)] = torch.where(n > 0, 1.0 / n.clamp_min(1), 0.0)
        return w

    def forward(self, batch, mask=True, seeds=None, weights=None):
        """Returns (reconstructions, loss, logs) — nanoGPT style. seeds: per-protein mask seeds (when
        the batch brings no keep_ids); weights: the batch's loss weights (see forward_loss)."""
        z, ids, keep, valid, layout, _ = self.forward_encoder(batch, mask, seeds)
        present = [m for m in MODALITIES if layout[m][1]]
        recon = self.forward_decoder(z, ids, keep, valid, layout, targets=present)
        loss, logs = self.forward_loss(batch, recon, ids, keep, valid, layout, batch.get("loss_w", weights))
        absent = [m for m in MODALITIES if m not in present]
        unused = [mod for m in absent for mod in (self.enc.proj[m], self.dec[m], self.l[MODALITIES.index(m)])]
        return recon, loss + touch(unused), logs


# ----------------------------------------------------------------------------------------------
# AMMA-contrastive (B.9): length-averaged features, Proj, Enc_con on the sequence side, InfoNCE

def info_nce(zp, zq, tau, sim="cosine"):
    """Symmetric InfoNCE of eq. 16 on latents [N, D]: sim 'cosine' L2-normalises them first (as
    ProtST and CLIP do with a temperature), 'dot' takes the plain dot product as eq. 16 writes it."""
    if sim == "cosine":
        zp, zq = F.normalize(zp, dim=-1), F.normalize(zq, dim=-1)
    logits = zp @ zq.T / tau                                                    # [N, N]
    target = torch.arange(len(zp), device=zp.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x):
    """x [n, ...] of every process concatenated in rank order (n may differ between processes), with
    gradients flowing back to each process's own rows; x itself without DDP."""
    world = world_size()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather                      # autograd-aware
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    pad = [0, 0] * (x.dim() - 1) + [0, int(max(sizes)) - len(x)]
    parts = all_gather(F.pad(x, pad))                                           # world x [max n, ...]
    return torch.cat([part[:int(size)] for part, size in zip(parts, sizes)])


class AMMAContrastive(nn.Module):
    """The contrastive variant. Unlike AMMA's, its step picks the proteins of each pair on the host
    (boolean indexing): it is an ablation, not tuned for GPU speed."""

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

    def forward(self, batch, mask=True, seeds=None, weights=None):
        """Eq. 15 over the proteins that have both modalities of each pair: (latents, loss, logs).
        Under DDP the latents of every process are gathered, so the negatives are the whole global
        batch, as on one GPU; each process returns 1 / world of the (identical) global loss."""
        z, has = self.latents(batch)
        unused = [self.proj[m] for m in MODALITIES if m not in z]
        loss = sum(v.sum() for v in z.values()) * 0.0 + touch(unused)  # keeps a graph when no pair applies
        z = {k: gather_rows(v) for k, v in z.items()}
        has = {k: gather_rows(v.long()).bool() for k, v in has.items()}
        logs, world = {}, world_size()
        for name, (p, q) in {"seq2str": ("seq", "str"), "seq2func": ("seq", "func"), "reg": ("seq", "seq'")}.items():
            both = has[p] & has[q] if q in z else None
            if both is not None and both.sum() > 1:
                l_pq = info_nce(z[p][both], z[q][both], self.config.tau, self.config.con_sim) / world
                loss, logs[f"loss_{name}"] = loss + l_pq, l_pq.detach()
        return z, loss, logs


def build_model(config):
    return AMMAContrastive(config) if config.variant == "contrastive" else AMMA(config)


# ----------------------------------------------------------------------------------------------
# the checkpoint reader

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


# ==============================================================================================
# end of the model. What follows pretrains it: the data plan, the loop, the CLI.
# ==============================================================================================

# The data path lives in cache.py (the feature cache, batches, loaders) and the run plumbing that
# finetune.py shares in runs.py; both need only torch and the standard library.
from cache import (BrokenBatch, Feed, bucket_batches, collate, feature_dims, find_bad_files, loader_kind,
                   micro_batches, open_features)
from runs import (Interrupt, Meter, RunLock, RunLog, amp_context, at_read_point, atomic_save, check_batch_split,
                  check_same, epoch_steps, last_line, leave_distributed, load_training_state, log_step,
                  make_optimizer, maybe_compile, new_run_id, prepare_out, progress, read_point,
                  run_as_script, setup_distributed, stop_if_bad, strip, to_plain, train_step, wrap_ddp)


# ----------------------------------------------------------------------------------------------
# the pretraining data plan (every random draw is a function of (seed, epoch, step, position))

class Sets(torch.utils.data.Dataset):
    """Several feature sets behind one index: a key (set, index, group, seed, loss_w) -> the item with them."""

    def __init__(self, sets):
        self.sets = sets

    def __getitem__(self, key):
        name, i, group, seed, loss_w = key
        return {**self.sets[name][i], "group": group, "seed": seed, "loss_w": loss_w}


def epoch_plan(tc, sets, epoch):
    """The global batches of one epoch as lists of (set, index, group) keys: the paired set's batches,
    then (eq. 12) a seq+str batch and a seq+func batch stepped together as one, in two loss groups."""
    plan = []
    if "paired" in sets:
        plan += [[("paired", i, 0) for i in b] for b in bucket_batches(sets["paired"].lengths(), tc.batch_size,
                                                                        tc.seed, epoch)]
    if "seqstr" in sets:
        a = bucket_batches(sets["seqstr"].lengths(), tc.batch_size, tc.seed + 1, epoch)
        b = bucket_batches(sets["seqfunc"].lengths(), tc.batch_size, tc.seed + 2, epoch)
        plan += [[("seqstr", i, 0) for i in x] + [("seqfunc", j, 1) for j in y] for x, y in zip(a, b)]
    return plan


def loss_weights(counts, groups, config, seeds):
    """Eq. 4 / eq. 12 as weights for a whole global batch, from its token counts ([B] lists of 3 ints),
    loss groups and mask seeds alone: weights[b][m] = 1 / (positions of b's group in modality m), so
    every process knows the whole batch's normalisers before its own forward pass (plain Python,
    on the host, before the step; loss_on='masked' draws the masks to count the masked positions)."""
    n = [list(c) for c in counts]
    if config.loss_on == "masked":
        kept = keep_mask(torch.tensor(counts).view(-1, 3), config.M, config.alpha, seeds).sum(-1).tolist()
        n = [[c - k for c, k in zip(cs, ks)] for cs, ks in zip(n, kept)]
    total = {}
    for g, cs in zip(groups, n):
        total[g] = [t + c for t, c in zip(total.get(g, [0, 0, 0]), cs)]
    return [[1.0 / t if t else 0.0 for t in total[g]] for g in groups]


def step_keys(tc, mc, sets, counts, plan, epoch, s):
    """The keys of global batch s: (set, index, group, mask seed, loss weights) per protein."""
    keys = plan[s]
    seeds = [seed_hash(tc.seed, epoch, s, j) for j in range(len(keys))]
    groups = [g for _, _, g in keys]
    weights = loss_weights([counts[name][i] for name, i, _ in keys], groups, mc, seeds)
    return [(name, i, g, seed, w) for (name, i, g), seed, w in zip(keys, seeds, weights)]


def screen_sets(sets, tc, out, is_main, say):
    """Check every set before step 1 (find_bad_files); with --skip-bad its bad proteins are left out."""
    bad = find_bad_files({name: (ds.root, ds.rows, ds.modalities) for name, ds in sets.items()}, out,
                         tc.skip_bad, is_main)
    if bad:
        for name, ds in sets.items():
            ds.rows = [r for r in ds.rows if (name, r["id"]) not in bad]
        say(f"--skip-bad: {len(bad)} proteins with bad feature files left out (listed in {out}/bad_files.tsv)")


# ----------------------------------------------------------------------------------------------
# pretraining: configuration

@dataclass
class RunConfig:
    """The run options that pretraining and finetuning share (finetune.FinetuneConfig extends it too)."""
    resume: bool = arg(False, "continue from <out>/checkpoint.pt where it stopped (same result as an uninterrupted run)")
    overwrite: bool = arg(False, "start a new run in an --out that already holds one (its checkpoint and log are removed)")
    num_workers: int = arg(2, "loader workers (they read the features and make the masks); 0: in the main process")
    loader: str = arg("auto", "loader workers as threads or processes; auto: threads for a packed store, processes "
                      "for per-protein files", choices=("auto", "threads", "processes"))
    log_every: int = arg(20, "steps between lines of log.jsonl (and between reads of the losses from the device)")
    save_every_steps: int = arg(0, "also write checkpoint.pt every N steps (0 = off)")
    save_every_minutes: float = arg(30.0, "also write checkpoint.pt every T minutes (0 = off); always at epoch ends")
    skip_bad: bool = arg(False, "train without the proteins whose feature files fail the check before step 1")
    limit_steps: int = arg(0, "cap on steps per epoch (smoke tests); 0 = all")
    amp: str = arg("auto", "auto: bf16 autocast on GPU, fp32 on CPU; bf16 or fp32 to force one",
                   choices=("auto", "bf16", "fp32"))
    compile: bool = arg(False, "torch.compile the forward pass and loss (fullgraph); off by default")
    cuda_graphs: bool = arg(False, "--compile with CUDA graphs (mode reduce-overhead): replays each batch shape")
    dist_timeout: int = arg(30, "minutes a collective may wait for another process under torchrun before the run fails")
    device: str = arg("", "cpu | cuda | cuda:1 ...; default: cuda when available")


@dataclass
class TrainConfig(RunConfig):
    features: str = arg("features/pretrain", "paired feature set written by extract_features.py; the built-in demo "
                        "is used when it does not exist; '' for none")
    unpaired_seqstr: str = arg("", "seq+str feature set for the unpaired objective (eq. 12)")
    unpaired_seqfunc: str = arg("", "seq+func feature set for the unpaired objective (eq. 12), stepped with it")
    out: str = arg("runs/amma", "run directory: checkpoint.pt, log.jsonl")
    epochs: int = arg(10, "epochs in all (paper: 10; with --continue-from, the epoch to stop after)")
    batch_size: int = arg(4, "GLOBAL proteins per step (paper: 4): under torchrun the processes split it")
    grad_accum: int = arg(1, "micro-batches per process and step: the same global batch in smaller pieces")
    lr: float = arg(1e-4, "AdamW learning rate (paper: 1e-4)")
    weight_decay: float = arg(0.05, "AdamW weight decay (paper: 0.05), on every parameter")
    step_size: int = arg(3, "StepLR step size in epochs (the paper gives only gamma; we halve every 3 epochs)")
    gamma: float = arg(0.5, "StepLR gamma (paper: 0.5)")
    seed: int = arg(0, "seed of the initialisation, batch order, masks and dropout")
    init: str = arg("", "initialise the weights from this checkpoint (fresh optimiser and schedule)")
    continue_from: str = arg("", "continue another run's finished checkpoint: weights, optimiser, StepLR and epoch "
                             "count carry on (e.g. epochs 11-15 on unpaired data, Table 3); writes to --out")
    max_len: int = arg(1022, "residues kept per protein (ESM-1b's 1022)")


# --preset: the model sizes the paper can be read as. B.3 says 111M parameters; the layers it states
# (D = 512, 8 heads assumed) give 51.0M, and only D = 768 with 12 heads (all else as stated) gives 110.7M.
PRESETS = {"paper": {}, "111m": dict(D=768, n_heads=12)}
# The demo model: small enough to learn the synthetic demo in a few CPU minutes.
DEMO = dict(D=128, n_layers=3, n_heads=4, dec_layers=1, M=48, epochs=6, batch_size=8, lr=1e-3,
            step_size=4, num_workers=0, out="runs/demo")
SAME_ON_RESUME = ("features", "unpaired_seqstr", "unpaired_seqfunc", "batch_size", "lr", "weight_decay",
                  "step_size", "gamma", "seed", "max_len", "continue_from")


# ----------------------------------------------------------------------------------------------
# pretraining: the pieces of the loop

def load_sets(tc):
    """{"paired": ..., "seqstr": ..., "seqfunc": ...}: the sets this run trains on; empty ones are errors."""
    sets = {}
    if tc.features:
        sets["paired"] = open_features(tc.features, max_len=tc.max_len)
    if tc.unpaired_seqstr or tc.unpaired_seqfunc:
        if not (tc.unpaired_seqstr and tc.unpaired_seqfunc):
            raise SystemExit("error: --unpaired-seqstr and --unpaired-seqfunc go together (eq. 12)")
        sets["seqstr"] = open_features(tc.unpaired_seqstr, modalities=("seq", "str"), max_len=tc.max_len)
        sets["seqfunc"] = open_features(tc.unpaired_seqfunc, modalities=("seq", "func"), max_len=tc.max_len)
    if not sets:
        raise SystemExit("error: no data: give --features and/or the two --unpaired-* sets")
    for ds in sets.values():
        if not ds.rows:
            raise SystemExit(f"error: {ds.root}/manifest.tsv lists no proteins: its extraction produced none "
                             f"(see {ds.root}/summary.json)")
    return sets


def target_statistics(model, sets, n=256, seed=0):
    """target_norm='dim': per-dimension mean and std of each modality over up to n proteins per set."""
    sums = {}
    for ds in sets.values():
        for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist():
            for m, x in ds[i].items():
                if m in MODALITIES and x is not None:
                    x = x.double()
                    s = sums.setdefault(m, [0, 0.0, 0.0])
                    s[0], s[1], s[2] = s[0] + len(x), s[1] + x.sum(0), s[2] + x.pow(2).sum(0)
    for m, (k, s1, s2) in sums.items():
        mean = s1 / k
        getattr(model, f"target_mean_{m}").copy_(mean.float())
        getattr(model, f"target_std_{m}").copy_((s2 / k - mean ** 2).clamp_min(1e-12).sqrt().float())


def restore(model, opt, sched, state, mc, tc, resume_path, sets, device):
    """Start the run where it should: --resume, --continue-from, --init or fresh. Returns the source."""
    source = resume_path or (Path(tc.continue_from) if tc.continue_from else None)
    if source:
        config, ckpt = read_checkpoint(source, map_location=device)
        check_same(to_plain(config), to_plain(mc), list(to_plain(mc)), source, "model config")
        if resume_path:
            check_same(ckpt.get("train_config", {}), to_plain(tc), SAME_ON_RESUME, source)
        elif ckpt.get("next_step", 0):
            raise SystemExit(f"error: {source} stopped inside epoch {ckpt['next_epoch'] + 1}: finish it with "
                             f"--resume first, then continue from it")
        load_training_state(ckpt, model, opt, sched, state)
        if not resume_path:
            state.update(next_step=0, epoch_loss=0.0, epoch_steps=0)
            if state["next_epoch"] >= tc.epochs:
                raise SystemExit(f"error: {source} has {state['next_epoch']} epochs already: --epochs must be "
                                 f"larger to continue it (the paper's Table 3: 15)")
    elif tc.init:
        init_model, init_config, _ = load_pretrained(tc.init)
        if to_plain(init_config) != to_plain(mc):
            raise SystemExit(f"error: {tc.init} has another model config than this run")
        model.load_state_dict(init_model.state_dict())
    elif mc.variant != "contrastive" and mc.target_norm == "dim":
        target_statistics(model, sets, seed=tc.seed)
    return source


def banner(mc, tc, sets, n_params, world, device, autocast, run, source, state):
    return (f"AMMA {mc.variant}: {n_params / 1e6:.1f}M parameters, dims {mc.dims()}, D={mc.D}, heads {mc.n_heads}, "
            f"M={mc.M}, alpha={mc.alpha}; data {', '.join(f'{k} {v.root} ({len(v)})' for k, v in sets.items())}; "
            f"global batch {tc.batch_size} = {world} process(es) x {tc.grad_accum} micro-batch(es); {device}"
            f"{', bf16' if isinstance(autocast, torch.autocast) else ''}{', compiled' if tc.compile or tc.cuda_graphs else ''}"
            f"; run {run}" + (f"; from {source} at epoch {state['next_epoch'] + 1} step {state['next_step']}" if source else ""))


def pretrain(mc, tc, quiet=False):
    """The pretraining loop. Returns the list of per-epoch mean losses."""
    rank, world, device = setup_distributed(tc)
    ended = False
    try:
        with RunLock(tc.out, enabled=rank == 0):
            history = _pretrain(mc, tc, quiet, rank, world, device)
        ended = True
        return history
    finally:
        leave_distributed(world, ended)


def open_sets(tc, mc, world, is_main, say):
    """The run directory and the checked feature sets: (out, sets, the checkpoint to resume or None)."""
    check_batch_split(tc.batch_size, world, tc.grad_accum)
    if mc.variant == "contrastive" and tc.grad_accum > 1:
        raise SystemExit("error: AMMA-contrastive takes its negatives from the whole batch: --grad-accum would "
                         "shrink them to each micro-batch; use more processes or a GPU with more memory")
    out = Path(tc.out)
    resume_path = prepare_out(out, tc.resume, tc.overwrite, is_main, say)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    sets = load_sets(tc)
    screen_sets(sets, tc, out, is_main, say)
    return out, sets, resume_path


def _pretrain(mc, tc, quiet, rank, world, device):
    is_main = rank == 0
    say = print if is_main and not quiet else (lambda *a, **k: None)
    out, sets, resume_path = open_sets(tc, mc, world, is_main, say)
    counts = {name: ds.counts() for name, ds in sets.items()}                  # [N] x 3 token counts per set
    present = [m for m in MODALITIES if any(m in ds.modalities for ds in sets.values())]
    torch.manual_seed(tc.seed)
    model = build_model(mc).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model.parameters(), "adamw", device, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma)
    state = dict(next_epoch=0, next_step=0, history=[], epoch_loss=0.0, epoch_steps=0, steps_done=0)
    source = restore(model, opt, sched, state, mc, tc, resume_path, sets, device)
    if state["next_epoch"] >= tc.epochs:
        say(f"{out}: all {tc.epochs} epochs are done already ({resume_path}); nothing to do")
        return state["history"]
    net, autocast, run, ckpt = maybe_compile(wrap_ddp(model, world), tc), amp_context(tc.amp, device), new_run_id(), out / "checkpoint.pt"
    say(banner(mc, tc, sets, n_params, world, device, autocast, run, source, state))
    log = RunLog(out / "log.jsonl", run, is_main)
    log.write(event="start", **{"from": [state["next_epoch"], state["next_step"]]}, source=str(source or ""),
              n_params=n_params, world=world, config=to_plain(mc), train_config=to_plain(tc))

    def loss_fn(batch):
        with autocast:
            _, loss, logs = net(strip(batch))
        return loss, logs

    def save(next_epoch, next_step):
        """checkpoint.pt (rank 0) at this position; a run that has not stepped yet writes none."""
        state.update(next_epoch=next_epoch, next_step=next_step)
        if is_main and state["steps_done"]:
            atomic_save({"kind": "pretrain", "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), **state, "n_params": n_params, "run": run,
                         "config": to_plain(mc), "train_config": to_plain(tc)}, ckpt)

    last_save = time.time()
    feed = Feed(Sets(sets), tc.num_workers, device.type == "cuda", _collate_masked(mc), loader_kind(tc.loader, sets.values()))
    with Interrupt() as stop, feed:
        for epoch in range(state["next_epoch"], tc.epochs):
            steps, n_steps, loader, keys = pretraining_epoch(tc, mc, sets, counts, state, epoch, rank, world, feed)
            bar = progress(n_steps, f"epoch {epoch + 1}/{tc.epochs}", not is_main or quiet, state["next_step"])
            meter, t0 = Meter([f"loss_{m}" for m in MODALITIES], device, state["epoch_loss"] if is_main else 0.0), time.time()
            for s, parts in steps:
                seeds = [seed_hash(tc.seed, epoch, s, rank * tc.grad_accum + k) for k in range(len(parts))]
                try:
                    loss, logs = train_step(net, opt, micro_batches(loader, len(parts), device), loss_fn, world, seeds)
                except BrokenBatch as e:                                        # a file broke after the check
                    stop_if_bad(meter.read()[2], epoch, ckpt)
                    save(epoch, s)
                    raise ValueError(f"{e} (epoch {epoch + 1}, step {s + 1}: {f'{ckpt} written; ' if state['steps_done'] else ''}"
                                     f"fix the file or use --skip-bad, then --resume)") from None
                meter.add(loss, logs, s)
                state.update(epoch_steps=state["epoch_steps"] + 1, steps_done=state["steps_done"] + 1)
                bar.update(1)
                if read_point(tc, state, s, n_steps, world, stop, last_save):
                    line = lambda interval: log_step(log, meter, interval, epoch, s, opt.param_groups[0]["lr"], present)
                    last_save = at_read_point(meter, tc, state, stop, save, ckpt, epoch, s, n_steps, last_save, bar,
                                              line, is_main)
            bar.close()
            sched.step()
            state["history"].append(state["epoch_loss"] / max(state["epoch_steps"], 1))
            save(epoch + 1, 0)
            last_save = time.time()
            log.write(epoch=epoch + 1, epoch_loss=state["history"][-1], steps=state["epoch_steps"],
                      seconds=round(time.time() - t0, 1))
            say(f"epoch {epoch + 1}/{tc.epochs}  loss {state['history'][-1]:.4f}  ({state['epoch_steps']} steps, "
                f"{time.time() - t0:.0f}s)  -> {ckpt}")
    log.close()
    return state["history"]


def pretraining_epoch(tc, mc, sets, counts, state, epoch, rank, world, feed):
    """One epoch's plan from where the run stands: this process's steps, their count, and its micro-batches
    from the run's feed (each protein keyed with its mask seed and loss weights)."""
    if state["next_epoch"] != epoch or state["next_step"] == 0:
        state.update(next_epoch=epoch, next_step=0, epoch_loss=0.0, epoch_steps=0)
    plan = epoch_plan(tc, sets, epoch)
    n_steps = min(len(plan), tc.limit_steps or len(plan))
    steps, any_step = epoch_steps(plan, state["next_step"], n_steps, rank, world, tc.grad_accum)
    if not any_step:
        raise SystemExit(f"error: 0 pretraining steps in epoch {epoch + 1}: {sum(map(len, sets.values()))} "
                         f"proteins, global batch {tc.batch_size}, {world} process(es) x --grad-accum {tc.grad_accum}")
    keys = {s: step_keys(tc, mc, sets, counts, plan, epoch, s) for s, _ in steps}
    micro = [[keys[s][j] for j in part] for s, parts in steps for part in parts]
    return steps, n_steps, feed.epoch(micro), keys


def collate_pretraining(items, M, alpha):
    """collate, plus the masks of the pretraining step, made in the loader workers: the
    encoder's keep_ids / keep [B, K] (keep_indices, from each item's "seed") and all_kept (no slot is
    padding: attention needs no mask)."""
    batch = collate(items)
    counts = torch.stack([batch[m + "_len"] if m in batch else torch.zeros(len(items), dtype=torch.long)
                          for m in MODALITIES], 1)                                               # [B, 3]
    widths = [batch[m].shape[1] if m in batch else 0 for m in MODALITIES]
    batch["keep_ids"], batch["keep"] = keep_indices(counts, widths, M, alpha, [it["seed"] for it in items])
    batch["all_kept"] = bool(batch["keep"].all())
    return batch


def _collate_masked(mc):
    """collate_pretraining with this model's mask sampler (M, alpha): picklable, for the loader workers."""
    from functools import partial
    return partial(collate_pretraining, M=mc.M, alpha=tuple(mc.alpha))


# ----------------------------------------------------------------------------------------------
# command line

def flag_order(dc):
    """The fields of dc in --help order: its own, as written, then those it inherits (RunConfig's)."""
    own = list(vars(dc).get("__annotations__", {}))
    by_name = {f.name: f for f in fields(dc)}
    return [by_name[n] for n in own] + [f for f in fields(dc) if f.name not in own]


def add_config_flags(p, dc, skip=(), defaults_shown=True):
    """One flag per field of the dataclass dc, with the help and choices of its arg(...) metadata."""
    for f in flag_order(dc):
        if f.name in skip:
            continue
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        shown = f" (default: {default!r})" if defaults_shown and default not in ("", None) else ""
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(name, action="store_true", help=meta["help"])
        elif isinstance(f.default, tuple):
            p.add_argument(name, type=float, nargs=len(f.default), default=None, help=meta["help"] + shown)
        else:
            kind = f.type if isinstance(f.type, type) else type(f.default)       # the annotation, for a None default
            p.add_argument(name, type=kind, choices=meta.get("choices"), default=None, help=meta["help"] + shown)


def build_parser():
    p = argparse.ArgumentParser(
        description="AMMA pretraining (the analyses of the paper are analyze.py's).",
        epilog="Defaults are the paper's (B.1). Feature widths are read from the files. --batch-size is the "
               "global batch: torchrun's processes split it. The demo (used when --features does not exist) "
               "shrinks the model and schedule unless you set those flags yourself. Exit status: 0 done, "
               "1 or 2 an error (one line), 130 / 143 interrupted (a checkpoint was written: --resume).")
    p.add_argument("--pretrain", action="store_true", help="run pretraining")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="model size: paper (D 512, 8 heads: 51.0M parameters, the stated layers) or 111m "
                        "(D 768, 12 heads: 110.7M, the count of B.3); flags given explicitly win")
    add_config_flags(p, AMMAConfig, skip=("d_seq", "d_str", "d_func"))   # widths: read from the feature files
    add_config_flags(p, TrainConfig)
    return p


def configs_from_args(args, overrides=None):
    """Dataclass defaults, then `overrides` (the demo preset), then --preset, then the flags given."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    values = {**(overrides or {}), **PRESETS[getattr(args, "preset", None) or "paper"], **given}
    mc = AMMAConfig(**{f.name: values[f.name] for f in fields(AMMAConfig) if f.name in values})
    tc = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name in values})
    mc.alpha = tuple(float(a) for a in mc.alpha)
    if mc.D % mc.n_heads:
        raise SystemExit(f"error: --D {mc.D} is not divisible by --n-heads {mc.n_heads}")
    return mc, tc, given


def demo_overrides(args, is_main):
    """No feature set: the built-in demo corpus (demo.py), its model and schedule; it resumes itself."""
    import demo  # not needed with real features
    if is_main:
        print(f"no feature set at {TrainConfig.features}: pretraining on the built-in demo instead "
              f"(synthetic features, not real ESM-1b/GearNet/PubMedBERT ones; the demo run resumes itself)")
    overrides = {**DEMO, "features": str(demo.ensure_demo_features("features/demo"))}
    if not args.overwrite and (Path(args.out or DEMO["out"]) / "checkpoint.pt").exists():
        overrides["resume"] = True
    return overrides


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.pretrain:
        build_parser().print_help()
        return None
    is_main = os.environ.get("RANK", "0") == "0"
    for flag, path in (("--features", args.features), ("--unpaired-seqstr", args.unpaired_seqstr),
                       ("--unpaired-seqfunc", args.unpaired_seqfunc)):
        if path and not (Path(path) / "manifest.tsv").exists():
            raise SystemExit(f"error: {flag} {path}: {path}/manifest.tsv not found: extract features first "
                             f"(extract_features.py){', or leave out --features to run the built-in demo' if flag == '--features' else ''}")
    overrides = None
    if args.features is None and not args.unpaired_seqstr and not (Path(TrainConfig.features) / "manifest.tsv").exists():
        overrides = demo_overrides(args, is_main)
    mc, tc, _ = configs_from_args(args, overrides)
    try:
        if tc.features or tc.unpaired_seqstr:
            dims = feature_dims(tc.features or tc.unpaired_seqstr)
            if tc.unpaired_seqfunc:
                dims.update({k: v for k, v in feature_dims(tc.unpaired_seqfunc).items() if k not in dims})
            for m, d in dims.items():
                setattr(mc, f"d_{m}", d)
        history = pretrain(mc, tc)
    except (ValueError, FileNotFoundError) as e:  # bad input files: one line, no traceback
        raise SystemExit(f"error: {last_line(e)}") from None
    if history and is_main:
        print(f"loss: first epoch {history[0]:.4f}, last epoch {history[-1]:.4f}; checkpoint in {tc.out}/checkpoint.pt")
    return history


if __name__ == "__main__":
    run_as_script(main)
