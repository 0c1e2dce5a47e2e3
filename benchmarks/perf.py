"""Timing and memory benchmark of probe-ase (ProbeCalculator vs bare backbone vs a 5-MACE committee).

Run from the repository root:

    python -m benchmarks.perf --data ../shared/data/acac          # full: acac + Cu 16 ... 50000 atoms
    python -m benchmarks.perf --data ../shared/data/acac --quick  # smoke run: Cu 16 128 1000, fewer repeats

Without ``--data`` a 15-atom Cu cluster stands in for the acetylacetone molecule.

Units: times are milliseconds (ms per MD step = one energy + forces evaluation;
ms per structure for the head), memory is MiB (2**20 bytes), throughput is
structures per second. Sections: (1) MD step of the bare backbone (a), the
ProbeCalculator wrapping it (b) and a 5-member MACE committee (c), interleaved
a, b, c, a, b, c ... in one process, median over repeats after warm-up calls,
and PROBE's overhead per step paired within each step (step time minus the
backbone's time inside it; ``b/a_paired`` = 1 + overhead / a);
(2) the head alone and the radius graph vs atom count, with log-log slopes;
(3) batched featurisation vs one calculator call per structure; (4) peak
memory of streaming scoring (``probe-ase score``'s path) vs file length; (5) a
cProfile breakdown of ProbeCalculator's per-step overhead at small sizes.
Backbones are small models trained for seconds on EMT copper and on a few acac
DFT frames (only timing matters): MACE 32x0e+32x1o with spherical harmonics to
l=1 and correlation 2 (all sizes), on acac also the shape mace_run_train gives
for ``--num_channels 32 --max_L 1`` (l=3, correlation 3), and, untrained, the
shape of MACE-MP-0 "medium" (128x0e+128x1o, l=3, correlation 3; up to 1000
atoms, not in the featurisation section); SchNet 32 features; pretrained CHGNet
0.3.0 from its wheel (``--backbones chgnet``; up to 1000 atoms, no committee).
``--md-only`` runs section (1) alone; ``--head-members K`` fits every head
as the mean of K heads (``FitOptions(members=K)``).
Torch uses every core unless ``--threads`` says otherwise. Results go
to a markdown report on stdout and a JSON file (written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read
from ase.calculators.calculator import Calculator, all_changes
from tqdm.auto import tqdm

from probe_ase import FitOptions, ProbeCalculator, fit_probe
from probe_ase.model.graph import NeighbourCache, radius_graph
from probe_ase.model.head import ProbeHead, batch_inputs
from probe_ase.model.probe import Probe
from probe_ase.scoring import score_frames
from probe_ase.taps.base import Tap
from probe_ase.testing import emt_frames, train_mace
from probe_ase.validate import check_atoms
from benchmarks.environment import environment

ROOT = Path(__file__).resolve().parent
MEDIUM = "mace medium shape (untrained)"
MAX_ATOMS = {MEDIUM: 1000, "chgnet": 1000}  # largest MD-step case per backbone


# ---------------------------------------------------------------- structures
def cu_cell(target: int, rng: np.random.Generator) -> Atoms:
    """Periodic fcc Cu with about ``target`` atoms (near-cubic repeats of the 4-atom cell), rattled 0.02 Å."""
    reps = [(a, b, c) for a in range(1, 60) for b in range(1, a + 1) for c in range(1, b + 1) if a <= 2 * c]
    a, b, c = min(reps, key=lambda r: (abs(4 * r[0] * r[1] * r[2] - target), r[0] - r[2]))
    atoms = bulk("Cu", "fcc", cubic=True) * (a, b, c)
    atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
    return atoms


def cu_cluster(rng: np.random.Generator, n: int = 15) -> Atoms:
    """Non-periodic ``n``-atom Cu cluster (the atoms of bulk fcc nearest one site), stand-in for a 15-atom molecule."""
    big = bulk("Cu", "fcc", cubic=True) * (3, 3, 3)
    centre = big.positions[np.argmin(np.linalg.norm(big.positions - big.cell.sum(0) / 2, axis=1))]
    keep = np.argsort(np.linalg.norm(big.positions - centre, axis=1), kind="stable")[:n]
    atoms = Atoms("Cu%d" % n, positions=big.positions[keep] - centre, pbc=False)
    atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
    return atoms


# ---------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(calc, atoms: Atoms, rng: np.random.Generator, device: str) -> float:
    """One MD-like step: nudge atoms (so ASE recomputes), one energy+forces call; seconds."""
    atoms.positions += rng.normal(0, 1e-3, atoms.positions.shape)
    sync(device)
    t0 = time.perf_counter()
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    sync(device)
    return time.perf_counter() - t0


def timed(fn, repeats: int, device: str) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_mib(fn, device: str) -> tuple[float, float]:
    """(peak torch tensor memory, peak RSS growth) of one ``fn()`` call, MiB.

    CPU: tensor peak from torch.profiler(profile_memory=True) allocation events
    (running sum of allocations/frees); RSS growth is VmHWM after resetting it
    (/proc/self/clear_refs) minus RSS before (includes numpy/matscipy). CUDA:
    torch.cuda.max_memory_allocated growth; RSS growth not measured (nan).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, float("nan")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    tensor_peak = max(np.cumsum([e.nbytes() for e in events]).max(initial=0), 0) / 2**20
    try:
        rss = rss_growth_mib(fn)
    except OSError:
        rss = float("nan")
    return tensor_peak, rss


def rss_growth_mib(fn) -> float:
    """Peak resident memory growth (MiB) during one ``fn()`` call: VmHWM after resetting it, minus RSS before."""
    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return (_status_kib("VmHWM") - rss0) / 1024


def _status_kib(key: str) -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key)).split()[1])


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("—" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def slope(ns, ys, lo=1000, hi=50000) -> float | None:
    """Log-log slope of ``ys`` vs ``ns`` over lo <= N <= hi (numpy.polyfit), None if < 2 points."""
    pts = [(n, y) for n, y in zip(ns, ys) if lo <= n <= hi and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


# ---------------------------------------------------------------- models
def build(args, tmp: str, system: str) -> dict:
    """Train backbones, committee and heads for ``system`` ('cu' or 'acac').

    Returns {backbone: (bare calc, ProbeCalculator, committee or None)}. Cu:
    EMT copper, r_max 4 Å. acac: the first DFT frames of ``--data``'s
    train_300K.xyz (training) and test_MD_300K.xyz (head fit pool), r_max 5 Å.
    """
    from mace.calculators import MACECalculator

    epochs = 3 if args.quick else 15
    if system == "cu":
        train = emt_frames(40, 300, seed=0)
        pool = emt_frames(40, 300, seed=1) + emt_frames(20, 900, seed=2)
        r_max = 4.0
    else:
        train = read(args.data / "train_300K.xyz", ":60")
        pool = read(args.data / "test_MD_300K.xyz", ":60")
        r_max, epochs = 5.0, max(1, epochs // 3)
    fit_kw = dict(quantile=0.8, cache_dir=False, progress=False,
                  options=FitOptions(epochs=5, patience=5, members=args.head_members))
    if args.atom_logit:  # heads with the per-atom logit (local reliability)
        fit_kw["atom_quantile"] = 0.9
    out = {}
    if "mace" in args.backbones:
        variants = {"mace": dict(channels=32, max_ell=1, correlation=2)}
        if system == "acac":  # the shape mace_run_train gives for --num_channels 32 --max_L 1
            variants["mace (max_ell 3, corr 3)"] = dict(channels=32, max_ell=3, correlation=3)
        if not args.quick:  # MACE-MP-0 "medium" shape, untrained: what a production model costs per step
            variants[MEDIUM] = dict(channels=128, max_ell=3, correlation=3)
        for name, shape in variants.items():
            train_epochs = 0 if name == MEDIUM else epochs
            print(f"[{system}] training {name} ({shape['channels']}x0e+{shape['channels']}x1o, spherical harmonics to "
                  f"l={shape['max_ell']}, correlation {shape['correlation']}, 2 layers, r_max {r_max} Å, "
                  f"{train_epochs} epochs) and a 5-member committee ...", flush=True)
            mace_kw = dict(num_interactions=2, r_max=r_max, **shape)
            model = train_mace(train, epochs=train_epochs, seed=0, **mace_kw).models[0]

            def calc(m):
                return MACECalculator(models=m, device=args.device, default_dtype="float32")

            probe = fit_probe(calc(copy.deepcopy(model)), pool, **fit_kw)
            members = [train_mace(train, epochs=min(train_epochs, 1), seed=s, **mace_kw).models[0]
                       for s in tqdm(range(1, 6), desc="committee")]
            committee = MACECalculator(models=[m.to(args.device) for m in members], device=args.device, default_dtype="float32")
            out[name] = (calc(copy.deepcopy(model)), ProbeCalculator(calc(copy.deepcopy(model)), probe), committee)
    if "schnet" in args.backbones:
        from probe_ase.taps.schnetpack import spk_calculator
        from probe_ase.testing.schnetpack import train_schnetpack

        print(f"[{system}] training SchNet (32 features, 2 interactions, cutoff {r_max} Å, {epochs} epochs) ...", flush=True)
        path = os.path.join(tmp, f"schnet_{system}.pt")
        train_schnetpack(train, n_atom_basis=32, n_interactions=2, cutoff=r_max, epochs=epochs, model_file=path)
        probe = fit_probe(spk_calculator(path, device=args.device), pool, **fit_kw)
        out["schnet"] = (spk_calculator(path, device=args.device),
                         ProbeCalculator(spk_calculator(path, device=args.device), probe), None)
    if "chgnet" in args.backbones:
        from probe_ase.taps import CHGNetTap

        print(f"[{system}] pretrained CHGNet 0.3.0 (from its wheel) ...", flush=True)
        probe = fit_probe(CHGNetTap.load("chgnet-0.3.0", device=args.device), pool, **fit_kw)
        out["chgnet"] = (CHGNetTap.load("chgnet-0.3.0", device=args.device),
                         ProbeCalculator(CHGNetTap.load("chgnet-0.3.0", device=args.device), probe), None)
    return out


# ---------------------------------------------------------------- sections
def bench_md(args, calcs: dict, cases: list[tuple[str, Atoms]], rng) -> list[dict]:
    """ms per MD step of bare (a), ProbeCalculator (b), committee (c) on ``cases``; interleaved."""
    rows = []
    for name, (bare, probe, committee) in calcs.items():
        last_c = None  # (n_atoms, seconds) of the last committee size, to skip hopeless ones early
        for label, atoms0 in cases:
            n = len(atoms0)
            jobs = {"a": bare, "b": probe}
            note = ""
            if committee is not None:
                guess = last_c[1] * n / last_c[0] if last_c else 0.0
                if guess > args.max_step_s:
                    note = f"committee skipped (extrapolated {guess:.0f} s/step > {args.max_step_s:.0f} s)"
                else:
                    jobs["c"] = committee
            if n > MAX_ATOMS.get(name, n) or (probe.tap.periodic_only and not atoms0.pbc.all()):
                continue  # too slow, or a molecule for a backbone that needs a cell (CHGNet)
            copies = {k: atoms0.copy() for k in jobs}
            for _ in range(2):  # first calls: lazy initialisation, TorchScript's profiling runs; not timed
                for k, c in jobs.items():
                    if k != "c" or n <= 1000:
                        step(c, copies[k], rng, args.device)
            warm = {k: step(c, copies[k], rng, args.device) for k, c in jobs.items()}  # warm-up
            if "c" in jobs and warm["c"] > args.max_step_s:
                note, jobs = f"committee skipped ({warm['c']:.0f} s/step > {args.max_step_s:.0f} s)", {k: jobs[k] for k in "ab"}
            # many repeats for fast steps (a 0.5 ms difference on 11 ms needs them), fewer for slow ones
            slowest = max(warm["a"], warm["b"])
            reps = 10 * args.repeats if slowest < 0.1 else 3 * args.repeats if slowest < 2 \
                else max(2, args.repeats // 2) if slowest < 10 else 2
            times = {k: [] for k in jobs}
            inside = []  # seconds the backbone ran within each ProbeCalculator step
            with backbone_timer(probe, inside, args.device):
                for _ in tqdm(range(reps), desc=f"{name} {label} ({n} atoms)", leave=False):
                    for k, c in jobs.items():
                        times[k].append(step(c, copies[k], rng, args.device))
            med = {k: 1000 * float(np.median(v)) for k, v in times.items()}
            overhead = 1000 * float(np.median(np.subtract(times["b"], inside)))
            if "c" in med:
                last_c = (n, med["c"] / 1000)
            rows.append({"backbone": name, "system": label,
                         "N": n, "repeats": reps, "a_bare_ms": med["a"], "b_probe_ms": med["b"], "c_committee_ms": med.get("c"),
                         "b/a": med["b"] / med["a"], "c/a": med["c"] / med["a"] if "c" in med else None,
                         "b-a_ms": med["b"] - med["a"], "overhead_ms": overhead, "b/a_paired": 1 + overhead / med["a"],
                         "note": note})
            print(md_table(rows[-1:], MD_COLUMNS).splitlines()[-1], flush=True)
    return rows


MD_COLUMNS = ["backbone", "system", "N", "repeats", "a_bare_ms", "b_probe_ms", "c_committee_ms", "b/a", "c/a",
              "overhead_ms", "b/a_paired", "note"]


@contextlib.contextmanager
def backbone_timer(probe: ProbeCalculator, record: list[float], device: str):
    """Record how long the wrapped backbone's ``calculate`` runs inside each ProbeCalculator step.

    A step's overhead is its time minus the backbone's time within that same
    step: a paired difference, free of the step-to-step spread of the backbone
    that swamps a few ms at 10 000 atoms. (Hook time counts as backbone time;
    section 5 times the hooks.)
    """
    backbone = probe.base
    original = backbone.calculate

    def calculate(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        original(*args, **kwargs)
        sync(device)
        record.append(time.perf_counter() - t0)

    backbone.calculate = calculate
    try:
        yield
    finally:
        del backbone.calculate


def bench_head(args, probe, rng) -> dict:
    """Head alone (ms, MiB) and radius_graph (ms) per structure vs atom count."""
    head = probe.head
    cutoff = probe.meta.config.cutoff
    rows = []
    for target in tqdm(args.head_sizes, desc="head alone"):
        atoms = cu_cell(target, rng)
        n = len(atoms)
        reps = args.repeats if n <= 10000 else max(2, args.repeats // 2)
        edges = radius_graph(atoms, cutoff)
        noise = torch.randn(n, head.feature_dim, generator=torch.Generator().manual_seed(0)).to(head.feature_mean.device)
        feats = head.feature_mean + head.feature_scale * noise  # Cu only: one row even when per element
        numbers = torch.as_tensor(atoms.numbers, device=args.device)
        ptr = np.array([0, n])

        def run_head():
            probe.predict(feats, numbers, ptr, [edges])

        t_graph = timed(lambda: radius_graph(atoms, cutoff), reps, "cpu")
        t_head = timed(run_head, reps, args.device)
        tensor_mib, rss_mib = peak_mib(run_head, args.device)
        rows.append({"N": n, "edges": int(edges.shape[1]), "radius_graph_ms": 1000 * t_graph, "head_ms": 1000 * t_head,
                     "head_us_per_atom": 1e6 * t_head / n, "peak_tensor_MiB": tensor_mib, "peak_rss_growth_MiB": rss_mib})
    ns = [r["N"] for r in rows]
    slopes = {key: slope(ns, [r[key] for r in rows]) for key in ("head_ms", "radius_graph_ms", "peak_tensor_MiB")}
    return {"rows": rows, "loglog_slope_1000_50000": slopes, "features": "random, standardised like the fitted head's inputs"}


def bench_featurise(args, calcs: dict, sets: list[tuple[str, list[Atoms]]]) -> list[dict]:
    """Structures per second: tap.predict / score_frames (batch 32) vs one calculator call per structure."""
    rows = []
    for name, (bare, probe, _) in calcs.items():
        if name == MEDIUM:  # minutes per mode; the step table already shows its cost
            continue
        for label, frames in sets:
            n_atoms = f"{label} ({len(frames[0])})"
            modes = {
                "tap.predict(batch_size=32)": lambda: list(probe.tap.predict(frames, batch_size=32)),
                "score_frames(batch_size=32) (+head)": lambda: list(score_frames(probe.probe, probe.tap, frames, 32)),
                "ProbeCalculator, 1 call/structure": lambda: [probe.calculate(f, ["energy", "forces"], all_changes) for f in frames],
                "bare calculator, 1 call/structure": lambda: [bare.calculate(f, ["energy", "forces"], all_changes) for f in frames],
            }
            speed = {}
            for mode, fn in tqdm(modes.items(), desc=f"featurise {name} {n_atoms} atoms", leave=False):
                speed[mode] = len(frames) / timed(fn, max(1, min(args.repeats, 3)), args.device)
            per_call = speed["ProbeCalculator, 1 call/structure"]
            rows += [{"backbone": name, "atoms": n_atoms, "mode": mode, "frames": len(frames), "structures_per_s": v,
                      "x_per_call": v / per_call} for mode, v in speed.items()]
    return rows


def bench_stream(args, calcs: dict, frames: list[Atoms], tmp: str) -> list[dict]:
    """Peak RSS growth (MiB) of streaming score_frames over files of increasing length (constant memory)."""
    from ase.io import iread, write

    rows = []
    name, (_, probe, _) = next(iter(calcs.items()))
    for n_frames in args.stream_frames:
        path = os.path.join(tmp, f"stream_{n_frames}.xyz")
        write(path, [frames[k % len(frames)] for k in range(n_frames)], format="extxyz")

        def run():
            for _ in score_frames(probe.probe, probe.tap, iread(path, index=":"), 32):
                pass

        run()  # warm-up: allocator pools, lazily built converters
        start = time.perf_counter()
        rows.append({"backbone": name, "frames": n_frames, "file_MiB": os.path.getsize(path) / 2**20,
                     "peak_rss_growth_MiB": rss_growth_mib(run), "structures_per_s": n_frames / (time.perf_counter() - start)})
    return rows


def _code(fn) -> tuple:
    c = fn.__code__
    return (c.co_filename, c.co_firstlineno, c.co_name)


def profiled_functions(bare) -> dict:
    """label -> cProfile key of the functions whose cumulative time per step is reported."""
    return {
        "ProbeCalculator.calculate (total)": _code(ProbeCalculator.calculate),
        "backbone calculate": _code(type(bare).calculate),
        "ase Calculator.calculate (copies atoms; probe+backbone)": _code(Calculator.calculate),
        "check_atoms": _code(check_atoms),
        "tap hooks (inside backbone)": "hook",
        "tap.features": "features",
        "graph from backbone's list (Tap.neighbour_graph)": _code(Tap.neighbour_graph),
        "graph by Verlet list (NeighbourCache)": _code(NeighbourCache.__call__),
        "Probe.predict (head + batching + numpy)": _code(Probe.predict),
        "batch_inputs": _code(batch_inputs),
        "ProbeHead.forward": _code(ProbeHead.forward),
    }


def bench_profile(args, calcs: dict, cases: list[tuple[str, Atoms]], rng) -> list[dict]:
    """cProfile breakdown (ms per step) of ProbeCalculator at small sizes; the backbone's own time for reference."""
    rows = []
    for name, (bare, probe, _) in calcs.items():
        for label, atoms in [(label, atoms) for label, atoms in cases if len(atoms) <= 128]:
            for _ in range(3):
                step(probe, atoms, rng, args.device)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.profile_steps):
                step(probe, atoms, rng, args.device)
            prof.disable()
            stats = pstats.Stats(prof).stats
            row = {"backbone": name, "system": label, "N": len(atoms)}
            for key, target in profiled_functions(bare).items():
                if isinstance(target, str):  # functions of probe_ase/taps by name (closures, subclasses)
                    hits = [v[3] for (f, _, fn), v in stats.items() if f"probe_ase{os.sep}taps" in f and fn == target]
                else:
                    hits = [stats[target][3]] if target in stats else []
                row[key] = 1000 * sum(hits) / args.profile_steps
            row["overhead (total - backbone)"] = row["ProbeCalculator.calculate (total)"] - row["backbone calculate"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1000, 10000, 50000], help="target atom counts (MD steps)")
    p.add_argument("--head-sizes", type=int, nargs="+", default=None,
                   help="atom counts for the head-alone scan (default: sizes plus 2000 5000 20000, or sizes with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case after warm-up (default 7, 3 with --quick)")
    p.add_argument("--frames", type=int, default=200, help="frames per featurisation case")
    p.add_argument("--profile-steps", type=int, default=30, help="steps profiled per small system")
    p.add_argument("--max-step-s", type=float, default=60.0, help="skip the committee above this many s/step")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: every core)")
    p.add_argument("--stream-frames", type=int, nargs="+", default=[500, 5000],
                   help="file lengths (frames) for the streaming-memory section of probe-ase score's path")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backbones", nargs="+", choices=["mace", "schnet", "chgnet"], default=["mace", "schnet"])
    p.add_argument("--md-only", action="store_true", help="time MD steps (section 1) only")
    p.add_argument("--data", type=Path, default=None,
                   help="BOTNet acac folder (../shared/data/acac): time the 15-atom molecule with backbones "
                        "trained on its DFT frames (default: a 15-atom Cu cluster stands in)")
    p.add_argument("--head-members", type=int, default=1,
                   help="heads averaged in each PROBE head (FitOptions.members; default 1)")
    p.add_argument("--atom-logit", action="store_true",
                   help="fit heads with the per-atom logit (atom_quantile 0.9): the cost of atom_reliability")
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 16 128 1000, 3 repeats, 50 frames")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "perf.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [16, 128, 1000] if args.sizes == p.get_default("sizes") else args.sizes
        args.frames = min(args.frames, 50)
        args.stream_frames = [100, 500] if args.stream_frames == p.get_default("stream_frames") else args.stream_frames
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.head_sizes = sorted(set(args.head_sizes or (args.sizes if args.quick else args.sizes + [2000, 5000, 20000])))
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cu = build(args, tmp, "cu")
        cu_cases = [(f"fcc {n}", cu_cell(n, rng)) for n in args.sizes]
        feat_sets = [("fcc Cu", [cu_cell(32, rng) for _ in range(args.frames)])]
        if args.data is not None:
            acac = build(args, tmp, "acac")
            molecule = read(args.data / "test_MD_300K.xyz", -1)
            mol_cases = [("acetylacetone C5H8O2", molecule)]
            mol_frames = read(args.data / "test_MD_300K.xyz", f"-{args.frames}:")
        else:  # no DFT data: a Cu cluster stands in for the molecule
            acac, mol_cases = None, [("15-atom Cu cluster (molecule stand-in)", cu_cluster(rng))]
            mol_frames = [cu_cluster(rng) for _ in range(args.frames)]
        print(f"models ready after {time.perf_counter() - start:.0f} s; timing MD steps ...", flush=True)
        md = bench_md(args, acac, mol_cases, rng) if acac else []
        md += bench_md(args, cu, ([] if acac else mol_cases) + cu_cases, rng)
        head, feat, stream, prof = {"rows": [], "loglog_slope_1000_50000": {}}, [], [], []
        if not args.md_only:
            first = next(iter(cu.values()))[1]
            head = bench_head(args, first.probe, rng)
            feat = bench_featurise(args, acac, [("acac", mol_frames)]) if acac else []
            feat += bench_featurise(args, cu, ([] if acac else [("Cu cluster", mol_frames)]) + feat_sets)
            stream = bench_stream(args, acac or cu, mol_frames, tmp)
            prof = bench_profile(args, acac, mol_cases, rng) if acac else []
            prof += bench_profile(args, cu, ([] if acac else mol_cases) + cu_cases, rng)

    result = {
        "meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "loadavg_at_end": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
                 "environment": environment(), "head_backbone": next(iter(cu)), "data": str(args.data) if args.data else None, "seconds": time.perf_counter() - start,
                 "units": {"time": "ms", "memory": "MiB", "throughput": "structures/s"},
                 "md_step": "nudge atoms 1e-3 Å, then calc.calculate(atoms, ['energy','forces']); one backbone pass each"},
        "md_step": md, "head_alone": head, "featurisation": feat, "stream": stream, "profile": prof,
    }
    print("\n## MD step (ms per energy+forces call; median after warm-up, interleaved a,b,c)\n")
    print(md_table(md, MD_COLUMNS))
    if args.md_only:
        write_json(args.out, result)
        return 0
    print(f"\n## Head alone ({result['meta']['head_backbone']} head; ms and MiB per structure)\n")
    print(md_table(head["rows"], ["N", "edges", "radius_graph_ms", "head_ms", "head_us_per_atom", "peak_tensor_MiB", "peak_rss_growth_MiB"]))
    print("\nlog-log slopes, 1000-50000 atoms: " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in head["loglog_slope_1000_50000"].items()))
    print("\n## Featurisation throughput (structures/s)\n")
    print(md_table(feat, ["backbone", "atoms", "mode", "frames", "structures_per_s", "x_per_call"]))
    print("\n## Streaming score_frames (what probe-ase score runs): peak RSS growth vs file length\n")
    print(md_table(stream, ["backbone", "frames", "file_MiB", "peak_rss_growth_MiB", "structures_per_s"]))
    print(f"\n## ProbeCalculator per-step breakdown (cProfile, ms per step, {args.profile_steps} steps; cProfile inflates Python-heavy parts)\n")
    print(md_table(prof, ["backbone", "system", "N", "ProbeCalculator.calculate (total)", "backbone calculate", "overhead (total - backbone)",
                          *list(prof[0])[5:-1]]))

    write_json(args.out, result)
    return 0


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` atomically and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=2, default=float))
    os.replace(tmp_path, path)
    print(f"\nwrote {path} ({result['meta']['seconds']:.0f} s, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    sys.exit(main())
