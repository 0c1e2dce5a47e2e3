"""Labelling under faults on SQLite and PostgreSQL: reference calls made, duplicates, lost results.

    python -m benchmarks.al_faults [--repeats 3] [--pg-url postgresql://...] [--out benchmarks/results/al-faults]

Runs each scenario of :mod:`probe_ase.testing.faults` (the ones the tests
assert on) ``--repeats`` times on each backend: two driver processes at once;
the only driver killed with SIGKILL mid-call and restarted; one of two drivers
killed mid-call; a Dask worker (LocalCluster, 2 worker processes) killed
mid-call. PostgreSQL is the server at ``--pg-url`` (or
``$PROBE_ASE_TEST_PG_URL``), else a throwaway one started from the local
binaries; each run gets a fresh database. Prints a table (sums over repeats)
and writes ``results.json`` (every run) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

from benchmarks.environment import environment
from benchmarks.common import write_json
from probe_ase.testing.faults import SCENARIOS
from probe_ase.testing.postgres import create_database, drop_database, postgres_server

COLUMNS = ("frames", "faults", "calls_started", "calls_finished", "duplicates", "lost", "retried", "recomputed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg-url", default=os.environ.get("PROBE_ASE_TEST_PG_URL"))
    parser.add_argument("--out", default="benchmarks/results/al-faults")
    args = parser.parse_args()
    runs = []
    with nullcontext(args.pg_url) if args.pg_url else postgres_server() as server:
        for name, scenario in SCENARIOS.items():
            for backend in ("sqlite", "postgresql"):
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory() as folder:
                        url = str(Path(folder) / "al.db") if backend == "sqlite" else create_database(server)
                        runs.append(scenario(url, Path(folder)).as_dict())
                        if backend == "postgresql":
                            drop_database(server, url)
                    print(f"{name} {backend}: {runs[-1]}", flush=True)
    print(f"\n{'scenario':<38} {'backend':<10} {'runs':>4} " + " ".join(f"{c:>14}" for c in COLUMNS)
          + f" {'integrity':>9}")
    for name in dict.fromkeys(r["scenario"] for r in runs):
        for backend in ("sqlite", "postgresql"):
            group = [r for r in runs if r["scenario"] == name and r["backend"] == backend]
            sums = " ".join(f"{sum(r[c] for r in group):>14}" for c in COLUMNS)
            ok = "ok" if all(r["integrity_ok"] for r in group) else "PROBLEM"
            print(f"{name:<38} {backend:<10} {len(group):>4} {sums} {ok:>9}")
    out = Path(args.out) / "results.json"
    meta = {"repeats": args.repeats, "environment": environment()}
    write_json(out, {"meta": meta, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
