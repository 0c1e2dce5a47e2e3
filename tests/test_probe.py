"""The fitted head as one object (:mod:`probe_ase.model.probe`): its compiled per-step forward is checked against
the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_a_miscompiled_head_falls_back_to_the_eager_one(backbones, probes, cu_data, monkeypatch):
    """The scripted head is checked against the eager one before use; a wrong one is refused, with a warning."""
    import copy

    from probe_ase.fitting.data import featurize
    from probe_ase.model.graph import HeadGraph

    frames = cu_data["test_out"][:3]
    with probes("mace").tap_for(backbones("mace")) as tap:
        fs = featurize(tap, frames, cache_dir=False, progress=False)
    edges = HeadGraph(probes("mace").meta.config.cutoff).frames(frames)
    right, wrong = copy.deepcopy(probes("mace")), copy.deepcopy(probes("mace"))
    right._frozen = wrong._frozen = None
    expected = right.predict(fs.features, fs.numbers, fs.ptr, edges)  # scripted, and checked
    assert isinstance(right._compiled(), torch.jit.ScriptModule)

    class Wrong(torch.nn.Module):  # what a miscompiled head might give: the right shapes, wrong numbers
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, *inputs):
            logits, *rest = self.head(*inputs)
            return (logits + 1.0, *rest)

    monkeypatch.setattr(torch.jit, "freeze", lambda module: Wrong(wrong.head))
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = wrong.predict(fs.features, fs.numbers, fs.ptr, edges)
    assert wrong._compiled() is wrong.head
    np.testing.assert_allclose(got.reliability, expected.reliability, rtol=1e-5)
