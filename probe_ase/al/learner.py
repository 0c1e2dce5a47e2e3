"""Active learning: explore with the MLIP, label only what PROBE distrusts, retrain.

Each round:

1. :meth:`ActiveLearner.explore` runs MD from start structures on the :class:`~probe_ase.ProbeCalculator`,
   sorts every step into the bands *reliable*, *candidate* and *failed* by reliability, novelty and a
   companion model's disagreement (:class:`~probe_ase.al.select.Bands`), and stores at most ``max_new``
   candidates as ``pending`` (:func:`~probe_ase.al.select.select`); a trajectory stops at its first
   failed step, which is stored ``rejected``.

   *Regions* (``region_buffer`` in Å; for big cells, DESIGN §9): atoms are
   judged too, a step with any unreliable atom is a candidate, and each
   selected frame stores the regions around its unreliable atoms as
   ``pending`` rows instead of the whole cell (:mod:`probe_ase.al.regions`;
   the source frame once, status ``source``).
2. :meth:`ActiveLearner.label` runs the reference calculator on every pending
   frame (:mod:`probe_ase.al.label`: claims, leases, retries, any executor), and
   :meth:`resume` finishes what an interrupted driver left. Each round is
   recorded in the database (``probe_rounds``: counts, then the retrained model
   and head), so :meth:`run_round` finishes an interrupted round before
   starting a new one.
3. :meth:`ActiveLearner.export` writes the labelled frames as extxyz, and
   :meth:`ActiveLearner.retrain` retrains the backbone (a user callback, or
   :class:`probe_ase.al.retrain.MaceTrainer` with mace-torch's own trainer) and
   refits the head.

The database is an ase.db (:mod:`probe_ase.al.store`): an SQLite file, or a PostgreSQL server
(``postgresql://...``, ``pip install probe-ase[postgres]``) for drivers on several machines.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from tqdm.auto import tqdm

from probe_ase.al.label import ReferenceFactory, label_pending
from probe_ase.al.regions import extract_regions
from probe_ase.al.select import Bands, Candidate, select
from probe_ase.al.store import STATUSES, ALStore, RoundRecord
from probe_ase.calculator import ProbeCalculator
from probe_ase.exceptions import InputError
from probe_ase.fileio import atomic_write
from probe_ase.fitting.labels import mean_force_rmse

MDFactory = Callable[[Atoms], MolecularDynamics]


def default_md(atoms: Atoms) -> MolecularDynamics:
    """Langevin at 300 K with 1 fs steps and friction 0.01 / fs."""
    return Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.01 / units.fs)


@dataclass
class RoundReport:
    """What one :meth:`ActiveLearner.run_round` did; force RMSEs in eV/Å (NaN when not measured)."""

    round: int
    explored: int
    selected: int
    labelled: int
    failed: int
    rejected: int
    force_rmse_before: float = float("nan")
    force_rmse_after: float = float("nan")

    #: column titles matching :meth:`row`
    HEADER = (f"{'round':>5} {'explored':>9} {'selected':>9} {'labelled':>9} {'failed':>7} {'rejected':>9} "
              f"{'F-RMSE before':>14} {'after':>8}  (meV/Å, on new frames held out of retraining)")

    def row(self) -> str:
        """One table line (force RMSE in meV/Å)."""
        return (f"{self.round:>5} {self.explored:>9} {self.selected:>9} {self.labelled:>9} {self.failed:>7} "
                f"{self.rejected:>9} {1000 * self.force_rmse_before:>14.1f} {1000 * self.force_rmse_after:>8.1f}")


class ActiveLearner:
    """Explore with a ProbeCalculator, label unreliable frames, retrain.

    Args:
        probe_calc: the MLIP wrapped in a :class:`~probe_ase.ProbeCalculator`.
        reference: factory returning a fresh reference calculator (eV, eV/Å);
            must be picklable for process pools and Dask (a class or
            ``functools.partial``, not a lambda).
        db: ase.db path or URL.
        executor: where reference calls run (default: serially, here).
        p_lo: lower band edge on reliability (0-1); default p*/2.
        p_hi: upper band edge on reliability (0-1); default the head's p*.
        novelty_hi: out-of-support frames (novelty above the calculator's
            ``max_novelty``) up to this novelty are candidates, beyond it failed.
        retries: extra attempts for a failing reference call before ``failed``.
        dedup_tol: candidates whose mean backbone features differ by less
            than this fraction are near-identical; only one is kept.
        region_buffer: label regions instead of whole cells: the unreliable
            atoms plus every atom within this radius (Å) of them (module
            docstring). None (default): whole frames.
        min_atom_reliability: with ``region_buffer``, an atom is unreliable
            below this ``atom_reliability`` (0-1); ``"auto"`` (default) takes
            the head's ``atom_p_star``.
        disagreement_hi: with a companion model on ``probe_calc``: a step whose
            models disagree by more than this multiple (>= 1) of the head's
            tolerance is failed, between 1 and it a candidate (module docstring).
        lease: seconds a labelling driver's claim on a frame lasts unless
            renewed (:func:`label_pending`): how long the frames of a driver
            that died wait before another takes them over.
    """

    def __init__(
        self,
        probe_calc: ProbeCalculator | None,
        reference: ReferenceFactory,
        db: str | os.PathLike = "al.db",
        executor: Executor | None = None,
        p_lo: float | None = None,
        p_hi: float | None = None,
        novelty_hi: float = 2.0,
        retries: int = 1,
        dedup_tol: float = 1e-3,
        region_buffer: float | None = None,
        min_atom_reliability: float | str = "auto",
        lease: float = 60.0,
        disagreement_hi: float = 3.0,
    ) -> None:
        self.probe_calc, self.reference, self.executor = probe_calc, reference, executor
        self.db_path, self.retries, self.dedup_tol = os.fspath(db), int(retries), float(dedup_tol)
        p_star = probe_calc.threshold if probe_calc is not None else 0.5
        self.p_hi = p_star if p_hi is None else float(p_hi)
        self.p_lo = self.p_hi / 2 if p_lo is None else float(p_lo)
        if not 0 <= self.p_lo <= self.p_hi <= 1:
            raise InputError(f"need 0 <= p_lo <= p_hi <= 1, got p_lo={self.p_lo}, p_hi={self.p_hi}",
                             p_lo=self.p_lo, p_hi=self.p_hi)
        self.novelty_hi = float(novelty_hi)
        if not disagreement_hi >= 1:
            raise InputError(f"disagreement_hi must be a multiple >= 1 of the head's tolerance, got {disagreement_hi}",
                             disagreement_hi=disagreement_hi)
        self.disagreement_hi = float(disagreement_hi)
        support = probe_calc.max_novelty if probe_calc is not None else 1.0
        if self.novelty_hi < support:
            raise InputError(f"novelty_hi={self.novelty_hi} lies inside the support (max_novelty={support})",
                             novelty_hi=self.novelty_hi, max_novelty=support)
        self.region_buffer = None if region_buffer is None else float(region_buffer)
        self.min_atom_reliability = None
        if self.region_buffer is not None:
            if not self.region_buffer > 0:
                raise InputError(f"region_buffer must be a positive radius (Å), got {region_buffer}",
                                 region_buffer=region_buffer)
            if probe_calc is None or not probe_calc.probe.meta.local:
                raise InputError("region labelling needs a head with per-atom reliability: refit it with "
                                 "atom_tolerance= (eV/Å) or atom_quantile=", region_buffer=self.region_buffer,
                                 local=probe_calc is not None and probe_calc.probe.meta.local)
            auto = min_atom_reliability == "auto"
            self.min_atom_reliability = probe_calc.probe.meta.atom_p_star if auto else float(min_atom_reliability)
        self.store = ALStore(self.db_path, lease=lease)
        self.db, self.lease = self.store.db, float(lease)
        rounds = self.store.rounds()
        self.round = max([row.get("round", 0) for row in self.db.select()] + [r.round for r in rounds], default=0)

    @property
    def finished_rounds(self) -> int:
        """The last round :meth:`run_round` finished (0: none); later rounds are unfinished."""
        return max((r.round for r in self.store.rounds() if r.finished is not None), default=0)

    # ---- exploration --------------------------------------------------------
    def explore(
        self,
        start_structures: Iterable[Atoms],
        md: MDFactory = default_md,
        steps: int = 1000,
        max_new: int = 50,
        min_separation: int = 10,
        progress: bool = True,
    ) -> dict[str, int]:
        """Run MD from each start structure and store this round's selected candidates as ``pending``.

        ``steps``: MD steps per start structure; at most ``max_new`` frames are kept, at least
        ``min_separation`` steps apart within a trajectory (module docstring). Returns counts: frames
        explored, candidates seen, selected, rejected (trajectories stopped in the failed band).
        """
        if self.probe_calc is None:
            raise InputError("explore needs a ProbeCalculator", probe_calc=None)
        self.round += 1
        candidates, rejected, explored = [], [], 0
        for index, start in enumerate(tqdm(list(start_structures), desc=f"explore round {self.round}",
                                           unit="trajectory", disable=not progress)):
            found, failed, n = self._explore_one(start, index, md, steps)
            candidates += found
            rejected += failed
            explored += n
        selected = self.select(candidates, max_new, min_separation)
        with self.store.transaction() as cur:  # the frames and the round's record, all or nothing
            for cand in selected + rejected:
                self._store(cand, "pending" if cand.band == "candidate" else "rejected")
            self.store.begin_round(cur, RoundRecord(self.round, explored, len(selected), len(rejected)))
        return {"explored": explored, "candidates": len(candidates), "selected": len(selected),
                "rejected": len(rejected)}

    def _explore_one(self, start: Atoms, index: int, md: MDFactory, steps: int):
        atoms = start.copy()
        atoms.calc = self.probe_calc
        dyn = md(atoms)
        found: list[Candidate] = []
        failed: list[Candidate] = []
        bands = self.bands

        def observe() -> None:
            p = float(self.probe_calc.get_property("reliability", atoms))
            results, second = self.probe_calc.results, self.probe_calc.disagreement
            gap = None if second is None else second.on(self.probe_calc.probe.meta.criterion)
            band = bands.band(p, float(results["novelty"]), gap)
            bad = None
            if self.region_buffer is not None:
                ok = self.probe_calc.probe.atom_verdict(results["atom_reliability"], results["atom_novelty"],
                                                        self.min_atom_reliability, self.probe_calc.max_novelty)
                bad = np.flatnonzero(~ok)
                if band == "reliable" and bad.size:
                    band = "candidate"  # the cell passes, some atoms do not
            if band == "reliable":
                return
            frame = atoms.copy()
            frame.calc = None
            frame.info["mlip_energy"] = float(results["energy"])
            frame.arrays["mlip_forces"] = np.array(results["forces"])
            for key in ("atom_importance", "atom_reliability"):
                if key in results:
                    frame.arrays[key] = np.array(results[key])
            fingerprint = self.probe_calc.tap.features()[: len(atoms)].mean(0).double().cpu().numpy()
            cand = Candidate(frame, p, float(results["novelty"]), band, index, dyn.nsteps, fingerprint, bad, gap)
            (found if band == "candidate" else failed).append(cand)
            if band == "failed":
                dyn.max_steps = dyn.nsteps  # stop this trajectory: too far off to be useful data

        dyn.attach(observe, interval=1)
        dyn.run(steps)
        return found, failed, dyn.nsteps + 1

    @property
    def bands(self) -> Bands:
        """This learner's band edges with the current calculator's ``tau``, ``max_novelty`` and ``vouch``."""
        calc = self.probe_calc
        return Bands(self.p_lo, self.p_hi, self.novelty_hi, self.disagreement_hi, calc.probe.meta.tau,
                     calc.max_novelty, calc.vouch)

    def select(self, candidates: Sequence[Candidate], max_new: int, min_separation: int) -> list[Candidate]:
        """:func:`~probe_ase.al.select.select`, against the frames already in the database."""
        known = [np.asarray(row.data["fingerprint"]) for row in self.db.select() if "fingerprint" in row.data]
        support = self.probe_calc.max_novelty if self.probe_calc is not None else 1.0
        return select(candidates, known, max_new, min_separation, support, self.dedup_tol)

    def _store(self, cand: Candidate, status: str) -> None:
        atoms = cand.atoms.copy()
        data = {"mlip_energy": atoms.info.pop("mlip_energy"), "mlip_forces": atoms.arrays.pop("mlip_forces"),
                "fingerprint": cand.fingerprint}
        data |= {key: atoms.arrays.pop(key) for key in ("atom_importance", "atom_reliability") if key in atoms.arrays}
        rows = dict(round=self.round, band=cand.band, reliability=cand.reliability, novelty=cand.novelty,
                    reason=self.bands.reason(cand), trajectory=cand.trajectory, step=cand.step)
        if cand.disagreement is not None:
            rows["disagreement"] = cand.disagreement
        if status != "pending" or cand.unreliable_atoms is None or not cand.unreliable_atoms.size:
            self.db.write(atoms, data=data, status=status, **rows)
            return
        source_id = self.db.write(atoms, data=data, status="source", **rows)
        for k, region in enumerate(extract_regions(atoms, cand.unreliable_atoms, self.region_buffer)):
            mlip = region.atoms.copy()
            mlip.calc = self.probe_calc.base  # the MLIP's own forces on the cut region
            self.db.write(region.atoms, status="pending", source_id=source_id, region=k,
                          periodic_region=region.periodic, n_core=int(region.core.sum()),
                          data={"source_index": region.source_index, "core": region.core,
                                "mlip_forces": np.array(mlip.get_forces())}, **rows)

    # ---- one whole round ----------------------------------------------------------
    def run_round(
        self,
        start_structures: Iterable[Atoms],
        md: MDFactory = default_md,
        *,
        trainer: Callable[[list[Atoms], int, ProbeCalculator], ProbeCalculator] | None = None,
        export: str | os.PathLike | None = None,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        **explore: int,
    ) -> RoundReport:
        """Explore, label, optionally export and retrain: one round of the loop.

        ``start_structures``, ``md`` and the ``explore`` keywords (``steps``, ``max_new``,
        ``min_separation``) go to :meth:`explore`; a keyword it does not take fails at once (``TypeError``).
        A round left unfinished (the process died after exploring) is finished first, without exploring
        again: its pending frames are labelled and the model retrained. ``export`` is an extxyz path for
        this round's labelled frames, where ``{round}`` is replaced by the round number. With a ``trainer``
        (at least two new frames) the backbone is retrained and, with ``checkpoint_dir``, the new backbone
        and head are saved there (``round{N}_backbone.model``, ``round{N}_head.pt``) and recorded with the
        round, so a restarted loop can continue from them (:meth:`ALStore.checkpoint
        <probe_ase.al.store.ALStore.checkpoint>`). When the trainer holds frames out (``trainer.held_out``,
        as :class:`~probe_ase.al.retrain.MaceTrainer` does) the MLIP's force RMSE on them (eV/Å) is
        measured before and after; without one, before only, on all new frames.
        """
        inspect.signature(self.explore).bind(start_structures, md, **explore)  # a wrong keyword fails even on resume
        record = next((r for r in self.store.rounds() if r.round == self.round), None)
        if record is None or record.finished is not None:
            self.explore(start_structures, md, progress=progress, **explore)
            record = next(r for r in self.store.rounds() if r.round == self.round)
        self.label(progress=progress)
        new = self.labelled(self.round)
        if export is not None:
            self.export(str(export).replace("{round}", str(self.round)), round=self.round)
        report = RoundReport(self.round, record.explored, record.selected, len(new),
                             self.db.count(status="failed", round=self.round), record.rejected)
        old = self.probe_calc.base
        model = head = None
        if trainer is not None and len(new) >= 2:
            new_calc = self.retrain(trainer).base
            held_out = getattr(trainer, "held_out", None)
            if held_out:
                report.force_rmse_before = mean_force_rmse(old, held_out)
                report.force_rmse_after = mean_force_rmse(new_calc, held_out)
            if checkpoint_dir is not None:
                model, head = self.save_checkpoint(checkpoint_dir)
        elif new:
            report.force_rmse_before = mean_force_rmse(old, new)
        self.store.finish_round(self.round, model, head)
        return report

    def save_checkpoint(self, folder: str | os.PathLike) -> tuple[str, str]:
        """Save the current backbone and head atomically as ``round{N}_backbone.model`` and ``round{N}_head.pt``."""
        model = os.path.join(folder, f"round{self.round}_backbone.model")
        head = os.path.join(folder, f"round{self.round}_head.pt")
        atomic_write(model, self.probe_calc.tap.save_backbone)
        self.probe_calc.probe.save(head)
        return model, head

    # ---- labelling, export, retraining ---------------------------------------
    def label(self, progress: bool = True) -> dict[str, int]:
        """Reference calculations on all pending frames (see :func:`label_pending`)."""
        return label_pending(self.db_path, self.reference, self.executor, self.retries, progress, self.lease)

    def resume(self, progress: bool = True) -> dict[str, int]:
        """Finish interrupted labelling: label what is still pending, nothing twice.

        Frames a killed driver had claimed are taken over once their lease
        lapses (``lease`` seconds at most). :meth:`run_round` also finishes an
        unfinished round's retraining.
        """
        return self.label(progress)

    def labelled(self, round: int | None = None) -> list[Atoms]:
        """Frames with reference results (``status=done``), optionally of one round.

        Regions carry ``arrays["core"]``, ``arrays["source_index"]`` and
        ``arrays["mlip_forces"]`` (eV/Å) from their row's ``data``.
        """
        selection = {"status": "done"} if round is None else {"status": "done", "round": round}
        frames = []
        for row in self.db.select(**selection):
            atoms = row.toatoms(add_additional_information=True)
            if "core" in row.data:
                for key in ("core", "source_index", "mlip_forces"):
                    atoms.arrays[key] = np.asarray(row.data[key])
            frames.append(atoms)
        return frames

    def export(self, path: str | os.PathLike, round: int | None = None) -> int:
        """Write labelled frames to extxyz atomically; returns how many."""
        frames = self.labelled(round)
        for atoms in frames:
            atoms.info.pop("key_value_pairs", None)
            atoms.info.pop("data", None)
            atoms.info.pop("unique_id", None)
        atomic_write(path, lambda tmp: write(tmp, frames, format="extxyz"))
        return len(frames)

    def status_counts(self) -> dict[str, int]:
        """Rows per status in the database."""
        return {s: self.db.count(status=s) for s in STATUSES}

    def retrain(self, trainer: Callable[[list[Atoms], int, ProbeCalculator], ProbeCalculator]) -> ProbeCalculator:
        """Replace the MLIP: ``trainer(labelled_frames, round, current)`` returns a new ProbeCalculator.

        :class:`probe_ase.al.retrain.MaceTrainer` is the built-in trainer
        (mace-torch's own trainer, then a head refit); any callable with that
        signature can replace it.
        """
        new = trainer(self.labelled(), self.round, self.probe_calc)
        if not isinstance(new, ProbeCalculator):
            raise InputError(f"the trainer must return a ProbeCalculator, got {type(new).__name__}",
                             returned=type(new).__name__)
        if self.probe_calc is not None:
            old = self.probe_calc.companion
            if old is not None and new.companion is None:  # the second opinion stays with the new model
                new.attach_companion(old.calc, old.every, self.probe_calc.vouch)
            self.probe_calc.close()
        self.probe_calc = new
        return new
