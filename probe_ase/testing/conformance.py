"""The conformance suite every backbone tap must pass: :func:`check_tap`.

Run it on a new adapter, or on a :class:`~probe_ase.taps.ModuleTap` you built,
before trusting its features; every shipped adapter passes it in CI. It checks:

* **layers**: every tapped layer equals a hook-free reference computation
  (the adapter's :meth:`~probe_ase.taps.base.Tap.reference_features` or your
  ``reference``);
* **one pass**: one step (energy and forces) runs every feature module exactly
  once, and the tap counts it;
* **batched**: a batched :meth:`~probe_ase.taps.base.Tap.predict` gives the
  calculator's energies (eV), forces (eV/Å) and features, structure by structure;
* **neighbour graph**: the graph read from the backbone's own neighbour list
  (when the adapter reads one) has :func:`probe_ase.model.graph.radius_graph`'s edges,
  at the backbone's cutoff and at a shorter radius;
* **invariance**: features of a molecule and of a periodic cell do not change
  under rotation, translation (the cell's atoms wrapped back across its
  boundary) and permutation (they follow it);
* **close and copy**: a deep copy of the tapped backbone runs without reaching
  the tap; ``close()`` removes every hook and leaves the backbone as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from probe_ase.exceptions import BackboneError
from probe_ase.model.graph import radius_graph
from probe_ase.taps import Tap, find_tap
from probe_ase.testing.invariance import moved_copies

Reference = Callable[[Atoms], dict[int, np.ndarray]]


def check_tap(
    calc: Calculator,
    crystal: Atoms,
    molecule: Atoms | None = None,
    make_tap: Callable[[], Tap] | None = None,
    reference: Reference | None = None,
    tol: float = 1e-5,
    invariance_tol: float = 1e-4,
    seed: int = 0,
) -> dict[str, str]:
    """Run the conformance suite (module docstring) on the backbone in ``calc``.

    Args:
        calc: the backbone calculator.
        crystal: a periodic structure of elements the backbone knows (several
            atoms; Å).
        molecule: a non-periodic structure; default a cluster cut from
            ``crystal`` (boxed with pbc for backbones that need a cell).
        make_tap: returns a fresh tap on ``calc`` (default :func:`find_tap`):
            pass ``lambda: ModuleTap(calc, ...)`` for a tap built by hand.
        reference: ``reference(atoms)`` gives each tapped layer's features
            computed without hooks; default the adapter's ``reference_features``.
        tol: absolute and relative tolerance of the exact checks.
        invariance_tol: tolerance of the invariance checks, relative to the
            largest feature (float32 rounding moves with the coordinates).
        seed: random rotation, translation and permutation.

    Returns:
        what each check verified, by name (``"layers"`` says ``skipped`` when
        there is no reference computation). Raises ``AssertionError`` at the
        first failure, naming the check.
    """
    make_tap = make_tap or (lambda: find_tap(calc))
    report: dict[str, str] = {}
    with make_tap() as tap:
        molecule = _molecule(crystal, tap) if molecule is None else _boxed(molecule, tap)
        report["layers"] = _check_layers(tap, calc, [crystal, molecule], reference, tol)
        report["one_pass"] = _check_one_pass(tap, calc, crystal)
        report["batched"] = _check_batched(tap, calc, [crystal, molecule, _rattled(crystal, seed)], tol)
        report["neighbour_graph"] = _check_graph(tap, calc, [crystal, molecule])
        report["invariance"] = _check_invariance(tap, calc, {"molecule": molecule, "periodic cell": crystal},
                                                 invariance_tol, seed)
        report["copy"] = _check_copy(tap, calc, crystal)
    report["close"] = _check_close(make_tap, calc, crystal)
    return report


def _step(tap: Tap, calc: Calculator, atoms: Atoms) -> tuple[dict, torch.Tensor]:
    """One step as ProbeCalculator makes it: energy and forces in one call; the results and tapped features."""
    calc.reset()
    wanted = [p for p in ("energy", "forces") if p in calc.implemented_properties]
    calc.calculate(atoms.copy(), wanted, all_changes)
    return dict(calc.results), tap.features().detach().cpu().clone()


def _check_layers(tap: Tap, calc: Calculator, structures: list[Atoms], reference: Reference | None,
                  tol: float) -> str:
    compute = reference or tap.reference_features
    worst = 0.0
    for atoms in structures:
        _, features = _step(tap, calc, atoms)
        try:
            expected = compute(atoms)
        except NotImplementedError:
            return "skipped: no hook-free reference computation (pass reference=)"
        offset = 0
        for layer in tap.layers:
            width = tap.layer_width(layer)
            got = features[:, offset : offset + width].double().numpy()
            offset += width
            want = np.asarray(expected[layer], dtype=float)
            _require(got.shape == want.shape, "layers", f"layer {layer}: tapped {got.shape}, reference {want.shape}")
            error = float(np.max(np.abs(got - want), initial=0.0))
            _require(np.allclose(got, want, rtol=tol, atol=tol), "layers",
                     f"layer {layer} differs from the reference by up to {error:.2e}")
            worst = max(worst, error)
    return f"{len(tap.layers)} layers equal the reference (largest difference {worst:.1e})"


def _check_one_pass(tap: Tap, calc: Calculator, atoms: Atoms) -> str:
    calls = [0] * len(tap.feature_modules())
    handles = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(tap.feature_modules())]
    try:
        before = tap.n_forward
        steps = 3
        for k in range(steps):
            _step(tap, calc, _rattled(atoms, k))
    finally:
        for handle in handles:
            handle.remove()
    _require(calls == [steps] * len(calls), "one_pass", f"{steps} steps ran the feature modules {calls} times")
    _require(tap.n_forward - before == steps, "one_pass", f"{steps} steps, the tap counted {tap.n_forward - before}")
    return f"{steps} steps: each of {len(calls)} feature modules ran {steps} times, the tap counted {steps} passes"


def _check_batched(tap: Tap, calc: Calculator, frames: list[Atoms], tol: float) -> str:
    batched = list(tap.predict(frames, batch_size=len(frames)))
    for k, (atoms, pred) in enumerate(zip(frames, batched)):
        results, features = _step(tap, calc, atoms)
        where = f"structure {k} of {len(frames)}"
        _require(np.isclose(pred.energy, results["energy"], rtol=tol, atol=tol), "batched",
                 f"{where}: batched energy {pred.energy} eV, calculator {results['energy']} eV")
        _require(np.allclose(pred.forces, results["forces"], rtol=10 * tol, atol=tol), "batched",
                 f"{where}: forces differ by {np.max(np.abs(pred.forces - results['forces'])):.2e} eV/Å")
        _require(torch.allclose(pred.features.cpu(), features, rtol=tol, atol=tol), "batched",
                 f"{where}: features differ by {(pred.features.cpu() - features).abs().max():.2e}")
    return f"a batch of {len(frames)} equals the calculator structure by structure"


def _check_graph(tap: Tap, calc: Calculator, structures: list[Atoms]) -> str:
    for atoms in structures:
        _step(tap, calc, atoms)
        if tap.neighbour_graph(tap.cutoff) is None:
            return "not read: the head builds its own graph"
        for cutoff in (tap.cutoff, 0.6 * tap.cutoff):
            graph = tap.neighbour_graph(cutoff).cpu().numpy()
            expected = radius_graph(atoms, cutoff)
            _require(sorted(map(tuple, graph.T.tolist())) == sorted(map(tuple, expected.T.tolist())), "neighbour_graph",
                     f"{len(atoms)} atoms, radius {cutoff:.2f} Å: {graph.shape[1]} edges from the backbone's list, "
                     f"{expected.shape[1]} from radius_graph")
    return f"equal to radius_graph at {tap.cutoff:.2f} and {0.6 * tap.cutoff:.2f} Å"


def _check_invariance(tap: Tap, calc: Calculator, structures: dict[str, Atoms], tol: float, seed: int) -> str:
    worst = 0.0
    for name, atoms in structures.items():
        _, reference = _step(tap, calc, atoms)
        scale = max(1.0, float(reference.abs().max()))
        for how, moved, order in moved_copies(atoms, seed, wrap=True):
            _, features = _step(tap, calc, moved)
            expected = reference if order is None else reference[torch.as_tensor(order)]
            change = float((features - expected).abs().max()) / scale
            _require(change <= tol, "invariance", f"{name}: features change by {change:.1e} (relative) under {how}")
            worst = max(worst, change)
    return f"molecule and periodic cell: largest relative change {worst:.1e} (rotation, translation, permutation)"


def _check_copy(tap: Tap, calc: Calculator, atoms: Atoms) -> str:
    module = tap.module
    clone = copy.deepcopy(module)  # what retraining does; the copied hooks must ignore the copy's passes
    twin = copy.copy(calc)  # the calculator, holding the copy where it held the backbone
    placed = False
    for name, value in vars(calc).items():
        if value is module:
            setattr(twin, name, clone)
            placed = True
        elif isinstance(value, list) and any(v is module for v in value):
            setattr(twin, name, [clone if v is module else v for v in value])
            placed = True
    if not placed:
        return "the tapped backbone deep-copies (its calculator does not hold it directly: copy's passes not run)"
    twin.reset()
    before = tap.n_forward
    _step_plain(twin, atoms)
    _require(tap.n_forward == before, "copy", "a deep copy's pass reached the tap of the original")
    return "the tapped backbone deep-copies, and the copy's passes do not reach the tap"


def _check_close(make_tap: Callable[[], Tap], calc: Calculator, atoms: Atoms) -> str:
    tap = make_tap()
    module = tap.module
    tap.close()  # first a count with no tap at all (the hooks are shared by every tap on a module)

    def n_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    bare = n_hooks()
    tap = make_tap()
    _require(n_hooks() > bare, "close", "the tap added no hooks")
    tap.close()
    _require(n_hooks() == bare, "close", f"{n_hooks() - bare} hooks left after close()")
    _step_plain(calc, atoms)
    _require(tap.n_forward == 0, "close", "a closed tap still counts passes")
    try:
        tap.features()
    except BackboneError:
        return "close() removes every hook; a closed tap refuses to give features"
    raise AssertionError("close: a closed tap still gives features")


def _step_plain(calc: Calculator, atoms: Atoms) -> None:
    calc.reset()
    calc.calculate(atoms.copy(), ["energy"], all_changes)


def _rattled(atoms: Atoms, seed: int) -> Atoms:
    out = atoms.copy()
    out.rattle(0.02, seed=seed + 1)
    return out


def _molecule(crystal: Atoms, tap: Tap) -> Atoms:
    """A cluster: the atoms of ``crystal`` (no images, unwrapped) within 0.45 cell widths of its first atom."""
    widths = crystal.cell.volume / np.linalg.norm(np.cross(crystal.cell[[1, 2, 0]], crystal.cell[[2, 0, 1]]), axis=1)
    vectors = crystal.get_distances(0, range(len(crystal)), mic=True, vector=True)
    near = np.linalg.norm(vectors, axis=1) < max(0.45 * widths.min(), 2.6)
    cluster = Atoms(crystal.numbers[near], positions=crystal.positions[0] + vectors[near])  # unwrapped, no cell
    _require(len(cluster) >= 3, "setup", f"the cluster cut from the crystal has {len(cluster)} atoms; pass molecule=")
    return _boxed(cluster, tap)


def _boxed(molecule: Atoms, tap: Tap) -> Atoms:
    """The molecule as is, or, for backbones that need a cell, centred in a periodic box wider than the cutoff."""
    if not tap.periodic_only or molecule.pbc.all():
        return molecule
    boxed = molecule.copy()
    boxed.center(vacuum=tap.cutoff + 1.0)
    boxed.pbc = True
    return boxed


def _require(condition: bool, check: str, message: str) -> None:
    if not condition:
        raise AssertionError(f"check_tap {check}: {message}")
