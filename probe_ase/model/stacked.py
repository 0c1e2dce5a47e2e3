"""An averaged head's members run as one batched pass: the per-step path of ``HeadConfig(members=K)``.

A :class:`~probe_ase.model.head.ProbeHead` averaging K members runs them one after
another: K times the small operations, and on a molecule's few atoms the head
is bound by their dispatch, not their arithmetic. :class:`StackedHead` holds
the members' weights stacked along a leading axis and runs one structure of up
to :data:`~probe_ase.model.head.DENSE_MAX_ATOMS` atoms (a calculator step on a
molecule or a small cell) through batched matrix products: about one member's
operations for all K. Anything else (several structures, larger cells, where
the arithmetic dominates) goes through the head itself. Inference only: the
weights are copied when it is built; :class:`~probe_ase.model.probe.Probe` builds it
when it compiles the head and checks it against the head's own outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from probe_ase.model.head import ProbeHead, SharedScore


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class StackedLinear(nn.Module):
    """K linear layers applied to ``(K, n, in)`` as one batched product."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        weights, biases = [], []
        for layer in layers:
            if isinstance(layer, SharedScore):  # one score plus an offset per label: a (labels, in) linear map
                labels = layer.offsets.shape[0]
                weights.append(layer.score.weight.expand(labels, -1))
                biases.append(layer.score.bias + layer.offsets)
            else:
                weights.append(layer.weight)
                biases.append(layer.bias)
        self.register_buffer("weight", _stack(weights).transpose(1, 2).contiguous())  # (K, in, out)
        self.register_buffer("bias", _stack(biases).unsqueeze(1))  # (K, 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, n, out)`` from ``(K, n, in)``."""
        return torch.baddbmm(self.bias, x, self.weight)


class StackedNorm(nn.Module):
    """K layer norms over the last axis of ``(K, n, width)``."""

    def __init__(self, norms: list[nn.LayerNorm]) -> None:
        super().__init__()
        self.width, self.eps = int(norms[0].normalized_shape[0]), float(norms[0].eps)
        self.register_buffer("weight", _stack([m.weight for m in norms]).unsqueeze(1))
        self.register_buffer("bias", _stack([m.bias for m in norms]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised per row, then each member's scale and shift."""
        return nn.functional.layer_norm(x, [self.width], None, None, self.eps) * self.weight + self.bias


class StackedMLP(nn.Module):
    """K copies of ``[LayerNorm,] Linear, SiLU, Linear`` (the head's readouts and block MLPs)."""

    def __init__(self, sequences: list[nn.Sequential]) -> None:
        super().__init__()
        layers = [list(s) for s in sequences]
        self.normed = isinstance(layers[0][0], nn.LayerNorm)
        start = 1 if self.normed else 0
        self.norm = StackedNorm([s[0] for s in layers]) if self.normed else nn.Identity()
        self.first = StackedLinear([s[start] for s in layers])
        self.second = StackedLinear([s[start + 2] for s in layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, n, out)`` from ``(K, n, in)``."""
        return self.second(nn.functional.silu(self.first(self.norm(x))))


class StackedBlock(nn.Module):
    """K pre-norm attention blocks (:class:`~probe_ase.model.head.AttentionBlock`), dense attention over one structure."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.heads, self.dim = blocks[0].attention.heads, blocks[0].attention.dim
        self.norm1 = StackedNorm([b.norm1 for b in blocks])
        self.norm2 = StackedNorm([b.norm2 for b in blocks])
        self.qkv = StackedLinear([b.attention.qkv for b in blocks])
        self.out = StackedLinear([b.attention.out for b in blocks])
        self.mlp = StackedMLP([b.mlp for b in blocks])

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h`` ``(K, n, hidden)``; ``mask`` ``(n, n)``: log of each edge's multiplicity, -inf where none."""
        k, n = h.shape[0], h.shape[1]
        q, key, v = self.qkv(self.norm1(h)).view(k, n, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = nn.functional.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (K, heads, n, dim)
        h = h + self.out(mixed.transpose(1, 2).reshape(k, n, -1))
        return h + self.mlp(self.norm2(h))


class StackedHead(nn.Module):
    """The members of an averaged :class:`~probe_ase.model.head.ProbeHead` as one batched pass (inference only).

    Same inputs and outputs as the head's ``forward``; one structure of at
    most ``DENSE_MAX_ATOMS`` atoms runs batched, anything else through the
    head itself.
    """

    def __init__(self, head: ProbeHead) -> None:
        super().__init__()
        members = [head, *head.others]
        self.head = head
        self.members, self.dense_max = len(members), head.blocks[0].attention.dense_max
        self.heads, self.dim = head.pool.heads, head.pool.dim
        self.per_element_scaling, self.max_pool = head.per_element_scaling, head.max_pool
        self.atom_logit, self.atom_error = head.atom_logit, head.atom_error
        self.register_buffer("element_index", head.element_index.clone())
        self.register_buffer("feature_mean", _stack([m.feature_mean for m in members]))
        self.register_buffer("feature_scale", _stack([m.feature_scale for m in members]))
        self.register_buffer("embed", _stack([m.embed.weight for m in members]))  # (K, elements, hidden)
        self.encode = StackedMLP([m.encode for m in members])
        self.blocks = nn.ModuleList(StackedBlock([m.blocks[b] for m in members]) for b in range(len(head.blocks)))
        self.register_buffer("query", _stack([m.pool.query for m in members]).unsqueeze(1))  # (K, 1, heads, dim)
        self.key = StackedLinear([m.pool.key for m in members])
        self.value = StackedLinear([m.pool.value for m in members])
        self.readout = StackedMLP([m.readout for m in members])
        self.atom_readout = StackedMLP([m.atom_readout for m in members]) if head.atom_logit else nn.Identity()
        self.error_readout = StackedMLP([m.error_readout for m in members]) if head.atom_error else nn.Identity()
        self.register_buffer("error_shift", _stack([m.error_shift for m in members]))  # (K,)
        self.register_buffer("error_scale", _stack([m.error_scale for m in members]))
        self.register_buffer("error_blend", _stack([m.error_blend for m in members]))  # (K, labels)
        self.register_buffer("error_centre", _stack([m.error_centre for m in members]))

    def forward(
        self,
        features: torch.Tensor,
        numbers: torch.Tensor,
        edges: torch.Tensor,
        batch: torch.Tensor,
        n_structures: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`ProbeHead.forward <probe_ase.model.head.ProbeHead.forward>` returns for the same inputs."""
        n = features.shape[0]
        if n_structures != 1 or n > self.dense_max:
            return self.head(features, numbers, edges, batch, n_structures)
        element = self.element_index[numbers]
        x = features.to(self.feature_mean)
        if self.per_element_scaling:
            x = (x - self.feature_mean[:, element]) / self.feature_scale[:, element]
        else:
            x = (x - self.feature_mean.unsqueeze(1)) / self.feature_scale.unsqueeze(1)
        h = self.encode(x) + self.embed[:, element]  # (K, n, hidden)
        count = x.new_zeros(n * n).index_add_(0, edges[0] * n + edges[1], x.new_ones(edges.shape[1]))
        mask = count.view(n, n).log()
        for block in self.blocks:
            h = block(h, mask)
        k = self.members
        scores = (self.key(h).view(k, n, self.heads, self.dim) * self.query).sum(-1) / math.sqrt(self.dim)
        alpha = torch.softmax(scores, 1)  # (K, n, heads)
        pooled = (alpha.unsqueeze(-1) * self.value(h).view(k, n, self.heads, self.dim)).sum(1).reshape(k, 1, -1)
        if self.max_pool:
            pooled = torch.cat([pooled, h.amax(1, keepdim=True)], dim=-1)
        logits = self.readout(pooled).squeeze(1)  # (K, labels)
        importance = alpha.mean(-1).mean(0)
        atom_logits = self.atom_readout(h).squeeze(-1).mean(0) if self.atom_logit else h.new_zeros(0)
        if not self.atom_error:
            return logits.mean(0)[:1], importance, atom_logits, h.new_zeros(0)
        atom_errors = self.error_readout(h).squeeze(-1)  # (K, n), standardised log |ΔF_i|
        log_sq = 2 * (self.error_shift.unsqueeze(1) + self.error_scale.unsqueeze(1) * atom_errors)
        structure_error = (0.5 * torch.logsumexp(log_sq, 1) - 0.5 * math.log(n) - self.error_shift) / self.error_scale
        logits = logits - self.error_blend * (structure_error - self.error_centre).unsqueeze(-1)
        mean_errors = atom_errors.mean(0)
        return logits.mean(0)[:1], importance, atom_logits, torch.exp(self.error_shift[0] + self.error_scale[0]
                                                                       * mean_errors)
