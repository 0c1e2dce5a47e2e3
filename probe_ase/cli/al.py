"""``probe-ase al``: active-learning rounds from a TOML config file.

Example config (units: K, fs, 1/fs)::

    backbone = "model.model"      # MACE model file
    probe = "probe.pt"            # head file
    db = "al.db"                  # SQLite file, or postgresql://user@host:port/name (the postgres extra)
    start = "start.xyz"           # start structures (every frame)
    rounds = 2                    # rounds in all: a restarted run finishes the interrupted one, then the rest

    [reference]
    calculator = "ase.calculators.emt:EMT"   # module:attribute of a calculator class or factory
    options = {}                             # keyword arguments for it

    [explore]
    ensemble = "nvt"
    temperature = 600
    timestep = 1.0
    friction = 0.01
    steps = 500
    max_new = 20
    min_separation = 10
    # p_lo = 0.1, p_hi = 0.5    (default: p*/2 and p*)
    # region_buffer = 6.0       big cells: label regions (unreliable atoms + this buffer, Å), not whole cells;
    # min_atom_reliability = "auto"   needs a head fitted with --atom-threshold; "auto": the head's atom p*

    [label]
    workers = 1                   # > 1: a process pool of this size
    retries = 1
    lease = 60.0                  # s: a dead driver's frames are taken over after this (live ones renew it)

    [retrain]                     # optional: omit to only explore and label
    train_data = "train.xyz"      # the backbone's own training frames
    fit_data = "pool.xyz"         # frames the head is refitted on (with the new ones)
    epochs = 20
    work_dir = "al-retrain"       # training files; each round's model and head (resumed from after a crash)

A run killed at any point resumes where it stopped when started again: the
last finished round's retrained model and head replace ``backbone`` and
``probe``, and an interrupted round is finished (its pending frames labelled,
nothing labelled twice) before the next starts. ``probe-ase al --check
al.toml`` checks the database instead (exit status 1 on a problem).
"""

from __future__ import annotations

import argparse

HELP = "run active-learning rounds (explore, label with a reference, retrain) from a TOML config"

SECTIONS = {
    "": {"backbone", "probe", "db", "start", "rounds", "reference", "explore", "label", "retrain"},
    "reference": {"calculator", "options"},
    "explore": {"ensemble", "temperature", "timestep", "friction", "steps", "max_new", "min_separation",
                "p_lo", "p_hi", "seed", "region_buffer", "min_atom_reliability"},
    "label": {"workers", "retries", "lease"},
    "retrain": {"train_data", "fit_data", "epochs", "work_dir"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase al``'s arguments: the TOML config file, ``--device`` and ``--check``."""
    parser.add_argument("config", help="TOML config file (see 'probe-ase al --help' and the README)")
    parser.add_argument("--device", default="cpu", help="torch device for the backbone (default: cpu)")
    parser.add_argument("--check", action="store_true",
                        help="only check the config's database (statuses, reference results, claims, round files); "
                             "exit status 1 on a problem")


def load_config(path: str) -> dict:
    """Read and check the TOML config: unknown keys are errors."""
    import tomllib

    from ..exceptions import InputError

    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"cannot read config {path}: {err}", path=path) from err
    for section, allowed in SECTIONS.items():
        table = config if not section else config.get(section, {})
        unknown = set(table) - allowed
        if unknown:
            where = f"[{section}]" if section else "the top level"
            raise InputError(f"unknown keys {sorted(unknown)} in {where} of {path}; allowed: {sorted(allowed)}",
                             path=path, section=section, unknown=sorted(unknown), allowed=sorted(allowed))
    missing = {"backbone", "probe", "start", "reference"} - set(config)
    if missing:
        raise InputError(f"config {path} lacks {sorted(missing)}", path=path, missing=sorted(missing))
    return config


def reference_factory(spec: dict):
    """A picklable factory for the reference calculator named ``module:attribute``."""
    import functools
    import importlib

    from ..exceptions import InputError

    module_name, _, attribute = spec["calculator"].partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import reference calculator {spec['calculator']!r}: {err}",
                         calculator=spec["calculator"]) from err
    return functools.partial(factory, **spec.get("options", {}))


def run(args: argparse.Namespace) -> int:
    """Run the config's active-learning rounds (or, with ``--check``, check its database); returns the exit status."""
    from concurrent.futures import ProcessPoolExecutor

    from ..active_learning import ActiveLearner, RoundReport
    from ..backbones import load_backbone
    from ..calculator import ProbeCalculator
    from ..dataset import read_frames
    from ..md import make_dynamics
    from ..retrain import MaceTrainer
    from ..store import ALStore, check_database

    config = load_config(args.config)
    db = config.get("db", "al.db")
    if args.check:
        report = check_database(db)
        print(report)
        return 0 if report.ok else 1
    explore, label, retrain = config.get("explore", {}), config.get("label", {}), config.get("retrain")
    lease = float(label.get("lease", 60.0))
    checkpoint = ALStore(db, lease=lease).checkpoint()
    backbone, head = (config["backbone"], config["probe"]) if checkpoint is None else (checkpoint.model,
                                                                                      checkpoint.probe)
    if checkpoint is not None:
        print(f"resuming after round {checkpoint.round}: backbone {backbone}, head {head}")
    probe_calc = ProbeCalculator(load_backbone(backbone, device=args.device), head)
    workers = int(label.get("workers", 1))
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    learner = ActiveLearner(probe_calc, reference_factory(config["reference"]), db=db,
                            executor=executor, p_lo=explore.get("p_lo"), p_hi=explore.get("p_hi"),
                            retries=int(label.get("retries", 1)), region_buffer=explore.get("region_buffer"),
                            min_atom_reliability=explore.get("min_atom_reliability", "auto"), lease=lease)
    work_dir = None if retrain is None else retrain.get("work_dir", "al-retrain")
    trainer = None if retrain is None else MaceTrainer(
        retrain["train_data"], retrain["fit_data"], work_dir, int(retrain.get("epochs", 20)))
    starts = read_frames(config["start"])

    def md(atoms):
        return make_dynamics(atoms, explore.get("ensemble", "nvt"), float(explore.get("temperature", 300)),
                             float(explore.get("timestep", 1.0)), float(explore.get("friction", 0.01)),
                             seed=int(explore.get("seed", 0)) + learner.round)

    learner.resume()  # frames an interrupted run left pending, whatever their round
    rows = [RoundReport.HEADER]
    rounds = int(config.get("rounds", 1))
    if learner.finished_rounds >= rounds:
        print(f"all {rounds} rounds are finished in {db}")
    while learner.finished_rounds < rounds:
        report = learner.run_round(starts, md=md, steps=int(explore.get("steps", 500)),
                                   max_new=int(explore.get("max_new", 20)),
                                   min_separation=int(explore.get("min_separation", 10)), trainer=trainer,
                                   checkpoint_dir=work_dir)
        rows.append(report.row())
        print(rows[-1])
    if executor is not None:
        executor.shutdown()
    print("\n".join(rows))
    print(f"database {learner.db_path}: {learner.status_counts()}")
    return 0
