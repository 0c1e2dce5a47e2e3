"""What fitting a head costs against the backbone's own pass over the same frames, per stage, 400 -> 4 000 frames.

    python -m benchmarks.fit_cost --data ../shared/data/acac [--frames 400 1000 2000 4000] [--threads 1]
                                  [--weight-folds 5] [--workers 1] [--out benchmarks/results/fit-cost.json]
    python -m benchmarks.fit_cost --data ../shared/data/mlearn --backbone chgnet-0.3.0 --frames 400 571
                                  [--out benchmarks/results/fit-cost-chgnet.json]   # or --backbone 7net-0 (SevenNet)

The backbone: a 16-channel MACE (``probe_ase.testing.train_mace``, 2
interactions, L = 1) trained on 200 frames of ``train_300K.xyz``, or with
``--backbone NAME`` a pretrained universal potential (``chgnet-0.3.0``, ``7net-0``: their weights
ship with their libraries; the size of model users run; they need periodic cells, so with
``--data ../shared/data/mlearn``). The fit pool is acac's
other labelled frames (``train_600K``, ``test_MD_300K``, ``test_MD_600K``), or every mlearn cell (571, 2-108
atoms), repeated in order where more frames are asked for than it holds (a cost
measurement: the labels' mix stays that of the pool; copies of training frames then sit in the early-stopping split,
so heads may run to their last epoch: 571 is every unique mlearn cell). For each size, in fresh
processes:

* ``backbone``: one plain pass of the tapped backbone over the frames
  (``featurize`` with the cache off): what featurising costs;
* ``per_frame``: the backbone's ASE calculator on the same frames one at a time (energy and forces): what the
  user's own script pays for them;
* ``fit_probe`` with the default ``FitOptions`` (``--weight-folds`` and ``--workers`` change those) on those frames, its features
  already cached, so every second of it is the head's: the stages of
  ``probe.report["seconds"]`` (featurise = reading the cache, train, novelty,
  fold heads, calibrate, certify) and the whole call;
* the peak resident memory (MiB) of the fit's own process (the backbone loaded and the frames read, no backbone
  pass), of its largest worker process (``--workers``) and of the process that ran the backbone's passes.

Printed as a table; written as JSON with the environment. The target
(issue: fitting at the cost of the data) is fit / backbone <= 2 at 400 and
4 000 frames, linear in the frames.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
import sys
import tempfile
import time
from pathlib import Path

import torch
from ase.calculators.calculator import all_changes
from ase.io import read

from benchmarks.common import write_json
from benchmarks.environment import environment

STAGES = ("featurise", "train", "novelty", "fold_heads", "calibrate", "certify")


def pool_frames(data: Path, n: int) -> list:
    """``n`` labelled frames of the fit pool, in order, repeated where the pool holds fewer: acac's frames other than
    the backbone's training frames, or every mlearn cell (``data`` holding the element folders)."""
    if (data / "train_600K.xyz").exists():
        pool = [a for name in ("train_600K.xyz", "test_MD_300K.xyz", "test_MD_600K.xyz") for a in read(data / name, ":")]
    else:
        from benchmarks.mlearn import load_cells

        pool = load_cells(data)[0]
    return [pool[k % len(pool)] for k in range(n)]


def load_calc(model: str):
    """The backbone calculator and its featurisation batch: a MACE model file, or a pretrained name."""
    if Path(model).exists():
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=model, device="cpu", default_dtype="float32"), 32
    from probe_ase.backbones import load_backbone

    return load_backbone(model), 4  # a universal potential's pass on crystals: ~4 GB of activations at 8


def backbone_passes(model: str, data: str, n: int, threads: int, cache: str) -> dict:
    """The backbone's batched pass and its one-at-a-time pass over ``n`` frames (seconds), and the feature cache
    filled for :func:`fit_only`; in a fresh process."""
    set_threads(threads)
    from probe_ase import find_tap
    from probe_ase.fitting.data import featurize

    frames = pool_frames(Path(data), n)
    calc, batch = load_calc(model)
    with find_tap(calc) as tap:
        start = time.perf_counter()
        featurize(tap, frames, batch_size=batch, cache_dir=False, progress=False)  # the backbone's own pass
        backbone = time.perf_counter() - start
        featurize(tap, frames, batch_size=batch, cache_dir=cache, progress=False)  # fills the cache the fit reads
    start = time.perf_counter()
    for atoms in frames:  # what the user's own script pays for these frames: energy and forces, one at a time
        calc.calculate(atoms.copy(), ["energy", "forces"], all_changes)
    return {"frames": n, "atoms": sum(len(a) for a in frames), "backbone_s": backbone,
            "per_frame_s": time.perf_counter() - start, "passes_peak_MiB": peak_mib()}


def fit_only(model: str, data: str, n: int, threads: int, cache: str, weight_folds: int = 5, workers: int = 1) -> dict:
    """``fit_probe`` on ``n`` frames whose features are cached, in a fresh process: seconds per stage and the fit's
    own peak memory (the backbone loaded, the frames read, no backbone pass); ``weight_folds`` and ``workers`` as in
    FitOptions."""
    set_threads(threads)
    from probe_ase import FitOptions, fit_probe

    frames = pool_frames(Path(data), n)
    calc, _ = load_calc(model)
    start = time.perf_counter()
    probe = fit_probe(calc, frames, cache_dir=cache, progress=False,
                      options=FitOptions(weight_folds=weight_folds, workers=workers))
    total = time.perf_counter() - start
    seconds = probe.report["seconds"]
    return {"weight_folds": weight_folds, "workers": workers, "fit_s": total, **{f"{k}_s": seconds.get(k, 0.0) for k in STAGES},
            "epochs": probe.report["epochs"], "peak_MiB": peak_mib(),
            "workers_peak_MiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def set_threads(threads: int) -> None:
    """``threads`` for torch and for numpy's BLAS in this process (the novelty mixtures run on numpy: unlimited, its
    threads fight the other process's for the two cores)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def peak_mib() -> float:
    """This process's peak resident memory (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    """Train the backbone, time every size in its own process, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True,
                    help="the acac data set (../shared/data/acac), or the mlearn crystals (../shared/data/mlearn) "
                         "for a pretrained --backbone")
    ap.add_argument("--frames", type=int, nargs="+", default=[400, 1000, 2000, 4000], help="fit pool sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--backbone", default=None,
                    help="a pretrained backbone name (e.g. chgnet-0.3.0) instead of the 16-channel MACE trained here")
    ap.add_argument("--weight-folds", type=int, default=5,
                    help="FitOptions.weight_folds: fold heads fitting the novelty weight (default 5, the default's)")
    ap.add_argument("--workers", type=int, default=1,
                    help="FitOptions.workers: processes training the fold heads side by side (default 1)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fit-cost.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        torch.set_num_threads(args.threads)
        model = args.backbone or str(Path(work) / "mace.model")
        if args.backbone is None:
            from probe_ase.testing import train_mace

            calc = train_mace(read(args.data / "train_300K.xyz", ":200"), channels=16, r_max=5.0, epochs=40, seed=0)
            torch.save(calc.models[0], model)
        rows = []
        context = multiprocessing.get_context("spawn")
        for n in args.frames:
            row = {}
            for stage, extra in ((backbone_passes, ()), (fit_only, (args.weight_folds, args.workers))):  # fresh processes: the
                # not a multiprocessing.Pool: its daemonic workers could not start the fit's own workers
                with ProcessPoolExecutor(1, mp_context=context) as pool:  # fit's peak memory is its own
                    row |= pool.submit(stage, model, str(args.data), n, args.threads, str(Path(work) / "cache"),
                                       *extra).result()
            row |= {"fit/backbone": row["fit_s"] / row["backbone_s"], "fit/per_frame": row["fit_s"] / row["per_frame_s"]}
            rows.append(row)
            print(f"{n:>5} frames: backbone {row['backbone_s']:7.1f} s (one at a time {row['per_frame_s']:.1f} s), "
                  f"fit {row['fit_s']:7.1f} s ({row['fit/backbone']:.1f}x, {row['fit/per_frame']:.1f}x): " + ", ".join(f"{k} {row[f'{k}_s']:.1f}" for k in STAGES)
                  + f"; {row['epochs']} epochs; fit peak {row['peak_MiB']:.0f} MiB (backbone passes "
                  f"{row['passes_peak_MiB']:.0f} MiB)", flush=True)
    write_json(args.out, {"command": "python -m benchmarks.fit_cost " + " ".join(sys.argv[1:] if argv is None else argv),
                          "environment": environment(), "threads": args.threads,
                          "backbone": args.backbone or "MACE, 16 channels, trained here", "rows": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
