"""PySCF as the active-learning reference: DFT for molecules through PySCF's own ASE calculator.

:func:`pyscf_reference` returns a picklable factory (a :class:`~probe_ase.al.config.PySCFConfig`, the same
object as ``[reference] pyscf = {...}`` in ``probe-ase al``'s TOML) of :class:`PySCFCalculator`. Each builds
PySCF's ASE calculator (``pyscf.pbc.tools.pyscf_ase.PySCF``) on an RKS method (UKS for an open shell) for the
frame's molecule and computes the energy and forces in one SCF and one analytic gradient. PySCF works in
Hartree and Bohr; its ASE calculator converts to eV and eV/Å, the only units that leave this module. On the
same molecule a calculator reuses its last SCF solution as the next guess (PySCF's scanner); the
active-learning loop makes a fresh one per frame, so a frame's label does not depend on which frame came before.

An SCF not converged within ``max_cycle`` iterations raises :class:`SCFNotConvergedError`: the loop records
the frame as ``failed`` with its message and does not retry it (the same start fails the same way).

Energy zero: two codes (or two settings of one) that agree on forces can still differ in energy by a
constant per atom of each element. :func:`fit_energy_offsets` fits those offsets (eV per atom) by least
squares on composition from frames labelled by both (:func:`measure_energy_offsets` runs the reference on
stored frames and fits); given as ``energy_offsets``, they are added to every PySCF energy, and their sum is
recorded on each labelled row as ``energy_offset`` (eV).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from probe_ase.al.config import PySCFConfig
from probe_ase.exceptions import InputError, SCFNotConvergedError


def pyscf_reference(
    xc: str = "PBE",
    basis: str = "def2-SVP",
    charge: int = 0,
    multiplicity: int | None = None,
    conv_tol: float = 1e-9,
    max_cycle: int = 50,
    threads: int = 1,
    energy_offsets: Mapping[str, float] | None = None,
) -> PySCFConfig:
    """A picklable factory of PySCF reference calculators (energy eV, forces eV/Å) for the active-learning loop.

    ``xc`` and ``basis`` as PySCF names them (``"HF"``: Hartree-Fock); ``charge`` in elementary charges;
    ``multiplicity`` 2S + 1 (None: 1 for an even electron count, 2 for an odd one); ``conv_tol`` in Hartree
    (PySCF's setting); ``max_cycle`` SCF iterations at most; ``threads`` OpenMP threads per call;
    ``energy_offsets`` eV per atom of each element added to the energy (:func:`fit_energy_offsets`).

    Raises:
        InputError: a value out of range, PySCF not installed, or a functional or basis PySCF does not know.
    """
    return check_settings(PySCFConfig(xc=xc, basis=basis, charge=charge, multiplicity=multiplicity,
                                      conv_tol=conv_tol, max_cycle=max_cycle, threads=threads,
                                      energy_offsets=dict(energy_offsets or {})))


def check_settings(settings: PySCFConfig) -> PySCFConfig:
    """``settings``, once PySCF is importable and knows its functional and basis set.

    Raises:
        InputError: PySCF is missing (``pip install "probe-ase[pyscf]"``), or its ``xc`` or ``basis`` is unknown.
    """
    try:
        from pyscf import dft, gto
        from pyscf.lib.exceptions import BasisNotFoundError
    except ImportError as err:
        raise InputError(f'the PySCF reference needs pyscf: pip install "probe-ase[pyscf]" ({err})',
                         extra="pyscf") from err
    try:
        dft.libxc.parse_xc(settings.xc)
    except (KeyError, ValueError) as err:
        raise InputError(f"reference.pyscf.xc: PySCF knows no functional {settings.xc!r} ({err})",
                         key="reference.pyscf.xc", value=settings.xc) from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its hint to install basis-set-exchange
            gto.basis.load(settings.basis, "H")
    except (BasisNotFoundError, KeyError) as err:
        raise InputError(f"reference.pyscf.basis: PySCF knows no basis set {settings.basis!r}",
                         key="reference.pyscf.basis", value=settings.basis) from err
    return settings


class PySCFCalculator(Calculator):
    """PySCF's own ASE calculator on a molecule, with :class:`~probe_ase.al.config.PySCFConfig`'s settings.

    ``results["energy"]`` in eV (PySCF's total energy plus the settings' per-element offsets, whose sum is
    ``results["energy_offset"]`` when there are any) and ``results["forces"]`` in eV/Å, from one SCF and its
    analytic gradient. Molecules only (``pbc`` all False).
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, settings: PySCFConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._pyscf: Calculator | None = None  # PySCF's ASE calculator for the last molecule
        self._numbers: tuple[int, ...] = ()

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        """Energy (eV) and forces (eV/Å) of ``atoms`` in one SCF and gradient, whatever ``properties`` asks.

        Raises:
            SCFNotConvergedError: the SCF did not converge within ``max_cycle`` iterations.
            InputError: a periodic cell, or an element without an energy offset when there are offsets.
        """
        from pyscf import lib

        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if atoms.pbc.any():
            raise InputError(f"the PySCF reference computes molecules; got pbc={atoms.pbc.tolist()}",
                             pbc=atoms.pbc.tolist())
        offset = self._offset(atoms)
        calc = self._calculator(atoms)
        threads = lib.num_threads()
        lib.num_threads(self.settings.threads)
        try:
            calc.calculate(atoms, ["energy", "forces"], system_changes)
        except RuntimeError as err:
            scanner = calc.method_scan
            if scanner is None or scanner.converged:
                raise
            raise SCFNotConvergedError(self._not_converged(scanner.e_tot), energy=scanner.e_tot) from err
        finally:
            lib.num_threads(threads)
        self.results = {"energy": float(calc.results["energy"]) + offset,
                        "forces": np.array(calc.results["forces"], dtype=float)}
        if self.settings.energy_offsets:
            self.results["energy_offset"] = offset

    def _calculator(self, atoms: Atoms) -> Calculator:
        """PySCF's ASE calculator for ``atoms``' molecule: the last one while the elements are the same."""
        numbers = tuple(int(z) for z in atoms.numbers)
        if self._pyscf is None or numbers != self._numbers:
            from pyscf import dft, gto
            from pyscf.pbc.tools.pyscf_ase import PySCF

            s = self.settings
            mol = gto.M(atom=[(z, xyz) for z, xyz in zip(numbers, atoms.positions)], unit="Angstrom",
                        basis=s.basis, charge=s.charge, spin=self._spin(numbers), verbose=0)
            method = (dft.RKS if mol.spin == 0 else dft.UKS)(mol, xc=s.xc)
            method.conv_tol, method.max_cycle, method.chkfile = s.conv_tol, s.max_cycle, None
            self._pyscf, self._numbers = PySCF(method=method), numbers
        return self._pyscf

    def _spin(self, numbers: Sequence[int]) -> int:
        """2S for PySCF: the settings' multiplicity - 1, or the electron count's parity."""
        if self.settings.multiplicity is not None:
            return self.settings.multiplicity - 1
        return (sum(numbers) - self.settings.charge) % 2

    def _offset(self, atoms: Atoms) -> float:
        """The energy offset of ``atoms`` (eV): the sum of its atoms' per-element offsets."""
        offsets = self.settings.energy_offsets
        symbols = atoms.get_chemical_symbols()
        missing = sorted(set(symbols) - set(offsets))
        if offsets and missing:
            raise InputError(f"energy_offsets has no offset for {missing} (it has {sorted(offsets)})",
                             missing=missing)
        return float(sum(offsets.get(symbol, 0.0) for symbol in symbols))

    def _not_converged(self, e_tot: float) -> str:
        from pyscf.data.nist import HARTREE2EV

        s = self.settings
        return (f"SCF not converged in max_cycle={s.max_cycle} iterations (conv_tol {s.conv_tol:g} Hartree; "
                f"{s.xc}/{s.basis}, charge {s.charge}, multiplicity {self._pyscf.mol.spin + 1}); "
                f"last energy {e_tot * HARTREE2EV:.6f} eV")


def fit_energy_offsets(frames: Sequence[Atoms], computed: Sequence[float], stored: Sequence[float]
                       ) -> dict[str, float]:
    """Per-element energy offsets (eV per atom) that bring ``computed`` energies onto ``stored`` ones (eV).

    Least squares on composition, ``stored - computed ≈ counts @ offsets`` with one column per element of
    ``frames``. Where the compositions do not determine every element's offset (one molecule: only its formula's
    sum is fixed) the minimum-norm solution is returned: exact for those compositions, not for others.

    Raises:
        InputError: the three sequences differ in length or are empty.
    """
    if not len(frames) or not len(frames) == len(computed) == len(stored):
        raise InputError(f"need one computed and one stored energy per frame, got {len(frames)} frames, "
                         f"{len(computed)} computed and {len(stored)} stored energies", frames=len(frames),
                         computed=len(computed), stored=len(stored))
    symbols = sorted({symbol for atoms in frames for symbol in atoms.get_chemical_symbols()})
    counts = np.array([[atoms.get_chemical_symbols().count(s) for s in symbols] for atoms in frames], dtype=float)
    difference = np.asarray(stored, dtype=float) - np.asarray(computed, dtype=float)
    offsets = np.linalg.lstsq(counts, difference, rcond=None)[0]
    return {symbol: float(value) for symbol, value in zip(symbols, offsets)}


def measure_energy_offsets(frames: Sequence[Atoms], reference: Callable[[], Calculator]) -> dict[str, float]:
    """Per-element offsets (eV per atom) that put ``reference``'s energies on the stored energies of ``frames`` (eV).

    Runs a fresh calculator of ``reference`` on every frame (e.g. ten frames of the training set, with the
    energies of the code it was labelled with) and fits :func:`fit_energy_offsets`; give the result to
    :func:`pyscf_reference` as ``energy_offsets``.

    Raises:
        InputError: a frame has no stored energy, or ``reference`` already adds offsets.
    """
    if getattr(reference, "energy_offsets", None):
        raise InputError("measure the offsets with a reference that adds none (energy_offsets={})",
                         energy_offsets=reference.energy_offsets)
    stored, computed = [], []
    for index, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results:
            raise InputError(f"frame {index} has no stored energy to align with", frame=index)
        stored.append(atoms.get_potential_energy())
        copy = atoms.copy()
        copy.calc = reference()
        computed.append(copy.get_potential_energy())
    return fit_energy_offsets(frames, computed, stored)
