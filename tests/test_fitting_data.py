"""Features (:mod:`probe_ase.fitting.data`): labelled data from extxyz, lists and ase.db; batched featurisation and
its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.db import connect
from ase.io import write

from probe_ase import InputError, MissingReferenceError, find_tap, featurize, read_frames


def test_sources_agree(backbones, cu_data, tmp_path):
    frames = cu_data["pool"][:8]
    write(tmp_path / "frames.xyz", frames, format="extxyz")
    with connect(tmp_path / "frames.db") as db:
        for atoms in frames:
            db.write(atoms)
    with find_tap(backbones("mace")) as tap:
        sets = [featurize(tap, src, cache_dir=False, progress=False)
                for src in (frames, tmp_path / "frames.xyz", tmp_path / "frames.db")]
    for other in sets[1:]:
        np.testing.assert_allclose(other.features.numpy(), sets[0].features.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.errors["force_rmse"], sets[0].errors["force_rmse"], rtol=1e-5)
    assert len(sets[0]) == 8 and sets[0].ptr[-1] == 8 * 32


def test_errors_match_the_definition(backbones, cu_data):
    frames = cu_data["pool"][:4]
    calc = backbones("mace")
    with find_tap(calc) as tap:
        data = featurize(tap, frames, cache_dir=False, progress=False)
    for k, atoms in enumerate(frames):
        pred = atoms.copy()
        pred.calc = calc
        df = pred.get_forces() - atoms.get_forces()
        de = pred.get_potential_energy() - atoms.get_potential_energy()
        assert data.errors["force_rmse"][k] == pytest.approx(np.sqrt(np.mean(df**2)), rel=1e-4)
        assert data.errors["force_max"][k] == pytest.approx(np.linalg.norm(df, axis=1).max(), rel=1e-4)
        assert data.errors["energy"][k] == pytest.approx(abs(de), rel=1e-3, abs=1e-5)
        assert data.errors["energy_per_atom"][k] == pytest.approx(abs(de) / len(atoms), rel=1e-3, abs=1e-6)


def test_custom_reference_keys(backbones, cu_data):
    frames = []
    for src in cu_data["pool"][:6]:
        atoms = src.copy()
        atoms.info["dft_energy"] = src.get_potential_energy()
        atoms.arrays["dft_forces"] = src.get_forces()
        frames.append(atoms)
    with find_tap(backbones("mace")) as tap:
        data = featurize(tap, frames, energy_key="dft_energy", forces_key="dft_forces",
                         cache_dir=False, progress=False)
        with pytest.raises(MissingReferenceError, match="no reference energy under key 'energy'"):
            featurize(tap, frames, cache_dir=False, progress=False)
        plain = featurize(tap, cu_data["pool"][:6], cache_dir=False, progress=False)  # the same values, default keys
    for criterion in ("force_rmse", "force_max", "energy", "energy_per_atom"):
        np.testing.assert_allclose(data.error(criterion), plain.error(criterion), rtol=1e-6, err_msg=criterion)
    np.testing.assert_allclose(data.atom_errors, plain.atom_errors, rtol=1e-6)
    assert (data.error("force_rmse") > 0).all()


def test_cache_skips_the_backbone(backbones, cu_data, tmp_path):
    frames = cu_data["pool"][:10]
    with find_tap(backbones("mace")) as tap:
        first = featurize(tap, frames, cache_dir=tmp_path, progress=False)
        runs = tap.n_forward
        second = featurize(tap, frames, cache_dir=tmp_path, progress=False)
        assert tap.n_forward == runs  # served from disk
        changed = [a.copy() for a in frames]
        changed[0].positions[0] += 0.01
        for a, src in zip(changed, frames):
            a.calc = src.calc
        featurize(tap, changed, cache_dir=tmp_path, progress=False)
        assert tap.n_forward > runs  # new data, new key
    assert len(list(tmp_path.glob("mace-*.pt"))) == 2
    np.testing.assert_array_equal(first.features.numpy(), second.features.numpy())
    assert runs == 1  # ten structures, one batched pass
    with find_tap(backbones("mace"), channels="scalars+norms") as norms:  # other channels, other key
        wider = featurize(norms, frames, cache_dir=tmp_path, progress=False)
        assert norms.n_forward == 1 and wider.features.shape[1] == norms.feature_dim > first.features.shape[1]
    assert len(list(tmp_path.glob("mace-*.pt"))) == 3


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_frames(tmp_path / "absent.xyz")
    with pytest.raises(InputError, match="no structures"):
        read_frames([])


def test_a_subset_is_the_featurisation_of_those_frames(backbones, cu_data):
    """``FeatureSet.subset`` of a pass over many frames = a pass over the chosen frames (features, errors, the
    backbone's own forces in eV/Å), in the order asked for."""
    frames, chosen = cu_data["pool"][:10], [7, 2, 5]
    calc = backbones("mace")
    with find_tap(calc) as tap:
        whole = featurize(tap, frames, cache_dir=False, progress=False)
        direct = featurize(tap, [frames[k] for k in chosen], cache_dir=False, progress=False)
    part = whole.subset(chosen)
    assert len(part) == 3 and part.ptr.tolist() == direct.ptr.tolist()
    np.testing.assert_allclose(part.features.numpy(), direct.features.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.forces, direct.forces, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.atom_errors, direct.atom_errors, rtol=1e-5, atol=1e-6)
    for criterion, values in direct.errors.items():
        np.testing.assert_allclose(part.errors[criterion], values, rtol=1e-5, err_msg=criterion)
    assert part.numbers.tolist() == direct.numbers.tolist()
    atoms = frames[2].copy()
    atoms.calc = calc
    np.testing.assert_allclose(part.forces[part.ptr[1]:part.ptr[2]], atoms.get_forces(), rtol=1e-4, atol=1e-5)


def test_a_file_of_frames_is_read_again_on_each_pass_and_fits_as_its_frames(backbones, cu_data, tmp_path):
    """A fit from a file never holds its frames: each pass reads the file again (a FrameFile), and the head is the
    one the same frames in a list give, bit for bit; an empty file is a clear error at its first pass."""
    from probe_ase import FitOptions, fit_probe
    from probe_ase.fitting.data import FrameFile, frame_source

    path = tmp_path / "pool.xyz"
    write(path, cu_data["pool"], format="extxyz")
    source = frame_source(path)
    first, second = list(source), list(source)
    assert isinstance(source, FrameFile) and len(source) == len(cu_data["pool"]) and first[0] is not second[0]
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(first, second))
    options = dict(quantile=0.7, progress=False, options=FitOptions(hidden=16, epochs=3, weight_folds=0))
    from_file = fit_probe(backbones("mace"), path, cache_dir=tmp_path / "cache", **options)
    from_list = fit_probe(backbones("mace"), read_frames(path), cache_dir=False, **options)
    assert from_file.p_star == from_list.p_star and from_file.meta.calibration == from_list.meta.calibration
    for (name, x), (_, y) in zip(from_file.head.state_dict().items(), from_list.head.state_dict().items()):
        assert torch.equal(x, y), name
    (tmp_path / "empty.xyz").write_text("")
    with find_tap(backbones("mace")) as tap, pytest.raises(InputError, match="cannot read structures from .*empty.xyz"):
        featurize(tap, tmp_path / "empty.xyz", cache_dir=False, progress=False)
