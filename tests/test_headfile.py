"""Head files: exact round trip, safe loading, clear errors for damaged files."""

from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest
import torch

from probe_ase import HeadFileError, Probe, ProbeCalculator


def test_round_trip_gives_identical_outputs(backbones, probes, cu_data, tmp_path):
    probe = probes("mace")
    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt")
    assert loaded.meta == probe.meta
    atoms = cu_data["test_out"][2].copy()
    outputs = []
    for p in (probe, loaded):
        with ProbeCalculator(backbones("mace"), p) as calc:
            atoms.calc = calc
            atoms.get_forces()
            outputs.append((calc.results["reliability"], calc.results["atom_importance"].copy()))
            calc.reset()
    assert outputs[0][0] == outputs[1][0]
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    ProbeCalculator(backbones("mace"), tmp_path / "probe.pt").close()  # a path works too


def test_saving_is_atomic_and_leaves_no_temporary_files(probes, tmp_path):
    path = tmp_path / "probe.pt"
    path.write_bytes(b"old")
    probes("mace").save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["probe.pt"]
    assert Probe.load(path).meta == probes("mace").meta


def test_truncated_file_is_refused(probes, tmp_path):
    path = tmp_path / "probe.pt"
    probes("mace").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadFileError, match="not a readable"):
        Probe.load(path)


def test_edited_weights_fail_the_checksum(probes, tmp_path):
    path = tmp_path / "probe.pt"
    probes("mace").save(path)
    payload = torch.load(path, weights_only=True)
    payload["state"]["readout.3.bias"] += 1.0
    torch.save(payload, path)
    with pytest.raises(HeadFileError, match="checksum"):
        Probe.load(path)


class Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading!",))


def test_file_with_code_is_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "probe-ase-head", "payload": Exploit()}, path)
    with pytest.raises(HeadFileError):
        Probe.load(path)
    assert "code ran" not in capsys.readouterr().out
    with zipfile.ZipFile(path) as z:  # the file really holds the pickled call to print
        assert any(b"print" in z.read(name) for name in z.namelist() if name.endswith("data.pkl"))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(HeadFileError, match="no head file"):
        Probe.load(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(HeadFileError, match="not a probe-ase head file"):
        Probe.load(tmp_path / "other.pt")


def test_other_versions_and_schemas_are_a_head_file_error(probes, tmp_path):
    import json

    from probe_ase.model.headfile import READABLE, VERSION, _checksum

    path = tmp_path / "head.pt"
    probes("mace").save(path)
    payload = torch.load(path, weights_only=True)
    for version in (min(READABLE) - 1, VERSION + 1):
        torch.save({**payload, "version": version}, tmp_path / "v.pt")
        with pytest.raises(HeadFileError, match=f"version {version}.*reads versions 6, 7, 8, 9, 10"):
            Probe.load(tmp_path / "v.pt")
    meta = json.loads(payload["meta"])
    meta["config"]["a_field_from_the_future"] = 1  # a schema change without a version bump
    meta_json = json.dumps(meta)
    torch.save({**payload, "meta": meta_json, "sha256": _checksum(meta_json, payload["state"])}, tmp_path / "s.pt")
    with pytest.raises(HeadFileError, match="do not match that schema"):
        Probe.load(tmp_path / "s.pt")


def _as_version_11(payload: dict) -> dict:
    """A version-12 file's metadata as version 11 wrote it: no worker count in the fit's options."""
    import json

    meta = json.loads(payload["meta"])
    meta["spec"]["options"].pop("workers")
    return meta


def _as_version_10(payload: dict) -> dict:
    """A version-12 file's metadata as version 10 wrote it: no worker count, no label sources."""
    meta = _as_version_11(payload)
    meta.pop("labels")
    return meta


def test_a_version_11_file_reads_as_fitted_with_one_worker(probes, tmp_path):
    import json

    from probe_ase.model.headfile import _checksum

    probe = probes("mace")
    probe.save(tmp_path / "head.pt")
    payload = torch.load(tmp_path / "head.pt", weights_only=True)
    assert payload["version"] == 12 and json.loads(payload["meta"])["spec"]["options"]["workers"] == 1
    meta_json = json.dumps(_as_version_11(payload), sort_keys=True)
    torch.save({**payload, "version": 11, "meta": meta_json, "sha256": _checksum(meta_json, payload["state"])},
               tmp_path / "v11.pt")
    loaded = Probe.load(tmp_path / "v11.pt")
    assert loaded.meta == probe.meta and loaded.meta.spec.options.workers == 1


def _as_version_9(payload: dict) -> dict:
    """A version-12 file's metadata as version 9 wrote it: no worker count, no label sources, the spec's criterion, quantiles, target
    risk and delta repeated as fields of their own."""
    from probe_ase.model.headfile import SPEC_FIELDS

    meta = _as_version_10(payload)
    return meta | {name: meta["spec"][name] for name in SPEC_FIELDS}


def test_a_version_10_file_reads_with_its_labels_unrecorded(probes, cu_data, tmp_path):
    """Version 11 records where the labels came from: a version-10 file loads with none recorded, as reference data."""
    import json

    from probe_ase.model.headfile import _checksum

    probe = probes("mace")
    probe.save(tmp_path / "head.pt")
    payload = torch.load(tmp_path / "head.pt", weights_only=True)
    assert probe.meta.labels == {"reference": len(cu_data["pool"])}
    meta_json = json.dumps(_as_version_10(payload), sort_keys=True)
    torch.save({**payload, "version": 10, "meta": meta_json, "sha256": _checksum(meta_json, payload["state"])},
               tmp_path / "v10.pt")
    loaded = Probe.load(tmp_path / "v10.pt")
    assert loaded.meta == dataclasses.replace(probe.meta, labels={})
    assert loaded.meta.label_source == "reference"


def test_a_version_9_file_reads_as_version_10(probes, tmp_path):
    """Version 10 stores each fit setting once: a version-9 file (the spec's settings repeated) loads to the same
    metadata, and the settings read from the spec."""
    import json

    from probe_ase.model.headfile import _checksum

    path = tmp_path / "head.pt"
    probe = probes("mace")
    probe.save(path)
    payload = torch.load(path, weights_only=True)
    meta_json = json.dumps(_as_version_9(payload), sort_keys=True)
    torch.save({**payload, "version": 9, "meta": meta_json, "sha256": _checksum(meta_json, payload["state"])},
               tmp_path / "v9.pt")
    loaded = Probe.load(tmp_path / "v9.pt")
    assert loaded.meta == dataclasses.replace(probe.meta, labels={})
    assert (loaded.meta.criterion, loaded.meta.quantile, loaded.meta.target_risk, loaded.meta.delta) == (
        probe.spec.criterion, probe.spec.quantile, probe.spec.target_risk, probe.spec.delta)


def _as_version_8(payload: dict) -> tuple[dict, dict]:
    """A version-10 file's metadata and state laid out as version 8 wrote them: the temperatures as head buffers and
    metadata fields, the novelty weight in the metadata, no spec (its settings as fields and in the report), the
    members' weights apart."""
    meta, state = _as_version_9(payload), {}
    for name, value in payload["state"].items():  # member 0's weights at the top, member k under others.{k-1}.
        if name.startswith("novelty.") or name == "element_index":
            state[name] = value
            continue
        old = "embed.weight" if name == "embed" else name
        for k, member in enumerate(value):
            state[old if k == 0 else f"others.{k - 1}.{old}"] = member.clone()
    calibration, spec = meta.pop("calibration"), meta.pop("spec")
    meta |= {"temperature": calibration["temperature"], "novelty_weight": calibration["novelty_weight"]}
    meta["report"]["train"] = {k: spec["options"][k] for k in ("epochs", "patience", "seed", "calibration", "folds")}
    state["temperature"] = torch.tensor(calibration["temperature"], dtype=torch.float32)
    state["atom_temperature"] = torch.tensor(calibration["atom_temperature"], dtype=torch.float32)
    return meta, state


def test_a_version_6_file_reads_as_one_head_on_scalars(probes, tmp_path):
    """Version 7 added HeadConfig.members, version 8 HeadMeta.channels, version 9 the spec and the calibration: a
    version-6 file (none of them) loads as a single head reading the scalar channels, with its calibration and fit
    settings read back from its fields, and scores as before."""
    import json

    from probe_ase.model.headfile import _checksum

    path = tmp_path / "head.pt"
    probes("mace").save(path)
    meta, state = _as_version_8(torch.load(path, weights_only=True))
    del meta["config"]["members"], meta["channels"]
    meta_json = json.dumps(meta, sort_keys=True)
    old = tmp_path / "v6.pt"
    torch.save({"format": "probe-ase-head", "version": 6, "meta": meta_json, "state": state,
                "sha256": _checksum(meta_json, state)}, old)
    loaded = Probe.load(old)
    expected = probes("mace").meta
    assert loaded.meta.config.members == 1 and loaded.meta.channels == "scalars"
    # the temperatures went through float32 buffers in version 8 and earlier
    assert loaded.meta.calibration.novelty_weight == expected.calibration.novelty_weight
    assert loaded.meta.calibration.temperature == pytest.approx(expected.calibration.temperature, rel=1e-6)
    spec = loaded.meta.spec  # the quantile, tolerances, options it was fitted with; what the tap and graph used
    assert dataclasses.replace(spec, options=dataclasses.replace(spec.options, layers=None, channels=None,
                                                                 cutoff=None)) == expected.spec
    assert (spec.options.layers, spec.options.channels, spec.options.cutoff) == (
        expected.layers, "scalars", expected.config.cutoff)
    assert dataclasses.replace(loaded.meta, calibration=expected.calibration, spec=expected.spec) == \
        dataclasses.replace(expected, labels={})
    for name, value in probes("mace").head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], value)
    meta["config"]["max_pool"] = True  # an option a study tried and version 9 removed: refit, never misread
    meta_json = json.dumps(meta, sort_keys=True)
    torch.save({"format": "probe-ase-head", "version": 8, "meta": meta_json, "state": state,
                "sha256": _checksum(meta_json, state)}, old)
    with pytest.raises(HeadFileError, match="fitted with max_pool, which this probe-ase no longer has.*refit"):
        Probe.load(old)
