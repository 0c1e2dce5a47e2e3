"""Pretrained SevenNet (weights from its wheel, no download): conformance, channel sets, one pass per step, batched
scoring, checkpoint refusal, the command line's names, and the error when sevenn is missing.

Every test but the last needs the sevenn extra (marker ``sevenn``); the last one blocks the imports of sevenn and
mace in a subprocess, so it runs in every environment.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import read, write

from probe_ase import BackboneError, MismatchError, Probe, ProbeCalculator, find_tap, load_backbone
from probe_ase.cli import main
from probe_ase.testing import check_tap, emt_frames

from conftest import require_backbone

needs_sevenn = pytest.mark.sevenn

#: 7net-0: five blocks; 128 scalars each; 64x1e + 32x2e norms in blocks 0-3, none in the last (128x0e)
SCALARS, NORMS = [128] * 5, [96, 96, 96, 96, 0]


def _silicon(rattle: float = 0.05, seed: int = 0, repeat: int = 1) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (repeat, repeat, repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def _step(atoms: Atoms, calc) -> np.ndarray:
    atoms = atoms.copy()
    atoms.calc = calc
    calc.reset()
    return atoms.get_forces()


@pytest.fixture(scope="module")
def seven():
    """The pretrained 7net-0 calculator, from the wheel."""
    require_backbone("sevenn")
    return load_backbone("7net-0")


@pytest.fixture(scope="module")
def fitted(seven, tmp_path_factory):
    """A head fitted with the CLI on 7net-0 against EMT copper (4-atom cells: 7net-0 is ~10 ms per atom)."""
    root = tmp_path_factory.mktemp("sevenn")
    write(root / "pool.xyz", emt_frames(50, 300, size=1, seed=31) + emt_frames(50, 1500, size=1, seed=32),
          format="extxyz")
    write(root / "test.xyz", emt_frames(10, 300, size=1, seed=33) + emt_frames(10, 1500, size=1, seed=34),
          format="extxyz")
    assert main(["fit", "--backbone", "7net-0", "--data", str(root / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "30", "--weight-folds", "0", "--no-cache", "-q", "-o", str(root / "probe.pt")]) == 0
    return root


@needs_sevenn
@pytest.mark.parametrize("channels", ["scalars", "scalars+norms"])
def test_check_tap_on_silicon_and_a_molecule(seven, channels):
    """The conformance suite on a rattled Si cell and methane (no cell), with each channel set."""
    report = check_tap(seven, _silicon(), molecule=molecule("CH4"),
                       make_tap=lambda: find_tap(seven, channels=channels))
    assert "5 layers equal the reference" in report["layers"]
    assert report["neighbour_graph"].startswith("equal to radius_graph at 5.00")  # SevenNet's own list, 5 Å
    assert report["batched"].startswith("a batch of 3 equals")


@needs_sevenn
def test_features_are_each_blocks_scalars_then_the_norms(seven):
    """Scalars: 128 per block. Scalars+norms: each block's scalars (the very same numbers), then one nonnegative
    norm per l > 0 channel (64 + 32 in blocks 0-3, none in the last)."""
    atoms = _silicon()
    with find_tap(seven) as scalars, find_tap(seven, channels="scalars+norms") as both:
        assert scalars.kind == "sevenn" and scalars.cutoff == 5.0 and {14, 29, 1, 6} <= set(scalars.elements)
        assert [scalars.layer_width(i) for i in scalars.layers] == SCALARS
        assert [both.layer_width(i) for i in both.layers] == [s + n for s, n in zip(SCALARS, NORMS)]
        _step(atoms, seven)
        a, b = scalars.features(), both.features()
        assert a.shape == (len(atoms), 640) and b.shape == (len(atoms), 1024) and a.dtype == torch.float32
        start_a = start_b = 0
        for layer in scalars.layers:
            torch.testing.assert_close(b[:, start_b : start_b + 128], a[:, start_a : start_a + 128], rtol=0, atol=0)
            assert (b[:, start_b + 128 : start_b + 128 + NORMS[layer]] >= 0).all()
            start_a, start_b = start_a + 128, start_b + 128 + NORMS[layer]
    with find_tap(seven, layers=[0, -1]) as ends:
        assert ends.layers == (0, 4) and ends.feature_dim == 256


@needs_sevenn
def test_one_backbone_pass_per_step(seven, fitted):
    """Each gate block runs once per get_forces, bare or wrapped in a ProbeCalculator, and the tap counts it."""
    calls = [0] * 5
    with find_tap(seven) as tap:
        handles = [gate.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, gate in enumerate(tap.feature_modules())]
        try:
            before = tap.n_forward
            for seed in range(3):
                _step(_silicon(seed=seed), seven)
            assert calls == [3] * 5 and tap.n_forward - before == 3
            with ProbeCalculator(seven, fitted / "probe.pt") as probe_calc:
                for seed in range(3):
                    _step(emt_frames(1, 600, size=1, seed=40 + seed)[0], probe_calc)
                    assert 0 <= probe_calc.results["reliability"] <= 1
            assert calls == [6] * 5
        finally:
            for handle in handles:
                handle.remove()


@needs_sevenn
def test_batched_features_equal_single_steps(seven):
    """Tap.predict over cells and molecules of mixed sizes gives each step's energy (eV), forces (eV/Å) and features,
    in passes of at most batch_size structures and 128 atoms, and leaves the shared model in the calculator's
    single-structure mode."""
    frames = [_silicon(seed=1), molecule("CH4"), emt_frames(1, 900, size=1, seed=5)[0], _silicon(seed=2, repeat=2),
              molecule("H2O"), _silicon(seed=3, repeat=2), _silicon(seed=4, repeat=2)]
    with find_tap(seven, channels="scalars+norms") as tap:
        before = tap.n_forward
        batched = list(tap.predict(frames, batch_size=3))  # passes: 8 + 5 + 4 atoms, 64 + 3 (+ 64 > 128), 64 + 64
        assert tap.n_forward - before == 3 and not seven.model.is_batch_data
        for atoms, pred in zip(frames, batched):
            forces = _step(atoms, seven)
            # float32 totals: a batched pass sums the same atomic energies in another order (-343 eV: 4 ulp = 1.2e-4 eV)
            assert pred.energy == pytest.approx(seven.results["energy"], rel=1e-6, abs=1e-5)
            np.testing.assert_allclose(pred.forces, forces, atol=1e-4)
            assert pred.features.shape == (len(atoms), tap.feature_dim)
            torch.testing.assert_close(pred.features, tap.features(), rtol=1e-4, atol=1e-4)


@needs_sevenn
def test_fingerprints_tell_checkpoints_and_fidelities_apart(seven):
    """Every pretrained name loads offline; each checkpoint, and each fidelity of 7net-mf-0, has its own fingerprint."""
    prints = {}
    for name in ("7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0-pbe", "7net-mf-0-r2scan"):
        calc = seven if name == "7net-0" else load_backbone(name)
        with find_tap(calc) as tap:
            prints[name] = tap.fingerprint()
    assert len(set(prints.values())) == 5
    assert load_backbone("7net-mf-0-pbe").modal == "PBE"
    from probe_ase.taps import SevenNetTap

    with pytest.raises(BackboneError, match="7net-mf-0 is multi-fidelity: name a fidelity, 7net-mf-0-pbe or"):
        SevenNetTap.load("7net-mf-0")
    with pytest.raises(BackboneError, match="no SevenNet checkpoint file 7net-omni; probe-ase never downloads"):
        SevenNetTap.load("7net-omni")  # a name sevenn would download


@needs_sevenn
def test_accelerated_tensor_products_are_refused_up_front(seven):
    """A model whose convolutions run another library's tensor product (what enable_cueq, enable_flash and enable_oeq
    build; none runs on this CPU) is refused before any hook, naming the fix."""
    import copy

    accelerated = copy.copy(seven)
    accelerated.model = copy.deepcopy(seven.model)
    accelerated.model.get_submodule("2_convolution").convolution = torch.nn.Identity()  # a stand-in, not e3nn's
    with pytest.raises(BackboneError, match="accelerated tensor products \\(2_convolution.*enable_cueq=False"):
        find_tap(accelerated)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in accelerated.model.modules())


@needs_sevenn
def test_checkpoint_files_load_by_content(seven):
    """A checkpoint file is recognised as SevenNet's (auto) and gives 7net-0's fingerprint; forced to another adapter
    or multi-fidelity without its fidelity, it is refused, naming the fix."""
    import sevenn._const

    with find_tap(load_backbone(sevenn._const.SEVENNET_0_11Jul2024)) as from_file, find_tap(seven) as by_name:
        assert from_file.fingerprint() == by_name.fingerprint()
    with pytest.raises(BackboneError, match='pip install "probe-ase\\[mace\\]"|holds a sevenn model, not mace'):
        load_backbone(sevenn._const.SEVENNET_0_11Jul2024, "mace")  # no mace beside sevenn: its extra is named
    with pytest.raises(BackboneError, match="modal=...\\) yourself"):
        load_backbone(sevenn._const.SEVENNET_MF_0)


@needs_sevenn
def test_a_head_fitted_on_7net_0_is_refused_on_7net_l3i5(fitted):
    probe = Probe.load(fitted / "probe.pt")
    assert (probe.meta.backbone, probe.meta.backbone_path, probe.meta.elements) == ("sevenn", "7net-0", (29,))
    with pytest.raises(MismatchError, match="different or retrained model"):
        ProbeCalculator(load_backbone("7net-l3i5"), fitted / "probe.pt")


@needs_sevenn
def test_command_line_names(fitted, capsys):
    """Score and gated MD take 7net-0 from the head file's record; a bare multi-fidelity name lists the choices."""
    assert main(["score", "--probe", str(fitted / "probe.pt"), str(fitted / "test.xyz"),
                 "-o", str(fitted / "scored.xyz")]) == 0
    p = np.array([a.info["reliability"] for a in read(fitted / "scored.xyz", ":")])
    assert len(p) == 20 and ((0 <= p) & (p <= 1)).all()
    write(fitted / "start.xyz", read(fitted / "test.xyz", 0))
    assert main(["md", str(fitted / "start.xyz"), "--probe", str(fitted / "probe.pt"), "--backbone", "7net-0",
                 "--backbone-type", "sevenn", "--temperature", "900", "--steps", "5", "--action", "flag",
                 "--trajectory", str(fitted / "md.traj"), "--log", str(fitted / "md.log")]) == 0
    assert len(read(fitted / "md.traj", ":")) == 6
    capsys.readouterr()
    assert main(["score", "--probe", str(fitted / "probe.pt"), "--backbone", "7net-mf-0", str(fitted / "test.xyz"),
                 "-o", str(fitted / "other.xyz")]) == 2
    assert "7net-mf-0-pbe, 7net-mf-0-r2scan" in capsys.readouterr().err


MISSING = """
import sys
sys.modules["sevenn"] = sys.modules["mace"] = None  # their imports now fail, as where the extras are not installed
from ase.calculators.emt import EMT
from probe_ase import BackboneError, load_backbone
from probe_ase.taps import ADAPTERS
from probe_ase.testing import train_mace
assert not ADAPTERS["sevenn"].available() and not ADAPTERS["sevenn"].accepts(EMT())
for load in (lambda: load_backbone("7net-0"), lambda: ADAPTERS["sevenn"].load("7net-l3i5"), lambda: train_mace([])):
    try:
        load()
    except BackboneError as err:
        print(err)
    else:
        raise SystemExit("no BackboneError")
"""


def test_a_missing_backbone_library_names_its_extra():
    """Without sevenn (or mace), a SevenNet name (or the tiny MACE) is a BackboneError naming the extra to install,
    never an ImportError."""
    out = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    assert all('needs the sevenn package' in line and 'pip install "probe-ase[sevenn]"' in line for line in lines[:2])
    assert 'needs the mace package' in lines[2] and 'pip install "probe-ase[mace]"' in lines[2]
