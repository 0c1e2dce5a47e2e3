"""PySCF as the active-learning reference, on real PySCF at a tiny basis (STO-3G: well under a second a call).

The frames are written as ``pending`` rows directly (no MLIP); every label is compared with a direct
PySCF call on the same geometry, in PySCF's own units (Hartree, Bohr) converted here.
"""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.db import connect

from probe_ase import InputError, check_database
from probe_ase.al.config import AlConfig, PySCFConfig, ReferenceConfig
from probe_ase.al.dft import (PySCFCalculator, SCFNotConvergedError, fit_energy_offsets, measure_energy_offsets,
                              pyscf_reference)
from probe_ase.al.label import label_pending

pytestmark = pytest.mark.pyscf

SETTINGS = {"xc": "PBE", "basis": "sto-3g", "threads": 1}


class Counting:
    """A reference factory that counts its calculators (one per reference call; serial labelling only)."""

    def __init__(self, factory):
        self.factory, self.calls = factory, 0

    def __call__(self):
        self.calls += 1
        return self.factory()


def water(seed: int) -> Atoms:
    atoms = molecule("H2O")
    atoms.rattle(0.05, seed=seed)
    return atoms


def pending(db: str, frames: list[Atoms]) -> list[int]:
    rows = connect(db)
    return [rows.write(atoms, status="pending", round=1) for atoms in frames]


def direct(atoms: Atoms, xc: str = "PBE", basis: str = "sto-3g") -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) from PySCF itself: its RKS in Hartree and Bohr, converted here."""
    from pyscf import dft, gto, lib
    from pyscf.data.nist import BOHR, HARTREE2EV

    lib.num_threads(1)
    mol = gto.M(atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)], basis=basis,
                unit="Angstrom", verbose=0)
    method = dft.RKS(mol, xc=xc)
    energy = method.kernel()
    assert method.converged
    return energy * HARTREE2EV, -method.nuc_grad_method().kernel() * HARTREE2EV / BOHR


def test_labels_are_pyscf_results_and_resume_calls_nothing(tmp_path):
    db = str(tmp_path / "al.db")
    frames = [water(0), water(1)]
    ids = pending(db, frames)
    reference = Counting(pyscf_reference(**SETTINGS))
    assert label_pending(db, reference, progress=False) == {"done": 2, "failed": 0}
    assert reference.calls == 2
    for row_id, atoms in zip(ids, frames):
        row = connect(db).get(id=row_id)
        energy, forces = direct(atoms)
        assert row.status == "done" and row.attempts == 1
        assert row.energy == pytest.approx(energy, abs=1e-8)  # eV
        np.testing.assert_allclose(row.forces, forces, atol=1e-6)  # eV/Å
        assert abs(row.forces).max() > 0.1  # rattled: the comparison is not of zeros
    before = [(row.energy, row.forces.tolist()) for row in connect(db).select()]
    assert label_pending(db, reference, progress=False) == {"done": 0, "failed": 0}  # resume: nothing pending
    assert reference.calls == 2
    assert [(row.energy, row.forces.tolist()) for row in connect(db).select()] == before
    assert check_database(db).ok


def test_an_unconverged_scf_fails_its_frame_once_and_the_round_goes_on(tmp_path):
    db = str(tmp_path / "al.db")
    (done_id,) = pending(db, [water(2)])
    label_pending(db, pyscf_reference(**SETTINGS), progress=False)
    kept = connect(db).get(id=done_id).energy
    bad_id, good_id = pending(db, [water(3), molecule("H2")])  # H2 in STO-3G converges in 2 iterations, H2O not
    reference = Counting(pyscf_reference(**SETTINGS, max_cycle=2))
    assert label_pending(db, reference, retries=3, progress=False) == {"done": 1, "failed": 1}
    assert reference.calls == 2  # the failed SCF is not retried: the same start fails the same way
    bad = connect(db).get(id=bad_id)
    assert bad.status == "failed" and bad.attempts == 1
    assert "SCFNotConvergedError: SCF not converged in max_cycle=2 iterations (conv_tol 1e-09 Hartree" in bad.error
    assert connect(db).get(id=good_id).status == "done"
    assert connect(db).get(id=done_id).energy == kept  # nothing already labelled is touched
    assert check_database(db).ok
    connect(db).update(bad_id, delete_keys=["error"], status="pending")  # the how-to's remedy: back to pending, label with new settings
    assert label_pending(db, pyscf_reference(**SETTINGS), progress=False) == {"done": 1, "failed": 0}
    relabelled = connect(db).get(id=bad_id)
    assert relabelled.energy == pytest.approx(direct(water(3))[0], abs=1e-8) and "error" not in relabelled
    assert check_database(db).ok


def test_energy_offsets_are_added_and_recorded(tmp_path):
    db = str(tmp_path / "al.db")
    atoms = water(4)
    (row_id,) = pending(db, [atoms])
    offsets = {"H": -0.25, "O": 1.5}
    label_pending(db, pyscf_reference(**SETTINGS, energy_offsets=offsets), progress=False)
    row = connect(db).get(id=row_id)
    energy, forces = direct(atoms)
    assert row.energy_offset == pytest.approx(1.0)  # eV: 2 H and 1 O
    assert row.energy == pytest.approx(energy + 1.0, abs=1e-8)
    np.testing.assert_allclose(row.forces, forces, atol=1e-6)  # forces never shifted
    with pytest.raises(InputError, match=r"no offset for \['O'\]"):
        atoms.calc = pyscf_reference(**SETTINGS, energy_offsets={"H": 0.0})()
        atoms.get_potential_energy()


def test_a_process_pool_labels_through_the_pickled_factory(tmp_path):
    db = str(tmp_path / "al.db")
    frames = [water(5), water(6)]
    ids = pending(db, frames)
    reference = pickle.loads(pickle.dumps(pyscf_reference(**SETTINGS)))
    with ProcessPoolExecutor(2) as pool:
        assert label_pending(db, reference, executor=pool, progress=False) == {"done": 2, "failed": 0}
    for row_id, atoms in zip(ids, frames):
        assert connect(db).get(id=row_id).energy == pytest.approx(direct(atoms)[0], abs=1e-8)


@pytest.mark.slow  # a Dask cluster's start: ~15 s on 2 loaded cores
def test_dask_workers_label_with_pyscf(tmp_path):
    distributed = pytest.importorskip("distributed")
    db = str(tmp_path / "al.db")
    frames = [water(8), water(9)]
    ids = pending(db, frames)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        counts = label_pending(db, pyscf_reference(**SETTINGS), executor=client.get_executor(), progress=False)
    assert counts == {"done": 2, "failed": 0}
    for row_id, atoms in zip(ids, frames):
        assert connect(db).get(id=row_id).energy == pytest.approx(direct(atoms)[0], abs=1e-8)


def test_one_calculator_handles_an_open_shell_and_a_new_molecule():
    hydrogen = Atoms("H")
    hydrogen.calc = calc = PySCFCalculator(pyscf_reference(xc="HF", basis="sto-3g"))
    assert hydrogen.get_potential_energy() == pytest.approx(-0.46658185 * 27.211386245988, abs=1e-5)  # UHF, eV
    assert calc._pyscf.mol.spin == 1
    h2 = molecule("H2")
    h2.calc = calc
    h2.get_forces()
    assert calc._pyscf.mol.spin == 0 and len(calc._pyscf.mol.elements) == 2
    with pytest.raises(SCFNotConvergedError, match="max_cycle=1"):
        frame = water(7)
        frame.calc = pyscf_reference(**SETTINGS, max_cycle=1)()
        frame.get_forces()


def test_the_toml_form_builds_the_factory():
    mapping = {"backbone": "m", "probe": "p", "start": "s",
               "reference": {"pyscf": {"xc": "B3LYP", "basis": "def2-SVP", "charge": -1, "multiplicity": 2,
                                       "conv_tol": 1e-8, "max_cycle": 80, "threads": 2,
                                       "energy_offsets": {"H": -0.01, "C": 0.02}}}}
    reference = AlConfig.from_mapping(mapping).reference
    factory = reference.factory()
    assert factory == PySCFConfig("B3LYP", "def2-SVP", -1, 2, 1e-8, 80, 2, {"H": -0.01, "C": 0.02})
    assert isinstance(factory(), PySCFCalculator) and pickle.loads(pickle.dumps(factory)) == factory
    assert ReferenceConfig(pyscf={}).factory() == pyscf_reference()  # PBE/def2-SVP, neutral, 1 thread


@pytest.mark.parametrize("pyscf,message", [
    ({"functional": "PBE"}, r"unknown keys \['functional'\] in \[reference.pyscf\] of config al.toml"),
    ({"max_cycle": 0}, r"reference.pyscf.max_cycle in config al.toml must be a whole number >= 1, got 0"),
    ({"conv_tol": -1e-9}, r"reference.pyscf.conv_tol in config al.toml must be a positive number \(Hartree\)"),
    ({"multiplicity": 0}, r"reference.pyscf.multiplicity in config al.toml must be a whole number >= 1"),
    ({"threads": 1.5}, r"reference.pyscf.threads in config al.toml must be a whole number >= 1, got 1.5"),
    ({"charge": "0"}, r"reference.pyscf.charge in config al.toml must be a whole number, got '0'"),
    ({"energy_offsets": {"Xx": 1.0}}, r"reference.pyscf.energy_offsets.Xx in config al.toml: 'Xx' is not an element"),
    ({"energy_offsets": {"H": "1"}}, r"reference.pyscf.energy_offsets.H in config al.toml must be a number"),
    ("PBE", r"reference.pyscf in config al.toml must be a table, got 'PBE'"),
])
def test_bad_pyscf_settings_name_the_key(pyscf, message):
    mapping = {"backbone": "m", "probe": "p", "start": "s", "reference": {"pyscf": pyscf}}
    with pytest.raises(InputError, match=message):
        AlConfig.from_mapping(mapping, "al.toml")


def test_unknown_functional_or_basis_and_both_forms_are_errors():
    with pytest.raises(InputError, match="PySCF knows no functional 'PBEE'"):
        ReferenceConfig(pyscf={"xc": "PBEE"}).factory()
    with pytest.raises(InputError, match="PySCF knows no basis set 'def2-SVPP'"):
        pyscf_reference(basis="def2-SVPP")
    with pytest.raises(InputError, match="takes calculator \\(with options\\) or pyscf"):
        ReferenceConfig("ase.calculators.emt:EMT", pyscf={})
    with pytest.raises(InputError, match=r"\[reference\] of the config lacks \['calculator'\]"):
        ReferenceConfig()
    with pytest.raises(InputError, match="computes molecules"):
        crystal = Atoms("H2", positions=[(0, 0, 0), (0, 0, 0.74)], cell=[3, 3, 3], pbc=True)
        crystal.calc = pyscf_reference(**SETTINGS)()
        crystal.get_potential_energy()


def test_per_element_offsets_by_least_squares():
    frames = [molecule("H2O"), molecule("H2"), molecule("O2"), molecule("CH4"), molecule("CO")]
    truth = {"C": -0.5, "H": 0.125, "O": 2.0}
    shift = [sum(truth[s] for s in atoms.get_chemical_symbols()) for atoms in frames]
    computed = np.arange(5.0)
    assert fit_energy_offsets(frames, computed, computed + shift) == pytest.approx(truth)
    ethanol = [molecule("CH3CH2OH")] * 3  # one composition: only the formula's sum is determined
    offsets = fit_energy_offsets(ethanol, [0.0, 1.0, 2.0], [0.9, 1.9, 2.9])
    assert 2 * offsets["C"] + 6 * offsets["H"] + offsets["O"] == pytest.approx(0.9)
    with pytest.raises(InputError, match="one computed and one stored energy per frame"):
        fit_energy_offsets(frames, computed, computed[:3])


def test_measured_offsets_align_pyscf_with_stored_energies():
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for seed in (10, 11):
        atoms = water(seed)
        energy, forces = direct(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=energy + 0.3, forces=forces)  # another code's zero: +0.3 eV
        frames.append(atoms)
    offsets = measure_energy_offsets(frames, pyscf_reference(**SETTINGS))
    assert 2 * offsets["H"] + offsets["O"] == pytest.approx(0.3, abs=1e-8)
    aligned = frames[0].copy()
    aligned.calc = pyscf_reference(**SETTINGS, energy_offsets=offsets)()
    assert aligned.get_potential_energy() == pytest.approx(frames[0].get_potential_energy(), abs=1e-8)
    with pytest.raises(InputError, match="adds none"):
        measure_energy_offsets(frames, aligned.calc.settings)
    with pytest.raises(InputError, match="frame 0 has no stored energy"):
        measure_energy_offsets([water(12)], pyscf_reference(**SETTINGS))
