"""Every adapter in the registry passes check_tap; layer choice, fingerprints, refusals."""

from __future__ import annotations

import copy
import pytest
import torch

from probe_ase import BackboneError, InputError, find_tap
from probe_ase.taps import ADAPTERS, MaceTap, ModuleTap
from probe_ase.testing import check_tap

from conftest import backbone_marks, require_backbone


def test_every_adapter_passes_check_tap(backbone_name, backbones, cu_data):
    """The conformance suite: layers vs a hook-free reference, one pass, batched, graph, invariance, copy, close."""
    report = check_tap(backbones(backbone_name), cu_data["test_out"][0])
    assert set(report) == {"layers", "one_pass", "batched", "neighbour_graph", "invariance", "copy", "close"}
    assert "equal the reference" in report["layers"]  # every shipped adapter has a reference computation
    assert report["neighbour_graph"].startswith("equal")  # and reads the backbone's own list


#: every adapter's channel sets besides its default (the default passes check_tap above)
OTHER_CHANNELS = [pytest.param(kind, channels, marks=backbone_marks(kind))
                  for kind, cls in ADAPTERS.items() for channels in cls.channel_sets if channels != cls.default_channels]


@pytest.mark.parametrize(("kind", "channels"), OTHER_CHANNELS)
def test_every_channel_set_passes_check_tap(kind, channels, backbones, cu_data):
    """Each non-default channel set (MACE's vector norms, PaiNN's scalars alone) is exact, invariant and one pass."""
    require_backbone(kind)
    calc = backbones(kind)
    report = check_tap(calc, cu_data["test_out"][0], make_tap=lambda: find_tap(calc, channels=channels))
    assert "equal the reference" in report["layers"] and report["invariance"]


@pytest.mark.parametrize("kind", [pytest.param("mace"), pytest.param("painn", marks=pytest.mark.schnetpack)])
def test_vector_norms_sit_beside_the_scalars_and_share_the_pass(kind, backbones, cu_data):
    """One step feeds a scalars tap and a scalars+norms tap on one backbone: each layer of the latter is the
    former's scalars, then one nonnegative norm per vector channel (PaiNN: as many as scalars)."""
    require_backbone(kind)
    calc = backbones(kind)
    if kind == "mace":  # one norm per non-scalar irrep channel: 16x1o in the first product, none in the last
        expected = [sum(mul for mul, ir in p.linear.irreps_out if (ir.l, ir.p) != (0, 1)) for p in calc.models[0].products]
    with find_tap(calc, channels="scalars") as scalars, find_tap(calc, channels="scalars+norms") as both:
        if kind == "painn":  # one norm per vector channel of mu: as many as scalars
            expected = [scalars.layer_width(layer) for layer in scalars.layers]
        atoms = cu_data["test_out"][1].copy()
        atoms.calc = calc
        calc.reset()
        atoms.get_forces()
        a, b = scalars.features(), both.features()
        assert both.n_forward == scalars.n_forward  # one pass seen by both
        start_a = start_b = 0
        for layer in scalars.layers:
            width = scalars.layer_width(layer)
            assert both.layer_width(layer) == width + expected[layer]
            torch.testing.assert_close(b[:, start_b : start_b + width], a[:, start_a : start_a + width], rtol=0, atol=0)
            norms = b[:, start_b + width : start_b + both.layer_width(layer)]
            assert norms.shape[1] == expected[layer] and (norms >= 0).all()
            start_a, start_b = start_a + width, start_b + both.layer_width(layer)
        assert sum(expected) > 0 and both.feature_dim == scalars.feature_dim + sum(expected) == b.shape[1]


def test_unknown_channel_sets_are_clear_errors(backbones):
    calc = backbones("mace")
    with pytest.raises(InputError, match="channels 'vectors' invalid for a mace backbone; it offers 'scalars', "
                                         "'scalars\\+norms'"):
        find_tap(calc, channels="vectors")
    assert not any(m._forward_hooks for m in calc.models[0].modules())  # refused before any hook


@pytest.mark.chgnet
def test_invariant_backbones_offer_scalars_only(backbones):
    """CHGNet's atom features are invariant as they are: there is no vector channel to take norms of."""
    require_backbone("chgnet")
    with pytest.raises(InputError, match="invalid for a chgnet backbone; it offers 'scalars'$"):
        find_tap(backbones("chgnet"), channels="scalars+norms")


def test_check_tap_catches_a_wrong_tap(backbones, cu_data):
    """A tap whose features are not the layer's (here: one step stale) fails the suite, naming the check."""
    calc = backbones("mace")

    class StaleTap(MaceTap):
        def features(self):
            stale, self._last = getattr(self, "_last", None), super().features().clone()
            return stale if stale is not None else self._last

    with pytest.raises(AssertionError, match="check_tap layers"):
        check_tap(calc, cu_data["test_out"][0], make_tap=lambda: StaleTap(calc))


def test_layer_selection_and_close(backbone_name, backbones, cu_data):
    calc = backbones(backbone_name)
    with find_tap(calc) as full:
        width = full.feature_dim
    with find_tap(calc, layers=[0]) as first:
        assert first.layers == (0,)
        assert first.feature_dim == first.layer_width(0) < width
    with pytest.raises(InputError, match="layers"):
        find_tap(calc, layers=[7])
    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in full.module.modules())

    hooks_before = n_hooks()
    tap = find_tap(calc)
    assert n_hooks() > hooks_before
    tap.close()
    assert n_hooks() == hooks_before
    calc.reset()
    atoms = cu_data["test_in"][1].copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    assert tap.n_forward == 0
    with pytest.raises(BackboneError, match="closed"):
        tap.features()


def test_fingerprint_tells_models_apart(backbones, cu_data):
    from probe_ase.testing import train_mace

    other = train_mace(cu_data["train"][:10], epochs=1, seed=1)
    calc = backbones("mace")
    with find_tap(calc) as a, find_tap(other) as b:
        twin = copy.deepcopy(calc)  # same weights, another module; the copied hooks must ignore it
        with find_tap(twin) as c:
            assert c.fingerprint() == a.fingerprint() != b.fingerprint()
            before = a.n_forward
            atoms = cu_data["test_in"][0].copy()
            atoms.calc = twin
            atoms.get_potential_energy()
            assert (a.n_forward, c.n_forward) == (before, 1)  # the copy's pass reached only its own tap
            assert c.features().shape == (len(atoms), c.feature_dim)


def test_no_backbone_is_a_clear_error():
    from ase.calculators.emt import EMT

    with pytest.raises(BackboneError, match="EMT"):
        find_tap(EMT())


def test_untappable_mace_models_are_refused_up_front(backbones, tmp_path):
    """TorchScript, torch.compile'd and cuEquivariance MACE fail at construction with the fix named."""
    from e3nn.util import jit as e3nn_jit
    from mace.calculators import MACECalculator

    model = backbones("mace").models[0]
    torch.save(model, tmp_path / "m.model")
    scripted = MACECalculator(model_paths=str(tmp_path / "m.model"), device="cpu", default_dtype="float32")
    scripted.models[0] = e3nn_jit.compile(scripted.models[0])  # what a *_compiled.model file holds
    with pytest.raises(BackboneError, match="TorchScript.*uncompiled"):
        find_tap(scripted)
    for flag, fix in (("use_compile", "compile_mode"), ("_uses_accelerated_backend", "enable_cueq=False")):
        calc = MACECalculator(model_paths=str(tmp_path / "m.model"), device="cpu", default_dtype="float32")
        setattr(calc, flag, True)  # the state enable_cueq / compile_mode leave (neither runs on this CPU)
        with pytest.raises(BackboneError, match=fix):
            find_tap(calc)
        assert not any(m._forward_hooks for m in calc.models[0].modules())  # refused before any hook


def test_module_tap_on_mace_products_equals_the_mace_adapter(backbones, cu_data):
    """The generic tap, told where MACE's features are, reads what the MACE adapter reads."""
    calc = backbones("mace")
    model = calc.models[0]
    with find_tap(calc) as mace:
        widths = [mace.layer_width(i) for i in mace.layers]
        generic = ModuleTap(calc, modules=["products.0", "products.1"], widths=widths, model=model, cutoff=mace.cutoff,
                            invariant=lambda layer, out: out[:, : widths[layer]])  # the 0e channels come first
        with generic:
            atoms = cu_data["test_out"][3].copy()
            atoms.calc = calc
            atoms.get_forces()
            torch.testing.assert_close(generic.features(), mace.features(), rtol=0, atol=0)
            assert generic.neighbour_graph(generic.cutoff) is None  # reads no list: the head builds its graph
            (pred,) = generic.predict([atoms])
            torch.testing.assert_close(pred.features, mace.features(), rtol=1e-6, atol=1e-6)


def test_module_tap_bad_input_is_clear(backbones, cu_data):
    calc = backbones("mace")
    model = calc.models[0]
    with pytest.raises(InputError, match="no module 'products.9'"):
        ModuleTap(calc, modules=["products.9"], widths=[8], model=model, cutoff=4.0)
    with pytest.raises(InputError, match="no torch module in .model"):
        ModuleTap(calc, modules=["products.0"], widths=[8], cutoff=4.0)
    with pytest.raises(InputError, match="cannot read the output width"):
        ModuleTap(calc, modules=["products.0"], model=model, cutoff=4.0)
    with ModuleTap(calc, modules=["products.0"], widths=[5], model=model, cutoff=4.0) as wrong:
        atoms = cu_data["test_in"][0].copy()
        atoms.calc = calc
        calc.reset()
        with pytest.raises(BackboneError, match=r"layer 0: invariant\(\) gave .* expected \(n_atoms, 5\)"):
            atoms.get_forces()
    assert wrong.n_forward == 0  # closed by the with block


def test_a_tap_you_pass_stays_yours(backbones, probes, cu_data):
    from probe_ase import ProbeCalculator

    calc = backbones("mace")
    tap = find_tap(calc)
    with ProbeCalculator(calc, probes("mace"), tap=tap) as probe_calc:
        atoms = cu_data["test_in"][0].copy()
        atoms.calc = probe_calc
        atoms.get_potential_energy()
        assert 0 <= probe_calc.results["reliability"] <= 1
    tap.features()  # still open after the calculator closed
    tap.close()
    from ase.calculators.emt import EMT

    with find_tap(calc) as tap, pytest.raises(InputError, match="not \\(inside\\) this EMT"):
        ProbeCalculator(EMT(), probes("mace"), tap=tap)


def test_multi_head_foundation_mace_taps_the_selected_head(cu_data):
    """A foundation-shaped multi-head ScaleShiftMACE: every head passes check_tap on its own readout."""
    from mace.calculators import MACECalculator

    from probe_ase.testing.mace import foundation_shaped_mace

    model = foundation_shaped_mace(heads=("pt_head", "Default"))
    crystal = cu_data["test_out"][1]
    energies, features, prints = {}, {}, {}
    for head in ("pt_head", "Default"):
        calc = MACECalculator(models=model, device="cpu", default_dtype="float32", head=head)
        assert "equal the reference" in check_tap(calc, crystal)["layers"]  # batched passes use this head too
        with find_tap(calc) as tap:
            calc.reset()
            atoms = crystal.copy()
            atoms.calc = calc
            energies[head] = atoms.get_potential_energy()
            features[head] = tap.features().clone()
            prints[head] = tap.fingerprint()
    assert energies["pt_head"] != pytest.approx(energies["Default"])  # two readouts ...
    torch.testing.assert_close(features["pt_head"], features["Default"], rtol=0, atol=0)  # ... of one shared body
    assert prints["pt_head"] != prints["Default"]  # a PROBE head judges one readout's errors: refused for the other
