"""The active-learning config (:mod:`probe_ase.al.config`): typed, frozen, every key and value checked."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import tomllib

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin

from probe_ase import InputError
from probe_ase.al.config import AlConfig, ExploreConfig, LabelConfig, ReferenceConfig, RetrainConfig
from probe_ase.md import make_dynamics

MINIMAL = {"backbone": "model.model", "probe": "probe.pt", "start": "start.xyz",
           "reference": {"calculator": "ase.calculators.emt:EMT"}}

FULL = """
backbone = "model.model"
probe = "probe.pt"
db = "postgresql://user@host:5432/al"
start = "start.xyz"
rounds = 3

[reference]
calculator = "ase.calculators.emt:EMT"
options = { asap_cutoff = true }

[explore]
ensemble = "npt"
temperature = 600
timestep = 2
friction = 0.02
seed = 7
steps = 40
max_new = 5
min_separation = 3
p_lo = 0.1
p_hi = 0.6
region_buffer = 6
min_atom_reliability = 0.4

[label]
workers = 2
retries = 0
lease = 30

[retrain]
train_data = "train.xyz"
fit_data = "pool.xyz"
epochs = 4
work_dir = "work"
"""

SECTIONS = {"": AlConfig, "reference": ReferenceConfig, "explore": ExploreConfig, "label": LabelConfig,
            "retrain": RetrainConfig}


def _with(**changes: object) -> dict:
    """MINIMAL plus a ``[retrain]`` table, with ``changes`` (``"section.key": value``; None deletes) applied."""
    mapping = copy.deepcopy(MINIMAL) | {"retrain": {"train_data": "train.xyz", "fit_data": "pool.xyz"}}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        table = mapping.setdefault(section, {}) if section else mapping
        if value is None:
            del table[key]
        else:
            table[key] = value
    return mapping


def _error(mapping: dict) -> InputError:
    with pytest.raises(InputError) as info:
        AlConfig.from_mapping(mapping, path="al.toml")
    return info.value


def test_defaults():
    config = AlConfig.from_mapping(MINIMAL)
    assert config == AlConfig("model.model", "probe.pt", "start.xyz", ReferenceConfig("ase.calculators.emt:EMT"))
    assert (config.db, config.rounds, config.retrain, config.reference.options) == ("al.db", 1, None, {})
    assert dataclasses.astuple(config.explore) == ("nvt", 300.0, 1.0, 0.01, 0, 500, 20, 10, None, None, None, "auto",
                                                   None, 1, 0.0, 3.0)
    assert dataclasses.astuple(config.label) == (1, 1, 60.0)
    retrain = AlConfig.from_mapping(_with()).retrain
    assert (retrain.epochs, retrain.work_dir) == (20, "al-retrain")


def test_full_config_round_trips_to_the_same_frozen_object(tmp_path):
    path = tmp_path / "al.toml"
    path.write_text(FULL)
    config = AlConfig.from_toml(path)
    expected = AlConfig(
        backbone="model.model", probe="probe.pt", start="start.xyz", db="postgresql://user@host:5432/al", rounds=3,
        reference=ReferenceConfig("ase.calculators.emt:EMT", {"asap_cutoff": True}),
        explore=ExploreConfig("npt", 600.0, 2.0, 0.02, 7, 40, 5, 3, 0.1, 0.6, 6.0, 0.4),
        label=LabelConfig(2, 0, 30.0), retrain=RetrainConfig("pool.xyz", "train", "train.xyz", 4, None, "work"))
    assert config == expected
    assert type(config.explore.temperature) is float and type(config.label.lease) is float  # TOML ints converted
    assert AlConfig.from_mapping(tomllib.loads(FULL)) == config
    assert AlConfig.from_mapping(dataclasses.asdict(config)) == config
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.explore.steps = 1  # type: ignore[misc]


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_in_each_section(section):
    err = _error(_with(**{f"{section}.bogus" if section else "bogus": 1}))
    where = f"[{section}]" if section else "the top level"
    assert str(err).startswith(f"unknown keys ['bogus'] in {where} of config al.toml; allowed: ")
    allowed = sorted(item.name for item in dataclasses.fields(SECTIONS[section]))
    assert (err.section, err.unknown, err.allowed, err.path) == (section, ["bogus"], allowed, "al.toml")
    assert str(allowed) in str(err)


def test_unknown_table_is_an_unknown_top_level_key():
    err = _error(_with(**{"bogus": {"x": 1}}))
    assert err.unknown == ["bogus"] and "in the top level of config al.toml" in str(err)


@pytest.mark.parametrize("key,value,allowed", [
    ("explore.steps", "many", "a whole number >= 1"),
    ("explore.steps", 5.0, "a whole number >= 1"),
    ("label.workers", True, "a whole number >= 1"),
    ("explore.temperature", "hot", "a number >= 0 (K)"),
    ("explore.temperature", math.inf, "a number >= 0 (K)"),
    ("explore.timestep", math.nan, "a positive number (fs)"),
    ("explore.ensemble", "nph", "one of nve, nvt, npt"),
    ("explore.min_atom_reliability", "often", '"auto" or a number in [0, 1]'),
    ("backbone", 3, "a string"),
    ("retrain.work_dir", ["a"], "a string"),
    ("reference.calculator", 1, 'a string "module:attribute" (e.g. "ase.calculators.emt:EMT")'),
    ("reference.options", 5, "a table of keyword arguments"),
    ("explore", 5, "a table"),
])
def test_wrong_type(key, value, allowed):
    err = _error(_with(**{key: value}))
    assert str(err) == f"{key} in config al.toml must be {allowed}, got {value!r}"
    assert err.key == key and err.value is value and err.path == "al.toml"


#: every number in the config: a value just out of range, and the range and unit the error must name
OUT_OF_RANGE = {
    "rounds": (0, "a whole number >= 1"),
    "explore.temperature": (-1, "a number >= 0 (K)"),
    "explore.timestep": (0, "a positive number (fs)"),
    "explore.friction": (0.0, "a positive number (1/fs)"),
    "explore.seed": (-1, "a whole number >= 0"),
    "explore.steps": (0, "a whole number >= 1"),
    "explore.max_new": (0, "a whole number >= 1"),
    "explore.min_separation": (0, "a whole number >= 1 (steps)"),
    "explore.p_lo": (-0.1, "a number in [0, 1]"),
    "explore.p_hi": (1.5, "a number in [0, 1]"),
    "explore.region_buffer": (0, "a positive number (Å)"),
    "explore.min_atom_reliability": (1.2, '"auto" or a number in [0, 1]'),
    "explore.companion_every": (0, "a whole number >= 1 (steps)"),
    "explore.vouch": (1.5, "a number in [0, 1]"),
    "explore.disagreement_hi": (0.5, "a number >= 1"),
    "label.workers": (0, "a whole number >= 1"),
    "label.retries": (-1, "a whole number >= 0"),
    "label.lease": (-5.0, "a positive number (s)"),
    "retrain.epochs": (0, "a whole number >= 1"),
    "retrain.learning_rate": (0, "a positive number"),
}


def test_every_number_has_an_out_of_range_case():
    numbers = {f"{name}.{item.name}" if name else item.name for name, cls in SECTIONS.items()
               for item in dataclasses.fields(cls) if item.metadata["rule"].kind in (int, float)}
    assert numbers == set(OUT_OF_RANGE)


@pytest.mark.parametrize("key", OUT_OF_RANGE)
def test_out_of_range_number(key):
    value, allowed = OUT_OF_RANGE[key]
    err = _error(_with(**{key: value}))
    assert str(err) == f"{key} in config al.toml must be {allowed}, got {value!r}"
    assert (err.key, err.value) == (key, value)


def test_lowest_and_highest_allowed_numbers_pass():
    config = AlConfig.from_mapping(_with(**{"explore.temperature": 0, "explore.seed": 0, "explore.p_lo": 0,
                                            "explore.p_hi": 1, "explore.min_atom_reliability": 0, "label.retries": 0}))
    assert (config.explore.temperature, config.explore.p_lo, config.explore.p_hi) == (0.0, 0.0, 1.0)
    assert (config.explore.min_atom_reliability, config.label.retries) == (0.0, 0)


@pytest.mark.parametrize("key,message,missing", [
    ("start", "config al.toml lacks ['start']", ["start"]),
    ("reference.calculator", "[reference] of config al.toml lacks ['calculator']", ["calculator"]),
    ("retrain.fit_data", "[retrain] of config al.toml lacks ['fit_data']", ["fit_data"]),
])
def test_missing_required_key(key, message, missing):
    err = _error(_with(**{key: None}))
    assert str(err) == message and err.missing == missing


def test_retrain_methods(tmp_path):
    """``method = "train"`` trains MACE from its training frames (required); ``"fine-tune"`` fine-tunes the current
    backbone with its own library's trainer, its training frames optional; each builds its own trainer."""
    from ase.io import write

    from probe_ase.al.finetune import FineTuner
    from probe_ase.al.retrain import MaceTrainer
    from probe_ase.testing import emt_frames

    err = _error(_with(**{"retrain.train_data": None}))
    assert str(err) == "[retrain] of config al.toml lacks ['train_data'] (method \"train\" trains on them)"
    assert err.missing == ["train_data"]
    err = _error(_with(**{"retrain.method": "finetune"}))
    assert str(err) == "retrain.method in config al.toml must be one of train, fine-tune, got 'finetune'"
    write(tmp_path / "pool.xyz", emt_frames(4, 300, size=1, seed=1), format="extxyz")
    fine = AlConfig.from_mapping(_with(**{"retrain.method": "fine-tune", "retrain.train_data": None,
                                          "retrain.learning_rate": 1e-3, "retrain.fit_data": str(tmp_path / "pool.xyz"),
                                          "retrain.work_dir": str(tmp_path / "work")})).retrain
    assert (fine.method, fine.train_data, fine.learning_rate) == ("fine-tune", None, 1e-3)
    tuner = fine.trainer()
    assert isinstance(tuner, FineTuner) and (tuner.epochs, tuner.learning_rate, len(tuner.fit_frames)) == (20, 1e-3, 4)
    train = AlConfig.from_mapping(_with(**{"retrain.fit_data": str(tmp_path / "pool.xyz"),
                                           "retrain.train_data": str(tmp_path / "pool.xyz"),
                                           "retrain.work_dir": str(tmp_path / "work")})).retrain
    assert train.method == "train" and isinstance(train.trainer(), MaceTrainer)


def test_band_edges_in_order():
    err = _error(_with(**{"explore.p_lo": 0.6, "explore.p_hi": 0.2}))
    assert "explore.p_lo in config al.toml must be <= explore.p_hi" in str(err)
    assert (err.p_lo, err.p_hi) == (0.6, 0.2)


def test_companion_settings_need_a_companion():
    err = _error(_with(**{"explore.vouch": 0.5}))
    assert "explore.companion_every and explore.vouch in config al.toml need explore.companion" in str(err)
    config = AlConfig.from_mapping(_with(**{"explore.companion": "7net-l3i5", "explore.companion_every": 5,
                                            "explore.vouch": 0.5}))
    assert (config.explore.companion, config.explore.companion_every, config.explore.vouch) == ("7net-l3i5", 5, 0.5)
    assert config.explore.disagreement_hi == 3.0


def test_python_construction_is_checked_and_converted():
    with pytest.raises(InputError, match=r"^explore\.steps in the config must be a whole number >= 1, got 0$"):
        ExploreConfig(steps=0)
    with pytest.raises(InputError, match="label.lease"):
        LabelConfig(lease=0)
    options = {"asap_cutoff": True}
    config = AlConfig("m", "p", "s", ReferenceConfig("ase.calculators.emt:EMT", options), explore={"steps": 5})
    options["asap_cutoff"] = False
    assert config.explore == ExploreConfig(steps=5) and config.reference.options == {"asap_cutoff": True}


@pytest.mark.parametrize("text", ["backbone = \n", None])
def test_unreadable_file(tmp_path, text):
    path = tmp_path / "al.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=f"^cannot read config {path}: ") as info:
        AlConfig.from_toml(path)
    assert info.value.path == str(path)


def test_reference_factory_is_picklable_and_passes_options():
    factory = pickle.loads(pickle.dumps(ReferenceConfig("ase.calculators.emt:EMT", {"asap_cutoff": True}).factory()))
    calc = factory()
    assert isinstance(calc, EMT) and calc.parameters["asap_cutoff"] is True
    with pytest.raises(InputError, match="cannot import reference calculator 'no_such_module:Calc'") as info:
        ReferenceConfig("no_such_module:Calc").factory()
    assert info.value.calculator == "no_such_module:Calc"


def test_dynamics_of_a_round_seeds_with_seed_plus_round():
    explore = ExploreConfig(temperature=500, timestep=2.0, friction=0.02, seed=3)
    atoms = bulk("Cu", cubic=True)
    dyn = explore.dynamics(atoms, 2)
    assert isinstance(dyn, Langevin) and dyn.dt == pytest.approx(2.0 * units.fs)
    assert dyn.fr == pytest.approx(0.02 / units.fs)
    same = bulk("Cu", cubic=True)
    make_dynamics(same, "nvt", 500.0, 2.0, 0.02, seed=5)
    np.testing.assert_array_equal(atoms.get_momenta(), same.get_momenta())
    other = bulk("Cu", cubic=True)
    explore.dynamics(other, 3)
    assert not np.allclose(atoms.get_momenta(), other.get_momenta())
