"""GearNet-Edge in plain torch: structure reading, torchdrug's graph construction, and the model.

torchdrug (which defines GearNet) does not install on Python >= 3.11, so the kit carries its own
copy of the parts it needs. It loads a torchdrug `models.GearNet` state_dict unchanged (for
example the official `mc_gearnet_edge.pth`) and reproduces torchdrug's node features; the tests
check this against `../shared/golden/gearnet_torchdrug.pt`.

    import gearnet
    state_dict = torch.load("mc_gearnet_edge.pth", weights_only=True)
    model = gearnet.GearNetEdge.from_state_dict(state_dict)
    feats = gearnet.encode_structure(model, "AF-P69905-F1-model_v4.pdb.gz")   # [L, 3072]
    tiny = gearnet.tiny_gearnet()                  # random weights, [32]*6 -> [L, 192], offline

The graph is the one torchdrug builds for GearNet-Edge:

    Protein.from_pdb -> GraphConstruction(node_layers=[AlphaCarbonNode()],
        edge_layers=[SequentialEdge(max_distance=2), SpatialEdge(radius=10.0, min_distance=5),
                     KNNEdge(k=10, min_distance=5)], edge_feature="gearnet")

Conventions, stated once:
- Nodes are residues with a C-alpha atom, in file order. Node input is the 21-dim residue one-hot
  (20 standard residues in torchdrug's order, index 20 = unknown).
- An edge is (in, out, relation) and carries a message from `in` to `out`. Relations:
  0..4 sequential with out - in = relation - 2 (0 = two residues back, 2 = self loop, 4 = two
  ahead; never across chains), 5 spatial (C-alpha distance < 10 A), 6 k-nearest neighbour
  (out's 10 nearest residues). Spatial and KNN edges need |in - out| >= 5 in the residue list.
- Edge features (59): one-hot(type of in, 20) | one-hot(type of out, 20) | one-hot(relation, 7) |
  one-hot(min(|in - out|, 10), 11) | C-alpha distance. Unknown residues count as glycine here,
  because torchdrug stores them as glycine in `residue_type` (its node one-hot still says unknown).
- Neighbour searches follow torch_cluster's brute-force (GPU) kernels: radius_graph keeps, for each
  `out` residue, the first 33 residues in index order within the radius (itself included) and then
  drops the self loop, so at most 32 (33 if 33 lower-index residues come first); knn_graph takes
  the k + 1 nearest with ties broken by lower index, then drops the self loop. torch_cluster's CPU
  kernels visit points in KD-tree order instead; the two agree unless a residue has more than 32
  neighbours within 10 A or distances tie exactly.
- The line graph (GearNet-Edge's edge message passing) links edge a = (k -> j) to edge b = (j -> i)
  for every pair meeting at j (reverse edges and self loops included), with relation
  floor(angle(i - j, k - j) / pi * 8); a zero vector gives angle 0.

Structure reading follows what torchdrug sees through RDKit, with deliberate differences: residues
are keyed by (chain, number, insertion code), not (number, insertion code, name); modified amino acids
(MSE, SEP, KCX, ...: MODIFIED_RESIDUES) are read as their parent residue in ATOM and HETATM records alike
(torchdrug treats them as glycine / unknown), other HETATM amino acids (backbone N, CA, C) as unknown
('X', index 20, as torchdrug), and a HETATM 'CA' without backbone (a calcium ion) is no node. Alternate
locations as RDKit: ' ', 'A' or '1' only, whatever the occupancy. Unknown residue names in ATOM records
become index 20 and 'X' in the sequence. Every remapped, unknown or dropped residue is counted in the
"report" of read_structure; a non-finite C-alpha coordinate is a StructureError naming the atom.
"""
import gzip
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# torchdrug's residue vocabulary (data.Protein.residue2id); index 20 is "unknown".
RESIDUES = ["GLY", "ALA", "SER", "PRO", "VAL", "THR", "CYS", "ILE", "LEU", "ASN",
            "ASP", "GLN", "LYS", "GLU", "MET", "HIS", "PHE", "ARG", "TYR", "TRP"]
RESIDUE_LETTERS = "GASPVTCILNDQKEMHFRYW"
RESIDUE_INDEX = {name: i for i, name in enumerate(RESIDUES)}
UNKNOWN = len(RESIDUES)  # 20
# Modified amino acids, read as their parent residue (PDB's parent component) in ATOM and HETATM records
# alike. torchdrug keeps RDKit's residue name and treats every name outside its 20 as glycine / unknown;
# the kit keeps the parent, so that the sequence matches the FASTA / SEQRES (MSE is M there).
MODIFIED_RESIDUES = {"MSE": "MET", "SEP": "SER", "TPO": "THR", "PTR": "TYR", "CSO": "CYS",
                     "MLY": "LYS", "HYP": "PRO", "KCX": "LYS", "LLP": "LYS", "M3L": "LYS", "CME": "CYS",
                     "CSD": "CYS", "OCS": "CYS", "PCA": "GLU"}
# alternate locations kept: RDKit's PDB reader (torchdrug's; PDBParser.cpp, PDBAtomLine) skips atoms whose
# altloc is not ' ', 'A' or '1', whatever their occupancy; the first such C-alpha of a residue wins
KEPT_ALTLOCS = ("", "A", "1")

# GraphConstruction / GearNet-Edge hyper-parameters (SPEC: Uni-modal encoders, Structure).
SEQUENTIAL_MAX_DISTANCE = 2
SPATIAL_RADIUS = 10.0
RADIUS_MAX_NEIGHBORS = 32  # torch_cluster.radius_graph default, used by torchdrug's SpatialEdge
KNN_K = 10
MIN_SEQUENCE_DISTANCE = 5
MAX_SEQUENCE_DISTANCE_FEATURE = 10
NUM_RELATION = 2 * SEQUENTIAL_MAX_DISTANCE + 3  # 5 sequential + spatial + knn = 7
EDGE_FEATURE_DIM = 2 * len(RESIDUES) + NUM_RELATION + MAX_SEQUENCE_DISTANCE_FEATURE + 2  # 59
SAME_POSITION_EPS = 1e-10


class StructureError(ValueError):
    """A structure file without a usable protein chain; the message names the file."""


# ----------------------------------------------------------------------------- reading files

def _open_text(path):
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt")
    return open(path)


def _pdb_atoms(lines):
    """Atom records of the first model of a PDB file, as tuples
    (hetero, atom_name, residue_name, chain, number, insertion_code, altloc, x, y, z)."""
    for line in lines:
        record = line[:6]
        if record == "ENDMDL":
            return
        if record not in ("ATOM  ", "HETATM"):
            continue
        yield (record == "HETATM", line[12:16].strip(), line[17:20].strip(), line[21],
               line[22:26].strip(), line[26].strip(), line[16].strip(), float(line[30:38]),
               float(line[38:46]), float(line[46:54]))


_CIF_TOKEN = re.compile(r"""'(?:[^']|'(?=\S))*'|"(?:[^"]|"(?=\S))*"|\S+""")


def _cif_tokens(line):
    return [t[1:-1] if t[0] in "'\"" else t for t in _CIF_TOKEN.findall(line)]


# _atom_site columns the reader needs: any one name of each group
CIF_REQUIRED = (("Cartn_x",), ("Cartn_y",), ("Cartn_z",), ("auth_atom_id", "label_atom_id"),
                ("auth_comp_id", "label_comp_id"), ("auth_asym_id", "label_asym_id"),
                ("auth_seq_id", "label_seq_id"))


def _cif_atoms(lines):
    """Atom records of the first model of an mmCIF file (the _atom_site loop), same tuples as
    `_pdb_atoms` (altloc from label_alt_id). Author chain/number/name fields are preferred, as in PDB files. A loop without
    the columns of CIF_REQUIRED, or whose values do not fill whole rows (a file cut mid-row), is a
    StructureError (the caller adds the file name)."""
    columns, rows, in_loop = [], [], False
    for line in lines:
        if line.startswith("_atom_site."):
            columns.append(line.split(".", 1)[1].split()[0])
            in_loop = True
        elif in_loop and columns:
            if line.startswith(("_", "loop_", "#", "data_")):
                break
            rows.extend(_cif_tokens(line))
    if not columns:
        return
    col = {name: i for i, name in enumerate(columns)}
    missing = [" or ".join(names) for names in CIF_REQUIRED if not any(n in col for n in names)]
    if missing:
        raise StructureError(f"the _atom_site loop has no {', '.join(missing)} column")
    if len(rows) % len(columns):
        raise StructureError(f"the _atom_site loop ends mid-row ({len(rows) % len(columns)} of "
                             f"{len(columns)} values in its last row): the file is cut short")

    def pick(row, *names):
        for name in names:
            if name in col and row[col[name]] not in ("?", "."):
                return row[col[name]]
        return ""

    first_model = None
    for start in range(0, len(rows), len(columns)):
        row = rows[start:start + len(columns)]
        model = pick(row, "pdbx_PDB_model_num")
        first_model = model if first_model is None else first_model
        if model != first_model:
            return
        yield (pick(row, "group_PDB") == "HETATM", pick(row, "auth_atom_id", "label_atom_id"),
               pick(row, "auth_comp_id", "label_comp_id"),
               pick(row, "auth_asym_id", "label_asym_id"), pick(row, "auth_seq_id", "label_seq_id"),
               pick(row, "pdbx_PDB_ins_code"), pick(row, "label_alt_id"), float(row[col["Cartn_x"]]),
               float(row[col["Cartn_y"]]), float(row[col["Cartn_z"]]))


def _is_cif(path, first_line):
    name = Path(path).name.lower().removesuffix(".gz")
    return name.endswith((".cif", ".mmcif")) or first_line.startswith("data_")


def _collect_residues(atoms, chain):
    """{(chain, number, insertion code): {name, hetero, ca, atoms}} in file order, and the ids of residues
    met again after other residues (a chain id used twice: the second copy is not read). The C-alpha is the
    first one with a kept alternate location (KEPT_ALTLOCS); a non-finite coordinate is a StructureError
    naming the atom."""
    residues, repeated, last, fresh = {}, Counter(), None, True
    for hetero, atom, name, chain_id, number, icode, altloc, x, y, z in atoms:
        if chain is not None and chain_id != chain:
            continue
        key = (chain_id, number, icode)
        if key != last:
            fresh, last = key not in residues, key
            if not fresh:
                repeated[key] += 1
        if not fresh:
            continue
        r = residues.setdefault(key, {"name": name, "hetero": hetero, "ca": None, "atoms": set(), "alt": False})
        r["atoms"].add(atom)
        if atom != "CA":
            continue
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            raise StructureError(f"atom CA of {name} {chain_id}:{number}{icode} has a non-finite coordinate "
                                 f"({x}, {y}, {z})")
        if altloc not in KEPT_ALTLOCS or r["ca"] is not None:
            r["alt"] = True  # another conformer's C-alpha: skipped
        else:
            r["ca"] = (x, y, z)
    return residues, repeated


def _protein_residues(residues, repeated):
    """[(key, residue name as read, C-alpha)] of the protein residues, and the report of what was
    remapped, read as unknown or dropped. A residue is a protein residue when it has a C-alpha and is an
    ATOM record, a known or modified amino acid, or a HETATM amino acid (backbone N, CA, C; torchdrug
    keeps those too); a HETATM 'CA' without backbone (a calcium ion) is no residue."""
    kept, remapped, unknown, dropped = [], Counter(), Counter(), Counter()
    for key, r in residues.items():
        name = r["name"]
        amino = (not r["hetero"] or name in RESIDUE_INDEX or name in MODIFIED_RESIDUES
                 or {"N", "CA", "C"} <= r["atoms"])
        if not amino:
            if r["ca"] is not None:
                dropped[f"{name} (HETATM, not an amino acid)"] += 1
            continue
        if r["ca"] is None:
            dropped[f"{name} without a C-alpha" + (" of a kept alternate location" if r["alt"] else "")] += 1
            continue
        if name in MODIFIED_RESIDUES:
            remapped[f"{name}->{MODIFIED_RESIDUES[name]}"] += 1
            name = MODIFIED_RESIDUES[name]
        elif name not in RESIDUE_INDEX:
            unknown[name] += 1
        kept.append((key, name, r["ca"]))
    if repeated:
        dropped["repeated residue id (its chain id is used twice)"] += sum(repeated.values())
    chains_in_order = [k[0] for k, _, _ in kept]
    runs = [c for i, c in enumerate(chains_in_order) if i == 0 or chains_in_order[i - 1] != c]
    twice = sorted({c for c in runs if runs.count(c) > 1} | {k[0] for k in repeated})
    report = {"remapped": dict(remapped), "unknown": dict(unknown), "dropped": dict(dropped),
              "alternates_skipped": sum(r["alt"] and r["ca"] is not None for r in residues.values()),
              "chain_ids_used_twice": twice}
    return kept, {k: v for k, v in report.items() if v}


def read_structure(path, chain=None, text=None):
    """Read the C-alpha trace of a PDB or mmCIF file (optionally .gz); `text` is the file's content
    when the caller has already read it (`path` then only names it in messages and tells the format).

    Returns dict(sequence=str, residue_type=[L] long (index 20 = unknown), ca=[L, 3] float32,
    residue_ids=["A:12", "A:12B", ...], chain="A" (several chains: "A,B"), chain_index=[L] long,
    report={remapped: {"MSE->MET": n}, unknown: {name: n}, dropped: {why: n}, alternates_skipped: n,
    chain_ids_used_twice: [...]}, only the entries that occurred).
    First model, alternate locations ' ', 'A' or '1' (as RDKit, torchdrug's reader), protein residues
    with a C-alpha atom only; `chain` keeps one chain. Raises StructureError naming the file when
    nothing is left or a C-alpha coordinate is not finite.
    """
    if text is None:
        with _open_text(path) as handle:
            text = handle.read()
    lines = text.splitlines()
    atoms = _cif_atoms(lines) if _is_cif(path, lines[0] if lines else "") else _pdb_atoms(lines)
    try:
        residues, repeated = _collect_residues(atoms, chain)
    except StructureError as error:
        raise StructureError(f"{path}: {error}") from None
    except (ValueError, IndexError) as error:
        raise StructureError(f"{path}: unreadable atom record ({error})") from None
    kept, report = _protein_residues(residues, repeated)
    if not kept:
        where = f" in chain {chain!r}" if chain is not None else ""
        raise StructureError(f"{path}: no protein residue with a C-alpha atom{where}")

    residue_type = [RESIDUE_INDEX.get(name, UNKNOWN) for _, name, _ in kept]
    chains = list(dict.fromkeys(k[0] for k, _, _ in kept))
    return {
        "sequence": "".join(RESIDUE_LETTERS[t] if t < UNKNOWN else "X" for t in residue_type),
        "residue_type": torch.tensor(residue_type, dtype=torch.long),
        "ca": torch.tensor([ca for _, _, ca in kept], dtype=torch.float32),
        "residue_ids": [f"{c}:{n}{i}" for (c, n, i), _, _ in kept],
        "chain": ",".join(chains),
        "chain_index": torch.tensor([chains.index(k[0]) for k, _, _ in kept], dtype=torch.long),
        "report": report,
    }


# ----------------------------------------------------------------------------- graph construction

def _squared_distances(ca, rows=slice(None)):
    """[len(rows), L] squared C-alpha distances of query rows to all residues, summed per
    coordinate as torch_cluster does (rows: a slice of query residues; all by default)."""
    diff = ca[None, :, :] - ca[rows, None, :]  # (q, L, 3): diff[q, n] = ca[n] - ca[q]
    return (diff * diff).sum(-1)


def _neighbour_pairs(ca, block_elements=2 ** 22):
    """(radius pairs, knn pairs) as (neighbour, query) tensors, from blocks of query rows so that
    memory is O(L * block) rather than O(L^2); results are identical to one [L, L] pass."""
    num_residue = len(ca)
    block = max(1, block_elements // max(num_residue, 1))
    radius, knn = [], []
    for start in range(0, num_residue, block):
        rows = slice(start, min(start + block, num_residue))
        dist2 = _squared_distances(ca, rows)  # (block, L)
        neighbour, query = _radius_pairs(dist2)
        radius.append((neighbour, query + start))
        neighbour, query = _knn_pairs(dist2)
        knn.append((neighbour, query + start))
    return tuple((torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
                 for pairs in (radius, knn))


def _sequential_edges(num_residue, chain_index):
    index = torch.arange(num_residue, device=chain_index.device)
    offsets = torch.arange(-SEQUENTIAL_MAX_DISTANCE, SEQUENTIAL_MAX_DISTANCE + 1, device=chain_index.device)
    node_in = index.repeat(len(offsets))              # (5 * L,)
    node_out = node_in + offsets.repeat_interleave(num_residue)
    relation = (offsets + SEQUENTIAL_MAX_DISTANCE).repeat_interleave(num_residue)
    keep = (node_out >= 0) & (node_out < num_residue)
    node_in, node_out, relation = node_in[keep], node_out[keep], relation[keep]
    keep = chain_index[node_in] == chain_index[node_out]
    return torch.stack([node_in[keep], node_out[keep], relation[keep]], dim=-1)


def _radius_pairs(dist2):
    """(neighbour, query) pairs of torch_cluster.radius_graph(r=10, max_num_neighbors=32)."""
    within = dist2 < SPATIAL_RADIUS ** 2  # (q, n); includes q itself
    rank = within.long().cumsum(dim=1)    # position of n among q's hits, in index order
    query, neighbour = (within & (rank <= RADIUS_MAX_NEIGHBORS + 1)).nonzero(as_tuple=True)
    return neighbour, query


def _knn_pairs(dist2):
    """(neighbour, query) pairs of torch_cluster.knn_graph(k=10); dist2 is [queries, L]."""
    k = min(KNN_K + 1, dist2.shape[1])
    # the k smallest per row, ties to the lower index (= dist2.argsort(dim=1, stable=True)[:, :k],
    # without sorting whole rows): candidates are entries <= the row's k-th smallest value
    kth = dist2.topk(k, dim=1, largest=False, sorted=True).values[:, -1:]  # (q, 1)
    query, neighbour = (dist2 <= kth).nonzero(as_tuple=True)  # row-major: index order per row
    order = dist2[query, neighbour].argsort(stable=True)
    order = order[query[order].argsort(stable=True)]  # by (query, distance, index)
    query, neighbour = query[order], neighbour[order]
    count = torch.bincount(query, minlength=len(dist2))
    rank = torch.arange(len(query), device=query.device) - (count.cumsum(0) - count).repeat_interleave(count)
    keep = rank < k
    return neighbour[keep], query[keep]


def _geometric_edges(neighbour, query, ca, relation):
    """Edges neighbour -> query without self loops, with |i - j| >= 5, at distinct positions."""
    keep = (neighbour != query) & ((neighbour - query).abs() >= MIN_SEQUENCE_DISTANCE)
    neighbour, query = neighbour[keep], query[keep]
    keep = (ca[neighbour] - ca[query]).norm(dim=-1) >= SAME_POSITION_EPS
    neighbour, query = neighbour[keep], query[keep]
    return torch.stack([neighbour, query, torch.full_like(query, relation)], dim=-1)


def edge_features(residue_type, ca, edge_list):
    """[E, 59] "gearnet" edge features of torchdrug's GraphConstruction (layout in module doc)."""
    node_in, node_out, relation = edge_list.unbind(-1)
    known_type = residue_type.masked_fill(residue_type >= UNKNOWN, RESIDUE_INDEX["GLY"])
    sequence_distance = (node_in - node_out).abs().clamp(max=MAX_SEQUENCE_DISTANCE_FEATURE)
    return torch.cat([
        F.one_hot(known_type[node_in], len(RESIDUES)).float(),
        F.one_hot(known_type[node_out], len(RESIDUES)).float(),
        F.one_hot(relation, NUM_RELATION).float(),
        F.one_hot(sequence_distance, MAX_SEQUENCE_DISTANCE_FEATURE + 1).float(),
        (ca[node_in] - ca[node_out]).norm(dim=-1, keepdim=True),
    ], dim=-1)  # (E, 20 + 20 + 7 + 11 + 1)


def build_graph(residue_type, ca, chain_index=None, device="cpu"):
    """torchdrug's GearNet graph of one protein: edge_list [E, 3] long (in, out, relation) and
    edge_feature [E, 59] float32, built on `device` (plain tensor ops: the same graph on a GPU, without
    the CPU's ~11 ms per protein). Edges are grouped by relation; the order within a group is not
    torchdrug's (which is not used anywhere: aggregation is a sum)."""
    ca = torch.as_tensor(ca, dtype=torch.float32).to(device)
    residue_type = torch.as_tensor(residue_type, dtype=torch.long).to(device)
    chain_index = torch.zeros(len(ca), dtype=torch.long) if chain_index is None else torch.as_tensor(chain_index)
    radius_pairs, knn_pairs = _neighbour_pairs(ca)
    edge_list = torch.cat([
        _sequential_edges(len(ca), chain_index.to(device)),
        _geometric_edges(*radius_pairs, ca, relation=NUM_RELATION - 2),
        _geometric_edges(*knn_pairs, ca, relation=NUM_RELATION - 1),
    ])  # (E, 3)
    return edge_list, edge_features(residue_type, ca, edge_list)


@dataclass
class ProteinGraph:
    """One protein or a batch of them as one block-diagonal graph (node ids offset per protein)."""
    node_input: torch.Tensor     # [N, 21] residue one-hot
    node_position: torch.Tensor  # [N, 3] C-alpha positions
    edge_list: torch.Tensor      # [E, 3] (in, out, relation)
    edge_feature: torch.Tensor   # [E, 59]
    num_nodes: torch.Tensor      # [B] residues per protein

    def to(self, device):
        return ProteinGraph(*(getattr(self, f.name).to(device) for f in fields(self)))


def protein_graph(residue_type, ca, chain_index=None, device="cpu"):
    """ProteinGraph of one protein from residue types [L] and C-alpha positions [L, 3], built on `device`."""
    residue_type = torch.as_tensor(residue_type, dtype=torch.long).to(device)
    ca = torch.as_tensor(ca, dtype=torch.float32).to(device)
    edge_list, edge_feature = build_graph(residue_type, ca, chain_index, device)
    return ProteinGraph(F.one_hot(residue_type, UNKNOWN + 1).float(), ca, edge_list, edge_feature,
                        torch.tensor([len(ca)], device=ca.device))


def pack_graphs(graphs):
    """Concatenate ProteinGraphs into one block-diagonal ProteinGraph."""
    num_nodes = torch.cat([g.num_nodes for g in graphs])
    node_offset = num_nodes.cumsum(0) - num_nodes  # first node of each graph
    edge_lists = []
    for graph, offset in zip(graphs, node_offset.tolist()):
        shift = torch.tensor([offset, offset, 0], device=graph.edge_list.device)
        edge_lists.append(graph.edge_list + shift)
    return ProteinGraph(torch.cat([g.node_input for g in graphs]),
                        torch.cat([g.node_position for g in graphs]),
                        torch.cat(edge_lists),  # (sum E, 3)
                        torch.cat([g.edge_feature for g in graphs]),
                        num_nodes)


def spatial_line_graph(edge_list, node_position, num_angle_bin):
    """Edges of torchdrug's SpatialLineGraph: [E_line, 3] (edge a, edge b, angle bin) for every
    a = (k -> j), b = (j -> i); the bin is floor(angle(i - j, k - j) / pi * num_angle_bin)."""
    node_in, node_out = edge_list[:, 0], edge_list[:, 1]
    num_node = len(node_position)
    out_degree = torch.bincount(node_in, minlength=num_node)
    outgoing = node_in.argsort(stable=True)              # edges grouped by their start node
    first_outgoing = out_degree.cumsum(0) - out_degree   # (N,) start of each group in `outgoing`
    count = out_degree[node_out]                         # (E,) edges b following each edge a
    edge_a = torch.arange(len(edge_list), device=edge_list.device).repeat_interleave(count)
    # rank of each pair among the pairs of its edge a: 0 .. count[a] - 1
    local = torch.arange(len(edge_a), device=edge_list.device)
    local = local - (count.cumsum(0) - count).repeat_interleave(count)
    edge_b = outgoing[first_outgoing[node_out[edge_a]] + local]  # (E_line,)

    j = node_out[edge_a]
    vector1 = node_position[node_out[edge_b]] - node_position[j]  # i - j, (E_line, 3)
    vector2 = node_position[node_in[edge_a]] - node_position[j]   # k - j, (E_line, 3)
    angle = torch.atan2(torch.linalg.cross(vector1, vector2).norm(dim=-1),
                        (vector1 * vector2).sum(-1))  # in [0, pi]
    # an angle of exactly pi would give bin num_angle_bin (torchdrug writes past the end): clamp
    relation = (angle / math.pi * num_angle_bin).long().clamp(max=num_angle_bin - 1)
    return torch.stack([edge_a, edge_b, relation], dim=-1)


# ----------------------------------------------------------------------------- model

def relational_adjacency(node_out, relation, source, num_node, num_relation, num_source,
                         dtype=torch.float32):
    """Sparse [num_node * num_relation, num_source] sum-aggregation matrix (CSR): entry
    (out * R + relation, source) counts the edges carrying source's state into slot (out, relation),
    so `adjacency @ x` viewed as [num_node, R * d] is the relation-major input of the relation
    linear layer (torchdrug's message_and_aggregate). Built once, reused by every layer."""
    row = node_out * num_relation + relation
    order = row.argsort(stable=True)
    counts = torch.bincount(row, minlength=num_node * num_relation)
    crow = torch.zeros(num_node * num_relation + 1, dtype=torch.long, device=row.device)
    crow[1:] = counts.cumsum(0)
    values = torch.ones(len(row), dtype=dtype, device=row.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, source[order], values,
                                       size=(num_node * num_relation, num_source),
                                       check_invariants=False)


def aggregate(x, adjacency, num_node, num_relation, buffer=None):
    """Sum of the messages into slots (out, relation): [num_node, num_relation * d], relation-major.
    `buffer` (optional, flat, CPU) is scratch memory for the result when no gradient is recorded:
    reusing it across layers spares the allocator a fresh multi-MB block (and its page faults)."""
    if adjacency.dtype != x.dtype:
        adjacency = adjacency.to(x.dtype)
    x = x.contiguous()
    shape = (adjacency.shape[0], x.shape[-1])
    if (buffer is not None and buffer.dtype == x.dtype and buffer.device == x.device
            and buffer.numel() >= shape[0] * shape[1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        update = torch.mm(adjacency, x, out=buffer[:shape[0] * shape[1]].view(shape))
    else:
        update = torch.sparse.mm(adjacency, x)
    return update.view(num_node, num_relation * x.shape[-1])


def node_adjacency(edge_list, num_node, num_relation, dtype=torch.float32):
    """Node states x[in] -> slot (out, relation)."""
    node_in, node_out, relation = edge_list.unbind(-1)
    return relational_adjacency(node_out, relation, node_in, num_node, num_relation, num_node, dtype)


def edge_to_node_adjacency(edge_list, num_node, num_relation, dtype=torch.float32):
    """Edge states x[e] -> slot (out_e, relation_e)."""
    _, node_out, relation = edge_list.unbind(-1)
    edge = torch.arange(len(edge_list), device=edge_list.device)
    return relational_adjacency(node_out, relation, edge, num_node, num_relation, len(edge_list),
                                dtype)


class RelationalConv(nn.Module):
    """torchdrug's GeometricRelationalGraphConv:
    relu(batch_norm(linear(sum of messages per relation) + self_loop(x)))."""

    def __init__(self, input_dim, output_dim, num_relation, batch_norm):
        super().__init__()
        self.num_relation = num_relation
        self.self_loop = nn.Linear(input_dim, output_dim)
        self.linear = nn.Linear(num_relation * input_dim, output_dim)
        self.batch_norm = nn.BatchNorm1d(output_dim) if batch_norm else None

    def forward(self, x, adjacency, buffer=None):
        """adjacency: node_adjacency(edge_list, len(x), num_relation) (or an edge list, built here);
        buffer: optional scratch memory for the aggregated messages (see `aggregate`)."""
        if not adjacency.is_sparse_csr:
            adjacency = node_adjacency(adjacency, len(x), self.num_relation, x.dtype)
        update = aggregate(x, adjacency, len(x), self.num_relation, buffer)  # (N, R * d_in)
        output = self.linear(update) + self.self_loop(x)
        if self.batch_norm is not None:
            output = self.batch_norm(output)
        return F.relu(output)


@dataclass
class GearNetConfig:
    input_dim: int = UNKNOWN + 1
    hidden_dims: tuple = (512,) * 6
    num_relation: int = NUM_RELATION
    edge_input_dim: int = EDGE_FEATURE_DIM
    num_angle_bin: int = 8        # 0: plain GearNet, no edge message passing
    short_cut: bool = True
    batch_norm: bool = True
    concat_hidden: bool = True
    readout: str = "sum"          # "sum" or "mean"


class GearNetEdge(nn.Module):
    """torchdrug's models.GearNet (GearNet-Edge when num_angle_bin > 0), same state_dict keys."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or GearNetConfig()
        dims = [config.input_dim, *config.hidden_dims]
        edge_dims = [config.edge_input_dim, *dims[:-1]]
        self.layers = nn.ModuleList(
            RelationalConv(dims[i], dims[i + 1], config.num_relation, config.batch_norm)
            for i in range(len(config.hidden_dims)))
        if config.num_angle_bin:
            self.edge_layers = nn.ModuleList(
                RelationalConv(edge_dims[i], edge_dims[i + 1], config.num_angle_bin,
                               config.batch_norm)
                for i in range(len(config.hidden_dims)))
        if config.batch_norm:
            self.batch_norms = nn.ModuleList(nn.BatchNorm1d(d) for d in config.hidden_dims)
        hidden_dims = config.hidden_dims
        self.output_dim = sum(hidden_dims) if config.concat_hidden else hidden_dims[-1]

    @classmethod
    def from_state_dict(cls, state_dict, **overrides):
        """Build from a torchdrug GearNet state_dict, reading the sizes from tensor shapes, and
        load it strictly. short_cut / concat_hidden / readout leave no trace in the weights:
        GearNet-Edge's values are the defaults, `overrides` changes them."""
        n_layers = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})
        input_dim = state_dict["layers.0.self_loop.weight"].shape[1]
        config = dict(
            input_dim=input_dim,
            hidden_dims=tuple(state_dict[f"layers.{i}.self_loop.weight"].shape[0]
                              for i in range(n_layers)),
            num_relation=state_dict["layers.0.linear.weight"].shape[1] // input_dim,
            batch_norm="batch_norms.0.weight" in state_dict,
            num_angle_bin=0,
        )
        if "edge_layers.0.self_loop.weight" in state_dict:
            edge_input_dim = state_dict["edge_layers.0.self_loop.weight"].shape[1]
            num_angle_bin = state_dict["edge_layers.0.linear.weight"].shape[1] // edge_input_dim
            config.update(edge_input_dim=edge_input_dim, num_angle_bin=num_angle_bin)
        config.update(overrides)
        model = cls(GearNetConfig(**config))
        model.load_state_dict(state_dict)
        return model.eval()

    def forward(self, graph):
        """node_feature [N, output_dim] and graph_feature [B, output_dim] of a ProteinGraph."""
        config = self.config
        x = graph.node_input.float()
        num_node = len(x)
        adjacency = node_adjacency(graph.edge_list, num_node, config.num_relation, x.dtype)
        if config.num_angle_bin:
            line_edges = spatial_line_graph(graph.edge_list, graph.node_position,
                                            config.num_angle_bin)  # (E_line, 3)
            num_edge = len(graph.edge_list)
            # line graph: edge state a -> slot (edge b, angle bin)
            line_adjacency = relational_adjacency(line_edges[:, 1], line_edges[:, 2], line_edges[:, 0],
                                                  num_edge, config.num_angle_bin, num_edge, x.dtype)
            del line_edges
            edge_adjacency = edge_to_node_adjacency(graph.edge_list, num_node, config.num_relation,
                                                    x.dtype)
            edge_x = graph.edge_feature.float()
            line_buffer = None
            if x.device.type == "cpu" and not torch.is_grad_enabled():
                width = max(config.edge_input_dim, *config.hidden_dims[:-1])
                line_buffer = x.new_empty(num_edge * config.num_angle_bin * width)
        hiddens = []
        for i, layer in enumerate(self.layers):
            hidden = layer(x, adjacency)
            if config.short_cut and hidden.shape == x.shape:
                hidden = hidden + x
            if config.num_angle_bin:
                edge_x = self.edge_layers[i](edge_x, line_adjacency, line_buffer)
                # edge states flow to the `out` node of their edge, one slot per relation
                update = aggregate(edge_x, edge_adjacency, num_node, config.num_relation)  # (N, R * d_edge)
                hidden = hidden + F.relu(layer.linear(update))
            if config.batch_norm:
                hidden = self.batch_norms[i](hidden)
            hiddens.append(hidden)
            x = hidden
        node_feature = torch.cat(hiddens, dim=-1) if config.concat_hidden else hiddens[-1]  # (N, d)
        batch_size = len(graph.num_nodes)
        node2graph = torch.arange(batch_size, device=x.device).repeat_interleave(graph.num_nodes)
        graph_feature = node_feature.new_zeros(batch_size, node_feature.shape[-1])
        graph_feature.index_add_(0, node2graph, node_feature)  # (B, d)
        if config.readout == "mean":
            graph_feature = graph_feature / graph.num_nodes[:, None].clamp(min=1)
        return node_feature, graph_feature


def _random_chain(num_residue, generator):
    """A random walk of 3.8 A steps (about a protein's C-alpha density), random residue types."""
    step = torch.randn(num_residue, 3, generator=generator)
    ca = (3.8 * step / step.norm(dim=-1, keepdim=True)).cumsum(0)  # (L, 3)
    return torch.randint(len(RESIDUES), (num_residue,), generator=generator), ca


def tiny_gearnet(seed=0, hidden_dims=(32,) * 6):
    """GearNet-Edge with random weights and small hidden sizes ([32] * 6 -> 192 features), for
    offline tests and demos. Batch-norm statistics are set from one pass over a random chain,
    so features stay near unit scale (float16-safe). The global random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GearNetEdge(GearNetConfig(hidden_dims=tuple(hidden_dims)))
    graph = protein_graph(*_random_chain(128, torch.Generator().manual_seed(seed)))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for norm in norms:
        norm.momentum = None  # running stats = plain average over the calibration pass
    model.train()
    with torch.no_grad():
        model(graph)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


@torch.no_grad()
def encode_structures(model, structures, graph_device=None):
    """Per-residue features [L_i, d] (float32, CPU) of several proteins in one batched pass, their graphs
    built on graph_device (default: the model's). Each structure is a path or a read_structure dict.
    Puts the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    graphs = []
    for s in structures:
        s = read_structure(s) if isinstance(s, (str, Path)) else s
        graphs.append(protein_graph(s["residue_type"], s["ca"], s.get("chain_index"), graph_device or device))
    graph = pack_graphs(graphs).to(device)
    node_feature, _ = model(graph)
    return list(node_feature.float().cpu().split(graph.num_nodes.tolist()))


def encode_structure(model, structure):
    """Per-residue features [L, d] of one protein (a path or a read_structure dict)."""
    return encode_structures(model, [structure])[0]
