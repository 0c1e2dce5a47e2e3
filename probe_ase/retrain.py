"""Built-in retraining step for active learning: mace-torch's own trainer, then a head refit.

:func:`mace_trainer` returns a callable for :meth:`ActiveLearner.retrain`. It
fine-tunes the current MACE on the original training frames plus every
labelled frame, by running mace-torch's ``mace_run_train`` (in a subprocess,
since the trainer changes global torch and logging state) with
``--foundation_model`` pointing at the current weights, then refits the PROBE
head for the new backbone with the old head's criterion and tolerance (or,
when the retrained backbone is within that tolerance on every fit frame, with
tau at the old head's quantile, with a warning).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ase import Atoms
from ase.io import write

from .calculator import ProbeCalculator
from .dataset import Frames, read_frames, reference_energy, reference_forces
from .exceptions import InputError, LabelError, ProbeError
from .fit import TrainConfig, fit_probe


def _with_ref_keys(frames: Sequence[Atoms]) -> list[Atoms]:
    """Copies carrying ``REF_energy`` / ``REF_forces``, the keys mace-torch reads."""
    out = []
    for atoms in frames:
        energy, forces = reference_energy(atoms), reference_forces(atoms)
        if energy is None or forces is None:
            raise InputError("every training frame needs a reference energy (eV) and forces (eV/Å)")
        copy = atoms.copy()
        copy.calc = None
        copy.info = {"REF_energy": energy}
        copy.arrays["REF_forces"] = forces
        out.append(copy)
    return out


def run_mace_train(frames: Sequence[Atoms], foundation: str | os.PathLike, work_dir: str | os.PathLike,
                   name: str, epochs: int = 20, seed: int = 0, extra_args: Sequence[str] = ()) -> Path:
    """Fine-tune ``foundation`` on ``frames`` with ``mace_run_train``; return the new model path."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / f"{name}_train.xyz"
    write(train_file, _with_ref_keys(frames), format="extxyz")
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
        raise ProbeError(f"mace_run_train failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return model


def mace_trainer(
    train_data: Frames,
    fit_data: Frames,
    work_dir: str | os.PathLike = "al-retrain",
    epochs: int = 20,
    head_epochs: int = 100,
    seed: int = 0,
) -> Callable[[list[Atoms], int], ProbeCalculator]:
    """A retraining step for :meth:`ActiveLearner.retrain`.

    Args:
        train_data: the backbone's original training frames (eV, eV/Å).
        fit_data: labelled frames the head is refitted on, together with the
            newly labelled ones (never the backbone's training frames).
        work_dir: folder for training files, logs and models.
        epochs: fine-tuning epochs per round.
        head_epochs: most epochs for the head refit.
    """
    train_frames, fit_frames = read_frames(train_data), read_frames(fit_data)

    def retrain(labelled: list[Atoms], round: int, current: ProbeCalculator) -> ProbeCalculator:
        from mace.calculators import MACECalculator

        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        foundation = work / f"round{round}_start.model"
        current.tap.save_backbone(foundation)
        model = run_mace_train(train_frames + labelled, foundation, work, f"round{round}", epochs, seed)
        base = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
        meta = current.probe.meta
        options = dict(criterion=meta.criterion, target_risk=meta.target_risk, layers=meta.layers,
                       config=meta.config, train=TrainConfig(epochs=head_epochs, seed=seed),
                       cache_dir=False, progress=False)
        try:  # keep the user's tolerance where the data still hold both classes under it
            probe = fit_probe(base, fit_frames + labelled, threshold=meta.tau, **options)
        except LabelError as err:
            quantile = meta.quantile or 0.8
            warnings.warn(f"{err}; refitting the head with tau at the {quantile:.0%} quantile instead", stacklevel=2)
            probe = fit_probe(base, fit_frames + labelled, quantile=quantile, **options)
        probe.save(work / f"round{round}_probe.pt")
        return ProbeCalculator(base, probe)

    return retrain
