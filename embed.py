"""
Export AMMA protein embeddings: one row per protein, for linear probes, clustering or search.

    python embed.py runs/demo-tiny/go-mf/best.pt --fasta data/demo/demo.fasta --pdb-dir data/demo/pdb
    python embed.py runs/amma/checkpoint.pt --features features/ec --out embeddings/ec      # a feature set
    python embed.py runs/amma/checkpoint.pt --pdb-dir my_structures/ --gearnet-ckpt mc_gearnet_edge.pth
    python embed.py runs/amma/checkpoint.pt --fasta mine.fasta --modalities seq              # sequences only

Model: an AMMA pretraining checkpoint (amma.py --pretrain: runs/<name>/checkpoint.pt; its encoder Proj +
Enc_multi) or a finetuned best.pt (finetune.py; its finetuned encoder, and ESM when it was finetuned in
the loop; the head is not used). Proteins: a feature set (--features, every protein of its manifest, or
those listed in --ids) or raw --fasta / --pdb-dir, extracted exactly as predict.py does it (by
extract_features.extract_set, with the encoders of the feature set the model was trained on; kept in
<out>/features).

Readout (written to embeddings.json too): Enc_multi runs without masking on [CLS] + the protein's tokens
of the modalities used, as in finetuning; cls.npy holds the [CLS] output z[:, 0] (the vector the
finetuning head reads, B.2) and mean.npy the mean of the outputs at the sequence tokens ([CLS]'s own
output is unsupervised in pretraining, though it gets gradients through attention, so for a
pretrained-only model the mean is the one to try first). Both [N, D] float32, rows in the order of ids.txt. AMMA-contrastive checkpoints give
latent.npy instead: the sequence latent Enc_con(Proj_seq(mean seq)) (eq. 14).
Modalities: --modalities seq,str (default for a pretraining checkpoint) or seq; a best.pt uses its own.
With seq,str a protein without a structure is named and left out, or with --allow-seq-only embedded
from its sequence alone and listed under seq_only in embeddings.json.

Exit status: 0 every protein embedded; 3 some failed (named on stderr and in embeddings.json); 2 nothing
usable.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import amma
import cache
import runs
import extract_features as ef
import finetune as ft
import predict as pr
from amma import arg
from predict import Stop


@dataclass
class EmbedConfig:
    ckpt: str = arg("", "AMMA pretraining checkpoint (runs/<name>/checkpoint.pt) or finetuned best.pt")
    features: str = arg("", "feature set to embed (extract_features.py output)")
    ids: str = arg("", "with --features: a file of ids (one a line) to embed instead of the whole set")
    fasta: str = arg("", "FASTA file (extracted on the fly, as predict.py does)")
    pdb_dir: str = arg("", "structures <id>.pdb|.cif[.gz] (alone: every file is a protein)")
    out: str = arg("embeddings", "output folder (cls.npy, mean.npy, ids.txt, embeddings.json)")
    modalities: str = arg("", "seq,str or seq (default: the best.pt's; seq,str for a pretraining checkpoint)")
    allow_seq_only: bool = arg(False, "seq,str: embed proteins without a structure from sequence alone")
    esm_weights: str = arg("", "local weights of the ESM model (default: the path recorded, else fair-esm's cache)")
    gearnet_ckpt: str = arg("", "GearNet-Edge weights (real structure features), e.g. mc_gearnet_edge.pth")
    batch_size: int = arg(16, "proteins per batch (sorted by length)")
    device: str = arg("", "'' = cuda if available else cpu")


def load_model(cfg, device):
    """(FunctionModel in eval mode, checkpoint-like dict with config, info, modalities) of a best.pt or
    of a pretraining checkpoint (its encoder, a head of one unused class)."""
    try:
        kind = torch.load(cfg.ckpt, map_location="cpu", weights_only=True).get("kind")
    except Exception:
        kind = None   # load_finetuned / read_pretrained say what is wrong
    if kind == "finetune-best":
        model, ck = pr.load_finetuned(cfg.ckpt, device, cfg.esm_weights)
        if cfg.modalities and cfg.modalities.split(",") != list(ck["modalities"]):
            raise Stop(f"{cfg.ckpt} was finetuned on {'+'.join(ck['modalities'])}; --modalities {cfg.modalities} "
                       "would give vectors its training never saw")
        return model, ck
    try:
        mc, pre = amma.read_checkpoint(cfg.ckpt)
    except (ValueError, FileNotFoundError) as e:
        raise Stop(str(e)) from None
    modalities = (cfg.modalities or "seq,str").split(",")
    model = ft.FunctionModel(mc, 1, None, "cls", modalities)
    ft.load_backbone(model, pre["model"])
    info = pr.read_info(pre, cfg.ckpt)
    return model.to(device).eval(), {"config": {"esm": "frozen", "max_len": 1022, "amp": "auto"}, "info": info,
                                     "modalities": modalities, "kind": pre.get("kind", "pretrain")}


def vectors_of(model, batch):
    vectors = model.readouts(batch)[0]
    return torch.stack([vectors[k].float().cpu() for k in sorted(vectors)], 1)   # [B, readouts, D]


def feature_set_rows(cfg, model):
    """(rows by id, ids) of --features (--ids), checked against the model's widths."""
    root = Path(cfg.features)
    try:
        rows = {r["id"]: r for r in cache.read_manifest(root)}
        dims = cache.feature_dims(root)
    except (ValueError, FileNotFoundError) as e:
        raise Stop(str(e)) from None
    want = model.con.config.dims() if model.contrastive else model.enc.config.dims()
    for m in model.modalities:
        if m in dims and dims[m] != want[m]:
            raise Stop(f"{root} has {m} features of width {dims[m]}, the model takes {want[m]}: embed a set made "
                       "with the encoders the model was trained on")
    ids = list(rows)
    if cfg.ids:
        ids = [x.strip() for x in Path(cfg.ids).read_text().splitlines() if x.strip()]
        unknown = [x for x in ids if x not in rows]
        if unknown:
            raise Stop(f"--ids {cfg.ids}: {len(unknown)} ids are not in {root}/manifest.tsv, e.g. {unknown[0]}")
    return rows, ids


def embed(cfg):
    """The whole run; returns the exit status."""
    if cfg.modalities and cfg.modalities not in ft.MODALITY_SETS:
        raise Stop(f"--modalities {cfg.modalities}: give one of {', '.join(ft.MODALITY_SETS)}")
    if bool(cfg.features) == bool(cfg.fasta or cfg.pdb_dir):
        raise Stop("give either --features DIR or --fasta / --pdb-dir")
    device = pr.device_of(cfg.device)
    model, ck = load_model(cfg, device)
    out = Path(cfg.out)
    if cfg.features:
        root = Path(cfg.features)
        rows, ids = feature_set_rows(cfg, model)
        failed = {}
    else:
        root = out / "features"
        cached = [m for m in model.modalities if not (m == "seq" and ck["config"].get("esm") == "finetune")]
        rows, ids, failed = pr.extract_proteins(ck["info"], cfg, cached or ["seq"], root)
    ids, seq_only = pr.structure_policy(rows, ids, model.modalities, cfg.allow_seq_only, failed)
    vectors = pr.run_model(vectors_of, model, root, rows, ids, ck, cfg.batch_size, device, failed, "embed")
    ids = [x for x in ids if x in vectors]
    if not ids:
        raise Stop(f"no protein could be embedded ({len(failed)} failed)")
    X = torch.stack([vectors[x] for x in ids]).numpy()                         # [N, readouts, D]
    names = ["latent"] if model.contrastive else ["cls", "mean"]               # sorted(readouts) order
    out.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        np.save(out / f"{name}.npy", np.ascontiguousarray(X[:, k]))
    runs.atomic_write_text(out / "ids.txt", "\n".join(ids) + "\n")
    readout = {"cls": "[CLS] output of Enc_multi, z[:, 0], unmasked (the finetuning head's input, B.2)",
               "mean": "mean of Enc_multi's outputs at the sequence tokens (valid positions only)",
               "latent": "AMMA-contrastive sequence latent Enc_con(Proj_seq(mean of the seq features)) (eq. 14)"}
    side = {"checkpoint": str(cfg.ckpt), "kind": ck.get("kind"), "files": {f"{n}.npy": readout[n] for n in names},
            "shape": list(X[:, 0].shape), "dtype": "float32", "ids": "ids.txt (row order)",
            "modalities": list(model.modalities), "seq_only": seq_only, "proteins": len(ids),
            "input": cfg.features or {"fasta": cfg.fasta, "pdb_dir": cfg.pdb_dir}, "tiny": bool(ck["info"].get("tiny")),
            "encoders": ck["info"].get("encoders", {}), "failed": failed}
    runs.atomic_write_text(out / "embeddings.json", json.dumps(side, indent=1) + "\n")
    print(f"{len(ids)} proteins x {X.shape[-1]} ({', '.join(names)}; modalities {'+'.join(model.modalities)}"
          f"{f', {len(seq_only)} from sequence alone' if seq_only else ''}), {len(failed)} failed -> "
          f"{', '.join(str(out / f'{n}.npy') for n in names)}, {out / 'ids.txt'}, {out / 'embeddings.json'}")
    for pid, why in list(failed.items())[:20]:
        ef.log(f"  failed {pid}: {why}", err=True)
    return pr.EXIT_PARTIAL if failed else pr.EXIT_OK


def main(argv=None):
    args = pr.build_parser(EmbedConfig, __doc__).parse_args(argv)
    cfg = EmbedConfig(**vars(args))
    try:
        return embed(cfg)
    except Stop as e:
        ef.log(f"error: {e}", err=True)
        return pr.EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
