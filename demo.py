"""Built-in synthetic demo corpus: the AMMA kit end to end without downloads.

No model weights and no data sets are needed: a few protein families are generated from a
seed (random consensus sequences, C-alpha traces, ProtDescribe-style text, EC and GO labels
that depend on the family), so pretraining and finetuning can be run and tested offline.
The numbers it gives say nothing about real proteins.

    python demo.py --out features/demo              # synthetic feature cache (< 5 s)
    python demo.py --out data/demo --raw            # raw corpus for extract_features.py
    python demo.py --out features/demo --n 480 --seed 1
    python extract_features.py --source demo --encoders tiny       # raw corpus -> features/demo-tiny
    python amma.py --pretrain                       # falls back to ensure_demo_features()

Two ways to a feature set:

* write_synthetic_features(root): the feature cache of SPEC.md written directly from hidden
  factors, no encoders. Per residue: an amino-acid embedding, its +-3 window context, a smooth
  family-specific per-position factor and a structural factor from the C-alpha trace (contact
  counts, burial, bond and torsion angles); per protein: a family factor; four active-site
  residues per family carry a vector that the Function text tokens share. seq is a fixed random
  linear map of those, str a different fixed random nonlinear map that leans on structure, and
  func (one token per word or punctuation mark of the ProtDescribe text, joined as
  [CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4) a nonlinear map of word, field, position and the family
  factor. Each modality is therefore partly predictable from the others, and the labels (which
  follow the family) from any of them. Widths d_seq=64, d_str=96, d_func=48, per-dim std ~1.
* write_corpus(out_dir): the raw files, for extract_features.py --source demo (tiny encoders):
    demo.fasta                       all sequences (60 residues a line)
    pdb/<id>.pdb                     C-alpha-only ATOM records, chain A, residues from 1
    protdescribe.tsv                 header Entry, Sequence, ProteinName, Function,
                                     SubcellularLocation, Similarity (as ProtST's
                                     uniprot_sprot_filtered.tsv), tab separated, empty = missing
    demo-EC_annot.tsv                DeepFRI nrPDB-EC_annot.tsv format
    demo-GO_annot.tsv                DeepFRI nrPDB-GO_annot.tsv format (MF, BP, CC term lists)
    demo-{EC,GO}_{train,valid,test}.txt   one id a line
    demo-{EC,GO}_test.csv            PDB-chain,<30%,<40%,<50%,<70%,<95%
    demo-{EC,GO}_test_sequences.fasta     ">id nrPDB_test"

API: make_corpus(n, seed) -> list of protein dicts; write_corpus(out_dir, corpus);
write_synthetic_features(root, corpus, seed); ensure_demo_features(root) (what amma.py --pretrain
calls when it finds no features); main(argv). Protein ids are "DEMO0000-A", ...; the eight
families depend on the seed only (not on n), the members on n and seed; everything is drawn from
random.Random and torch.Generator, never the global random state. Torch and the standard library
only.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import random
import re
import time
import zlib
from pathlib import Path

import torch

from metrics import TASKS   # the benchmark's names live in metrics.py

AA = "ACDEFGHIKLMNPQRSTVWY"
AA3 = {"A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS",
       "I": "ILE", "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN",
       "R": "ARG", "S": "SER", "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR"}
CA_CA = 3.8                      # Angstrom between consecutive C-alpha atoms
MAX_POS = 200                    # consensus lengths stay below this
TEXT_FIELDS = ("ProteinName", "Function", "SubcellularLocation", "Similarity")
CUTOFFS = ("30", "40", "50", "70", "95")
DIMS = {"seq": 64, "str": 96, "func": 48}

GO_NAMES = {
    # molecular_function
    "GO:0003824": "catalytic activity", "GO:0016787": "hydrolase activity",
    "GO:0008233": "peptidase activity", "GO:0004252": "serine-type endopeptidase activity",
    "GO:0016740": "transferase activity", "GO:0004672": "protein kinase activity",
    "GO:0005524": "ATP binding", "GO:0000166": "nucleotide binding",
    "GO:0016491": "oxidoreductase activity", "GO:0004022": "alcohol dehydrogenase (NAD) activity",
    "GO:0008270": "zinc ion binding", "GO:0046872": "metal ion binding",
    "GO:0003796": "lysozyme activity",
    "GO:0004553": "hydrolase activity, hydrolyzing O-glycosyl compounds",
    "GO:0016829": "lyase activity", "GO:0004089": "carbonate dehydratase activity",
    "GO:0052689": "carboxylic ester hydrolase activity", "GO:0016853": "isomerase activity",
    "GO:0004807": "triose-phosphate isomerase activity", "GO:0003677": "DNA binding",
    "GO:0003887": "DNA-directed DNA polymerase activity",
    # biological_process
    "GO:0008152": "metabolic process", "GO:0009987": "cellular process",
    "GO:0006508": "proteolysis", "GO:0006468": "protein phosphorylation",
    "GO:0007165": "signal transduction", "GO:0055114": "oxidation-reduction process",
    "GO:0006066": "alcohol metabolic process", "GO:0005975": "carbohydrate metabolic process",
    "GO:0042742": "defense response to bacterium", "GO:0006730": "one-carbon metabolic process",
    "GO:0006629": "lipid metabolic process", "GO:0016042": "lipid catabolic process",
    "GO:0006096": "glycolytic process", "GO:0006094": "gluconeogenesis",
    "GO:0006260": "DNA replication", "GO:0006281": "DNA repair",
    # cellular_component
    "GO:0005576": "extracellular region", "GO:0005615": "extracellular space",
    "GO:0005737": "cytoplasm", "GO:0005829": "cytosol", "GO:0005622": "intracellular",
    "GO:0005634": "nucleus", "GO:0005886": "plasma membrane", "GO:0016020": "membrane",
}

# The families: names (with their full EC number), text templates and GO terms. "{k}" in a
# name becomes a digit, "{X}" a capital letter. The partial EC "a.b.c.-" is added to every
# protein, as in DeepFRI's EC annotation.
FAMILIES = [
    dict(key="trypsin",
         names=[("Trypsin", "3.4.21.4"), ("Cationic trypsin", "3.4.21.4"),
                ("Serine protease {k}", "3.4.21.4"), ("Trypsin-{k}", "3.4.21.4")],
         function=["Serine protease that cleaves peptide bonds on the carboxyl side of lysine "
                   "and arginine residues.",
                   "Digestive serine protease that hydrolyzes proteins into smaller peptides."],
         extra=["Active in the small intestine.",
                "Activated by enteropeptidase cleavage of the propeptide."],
         location=["Secreted.", "Secreted, extracellular space."],
         similarity=["Belongs to the peptidase S1 family.",
                     "Belongs to the peptidase S1 family. Trypsin subfamily."],
         mf=["GO:0003824", "GO:0016787", "GO:0008233", "GO:0004252"],
         bp=["GO:0008152", "GO:0006508"], cc=["GO:0005576", "GO:0005615"]),
    dict(key="kinase",
         names=[("Serine/threonine-protein kinase {X}", "2.7.11.1"),
                ("Protein kinase {k}", "2.7.11.1"),
                ("Stress-activated protein kinase {k}", "2.7.11.1")],
         function=["Serine/threonine-protein kinase that phosphorylates target proteins in "
                   "response to extracellular signals.",
                   "Protein kinase that transfers the gamma-phosphate of ATP to serine and "
                   "threonine residues of substrate proteins."],
         extra=["Plays a role in the regulation of the cell cycle.",
                "Activated by autophosphorylation."],
         location=["Cytoplasm. Nucleus.", "Cytoplasm."],
         similarity=["Belongs to the protein kinase superfamily. Ser/Thr protein kinase family."],
         mf=["GO:0003824", "GO:0016740", "GO:0004672", "GO:0005524", "GO:0000166"],
         bp=["GO:0009987", "GO:0006468", "GO:0007165"],
         cc=["GO:0005737", "GO:0005634", "GO:0005622"]),
    dict(key="alcohol_dehydrogenase",
         names=[("Alcohol dehydrogenase {k}", "1.1.1.1"),
                ("Alcohol dehydrogenase class-{k}", "1.1.1.1"),
                ("NAD-dependent alcohol dehydrogenase", "1.1.1.1")],
         function=["Catalyzes the NAD-dependent oxidation of primary alcohols to the "
                   "corresponding aldehydes.",
                   "Alcohol dehydrogenase that interconverts ethanol and acetaldehyde using NAD "
                   "as cofactor."],
         extra=["Requires zinc as a cofactor.", "Binds two zinc ions per subunit."],
         location=["Cytoplasm.", "Cytoplasm, cytosol."],
         similarity=["Belongs to the zinc-containing alcohol dehydrogenase family."],
         mf=["GO:0003824", "GO:0016491", "GO:0004022", "GO:0008270", "GO:0046872"],
         bp=["GO:0008152", "GO:0055114", "GO:0006066"],
         cc=["GO:0005737", "GO:0005829", "GO:0005622"]),
    dict(key="lysozyme",
         names=[("Lysozyme C", "3.2.1.17"), ("Lysozyme {k}", "3.2.1.17"),
                ("1,4-beta-N-acetylmuramidase C", "3.2.1.17")],
         function=["Lysozymes have primarily a bacteriolytic function; they hydrolyze the "
                   "peptidoglycan of bacterial cell walls.",
                   "Hydrolyzes the beta-1,4 glycosidic bond between N-acetylmuramic acid and "
                   "N-acetylglucosamine in peptidoglycan."],
         extra=["Part of the innate defense against bacteria.",
                "Found in tears, saliva and egg white."],
         location=["Secreted."],
         similarity=["Belongs to the glycosyl hydrolase 22 family."],
         mf=["GO:0003824", "GO:0016787", "GO:0003796", "GO:0004553"],
         bp=["GO:0008152", "GO:0005975", "GO:0042742"], cc=["GO:0005576", "GO:0005615"]),
    dict(key="carbonic_anhydrase",
         names=[("Carbonic anhydrase {k}", "4.2.1.1"), ("Carbonate dehydratase {X}", "4.2.1.1"),
                ("Carbonic anhydrase {X}", "4.2.1.1")],
         function=["Reversible hydration of carbon dioxide to bicarbonate.",
                   "Catalyzes the interconversion of carbon dioxide and water to bicarbonate "
                   "and protons."],
         extra=["Contributes to pH regulation.", "Requires zinc as a cofactor."],
         location=["Cytoplasm.", "Cell membrane; peripheral membrane protein."],
         similarity=["Belongs to the alpha-carbonic anhydrase family."],
         mf=["GO:0003824", "GO:0016829", "GO:0004089", "GO:0008270", "GO:0046872"],
         bp=["GO:0008152", "GO:0006730"], cc=["GO:0005737", "GO:0005886", "GO:0016020"]),
    dict(key="lipase",
         names=[("Triacylglycerol lipase", "3.1.1.3"), ("Lipase {k}", "3.1.1.3"),
                ("Carboxylesterase {k}", "3.1.1.1")],
         function=["Hydrolyzes ester bonds of triglycerides and other lipids.",
                   "Lipolytic enzyme that releases fatty acids from triacylglycerols."],
         extra=["Active at the lipid-water interface.", "Inhibited by organophosphates."],
         location=["Secreted.", "Membrane; peripheral membrane protein."],
         similarity=["Belongs to the AB hydrolase superfamily. Lipase family."],
         mf=["GO:0003824", "GO:0016787", "GO:0052689"],
         bp=["GO:0008152", "GO:0006629", "GO:0016042"], cc=["GO:0005576", "GO:0016020"]),
    dict(key="triosephosphate_isomerase",
         names=[("Triosephosphate isomerase", "5.3.1.1"),
                ("Triose-phosphate isomerase {k}", "5.3.1.1"), ("TIM", "5.3.1.1")],
         function=["Catalyzes the interconversion of dihydroxyacetone phosphate and "
                   "glyceraldehyde 3-phosphate.",
                   "Glycolytic enzyme that isomerizes triose phosphates."],
         extra=["Plays a role in glycolysis and gluconeogenesis.", "Functions as a homodimer."],
         location=["Cytoplasm.", "Cytoplasm, cytosol."],
         similarity=["Belongs to the triosephosphate isomerase family."],
         mf=["GO:0003824", "GO:0016853", "GO:0004807"],
         bp=["GO:0008152", "GO:0006096", "GO:0006094", "GO:0005975"],
         cc=["GO:0005737", "GO:0005829", "GO:0005622"]),
    dict(key="dna_polymerase",
         names=[("DNA polymerase {X}", "2.7.7.7"), ("DNA polymerase II", "2.7.7.7"),
                ("DNA-directed DNA polymerase {k}", "2.7.7.7")],
         function=["Replicative DNA polymerase that synthesizes DNA in the 5' to 3' direction.",
                   "DNA polymerase involved in DNA replication and repair of damaged DNA."],
         extra=["Has 3' to 5' exonuclease proofreading activity.",
                "Requires magnesium ions for activity."],
         location=["Nucleus.", "Nucleus, nucleoplasm."],
         similarity=["Belongs to the DNA polymerase type-B family."],
         mf=["GO:0003824", "GO:0016740", "GO:0003887", "GO:0003677", "GO:0000166"],
         bp=["GO:0009987", "GO:0006260", "GO:0006281"], cc=["GO:0005634", "GO:0005622"]),
]
_GO_KEY = {"go-mf": "mf", "go-bp": "bp", "go-cc": "cc"}


def _partial_ec(ec):
    return ".".join(ec.split(".")[:3]) + ".-"


def task_terms(task):
    """All class names of a task (sorted; class index = position), whatever the corpus size."""
    if task == "ec":
        full = {ec for fam in FAMILIES for _, ec in fam["names"]}
        return sorted(full | {_partial_ec(ec) for ec in full})
    return sorted({t for fam in FAMILIES for t in fam[_GO_KEY[task]]})


# ----------------------------------------------------------------------------- geometry

@contextlib.contextmanager
def _one_thread():
    """Run with one intra-op thread (restored after): the generator makes many small tensor
    ops, for which thread hand-offs cost more than they save, badly so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _dist2(a, b):
    """Squared distances [n, m] between point sets [n, 3] and [m, 3] (no cdist: on small
    inputs its threading costs milliseconds on a busy machine)."""
    return ((a[:, None] - b[None]) ** 2).sum(-1)                              # (n, m)


def _fold(n_res, rng, gen, n_cand=12):
    """A compact, self-avoiding C-alpha chain of helices, strands and loops, [n_res, 3] float64.

    Each residue is placed by NeRF from (virtual bond angle, torsion) candidates drawn around
    its secondary-structure values (helix 91/50 degrees, strand 120/-165, loop anything); the
    candidate with no clash (< 4.2 A to earlier residues) nearest the centroid wins, which
    folds the chain up at the loops. At a dead end the last residues are redrawn as loop.
    """
    plan = []
    while len(plan) < n_res:
        kind = rng.choice("HHE")
        plan += ["L"] * rng.randint(2, 5) + [kind] * (rng.randint(7, 16) if kind == "H"
                                                      else rng.randint(4, 8))
    plan = plan[:n_res]
    mean = {"H": (91.0, 50.0), "E": (120.0, -165.0)}
    spread = {"H": (3.0, 5.0), "E": (5.0, 10.0)}
    t = math.radians(100)
    pts = [[0.0, 0.0, 0.0], [CA_CA, 0.0, 0.0], [CA_CA * (1 - math.cos(t)), CA_CA * math.sin(t), 0.0]]
    mirror = torch.zeros(n_res, 3, dtype=torch.float64)      # pts as a tensor, for clash checks
    mirror[:3] = torch.tensor(pts, dtype=torch.float64)
    backtracks = 0
    while len(pts) < n_res:
        i = len(pts)
        if plan[i] == "L":
            u = torch.rand(n_cand, 2, generator=gen, dtype=torch.float64)
            angles = torch.stack([80 + 70 * u[:, 0], -180 + 360 * u[:, 1]], 1)
        else:
            z = torch.randn(n_cand, 2, generator=gen, dtype=torch.float64)
            angles = torch.tensor(mean[plan[i]]) + torch.tensor(spread[plan[i]]) * z
        # NeRF in plain floats: frame (bond, in-plane normal, plane normal) of the last 3 points
        a, b, c = pts[-3], pts[-2], pts[-1]
        bc = [(c[d] - b[d]) / CA_CA for d in range(3)]
        n = _cross([b[d] - a[d] for d in range(3)], bc)
        n = [v / math.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2) for v in n]
        m = _cross(n, bc)
        cand = []
        for theta, tau in (angles * (math.pi / 180)).tolist():
            l0 = -CA_CA * math.cos(theta)
            l1 = CA_CA * math.sin(theta) * math.cos(tau)
            l2 = CA_CA * math.sin(theta) * math.sin(tau)
            cand.append([c[d] + l0 * bc[d] + l1 * m[d] + l2 * n[d] for d in range(3)])
        d2 = _dist2(torch.tensor(cand, dtype=torch.float64), mirror[:i - 2])  # (K, i - 2)
        clash = (d2.amin(1) < 4.2 ** 2).tolist()
        if all(clash) and backtracks < 200:
            backtracks += 1
            back = min(i - 3, 2 + backtracks % 7)
            plan[i - back:i + 1] = ["L"] * (back + 1)
            del pts[i - back:]
            continue
        weight = 0.05 if plan[i] != "L" else 1.0
        centre = (mirror[:i].sum(0) / i).tolist()
        score = [1000.0 * cl + weight * math.dist(q, centre) for q, cl in zip(cand, clash)]
        best = cand[score.index(min(score))]
        mirror[i] = torch.tensor(best, dtype=torch.float64)
        pts.append(best)
    return mirror - mirror.mean(0)


def _cross(u, v):
    return [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]


def _hairpin_site(ca, rng, k, allowed, tries=30):
    """Insert k (even) residues as a flat hairpin excursion between bonded residues j, j+1.

    The new points a+v, a+2v, ..., b+2v, b+v (|v| = 3.8, perpendicular to the bond, pointing
    away from the centroid) keep every consecutive distance at 3.8 A, so deleting them again
    also does. Returns (j, new [k, 3]) for a site without clashes, or None.
    """
    centroid = ca.mean(0)
    others = torch.ones(len(ca), dtype=torch.bool)
    for _ in range(tries):
        j = rng.randrange(1, len(ca) - 2)
        if not (allowed[j] and allowed[j + 1]):
            continue
        a, b = ca[j], ca[j + 1]
        u = (b - a) / (b - a).norm()
        out = (a + b) / 2 - centroid
        out = out - (out @ u) * u
        if out.norm() < 1e-3:
            continue
        v = CA_CA * out / out.norm()
        m = k // 2
        new = torch.stack([a + v * (s + 1) for s in range(m)] + [b + v * (m - s) for s in range(m)])
        mask = others.clone()
        mask[j:j + 2] = False
        if _dist2(new, ca[mask]).amin() >= 4.0 ** 2:
            return j, new
    return None


def _renormalise(ca):
    """Consecutive C-alpha distances back to exactly 3.8 A (walk along the noisy trace)."""
    y = ca.tolist()
    out = [y[0]]
    for p in y[1:]:
        q = out[-1]
        d = [p[0] - q[0], p[1] - q[1], p[2] - q[2]]
        s = CA_CA / math.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        out.append([q[0] + s * d[0], q[1] + s * d[1], q[2] + s * d[2]])
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- corpus

def _family(k, rng, gen):
    """Consensus sequence, C-alpha trace, loop ids (-1 = core) and active site of family k."""
    n_core = rng.randint(36, 150)
    ca = _fold(n_core, rng, gen)
    loop = [-1] * n_core
    for lid in range(rng.randint(1, 3)):            # variable loops members may lack
        k_ins = rng.choice((2, 4))
        site = _hairpin_site(ca, rng, k_ins, [x == -1 for x in loop])
        if site is None:
            continue
        j, new = site
        ca = torch.cat([ca[:j + 1], new, ca[j + 1:]])                        # (L + k, 3)
        loop[j + 1:j + 1] = [lid] * k_ins
    seq = "".join(rng.choice(AA) for _ in range(len(ca)))
    core = [i for i, x in enumerate(loop) if x == -1]
    active = sorted(rng.sample(core, 4))
    return dict(sequence=seq, ca=ca, loop=loop, active=active, template=FAMILIES[k])


def _fill(template, rng):
    return template.replace("{k}", str(rng.randint(1, 9))).replace(
        "{X}", rng.choice("ABCDEFGH"))


def make_corpus(n=240, seed=0, n_families=8):
    """n synthetic proteins from n_families families, deterministic for a seed.

    Each entry: {"id", "family" (int), "family_name", "sequence", "ca" ([L, 3] float32, A),
    "positions" ([L] consensus index per residue, -1 = inserted), "active_site" (residue
    indices), "fields" {ProteinName, Function, SubcellularLocation, Similarity} ("" = missing),
    "ec", "go-mf", "go-cc", "go-bp" (term lists), "split" ("train" | "valid" | "test"),
    "test_identity" ({"30": 0/1, ..., "95": 1} for test proteins, else None)}.
    """
    if not 1 <= n_families <= len(FAMILIES):
        raise ValueError(f"n_families must be 1..{len(FAMILIES)}, got {n_families}")
    if n < 3:
        raise ValueError(f"n must be at least 3 (one protein per split), got {n}")
    with _one_thread():
        return _make_corpus(n, seed, n_families)


@functools.lru_cache(maxsize=8)
def _families(seed, n_families):
    """The families of a seed (the first k are the same for every n_families >= k); cached,
    read-only."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    return tuple(_family(k, rng, gen) for k in range(n_families))


def _make_corpus(n, seed, n_families):
    families = _families(seed, n_families)
    rng = random.Random(2 ** 32 + seed)                  # members: a stream of their own
    gen = torch.Generator().manual_seed(2 ** 32 + seed)
    assignment = [i % n_families for i in range(n)]
    rng.shuffle(assignment)
    ec_all = [t for t in task_terms("ec") if not t.endswith("-")]
    corpus = []
    for i, k in enumerate(assignment):
        fam = families[k]
        tpl = fam["template"]
        # residues: drop some variable loops and a few terminal residues, maybe add a hairpin
        drop = {lid for lid in sorted(set(fam["loop"]) - {-1}) if rng.random() < 0.35}
        keep = [p for p, lid in enumerate(fam["loop"]) if lid not in drop]
        keep = keep[rng.randint(0, 3):len(keep) - rng.randint(0, 3)]
        ca = fam["ca"][keep]                                                    # (L, 3)
        positions = list(keep)
        if rng.random() < 0.3:
            site = _hairpin_site(ca, rng, 2, [True] * len(ca))
            if site is not None:
                j, new = site
                ca = torch.cat([ca[:j + 1], new, ca[j + 1:]])                   # (L + 2, 3)
                positions[j + 1:j + 1] = [-1, -1]
        noise = 0.15 * torch.randn(ca.shape, generator=gen, dtype=torch.float64)
        ca = _renormalise(ca + noise).float()
        seq = []
        for p in positions:
            aa = fam["sequence"][p] if p >= 0 else rng.choice(AA)
            if p >= 0 and rng.random() < 0.15:
                aa = rng.choice(AA.replace(aa, ""))
            seq.append(aa)
        # text
        name, ec = rng.choice(tpl["names"])
        function = rng.choice(tpl["function"])
        if rng.random() < 0.5:
            function += " " + rng.choice(tpl["extra"])
        fields = {"ProteinName": _fill(name, rng),
                  "Function": function if rng.random() >= 0.08 else "",
                  "SubcellularLocation": rng.choice(tpl["location"]) if rng.random() >= 0.2 else "",
                  "Similarity": rng.choice(tpl["similarity"]) if rng.random() >= 0.1 else ""}
        # labels, with a little noise: an extra wrong term, a dropped right one
        labels = {"ec": [ec, _partial_ec(ec)]}
        if rng.random() < 0.05:
            other = rng.choice([e for e in ec_all if e != ec])
            labels["ec"] += [t for t in (other, _partial_ec(other)) if t not in labels["ec"]]
        for task in ("go-mf", "go-cc", "go-bp"):
            terms = [t for t in tpl[_GO_KEY[task]] if rng.random() >= 0.05] or tpl[_GO_KEY[task]][:1]
            if rng.random() < 0.08:
                terms.append(rng.choice([t for t in task_terms(task) if t not in terms]))
            labels[task] = terms
        active = [r for r, p in enumerate(positions) if p in fam["active"]]
        corpus.append(dict(id=f"DEMO{i:04d}-A", family=k, family_name=tpl["key"],
                           sequence="".join(seq), ca=ca, positions=positions,
                           active_site=active, fields=fields, **labels))
    _assign_splits(corpus, rng, n_families)
    return corpus


def _assign_splits(corpus, rng, n_families):
    """~70/15/15 train/valid/test, families interleaved so that every split holds most of them.

    Test proteins get DeepFRI-style identity columns: 1 = kept at that cutoff (identity to the
    training set below it). Most are 1 everywhere; a few are 0 at the low cutoffs, so the
    cutoff logic has something to remove; "95" is always 1.
    """
    by_family = [[e for e in corpus if e["family"] == k] for k in range(n_families)]
    for members in by_family:
        rng.shuffle(members)
    order = [m[r] for r in range(max(map(len, by_family))) for m in by_family if r < len(m)]
    n_valid = n_test = max(1, round(0.15 * len(order)))
    n_train = len(order) - n_valid - n_test
    for r, e in enumerate(order):
        e["split"] = "train" if r < n_train else "valid" if r < n_train + n_valid else "test"
        e["test_identity"] = None
    test = [e for e in corpus if e["split"] == "test"]
    for t, e in enumerate(test):
        zeros = rng.choice((1, 2, 3)) if t > 0 and rng.random() < 0.2 else 0
        e["test_identity"] = {c: int(j >= zeros) for j, c in enumerate(CUTOFFS)}
    if len(test) > 1 and all(e["test_identity"]["30"] for e in test):
        test[-1]["test_identity"].update({"30": 0, "40": 0})


# ----------------------------------------------------------------------------- raw files

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def text_tokens(fields):
    """[(token, field, index in field)] for "[CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4".

    One token per lower-cased word or punctuation mark (as BERT's basic tokenizer splits),
    at most 128 per field; empty fields are left out; field 0 marks [CLS] and [SEP].
    """
    tokens = [("[CLS]", 0, 0)]
    present = [name for name in TEXT_FIELDS if fields.get(name)]
    for n, name in enumerate(present):
        if n:
            tokens.append(("[SEP]", 0, 0))
        words = _WORD.findall(fields[name].lower())[:128]
        tokens += [(w, TEXT_FIELDS.index(name) + 1, i) for i, w in enumerate(words)]
    return tokens


def _write_atomic(path, data):
    """Write bytes or text to path through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save_tensor(path, tensor):
    buf = io.BytesIO()
    torch.save(tensor, buf)
    _write_atomic(path, buf.getvalue())


def _rows(rows, **kw):
    buf = io.StringIO()
    csv.writer(buf, **kw).writerows(rows)
    return buf.getvalue()


def _fasta(records, width=60):
    return "".join(f">{head}\n" + "".join(seq[i:i + width] + "\n" for i in range(0, len(seq), width))
                   for head, seq in records)


def pdb_text(entry):
    """C-alpha-only PDB file (fixed columns, 80 characters a line) of one corpus entry."""
    lines = ["REMARK   1 AMMA KIT SYNTHETIC DEMO CHAIN (demo.py), NOT A REAL STRUCTURE".ljust(80)]
    for i, (aa, (x, y, z)) in enumerate(zip(entry["sequence"], entry["ca"].tolist()), 1):
        lines.append(f"ATOM  {i:5d}  CA  {AA3[aa]} A{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
                     f"{1.0:6.2f}{0.0:6.2f}          {'C':>2}  ")
    n = len(entry["sequence"])
    lines.append(f"TER   {n + 1:5d}      {AA3[entry['sequence'][-1]]} A{n:4d}".ljust(80))
    lines.append("END".ljust(80))
    return "\n".join(lines) + "\n"


def deepfri_files(corpus):
    """{file name: text} of the DeepFRI-format EC and GO files (see the module docstring)."""
    files = {}
    # csv.writer's default "\r\n" line ends, as DeepFRI's own annot.tsv and test.csv have
    ec = [["### EC-numbers"], task_terms("ec"), ["### PDB-chain", "EC-numbers"]]
    ec += [[e["id"], ",".join(e["ec"])] for e in corpus]
    files["demo-EC_annot.tsv"] = _rows(ec, delimiter="\t")
    go = []
    onts = (("molecular_function", "go-mf"), ("biological_process", "go-bp"),
            ("cellular_component", "go-cc"))
    for ont, task in onts:
        terms = task_terms(task)
        go += [[f"### GO-terms ({ont})"], terms, [f"### GO-names ({ont})"],
               [GO_NAMES[t] for t in terms]]
    go.append(["### PDB-chain"] + [f"GO-terms ({ont})" for ont, _ in onts])
    go += [[e["id"]] + [",".join(e[task]) for _, task in onts] for e in corpus]
    files["demo-GO_annot.tsv"] = _rows(go, delimiter="\t")
    test = [e for e in corpus if e["split"] == "test"]
    for prefix in ("demo-EC", "demo-GO"):
        for split in ("train", "valid", "test"):
            files[f"{prefix}_{split}.txt"] = "".join(e["id"] + "\n" for e in corpus
                                                     if e["split"] == split)
        header = ["PDB-chain"] + [f"<{c}%" for c in CUTOFFS]
        files[f"{prefix}_test.csv"] = _rows(
            [header] + [[e["id"]] + [e["test_identity"][c] for c in CUTOFFS] for e in test])
        files[f"{prefix}_test_sequences.fasta"] = _fasta(
            [(f"{e['id']} nrPDB_test", e["sequence"]) for e in test])
    return files


def write_corpus(out_dir, corpus=None):
    """Write the raw demo corpus (FASTA, PDB, ProtDescribe TSV, DeepFRI files) to out_dir."""
    out = Path(out_dir)
    corpus = make_corpus() if corpus is None else corpus
    _write_atomic(out / "demo.fasta", _fasta([(e["id"], e["sequence"]) for e in corpus]))
    for e in corpus:
        _write_atomic(out / "pdb" / f"{e['id']}.pdb", pdb_text(e))
    rows = [["Entry", "Sequence", *TEXT_FIELDS]]
    rows += [[e["id"], e["sequence"], *(e["fields"][f] for f in TEXT_FIELDS)] for e in corpus]
    _write_atomic(out / "protdescribe.tsv", _rows(rows, delimiter="\t", lineterminator="\n"))
    for name, text in deepfri_files(corpus).items():
        _write_atomic(out / name, text)
    return out


# ----------------------------------------------------------------------------- features

def structure_descriptors(ca):
    """Per-residue [L, 6]: contacts within 8 and 12 A, burial, cos bond angle, sin/cos torsion."""
    x = ca.double()
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None] - 2 * x @ x.T                                 # (L, L)
    c8 = (d2 < 8.0 ** 2).sum(1) - 1.0
    c12 = (d2 < 12.0 ** 2).sum(1) - 1.0
    r = (x - x.mean(0)).norm(dim=1)
    burial = r / r.pow(2).mean().sqrt()
    u, w = x[:-2] - x[1:-1], x[2:] - x[1:-1]                                  # (L-2, 3)
    cos_angle = (u * w).sum(1) / (u.norm(dim=1) * w.norm(dim=1))
    b1, b2, b3 = x[1:-2] - x[:-3], x[2:-1] - x[1:-2], x[3:] - x[2:-1]         # (L-3, 3)
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    m1 = torch.linalg.cross(n1, b2 / b2.norm(dim=1, keepdim=True))
    tau = torch.atan2((m1 * n2).sum(1), (n1 * n2).sum(1))
    # angle i lies at residue i+1, torsion i between residues i+1 and i+2: repeat the ends
    cos_angle = torch.cat([cos_angle[:1], cos_angle, cos_angle[-1:]])         # (L,)
    tau = torch.cat([tau[:1], tau, tau[-1:], tau[-1:]])                       # (L,)
    return torch.stack([c8, c12, burial, cos_angle, tau.sin(), tau.cos()], 1).float()


def _word_vector(word, seed, k):
    """A fixed random vector per word, the same in every corpus (crc32-seeded)."""
    g = torch.Generator().manual_seed((zlib.crc32(word.encode()) * 1_000_003 + seed) % 2 ** 62)
    return torch.randn(k, generator=g)


def _standardise(x, g, noise=0.1):
    """Zero mean, unit std per dim over all rows, plus a little fixed-seed noise."""
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    return x + noise * torch.randn(x.shape, generator=g)


def synthetic_features(corpus, seed=0, d_seq=64, d_str=96, d_func=48, k=16):
    """{id: {"seq": [L, d_seq], "str": [L, d_str], "func": [L', d_func]}} (float32).

    Hidden factors (k dims each): per residue the amino-acid embedding, its +-3 window mean,
    the family's smooth per-position factor (plus an active-site vector at the family's
    active-site residues; zero at inserted residues) and tanh of the standardised structure
    descriptors; per protein the family vector plus noise; per text token a fixed vector per
    word, field and position embeddings, the field's mean word vector and the family vector
    (plus the active-site vector in the Function field). seq is linear in the residue factors,
    str and func are random 2-layer tanh maps; all are standardised per dim with 0.1 noise.
    """
    with _one_thread():
        return _synthetic_features(corpus, seed, d_seq, d_str, d_func, k)


def _synthetic_features(corpus, seed, d_seq, d_str, d_func, k):
    g = torch.Generator().manual_seed(1_000_003 + seed)
    n_fam = len(FAMILIES)
    aa_emb = torch.randn(len(AA), k, generator=g)
    fam_vec = torch.randn(n_fam, k, generator=g)
    site_vec = 2.0 * torch.randn(n_fam, k, generator=g)
    pos_fac = torch.randn(n_fam, k, MAX_POS + 6, generator=g)
    pos_fac = torch.nn.functional.avg_pool1d(pos_fac, 7, stride=1).transpose(1, 2)  # (F, MAX_POS, k)
    pos_fac = pos_fac / pos_fac.std()
    w_struct = torch.randn(6, k, generator=g) / math.sqrt(6)
    w_seq = torch.randn(5 * k, d_seq, generator=g) / math.sqrt(5 * k)
    w_str1 = torch.randn(4 * k, 128, generator=g) * (2.5 / math.sqrt(4 * k))
    w_str2 = torch.randn(128, d_str, generator=g) / math.sqrt(128)
    field_emb = torch.randn(len(TEXT_FIELDS) + 1, 8, generator=g)
    w_func1 = torch.randn(3 * k + 16, 128, generator=g) * (1.5 / math.sqrt(3 * k + 16))
    w_func2 = torch.randn(128, d_func, generator=g) / math.sqrt(128)
    prot_f = fam_vec[[e["family"] for e in corpus]] + 0.3 * torch.randn(len(corpus), k, generator=g)

    # residues of all proteins, concatenated: N rows
    n_res = torch.tensor([len(e["sequence"]) for e in corpus])
    start = torch.cumsum(n_res, 0) - n_res                                   # (P,)
    prot = torch.repeat_interleave(torch.arange(len(corpus)), n_res)         # (N,)
    emb = aa_emb[torch.tensor([AA.index(c) for e in corpus for c in e["sequence"]])]  # (N, k)
    csum = torch.cat([torch.zeros(1, k), emb.cumsum(0)])                     # (N + 1, k)
    idx = torch.arange(len(prot))
    lo = torch.maximum(idx - 3, start[prot])
    hi = torch.minimum(idx + 4, (start + n_res)[prot])
    ctx = (csum[hi] - csum[lo]) / (hi - lo)[:, None]                         # (N, k) window mean
    pos = torch.tensor([p for e in corpus for p in e["positions"]])
    family = torch.tensor([e["family"] for e in corpus])[prot]
    fac = pos_fac[family, pos.clamp(min=0)] * (pos >= 0)[:, None]            # (N, k)
    site = torch.tensor([s + r for e, s in zip(corpus, start.tolist()) for r in e["active_site"]],
                        dtype=torch.long)
    fac[site] += site_vec[family[site]]
    s_raw = torch.cat([structure_descriptors(e["ca"]) for e in corpus])      # (N, 6)
    s_raw = (s_raw - s_raw.mean(0)) / s_raw.std(0).clamp(min=1e-6)
    struct = torch.tanh(s_raw @ w_struct * 1.5)                              # (N, k)
    f = prot_f[prot]                                                          # (N, k)
    seq = torch.cat([emb, ctx, fac, 0.5 * struct, f], 1) @ w_seq             # (N, d_seq)
    stru = torch.tanh(torch.cat([struct, fac, 0.5 * emb, f], 1) @ w_str1) @ w_str2  # (N, d_str)

    # text tokens of all proteins, concatenated: N' rows
    vocab, word_ids, fields, index, tok_prot = {}, [], [], [], []
    for p, e in enumerate(corpus):
        for word, field, i in text_tokens(e["fields"]):
            word_ids.append(vocab.setdefault(word, len(vocab)))
            fields.append(field)
            index.append(i)
            tok_prot.append(p)
    words = torch.stack([_word_vector(w, seed, k) for w in vocab])[torch.tensor(word_ids)]  # (N', k)
    fields, tok_prot = torch.tensor(fields), torch.tensor(tok_prot)
    group = tok_prot * (len(TEXT_FIELDS) + 1) + fields                       # (protein, field)
    n_groups = len(corpus) * (len(TEXT_FIELDS) + 1)
    group_sum = torch.zeros(n_groups, k).index_add_(0, group, words)
    group_n = torch.zeros(n_groups).index_add_(0, group, torch.ones(len(group)))
    field_ctx = (group_sum / group_n.clamp(min=1)[:, None])[group]           # (N', k)
    angle = torch.tensor(index, dtype=torch.float32)[:, None] / 10.0 ** (torch.arange(4) / 2.0)
    tf = prot_f[tok_prot] + site_vec[[corpus[p]["family"] for p in tok_prot.tolist()]] * (
        fields == 1 + TEXT_FIELDS.index("Function"))[:, None]               # (N', k)
    tok = torch.cat([words, field_emb[fields], angle.sin(), angle.cos(), field_ctx, tf], 1)
    func = torch.tanh(tok @ w_func1) @ w_func2                               # (N', d_func)

    seq, stru, func = _standardise(seq, g), _standardise(stru, g), _standardise(func, g)
    n_tok = torch.bincount(tok_prot, minlength=len(corpus)).tolist()
    seq, stru, func = seq.split(n_res.tolist()), stru.split(n_res.tolist()), func.split(n_tok)
    return {e["id"]: {"seq": seq[p], "str": stru[p], "func": func[p]} for p, e in enumerate(corpus)}


def labels_json(corpus, task):
    """labels_<task>.json of one task, in extract_features.write_labels' format (source "demo")."""
    terms = task_terms(task)
    index = {t: i for i, t in enumerate(terms)}
    return {"task": task, "terms": terms,
            "labels": {e["id"]: sorted({index[t] for t in e[task]}) for e in corpus},
            "splits": {s: [e["id"] for e in corpus if e["split"] == s]
                       for s in ("train", "valid", "test")},
            "test_identity": {e["id"]: e["test_identity"] for e in corpus if e["split"] == "test"},
            "source": "demo"}


def write_synthetic_features(root, corpus=None, seed=0, n=240, d_seq=DIMS["seq"],
                             d_str=DIMS["str"], d_func=DIMS["func"]):
    """Write the synthetic feature cache, manifest, info.json and labels_<task>.json to root.

    corpus defaults to make_corpus(n, seed); seed also fixes the random feature maps.
    The manifest is written last, so its presence means the set is complete.
    """
    root = Path(root)
    corpus = make_corpus(n=n, seed=seed) if corpus is None else corpus
    feats = synthetic_features(corpus, seed=seed, d_seq=d_seq, d_str=d_str, d_func=d_func)
    for e in corpus:
        for m in ("seq", "str", "func"):
            _save_tensor(root / m / f"{e['id']}.pt", feats[e["id"]][m].half().clone())
    for task in TASKS:
        _write_atomic(root / f"labels_{task}.json", json.dumps(labels_json(corpus, task)))
    info = {"encoders": {"seq": "synthetic", "str": "synthetic", "func": "synthetic"},
            "dims": {"seq": d_seq, "str": d_str, "func": d_func},
            "tiny": False, "synthetic": True,
            "source": f"demo.py built-in synthetic corpus (n={len(corpus)}, seed={seed})",
            "families": [f["key"] for f in FAMILIES]}
    _write_atomic(root / "info.json", json.dumps(info, indent=1) + "\n")
    rows = [["id", "L", "L_func", "modalities", "sequence", "family"]]
    rows += [[e["id"], len(e["sequence"]), len(feats[e["id"]]["func"]), "seq,str,func",
              e["sequence"], e["family_name"]] for e in corpus]
    _write_atomic(root / "manifest.tsv", _rows(rows, delimiter="\t", lineterminator="\n"))
    return root


def ensure_demo_features(root="features/demo"):
    """Return root, writing the synthetic demo feature set there first if it has no manifest."""
    root = Path(root)
    if (root / "manifest.tsv").exists():
        try:
            info = json.loads((root / "info.json").read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("synthetic"):
            what = "built-in synthetic demo features (not real ESM/GearNet/PubMedBERT features)"
        else:
            what = (f"{'tiny random-initialised' if info.get('tiny') else ''} encoder features "
                    f"{info.get('encoders', '(no info.json)')}").strip()
        print(f"demo features: using {root}: {what}")
        return root
    t0 = time.time()
    write_synthetic_features(root)
    print(f"no real features found: wrote the built-in synthetic demo feature set to {root} "
          f"in {time.time() - t0:.1f} s (not real ESM/GearNet/PubMedBERT features)")
    return root


# ----------------------------------------------------------------------------- CLI

@dataclasses.dataclass
class DemoConfig:
    out: str = dataclasses.field(default="features/demo", metadata={
        "help": "output folder (feature set, or raw corpus with --raw)"})
    raw: bool = dataclasses.field(default=False, metadata={
        "help": "write the raw corpus (FASTA, PDB, ProtDescribe TSV, DeepFRI label files) "
                "for extract_features.py --source demo instead of synthetic features"})
    n: int = dataclasses.field(default=240, metadata={"help": "number of proteins"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write the built-in synthetic demo: a feature set (default) or the raw corpus.",
        epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DemoConfig):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                                help=f.metadata["help"] + " (default: %(default)s)")
    return parser


def main(argv=None):
    cfg = DemoConfig(**vars(build_parser().parse_args(argv)))
    t0 = time.time()
    corpus = make_corpus(n=cfg.n, seed=cfg.seed)
    if cfg.raw:
        write_corpus(cfg.out, corpus)
        what = "raw demo corpus (FASTA, PDB, ProtDescribe TSV, DeepFRI files)"
    else:
        write_synthetic_features(cfg.out, corpus, seed=cfg.seed)
        what = "synthetic demo feature set (not real encoder features)"
    print(f"wrote {what} of {len(corpus)} proteins to {cfg.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
