"""What memory fitting a head holds as the fit pool grows: the process's own (anonymous) memory and the file pages.

    python -m benchmarks.fit_memory --data ../shared/data/acac [--frames 4000 16000 64000] [--epochs 2]
                                    [--source repeated] [--out benchmarks/results/fit-memory.json]

The backbone and the fit pool are ``fit_cost``'s (a 16-channel MACE trained on 200 acac 300 K frames; acac's other
labelled frames, repeated in order). For each size, in fresh processes: one pass fills the feature cache, then
``fit_probe`` runs on the cached features with ``FitOptions(epochs=...)`` (memory does not depend on how many
epochs run; the default stops only by patience). A thread samples ``/proc/self/status`` every 5 ms during the
fit: the peak of ``RssAnon`` (the process's own memory: what cannot be given back without swap) and of ``RssFile``
(pages of mapped files, the memory-mapped cache among them: the kernel drops them under memory pressure and reads
them again when touched), each above the process before the fit (the backbone loaded and the frames read, also
reported), and the peak resident set (``ru_maxrss``). The features' and graphs' sizes (MiB) are what a fit holding
them would hold. ``--source``: the frames as ``repeated`` objects of the pool, read before the fit (they take the
same memory at every size), or as distinct frames written to an extxyz file and given to the fit as a ``list`` read
inside the measured window, or as the ``file``'s path. Printed as a table; written as JSON with the environment.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from ase.io import read

from benchmarks.common import write_json
from benchmarks.environment import environment
from benchmarks.fit_cost import load_calc, pool_frames, set_threads


def status_mib() -> dict[str, float]:
    """This process's ``RssAnon`` and ``RssFile`` (MiB) from ``/proc/self/status``."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024
    return values


class Sampler(threading.Thread):
    """The peaks of ``status_mib()`` over the time it runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, status_mib(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for key, value in status_mib().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        return self.peak


def fill_cache(model: str, data: str, n: int, cache: str, source: str, path: str) -> dict:
    """One backbone pass over ``n`` frames into the feature cache (other than ``repeated``, the frames written to
    ``path``, extxyz, and read back as the fit reads them: the same cache key); the atoms and the features' width."""
    set_threads(1)
    from ase.io import write

    from probe_ase import find_tap
    from probe_ase.fitting.data import featurize, read_frames

    frames = pool_frames(Path(data), n)
    if source != "repeated":
        write(path, frames, format="extxyz")
        frames = read_frames(path)
    calc, batch = load_calc(model)
    with find_tap(calc) as tap:
        features = featurize(tap, frames, batch_size=batch, cache_dir=cache, progress=False)
    return {"frames": n, "atoms": int(features.ptr[-1]), "width": int(features.features.shape[1])}


def fit_memory(model: str, data: str, n: int, cache: str, epochs: int, source: str, path: str) -> dict:
    """``fit_probe`` on ``n`` cached frames (``source``: see the module) with a sampler running: memory before and
    peaks during (MiB)."""
    set_threads(1)
    from probe_ase import FitOptions, fit_probe
    from probe_ase.fitting.data import read_frames

    frames = pool_frames(Path(data), n) if source == "repeated" else path
    calc, _ = load_calc(model)
    before = status_mib()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    frames = read_frames(path) if source == "list" else frames
    probe = fit_probe(calc, frames, cache_dir=cache, progress=False, options=FitOptions(epochs=epochs))
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    graphs = sum(p.stat().st_size for p in Path(cache).glob("*-graphs-*.pt")) / 2**20
    return {"before_anon_MiB": before["RssAnon"], "before_file_MiB": before["RssFile"],
            "fit_anon_MiB": peak["RssAnon"] - before["RssAnon"], "fit_file_MiB": peak["RssFile"] - before["RssFile"],
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "graph_cache_MiB": graphs,
            "fit_s": seconds, "epochs": probe.report["epochs"]}


def main(argv: list[str] | None = None) -> None:
    """Train the backbone, measure every size in fresh processes, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the acac data set (../shared/data/acac)")
    ap.add_argument("--frames", type=int, nargs="+", default=[4000, 16000, 64000], help="fit pool sizes")
    ap.add_argument("--epochs", type=int, default=2, help="FitOptions.epochs of each head (default 2)")
    ap.add_argument("--source", choices=("repeated", "list", "file"), default="repeated",
                    help="the frames: the pool's repeated objects, distinct ones in a list, or a file's path")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fit-memory.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        torch.set_num_threads(1)
        from probe_ase.testing import train_mace

        calc = train_mace(read(args.data / "train_300K.xyz", ":200"), channels=16, r_max=5.0, epochs=40, seed=0)
        model = str(Path(work) / "mace.model")
        torch.save(calc.models[0], model)
        context = multiprocessing.get_context("spawn")
        for n in args.frames:
            cache, path = str(Path(work) / f"cache-{n}"), str(Path(work) / f"pool-{n}.xyz")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(fill_cache, model, str(args.data), n, cache, args.source, path).result()
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                row |= pool.submit(fit_memory, model, str(args.data), n, cache, args.epochs, args.source, path).result()
            row["features_MiB"] = row["atoms"] * row["width"] * 4 / 2**20
            rows.append(row)
            print(f"{n:>6} frames ({row['atoms']} atoms, features {row['features_MiB']:.0f} MiB, graphs "
                  f"{row['graph_cache_MiB']:.0f} MiB): before the fit {row['before_anon_MiB']:.0f} MiB own; the fit "
                  f"+{row['fit_anon_MiB']:.0f} MiB own, +{row['fit_file_MiB']:.0f} MiB file pages; peak RSS "
                  f"{row['peak_rss_MiB']:.0f} MiB; {row['fit_s']:.0f} s", flush=True)
    write_json(args.out, {"command": "python -m benchmarks.fit_memory " + " ".join(sys.argv[1:] if argv is None else argv),
                          "environment": environment(), "epochs": args.epochs, "source": args.source, "rows": rows},
               indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
