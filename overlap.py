"""Sequence overlap between a pretraining set and the benchmarks' test chains: identical sequences, and
MMseqs2 neighbours at >= 95 / 50 / 30 % identity.

    python analyze.py --overlap --pretrain features/pretrain --tasks features/ec features/go \\
        --predictions runs/amma/*/predictions.npz          # the audit (analyze.py), and the metrics without them
    python extract_features.py --source alphafold ... --pick 120000 25000 25000 \\
        --exclude-similar-to features/ec features/go --identity 0.95    # a pretraining set without them

Sequences come from each feature set's manifest.tsv 'sequence' column (extract_features.py writes it);
test chains from its labels_<task>.json splits. Identical = the same residue string. Neighbours:
`mmseqs easy-search` of the test chains (queries) against the pretraining proteins (targets), identity
= MMseqs2's fident (identical positions / alignment length), kept when the alignment covers >= 80 % of
the test chain (-c 0.8 --cov-mode 2: a PDB chain inside a longer Swiss-Prot entry counts), sensitivity
-s 7.5, up to 5,000 targets per chain. MMseqs2 is the Debian package mmseqs2 (apt-get install mmseqs2);
without it only the identical-sequence part runs and says so. Standard library only.
"""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

THRESHOLDS = (0.95, 0.5, 0.3)   # identity levels of the audit (plus identical sequences)
MMSEQS_HINT = "MMseqs2 is not installed: apt-get install mmseqs2 (Debian/Ubuntu) or conda install -c bioconda mmseqs2"
TASK_FILES = ("ec", "go-mf", "go-cc", "go-bp")


def read_sequences(root):
    """{id: sequence} of a feature set (manifest.tsv's 'sequence' column); ValueError when it has none."""
    path = Path(root) / "manifest.tsv"
    if not path.exists():
        raise ValueError(f"{path} not found: not a feature set (extract_features.py writes it)")
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    header = lines[0].split("\t")
    if "id" not in header or "sequence" not in header:
        raise ValueError(f"{path} has no 'sequence' column: re-extract the set with extract_features.py")
    i, s = header.index("id"), header.index("sequence")
    rows = [l.split("\t") for l in lines[1:]]
    return {r[i]: r[s].upper() for r in rows if len(r) > s and r[s]}


def test_chains(root):
    """{task: [test ids]} of every labels_<task>.json in a feature set."""
    out = {}
    for task in TASK_FILES:
        path = Path(root) / f"labels_{task}.json"
        if path.exists():
            out[task] = list(json.loads(path.read_text())["splits"].get("test") or [])
    if not out:
        raise ValueError(f"{root} holds no labels_<task>.json (extract_features.py --source ec / go writes them)")
    return out


def identical(queries, targets):
    """{query id: [target ids with the same sequence]} for the queries that have one."""
    by_seq = {}
    for tid, seq in targets.items():
        by_seq.setdefault(seq, []).append(tid)
    return {q: by_seq[s] for q, s in queries.items() if s in by_seq}


def mmseqs():
    return shutil.which("mmseqs")


def _fasta(path, seqs):
    path.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))


def search(queries, targets, min_identity=min(THRESHOLDS), coverage=0.8, threads=1, max_seqs=5000):
    """[(query id, target id, identity)] of every MMseqs2 alignment at >= min_identity covering >= coverage
    of the query; RuntimeError with the tool's message when it fails, or MMSEQS_HINT when it is missing."""
    exe = mmseqs()
    if exe is None:
        raise RuntimeError(MMSEQS_HINT)
    if not queries or not targets:
        return []
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        tmp = Path(tmp)
        _fasta(tmp / "q.fasta", queries)
        _fasta(tmp / "t.fasta", targets)
        cmd = [exe, "easy-search", str(tmp / "q.fasta"), str(tmp / "t.fasta"), str(tmp / "hits.m8"), str(tmp / "work"),
               "--min-seq-id", str(min_identity), "-c", str(coverage), "--cov-mode", "2", "-s", "7.5",
               "--max-seqs", str(max_seqs), "--threads", str(threads), "--format-output", "query,target,fident",
               "-v", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"mmseqs easy-search failed ({run.returncode}): {(run.stderr or run.stdout).strip()[-500:]}")
        hits = []
        for line in (tmp / "hits.m8").read_text().splitlines():
            q, t, ident = line.split("\t")
            hits.append((q, t, float(ident)))
    return hits


def best_identity(queries, targets, threads=1):
    """{query id: highest identity to any target} (identical sequences count 1.0), or None without MMseqs2."""
    best = {q: 1.0 for q in identical(queries, targets)}
    if mmseqs() is None:
        return None
    for q, _, ident in search(queries, targets, threads=threads):
        best[q] = max(best.get(q, 0.0), ident)
    return best


def audit(pretrain, task_roots, threads=1):
    """Per task: test chains, those with an identical pretraining sequence and those with a neighbour at
    >= each of THRESHOLDS (None without MMseqs2), with their ids. Every task's chains are searched once."""
    targets = read_sequences(pretrain)
    report, queries, chains = {}, {}, {}
    for root in task_roots:
        seqs = read_sequences(root)
        for task, ids in test_chains(root).items():
            chains[task] = [x for x in ids if x in seqs]
            queries.update({x: seqs[x] for x in chains[task]})
    same = identical(queries, targets)
    best = best_identity(queries, targets, threads)
    for task, ids in chains.items():
        entry = {"test_chains": len(ids), "identical": sorted(x for x in ids if x in same)}
        for t in THRESHOLDS:
            entry[f">={round(100 * t)}"] = None if best is None else sorted(x for x in ids if best.get(x, 0.0) >= t)
        report[task] = entry
    return {"pretrain": str(pretrain), "pretrain_proteins": len(targets), "tasks": report,
            "mmseqs": mmseqs() is not None, "identity": "MMseqs2 fident, >= 80% of the test chain aligned",
            "identical_pairs": {q: same[q] for q in sorted(same)}}


def similar_to(candidates, roots, identity, threads=1):
    """Ids of `candidates` ({id: sequence}) with a test chain of any set in `roots` at >= identity (identical
    sequences always; MMseqs2 for identity < 1). RuntimeError (MMSEQS_HINT) when it is needed and missing."""
    tests = {}
    for root in roots:
        seqs = read_sequences(root)
        tests.update({x: seqs[x] for ids in test_chains(root).values() for x in ids if x in seqs})
    found = {t for ts in identical(tests, candidates).values() for t in ts}
    if identity < 1.0:
        found |= {t for _, t, ident in search(tests, candidates, min_identity=identity, threads=threads)
                  if ident >= identity}
    return found, len(tests)


def exclude_similar(sets, table, roots, identity, log, out=None, error=RuntimeError):
    """extract_features.py --exclude-similar-to: the alphafold sets and ProtDescribe table without every
    protein whose sequence is identical, or >= identity, to a test chain of the feature sets `roots`
    (before --pick). Proteins without a known sequence (AF files not paired with a text row) cannot be
    checked before extraction and are kept: their count is logged. The ids left out go to
    <out>/excluded_similar.json; a failure (no MMseqs2, no sequences) raises `error` with one line."""
    import dataclasses
    pool = {}
    for proteins in sets.values():
        pool.update({p.id: p.sequence.upper() for p in proteins if p.sequence})
    pool.update({r["id"]: r["sequence"].upper() for r in table.rows if r.get("sequence")})
    try:
        drop, n_tests = similar_to(pool, roots, identity)
    except (RuntimeError, ValueError, OSError) as e:
        raise error(f"--exclude-similar-to: {e}") from None
    unknown = sum(1 for proteins in sets.values() for p in proteins if not p.sequence)
    sets = {k: [p for p in v if p.id not in drop] for k, v in sets.items()}
    table = dataclasses.replace(table, rows=[r for r in table.rows if r["id"] not in drop])
    log(f"--exclude-similar-to: {len(drop)} of {len(pool)} proteins are identical or >= {100 * identity:g}% identical "
        f"to one of {n_tests} test chains of {', '.join(map(str, roots))}: left out"
        + (f"; {unknown} proteins without a known sequence were not checked" if unknown else ""))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "excluded_similar.json").write_text(json.dumps(
            {"similar_to": [str(r) for r in roots], "identity": identity, "unchecked_no_sequence": unknown,
             "excluded": sorted(drop)}, indent=1) + "\n")
    return sets, table, sorted(drop)
