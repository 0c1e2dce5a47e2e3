"""What the per-atom logit costs: the head with and without it, paired, vs atom count.

    python -m benchmarks.atom_cost [--sizes 15 128 1000 10000 50000] [--out benchmarks/results/atom-cost.json]

Two heads identical but for ``HeadConfig(atom_logit=...)`` (64 wide, 4 heads,
1 block, the default aux quantiles, 128 feature channels like MACE-MP medium's
scalars, cutoff 5 Å) score fcc Cu cells of each size through
:meth:`~probe_ase.model.probe.Probe.predict` (batching, head, novelty, ``.numpy()``),
interleaved call by call so load on the machine hits both alike; the medians
and their ratio are reported, in ms per call, with the log-log slope of the
time with the atom logit from 1 000 atoms up. The head's time is what PROBE
adds to each MD step beside the backbone's own pass (see ``perf.py`` for the
step table), so ``extra_ms`` over a backbone step is the cost of ``atom_reliability``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

from benchmarks.environment import environment
from benchmarks.common import write_json
from probe_ase.fitting.spec import FitSpec
from probe_ase.model.calibration import Calibration
from probe_ase.model.graph import radius_graph
from probe_ase.model.head import HeadConfig, ProbeHead
from probe_ase.model.headfile import HeadMeta
from probe_ase.model.probe import Probe
from probe_ase.model.novelty import NoveltyConfig, NoveltyModel

FEATURES, CUTOFF = 128, 5.0


def probe_with(atom_logit: bool) -> Probe:
    """An untrained head (timing only) wrapped as a Probe with a fitted-shape novelty model."""
    config = HeadConfig(cutoff=CUTOFF, atom_logit=atom_logit)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = ProbeHead(FEATURES, (29,), config).eval()
    spec = FitSpec(tolerance=0.1, atom_tolerance=0.15 if atom_logit else None)
    meta = HeadMeta(backbone="mace", fingerprint="0" * 64, layers=(0, 1), feature_dim=FEATURES, elements=(29,),
                    tau=0.1, p_star=0.5, coverage=1.0, spec=spec, config=config, novelty=NoveltyConfig(),
                    calibration=Calibration(),
                    atom_tau=0.15 if atom_logit else None, atom_p_star=0.5 if atom_logit else None)
    return Probe(head, meta, NoveltyModel(FEATURES, (29,), NoveltyConfig().components))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[15, 128, 1000, 10000, 50000], help="target atom counts")
    ap.add_argument("--repeats", type=int, default=15, help="timed pairs per size (halved above 10 000 atoms)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/atom-cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    probes = {False: probe_with(False), True: probe_with(True)}
    rows = []
    for target in args.sizes:
        n_cells = max(1, round((target / 4) ** (1 / 3)))
        if target > 20:  # a periodic cell
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n_cells, n_cells, n_cells))
        else:  # a small cluster, like a molecule
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))[:target]
            atoms.pbc = False
        n = len(atoms)
        edges = radius_graph(atoms, CUTOFF)
        features = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(1))
        numbers = torch.as_tensor(atoms.numbers)
        ptr = np.array([0, n])
        times = {False: [], True: []}
        repeats = args.repeats if n <= 10000 else max(3, args.repeats // 2)
        for k in range(repeats + 1):
            for local in (False, True) if k % 2 else (True, False):
                start = time.perf_counter()
                probes[local].predict(features, numbers, ptr, [edges])
                if k:  # the first pair warms up (TorchScript compiles on first use)
                    times[local].append(time.perf_counter() - start)
        plain, local = (1000 * statistics.median(times[x]) for x in (False, True))
        rows.append({"atoms": n, "head_ms": plain, "head_with_atom_logit_ms": local, "ratio": local / plain,
                     "extra_ms": local - plain})
        print(f"{n:>7} atoms: head {plain:9.3f} ms, with atom logit {local:9.3f} ms, x{local / plain:.3f} "
              f"(+{local - plain:.3f} ms)", flush=True)
    big = [r for r in rows if r["atoms"] >= 1000]
    slope = float(np.polyfit(np.log([r["atoms"] for r in big]), np.log([r["head_with_atom_logit_ms"] for r in big]),
                             1)[0]) if len(big) > 1 else float("nan")
    print(f"log-log slope of the head with the atom logit from 1 000 atoms: {slope:.3f}")
    result = {"command": "atom_cost.py " + " ".join(argv or []), "environment": environment(), "threads": args.threads, "features": FEATURES,
              "cutoff_A": CUTOFF, "rows": rows, "loglog_slope_from_1000": slope}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
