"""Pretrained CHGNet (weights from its wheel, no download) end to end: load, fit, score, gated MD."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ase.io import read, write

from probe_ase import BackboneError, MismatchError, ProbeCalculator, load_backbone
from probe_ase.cli import main
from probe_ase.testing import emt_frames

from conftest import require_backbone

pytestmark = pytest.mark.chgnet


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A head fitted with the CLI on pretrained CHGNet against EMT copper (4-atom cells: CHGNet is ~10 ms/atom)."""
    require_backbone("chgnet")
    root = tmp_path_factory.mktemp("chgnet")
    write(root / "pool.xyz", emt_frames(50, 300, size=1, seed=21) + emt_frames(50, 1500, size=1, seed=22),
          format="extxyz")
    write(root / "test.xyz", emt_frames(15, 300, size=1, seed=23) + emt_frames(15, 1500, size=1, seed=24),
          format="extxyz")
    assert main(["fit", "--backbone", "chgnet-0.3.0", "--data", str(root / "pool.xyz"), "--quantile", "0.7",
                 "--epochs", "40", "--no-cache", "-o", str(root / "probe.pt")]) == 0
    return root


def test_pretrained_names_and_files_load_offline():
    require_backbone("chgnet")
    from chgnet.model.dynamics import CHGNetCalculator

    calc = load_backbone("chgnet-0.3.0")
    assert isinstance(calc, CHGNetCalculator) and calc.model.version == "0.3.0"
    import chgnet

    wheel = os.path.join(os.path.dirname(chgnet.__file__), "pretrained")
    wheel_file = os.path.join(wheel, "0.3.0", "chgnet_0.3.0_e29f68s314m37.pth.tar")
    assert isinstance(load_backbone(wheel_file), CHGNetCalculator)  # detected from the file ("auto")
    # a 0.2.0 file (output-MLP biases its model_args do not record) loads as CHGNet.load("0.2.0") does
    from_file = load_backbone(os.path.join(wheel, "0.2.0", "chgnet_0.2.0_e30f77s348m32.pth.tar"))
    from probe_ase.taps import CHGNetTap

    with CHGNetTap(from_file) as a, CHGNetTap(load_backbone("chgnet-0.2.0")) as b:
        assert a.fingerprint() == b.fingerprint()
    with pytest.raises(BackboneError, match="holds a chgnet model, not mace"):
        load_backbone(wheel_file, "mace")


def test_a_saved_backbone_loads_back_as_the_same_model(tmp_path):
    """``save_backbone`` (what an active-learning checkpoint writes) gives a file ``load_backbone`` reads back to the
    same weights and energies (eV), also when its model_args record ``mlp_out_bias`` (files CHGNet's trainer
    writes)."""
    require_backbone("chgnet")
    import torch

    from probe_ase.taps import CHGNetTap

    atoms = emt_frames(1, 600, size=1, seed=3)[0]
    with CHGNetTap(load_backbone("chgnet-0.3.0")) as tap:
        tap.save_backbone(tmp_path / "saved.chgnet")
        saved = torch.load(tmp_path / "saved.chgnet", weights_only=False)
        saved["model"]["model_args"]["mlp_out_bias"] = any(k.endswith("mlp_out.layers.1.bias")
                                                           for k in saved["model"]["state_dict"])
        torch.save(saved, tmp_path / "trainer.chgnet")
        expected, energy = tap.fingerprint(), tap.calc.get_potential_energy(atoms.copy())
    for name in ("saved.chgnet", "trainer.chgnet"):
        with CHGNetTap(load_backbone(tmp_path / name)) as loaded:
            assert loaded.fingerprint() == expected
            assert loaded.calc.get_potential_energy(atoms.copy()) == pytest.approx(energy, abs=1e-6)


def test_fit_score_and_gated_md_from_the_command_line(fitted, capsys):
    from probe_ase import Probe

    probe = Probe.load(fitted / "probe.pt")
    assert (probe.meta.backbone, probe.meta.backbone_path) == ("chgnet", "chgnet-0.3.0")
    assert probe.meta.elements == (29,)
    # score: the backbone comes from the head file's record, by name
    assert main(["score", "--probe", str(fitted / "probe.pt"), str(fitted / "test.xyz"),
                 "-o", str(fitted / "scored.xyz")]) == 0
    scored = read(fitted / "scored.xyz", ":")
    p = np.array([a.info["reliability"] for a in scored])
    assert len(scored) == 30 and ((0 <= p) & (p <= 1)).all()
    assert p[:15].mean() > p[15:].mean()  # 300 K frames judged more reliable than 1500 K ones
    # gated MD, flagging and logging every step
    write(fitted / "start.xyz", read(fitted / "test.xyz", 0))
    log = fitted / "md.log"
    assert main(["md", str(fitted / "start.xyz"), "--probe", str(fitted / "probe.pt"), "--temperature", "1500",
                 "--steps", "20", "--action", "flag", "--trajectory", str(fitted / "md.traj"),
                 "--log", str(log), "--flagged", str(fitted / "flagged.xyz")]) == 0
    rows = [line for line in log.read_text().splitlines() if line and not line.startswith("#")]
    assert len(rows) == 21  # step 0 and 20 steps
    assert len(read(fitted / "md.traj", ":")) == 21


def test_a_head_refuses_another_pretrained_chgnet(fitted):
    with pytest.raises(MismatchError, match="different or retrained model"):
        ProbeCalculator(load_backbone("chgnet-0.2.0"), fitted / "probe.pt")
