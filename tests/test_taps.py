"""Conformance tests every backbone tap must pass (MACE, SchNet, PaiNN)."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch

from probe_ase import BackboneError, InputError, find_tap


def reference_last_layer(name: str, calc, atoms) -> np.ndarray:
    """The backbone's own invariant features of its last layer, computed without hooks."""
    if name == "mace":
        return calc.get_descriptors(atoms)[:, -calc.models[0].products[-1].linear.irreps_out.dim :]
    inputs = calc.converter(atoms)
    for module in calc.model.input_modules:
        inputs = module(inputs)
    return calc.model.representation(inputs)["scalar_representation"].detach().cpu().numpy()


def test_features_shape_dtype_and_values(backbone_name, backbones, cu_data):
    calc = backbones(backbone_name)
    atoms = cu_data["test_in"][0].copy()
    with find_tap(calc) as tap:
        atoms.calc = calc
        atoms.get_forces()
        feats = tap.features()
        assert feats.shape == (len(atoms), tap.feature_dim)
        assert not feats.requires_grad
        assert feats.dtype == next(tap.module.parameters()).dtype
        last = feats[:, -tap.layer_width(tap.layers[-1]) :].cpu().numpy()
        expected = reference_last_layer(backbone_name, calc, atoms)
        np.testing.assert_allclose(last, expected, rtol=1e-5, atol=1e-6)


def test_one_backbone_pass_per_step(backbone_name, backbones, cu_data):
    """Hooks ride on the backbone's own pass: exactly one forward per calculation."""
    calc = backbones(backbone_name)
    calc.reset()  # the session-wide calculator may hold results for these atoms
    with find_tap(calc) as tap:
        calls = []
        handle = tap.module.register_forward_hook(lambda *a: calls.append(1))
        try:
            for atoms in cu_data["test_in"][:3]:
                atoms = atoms.copy()
                atoms.calc = calc
                atoms.get_forces()
        finally:
            handle.remove()
        assert len(calls) == 3
        assert tap.n_forward == 3


@pytest.mark.parametrize("periodic", [True, False])
def test_batched_predict_matches_calculator(backbone_name, backbones, cu_data, periodic):
    """Batched passes (their own neighbour lists) give the calculator's energies, forces and features."""
    calc = backbones(backbone_name)
    frames = [a.copy() for a in cu_data["test_out"][:5]]
    if not periodic:  # a molecule-like cluster: no cell, no images
        for atoms in frames:
            atoms.pbc = False
            atoms.cell = None
    with find_tap(calc) as tap:
        batched = list(tap.predict(frames, batch_size=3))
        for atoms, pred in zip(frames, batched):
            atoms = atoms.copy()
            atoms.calc = calc
            assert pred.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-5, abs=1e-5)
            np.testing.assert_allclose(pred.forces, atoms.get_forces(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pred.features, tap.features(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("periodic", [True, False])
def test_neighbour_graph_is_the_radius_graph(backbone_name, backbones, cu_data, periodic):
    """The backbone's own neighbour list, cut at a radius, gives radius_graph's edges."""
    from probe_ase.graph import radius_graph

    calc = backbones(backbone_name)
    atoms = cu_data["test_out"][0].copy()
    if not periodic:
        atoms.pbc = False
        atoms.center(vacuum=6.0)
    calc.reset()
    with find_tap(calc) as tap:
        assert tap.neighbour_graph(tap.cutoff) is None  # nothing seen yet
        atoms.calc = calc
        atoms.get_forces()
        assert tap.list_cutoff == pytest.approx(tap.cutoff)
        copy.deepcopy(tap.module)  # what it keeps of the pass does not stop a deep copy (retraining does one)
        assert tap.neighbour_graph(tap.list_cutoff + 0.5) is None  # beyond the backbone's list
        for cutoff in (tap.cutoff, 3.0, 2.2):
            graph = tap.neighbour_graph(cutoff).cpu().numpy()
            assert sorted(map(tuple, graph.T.tolist())) == sorted(map(tuple, radius_graph(atoms, cutoff).T.tolist()))
            assert (graph[:, : len(atoms)] == np.arange(len(atoms))).all()  # self loops first


def test_layer_selection_and_close(backbone_name, backbones, cu_data):
    calc = backbones(backbone_name)
    with find_tap(calc) as full:
        width = full.feature_dim
    with find_tap(calc, layers=[0]) as first:
        assert first.layers == (0,)
        assert first.feature_dim == first.layer_width(0) < width
    with pytest.raises(InputError, match="layers"):
        find_tap(calc, layers=[7])
    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in full.module.modules())

    hooks_before = n_hooks()
    tap = find_tap(calc)
    assert n_hooks() > hooks_before
    tap.close()
    assert n_hooks() == hooks_before
    calc.reset()
    atoms = cu_data["test_in"][1].copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    assert tap.n_forward == 0
    with pytest.raises(BackboneError, match="closed"):
        tap.features()


def test_fingerprint_tells_models_apart(backbones, cu_data):
    from probe_ase.testing import train_mace

    other = train_mace(cu_data["train"][:10], epochs=1, seed=1)
    calc = backbones("mace")
    with find_tap(calc) as a, find_tap(other) as b:
        twin = copy.deepcopy(calc)  # same weights, another module; the copied hooks must ignore it
        with find_tap(twin) as c:
            assert c.fingerprint() == a.fingerprint() != b.fingerprint()
            before = a.n_forward
            atoms = cu_data["test_in"][0].copy()
            atoms.calc = twin
            atoms.get_potential_energy()
            assert (a.n_forward, c.n_forward) == (before, 1)  # the copy's pass reached only its own tap
            assert c.features().shape == (len(atoms), c.feature_dim)


def test_no_backbone_is_a_clear_error():
    from ase.calculators.emt import EMT

    with pytest.raises(BackboneError, match="EMT"):
        find_tap(EMT())


def test_untappable_mace_models_are_refused_up_front(backbones, tmp_path):
    """TorchScript, torch.compile'd and cuEquivariance MACE fail at construction with the fix named."""
    from e3nn.util import jit as e3nn_jit
    from mace.calculators import MACECalculator

    model = backbones("mace").models[0]
    torch.save(model, tmp_path / "m.model")
    scripted = MACECalculator(model_paths=str(tmp_path / "m.model"), device="cpu", default_dtype="float32")
    scripted.models[0] = e3nn_jit.compile(scripted.models[0])  # what a *_compiled.model file holds
    with pytest.raises(BackboneError, match="TorchScript.*uncompiled"):
        find_tap(scripted)
    for flag, fix in (("use_compile", "compile_mode"), ("_uses_accelerated_backend", "enable_cueq=False")):
        calc = MACECalculator(model_paths=str(tmp_path / "m.model"), device="cpu", default_dtype="float32")
        setattr(calc, flag, True)  # the state enable_cueq / compile_mode leave (neither runs on this CPU)
        with pytest.raises(BackboneError, match=fix):
            find_tap(calc)
        assert not any(m._forward_hooks for m in calc.models[0].modules())  # refused before any hook
