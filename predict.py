"""
Predict EC numbers or GO terms for your own proteins with a finetuned AMMA model (finetune.py's best.pt).

    python predict.py runs/demo-tiny/go-mf/best.pt --fasta data/demo/demo.fasta --pdb-dir data/demo/pdb
    python predict.py runs/amma/ec/best.pt --pdb-dir my_structures/ --gearnet-ckpt mc_gearnet_edge.pth \\
        --esm-weights esm1b_t33_650M_UR50S.pt --enzyme-dat enzyme.dat --out predictions/ec
    python predict.py runs/amma/go-mf/best.pt --fasta mine.fasta --pdb-dir af/ --allow-seq-only --go-obo go-basic.obo
    python predict.py runs/seq/go-bp/best.pt --fasta mine.fasta --top-k 10     # a --modalities seq model: no structures

Input: --fasta (sequences; a structure <id>.pdb|.cif[.gz] in --pdb-dir is used for the FASTA ids that have
one) or --pdb-dir alone (PDB / mmCIF / AlphaFold files, plain or gzipped; the sequence is the residues with
a C-alpha atom). The features are extracted by extract_features.extract_set itself, with the encoders and
settings recorded in the checkpoint (the info.json of the feature set it was finetuned on: ESM model and
layer, GearNet-Edge, max_len, long): the same code path as extract_features.py, so nothing is computed
twice differently. They are kept in <out>/features (a second run reuses what is up to date). Real
encoders need their weights: --esm-weights (default: the path recorded, else fair-esm's cache) and
--gearnet-ckpt for structures; the demo's tiny encoders need nothing.

Output in --out (default predictions/): predictions.tsv (id, term, score, passes, name, namespace, input)
and predictions.json (the same per protein, the threshold, the failed proteins with their reasons).
score = sigmoid(logit). passes = 1 when the logit is at least the threshold that gave the validation
Fmax in finetuning (stored in best.pt; ties broken towards the higher threshold), i.e. the terms the
model predicts at its Fmax operating point. Rows: the passing terms; --min-score S lists every term
scoring >= S instead, --top-k K keeps the K best of those (alone: the K best, passing or not).

Missing structures: a seq-only model (finetune.py --modalities seq) never reads one. A seq+str model
names each protein without a structure and leaves it out (exit 3), or with --allow-seq-only predicts
it from its sequence alone, as AMMA's encoder takes proteins without a modality (pretraining eq. 12),
and marks it input=seq in the outputs (its scores are less reliable: the model was finetuned with both).

Names: --go-obo go-basic.obo adds GO names and namespaces (read by read_obo below, a small reader of
the OBO 1.2 format: [Term] stanzas' id, alt_id, name, namespace; no package needed), --enzyme-dat
enzyme.dat (ExPASy ENZYME) adds EC names (ID / DE lines; partial numbers such as 3.4.21.- have none).
Without them the ids alone.

Exit status: 0 every protein predicted; 3 some failed (each named with its reason on stderr and in
predictions.json); 2 nothing usable (bad checkpoint, no input, no protein usable).
"""
import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import amma
import cache
import runs
from amma import arg
from sources import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL  # noqa: F401 (embed.py reads them here too)
from sources import _open as open_input  # plain or gzipped text
import extract_features as ef
import finetune as ft

SYNTHETIC = ("{what} was made from demo.py's synthetic features (features/demo): no encoder makes them from a "
             "protein, so it cannot take new proteins; finetune on a feature set of extract_features.py instead "
             "(python extract_features.py --source demo --encoders tiny -> features/demo-tiny)")


class Stop(Exception):
    """Nothing can be done (bad checkpoint, bad input, no usable protein): one line, exit status 2."""


@dataclass
class PredictConfig:
    ckpt: str = arg("", "finetuned model: runs/<name>/<task>/best.pt (finetune.py)")
    fasta: str = arg("", "FASTA file of the proteins (id = first word of the header)")
    pdb_dir: str = arg("", "structures <id>.pdb|.ent|.cif|.mmcif[.gz] (alone: every file is a protein)")
    out: str = arg("predictions", "output folder (predictions.tsv, predictions.json, features/)")
    top_k: int = arg(0, "at most K terms per protein, best first (0 = no cap)")
    min_score: float = arg(None, "list every term scoring >= this (default: the terms passing the threshold)")
    allow_seq_only: bool = arg(False, "seq+str model: predict proteins without a structure from sequence alone")
    go_obo: str = arg("", "GO ontology (go-basic.obo) for term names and namespaces")
    enzyme_dat: str = arg("", "ExPASy enzyme.dat for EC names")
    esm_weights: str = arg("", "local weights of the checkpoint's ESM model (default: the path recorded, "
                                "else fair-esm's cache)")
    gearnet_ckpt: str = arg("", "GearNet-Edge weights (real structure features), e.g. mc_gearnet_edge.pth")
    batch_size: int = arg(16, "proteins per batch (sorted by length)")
    device: str = arg("", "'' = cuda if available else cpu")


def build_parser(cls=PredictConfig, doc=__doc__, positional="ckpt"):
    """argparse from a config dataclass: `positional` is the one positional argument."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0], epilog=doc.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        help = f.metadata["help"] + ("" if f.default in (None, "", False, 0) else f" (default: {f.default})")
        if f.name == positional:
            p.add_argument(f.name, help=help)
        elif isinstance(f.default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help)
        else:
            typ = float if f.name == "min_score" else type(f.default)
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default,
                           choices=f.metadata.get("choices"), help=help)
    return p


def device_of(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------------
# the model: best.pt (finetune.py) or an AMMA pretraining checkpoint (embed.py)

def read_info(ck, path):
    """The encoders' info.json of the feature set a checkpoint was trained on: stored in best.pt, else
    read from the feature set's folder."""
    info = ck.get("info")
    if info is None:
        root = ck.get("features") or ck.get("config", {}).get("features") or ck.get("train_config", {}).get("features")
        info = ft.read_info(root) if root else {}
    return info


def load_finetuned(path, device, esm_weights=""):
    """(FunctionModel in eval mode, checkpoint dict) of a finetune.py best.pt; Stop on anything else."""
    path = Path(path)
    if not path.is_file():
        raise Stop(f"{path}: no such file (finetune.py writes runs/<name>/<task>/best.pt)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, holds code
        raise Stop(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    kind = ck.get("kind") if isinstance(ck, dict) else None
    if kind != "finetune-best":
        raise Stop(f"{path} is {'a ' + kind + ' checkpoint' if kind else 'not an AMMA checkpoint'}: give a "
                   "finetuning's best.pt (runs/<name>/<task>/best.pt)")
    if "threshold" not in ck:
        raise Stop(f"{path} was written by a finetune.py without predictor fields (threshold, encoders): "
                   "finetune again (--overwrite) to use it here")
    mc = amma.AMMAConfig(**{k: tuple(v) if k == "alpha" else v for k, v in ck["model_config"].items()})
    info = read_info(ck, path)
    if info.get("synthetic"):
        raise Stop(SYNTHETIC.format(what=path))
    esm = None
    if ck["config"].get("esm") == "finetune":   # ESM in the loop: its finetuned weights are in best.pt
        try:
            model, alphabet, layer, _ = ef.load_sequence_encoder(info, esm_weights or None, "cpu")
        except ef.FatalError as e:
            raise Stop(str(e)) from None
        esm = ft.SeqInLoop(model, alphabet, layer)
    model = ft.FunctionModel(mc, len(ck["terms"]), esm, ck["readout"], ck["modalities"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), {**ck, "info": info}


# ----------------------------------------------------------------------------------------------
# proteins -> features, through extract_features.extract_set

def extract_proteins(info, cfg, modalities, work):
    """Extract the `modalities` of the proteins of cfg.fasta / cfg.pdb_dir into the feature set `work`
    with the encoders info.json names. Returns (manifest rows by id, ids in input order, failed {id:
    reason}). Stop when the input is unusable or no protein is."""
    if info.get("synthetic"):
        raise Stop(SYNTHETIC.format(what="the checkpoint"))
    if not (cfg.fasta or cfg.pdb_dir):
        raise Stop("no proteins: give --fasta FILE and/or --pdb-dir DIR")
    tiny = bool(info.get("tiny"))
    ecfg = ef.ExtractConfig(source="fasta" if cfg.fasta else "pdb-dir", out=str(work), modality=tuple(modalities),
                            encoders="tiny" if tiny else "real", fasta=cfg.fasta or None, pdb_dir=cfg.pdb_dir or None,
                            esm_model=None if tiny else info.get("esm_model") or ef.legacy_esm_name(info),
                            esm_weights=cfg.esm_weights or info.get("esm_weights") or None,
                            gearnet_ckpt=cfg.gearnet_ckpt or None, max_len=int(info.get("max_len", 1022)),
                            long=info.get("long", "crop"), device=cfg.device or "auto")
    want = info.get("encoders", {}).get("str", "")
    if "str" in modalities and cfg.gearnet_ckpt and not tiny and want != f"gearnet_edge:{Path(cfg.gearnet_ckpt).name}":
        ef.log(f"warning: the model's structure features came from {want}, --gearnet-ckpt is "
               f"{cfg.gearnet_ckpt}: give the same GearNet-Edge weights", err=True)
    try:
        proteins = ef.proteins_fasta(ecfg) if cfg.fasta else ef.proteins_pdb_dir(ecfg)
        if cfg.fasta and cfg.pdb_dir:
            extra = sorted(set(ef.index_structures(cfg.pdb_dir)) - {p.id for p in proteins})
            if extra:
                ef.log(f"note: {len(extra)} structure files in {cfg.pdb_dir} have no FASTA record and are not "
                       f"predicted (e.g. {extra[0]})")
        order = list(dict.fromkeys(p.id for p in proteins))
        summary = ef.extract_set(proteins, work, ecfg, tuple(modalities), ecfg.source)
    except ef.FatalError as e:
        raise Stop(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:   # a missing or unreadable input file
        raise Stop(f"{type(e).__name__}: {e}") from None
    rows = {r["id"]: r for r in cache.read_manifest(work)}
    failed = dict(summary["failed"])
    return rows, [x for x in order if x not in failed], failed


def structure_policy(rows, ids, model_modalities, allow_seq_only, failed):
    """Proteins without a structure under a seq+str model: failed (named) unless allow_seq_only, then
    predicted from sequence and listed. Returns (ids to predict, seq-only ids)."""
    if "str" not in model_modalities:
        return ids, []
    lacking = [x for x in ids if "str" not in rows[x]["modalities"]]
    if allow_seq_only:
        if lacking:
            ef.log(f"note: {len(lacking)} proteins have no structure: predicted from sequence alone "
                   f"(--allow-seq-only; marked input=seq), e.g. {lacking[0]}")
        return ids, lacking
    for x in lacking:
        failed[x] = ("no structure, and the model uses seq+str: give its structure in --pdb-dir "
                     "(<id>.pdb|.cif[.gz]), or --allow-seq-only to predict it from its sequence alone")
        ef.log(f"error: {x}: {failed[x]}", err=True)
    return [x for x in ids if x not in failed], []


@torch.no_grad()
def run_model(fn, model, root, rows, ids, ck, batch_size, device, failed, desc):
    """fn(model, batch) -> a tensor per protein [B, ...], over the feature set `root` in length-sorted
    batches (finetune.py's TaskSet / collate_task, as its evaluation reads them). {id: output};
    a batch that fails (e.g. out of memory) fails its proteins with one line each."""
    esm_in_loop = ck["config"].get("esm") == "finetune"
    ds = ft.TaskSet(root, rows, ids, torch.zeros(len(ids), 0), esm_in_loop, ck["config"].get("max_len", 1022),
                    model.modalities)
    order = sorted(range(len(ds)), key=lambda k: ds.lengths[k])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    autocast = runs.amp_context(ck["config"].get("amp", "auto"), device)
    out, bar = {}, runs.progress(len(ids), desc)
    for batch_ids in batches:
        try:
            batch = ft.collate_task([ds[k] for k in batch_ids])
            with autocast:
                y = fn(model, cache.batch_to(batch, device))
        except (RuntimeError, ValueError) as e:
            for k in batch_ids:
                failed[ds.ids[k]] = f"{desc}: {type(e).__name__}: {runs.last_line(e)}"
                ef.log(f"error: {ds.ids[k]}: {failed[ds.ids[k]]}", err=True)
            continue
        for k, row in zip(batch["index"].tolist(), y):
            out[ds.ids[k]] = row
        bar.update(len(batch_ids))
    bar.close()
    return out


def logits_of(model, batch):
    return model(batch).float().cpu()                                          # [B, C]


# ----------------------------------------------------------------------------------------------
# term names

def read_obo(path):
    """{GO id: (name, namespace)} of the [Term] stanzas of an OBO file (alt_ids map to their term)."""
    terms, stanza, term = {}, None, {}

    def close():
        if stanza == "[Term]" and "id" in term:
            for key in [term["id"]] + term.get("alt_id", []):
                terms[key] = (term.get("name", ""), term.get("namespace", ""))
    with open_input(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                close()
                stanza, term = line, {}
            elif ":" in line and stanza is not None:
                key, value = line.split(":", 1)
                value = value.split(" ! ")[0].strip()
                if key == "alt_id":
                    term.setdefault("alt_id", []).append(value)
                else:
                    term.setdefault(key, value)
    close()
    if not terms:
        raise Stop(f"--go-obo {path}: no [Term] stanza with an id (not an OBO file?)")
    return terms


def read_enzyme_dat(path):
    """{EC number: name} of ExPASy's enzyme.dat (ID line, DE lines joined; trailing '.' dropped)."""
    names, ec = {}, None
    with open_input(path) as f:
        for line in f:
            if line.startswith("ID   "):
                ec = line[5:].strip()
                names[ec] = ""
            elif line.startswith("DE   ") and ec is not None:
                names[ec] = (names[ec] + " " + line[5:].strip()).strip()
            elif line.startswith("//"):
                ec = None
    if not names:
        raise Stop(f"--enzyme-dat {path}: no 'ID   <EC number>' line (not ExPASy's enzyme.dat?)")
    return {k: v[:-1] if v.endswith(".") else v for k, v in names.items()}


def term_names(cfg, task):
    """{term: (name, namespace)} from --go-obo / --enzyme-dat (empty without them)."""
    if task == "ec":
        return {k: (v, "") for k, v in read_enzyme_dat(cfg.enzyme_dat).items()} if cfg.enzyme_dat else {}
    return read_obo(cfg.go_obo) if cfg.go_obo else {}


# ----------------------------------------------------------------------------------------------
# output

def select(logits, threshold, top_k, min_score):
    """Indices of the listed terms, best first: passing the threshold (default), or scoring >= min_score;
    at most top_k (top_k alone: the top_k best)."""
    score = torch.sigmoid(logits.double())
    keep = score >= min_score if min_score is not None else (
        torch.ones_like(score, dtype=torch.bool) if top_k else logits >= threshold)
    idx = keep.nonzero().flatten()
    idx = idx[score[idx].argsort(descending=True, stable=True)]
    return idx[:top_k] if top_k else idx


def predictions(logits, ck, cfg, names, seq_only):
    """[{id, input, predictions: [{term, score, passes, name, namespace}]}] in input order."""
    out = []
    for pid, y in logits.items():
        rows = []
        for j in select(y, ck["threshold"], cfg.top_k, cfg.min_score).tolist():
            name, namespace = names.get(ck["terms"][j], ("", ""))
            rows.append({"term": ck["terms"][j], "score": torch.sigmoid(y[j].double()).item(),
                         "passes": bool(y[j] >= ck["threshold"]), "name": name, "namespace": namespace})
        out.append({"id": pid, "input": "seq" if pid in seq_only else "+".join(ck["modalities"]),
                    "predictions": rows})
    return out


def write_outputs(out, result):
    out.mkdir(parents=True, exist_ok=True)
    lines = ["id\tterm\tscore\tpasses\tname\tnamespace\tinput"]
    for p in result["proteins"]:
        lines += [f"{p['id']}\t{r['term']}\t{r['score']:.6f}\t{int(r['passes'])}\t{r['name']}\t{r['namespace']}\t"
                  f"{p['input']}" for r in p["predictions"]]
    runs.atomic_write_text(out / "predictions.tsv", "\n".join(lines) + "\n")
    runs.atomic_write_text(out / "predictions.json", json.dumps(result, indent=1) + "\n")


def table(result, n=10):
    """The first n proteins: terms passing, best term with its score and name."""
    lines = [f"{'id':<16}{'input':>8}{'passing':>9}  best term (score, name)"]
    for p in result["proteins"][:n]:
        best = p["predictions"][0] if p["predictions"] else None
        text = f"{best['term']} ({best['score']:.3f}{', ' + best['name'] if best['name'] else ''})" if best else "-"
        lines.append(f"{p['id']:<16}{p['input']:>8}{sum(r['passes'] for r in p['predictions']):>9}  {text}")
    if len(result["proteins"]) > n:
        lines.append(f"... {len(result['proteins']) - n} more in predictions.tsv")
    return "\n".join(lines)


def predict(cfg):
    """The whole run; returns the exit status."""
    device = device_of(cfg.device)
    model, ck = load_finetuned(cfg.ckpt, device, cfg.esm_weights)
    names = term_names(cfg, ck["task"])
    out = Path(cfg.out)
    cached = [m for m in model.modalities if not (m == "seq" and ck["config"].get("esm") == "finetune")]
    ef.log(f"{cfg.ckpt}: {ck['task']}, {len(ck['terms'])} terms, modalities {'+'.join(ck['modalities'])}, "
           f"threshold {torch.sigmoid(torch.tensor(ck['threshold'])).item():.4f} (validation Fmax "
           f"{100 * ck['valid_fmax']:.1f}); encoders {ck['info'].get('encoders', {})}")
    rows, ids, failed = extract_proteins(ck["info"], cfg, cached or ["seq"], out / "features")
    ids, seq_only = structure_policy(rows, ids, model.modalities, cfg.allow_seq_only, failed)
    logits = run_model(logits_of, model, out / "features", rows, ids, ck, cfg.batch_size, device, failed, "predict")
    if not logits:
        raise Stop(f"no protein could be predicted ({len(failed)} failed, e.g. "
                   f"{next(iter(failed.items()), ('?', '?'))[0]}: {next(iter(failed.values()), '?')})")
    result = {"checkpoint": str(cfg.ckpt), "task": ck["task"], "modalities": ck["modalities"],
              "threshold_logit": ck["threshold"], "threshold": torch.sigmoid(torch.tensor(ck["threshold"])).item(),
              "valid_fmax": ck["valid_fmax"], "cut": {"top_k": cfg.top_k, "min_score": cfg.min_score},
              "tiny": bool(ck["info"].get("tiny")), "encoders": ck["info"].get("encoders", {}),
              "names_from": cfg.go_obo or cfg.enzyme_dat or None,
              "proteins": predictions({x: logits[x] for x in ids if x in logits}, ck, cfg, names, seq_only),
              "seq_only": seq_only, "failed": failed}
    write_outputs(out, result)
    print(table(result))
    if ck["info"].get("tiny"):
        print("note: a model on TINY random-init encoders' features: the terms say nothing about real proteins")
    print(f"{len(result['proteins'])} proteins predicted, {len(failed)} failed -> {out / 'predictions.tsv'}, "
          f"{out / 'predictions.json'}")
    for pid, why in list(failed.items())[:20]:
        ef.log(f"  failed {pid}: {why}", err=True)
    return EXIT_PARTIAL if failed else EXIT_OK


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = PredictConfig(**vars(args))
    try:
        if cfg.top_k < 0 or cfg.batch_size < 1:
            raise Stop("--top-k must be >= 0 and --batch-size >= 1")
        return predict(cfg)
    except Stop as e:
        ef.log(f"error: {e}", err=True)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
