"""The head file: weights, novelty model, calibration and backbone identity in one file.

This module only reads and writes head files; :class:`~probe_ase.model.probe.Probe`
is the object that uses them.

The file is a ``torch.save`` archive holding only tensors and a JSON string,
read back with ``torch.load(weights_only=True)`` so opening it never runs
code. A SHA-256 over the metadata and every tensor is stored alongside and
checked on load, so a truncated or edited file is refused. Files are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from probe_ase.exceptions import HeadFileError
from probe_ase.fileio import atomic_write
from probe_ase.fitting.spec import FitOptions, FitSpec
from probe_ase.model.calibration import Calibration
from probe_ase.model.head import HeadConfig, ProbeHead
from probe_ase.model.novelty import NoveltyConfig, NoveltyModel

FORMAT = "probe-ase-head"
#: bumped on every schema change (:data:`CHANGES`)
VERSION = 12
#: versions this probe-ase reads: a version-6 file is a version-7 one with a single head (HeadConfig.members = 1),
#: a version-7 file a version-8 one that read the scalar channels (HeadMeta.channels = "scalars"), a version-8 file
#: a version-9 one whose calibration and fit settings are read back from its fields (:func:`_upgrade`), a version-9
#: file a version-10 one less the fields its spec repeats, a version-10 file a version-11 one whose labels were not
#: recorded (reference data: HeadMeta.labels empty), a version-11 file a version-12 one fitted with one worker
READABLE = (6, 7, 8, 9, 10, 11, 12)
#: what each version added, for the message when a file of another version is opened
CHANGES = {2: "the novelty model and the certified threshold", 3: "per-atom reliability",
           4: "novelty in the probability (the logit's novelty weight)",
           5: "the logit's novelty penalty read from the mean atom novelty (NoveltyConfig.penalty)",
           6: "the per-atom force-error regression blended into the logit (HeadConfig.atom_error)",
           7: "averaged heads (HeadConfig.members)",
           8: "the tapped channel set (HeadMeta.channels: PaiNN's vector norms)",
           9: "the fit's settings (HeadMeta.spec) and the score formula in one place (HeadMeta.calibration)",
           10: "each fit setting stored once, in HeadMeta.spec",
           11: "where the fit's error labels came from (HeadMeta.labels: reference data or a companion model)",
           12: "the fit's worker processes in its settings (FitOptions.workers)"}
#: version-9 fields that repeat the spec's (version 10 reads them from HeadMeta.spec)
SPEC_FIELDS = ("criterion", "quantile", "target_risk", "delta", "atom_quantile")


@dataclass(frozen=True)
class HeadMeta:
    """Everything needed to use a head correctly besides its weights.

    Attributes:
        backbone: backbone kind (``"mace"``, ``"schnetpack"``).
        fingerprint: SHA-256 of the backbone's parameters.
        layers: tapped interaction layers.
        feature_dim: width of the features the head reads.
        channels: which invariant channels of each layer the tap read
            (``"scalars"``, or ``"scalars+norms"``: the scalars and the norm of
            each vector channel; see the adapter's ``channel_sets``).
        elements: atomic numbers in the fit data: the only ones the head scores.
        tau: tolerance in the criterion's units (eV/Å, eV/atom or eV): the
            spec's tolerance, or its quantile of the fit data's errors.
        p_star: operating threshold on the calibrated probability.
        coverage: fraction of calibration structures accepted by the verdict at p*.
        spec: the settings the head was fitted with (``fit_probe(calc, data, **meta.spec)`` refits it);
            ``criterion``, ``quantile``, ``target_risk``, ``delta`` and ``atom_quantile`` read from it.
        config: head sizes.
        report: fitting summary (metrics on the calibration split, the certificate).
        backbone_path: the backbone file the head was fitted with, when known.
        certified_risk: the risk p* is certified at with probability >= 1 - delta
            (``target_risk`` when the data certify it; larger when they cannot;
            1.0 when nothing is certified and p* accepts nothing).
        novelty: how the novelty model was fitted.
        atom_tau: per-atom tolerance on ``|ΔF_i|`` (eV/Å) when the head has a
            per-atom logit, else None.
        atom_p_star: operating threshold on ``atom_reliability`` (empirical
            risk <= ``target_risk`` over the calibration atoms inside the
            support; not certified: atoms of one structure are not independent).
        calibration: the score formula's fitted numbers (temperatures, novelty weight).
        labels: how many fit structures took their error labels from each source: ``"reference"`` (the data's
            own, e.g. DFT) or ``"companion NAME"`` (:func:`~probe_ase.companion.companion_labels`); empty in files
            written before version 11 (reference data).
    """

    backbone: str
    fingerprint: str
    layers: tuple[int, ...]
    feature_dim: int
    elements: tuple[int, ...]
    tau: float
    p_star: float
    coverage: float
    spec: FitSpec
    config: HeadConfig = HeadConfig()
    report: dict = field(default_factory=dict)
    backbone_path: str | None = None
    certified_risk: float = 1.0
    novelty: NoveltyConfig = NoveltyConfig()
    atom_tau: float | None = None
    atom_p_star: float | None = None
    channels: str = "scalars"
    calibration: Calibration = Calibration()
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def label_source(self) -> str:
        """``"reference"``, ``"companion"`` (every label from companion models: the head predicts agreement of two
        models, not accuracy against reference data) or ``"blend"``."""
        companions = sum(n for source, n in self.labels.items() if source != "reference")
        if not companions:
            return "reference"
        return "companion" if companions == sum(self.labels.values()) else "blend"

    @property
    def criterion(self) -> str:
        """The error criterion (:mod:`probe_ase.fitting.labels`)."""
        return self.spec.criterion

    @property
    def quantile(self) -> float | None:
        """The quantile (0-1) of the fit data's errors ``tau`` came from, if any."""
        return self.spec.quantile

    @property
    def target_risk(self) -> float:
        """The risk (fraction of accepted structures that are unreliable) p* aims for."""
        return self.spec.target_risk

    @property
    def delta(self) -> float:
        """The certificate may fail with at most this probability (0-1)."""
        return self.spec.delta

    @property
    def atom_quantile(self) -> float | None:
        """The quantile (0-1) of all atoms' force errors ``atom_tau`` came from, if any."""
        return self.spec.atom_quantile

    @property
    def local(self) -> bool:
        """Whether the head gives per-atom reliability."""
        return self.atom_tau is not None

    @property
    def certified(self) -> bool:
        """Whether ``p_star`` is certified at the ``target_risk`` asked for."""
        return self.certified_risk <= self.target_risk

    def to_json(self) -> str:
        """The metadata as a JSON string (keys sorted), as stored in the head file."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d |= {"config": dataclasses.asdict(self.config), "novelty": dataclasses.asdict(self.novelty),
              "calibration": dataclasses.asdict(self.calibration), "spec": self.spec.to_dict()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeadMeta:
        """Metadata from :meth:`to_json`'s string, nested configs and tuples restored."""
        d = json.loads(text)
        d["config"] = HeadConfig(**{**d["config"], "aux_quantiles": tuple(d["config"]["aux_quantiles"])})
        d["novelty"] = NoveltyConfig(**d["novelty"])
        d["layers"], d["elements"] = tuple(d["layers"]), tuple(d["elements"])
        d["calibration"] = Calibration(**d["calibration"])
        d["spec"] = FitSpec.from_dict(d["spec"])
        return cls(**d)


#: head options a study tried and version 9 removed (design decisions): a head fitted with one of them on must be refit
REMOVED_OPTIONS = ("max_pool", "per_element_scaling", "shared_score")


def _upgrade(meta: dict, state: dict[str, torch.Tensor], path: str | os.PathLike) -> dict:
    """A version 6-8 file's metadata and state as version 9 has them (``state`` is changed in place): the calibration
    out of the head's temperature buffers and the metadata's ``temperature`` / ``novelty_weight``, the fit's settings
    out of its fields and report, every member's weights stacked along a leading axis."""
    removed = [name for name in REMOVED_OPTIONS if meta["config"].pop(name, False)]
    if removed or meta["novelty"].get("penalty", "mean") != "mean":
        raise HeadFileError(f"{path} was fitted with {', '.join(removed) or 'the max novelty penalty'}, which this "
                            "probe-ase no longer has (design decisions): refit the head", path=str(path),
                            removed=removed)
    atom_temperature = float(state["atom_temperature"])
    members = meta["config"].get("members", 1)
    stacked = _stack_members({k: v for k, v in state.items()
                              if k.rsplit(".", 1)[-1] not in ("temperature", "atom_temperature")}, members)
    state.clear()
    state.update(stacked)
    meta["calibration"] = {"temperature": meta.pop("temperature"), "novelty_weight": meta.pop("novelty_weight", 0.0),
                           "atom_temperature": atom_temperature}
    meta["novelty"].pop("penalty", None)
    report, config, novelty = meta.get("report", {}), meta["config"], meta["novelty"]
    train, options = report.pop("train", {}), FitOptions()
    meta["spec"] = FitSpec(
        criterion=meta["criterion"], tolerance=None if meta["quantile"] is not None else meta["tau"],
        quantile=meta["quantile"], atom_quantile=meta.get("atom_quantile"),
        atom_tolerance=meta.get("atom_tau") if meta.get("atom_quantile") is None else None,
        target_risk=meta["target_risk"], delta=meta.get("delta", 0.1), options=FitOptions(
            layers=meta["layers"], channels=meta.get("channels", "scalars"), cutoff=config.get("cutoff"),
            hidden=config.get("hidden", options.hidden), members=config.get("members", 1),
            calibration=train.get("calibration", "split"), folds=train.get("folds", options.folds),
            fallback=report.get("certificate", {}).get("fallback", "strictest"),
            support_quantile=novelty.get("support_quantile", options.support_quantile),
            weight_folds=novelty.get("weight_folds", options.weight_folds),
            epochs=train.get("epochs", options.epochs), patience=train.get("patience", options.patience),
            seed=train.get("seed", 0))).to_dict()
    return _drop_spec_fields(meta)


def _drop_spec_fields(meta: dict) -> dict:
    """A version-9 file's metadata less the fields its spec repeats (version 10 keeps each setting once)."""
    for name in SPEC_FIELDS:
        meta.pop(name, None)
    return meta


def _stack_members(state: dict[str, torch.Tensor], members: int) -> dict[str, torch.Tensor]:
    """Version 6-8 heads kept member 0's weights at the top and member ``k`` under ``others.{k-1}.``; version 9 has
    each weight once, with a leading axis of members (the novelty model's tensors are left as they are)."""
    out = {}
    for name, value in state.items():
        if name.startswith("others."):
            continue
        if name.startswith("novelty.") or name == "element_index":
            out[name] = value
            continue
        values = [value] + [state[f"others.{m}.{name}"] for m in range(members - 1)]
        out["embed" if name == "embed.weight" else name] = torch.stack(values)
    return out


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
    if payload.get("version") not in READABLE:
        found = payload.get("version")
        newer = isinstance(found, int) and found > VERSION
        added = "; ".join(f"version {v} added {what}" for v, what in CHANGES.items()
                          if not isinstance(found, int) or v > found)
        raise HeadFileError(f"{path} has head-file version {found}; this probe-ase reads versions "
                            f"{', '.join(map(str, READABLE))} "
                            + ("(upgrade probe-ase to read it)" if newer else f"({added}): refit the head"),
                            path=str(path), found_version=found, version=VERSION)
    meta_json, state = payload["meta"], payload["state"]
    if _checksum(meta_json, state) != payload.get("sha256"):
        raise HeadFileError(f"{path} failed its checksum: the file was modified or damaged", path=str(path))
    try:  # a file of this version whose schema still differs (fields added without a version bump)
        if payload["version"] < 9:
            state = dict(state)
            meta_json = json.dumps(_upgrade(json.loads(meta_json), state, path))
        elif payload["version"] == 9:
            meta_json = json.dumps(_drop_spec_fields(json.loads(meta_json)))
        meta = HeadMeta.from_json(meta_json)
        head = ProbeHead(meta.feature_dim, meta.elements, meta.config)
        head.load_state_dict({k: v for k, v in state.items() if not k.startswith("novelty.")})
        novelty = NoveltyModel(meta.feature_dim, meta.elements, meta.novelty.components)
        novelty.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("novelty.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise HeadFileError(f"{path} says head-file version {payload['version']} but its contents do not match that schema "
                            f"({type(err).__name__}: {err}); refit the head", path=str(path)) from err
    head.eval()
    return head, meta, novelty
