"""How to run the head: eager, TorchScript (scripted and frozen) or torch.compile, paired, vs atom count.

    python -m benchmarks.head_runtime [--sizes 15 128 1000 10000] [--modes eager script compile] [--members K]
                                      [--out benchmarks/results/head-runtime-torch<version>.json]

An untrained default head (64 wide, 4 heads, 1 block, the per-atom logit, 128
feature channels like MACE-MP medium's scalars, cutoff 5 Å) scores fcc Cu
cells of each size through the head's forward (what ``Probe.predict`` runs per
MD step beside the novelty model), each mode called in turn within every
repeat so load on the machine hits all alike. Reported: median ms per call,
and each mode's ratio to eager. ``compile`` is ``torch.compile(dynamic=True)``
(its first calls compile: warm-up, not timed; the warm-up time is reported).
Run it once per torch version to compare (the result file names the version).
``--members K`` times a head averaging K heads (``HeadConfig(members=K)``;
the file name gains ``-members<K>``), its members batched in one forward.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

from benchmarks.environment import environment
from benchmarks.common import write_json
from probe_ase.model.graph import radius_graph
from probe_ase.model.head import HeadConfig, ProbeHead, batch_inputs

FEATURES, CUTOFF = 128, 5.0


def runners(head: ProbeHead, modes: list[str]) -> dict:
    """The head's forward run each way."""
    out = {}
    for mode in modes:
        if mode == "eager":
            out[mode] = head
        elif mode == "script":
            out[mode] = torch.jit.freeze(torch.jit.script(copy.deepcopy(head)))
        elif mode == "compile":
            out[mode] = torch.compile(copy.deepcopy(head), dynamic=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[15, 128, 1000, 10000], help="target atom counts")
    ap.add_argument("--modes", nargs="+", default=["eager", "script", "compile"],
                    choices=["eager", "script", "compile"])
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds per size (a third above 5 000 atoms)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--members", type=int, default=1, help="heads averaged (HeadConfig.members)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    version = torch.__version__.split("+")[0]
    suffix = f"-members{args.members}" if args.members > 1 else ""
    out = args.out or Path(f"benchmarks/results/head-runtime-torch{version}{suffix}.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = ProbeHead(FEATURES, (29,), HeadConfig(cutoff=CUTOFF, atom_logit=True, members=args.members)).eval()
    rows, warmups, failures = [], {}, {}
    for target in args.sizes:
        if target > 20:
            k = max(1, round((target / 4) ** (1 / 3)))
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((k, k, k))
        else:
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))[:target]
            atoms.pbc = False
        n = len(atoms)
        features = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(1))
        graph = [radius_graph(atoms, CUTOFF)]
        inputs = batch_inputs(features, torch.as_tensor(atoms.numbers), np.array([0, n]), graph, range(1))
        run = runners(head, [m for m in args.modes if m not in failures])
        with torch.inference_mode():
            expected = head(*inputs)[0]
            for mode, fn in list(run.items()):  # warm-up (TorchScript profiling runs, compilation), and equality
                start = time.perf_counter()
                try:
                    for _ in range(3):
                        got = fn(*inputs)[0]
                except Exception as err:  # noqa: BLE001 - a mode that cannot run is a result, reported
                    failures[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    print(f"{mode} fails on torch {version}: {failures[mode]}", flush=True)
                    del run[mode]
                    continue
                warmups.setdefault(mode, []).append(time.perf_counter() - start)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            times = {mode: [] for mode in run}
            repeats = args.repeats if n <= 5000 else max(3, args.repeats // 3)
            for k in range(repeats):
                for mode in (list(run) if k % 2 else list(run)[::-1]):
                    start = time.perf_counter()
                    run[mode](*inputs)
                    times[mode].append(time.perf_counter() - start)
        med = {mode: 1000 * statistics.median(t) for mode, t in times.items()}
        row = {"atoms": n, **{f"{m}_ms": v for m, v in med.items()},
               **{f"{m}/eager": v / med["eager"] for m, v in med.items() if m != "eager" and "eager" in med}}
        rows.append(row)
        print(f"{n:>6} atoms: " + ", ".join(f"{m} {v:8.3f} ms" for m, v in med.items()), flush=True)
    result = {"command": "head_runtime.py " + " ".join(sys.argv[1:] if argv is None else argv), "environment": environment(), "torch": torch.__version__,
              "threads": args.threads, "members": args.members, "rows": rows, "warmup_s_first_size": {m: w[0] for m, w in warmups.items()}, "failures": failures}
    write_json(out, result, indent=2)
    print("warm-up (3 calls, first size): " + ", ".join(f"{m} {w[0]:.2f} s" for m, w in warmups.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
