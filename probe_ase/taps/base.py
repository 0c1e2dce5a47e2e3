"""The adapter contract: the small interface every backbone tap implements.

A tap attaches torch forward hooks to the per-atom feature modules of a
backbone held by an ASE calculator. Whenever the backbone runs its own
energy/force pass, the hooks keep the invariant (scalar) part of each tapped
layer's output, detached and in the backbone's dtype. No second forward pass is
ever made to get features.

An adapter (a :class:`Tap` subclass) says:

* what it is: ``kind`` (its name in :data:`probe_ase.taps.ADAPTERS`, the CLI's
  ``--backbone-type`` and head files), ``library`` and the pip ``extra`` that
  installs it (:meth:`Tap.require` names it when the library is missing);
* which calculators and model files are its: :meth:`Tap.accepts`,
  :meth:`Tap.owns`, :meth:`Tap.load` (a file, or a name in ``pretrained``);
* where its features are: :meth:`Tap.feature_modules`, :meth:`Tap.layer_width`,
  :meth:`Tap.invariant` (the rotation-invariant part of a hooked output), and
  which invariant channel sets it offers (``channel_sets``, ``default_channels``:
  ``"scalars"``, and for equivariant backbones also ``"scalars+norms"``, the
  scalars beside the norm of each non-scalar channel);
* how to read the backbone's own neighbour list from its input:
  :meth:`Tap.read_inputs`, ``_pairs`` and ``_vectors``;
* a batched backbone pass, ``_predict_batch``, behind :meth:`Tap.predict` (energies in eV, forces in eV/Å and
  features of many structures together: training data, scored trajectories);
* optionally, :meth:`Tap.reference_features`: the tapped layers computed without
  hooks, against which :func:`probe_ase.testing.check_tap` checks the hooks.

One set of hooks per backbone module and :meth:`Tap.hook_key` (the adapter;
for a ModuleTap also its modules and invariant): every such tap on the same
module (two ``ProbeCalculator`` wrappers, a guard and a monitor, NEB images
sharing one model) shares it, refcounted, and what a pass captured is kept *per thread*,
so a tap only ever reads the features of a pass made by its own thread. The
shared :attr:`Tap.lock` serialises the backbone calculator's pass with reading
its results and features (ASE calculators keep their results in one place);
``ProbeCalculator`` holds it for each step.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from probe_ase.exceptions import BackboneError, InputError


def quiet_import(module: str):
    """Import ``module`` with the notices backbone libraries give at import silenced, during that import only.

    e3nn's ``torch.load`` warnings (a FutureWarning, or a UserWarning about the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    mace-torch sets) and mace-torch's "cuequivariance ... is not available" print: noise to a probe-ase user.
    Warnings and prints of anything after the import are untouched.
    """
    import contextlib
    import importlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=FutureWarning)
        for text in (".*weights_only.*", ".*WEIGHTS_ONLY.*", ".*cuequivariance.*", ".*openequivariance.*"):
            warnings.filterwarnings("ignore", message=text)
        return importlib.import_module(module)

@dataclass(frozen=True)
class Prediction:
    """Backbone output for one structure (energy in eV, forces in eV/Å)."""

    energy: float
    forces: np.ndarray
    features: torch.Tensor


class _Capture(threading.local):
    """What the hooks kept from the last backbone pass made by the current thread."""

    def __init__(self) -> None:
        self.layers: dict[int, torch.Tensor] = {}  # invariant features per layer
        self.inputs: dict | None = None  # the backbone's input dict (its neighbour list)
        self.scratch: dict[int, torch.Tensor] = {}  # adapter state between a layer's pre-hook and hook
        self.count = 0  # passes seen


class _Hooks:
    """The one set of hooks on a backbone module, shared (refcounted) by every tap on it."""

    def __init__(self, tap: Tap) -> None:
        self.capture = _Capture()
        self.lock = threading.RLock()
        self.users = 0
        modules = tap.feature_modules()
        self.handles = [m.register_forward_hook(_feature_hook(self, weakref.ref(m), i, tap.invariant))
                        for i, m in enumerate(modules)]
        self.handles += tap._extra_hooks(self)
        self.handles.append(tap.module.register_forward_pre_hook(
            _input_hook(self, weakref.ref(tap.module), type(tap).read_inputs), with_kwargs=True))


# hooks are closures, not bound methods: deepcopy treats functions as atomic, so a tapped
# backbone can still be deep-copied; a copy's passes are ignored (the module check)
def _feature_hook(hooks: _Hooks, owner: weakref.ref, layer: int, invariant):
    def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
        if module is owner():
            if layer == 0:
                hooks.capture.count += 1
            # a copy: a slice view would keep the whole output (l > 0 channels included) alive
            hooks.capture.layers[layer] = invariant(layer, output).detach().clone()

    return hook


def _input_hook(hooks: _Hooks, owner: weakref.ref, read_inputs):
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module is owner():
            hooks.capture.inputs = read_inputs(args, kwargs)

    return pre_hook


#: the hooks of every tapped backbone module, by the taps' hook key (weak: a dropped backbone drops its entry)
_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, _Hooks]] = weakref.WeakKeyDictionary()
_HOOKS_LOCK = threading.Lock()


class Tap(ABC):
    """Hooks on one backbone's feature modules.

    Subclasses implement the adapter contract (module docstring): name the
    backbone, say which calculators and files are theirs, list the modules to
    hook and how to take the invariant part of each output.
    """

    #: the adapter's name (registry key, CLI ``--backbone-type``, head files)
    kind: ClassVar[str]
    #: the Python package that defines the backbone
    library: ClassVar[str]
    #: the pip extra of probe-ase that installs it (None: a core dependency)
    extra: ClassVar[str | None] = None
    #: names :meth:`load` takes instead of a file (pretrained weights shipped with the library)
    pretrained: ClassVar[tuple[str, ...]] = ()
    #: older ``kind`` names head files may carry for this adapter
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the backbone needs a cell: molecules are boxed (with pbc) to run it
    periodic_only: ClassVar[bool] = False
    #: the invariant channel sets :meth:`invariant` can read from each layer (head files record the one used)
    channel_sets: ClassVar[tuple[str, ...]] = ("scalars",)
    #: the set a tap reads when none is named
    default_channels: ClassVar[str] = "scalars"

    def __init__(self, calc: Calculator, layers: Sequence[int] | None = None, channels: str | None = None) -> None:
        self.calc = calc
        #: which invariant channels of each layer the features hold (one of ``channel_sets``)
        self.channels = self.default_channels if channels is None else channels
        if self.channels not in self.channel_sets:
            raise InputError(f"channels {self.channels!r} invalid for a {self.kind} backbone; it offers "
                             f"{', '.join(map(repr, self.channel_sets))}",
                             channels=self.channels, channel_sets=list(self.channel_sets), kind=self.kind)
        modules = self.feature_modules()
        n = len(modules)
        chosen = tuple(range(n)) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in chosen if not -n <= i < n]
        if not chosen or bad:
            raise InputError(f"layers {list(chosen)} invalid for a {self.kind} backbone with {n} tappable layers (0..{n - 1})",
                             layers=list(chosen), n_layers=n, kind=self.kind)
        self.layers = tuple(sorted({i % n for i in chosen}))
        self.feature_dim = sum(self.layer_width(i) for i in self.layers)
        with _HOOKS_LOCK:
            on_module = _HOOKS.setdefault(self.module, {})
            hooks = on_module.get(self.hook_key())
            if hooks is None:
                hooks = on_module[self.hook_key()] = _Hooks(self)
            hooks.users += 1
        self._hooks: _Hooks | None = hooks
        self._loops: torch.Tensor | None = None  # self loops (2, n_atoms) of the last graph

    # ---- what a backbone adapter provides ---------------------------------
    @classmethod
    @abstractmethod
    def accepts(cls, calc: Calculator) -> bool:
        """Whether ``calc`` is a calculator of this backbone (False when its library cannot be imported)."""

    @classmethod
    def available(cls) -> bool:
        """Whether the backbone's library imports here."""
        try:
            quiet_import(cls.library)
        except Exception:  # absent, or broken against this torch
            return False
        return True

    @classmethod
    def require(cls) -> None:
        """Raise a :class:`BackboneError` naming the pip extra to install when the backbone library does not import."""
        if not cls.available():
            fix = f'pip install "probe-ase[{cls.extra}]"' if cls.extra else f"pip install {cls.library}"
            raise BackboneError(f"the {cls.kind} backbone needs the {cls.library} package, which does not import here: "
                                f"{fix}", kind=cls.kind, library=cls.library, extra=cls.extra)

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` (what ``torch.load`` returned for a model file) is this adapter's."""
        return False

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", model: object = None) -> Calculator:
        """A calculator for the model file ``path`` or the pretrained name ``path`` (eV, eV/Å).

        ``model`` is the file's content when the caller already loaded it.
        """
        raise BackboneError(f"the {cls.kind} adapter cannot load model files; build the calculator yourself",
                            kind=cls.kind, path=os.fspath(path))

    def reference_features(self, atoms: Atoms) -> dict[int, np.ndarray]:
        """Each tapped layer's invariant features ``(n_atoms, width)`` of ``atoms``, computed without hooks.

        What :func:`probe_ase.testing.check_tap` compares the hooks against;
        adapters compute it through the library's own API where it has one.
        """
        raise NotImplementedError(f"the {self.kind} adapter has no hook-free reference computation")

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The backbone ``torch.nn.Module`` whose parameters define it."""

    @abstractmethod
    def feature_modules(self) -> list[torch.nn.Module]:
        """Modules, one per interaction layer, whose outputs carry atom features."""

    @abstractmethod
    def layer_width(self, layer: int) -> int:
        """Number of invariant channels a layer contributes."""

    @abstractmethod
    def invariant(self, layer: int, output: object) -> torch.Tensor:
        """The invariant per-atom part ``(n_atoms, width)`` of a hooked output."""

    @property
    @abstractmethod
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers the backbone knows."""

    @property
    @abstractmethod
    def cutoff(self) -> float:
        """The backbone's interaction radius (Å)."""

    @property
    def list_cutoff(self) -> float:
        """Radius (Å) of the neighbour list the calculator hands the backbone (at least :attr:`cutoff`)."""
        return self.cutoff

    #: keys of the backbone's input dict that :meth:`_pairs` reads (default :meth:`read_inputs`)
    pair_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def read_inputs(cls, args: tuple, kwargs: dict) -> dict | None:
        """What :meth:`_pairs` and :meth:`_vectors` need from the backbone's forward arguments.

        Default: the ``pair_keys`` of an input dict (references, no copies).
        None when the list cannot be read: the head then builds its own graph.
        """
        inputs = args[0] if args else next(iter(kwargs.values()), None)
        if not cls.pair_keys or not isinstance(inputs, Mapping) or any(k not in inputs for k in cls.pair_keys):
            return None
        return {k: inputs[k].detach() for k in cls.pair_keys}

    @abstractmethod
    def _pairs(self, inputs: dict) -> torch.Tensor:
        """Neighbour pairs ``(2, n_pairs)`` (destination, source) of a backbone input dict."""

    @abstractmethod
    def _vectors(self, inputs: dict) -> torch.Tensor:
        """Pair vectors ``(n_pairs, 3)`` in Å, source minus destination, periodic images included."""

    @abstractmethod
    def _predict_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One backbone pass over ``frames``: energies (eV) and forces (eV/Å)."""

    def hook_key(self) -> Hashable:
        """Taps with equal keys on one module hook the same outputs the same way, so they share one set of hooks."""
        return type(self), self.channels

    def _extra_hooks(self, hooks: _Hooks) -> list[torch.utils.hooks.RemovableHandle]:
        """Further hooks an adapter needs (e.g. pre-hooks), writing into ``hooks.capture.scratch``."""
        return []

    # ---- shared machinery --------------------------------------------------
    def _live(self) -> _Hooks:
        if self._hooks is None:
            raise BackboneError(f"this {self.kind} tap is closed: its hooks were removed", kind=self.kind)
        return self._hooks

    @property
    def _capture(self) -> _Capture:
        return self._live().capture

    @property
    def lock(self) -> threading.RLock:
        """Lock shared by every tap on this backbone: hold it around a pass and the reading of its results."""
        return self._live().lock

    @property
    def n_forward(self) -> int:
        """Backbone passes this thread has made since the backbone was first tapped (0 once closed)."""
        return 0 if self._hooks is None else self._hooks.capture.count

    def neighbour_graph(self, cutoff: float) -> torch.Tensor | None:
        """The head's graph ``(2, n_atoms + n_pairs)`` from the backbone's own neighbour list of the last pass.

        Self loops first, then every pair closer than ``cutoff`` (Å), so it
        equals :func:`probe_ase.model.graph.radius_graph` as a set of edges. None when
        ``cutoff`` exceeds the list's (it would miss pairs) or no pass has been
        seen: the caller then builds the graph itself.
        """
        seen = self._capture.inputs
        if seen is None or cutoff > self.list_cutoff + 1e-9:
            return None
        pairs = self._pairs(seen)
        if cutoff < self.list_cutoff - 1e-9:  # a shorter radius than the list's: drop the far pairs
            pairs = pairs[:, (self._vectors(seen) ** 2).sum(1) < cutoff**2]
        n = next(iter(self._capture.layers.values())).shape[0]
        if self._loops is None or self._loops.shape[1] != n or self._loops.device != pairs.device:
            self._loops = torch.arange(n, device=pairs.device).expand(2, n)
        return torch.cat([self._loops, pairs], dim=1)

    def _transform(self, layer_outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Hook for adapters whose layer features are sums of hooked outputs."""
        return layer_outputs

    def features(self) -> torch.Tensor:
        """Features of every atom in this thread's last forward pass, ``(n_atoms, feature_dim)``."""
        captured = self._capture.layers
        if any(i not in captured for i in self.layers):
            raise BackboneError(f"no {self.kind} forward pass has been captured in this thread yet", kind=self.kind,
                                missing=[i for i in self.layers if i not in captured])
        layers = self._transform(captured)
        return torch.cat([layers[i] for i in self.layers], dim=-1)

    def predict(self, frames: Sequence[Atoms], batch_size: int = 32) -> Iterator[Prediction]:
        """Run the backbone over ``frames`` in batches; yield one :class:`Prediction` each."""
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            energies, forces = self._predict_batch(chunk)
            feats = self.features()  # this thread's pass: no lock needed, the calculator is not used
            offsets = np.cumsum([0] + [len(a) for a in chunk])
            for k, _atoms in enumerate(chunk):
                yield Prediction(float(energies[k]), forces[k], feats[offsets[k] : offsets[k + 1]])

    def fingerprint(self) -> str:
        """SHA-256 of the backbone's parameters and buffers (dtype-independent)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            t = tensor.detach().cpu()
            if t.is_floating_point():
                t = t.to(torch.float32)
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save_backbone(self, path: str | os.PathLike) -> None:
        """``torch.save`` a hook-free copy of the backbone module (hooks are not picklable)."""
        clone = copy.deepcopy(self.module)
        for module in clone.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        torch.save(clone, path)

    def close(self) -> None:
        """Release the hooks (removed with the last tap on the backbone, which is then left as it was)."""
        hooks, self._hooks = self._hooks, None
        if hooks is None:
            return
        with _HOOKS_LOCK:
            hooks.users -= 1
            if hooks.users == 0:
                for handle in hooks.handles:
                    handle.remove()
                hooks.handles.clear()
                on_module = _HOOKS.get(self.module, {})
                if on_module.get(self.hook_key()) is hooks:
                    del on_module[self.hook_key()]

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
