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
    # min_atom_reliability = "auto"   needs a head fitted with --atom-tolerance; "auto": the head's atom p*

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

from probe_ase.cli.options import DYNAMICS, add_device

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
    essential = parser.add_argument_group("essential")
    essential.add_argument("config", help="TOML config file (see 'probe-ase al --help' and the README)")
    add_device(essential)
    essential.add_argument("--check", action="store_true",
                           help="only check the config's database (statuses, reference results, claims, round "
                                "files); exit status 1 on a problem")


#: [section] key -> (kind, lowest allowed value, unit), checked before any work
NUMBERS = {
    ("", "rounds"): (int, 1, ""), ("explore", "temperature"): (float, 0, " K"),
    ("explore", "timestep"): (float, 1e-300, " fs"), ("explore", "friction"): (float, 1e-300, " 1/fs"),
    ("explore", "steps"): (int, 1, ""), ("explore", "max_new"): (int, 1, ""),
    ("explore", "min_separation"): (int, 1, " steps"), ("explore", "seed"): (int, 0, ""),
    ("explore", "p_lo"): (float, 0, ""), ("explore", "p_hi"): (float, 0, ""),
    ("explore", "region_buffer"): (float, 0, " Å"), ("label", "workers"): (int, 1, ""),
    ("label", "retries"): (int, 0, ""), ("label", "lease"): (float, 1e-300, " s"),
    ("retrain", "epochs"): (int, 1, ""),
}


def check(args: argparse.Namespace) -> None:
    """The device, the config (keys, value types and ranges) and every file it names, before any work.

    Sets ``args.settings`` (the config as read).
    """
    from probe_ase.cli import checks
    from probe_ase.exceptions import InputError

    checks.device(args.device)
    checks.input_file(args.config, "CONFIG", "config file")
    config = args.settings = load_config(args.config)
    where = f"in {args.config}"
    for (section, key), (kind, low, unit) in NUMBERS.items():
        table = config if not section else config.get(section) or {}
        if key not in table:
            continue
        value, name = table[key], f"{section + '.' if section else ''}{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise InputError(f"{name} {where} must be {'a whole number' if kind is int else 'a number'}{unit}, got "
                             f"{value!r}", path=args.config, key=name, value=value)
        if value < low or (key in ("p_lo", "p_hi") and value > 1):
            span = "in [0, 1]" if key in ("p_lo", "p_hi") else ("positive" if 0 < low < 1 else f">= {low}")
            raise InputError(f"{name} {where} must be {span}{unit}, got {value}", path=args.config, key=name,
                             value=value)
    explore = config.get("explore") or {}
    if explore.get("ensemble", "nvt") not in DYNAMICS:
        raise InputError(f"explore.ensemble {where} must be one of {', '.join(DYNAMICS)}, got "
                         f"{explore['ensemble']!r}", path=args.config, value=explore["ensemble"])
    db = str(config.get("db", "al.db"))
    if args.check:
        if "://" not in db:
            checks.input_file(db, f"db {where}", "database")
        return
    if "://" not in db:
        checks.output_file(db, f"db {where}")
    checks.backbone_source(str(config["backbone"]), f"backbone {where}")
    checks.head_file(str(config["probe"]), f"probe {where}")
    checks.structures(str(config["start"]), f"start {where}")
    retrain = config.get("retrain")
    if retrain is not None:
        for key in ("train_data", "fit_data"):
            if key not in retrain:
                raise InputError(f"[retrain] {where} lacks {key}", path=args.config, missing=key)
            checks.structures(str(retrain[key]), f"retrain.{key} {where}")
        checks.output_folder(str(retrain.get("work_dir", "al-retrain")), f"retrain.work_dir {where}")
    reference = config["reference"]
    if not isinstance(reference, dict) or not isinstance(reference.get("calculator"), str):
        raise InputError(f"[reference] {where} needs calculator = \"module:attribute\" (e.g. "
                         "\"ase.calculators.emt:EMT\")", path=args.config)
    if not isinstance(reference.get("options", {}), dict):
        raise InputError(f"reference.options {where} must be a table of keyword arguments", path=args.config)
    reference_factory(reference)  # importable


def load_config(path: str) -> dict:
    """Read and check the TOML config: unknown keys are errors."""
    import tomllib

    from probe_ase.exceptions import InputError

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

    from probe_ase.exceptions import InputError

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

    from probe_ase.al.learner import ActiveLearner, RoundReport
    from probe_ase.al.retrain import MaceTrainer
    from probe_ase.al.store import ALStore, check_database
    from probe_ase.backbones import load_backbone
    from probe_ase.calculator import ProbeCalculator
    from probe_ase.fitting.data import read_frames
    from probe_ase.md import make_dynamics

    config = args.settings if getattr(args, "settings", None) is not None else load_config(args.config)
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

    learner.resume(progress=not args.quiet)  # frames an interrupted run left pending, whatever their round
    rows = [RoundReport.HEADER]
    rounds = int(config.get("rounds", 1))
    if learner.finished_rounds >= rounds:
        print(f"all {rounds} rounds are finished in {db}")
    while learner.finished_rounds < rounds:
        report = learner.run_round(starts, md=md, steps=int(explore.get("steps", 500)),
                                   max_new=int(explore.get("max_new", 20)),
                                   min_separation=int(explore.get("min_separation", 10)), trainer=trainer,
                                   progress=not args.quiet,
                                   checkpoint_dir=work_dir)
        rows.append(report.row())
        print(rows[-1])
    if executor is not None:
        executor.shutdown()
    print("\n".join(rows))
    print(f"database {learner.db_path}: {learner.status_counts()}")
    return 0
