"""The PROBE head: a small attention classifier over frozen per-atom features.

Standardised features and an element embedding are encoded per atom, mixed by
multi-head self-attention restricted to each atom's neighbourhood graph (so the
cost is linear in the number of atoms), and pooled by attention with learned
queries into one logit per structure. The pooling weights, averaged over heads,
are the per-atom importance map (they sum to 1 within each structure). With
``HeadConfig(atom_logit=True)`` a second readout gives one logit per atom from
the same encoding (is this atom's force error within tolerance?), in the same
forward pass. ``HeadConfig(members=K)`` averages K such heads.

The head knows nothing of ASE: it takes tensors. :mod:`probe_ase.model.headfile`
stores it with its calibration and backbone fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from probe_ase.exceptions import InputError


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
        max_pool: also pool each channel's maximum over atoms (beside
            attention pooling), so one badly described atom can decide.
        per_element_scaling: standardise features with each element's own
            mean and spread (H and C atoms sit far apart in feature space)
            instead of one over all atoms.
        aux_quantiles: extra training targets "error <= the q-quantile of the
            training errors" for each q, read out from the same pooled vector;
            they teach the head to rank errors finer than one tolerance. Only
            the main logit is used at inference. On the acac and ethanol fit
            pools they raised force-error Spearman from 0.79 / 0.74 to 0.84 /
            0.84 (``benchmarks/head_variants.py``); ``()`` turns them off.
        shared_score: the main and auxiliary logits are one learned score plus
            a learned offset per label (an ordinal, CORAL-style readout), so
            every quantile label trains the very score the main logit ranks
            by; False (the default) gives each label its own linear readout.
            On the acac and ethanol fit pools it raised MACE's force-error
            Spearman on three of four rows and lowered PaiNN's on ethanol
            (``benchmarks/head_variants.py``; README, "One shared score").
        atom_logit: also read out one logit per atom (local reliability);
            :func:`~probe_ase.fit_probe` switches it on when given an
            ``atom_threshold`` or ``atom_quantile``.
        atom_error: also regress each atom's force-error norm ``|ΔF_i|``
            (on a log scale, from its encoding after the attention blocks;
            N regression targets per structure instead of one label). The
            structure's predicted RMS atom error then joins its logits with
            the same spread as theirs on the validation split (set by
            :meth:`ProbeHead.set_error_blend` after training). Needs reference
            forces. None (the default): :func:`~probe_ase.fit_probe` turns it
            on for force criteria when every fit structure has reference
            forces, off otherwise. On the acac and ethanol fit pools it raised
            the force-error ranking on three of four MACE labels and rescued
            a head that learned nothing (``benchmarks/head_variants.py``;
            README, "Per-atom error regression").
        members: independently trained copies of the head (seeds
            ``train.seed``, ``+ 1``, ...) whose logits, importances and
            per-atom outputs are averaged: the head's own small ensemble.
            Costs ``members`` times the training; per calculator step on up
            to 64 atoms the members run batched
            (:class:`~probe_ase.model.stacked.StackedHead`: five cost about twice
            one head's time, not the backbone's), on larger cells one after
            another. On the acac and ethanol MACE fit
            pools a mean of 5 heads ranked held-out frames better than one
            head in every fold, by about 0.003 AUROC and 0.004 Spearman ρ
            (``benchmarks/head_crossfit.py``; README, "Averaging heads").
    """

    hidden: int = 64
    heads: int = 4
    blocks: int = 1
    cutoff: float | None = None
    max_pool: bool = False
    per_element_scaling: bool = False
    aux_quantiles: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    shared_score: bool = False
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


#: edges per chunk in :class:`GraphAttention` (a (4096, 64) float32 tensor is 1 MiB)
EDGE_CHUNK = 4096
#: up to this many atoms :class:`GraphAttention` runs as dense masked attention (fewer, larger ops)
DENSE_MAX_ATOMS = 64


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax of ``scores`` (rows, heads) within groups of rows sharing ``index``."""
    expand = index.unsqueeze(-1).expand_as(scores)
    peak = scores.new_full((size, scores.shape[-1]), -math.inf)
    peak = peak.scatter_reduce(0, expand, scores, reduce="amax", include_self=True)
    weights = (scores - peak[index]).exp()
    total = scores.new_zeros((size, scores.shape[-1])).index_add_(0, index, weights)
    return weights / total[index]


class GraphAttention(nn.Module):
    """Multi-head attention of each atom over its neighbourhood graph.

    Per-edge tensors are built :data:`EDGE_CHUNK` edges at a time: they stay
    in cache instead of costing fresh memory pages, so time and peak memory
    grow linearly with the number of atoms (50 000 atoms on one core: 306 ms
    instead of 945 ms for one pass over all edges). Up to
    :data:`DENSE_MAX_ATOMS` atoms it runs as dense masked attention; graphs
    must hold every atom's self loop (as :func:`~probe_ase.model.graph.radius_graph`
    and the taps' graphs do).
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim, self.chunk, self.dense_max = heads, hidden // heads, EDGE_CHUNK, DENSE_MAX_ATOMS
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Attention of each atom over its in-edges: ``h`` (n_atoms, hidden), ``edges`` (2, n_edges) as (dst, src)."""
        n = h.shape[0]
        if n <= self.dense_max:
            return self._dense(h, edges)
        q, k, v = self.qkv(h).view(n, 3, self.heads, self.dim).unbind(1)
        q, k, v = (q / math.sqrt(self.dim)).contiguous(), k.contiguous(), v.contiguous()
        dst_chunks, src_chunks = edges[0].split(self.chunk), edges[1].split(self.chunk)
        scores = []
        for dst, src in zip(dst_chunks, src_chunks):
            scores.append((q.index_select(0, dst) * k.index_select(0, src)).sum(-1))
        alpha = segment_softmax(torch.cat(scores), edges[0], n).split(self.chunk)
        mixed = h.new_zeros((n, self.heads, self.dim))
        for dst, src, weight in zip(dst_chunks, src_chunks, alpha):
            mixed.index_add_(0, dst, weight.unsqueeze(-1) * v.index_select(0, src))
        return self.out(mixed.reshape(n, -1))

    def _dense(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """The same attention as an (n, n) matrix: exact, and cheaper for a few atoms.

        An edge listed m times (periodic images of one neighbour) weighs m times,
        as in the edge-wise sum: the mask holds log(m), -inf where no edge.
        """
        n = h.shape[0]
        count = h.new_zeros(n * n).index_add_(0, edges[0] * n + edges[1], h.new_ones(edges.shape[1]))
        q, k, v = self.qkv(h).view(n, 3, self.heads, self.dim).permute(1, 2, 0, 3).unbind(0)  # (heads, n, dim)
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=count.view(n, n).log())
        return self.out(mixed.transpose(0, 1).reshape(n, -1))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with graph attention."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = GraphAttention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Attention, then the MLP, each on layer-normed input and added back: (n_atoms, hidden) in and out."""
        h = h + self.attention(self.norm1(h), edges)
        return h + self.mlp(self.norm2(h))


class AttentionPool(nn.Module):
    """Pool atoms into one vector per structure with learned queries (one per head)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.query = nn.Parameter(torch.randn(heads, self.dim) / math.sqrt(self.dim))
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, batch: torch.Tensor, n_structures: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vectors (n_structures, hidden) and each atom's attention weight (n_atoms,), averaged over heads."""
        n = h.shape[0]
        keys = self.key(h).view(n, self.heads, self.dim)
        scores = (keys * self.query).sum(-1) / math.sqrt(self.dim)
        values = self.value(h).view(n, self.heads, self.dim)
        if n_structures == 1:  # one structure (a calculator step): a plain softmax over its atoms
            alpha = torch.softmax(scores, 0)
            pooled = (alpha.unsqueeze(-1) * values).sum(0, keepdim=True)
        else:
            alpha = segment_softmax(scores, batch, n_structures)
            pooled = h.new_zeros((n_structures, self.heads, self.dim)).index_add_(0, batch, alpha.unsqueeze(-1) * values)
        return pooled.reshape(n_structures, -1), alpha.mean(-1)


class SharedScore(nn.Module):
    """One linear score per structure plus a learned offset per label: ``(n, labels)`` logits."""

    def __init__(self, width: int, labels: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)
        self.offsets = nn.Parameter(torch.zeros(labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, labels)`` of pooled vectors ``x`` ``(n, width)``."""
        return self.score(x) + self.offsets


class ProbeHead(nn.Module):
    """Attention classifier: per-atom features -> reliability logit, importances and per-atom logits.

    With ``config.members = K > 1`` the head is its own first member and holds
    the other ``K - 1`` (single-member heads of the same configuration) in
    ``others``; its outputs are the members' means. Its logits are raw: the
    head file's :class:`~probe_ase.model.calibration.Calibration` turns them
    into probabilities.

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
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[list(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("element_index", lookup)
        self.per_element_scaling = config.per_element_scaling
        rows = (len(self.elements),) if config.per_element_scaling else ()
        self.register_buffer("feature_mean", torch.zeros(*rows, self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(*rows, self.feature_dim))
        hidden = config.hidden
        self.embed = nn.Embedding(len(self.elements), hidden)
        self.encode = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(AttentionBlock(hidden, config.heads) for _ in range(config.blocks))
        self.pool = AttentionPool(hidden, config.heads)
        self.max_pool = config.max_pool
        width = 2 * hidden if config.max_pool else hidden
        labels = 1 + len(config.aux_quantiles)
        self.readout = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(),
                                     SharedScore(hidden, labels) if config.shared_score else nn.Linear(hidden, labels))
        self.atom_logit = config.atom_logit
        self.atom_readout = (nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                           nn.Linear(hidden, 1)) if config.atom_logit else nn.Identity())
        self.atom_error = bool(config.atom_error)
        # log |ΔF_i| = shift + scale * the error readout (set from the training atoms by set_error_scale)
        self.register_buffer("error_shift", torch.zeros(()))
        self.register_buffer("error_scale", torch.ones(()))
        self.error_readout = (nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                            nn.Linear(hidden, 1)) if self.atom_error else nn.Identity())
        # logits -= error_blend * (predicted structure error - error_centre); zero while training
        self.register_buffer("error_blend", torch.zeros(labels))
        self.register_buffer("error_centre", torch.zeros(()))
        member = replace(config, members=1)
        self.others = nn.ModuleList(HeadMember(feature_dim, elements, member) for _ in range(config.members - 1))

    @classmethod
    def from_members(cls, members: Sequence[ProbeHead], config: HeadConfig) -> ProbeHead:
        """One head averaging trained single-member heads ``members`` (``config.members`` of them)."""
        if len(members) != config.members or any(m.config.members != 1 for m in members):
            raise InputError(f"from_members needs {config.members} single-member heads, got {len(members)}",
                             members=len(members), expected=config.members)
        head = cls(members[0].feature_dim, members[0].elements, config)
        state = dict(members[0].state_dict())
        state |= {f"others.{k}.{name}": v for k, m in enumerate(members[1:]) for name, v in m.state_dict().items()}
        head.load_state_dict(state)
        return head.eval()

    def set_standardisation(self, features: torch.Tensor, numbers: torch.Tensor) -> None:
        """Store mean and scale of training features ``(n_atoms, feature_dim)`` (per element if so configured)."""
        for other in self.others:
            other.set_standardisation(features, numbers)
        features = features.to(self.feature_mean)
        if not self.per_element_scaling:
            self.feature_mean.copy_(features.mean(0))
            self.feature_scale.copy_(features.std(0).clamp_min(1e-6))
            return
        index = self.element_index[numbers]
        for k in range(len(self.elements)):
            rows = features[index == k]
            if len(rows) > 1:
                self.feature_mean[k] = rows.mean(0)
                self.feature_scale[k] = rows.std(0).clamp_min(1e-6)

    def set_error_scale(self, log_errors: torch.Tensor) -> None:
        """Store mean and spread of the training atoms' ``log |ΔF_i|`` (log eV/Å): the error readout's units."""
        for other in self.others:
            other.set_error_scale(log_errors)
        self.error_shift.fill_(float(log_errors.mean()))
        self.error_scale.fill_(float(log_errors.std().clamp_min(1e-6)))

    def set_error_blend(self, logits: torch.Tensor, structure_error: torch.Tensor) -> None:
        """Blend the predicted structure error into this member's logits with the spread of each logit column.

        ``logits`` ``(n, labels)`` are the head's logits of held-out structures
        before any blend, ``structure_error`` ``(n,)`` their standardised
        predicted log RMS atom errors (:func:`log_rms_error`). Afterwards each
        column is lowered by ``std(column) / std(error)`` times the error
        (about its mean): both views of the structure weigh the same.
        """
        spread = structure_error.std().clamp_min(1e-6)
        self.error_blend.copy_(logits.std(0) / spread)
        self.error_centre.fill_(float(structure_error.mean()))

    def forward(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        edges: torch.Tensor,
        batch: torch.Tensor,
        n_structures: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uncalibrated logits ``(n_structures,)``, importances, atom logits and predicted ``|ΔF_i|`` (eV/Å) per atom.

        ``edges`` is ``(2, n_edges)`` (destination, source) over the atoms of all
        structures; ``batch`` gives each atom's structure index. Without
        ``atom_logit`` the atom logits, without ``atom_error`` the predicted
        errors are empty tensors. The predicted error is ``exp`` of the
        regressed mean ``log |ΔF_i|``: a median-like estimate, not an upper bound.
        """
        logits, importance, atom_logits, atom_errors = self.all_logits(features, numbers, edges, batch, n_structures)
        if self.atom_error:
            atom_errors = torch.exp(self.error_shift + self.error_scale * atom_errors)
        return logits[:, 0], importance, atom_logits, atom_errors

    def all_logits(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        edges: torch.Tensor,
        batch: torch.Tensor,
        n_structures: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(n_structures, 1 + n_aux)`` (main first, then the auxiliary quantiles), importances, atom logits
        and the standardised predicted ``log |ΔF_i|`` per atom (empty tensors without ``atom_logit`` / ``atom_error``);
        each the mean over the members."""
        outputs = self.member_logits(features, numbers, edges, batch, n_structures)
        if len(self.others) == 0:
            return outputs
        logits, importance, atom_logits, atom_errors = outputs
        for other in self.others:
            more = other.member_logits(features, numbers, edges, batch, n_structures)
            logits, importance = logits + more[0], importance + more[1]
            atom_logits, atom_errors = atom_logits + more[2], atom_errors + more[3]
        k = float(len(self.others) + 1)
        return logits / k, importance / k, atom_logits / k, atom_errors / k

    def member_logits(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        edges: torch.Tensor,
        batch: torch.Tensor,
        n_structures: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`all_logits` of this head's own member alone (not averaged with ``others``)."""
        element = self.element_index[numbers]
        x = features.to(self.feature_mean)
        if self.per_element_scaling:
            x = (x - self.feature_mean[element]) / self.feature_scale[element]
        else:
            x = (x - self.feature_mean) / self.feature_scale
        h = self.encode(x) + self.embed(element)
        for block in self.blocks:
            h = block(h, edges)
        pooled, importance = self.pool(h, batch, n_structures)
        if self.max_pool:
            index = batch.unsqueeze(-1).expand_as(h)
            peak = h.new_full((n_structures, h.shape[-1]), -math.inf)
            pooled = torch.cat([pooled, peak.scatter_reduce(0, index, h, reduce="amax", include_self=True)], dim=-1)
        atom_logits = self.atom_readout(h).squeeze(-1) if self.atom_logit else h.new_zeros(0)
        logits = self.readout(pooled)
        if not self.atom_error:
            return logits, importance, atom_logits, h.new_zeros(0)
        atom_errors = self.error_readout(h).squeeze(-1)  # standardised log |ΔF_i|
        structure_error = log_rms_error(atom_errors, self.error_shift, self.error_scale, batch, n_structures)
        blended = logits - self.error_blend * (structure_error - self.error_centre).unsqueeze(-1)
        return blended, importance, atom_logits, atom_errors


class HeadMember(ProbeHead):
    """A further member of an averaged head (``ProbeHead.others``): a single head, its own TorchScript type.

    TorchScript compiles an outer head and its members with different methods;
    one class for both let it mistake one compiled type for the other.
    """


def log_rms_error(atom_errors: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch: torch.Tensor,
                  n_structures: int) -> torch.Tensor:
    """Each structure's log RMS atom error, ``log sqrt(mean_i |ΔF_i|^2)``, standardised like the atoms' ``log |ΔF_i|``.

    ``atom_errors`` are standardised log errors (``log |ΔF_i| = shift + scale * atom_errors``); ``batch`` gives
    each atom's structure. ``(n_structures,)``.
    """
    log_sq = 2 * (shift + scale * atom_errors)
    peak = log_sq.new_full((n_structures,), -math.inf).scatter_reduce(0, batch, log_sq.detach(), reduce="amax")
    total = log_sq.new_zeros(n_structures).index_add_(0, batch, (log_sq - peak[batch]).exp())
    count = log_sq.new_zeros(n_structures).index_add_(0, batch, torch.ones_like(log_sq))
    return (0.5 * (peak + (total / count).log()) - shift) / scale


def structure_rows(ptr: Sequence[int], indices: Iterable[int]) -> torch.Tensor:
    """Row indices of structures ``indices`` in atom-concatenated arrays (structure ``k`` owns ``ptr[k]:ptr[k+1]``)."""
    return torch.cat([torch.arange(int(ptr[k]), int(ptr[k + 1])) for k in indices])


def structure_ptr(ptr: Sequence[int], indices: Iterable[int]) -> np.ndarray:
    """Offsets of structures ``indices`` once their rows are gathered (:func:`structure_rows`) into one array."""
    return np.cumsum([0] + [int(ptr[k + 1]) - int(ptr[k]) for k in indices])


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
    graph, owner = [], []
    offset = 0
    for b, k in enumerate(indices):
        start, stop = int(ptr[k]), int(ptr[k + 1])
        graph.append(torch.as_tensor(edges[k]) + offset)
        owner.append(torch.full((stop - start,), b, dtype=torch.long))
        offset += stop - start
    rows_t = structure_rows(ptr, indices)
    feats, nums = features[rows_t.to(features.device)], numbers[rows_t.to(numbers.device)]
    device = feats.device
    return feats, nums.to(device), torch.cat(graph, dim=1).to(device), torch.cat(owner).to(device), len(indices)
