"""The attention head, its batching and the neighbourhood graph."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from probe_ase import InputError
from probe_ase.model.graph import radius_graph
from probe_ase.model.head import HeadConfig, ProbeHead, batch_inputs
from probe_ase.model.layers import DENSE_MAX_ATOMS, EDGE_CHUNK, PADDED_MAX_ATOMS, segment_softmax

ELEMENTS = (1, 6, 8)


# --- segment_softmax ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_softmax_matches_per_group_softmax(seed):
    gen = torch.Generator().manual_seed(seed)
    size = 6
    index = torch.randint(0, size - 1, (40,), generator=gen)  # group size-1 stays empty
    scores = 3.0 * torch.randn(40, 3, generator=gen)
    out = segment_softmax(scores, index, size)
    assert out.shape == scores.shape
    for g in range(size):
        mask = index == g
        if mask.any():
            torch.testing.assert_close(out[mask], torch.softmax(scores[mask], dim=0), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(out).all()


def test_segment_softmax_hand_case_and_large_scores():
    scores = torch.tensor([[0.0], [0.0], [1000.0], [1000.0 + np.log(3.0)]], dtype=torch.float64)
    index = torch.tensor([1, 1, 0, 0])
    out = segment_softmax(scores, index, 2)
    # group 1: two equal scores -> 1/2 each; group 0: exp ratio 1:3 -> 1/4, 3/4 (no overflow)
    torch.testing.assert_close(out[:, 0], torch.tensor([0.5, 0.5, 0.25, 0.75], dtype=torch.float64))


# --- ProbeHead ------------------------------------------------------------------------------


def _structure(n_atoms: int, gen: torch.Generator):
    features = torch.randn(n_atoms, 8, generator=gen)
    numbers = torch.tensor(ELEMENTS)[torch.randint(0, len(ELEMENTS), (n_atoms,), generator=gen)]
    dense = torch.rand(n_atoms, n_atoms, generator=gen) < 0.5
    dense |= torch.eye(n_atoms, dtype=torch.bool)
    edges = dense.nonzero().T.contiguous()  # (dst, src) with self loops
    return features, numbers, edges


def _two_structures():
    gen = torch.Generator().manual_seed(7)
    s0, s1 = _structure(5, gen), _structure(7, gen)
    features = torch.cat([s0[0], s1[0]])
    numbers = torch.cat([s0[1], s1[1]])
    ptr = [0, 5, 12]
    return features, numbers, ptr, [s0[2], s1[2]]


VARIANTS = {
    "attention": {"aux_quantiles": ()},
    "aux": {"aux_quantiles": (0.5, 0.9)},
    "atom_logit": {"atom_logit": True},
    "atom_error": {"atom_error": True},
}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def _head(**variant):
    torch.manual_seed(0)
    head = ProbeHead(8, ELEMENTS, HeadConfig(hidden=16, heads=4, blocks=2, cutoff=3.0, **variant))
    features = torch.randn(50, 8) * 2 + 1
    head.set_standardisation(features.mean(0), features.std(0))
    return head.eval()


def test_batch_inputs_gathers_structures_in_the_order_asked():
    """Three structures of 2, 3 and 1 atoms; asking for [2, 0] gives structure 2's atom then structure 0's two, each
    graph shifted to its atoms' new rows, and each atom's place in the batch."""
    features = torch.arange(12.0).view(6, 2)
    numbers = torch.tensor([1, 6, 8, 1, 1, 6])
    ptr = np.array([0, 2, 5, 6])
    edges = [np.array([[0, 1, 0], [0, 1, 1]]), np.array([[0, 1, 2], [0, 1, 2]]), np.array([[0], [0]])]
    feats, nums, graph, owner, n = batch_inputs(features, numbers, ptr, edges, [2, 0])
    torch.testing.assert_close(feats, features[[5, 0, 1]])
    assert nums.tolist() == [6, 1, 6] and owner.tolist() == [0, 1, 1] and n == 2
    assert graph.dtype == torch.int64 and graph.tolist() == [[0, 1, 2, 1], [0, 1, 2, 2]]


def test_aux_logits_come_after_the_main_one():
    head = _head(aux_quantiles=(0.5, 0.9))
    features, numbers, ptr, edges = _two_structures()
    inputs = batch_inputs(features, numbers, ptr, edges, [0, 1])
    every = head.all_logits(*inputs)[0]
    main, _, _, _ = head(*inputs)
    assert every.shape == (2, 3)
    torch.testing.assert_close(main, every[:, 0])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        HeadConfig(aux_quantiles=(0.5, 1.0))


def test_probe_head_importance_normalised():
    head = _head()
    features, numbers, ptr, edges = _two_structures()
    logits, importance, atom_logits, atom_errors = head(*batch_inputs(features, numbers, ptr, edges, [0, 1]))
    assert logits.shape == (2,) and importance.shape == (12,) and atom_logits.shape == atom_errors.shape == (0,)
    assert torch.isfinite(logits).all()
    assert (importance >= 0).all()
    sums = torch.stack([importance[:5].sum(), importance[5:].sum()])
    torch.testing.assert_close(sums, torch.ones(2), atol=1e-6, rtol=0)
    assert not torch.allclose(importance[:5], torch.full((5,), 0.2))  # not trivially uniform


def test_atom_logits_one_per_atom_with_their_own_temperature():
    from probe_ase.model.calibration import Calibration

    head = _head(atom_logit=True)
    features, numbers, ptr, edges = _two_structures()
    inputs = batch_inputs(features, numbers, ptr, edges, [0, 1])
    logits, _, atom_logits, _ = head(*inputs)
    assert atom_logits.shape == (12,) and torch.isfinite(atom_logits).all()
    assert atom_logits.std() > 1e-3  # atoms differ
    calibration = Calibration(temperature=3.0, atom_temperature=2.0, novelty_weight=0.5)
    torch.testing.assert_close(calibration.atom_reliability(atom_logits), torch.sigmoid(atom_logits / 2.0))
    novelty = torch.tensor([0.5, 4.0])  # the penalty lowers the logit by 0.5 log(novelty), then T = 3
    torch.testing.assert_close(calibration.reliability(logits, novelty),
                               torch.sigmoid((logits - 0.5 * torch.log(novelty)) / 3.0))
    assert calibration.probability(0.0) == 0.5 and calibration.probability(np.array([3.0]))[0] == pytest.approx(
        float(torch.sigmoid(torch.tensor(1.0))))


def test_probe_head_structures_are_independent(variant):
    head = _head(**variant)
    features, numbers, ptr, edges = _two_structures()
    both, imp_both, atom_both, error_both = head(*batch_inputs(features, numbers, ptr, edges, [0, 1]))
    alone, imp_alone, atom_alone, error_alone = head(*batch_inputs(features, numbers, ptr, edges, [1]))
    torch.testing.assert_close(alone, both[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(imp_alone, imp_both[5:], atol=1e-6, rtol=0)
    torch.testing.assert_close(atom_alone, atom_both[5:] if atom_both.numel() else atom_both, atol=1e-5, rtol=0)
    torch.testing.assert_close(error_alone, error_both[5:] if error_both.numel() else error_both, atol=1e-5, rtol=1e-5)


def test_probe_head_permutation_invariant(variant):
    head = _head(**variant)
    features, numbers, ptr, edges = _two_structures()
    logits, importance, atom_logits, atom_errors = head(*batch_inputs(features, numbers, ptr, edges, [0, 1]))

    # relabel the atoms of structure 1: new atom a is old atom perm[a]
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(7)
    features2, numbers2 = features.clone(), numbers.clone()
    features2[5:] = features[5:][perm]
    numbers2[5:] = numbers[5:][perm]
    edges1 = inverse[edges[1]]  # old local index -> new local index, both rows
    edges1 = edges1[:, torch.randperm(edges1.shape[1], generator=torch.Generator().manual_seed(1))]
    logits2, importance2, atom_logits2, atom_errors2 = head(*batch_inputs(features2, numbers2, ptr, [edges[0], edges1], [0, 1]))

    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)
    if atom_logits.numel():  # per-atom logits follow the atoms
        torch.testing.assert_close(atom_logits2[5:], atom_logits[5:][perm], atol=1e-5, rtol=0)
        torch.testing.assert_close(atom_logits2[:5], atom_logits[:5], atol=1e-5, rtol=0)
    if atom_errors.numel():  # so do the predicted force errors (eV/Å)
        assert (atom_errors > 0).all()
        torch.testing.assert_close(atom_errors2[5:], atom_errors[5:][perm], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(atom_errors2[:5], atom_errors[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(importance2[:5], importance[:5], atol=1e-6, rtol=0)
    torch.testing.assert_close(importance2[5:], importance[5:][perm], atol=1e-6, rtol=0)

    # the graph matters: the same permutation with the old, unpermuted edges changes the logit
    logits3, _, _, _ = head(*batch_inputs(features2, numbers2, ptr, edges, [0, 1]))
    assert abs(float(logits3[1] - logits[1])) > 1e-4


def test_chunked_and_dense_attention_agree(variant):
    """Edge chunks of 5, one pass over all edges, the dense (n, n) form and the padded form (one (7, 7) matrix per
    structure, of 5 and 7 atoms) give the same outputs and gradients.

    Some edges are listed twice, as periodic images of one neighbour are: each copy must count.
    """
    features, numbers, ptr, edges = _two_structures()
    edges = [torch.cat([e, e[:, -3:]], dim=1) for e in edges]
    inputs = batch_inputs(features, numbers, ptr, edges, [0, 1])
    assert inputs[2].shape[1] > 20  # many chunks of 5
    results = []
    for chunk, dense_max, padded_max in ((5, 0, 0), (10**9, 0, 0), (5, 10**9, 0), (5, 7, 7)):
        head = _head(**variant).train()
        for block in head.blocks:
            block.attention.chunk, block.attention.dense_max, block.attention.padded_max = chunk, dense_max, padded_max
        logits, importance, atom_logits, _ = head(*inputs)
        (logits.sum() + atom_logits.sum()).backward()
        results.append((logits.detach(), importance.detach(), atom_logits.detach(),
                        head.blocks[0].attention.qkv.weight.grad))
    for chunked, whole, dense, padded in zip(*results):
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dense, whole, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(padded, whole, atol=1e-6, rtol=1e-5)
    single = batch_inputs(features, numbers, ptr, edges, [1])  # one structure: plain softmax pooling
    torch.testing.assert_close(head(*single)[0], results[2][0][1:], atol=1e-6, rtol=1e-5)



def test_members_run_batched_and_give_the_mean_of_single_heads(variant):
    """A head of 3 members (one batched pass, eager and scripted) = the mean of the 3 single heads it was built from,
    on one structure (dense attention) and on two; the sparse path agrees too."""
    gen = torch.Generator().manual_seed(3)
    singles = []
    for k in range(3):
        torch.manual_seed(k)
        single = ProbeHead(8, ELEMENTS, HeadConfig(hidden=16, heads=4, blocks=2, cutoff=3.0, **variant))
        with torch.no_grad():  # members differ in every buffer the batched pass reads
            features = torch.randn(50, 8, generator=gen) * 2 + 1
            single.set_standardisation(features.mean(0), features.std(0))
            single.set_error_scale(torch.randn(40, generator=gen) - 2)
            single.error_blend.copy_(torch.rand(single.error_blend.shape, generator=gen))
            single.error_centre.fill_(float(torch.randn((), generator=gen)))
        singles.append(single.eval())
    head = ProbeHead.from_members(singles, HeadConfig(hidden=16, heads=4, blocks=2, cutoff=3.0, members=3, **variant))
    scripted = torch.jit.freeze(torch.jit.script(copy.deepcopy(head)))
    features, numbers, ptr, edges = _two_structures()
    edges = [torch.cat([e, e[:, -3:]], dim=1) for e in edges]  # edges listed twice (periodic images) count twice
    with torch.inference_mode():
        for indices in ([1], [0, 1]):
            inputs = batch_inputs(features, numbers, ptr, edges, indices)
            outputs = [s.all_logits(*inputs) for s in singles]
            assert not torch.equal(outputs[0][0], outputs[1][0])
            mean = [sum(o[i] for o in outputs) / 3 for i in range(4)]
            for got, want in zip(head.all_logits(*inputs), mean):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for got, want in zip(scripted(*inputs), head(*inputs)):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for dense_max in (0, 7):  # the edge-wise (sparse) path in chunks of 2 edges per member; the padded one
                for block in head.blocks:
                    block.attention.dense_max = block.attention.padded_max = dense_max
                    block.attention.chunk = 6
                for got, want in zip(head.all_logits(*inputs), mean):
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for got, want in zip(torch.jit.script(copy.deepcopy(head))(*inputs), head(*inputs)):  # padded, scripted
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for block in head.blocks:
                block.attention.dense_max, block.attention.padded_max = DENSE_MAX_ATOMS, PADDED_MAX_ATOMS
                block.attention.chunk = EDGE_CHUNK
    with pytest.raises(InputError, match="from_members needs 3 single-member heads"):
        ProbeHead.from_members(singles[:2], head.config)


def test_a_single_head_computes_what_torch_layers_compute():
    """Members' layers at K = 1 are torch's Linear and LayerNorm, bit for bit, and initialise as they do."""
    from probe_ase.model.layers import LayerNorm, Linear

    torch.manual_seed(5)
    reference = torch.nn.Linear(7, 3)
    torch.manual_seed(5)
    ours = Linear(1, 7, 3)
    ours.reset(0)
    assert torch.equal(ours.weight[0], reference.weight) and torch.equal(ours.bias[0], reference.bias)
    x = torch.randn(1, 11, 7)
    assert torch.equal(ours(x)[0], reference(x[0]))
    norm = LayerNorm(1, 7)
    assert torch.equal(norm(x)[0], torch.nn.LayerNorm(7)(x[0]))


# --- HeadConfig -----------------------------------------------------------------------------


def test_head_config_validation():
    assert HeadConfig(hidden=12, heads=4).hidden == 12
    with pytest.raises(ValueError, match="not divisible"):
        HeadConfig(hidden=10, heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        HeadConfig(hidden=64, heads=5)
    for cutoff in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="cutoff must be positive"):
            HeadConfig(cutoff=cutoff)
    with pytest.raises(InputError, match="must be >= 1"):
        HeadConfig(heads=0)  # was a ZeroDivisionError


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(weight_decay=-1.0),
                                 dict(val_fraction=0.5, cal_fraction=0.5), dict(cal_fraction=0.0)])
def test_train_config_validation(bad):
    from probe_ase.fitting.train import TrainConfig

    with pytest.raises(InputError):
        TrainConfig(**bad)


# --- batch_inputs ---------------------------------------------------------------------------


def test_batch_inputs_out_of_order():
    # three structures with 2, 3 and 4 atoms; row r has feature r and number r + 1
    features = torch.arange(9, dtype=torch.float32).unsqueeze(1)
    numbers = torch.arange(9) + 1
    ptr = [0, 2, 5, 9]
    edges = [
        np.array([[0, 1, 0], [0, 1, 1]]),
        np.array([[0, 1, 2, 2], [0, 1, 2, 0]]),
        np.array([[0, 1, 2, 3, 3], [0, 1, 2, 3, 1]]),
    ]
    feats, nums, graph, batch, n = batch_inputs(features, numbers, ptr, edges, iter([2, 0]))
    assert n == 2
    torch.testing.assert_close(feats[:, 0], torch.tensor([5.0, 6.0, 7.0, 8.0, 0.0, 1.0]))
    torch.testing.assert_close(nums, torch.tensor([6, 7, 8, 9, 1, 2]))
    torch.testing.assert_close(batch, torch.tensor([0, 0, 0, 0, 1, 1]))
    # structure 2 keeps local indices (offset 0); structure 0 is shifted by 4 atoms
    expected = torch.tensor([[0, 1, 2, 3, 3, 4, 5, 4], [0, 1, 2, 3, 1, 4, 5, 5]])
    torch.testing.assert_close(graph, expected)

    feats, nums, graph, batch, n = batch_inputs(features, numbers, ptr, edges, [1])
    assert n == 1
    torch.testing.assert_close(feats[:, 0], torch.tensor([2.0, 3.0, 4.0]))
    torch.testing.assert_close(batch, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(graph, torch.as_tensor(edges[1]))

    # a structure repeated: both copies, edges offset by 3
    _, nums, graph, batch, n = batch_inputs(features, numbers, ptr, edges, [1, 1])
    assert n == 2
    torch.testing.assert_close(nums, torch.tensor([3, 4, 5, 3, 4, 5]))
    torch.testing.assert_close(graph[:, 4:], torch.as_tensor(edges[1]) + 3)
    torch.testing.assert_close(batch, torch.tensor([0, 0, 0, 1, 1, 1]))


# --- radius_graph ---------------------------------------------------------------------------


def _edge_set(edges: np.ndarray) -> list[tuple[int, int]]:
    return sorted(map(tuple, edges.T.tolist()))


def test_radius_graph_self_loops():
    atoms = molecule("CH3CH2OH")
    edges = radius_graph(atoms, 1.5)
    assert edges.shape[0] == 2 and edges.dtype == np.int64
    n = len(atoms)
    np.testing.assert_array_equal(edges[:, :n], np.stack([np.arange(n), np.arange(n)]))
    # no neighbour within cutoff -> only the self loops
    lonely = Atoms("H2", positions=[[0, 0, 0], [0, 0, 10]])
    np.testing.assert_array_equal(radius_graph(lonely, 2.0), [[0, 1], [0, 1]])


@pytest.mark.parametrize(
    "cutoff, per_atom",
    [
        (3.0, 1 + 12),  # fcc a = 3.61 Å: 12 neighbours at a/sqrt2 = 2.55 Å
        (4.0, 1 + 12 + 6),  # + 6 at a = 3.61 Å
        (5.0, 1 + 12 + 6 + 24),  # + 24 at a*sqrt(3/2) = 4.42 Å (cutoff > half the n=2 cell)
    ],
)
def test_radius_graph_linear_in_atoms_for_periodic_cu(cutoff, per_atom):
    for n in (2, 3, 4):
        atoms = bulk("Cu", cubic=True) * (n, n, n)
        edges = radius_graph(atoms, cutoff)
        assert edges.shape[1] == per_atom * len(atoms), n
        # every atom is the destination of the same number of edges
        np.testing.assert_array_equal(np.bincount(edges[0], minlength=len(atoms)), per_atom)


def test_radius_graph_molecule_zero_cell():
    atoms = molecule("CH3CH2OH")
    assert not atoms.pbc.any() and np.allclose(atoms.cell.array, 0)
    cutoff = 1.6
    edges = radius_graph(atoms, cutoff)
    dist = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    i, j = np.nonzero((dist < cutoff) & ~np.eye(len(atoms), dtype=bool))
    expected = [(k, k) for k in range(len(atoms))] + list(zip(i.tolist(), j.tolist()))
    assert _edge_set(edges) == sorted(expected)
    # ethanol at 1.6 Å: 8 bonds (C-C, C-O, 5 C-H, O-H) in both directions + 9 self loops
    assert edges.shape[1] == 9 + 2 * 8


def test_radius_graph_translation_invariant():
    atoms = molecule("CH3CH2OH")
    moved = atoms.copy()
    moved.translate([100.0, 100.0, 100.0])
    for cutoff in (1.2, 2.5, 5.0):
        assert _edge_set(radius_graph(moved, cutoff)) == _edge_set(radius_graph(atoms, cutoff))
    negative = atoms.copy()
    negative.translate([-100.0, 37.0, -5.0])
    assert _edge_set(radius_graph(negative, 2.5)) == _edge_set(radius_graph(atoms, 2.5))


@pytest.mark.parametrize("size", [2, 3])
def test_neighbour_cache_equals_a_fresh_graph_every_step(size):
    """The Verlet list gives exactly radius_graph's edges while atoms drift, and rebuilds when needed."""
    from ase.build import bulk

    from probe_ase.model.graph import NeighbourCache

    atoms = bulk("Cu", cubic=True) * (size, size, size)
    cache = NeighbourCache(cutoff=4.0, skin=0.6)
    rng = np.random.default_rng(size)
    rebuilds = 0
    for _ in range(25):
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        before = cache._positions
        got = cache(atoms)
        rebuilds += cache._positions is not before
        expected = radius_graph(atoms, 4.0)
        assert sorted(map(tuple, got.T.tolist())) == sorted(map(tuple, expected.T.tolist()))
    assert 1 < rebuilds < 25  # reused between rebuilds, rebuilt once atoms moved > skin/2
    atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)  # a cell change forces a rebuild
    assert sorted(map(tuple, cache(atoms).T.tolist())) == sorted(map(tuple, radius_graph(atoms, 4.0).T.tolist()))


def test_the_error_blend_gives_the_predicted_error_the_logits_spread():
    head = _head(aux_quantiles=(0.5,), atom_error=True)
    features, numbers, ptr, edges = _two_structures()
    inputs = batch_inputs(features, numbers, ptr, edges, [0, 1])
    logits = torch.tensor([[1.0, 3.0], [-1.0, -1.0], [0.0, 1.0]])
    error = torch.tensor([0.5, 2.5, 1.5])
    with torch.no_grad():
        before = head.all_logits(*inputs)[0]  # blend 0 until set: logits unchanged by the error readout
        head.set_error_blend(logits, error)
        after = head.all_logits(*inputs)[0]
    torch.testing.assert_close(head.error_blend[0], logits.std(0) / error.std())
    assert float(head.error_centre[0]) == pytest.approx(1.5)
    # the blend moves each column by its own spread per unit of predicted error, the same for both structures
    shift = after - before
    torch.testing.assert_close(shift[:, 1] / shift[:, 0], (logits.std(0)[1] / logits.std(0)[0]).expand(2))
