"""Helpers shared by the benchmark scripts.

The data sets and their splits (:func:`load_splits`), the backbones
(:func:`train_mace`, :func:`train_spk`, :func:`make_calc`, and the members a
``uq_quality`` run leaves in its models folder: :func:`members`), fitting a
head with study settings (:func:`fit`, :func:`study_configs`), and writing
results (:func:`clean`, :func:`fmt`, :func:`write_json`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ase.io import read, write

from probe_ase.al.retrain import mace_training_frames
from probe_ase.fileio import atomic_write
from probe_ase.fitting.data import reference_energy, reference_forces
from probe_ase.fitting.pipeline import Configs, fit_probe, fit_spec, internal_configs
from probe_ase.fitting.spec import FitOptions, FitSpec

#: the training ``fit_probe`` ran by default before FitOptions (TrainConfig's defaults, 200 epochs, patience 25):
#: the scripts whose published results were fitted with those defaults keep them
LEGACY_OPTIONS = FitOptions(epochs=200, patience=25)
#: the fields of each configuration that FitOptions sets (``internal_configs``): pass them in ``options``
OPTION_FIELDS = {"head": {"hidden", "cutoff", "members"},
                 "train": {"epochs", "patience", "seed", "calibration", "folds"},
                 "novelty": {"support_quantile", "weight_folds"}}


def study_configs(options: FitOptions, head: dict | None = None, train: dict | None = None,
                  novelty: dict | None = None) -> Configs:
    """The configurations ``options`` give, with study knobs beyond FitOptions changed.

    ``head``, ``train`` and ``novelty`` are field values of HeadConfig,
    TrainConfig and NoveltyConfig (e.g. ``head={"blocks": 2}``); fields that
    FitOptions sets belong in ``options`` and raise ValueError here.
    """
    changes = {"head": head or {}, "train": train or {}, "novelty": novelty or {}}
    for name, fields in OPTION_FIELDS.items():
        clash = fields & set(changes[name])
        if clash:
            raise ValueError(f"{sorted(clash)} are FitOptions fields: pass them in options, not {name}=")
    base = internal_configs(FitSpec(options=options))
    return Configs(replace(base.head, **changes["head"]), replace(base.train, **changes["train"]),
                   replace(base.novelty, **changes["novelty"]))


def fit(calc, data, options: FitOptions = FitOptions(), *, head: dict | None = None, train: dict | None = None,
        novelty: dict | None = None, reference_data=None, cache_dir=None, progress: bool = True, **spec):
    """A fitted Probe: ``fit_probe(calc, data, options=options, **spec)`` when no study knob changes, else
    ``fit_spec`` with :func:`study_configs` (``spec``: fit_probe's keywords criterion, tolerance, quantile, ...)."""
    configs = study_configs(options, head, train, novelty)
    where = dict(reference_data=reference_data, cache_dir=cache_dir, progress=progress)
    if configs == internal_configs(FitSpec(options=options)):
        return fit_probe(calc, data, options=options, **spec, **where)
    return fit_spec(calc, data, FitSpec(options=options, **spec), configs=configs, **where)


# --------------------------------------------------------------------------- data
def load_splits(data: Path, quick: bool, seed: int = 0) -> tuple[str, list, list, list, dict[str, list], dict]:
    """``(name, train, fit_pool, fit_pool_in_distribution, eval_files, e0s)`` for acac or ethanol."""
    rng = np.random.default_rng(seed)

    def rd(name):
        return read(data / name, ":")

    def halves(frames):
        perm = rng.permutation(len(frames))
        h = len(frames) // 2
        return [frames[i] for i in sorted(perm[:h])], [frames[i] for i in sorted(perm[h:])]

    def is_methanol(a):
        return a.info.get("config_type") == "methanol" or len(a) == 6

    if (data / "train_300K.xyz").exists():
        name = "acac"
        train = rd("train_300K.xyz")
        fit_md, eval_md = halves(rd("test_MD_300K.xyz"))
        fit = {"test_MD_300K (half)": fit_md, "train_600K": rd("train_600K.xyz")}
        evals = {"test_MD_300K (half)": eval_md, "test_MD_600K": rd("test_MD_600K.xyz"),
                 "test_H_transfer": rd("test_H_transfer.xyz"), "test_dihedral": rd("test_dihedral.xyz")}
    elif (data / "train_eth_meth.xyz").exists():
        name = "ethanol"
        train = rd("train.xyz")
        fit_md, eval_md = halves(rd("test_MD.xyz"))
        fit = {"test_MD (half)": fit_md, "train_eth_meth methanol": [a for a in rd("train_eth_meth.xyz") if is_methanol(a)]}
        evals = {"test_MD (half)": eval_md,
                 "test_eth_meth methanol": [a for a in rd("test_eth_meth.xyz") if is_methanol(a)],
                 "test_H_removal": rd("test_H_removal.xyz")}
        for p in sorted(data.glob("test_norm_mode_*.xyz")):
            evals[p.stem] = rd(p.name)
    else:
        raise SystemExit(f"{data}: neither an acac nor an ethanol folder (see shared/data/README.md)")
    present = {int(z) for a in train for z in a.numbers}  # ethanol's file also lists N, absent from training
    e0s = {int(a.numbers[0]): float(reference_energy(a)) for a in rd("isolated_atoms.xyz") if a.numbers[0] in present}
    if quick:  # seeded subsamples, same for every rerun
        def sub(frames, n):
            if len(frames) <= n:
                return frames
            return [frames[i] for i in sorted(rng.choice(len(frames), n, replace=False))]
        train = sub(train, 100)
        fit = {k: sub(v, 100) for k, v in fit.items()}
        evals = {k: sub(v, 60) for k, v in evals.items()}
    pool = [a for frames in fit.values() for a in frames]
    return name, train, pool, list(fit.values())[0], evals, e0s


def has_forces(frames) -> bool:
    return all(reference_forces(a) is not None for a in frames)


# --------------------------------------------------------------------------- backbones
def train_mace(train, e0s, models: Path, channels: int, max_l: int, epochs: int, seed: int,
               retrain: bool, dtype: str = "float32") -> Path:
    """One MACE via mace-torch's ``mace_run_train`` (subprocess); cached by settings and seed."""
    tag = f"ssmace_c{channels}_L{max_l}_e{epochs}_n{len(train)}_{dtype}_s{seed}"
    final = models / f"{tag}.model"
    if final.exists() and not retrain:
        return final
    work = models / "mace_work"
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / f"train_n{len(train)}.xyz"
    if not train_file.exists() or retrain:
        write(train_file, mace_training_frames(train), format="extxyz")
    trainer = shutil.which("mace_run_train") or str(Path(sys.executable).with_name("mace_run_train"))
    for old in (work / "checkpoints").glob(f"{tag}*") if (work / "checkpoints").exists() else []:
        old.unlink()
    args = [trainer, f"--name={tag}", f"--train_file={train_file}", "--valid_fraction=0.05",
            f"--work_dir={work}", f"--model_dir={work / 'out'}", "--model=ScaleShiftMACE",
            f"--num_channels={channels}", f"--max_L={max_l}", "--num_interactions=2", "--correlation=3",
            "--r_max=5.0", f"--max_num_epochs={epochs}", "--batch_size=10", "--valid_batch_size=20",
            "--device=cpu", f"--default_dtype={dtype}", f"--E0s={e0s!r}",
            "--energy_key=REF_energy", "--forces_key=REF_forces", "--energy_weight=1", "--forces_weight=100",
            "--plot=False", "--log_level=WARNING", f"--seed={seed}", "--save_cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    model = work / "out" / f"{tag}.model"
    if done.returncode != 0 or not model.exists():
        raise RuntimeError(f"mace_run_train failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    os.replace(model, final)
    return final


def train_spk(train, e0s, models: Path, rep: str, width: int, epochs: int, seed: int, retrain: bool) -> Path:
    """One SchNetPack model with schnetpack's own lightning trainer; cached by settings and seed.

    ``ASEAtomsData`` (eV, Å) with the isolated-atom energies as atom references,
    ``AtomsDataModule`` (95/5 train/validation split, seeded), ``RemoveOffsets``
    (atom references and mean), ``AtomisticTask`` with energy and force MSE
    (weights 0.01 / 0.99 as in schnetpack's MD17 recipe), AdamW, the best
    validation checkpoint kept by ``spk.train.ModelCheckpoint``.
    """
    import pytorch_lightning as pl
    import schnetpack as spk
    import schnetpack.transform as trn
    import torchmetrics

    final = models / f"spkpl_{rep}_f{width}_e{epochs}_n{len(train)}_s{seed}.pt"
    if final.exists() and not retrain:
        return final
    work = models / f"spk_work_{final.stem}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomrefs = [0.0] * 100
    for z, e in e0s.items():
        atomrefs[z] = e
    db = spk.data.ASEAtomsData.create(str(work / "train.db"), distance_unit="Ang",
                                      property_unit_dict={"energy": "eV", "forces": "eV/Ang"},
                                      atomrefs={"energy": atomrefs})
    plain = [a.copy() for a in train]
    db.add_systems([{"energy": np.array([reference_energy(a)]), "forces": reference_forces(a)} for a in train], plain)
    pl.seed_everything(seed, workers=True)
    n_val = max(1, len(train) // 20)
    cutoff = 5.0
    data = spk.data.AtomsDataModule(
        str(work / "train.db"), batch_size=16, num_train=len(train) - n_val, num_val=n_val, num_test=0,
        transforms=[trn.ASENeighborList(cutoff=cutoff), trn.RemoveOffsets("energy", remove_mean=True, remove_atomrefs=True),
                    trn.CastTo32()],
        split_file=str(work / "split.npz"), num_workers=0, pin_memory=False, load_properties=["energy", "forces"])
    radial = spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff)
    cls = {"painn": spk.representation.PaiNN, "schnet": spk.representation.SchNet}[rep]
    representation = cls(n_atom_basis=width, n_interactions=2, radial_basis=radial, cutoff_fn=spk.nn.CosineCutoff(cutoff))
    model = spk.model.NeuralNetworkPotential(
        representation=representation, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=width, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True, add_atomrefs=True)])
    outputs = [spk.task.ModelOutput(name="energy", loss_fn=torch.nn.MSELoss(), loss_weight=0.01,
                                    metrics={"MAE": torchmetrics.MeanAbsoluteError()}),
               spk.task.ModelOutput(name="forces", loss_fn=torch.nn.MSELoss(), loss_weight=0.99,
                                    metrics={"MAE": torchmetrics.MeanAbsoluteError()})]
    task = spk.task.AtomisticTask(model=model, outputs=outputs, optimizer_cls=torch.optim.AdamW,
                                  optimizer_args={"lr": 1e-3})
    best = work / "best_model"
    trainer = pl.Trainer(default_root_dir=str(work), max_epochs=epochs, accelerator="cpu", devices=1,
                         callbacks=[spk.train.ModelCheckpoint(model_path=str(best), save_top_k=1, monitor="val_loss")],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, datamodule=data)
    os.replace(best, final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def make_calc(kind: str, path: Path | list[Path]):
    if kind == "mace":
        from mace.calculators import MACECalculator

        paths = [str(p) for p in path] if isinstance(path, list) else str(path)
        return MACECalculator(model_paths=paths, device="cpu", default_dtype="float32")
    from probe_ase.taps.schnetpack import spk_calculator

    return spk_calculator(path)

# --------------------------------------------------------------------------- a uq_quality run's members
#: the file names of each backbone's members in a ``uq_quality`` models folder (``{seed}``: a glob of seeds)
MEMBER_FILES = {"mace": "ssmace_c16_L1_e20_*_s{seed}.model", "schnetpack": "spkpl_painn_f32_e25_*_s{seed}.pt"}
#: member 0 of each backbone
MEMBER0 = {kind: pattern.format(seed=0) for kind, pattern in MEMBER_FILES.items()}


def find_members(models: Path, backbone: str = "mace", seeds: str = "0", count: int | None = None) -> list[Path]:
    """The members ``seeds`` (a glob: ``"0"``, ``"[0-4]"``) of ``backbone`` in a ``uq_quality`` models folder, sorted;
    exits with a message when there are none (or not ``count``)."""
    paths = sorted(Path(models).glob(MEMBER_FILES[backbone].format(seed=seeds)))
    if not paths or (count is not None and len(paths) != count):
        raise SystemExit(f"{models}: need {count or 'the'} {backbone} member(s) s{seeds} of uq_quality "
                         f"(found {len(paths)})")
    return paths


# --------------------------------------------------------------------------- results
def clean(x):
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    return x


def fmt(v, d=3):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def write_json(path: Path, data, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically (numpy numbers as floats)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent, default=float)))


def write_results(out: Path, res: dict, markdown, plot, figure: str) -> None:
    """``OUT/results.json``, ``OUT/results.md`` (``markdown(res)``) and the figure ``plot(res, OUT/figure)``."""
    write_json(out / "results.json", res, indent=1)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(res)))
    plot(res, out / figure)
    print(f"wrote {out}/results.json, results.md, {figure}")
