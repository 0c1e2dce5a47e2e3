"""The head file: weights, novelty model, calibration and backbone identity in one file.

The file is a ``torch.save`` archive holding only tensors and a JSON string,
read back with ``torch.load(weights_only=True)`` so opening it never runs
code. A SHA-256 over the metadata and every tensor is stored alongside and
checked on load, so a truncated or edited file is refused. Files are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import torch

from .exceptions import HeadFileError, MismatchError
from .fileio import atomic_write
from .head import HeadConfig, ProbeHead, batch_inputs
from .novelty import NoveltyConfig, NoveltyModel

FORMAT = "probe-ase-head"
#: bumped on every schema change; 2 added the novelty model and the certified threshold, 3 the per-atom logit
VERSION = 3
#: what each version added, for the message when a file of another version is opened
CHANGES = {2: "the novelty model and the certified threshold", 3: "per-atom reliability"}

#: why a structure is not reliable (``results["reason"]``); "ok" when it is. The monitor adds
#: "low_atom_reliability" when it judges atoms (:class:`~probe_ase.observers.ReliabilityMonitor`)
REASONS = ("ok", "low_probability", "out_of_support")


@dataclass(frozen=True)
class HeadMeta:
    """Everything needed to use a head correctly besides its weights.

    Attributes:
        backbone: backbone kind (``"mace"``, ``"schnetpack"``).
        fingerprint: SHA-256 of the backbone's parameters.
        layers: tapped interaction layers.
        feature_dim: width of the features the head reads.
        elements: atomic numbers in the fit data: the only ones the head scores.
        criterion: error criterion (see :mod:`probe_ase.labels`).
        tau: tolerance in the criterion's units (eV/Å, eV/atom or eV).
        quantile: the quantile ``tau`` came from, if any.
        temperature: calibration temperature applied to the logit.
        p_star: operating threshold on the calibrated probability.
        target_risk: risk (fraction of accepted structures that are unreliable) p* aims for.
        coverage: fraction of calibration structures accepted by the verdict at p*.
        config: head sizes.
        report: fitting summary (metrics on the calibration split, the certificate).
        backbone_path: the backbone file the head was fitted with, when known.
        delta: the certificate may fail with at most this probability (0-1).
        certified_risk: the risk p* is certified at with probability >= 1 - delta
            (``target_risk`` when the data certify it; larger when they cannot;
            1.0 when nothing is certified and p* accepts nothing).
        novelty: how the novelty model was fitted.
        atom_tau: per-atom tolerance on ``|ΔF_i|`` (eV/Å) when the head has a
            per-atom logit, else None.
        atom_quantile: the quantile ``atom_tau`` came from, if any.
        atom_p_star: operating threshold on ``atom_reliability`` (empirical
            risk <= ``target_risk`` over the calibration atoms inside the
            support; not certified: atoms of one structure are not independent).
    """

    backbone: str
    fingerprint: str
    layers: tuple[int, ...]
    feature_dim: int
    elements: tuple[int, ...]
    criterion: str
    tau: float
    quantile: float | None
    temperature: float
    p_star: float
    target_risk: float
    coverage: float
    config: HeadConfig = HeadConfig()
    report: dict = field(default_factory=dict)
    backbone_path: str | None = None
    delta: float = 0.1
    certified_risk: float = 1.0
    novelty: NoveltyConfig = NoveltyConfig()
    atom_tau: float | None = None
    atom_quantile: float | None = None
    atom_p_star: float | None = None

    @property
    def local(self) -> bool:
        """Whether the head gives per-atom reliability."""
        return self.atom_tau is not None

    @property
    def certified(self) -> bool:
        """Whether ``p_star`` is certified at the ``target_risk`` asked for."""
        return self.certified_risk <= self.target_risk

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeadMeta:
        d = json.loads(text)
        d["config"] = HeadConfig(**{**d["config"], "aux_quantiles": tuple(d["config"]["aux_quantiles"])})
        d["novelty"] = NoveltyConfig(**d["novelty"])
        d["layers"], d["elements"] = tuple(d["layers"]), tuple(d["elements"])
        return cls(**d)


def _checksum(meta_json: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_head(head: ProbeHead, novelty: NoveltyModel, meta: HeadMeta, path: str | os.PathLike) -> None:
    """Write ``head``, ``novelty`` and ``meta`` to ``path`` atomically."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    state |= {f"novelty.{k}": v.detach().cpu().clone() for k, v in novelty.state_dict().items()}
    meta_json = meta.to_json()
    payload = {"format": FORMAT, "version": VERSION, "meta": meta_json, "state": state,
               "sha256": _checksum(meta_json, state)}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_head(path: str | os.PathLike) -> tuple[ProbeHead, HeadMeta, NoveltyModel]:
    """Read a head file without executing code; refuse truncated or edited files."""
    if not os.path.exists(path):
        raise HeadFileError(f"no head file at {path}", path=str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HeadFileError(f"{path} is not a readable probe-ase head file ({type(err).__name__}: {err})",
                            path=str(path)) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HeadFileError(f"{path} is not a probe-ase head file", path=str(path))
    if payload.get("version") != VERSION:
        found = payload.get("version")
        newer = isinstance(found, int) and found > VERSION
        added = "; ".join(f"version {v} added {what}" for v, what in CHANGES.items()
                          if not isinstance(found, int) or v > found)
        raise HeadFileError(f"{path} has head-file version {found}; this probe-ase reads version {VERSION} "
                            + ("(upgrade probe-ase to read it)" if newer else f"({added}): refit the head"),
                            path=str(path), found_version=found, version=VERSION)
    meta_json, state = payload["meta"], payload["state"]
    if _checksum(meta_json, state) != payload.get("sha256"):
        raise HeadFileError(f"{path} failed its checksum: the file was modified or damaged", path=str(path))
    try:  # a file of this version whose schema still differs (fields added without a version bump)
        meta = HeadMeta.from_json(meta_json)
        head = ProbeHead(meta.feature_dim, meta.elements, meta.config)
        head.load_state_dict({k: v for k, v in state.items() if not k.startswith("novelty.")})
        novelty = NoveltyModel(meta.feature_dim, meta.elements, meta.novelty.components)
        novelty.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("novelty.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise HeadFileError(f"{path} says head-file version {VERSION} but its contents do not match that schema "
                            f"({type(err).__name__}: {err}); refit the head", path=str(path)) from err
    head.eval()
    return head, meta, novelty


@dataclass(frozen=True)
class Scores:
    """What the head says about a batch of structures.

    Attributes:
        reliability: calibrated probability per structure (0-1).
        importance: attention importance per atom (sums to 1 per structure).
        atom_novelty: per atom, on the scale of :mod:`probe_ase.novelty` (<= 1 inside the support).
        novelty: per structure, the largest atom novelty.
        atom_reliability: per atom, calibrated P(|ΔF_i| <= atom tolerance)
            (0-1); empty when the head has no per-atom logit.
    """

    reliability: np.ndarray
    importance: np.ndarray
    atom_novelty: np.ndarray
    novelty: np.ndarray
    atom_reliability: np.ndarray


@dataclass
class Probe:
    """A fitted PROBE head with its metadata: what :func:`~probe_ase.fit_probe` returns.

    ``probe.report`` summarises the fit; ``probe.save(path)`` writes the head
    file and ``Probe.load(path)`` reads it back.
    """

    head: ProbeHead
    meta: HeadMeta
    novelty: NoveltyModel
    _frozen: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # one prediction at a time: the frozen TorchScript head crashed when two threads ran it at once
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:  # copies and pickles get their own lock and compiled head
        return {"head": self.head, "meta": self.meta, "novelty": self.novelty}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def report(self) -> dict:
        return self.meta.report

    @property
    def p_star(self) -> float:
        return self.meta.p_star

    def save(self, path: str | os.PathLike) -> None:
        """Write the head file to ``path`` atomically."""
        save_head(self.head, self.novelty, self.meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Probe:
        """Read a head file (never executes code)."""
        return cls(*load_head(path))

    def check_backbone(self, kind: str, fingerprint: str, feature_dim: int, layers: Sequence[int]) -> None:
        """Raise :class:`MismatchError` unless the head was fitted on this backbone and layers."""
        m = self.meta
        if kind != m.backbone:
            raise MismatchError(f"head was fitted on a {m.backbone} backbone, not {kind}", expected=m.backbone, found=kind)
        if tuple(layers) != m.layers or feature_dim != m.feature_dim:
            raise MismatchError(
                f"head reads {m.feature_dim} features from layers {list(m.layers)}; "
                f"the tap gives {feature_dim} from layers {list(layers)}",
                expected=(m.layers, m.feature_dim), found=(tuple(layers), feature_dim),
            )
        if fingerprint != m.fingerprint:
            raise MismatchError(
                f"head was fitted on backbone {m.fingerprint[:12]}..., but this backbone is {fingerprint[:12]}... "
                "(a different or retrained model); refit the head for it",
                expected=m.fingerprint, found=fingerprint,
            )

    def to(self, device: torch.device | str) -> Probe:
        """Move head and novelty model to ``device``; returns self."""
        self.head.to(device)
        self.novelty.to(device)
        return self

    def predict(
        self, features: torch.Tensor, numbers: torch.Tensor, ptr: np.ndarray, edges: Sequence[np.ndarray]
    ) -> Scores:
        """Reliability and novelty per structure; importance, novelty and reliability per atom (atoms concatenated)."""
        inputs = batch_inputs(features, numbers, ptr, edges, range(len(ptr) - 1))
        with self._lock, torch.inference_mode():
            logits, importance, atom_logits = self._compiled()(*inputs)
            p = torch.sigmoid(logits / self.head.temperature)
            atom_p = torch.sigmoid(atom_logits / self.head.atom_temperature)
            atom_novelty = self.novelty(inputs[0], inputs[1])
            if inputs[4] == 1:
                novelty = atom_novelty.max().reshape(1)
            else:
                novelty = atom_novelty.new_full((inputs[4],), -np.inf).scatter_reduce(
                    0, inputs[3], atom_novelty, reduce="amax")
        return Scores(*(t.cpu().numpy().astype(float) for t in (p, importance, atom_novelty, novelty, atom_p)))

    def verdict(
        self, reliability: np.ndarray, novelty: np.ndarray, threshold: float | None = None, max_novelty: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(reliable, reason)`` per structure: reliable iff reliability >= threshold and novelty <= max_novelty.

        ``threshold`` defaults to the certified p*; ``max_novelty`` to the
        support edge. The reason of an unreliable structure is
        ``out_of_support`` when it lies outside the support (there the
        probability itself is not trusted), else ``low_probability``; "ok" for
        reliable ones.
        """
        threshold = self.meta.p_star if threshold is None else threshold
        inside = np.asarray(novelty) <= max_novelty
        confident = np.asarray(reliability) >= threshold
        reason = np.where(~inside, REASONS[2], np.where(confident, REASONS[0], REASONS[1]))
        return inside & confident, reason

    def atom_verdict(self, atom_reliability: np.ndarray, atom_novelty: np.ndarray, threshold: float | None = None,
                     max_novelty: float = 1.0) -> np.ndarray:
        """Per atom: reliable iff ``atom_reliability >= threshold`` and ``atom_novelty <= max_novelty``.

        ``threshold`` defaults to the head's ``atom_p_star``; a head without a
        per-atom logit raises :class:`MismatchError`.
        """
        if not self.meta.local:
            raise MismatchError("this head has no per-atom logit: refit it with atom_threshold= or atom_quantile=")
        threshold = self.meta.atom_p_star if threshold is None else threshold
        return (np.asarray(atom_reliability) >= threshold) & (np.asarray(atom_novelty) <= max_novelty)

    def _compiled(self) -> torch.nn.Module:
        """The head scripted and frozen for inference (fewer small-op dispatches per step).

        Built on first use on the head's current device; falls back to the
        eager head where TorchScript cannot compile it.
        """
        device = self.head.feature_mean.device
        if self._frozen is None or self._frozen[0] != device:
            try:
                frozen = torch.jit.freeze(torch.jit.script(copy.deepcopy(self.head).eval()))
            except Exception as err:  # noqa: BLE001 - an optimisation only; the eager head is exact
                warnings.warn(f"TorchScript could not compile the head ({err}); running it eagerly", stacklevel=3)
                frozen = self.head
            self._frozen = (device, frozen)
        return self._frozen[1]
