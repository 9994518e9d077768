"""gearnet.py: structure reading, torchdrug's graph, and GearNet-Edge against torchdrug's outputs.

    python -m pytest tests/test_gearnet.py -q
"""
import gzip
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import gearnet

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "gearnet_torchdrug.pt"
PDB_DIR = SHARED / "data" / "pdb"
needs_shared = pytest.mark.skipif(
    not GOLDEN.exists(),
    reason="../shared not found: golden torchdrug GearNet outputs only exist in the dev checkout")


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


# ----------------------------------------------------------------------------- helpers

def atom_line(serial, name, resname, chain, number, xyz, altloc=" ", icode=" ", record="ATOM"):
    """One PDB ATOM/HETATM record in fixed columns."""
    x, y, z = xyz
    return (f"{record:<6}{serial:>5} {name:<4}{altloc}{resname:>3} {chain}{number:>4}{icode}   "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{0.0:6.2f}          {name[0]:>2}")


def residue_lines(start_serial, resname, chain, number, ca, with_ca=True, **kwargs):
    """N, CA, C atoms of one residue around the C-alpha position `ca`."""
    names = ["N", "CA", "C"] if with_ca else ["N", "C"]
    offsets = {"N": (-1.2, 0.5, 0.0), "CA": (0.0, 0.0, 0.0), "C": (1.2, 0.5, 0.0)}
    return [atom_line(start_serial + i, n, resname, chain, number,
                      [c + o for c, o in zip(ca, offsets[n])], **kwargs) for i, n in enumerate(names)]


def pdb_to_mmcif(pdb_text):
    """mmCIF _atom_site loop with the same atoms as the PDB text (all models)."""
    columns = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id",
               "label_asym_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z",
               "occupancy", "B_iso_or_equiv", "auth_seq_id", "auth_comp_id", "auth_asym_id",
               "auth_atom_id", "pdbx_PDB_model_num"]
    rows, model = [], "1"
    for line in pdb_text.splitlines():
        if line.startswith("MODEL"):
            model = line.split()[1]
        if not line.startswith(("ATOM  ", "HETATM")):
            continue
        name, resname, chain = line[12:16].strip(), line[17:20].strip(), line[21]
        number, icode, altloc = line[22:26].strip(), line[26].strip() or "?", line[16].strip() or "."
        quoted = f'"{name}"' if "'" in name else name
        rows.append(" ".join([line[:6].strip(), line[6:11].strip(), name[0], quoted, altloc, resname,
                              chain, number, icode, line[30:38].strip(), line[38:46].strip(),
                              line[46:54].strip(), "1.00", "0.00", number, resname, chain, quoted,
                              model]))
    header = ["data_test", "#", "loop_"] + [f"_atom_site.{c}" for c in columns]
    return "\n".join(header + rows + ["#", ""])


def write(path, pdb_text):
    """Write PDB text to path: as mmCIF when the name has .cif, gzipped when it ends in .gz."""
    text = pdb_to_mmcif(pdb_text) if ".cif" in path.name else pdb_text
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def chain_text():
    """A small chain exercising the reader: altlocs, a residue without CA, HETATM entries."""
    lines = []
    lines += residue_lines(1, "MET", "A", 1, (0.0, 0.0, 0.0))
    lines += residue_lines(4, "SER", "A", 2, (3.8, 0.0, 0.0), altloc="A")          # kept
    lines += residue_lines(7, "SER", "A", 2, (9.0, 9.0, 9.0), altloc="B")          # skipped
    lines += residue_lines(10, "GLY", "A", 3, (7.6, 0.0, 0.0), with_ca=False)      # no CA: dropped
    lines += residue_lines(12, "XYZ", "A", 4, (11.4, 0.0, 0.0))                    # unknown -> X
    lines += residue_lines(15, "MSE", "A", 5, (15.2, 0.0, 0.0), record="HETATM")   # -> M
    lines += residue_lines(18, "LYS", "A", 5, (19.0, 0.0, 0.0), icode="A")         # insertion code
    lines.append(atom_line(21, "CA", "CA", "A", 101, (30.0, 0.0, 0.0), record="HETATM"))  # calcium
    lines.append(atom_line(22, "O", "HOH", "A", 102, (31.0, 0.0, 0.0), record="HETATM"))
    lines += residue_lines(23, "TRP", "B", 1, (0.0, 5.0, 0.0))
    return "\n".join(lines) + "\nEND\n"


EXPECTED_SEQUENCE = "MSXMKW"
EXPECTED_CA = [[0.0, 0.0, 0.0], [3.8, 0.0, 0.0], [11.4, 0.0, 0.0], [15.2, 0.0, 0.0],
               [19.0, 0.0, 0.0], [0.0, 5.0, 0.0]]


def edge_keys(edge_list):
    return sorted(map(tuple, edge_list.tolist()))


# ----------------------------------------------------------------------------- against torchdrug

@needs_shared
def test_read_structure_matches_torchdrug(golden):
    for case in golden["cases"]:
        structure = gearnet.read_structure(PDB_DIR / case["file"])
        assert structure["sequence"] == case["sequence"], case["file"]
        assert torch.equal(structure["ca"], case["node_position"]), case["file"]
        node_input = F.one_hot(structure["residue_type"], 21).float()
        assert torch.equal(node_input, case["node_input"]), case["file"]


@needs_shared
def test_build_graph_matches_torchdrug(golden):
    for case in golden["cases"]:
        structure = gearnet.read_structure(PDB_DIR / case["file"])
        edge_list, edge_feature = gearnet.build_graph(structure["residue_type"], structure["ca"])
        assert edge_keys(edge_list) == edge_keys(case["edge_list"]), case["file"]
        # sort both by (in, out, relation) and compare the features triple by triple
        def order(e):
            return (e[:, 0] * len(structure["ca"]) + e[:, 1]) * gearnet.NUM_RELATION + e[:, 2]
        ours = edge_feature[order(edge_list).argsort()]
        theirs = case["edge_feature"][order(case["edge_list"]).argsort()]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=case["file"])


@needs_shared
def test_gearnet_edge_matches_torchdrug(golden):
    model = gearnet.GearNetEdge.from_state_dict(golden["state_dict"])
    assert model.config.hidden_dims == tuple(golden["config"]["hidden_dims"])
    diffs = {}
    for case in golden["cases"]:
        structure = gearnet.read_structure(PDB_DIR / case["file"])
        with torch.no_grad():
            node_feature, graph_feature = model(gearnet.protein_graph(structure["residue_type"],
                                                                      structure["ca"]))
        diffs[case["file"]] = (node_feature - case["node_feature"]).abs().max().item()
        torch.testing.assert_close(node_feature, case["node_feature"], atol=1e-4, rtol=1e-5,
                                   msg=case["file"])
        torch.testing.assert_close(graph_feature, case["graph_feature"], atol=1e-3, rtol=1e-5,
                                   msg=case["file"])
    print("max |node_feature - torchdrug|:", diffs)


@needs_shared
def test_batched_forward_matches_torchdrug(golden):
    model = gearnet.GearNetEdge.from_state_dict(golden["state_dict"])
    cases = sorted(golden["cases"], key=lambda c: c["num_residue"])[:2]  # the two smallest
    features = gearnet.encode_structures(model, [PDB_DIR / c["file"] for c in cases])
    for ours, case in zip(features, cases):
        torch.testing.assert_close(ours, case["node_feature"], atol=1e-4, rtol=1e-5, msg=case["file"])


@needs_shared
def test_state_dict_keys_match_torchdrug(golden):
    config = gearnet.GearNetConfig(hidden_dims=tuple(golden["config"]["hidden_dims"]))
    model = gearnet.GearNetEdge(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in golden["state_dict"].items()}


@needs_shared
def test_mmcif_of_golden_file_matches_pdb(tmp_path):
    pdb = PDB_DIR / "1AKI-A.pdb"
    cif = write(tmp_path / "1AKI-A.cif.gz", pdb.read_text())
    from_pdb, from_cif = gearnet.read_structure(pdb), gearnet.read_structure(cif)
    assert from_cif["sequence"] == from_pdb["sequence"]
    assert from_cif["residue_ids"] == from_pdb["residue_ids"]
    assert torch.equal(from_cif["ca"], from_pdb["ca"])


# ----------------------------------------------------------------------------- reading files

@pytest.mark.parametrize("name", ["chain.pdb", "chain.pdb.gz", "chain.cif", "chain.cif.gz",
                                  "AF-P00000-F1-model_v4.pdb.gz"])
def test_read_structure_edge_cases(tmp_path, name):
    structure = gearnet.read_structure(write(tmp_path / name, chain_text()))
    assert structure["sequence"] == EXPECTED_SEQUENCE
    assert torch.equal(structure["ca"], torch.tensor(EXPECTED_CA))
    assert structure["residue_type"].tolist() == [14, 2, 20, 14, 12, 19]
    assert structure["residue_ids"] == ["A:1", "A:2", "A:4", "A:5", "A:5A", "B:1"]
    assert structure["chain"] == "A,B"
    assert structure["chain_index"].tolist() == [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("drop", ["_atom_site.Cartn_x", "_atom_site.auth_atom_id"])
def test_mmcif_without_a_needed_column_is_a_structure_error(tmp_path, drop):
    """A loop without a coordinate column used to escape as KeyError; without both atom-name columns it
    silently gave no residue. Now: a StructureError naming the file and the column."""
    lines = pdb_to_mmcif(chain_text()).splitlines()
    if drop == "_atom_site.auth_atom_id":
        lines = [x for x in lines if x != "_atom_site.label_atom_id"]
        lines = [x if x.startswith(("_", "#", "data", "loop")) else " ".join(x.split()[:3] + x.split()[4:])
                 for x in lines]
    path = tmp_path / "x.cif"
    path.write_text("\n".join(x for x in lines if x != drop) + "\n")
    with pytest.raises(gearnet.StructureError, match=f"x.cif: the _atom_site loop has no .*{drop.split('.')[1]}"):
        gearnet.read_structure(path)


def test_mmcif_cut_mid_row_is_a_structure_error(tmp_path):
    """A file cut inside a row of the atom loop used to give a silently shorter chain."""
    text = pdb_to_mmcif(chain_text())
    path = tmp_path / "cut.cif"
    path.write_text(text[: text.index("\nHETATM 21 ") + 12])
    with pytest.raises(gearnet.StructureError, match="cut.cif: the _atom_site loop ends mid-row"):
        gearnet.read_structure(path)
    rows = [x for x in text.splitlines() if x.startswith(("ATOM", "HETATM"))]
    whole = text[: text.index(rows[4]) + len(rows[4])]                          # cut after a whole row: read
    path.write_text(whole)
    assert gearnet.read_structure(path)["sequence"] == "MS"


def test_read_structure_from_text(tmp_path):
    """text= (the caller already read the file, e.g. from a tar archive) gives what the file gives."""
    path = write(tmp_path / "chain.cif", chain_text())
    from_file = gearnet.read_structure(path)
    from_text = gearnet.read_structure("archive.tar::chain.cif", text=path.read_text())
    assert from_text["sequence"] == from_file["sequence"] and torch.equal(from_text["ca"], from_file["ca"])


def test_read_structure_chain_selection(tmp_path):
    path = write(tmp_path / "chain.pdb", chain_text())
    assert gearnet.read_structure(path, chain="B")["sequence"] == "W"
    with pytest.raises(gearnet.StructureError, match="chain.pdb"):
        gearnet.read_structure(path, chain="C")


@pytest.mark.parametrize("name", ["models.pdb", "models.cif"])
def test_first_model_only(tmp_path, name):
    first = residue_lines(1, "ALA", "A", 1, (0.0, 0.0, 0.0))
    first += residue_lines(4, "GLY", "A", 2, (3.8, 0.0, 0.0))
    second = residue_lines(1, "ALA", "A", 1, (5.0, 5.0, 5.0))
    second += residue_lines(4, "GLY", "A", 2, (9.0, 9.0, 9.0))
    second += residue_lines(7, "TRP", "A", 3, (12.0, 9.0, 9.0))
    text = "\n".join(["MODEL        1", *first, "ENDMDL", "MODEL        2", *second, "ENDMDL", "END"])
    structure = gearnet.read_structure(write(tmp_path / name, text))
    assert structure["sequence"] == "AG"
    assert torch.equal(structure["ca"], torch.tensor([[0.0, 0.0, 0.0], [3.8, 0.0, 0.0]]))


@pytest.mark.parametrize("lines", [
    residue_lines(1, "ALA", "A", 1, (0.0, 0.0, 0.0), with_ca=False),               # no CA
    [atom_line(1, "O", "HOH", "A", 1, (0.0, 0.0, 0.0), record="HETATM"),
     atom_line(2, "CA", "CA", "A", 2, (1.0, 0.0, 0.0), record="HETATM")],           # no protein
    [],                                                                             # empty file
])
def test_no_c_alpha_raises_naming_the_file(tmp_path, lines):
    path = write(tmp_path / "empty_chain.pdb", "\n".join(lines + ["END", ""]))
    with pytest.raises(gearnet.StructureError, match="empty_chain.pdb") as info:
        gearnet.read_structure(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- graph construction

def test_sequential_edges_and_relations():
    ca = torch.arange(8, dtype=torch.float32)[:, None] * torch.tensor([20.0, 0.0, 0.0])  # far apart
    chain_index = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    edge_list, edge_feature = gearnet.build_graph(torch.zeros(8, dtype=torch.long), ca, chain_index)
    expected = [(i, j, j - i + 2) for i in range(8) for j in range(8)
                if abs(i - j) <= 2 and chain_index[i] == chain_index[j]]
    assert edge_keys(edge_list[edge_list[:, 2] < 5]) == sorted(expected)  # KNN edges also exist
    assert edge_feature.shape == (len(edge_list), 59)
    relation = edge_feature[:, 40:47].argmax(-1)
    assert torch.equal(relation, edge_list[:, 2])
    assert torch.equal(edge_feature[:, -1], (ca[edge_list[:, 0]] - ca[edge_list[:, 1]]).norm(dim=-1))


def test_radius_keeps_first_33_by_index_like_torch_cluster():
    generator = torch.Generator().manual_seed(0)
    ca = torch.randn(50, 3, generator=generator)  # all 50 within 10 A of each other
    edge_list, _ = gearnet.build_graph(torch.zeros(50, dtype=torch.long), ca)
    spatial = edge_list[edge_list[:, 2] == 5]
    into = lambda q: sorted(spatial[spatial[:, 1] == q, 0].tolist())
    # query 0: itself + residues 1..32 are the first 33 hits; 1..4 are too close in sequence
    assert into(0) == list(range(5, 33))
    # query 40: residues 0..32 come before itself, so 33 neighbours stay
    assert into(40) == list(range(0, 33))


def test_knn_ties_go_to_the_lower_index():
    ca = torch.zeros(32, 3)
    ca[:31, 0] = torch.arange(31, dtype=torch.float32)  # a line, 1 A apart
    ca[31] = torch.tensor([15.0, 5.0, 0.0])              # 5 A from residue 15, like 10 and 20
    edge_list, _ = gearnet.build_graph(torch.zeros(32, dtype=torch.long), ca)
    knn = edge_list[edge_list[:, 2] == 6]
    # residue 15's 11 nearest: itself, 14/16 ... 11/19, then two of {10, 20, 31} at 5 A
    assert sorted(knn[knn[:, 1] == 15, 0].tolist()) == [10, 20]


def test_graph_excludes_self_loops_and_duplicate_positions():
    ca = torch.randn(40, 3, generator=torch.Generator().manual_seed(1)) * 6
    ca[30] = ca[10]  # same position: no spatial/knn edge between them
    edge_list, _ = gearnet.build_graph(torch.zeros(40, dtype=torch.long), ca)
    geometric = edge_list[edge_list[:, 2] >= 5]
    assert (geometric[:, 0] != geometric[:, 1]).all()
    assert ((geometric[:, 0] - geometric[:, 1]).abs() >= 5).all()
    pairs = set(map(tuple, geometric[:, :2].tolist()))
    assert (10, 30) not in pairs and (30, 10) not in pairs
    assert len(set(edge_keys(edge_list))) == len(edge_list)


# ----------------------------------------------------------------------------- model

def random_protein(num_residue, seed):
    generator = torch.Generator().manual_seed(seed)
    step = torch.randn(num_residue, 3, generator=generator)
    ca = (3.8 * step / step.norm(dim=-1, keepdim=True)).cumsum(0)
    return torch.randint(21, (num_residue,), generator=generator), ca


def test_from_state_dict_infers_sizes_and_loads_strictly():
    source = gearnet.GearNetEdge(gearnet.GearNetConfig(hidden_dims=(16, 24, 8)))
    state_dict = source.state_dict()
    model = gearnet.GearNetEdge.from_state_dict(state_dict)
    assert model.config == source.config
    assert model.output_dim == 48 and not model.training
    with pytest.raises(RuntimeError):
        gearnet.GearNetEdge.from_state_dict({**state_dict, "extra.weight": torch.zeros(1)})
    missing = {k: v for k, v in state_dict.items() if k != "batch_norms.1.running_var"}
    with pytest.raises(RuntimeError):
        gearnet.GearNetEdge.from_state_dict(missing)
    config = gearnet.GearNetConfig(hidden_dims=(8, 8), num_angle_bin=0, batch_norm=False)
    plain = gearnet.GearNetEdge(config)
    assert gearnet.GearNetEdge.from_state_dict(plain.state_dict()).config == plain.config


def test_tiny_gearnet_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = gearnet.tiny_gearnet(seed=0), gearnet.tiny_gearnet(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    residue_type, ca = random_protein(60, seed=3)
    features = gearnet.encode_structure(a, {"residue_type": residue_type, "ca": ca})
    assert features.shape == (60, 192) and features.dtype == torch.float32
    assert torch.isfinite(features.half()).all()


def test_edge_order_and_batching_do_not_change_features():
    model = gearnet.tiny_gearnet(seed=1, hidden_dims=(16,) * 3)
    proteins = [random_protein(40, seed=4), random_protein(25, seed=5)]
    alone = [gearnet.encode_structure(model, {"residue_type": t, "ca": c}) for t, c in proteins]
    together = gearnet.encode_structures(model, [{"residue_type": t, "ca": c} for t, c in proteins])
    for x, y in zip(alone, together):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)

    graph = gearnet.protein_graph(*proteins[0])
    order = torch.randperm(len(graph.edge_list), generator=torch.Generator().manual_seed(0))
    shuffled = gearnet.ProteinGraph(graph.node_input, graph.node_position, graph.edge_list[order],
                                    graph.edge_feature[order], graph.num_nodes)
    with torch.no_grad():
        torch.testing.assert_close(model(graph)[0], model(shuffled)[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- issue 18: reading surprises

def test_non_finite_coordinate_names_the_atom(tmp_path):
    lines = residue_lines(1, "MET", "A", 1, (0.0, 0.0, 0.0)) + residue_lines(4, "SER", "A", 2, (3.8, 0.0, 0.0))
    lines[4] = lines[4][:30] + f"{'nan':>8}" + lines[4][38:]                  # the CA of A:2
    path = write(tmp_path / "nan.pdb", "\n".join(lines + ["END", ""]))
    with pytest.raises(gearnet.StructureError, match=r"nan.pdb: atom CA of SER A:2 has a non-finite coordinate"):
        gearnet.read_structure(path)


def test_modified_residues_are_mapped_and_counted(tmp_path):
    """MSE written as ATOM is M like HETATM MSE (was X); a HETATM KCX (carboxylysine) is kept as K (was
    dropped: L 3 -> 2); a HETATM amino acid outside the table is X; the calcium stays out, counted."""
    lines = residue_lines(1, "MSE", "A", 1, (0.0, 0.0, 0.0))                      # ATOM MSE
    lines += residue_lines(4, "KCX", "A", 2, (3.8, 0.0, 0.0), record="HETATM")
    lines += residue_lines(7, "ABC", "A", 3, (7.6, 0.0, 0.0), record="HETATM")    # unknown amino acid
    lines += residue_lines(10, "GLY", "A", 4, (11.4, 0.0, 0.0))
    lines.append(atom_line(13, "CA", "CA", "A", 101, (30.0, 0.0, 0.0), record="HETATM"))
    s = gearnet.read_structure(write(tmp_path / "mod.pdb", "\n".join(lines + ["END", ""])))
    assert s["sequence"] == "MKXG" and s["residue_type"].tolist() == [14, 12, 20, 0]
    assert s["report"]["remapped"] == {"MSE->MET": 1, "KCX->LYS": 1} and s["report"]["unknown"] == {"ABC": 1}
    assert s["report"]["dropped"] == {"CA (HETATM, not an amino acid)": 1}


def test_alternate_locations_as_rdkit_and_chain_ids_used_twice(tmp_path):
    """altloc A wins even when B is listed first with higher occupancy (RDKit, torchdrug's reader, keeps
    ' ', 'A', '1'); a chain id that comes back after another chain is reported, its repeated ids dropped."""
    lines = residue_lines(1, "MET", "A", 1, (0.0, 0.0, 0.0))
    lines += residue_lines(4, "SER", "A", 2, (9.0, 9.0, 9.0), altloc="B")
    lines += residue_lines(7, "SER", "A", 2, (3.8, 0.0, 0.0), altloc="A")
    lines += residue_lines(10, "TRP", "B", 1, (0.0, 5.0, 0.0))
    lines += residue_lines(13, "GLY", "A", 1, (0.0, 9.0, 0.0))                    # A:1 again
    lines += residue_lines(16, "GLY", "A", 7, (0.0, 12.0, 0.0))                   # A again, new number
    s = gearnet.read_structure(write(tmp_path / "alt.pdb", "\n".join(lines + ["END", ""])))
    assert s["sequence"] == "MSWG" and torch.equal(s["ca"][1], torch.tensor([3.8, 0.0, 0.0]))
    assert s["report"]["chain_ids_used_twice"] == ["A"] and s["report"]["alternates_skipped"] == 1
    assert s["report"]["dropped"] == {"repeated residue id (its chain id is used twice)": 1}
