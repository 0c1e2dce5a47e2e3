"""The PROBE head: a small attention classifier over frozen per-atom features.

Standardised features and an element embedding are encoded per atom, mixed by
multi-head self-attention restricted to each atom's neighbourhood graph (so the
cost is linear in the number of atoms), and pooled by attention with learned
queries into one logit per structure. The pooling weights, averaged over heads,
are the per-atom importance map (they sum to 1 within each structure). With
``HeadConfig(atom_logit=True)`` a second readout gives one logit per atom from
the same encoding (is this atom's force error within tolerance?), in the same
forward pass. ``HeadConfig(members=K)`` averages K such heads: every weight has
a leading member axis and one forward runs all K at once (K = 1 is the plain
head).

The head knows nothing of ASE: it takes tensors. :mod:`probe_ase.model.headfile`
stores it with its calibration and backbone fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from probe_ase.exceptions import InputError
from probe_ase.model.layers import AttentionBlock, AttentionPool, Linear, mlp


@dataclass(frozen=True)
class HeadConfig:
    """Size of the head.

    Attributes:
        hidden: width of the per-atom encoding.
        heads: attention heads (and pooling queries); must divide ``hidden``.
        blocks: self-attention blocks.
        cutoff: radius (Å) of the neighbourhood each atom attends to. None (the
            default) takes the backbone's own cutoff when the head is fitted:
            the head then sees the neighbourhood the backbone sees, and a
            :class:`~probe_ase.calculator.ProbeCalculator` reuses the
            backbone's neighbour list instead of building one per step.
        aux_quantiles: extra training targets "error <= the q-quantile of the
            training errors" for each q, read out from the same pooled vector;
            they teach the head to rank errors finer than one tolerance. Only
            the main logit is used at inference (design decisions: auxiliary
            quantile labels); ``()`` turns them off.
        atom_logit: also read out one logit per atom (local reliability);
            :func:`~probe_ase.fit_probe` switches it on when given an
            ``atom_tolerance`` or ``atom_quantile``.
        atom_error: also regress each atom's force-error norm ``|ΔF_i|``
            (on a log scale, from its encoding after the attention blocks).
            The structure's predicted RMS atom error then joins its logits with
            the same spread as theirs on the validation split (set by
            :meth:`ProbeHead.set_error_blend` after training). Needs reference
            forces. None (the default): :func:`~probe_ase.fit_probe` turns it
            on for force criteria when every fit structure has reference
            forces, off otherwise.
        members: independently trained copies of the head whose logits,
            importances and per-atom outputs are averaged: the head's own
            small ensemble, run as one batched pass.
    """

    hidden: int = 64
    heads: int = 4
    blocks: int = 1
    cutoff: float | None = None
    aux_quantiles: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    atom_logit: bool = False
    atom_error: bool | None = None
    members: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_quantiles", tuple(float(q) for q in self.aux_quantiles))
        if any(not 0 < q < 1 for q in self.aux_quantiles):
            raise InputError(f"aux_quantiles must lie strictly between 0 and 1, got {self.aux_quantiles}",
                             aux_quantiles=self.aux_quantiles)
        if self.hidden < 1 or self.heads < 1 or self.blocks < 1 or self.members < 1:
            raise InputError(f"hidden, heads, blocks and members must be >= 1, got {self.hidden}, {self.heads}, "
                             f"{self.blocks}, {self.members}",
                             hidden=self.hidden, heads=self.heads, blocks=self.blocks, members=self.members)
        if self.hidden % self.heads:
            raise InputError(f"hidden={self.hidden} is not divisible by heads={self.heads}",
                             hidden=self.hidden, heads=self.heads)
        if self.cutoff is not None and not self.cutoff > 0:
            raise InputError(f"cutoff must be positive (Å), got {self.cutoff}", cutoff=self.cutoff)


class ProbeHead(nn.Module):
    """Attention classifier: per-atom features -> reliability logit, importances and per-atom logits.

    Every weight and buffer has a leading axis of ``config.members = K``
    members, trained independently and averaged in the outputs; one forward
    runs them all. Its logits are raw: the head file's
    :class:`~probe_ase.model.calibration.Calibration` turns them into
    probabilities.

    Args:
        feature_dim: width of the backbone features it reads.
        elements: atomic numbers it can embed.
        config: sizes; see :class:`HeadConfig`.
    """

    def __init__(self, feature_dim: int, elements: Sequence[int], config: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = int(feature_dim)
        self.elements = tuple(sorted(int(z) for z in elements))
        k, hidden, labels = config.members, config.hidden, 1 + len(config.aux_quantiles)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[list(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("element_index", lookup)
        self.register_buffer("feature_mean", torch.zeros(k, self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(k, self.feature_dim))
        self.embed = nn.Parameter(torch.empty(k, len(self.elements), hidden))
        self.encode = mlp(k, self.feature_dim, hidden, hidden, norm=False)
        self.blocks = nn.ModuleList(AttentionBlock(k, hidden, config.heads) for _ in range(config.blocks))
        self.pool = AttentionPool(k, hidden, config.heads)
        self.readout = mlp(k, hidden, hidden, labels, norm=True)
        self.atom_logit, self.atom_error = config.atom_logit, bool(config.atom_error)
        self.atom_readout = mlp(k, hidden, hidden, 1, norm=True) if self.atom_logit else nn.Identity()
        self.error_readout = mlp(k, hidden, hidden, 1, norm=True) if self.atom_error else nn.Identity()
        # log |ΔF_i| = shift + scale * the error readout (set from the training atoms by set_error_scale)
        self.register_buffer("error_shift", torch.zeros(k))
        self.register_buffer("error_scale", torch.ones(k))
        # logits -= error_blend * (predicted structure error - error_centre); zero while training
        self.register_buffer("error_blend", torch.zeros(k, labels))
        self.register_buffer("error_centre", torch.zeros(k))
        for member in range(k):
            self._reset(member)

    def _reset(self, k: int) -> None:
        """Initialise member ``k`` as a single head of ``nn.Embedding`` / ``nn.Linear`` layers is, in the same order
        (so a seeded single head draws the same numbers)."""
        with torch.no_grad():
            nn.init.normal_(self.embed[k])
        for module in self.modules():  # pre-order: a pool's queries before its key and value layers
            if isinstance(module, AttentionPool):
                module.reset_query(k)
            elif isinstance(module, Linear):
                module.reset(k)

    @classmethod
    def from_members(cls, members: Sequence[ProbeHead], config: HeadConfig) -> ProbeHead:
        """One head averaging trained single-member heads ``members`` (``config.members`` of them)."""
        if len(members) != config.members or any(m.config.members != 1 for m in members):
            raise InputError(f"from_members needs {config.members} single-member heads, got {len(members)}",
                             members=len(members), expected=config.members)
        head = cls(members[0].feature_dim, members[0].elements, config)
        states = [m.state_dict() for m in members]
        head.load_state_dict({name: value if name == "element_index" else torch.cat([s[name] for s in states])
                              for name, value in states[0].items()})
        return head.eval()

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store every member's mean and scale ``(feature_dim,)`` of the training atoms' features."""
        self.feature_mean.copy_(mean.to(self.feature_mean).expand_as(self.feature_mean))
        self.feature_scale.copy_(std.to(self.feature_scale).clamp_min(1e-6).expand_as(self.feature_scale))

    def set_error_scale(self, log_errors: torch.Tensor) -> None:
        """Store mean and spread of the training atoms' ``log |ΔF_i|`` (log eV/Å): the error readout's units."""
        self.error_shift.fill_(float(log_errors.mean()))
        self.error_scale.fill_(float(log_errors.std().clamp_min(1e-6)))

    def set_error_blend(self, logits: torch.Tensor, structure_error: torch.Tensor) -> None:
        """Blend the predicted structure error into a single head's logits with the spread of each logit column.

        ``logits`` ``(n, labels)`` are the head's logits of held-out structures
        before any blend, ``structure_error`` ``(n,)`` their standardised
        predicted log RMS atom errors (:func:`log_rms_error`). Afterwards each
        column is lowered by ``std(column) / std(error)`` times the error
        (about its mean): both views of the structure weigh the same.
        """
        spread = structure_error.std().clamp_min(1e-6)
        self.error_blend.copy_((logits.std(0) / spread).expand_as(self.error_blend))
        self.error_centre.fill_(float(structure_error.mean()))

    def forward(self, features: torch.Tensor, numbers: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor,
                n_structures: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uncalibrated logits ``(n_structures,)``, importances, atom logits and predicted ``|ΔF_i|`` (eV/Å) per atom.

        ``edges`` is ``(2, n_edges)`` (destination, source) over the atoms of all
        structures; ``batch`` gives each atom's structure index. Without
        ``atom_logit`` the atom logits, without ``atom_error`` the predicted
        errors are empty tensors. The predicted error is ``exp`` of the
        regressed mean ``log |ΔF_i|`` (first member's units): a median-like
        estimate, not an upper bound.
        """
        logits, importance, atom_logits, atom_errors = self.all_logits(features, numbers, edges, batch, n_structures)
        if self.atom_error:
            atom_errors = torch.exp(self.error_shift[0] + self.error_scale[0] * atom_errors)
        return logits[:, 0], importance, atom_logits, atom_errors

    def all_logits(self, features: torch.Tensor, numbers: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor,
                   n_structures: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The members' mean logits ``(n_structures, 1 + n_aux)`` (main first, then the auxiliary quantiles),
        importances, atom logits and standardised predicted ``log |ΔF_i|`` per atom (empty tensors without
        ``atom_logit`` / ``atom_error``)."""
        logits, importance, atom_logits, atom_errors = self.member_logits(features, numbers, edges, batch, n_structures)
        if logits.shape[0] == 1:  # one member: its own outputs, no averaging pass
            return logits[0], importance[0], atom_logits[0], atom_errors[0]
        return logits.mean(0), importance.mean(0), atom_logits.mean(0), atom_errors.mean(0)

    def member_logits(self, features: torch.Tensor, numbers: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor,
                      n_structures: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`all_logits` of each member, along a leading axis of K (atom outputs ``(K, 0)`` when absent)."""
        element = self.element_index[numbers]
        x = (features.to(self.feature_mean).unsqueeze(0) - self.feature_mean.unsqueeze(1)) \
            / self.feature_scale.unsqueeze(1)
        h = self.encode(x) + self.embed[:, element]
        for block in self.blocks:
            h = block(h, edges, batch, n_structures)
        pooled, importance = self.pool(h, batch, n_structures)
        logits = self.readout(pooled)  # (K, n_structures, labels)
        empty = h.new_zeros((h.shape[0], 0))
        atom_logits = self.atom_readout(h).squeeze(-1) if self.atom_logit else empty
        if not self.atom_error:
            return logits, importance, atom_logits, empty
        atom_errors = self.error_readout(h).squeeze(-1)  # (K, n): standardised log |ΔF_i|
        structure_error = log_rms_error(atom_errors, self.error_shift, self.error_scale, batch, n_structures)
        blended = logits - self.error_blend.unsqueeze(1) * (structure_error - self.error_centre.unsqueeze(1)).unsqueeze(-1)
        return blended, importance, atom_logits, atom_errors


def log_rms_error(atom_errors: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch: torch.Tensor,
                  n_structures: int) -> torch.Tensor:
    """Each member's and structure's log RMS atom error, ``log sqrt(mean_i |ΔF_i|^2)``, standardised like the atoms'.

    ``atom_errors`` ``(K, n_atoms)`` are standardised log errors (``log |ΔF_i| = shift + scale * atom_errors``,
    ``shift`` and ``scale`` ``(K,)``); ``batch`` gives each atom's structure. ``(K, n_structures)``.
    """
    shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    log_sq = 2 * (shift + scale * atom_errors)
    k = log_sq.shape[0]
    owner = batch.unsqueeze(0).expand(k, -1)
    peak = log_sq.new_full((k, n_structures), -math.inf).scatter_reduce(1, owner, log_sq.detach(), reduce="amax")
    total = log_sq.new_zeros((k, n_structures)).scatter_add_(1, owner, (log_sq - peak.gather(1, owner)).exp())
    count = log_sq.new_zeros((k, n_structures)).scatter_add_(1, owner, torch.ones_like(log_sq))
    return (0.5 * (peak + (total / count).log()) - shift) / scale


def structure_rows(ptr: Sequence[int], indices: Iterable[int]) -> torch.Tensor:
    """Row indices of structures ``indices`` in atom-concatenated arrays (structure ``k`` owns ``ptr[k]:ptr[k+1]``)."""
    return _rows(*_starts_counts(ptr, indices))


def structure_ptr(ptr: Sequence[int], indices: Iterable[int]) -> np.ndarray:
    """Offsets of structures ``indices`` once their rows are gathered (:func:`structure_rows`) into one array."""
    return np.concatenate([[0], np.cumsum(_starts_counts(ptr, indices)[1])])


def _rows(starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """Rows ``starts[b] .. starts[b] + counts[b] - 1`` of every structure ``b``, in order."""
    return torch.from_numpy(np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum()))


def _starts_counts(ptr: Sequence[int], indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """First rows and atom counts (int64) of structures ``indices``."""
    ptr = np.asarray(ptr, dtype=np.int64)
    indices = np.fromiter(indices, dtype=np.int64) if not isinstance(indices, np.ndarray) else indices.astype(np.int64)
    return ptr[indices], ptr[indices + 1] - ptr[indices]


def batch_inputs(
    features: torch.Tensor,
    numbers: torch.Tensor,
    ptr: Sequence[int],
    edges: Sequence,
    indices: Iterable[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Gather structures ``indices`` into the head's inputs.

    ``features``/``numbers`` are concatenated over all structures, structure
    ``k`` owning rows ``ptr[k]:ptr[k+1]``; ``edges[k]`` is its local
    ``(2, n_edges)`` neighbourhood graph. Returns ``(features, numbers, edges,
    batch, n_structures)`` for :meth:`ProbeHead.forward`; atoms come in the
    order of :func:`structure_rows`.
    """
    indices = list(indices)
    if len(indices) == 1 and int(ptr[indices[0] + 1]) - int(ptr[indices[0]]) == features.shape[0]:
        # one structure owning every row (a ProbeCalculator step): nothing to gather
        device = features.device
        graph = torch.as_tensor(edges[indices[0]], device=device)
        owner = torch.zeros(features.shape[0], dtype=torch.long, device=device)
        return features, numbers.to(device), graph, owner, 1
    starts, counts = _starts_counts(ptr, indices)
    graphs = [np.asarray(edges[k]) for k in indices]
    offsets = np.repeat(np.cumsum(counts) - counts, [g.shape[1] for g in graphs])
    graph = torch.from_numpy(np.concatenate(graphs, axis=1).astype(np.int64) + offsets)
    owner = torch.from_numpy(np.repeat(np.arange(len(indices), dtype=np.int64), counts))
    rows_t = _rows(starts, counts)
    feats, nums = features[rows_t.to(features.device)], numbers[rows_t.to(numbers.device)]
    device = feats.device
    return feats, nums.to(device), graph.to(device), owner.to(device), len(indices)
