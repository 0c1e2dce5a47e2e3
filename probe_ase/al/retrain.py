"""Built-in retraining step for active learning: mace-torch's own trainer, then a head refit.

:class:`MaceTrainer` is a callable for :meth:`ActiveLearner.retrain`. It
fine-tunes the current MACE on the original training frames plus most of the
newly labelled frames, by running mace-torch's ``mace_run_train`` (in a subprocess,
since the trainer changes global torch and logging state) with
``--foundation_model`` pointing at the current weights, then refits the PROBE
head for the new backbone with the old head's criterion and tolerance (or,
when the retrained backbone is within that tolerance on every fit frame, with
tau at the old head's quantile, with a warning) and the rest of its settings
(:func:`refit_spec`, :func:`refit_head`). :class:`probe_ase.al.finetune.FineTuner`
does the same for CHGNet too, through each library's own fine-tuning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.io import write

from probe_ase.calculator import ProbeCalculator
from probe_ase.exceptions import InputError, LabelError, TrainingError
from probe_ase.fitting.data import Frames, read_frames, reference_energy, reference_forces
from probe_ase.fitting.pipeline import fit_probe
from probe_ase.fitting.spec import DEFAULT_QUANTILE, FitSpec
from probe_ase.model.headfile import HeadMeta


def refit_spec(meta: HeadMeta, head_epochs: int, seed: int) -> FitSpec:
    """The settings that refit a head like the one ``meta`` describes: its own (:attr:`HeadMeta.spec`), with the
    training's most epochs and seed the caller's and the tolerances it resolved (``tau`` in the criterion's unit,
    the atom tolerance in eV/Å) absolute."""
    spec = replace(meta.spec, tolerance=meta.tau, quantile=None,
                   options=replace(meta.spec.options, epochs=head_epochs, seed=seed))
    return spec if meta.atom_tau is None else replace(spec, atom_tolerance=meta.atom_tau, atom_quantile=None)


def hold_out(labelled: Sequence[Atoms], share: float, seed: int) -> tuple[list[Atoms], list[Atoms]]:
    """Split ``labelled`` at random into (held out, to train on): ``share`` (0-1) of the frames, at least one, held
    out. Needs at least 2 frames (energies in eV, forces in eV/Å)."""
    if len(labelled) < 2:
        raise InputError(f"retraining needs at least 2 labelled frames, got {len(labelled)}",
                         n_labelled=len(labelled))
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_hold = max(1, int(share * len(labelled)))
    return [labelled[k] for k in order[:n_hold]], [labelled[k] for k in order[n_hold:]]


def refit_head(base: Calculator, meta: HeadMeta, fit_frames: Sequence[Atoms], head_epochs: int, seed: int,
               path: str | os.PathLike) -> ProbeCalculator:
    """Refit a head like the one ``meta`` describes on the new backbone ``base``, save it to ``path``.

    The old head's tolerance (``tau``, force criteria in eV/Å) is kept where ``fit_frames`` (energies eV,
    forces eV/Å) still hold both classes under it; otherwise tau is taken at the old head's quantile, with a
    warning. Never reuses the old head: its backbone fingerprint no longer matches.
    """
    spec = refit_spec(meta, head_epochs, seed)
    try:
        probe = fit_probe(base, list(fit_frames), **spec, cache_dir=False, progress=False)
    except LabelError as err:
        quantile = meta.quantile or DEFAULT_QUANTILE
        warnings.warn(f"{err}; refitting the head with tau at the {quantile:.0%} quantile instead", stacklevel=3)
        probe = fit_probe(base, list(fit_frames), **replace(spec, tolerance=None, quantile=quantile),
                          cache_dir=False, progress=False)
    probe.save(path)
    return ProbeCalculator(base, probe)


def mace_training_frames(frames: Sequence[Atoms]) -> list[Atoms]:
    """Copies carrying ``REF_energy`` / ``REF_forces``, the keys mace-torch reads.

    A region cut from a big cell (``arrays["core"]`` and ``arrays["mlip_forces"]``,
    see :mod:`probe_ase.al.regions`) trains on the reference forces of its core
    only: mace-torch has no per-atom force weights, so each buffer atom's
    target is the MLIP's own force on it, whose loss is zero when retraining
    starts and which carries no reference information (the cut surface
    distorts the buffer's reference forces).
    """
    out = []
    for index, atoms in enumerate(frames):
        energy, forces = reference_energy(atoms), reference_forces(atoms)
        if energy is None or forces is None:
            raise InputError("every training frame needs a reference energy (eV) and forces (eV/Å)",
                             index=index, has_energy=energy is not None, has_forces=forces is not None)
        if "core" in atoms.arrays and "mlip_forces" in atoms.arrays:
            forces = np.where(atoms.arrays["core"][:, None], forces, atoms.arrays["mlip_forces"])
        copy = atoms.copy()
        copy.calc = None
        copy.info = {"REF_energy": energy}
        for key in ("core", "source_index", "mlip_forces"):
            copy.arrays.pop(key, None)
        copy.arrays["REF_forces"] = forces
        out.append(copy)
    return out


def run_mace_train(frames: Sequence[Atoms], foundation: str | os.PathLike, work_dir: str | os.PathLike,
                   name: str, epochs: int = 20, seed: int = 0, extra_args: Sequence[str] = ()) -> Path:
    """Fine-tune ``foundation`` on ``frames`` with ``mace_run_train``; return the new model path."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / f"{name}_train.xyz"
    write(train_file, mace_training_frames(frames), format="extxyz")
    model_dir = work / f"{name}_model"
    trainer = shutil.which("mace_run_train") or str(Path(sys.executable).with_name("mace_run_train"))
    args = [trainer, f"--name={name}", f"--train_file={train_file}", "--valid_fraction=0.1",
            f"--work_dir={work}", f"--model_dir={model_dir}", f"--foundation_model={foundation}",
            f"--max_num_epochs={epochs}", "--batch_size=8", "--valid_batch_size=8", "--device=cpu",
            "--E0s=average", "--energy_key=REF_energy", "--forces_key=REF_forces", "--energy_weight=10",
            "--plot=False", "--log_level=WARNING", f"--seed={seed}", *extra_args]
    done = subprocess.run(args, capture_output=True, text=True)
    model = model_dir / f"{name}.model"
    if done.returncode != 0 or not model.exists():
        raise TrainingError(f"mace_run_train failed (exit {done.returncode}):\n{done.stderr[-2000:]}",
                            returncode=done.returncode, stderr=done.stderr[-2000:])
    return model


class MaceTrainer:
    """The built-in retraining step for :meth:`ActiveLearner.retrain`.

    Each call splits the labelled frames: ``holdout`` of them (at least one)
    are kept out of training, the rest join the backbone's original training
    frames for fine-tuning from the current weights with mace-torch's own
    trainer. The head is then refitted on ``fit_data`` plus the held-out new
    frames, whose errors are honest (the backbone never saw them);
    ``self.held_out`` lists them for reporting the error before and after.

    Args:
        train_data: the backbone's original training frames (eV, eV/Å).
        fit_data: labelled frames the head is refitted on (never the backbone's training frames).
        work_dir: folder for training files, logs and models.
        epochs: fine-tuning epochs per round.
        head_epochs: most epochs for the head refit.
        holdout: share (0-1) of each round's labelled frames kept out of training.
        extra_args: further ``mace_run_train`` flags (e.g. ``["--lr=0.005", "--device=cuda"]``).
    """

    def __init__(self, train_data: Frames, fit_data: Frames, work_dir: str | os.PathLike = "al-retrain",
                 epochs: int = 20, head_epochs: int = 100, holdout: float = 0.3, seed: int = 0,
                 extra_args: Sequence[str] = ()) -> None:
        if not 0 < holdout < 1:
            raise InputError(f"holdout must lie strictly between 0 and 1, got {holdout}", holdout=holdout)
        self.train_frames, self.fit_frames = read_frames(train_data), read_frames(fit_data)
        self.work_dir, self.epochs, self.head_epochs = Path(work_dir), int(epochs), int(head_epochs)
        self.holdout, self.seed, self.extra_args = float(holdout), int(seed), list(extra_args)
        self.held_out: list[Atoms] = []

    def __call__(self, labelled: list[Atoms], round: int, current: ProbeCalculator) -> ProbeCalculator:
        """One round: fine-tune ``current``'s backbone, refit the head, return a calculator on both.

        Holds out a share of ``labelled`` (kept in :attr:`held_out`), fine-tunes on the original training
        frames plus the rest, then refits the head on ``fit_data`` plus the held-out frames at the old
        tolerance (at a quantile of the errors when those labels are unusable) and the old head's other
        settings (:func:`refit_spec`). Files go to ``work_dir``.
        """
        from mace.calculators import MACECalculator

        self.held_out, new_training = hold_out(labelled, self.holdout, self.seed + round)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        foundation = self.work_dir / f"round{round}_start.model"
        current.tap.save_backbone(foundation)
        model = run_mace_train(self.train_frames + new_training, foundation, self.work_dir, f"round{round}",
                               self.epochs, self.seed, self.extra_args)
        base = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
        return refit_head(base, current.probe.meta, self.fit_frames + self.held_out, self.head_epochs, self.seed,
                          self.work_dir / f"round{round}_probe.pt")
