"""``probe-ase al``: active-learning rounds from a TOML config file.

The file is read into a typed, frozen :class:`~probe_ase.al.config.AlConfig`
(the keys, their defaults and units are documented there): unknown keys,
missing ones, wrong types and out-of-range numbers are errors before any work.
Example config (units: K, fs, 1/fs, Å, s; a value shown is the default unless its comment names another)::

    backbone = "model.model"      # MACE model file
    probe = "probe.pt"            # head file
    db = "al.db"                  # SQLite file, or postgresql://user@host:port/name (the postgres extra)
    start = "start.xyz"           # start structures (every frame)
    rounds = 2                    # rounds in all (default 1); a restarted run finishes the interrupted one first

    [reference]
    calculator = "ase.calculators.emt:EMT"   # module:attribute of a calculator class or factory
    options = {}                             # keyword arguments for it
    # or, instead of both, DFT for molecules with PySCF (the pyscf extra; every key: the PySCF how-to):
    # pyscf = {xc = "PBE", basis = "def2-SVP", charge = 0, threads = 1}

    [explore]
    ensemble = "nvt"              # nve, nvt or npt
    temperature = 600             # K (default 300)
    timestep = 1.0                # fs
    friction = 0.01               # 1/fs
    steps = 500                   # MD steps per start structure and round
    max_new = 20                  # frames selected per round, at most
    min_separation = 10           # steps between two selected frames of a trajectory
    # seed = 0                    round N draws velocities with seed + N
    # p_lo = 0.1, p_hi = 0.5      reliability band edges in [0, 1] (default: p*/2 and p*)
    # region_buffer = 6.0         big cells: label regions (unreliable atoms + this buffer, Å); default: whole cells
    # min_atom_reliability = "auto"   in [0, 1]; needs a head fitted with --atom-tolerance; "auto": the head's atom p*
    # companion = "7net-l3i5"     a second model: its force disagreement also selects frames (default: none)
    # companion_every = 1         run it every this many steps (>= 1)
    # vouch = 0.0                 in [0, 1]: outside the support, agreement within vouch x tau makes a step reliable
    # disagreement_hi = 3.0       >= 1: disagreement beyond this multiple of tau is failed, below it a candidate

    [label]
    workers = 1                   # > 1: a process pool of this size
    retries = 1
    lease = 60.0                  # s: a dead driver's frames are taken over after this (live ones renew it)

    [retrain]                     # optional: omit to only explore and label
    method = "train"              # "train": MACE by mace_run_train; "fine-tune": MACE or CHGNet by its own trainer
    train_data = "train.xyz"      # the backbone's own training frames ("train" needs them; optional to fine-tune)
    fit_data = "pool.xyz"         # frames the head is refitted on (with the new ones)
    epochs = 20
    # learning_rate = 1e-3        fine-tune only: the trainer's initial learning rate (default: its own)
    work_dir = "al-retrain"       # training files; each round's model and head (resumed from after a crash)

A run killed at any point resumes where it stopped when started again: the
last finished round's retrained model and head replace ``backbone`` and
``probe``, and an interrupted round is finished (its pending frames labelled,
nothing labelled twice) before the next starts. ``probe-ase al --check
al.toml`` checks the database instead (exit status 1 on a problem).
"""

from __future__ import annotations

import argparse

from probe_ase.cli.options import add_device

HELP = "run active-learning rounds (explore, label with a reference, retrain) from a TOML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``probe-ase al``'s arguments: the TOML config file, ``--device`` and ``--check``."""
    essential = parser.add_argument_group("essential")
    essential.add_argument("config", help="TOML config file (see 'probe-ase al --help' and the README)")
    add_device(essential)
    essential.add_argument("--check", action="store_true",
                           help="only check the config's database (statuses, reference results, claims, round "
                                "files); exit status 1 on a problem")


def check(args: argparse.Namespace) -> None:
    """The device, the config (keys, value types and ranges) and every file it names, before any work.

    Sets ``args.settings`` (the :class:`~probe_ase.al.config.AlConfig` read).
    """
    from probe_ase.al.config import AlConfig
    from probe_ase.cli import checks

    checks.device(args.device)
    checks.input_file(args.config, "CONFIG", "config file")
    config = args.settings = AlConfig.from_toml(args.config)
    where = f"in {args.config}"
    if args.check:
        if "://" not in config.db:
            checks.input_file(config.db, f"db {where}", "database")
        return
    if "://" not in config.db:
        checks.output_file(config.db, f"db {where}")
    checks.backbone_source(config.backbone, f"backbone {where}")
    checks.head_file(config.probe, f"probe {where}")
    checks.structures(config.start, f"start {where}")
    if config.retrain is not None and config.retrain.train_data is not None:
        checks.structures(config.retrain.train_data, f"retrain.train_data {where}")
    if config.retrain is not None:
        checks.structures(config.retrain.fit_data, f"retrain.fit_data {where}")
        checks.output_folder(config.retrain.work_dir, f"retrain.work_dir {where}")
    config.reference.factory()  # importable


def run(args: argparse.Namespace) -> int:
    """Run the config's active-learning rounds (or, with ``--check``, check its database); returns the exit status."""
    from concurrent.futures import ProcessPoolExecutor

    from probe_ase.al.config import AlConfig
    from probe_ase.al.finetune import FINE_TUNABLE
    from probe_ase.exceptions import BackboneError
    from probe_ase.al.learner import ActiveLearner, RoundReport
    from probe_ase.al.store import ALStore, check_database
    from probe_ase.backbones import load_backbone
    from probe_ase.calculator import ProbeCalculator
    from probe_ase.fitting.data import read_frames

    config = args.settings if getattr(args, "settings", None) is not None else AlConfig.from_toml(args.config)
    if args.check:
        report = check_database(config.db)
        print(report)
        return 0 if report.ok else 1
    explore, label, retrain = config.explore, config.label, config.retrain
    checkpoint = ALStore(config.db, lease=label.lease).checkpoint()
    backbone, head = (config.backbone, config.probe) if checkpoint is None else (checkpoint.model, checkpoint.probe)
    if checkpoint is not None:
        print(f"resuming after round {checkpoint.round}: backbone {backbone}, head {head}")
    companion = None if explore.companion is None else load_backbone(explore.companion, device=args.device)
    probe_calc = ProbeCalculator(load_backbone(backbone, device=args.device), head, companion=companion,
                                 companion_every=explore.companion_every, vouch=explore.vouch)
    if retrain is not None and retrain.method == "fine-tune" and probe_calc.tap.kind not in FINE_TUNABLE:
        raise BackboneError(f"[retrain] method = \"fine-tune\" in {args.config}: no fine-tuning route for a "
                            f"{probe_calc.tap.kind} backbone (routes: {', '.join(FINE_TUNABLE)})",
                            kind=probe_calc.tap.kind)
    executor = ProcessPoolExecutor(label.workers) if label.workers > 1 else None
    learner = ActiveLearner(probe_calc, config.reference.factory(), db=config.db, executor=executor,
                            p_lo=explore.p_lo, p_hi=explore.p_hi, retries=label.retries,
                            region_buffer=explore.region_buffer, min_atom_reliability=explore.min_atom_reliability,
                            lease=label.lease, disagreement_hi=explore.disagreement_hi)
    work_dir = None if retrain is None else retrain.work_dir
    trainer = None if retrain is None else retrain.trainer()
    starts = read_frames(config.start)
    learner.resume(progress=not args.quiet)  # frames an interrupted run left pending, whatever their round
    rows = [RoundReport.HEADER]
    if learner.finished_rounds >= config.rounds:
        print(f"all {config.rounds} rounds are finished in {config.db}")
    while learner.finished_rounds < config.rounds:
        report = learner.run_round(starts, md=lambda atoms: explore.dynamics(atoms, learner.round),
                                   steps=explore.steps, max_new=explore.max_new,
                                   min_separation=explore.min_separation, trainer=trainer,
                                   progress=not args.quiet, checkpoint_dir=work_dir)
        rows.append(report.row())
        print(rows[-1])
    if executor is not None:
        executor.shutdown()
    print("\n".join(rows))
    print(f"database {learner.db_path}: {learner.status_counts()}")
    return 0
