"""The benchmark scripts of probe-ase, run from the repository root as modules: ``python -m benchmarks.uq_quality ...``.

Helpers several scripts share live in :mod:`benchmarks.common`; see ``benchmarks/README.md``.
"""
