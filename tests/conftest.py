"""Shared fixtures: real backbones (tiny ones trained on EMT copper, pretrained CHGNet and SevenNet), fitted heads.

The backbone parametrisation is the adapter registry, ``probe_ase.taps.ADAPTERS``:
every shipped adapter is tested, and an adapter without a test backbone here
fails the suite. Backbones are built once per test run. Every backbone library
is an extra; tests that need one skip when it is missing on a developer machine
but fail under CI (``CI`` set), so a missing backbone can never pass unnoticed.
MACE is the suite's default backbone: most tests use it, unmarked, and need the
``mace`` extra. Each other backbone's cases carry its extra's marker
(``schnetpack`` for SchNet and PaiNN, ``chgnet``, ``sevenn``), so a MACE-only
install (CI's current-torch leg) leaves them out explicitly with
``python -m pytest -m "not schnetpack and not chgnet and not sevenn"``, and a
SevenNet install (no mace: their e3nn pins clash) selects its own with
``-m sevenn``.
PostgreSQL is treated the same way: the ``db_url`` fixture runs each
active-learning test on an SQLite file and on a fresh database of a
PostgreSQL server, the one at ``$PROBE_ASE_TEST_PG_URL`` (what ``.ci/run``
starts) or else a throwaway server started here from the local binaries
(skipped without them, except under CI).
"""

from __future__ import annotations

import logging
import os
import random
import warnings

import numpy as np
import pytest
import torch

from filelock import FileLock

from probe_ase import FitOptions, FitSpec, Probe, fit_probe
from probe_ase.fitting.pipeline import Configs, fit_spec, internal_configs
from probe_ase.taps import ADAPTERS
from probe_ase.testing import emt_frames, train_mace
from probe_ase.testing.postgres import create_database, drop_database, postgres_server, server_binaries

# pytest-xdist workers (pyproject's `-n auto`): one torch thread each, and for the subprocesses they start;
# processes with two threads each on the same cores slow each other down many times over
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
logging.getLogger().setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=UserWarning)

#: one test backbone per registered adapter: how to build it from the EMT training frames
TEST_BACKBONES = {
    "mace": lambda frames: train_mace(frames, epochs=30, seed=0),
    "schnet": lambda frames: _train_schnetpack("schnet", frames),
    "painn": lambda frames: _train_schnetpack("painn", frames),
    "chgnet": lambda frames: ADAPTERS["chgnet"].load("chgnet-0.3.0"),  # pretrained, from the wheel: no training
    "sevenn": lambda frames: ADAPTERS["sevenn"].load("7net-0"),  # pretrained, from the wheel: no training
}
#: backbones that cost ~10 ms per atom on one core: long runs take fewer steps on them
SLOW_BACKBONES = {"chgnet", "sevenn"}
assert set(TEST_BACKBONES) == set(ADAPTERS), f"adapters without a test backbone: {set(ADAPTERS) - set(TEST_BACKBONES)}"


def backbone_marks(kind: str) -> list:
    """The marker of the ``kind`` backbone's cases: its extra's, none for MACE (the suite's unmarked default)."""
    extra = ADAPTERS[kind].extra
    return [getattr(pytest.mark, extra)] if extra and kind != "mace" else []


BACKBONES = [pytest.param(kind, marks=backbone_marks(kind)) for kind in ADAPTERS]


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def require_backbone(kind: str):
    """Skip (fail under CI) when the library of the ``kind`` adapter cannot be imported."""
    cls = ADAPTERS[kind]
    if not cls.available():
        if os.environ.get("CI"):
            pytest.fail(f"{cls.library} (backbone {kind}) is required in CI but cannot be imported")
        pytest.skip(f"{cls.extra} extra not installed (pip install -e '.[{cls.extra}]')")


@pytest.fixture(autouse=True)
def _pyscf_required(request):
    """Tests marked ``pyscf`` need PySCF (the pyscf extra): skip when it is missing, fail under CI."""
    if request.node.get_closest_marker("pyscf") is None:
        return
    try:
        import pyscf  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("pyscf (the pyscf extra) is required in CI but cannot be imported")
        pytest.skip("pyscf extra not installed (pip install -e '.[pyscf]')")


@pytest.fixture(scope="package")
def cu_data():
    """EMT copper: backbone training set, head fit pool, held-out test frames."""
    return {
        "train": emt_frames(40, 300, seed=1),
        "pool": emt_frames(60, 300, seed=2) + emt_frames(30, 900, seed=3) + emt_frames(30, 600, strain=0.03, seed=4),
        "test_in": emt_frames(30, 300, seed=5),
        "test_out": emt_frames(15, 1000, seed=6) + emt_frames(15, 700, strain=0.04, seed=7),
    }


def _train_schnetpack(representation: str, frames):
    from probe_ase.testing.schnetpack import train_schnetpack

    return train_schnetpack(frames, representation=representation, seed=0)


@pytest.fixture(scope="package")
def backbones(cu_data):
    """Lazily trained backbone calculators by name."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            require_backbone(name)
            cache[name] = TEST_BACKBONES[name](cu_data["train"])
        return cache[name]

    return get


@pytest.fixture(scope="package")
def probes(backbones, cu_data, tmp_path_factory):
    """Lazily fitted heads by backbone name (top 30 % force RMSE unreliable).

    The novelty weight is fitted on the validation split (``weight_folds=0``):
    one head per fit keeps the suite fast; the default out-of-fold weight has
    its own tests in ``test_novelty.py``. A slow backbone's head (pretrained,
    so the same in every process) is fitted once and shared by the xdist
    workers through a head file.
    """
    cache: dict = {}
    shared = tmp_path_factory.getbasetemp()  # this run's; under xdist, its parent is common to the workers
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared

    def fit(name: str):
        return fit_probe(backbones(name), cu_data["pool"], criterion="force_rmse", quantile=0.7, cache_dir=False,
                         progress=False, options=FitOptions(hidden=32, epochs=80, patience=15, weight_folds=0))

    def get(name: str):
        if name not in cache and name in SLOW_BACKBONES:
            backbones(name)  # skips (or fails under CI) when its library is missing
            with FileLock(shared / f"probe-{name}.lock"):
                path = shared / f"probe-{name}.pt"
                if not path.exists():
                    fit(name).save(path)
                cache[name] = Probe.load(path)
        elif name not in cache:
            cache[name] = fit(name)
        return cache[name]

    return get


def fit_with(calc, data, *, head=None, train=None, novelty=None, reference_data=None, **spec):
    """A fit through the internal configurations (``probe_ase.fitting.pipeline.fit_spec``): ``head``, ``train`` and
    ``novelty`` replace what ``spec``'s options give, for the study knobs the public ``fit_probe`` does not take."""
    spec = FitSpec(**spec)
    base = internal_configs(spec)
    configs = Configs(head or base.head, train or base.train, novelty or base.novelty)
    return fit_spec(calc, data, spec, reference_data=reference_data, cache_dir=False, progress=False, configs=configs)


@pytest.fixture(params=BACKBONES)
def backbone_name(request):
    require_backbone(request.param)
    return request.param


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI needs PostgreSQL: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="package")
def postgres_url():
    """A PostgreSQL server for the test run: $PROBE_ASE_TEST_PG_URL, else a throwaway one on loopback."""
    try:
        import ase_db_backends  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as err:
        _missing(f"the postgres extra is not installed (pip install -e '.[postgres]'): {err}")
    if os.environ.get("PROBE_ASE_TEST_PG_URL"):
        yield os.environ["PROBE_ASE_TEST_PG_URL"]
        return
    if os.environ.get("CI"):
        pytest.fail("CI needs PROBE_ASE_TEST_PG_URL: the URL of a running PostgreSQL server (.ci/run starts one)")
    if server_binaries() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) and no PROBE_ASE_TEST_PG_URL")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """An empty active-learning database: an SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "al.db")
        return
    server = request.getfixturevalue("postgres_url")
    url = create_database(server)
    yield url
    drop_database(server, url)


#: files whose tests share no fixture worth building once and take 20 s to 3 min each (pages, examples): each test is
#: its own unit of work under xdist, and they start first, so no long test is left to run alone at the end
SPREAD = ("test_docs.py", "test_examples.py")


def _work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: itself in a :data:`SPREAD` file, else its whole file (whose run-wide
    fixtures are then built once, on one worker)."""
    path = nodeid.split("::", 1)[0]
    return nodeid if path.rsplit("/", 1)[-1] in SPREAD else path


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pyproject's ``-n auto``: xdist's scope scheduler with :func:`_work_unit` as the scope (xdist's own
    ``loadgroup`` marks no longer reach the scheduler under pytest 9.2, which keeps node ids apart from them)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The :data:`SPREAD` tests first (``--no-loadscope-reorder`` keeps the order), so no long one starts last."""
    items.sort(key=lambda item: item.path.name not in SPREAD)
