"""The head's layers, each holding K members' weights along a leading axis and running them in one pass.

A member computes exactly what one :class:`torch.nn.Linear` / :class:`torch.nn.LayerNorm` computes (K = 1 is
the plain layer); attention runs the members' heads side by side, over each atom's neighbourhood graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional


#: edges per chunk in :class:`GraphAttention` (a (4096, 64) float32 tensor is 1 MiB)
EDGE_CHUNK = 4096
#: up to this many atoms :class:`GraphAttention` runs as dense masked attention (fewer, larger ops)
DENSE_MAX_ATOMS = 64
#: a batch of structures of at most this many atoms each runs as one padded dense matrix per structure (training
#: batches of 108-atom crystals: 5x faster than edge by edge, forward alone 2x; at 216 atoms the forward is slower)
PADDED_MAX_ATOMS = 128


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax of ``scores`` (rows, heads) within groups of rows sharing ``index``."""
    expand = index.unsqueeze(-1).expand_as(scores)
    peak = scores.new_full((size, scores.shape[-1]), -math.inf)
    peak = peak.scatter_reduce(0, expand, scores, reduce="amax", include_self=True)
    weights = (scores - peak[index]).exp()
    total = scores.new_zeros((size, scores.shape[-1])).index_add_(0, index, weights)
    return weights / total[index]


class Linear(nn.Module):
    """``members`` independent linear maps of ``(K, n, width_in)`` to ``(K, n, width_out)``, one batched product.

    One member computes exactly what :class:`torch.nn.Linear` computes, and
    :meth:`reset` initialises member ``k`` as ``nn.Linear`` would.
    """

    def __init__(self, members: int, width_in: int, width_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, width_out, width_in))
        self.bias = nn.Parameter(torch.empty(members, width_out))

    def reset(self, k: int) -> None:
        """``nn.Linear``'s initialisation of member ``k``."""
        nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight.shape[2])
        nn.init.uniform_(self.bias[k], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, n, width_out)`` from ``(K, n, width_in)``."""
        if x.shape[0] == 1:
            return functional.linear(x[0], self.weight[0], self.bias[0]).unsqueeze(0)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class LayerNorm(nn.Module):
    """``members`` layer norms over the last axis of ``(K, n, width)``."""

    def __init__(self, members: int, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.weight = nn.Parameter(torch.ones(members, width))
        self.bias = nn.Parameter(torch.zeros(members, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised per row, then each member's scale and shift."""
        if x.shape[0] == 1:
            return functional.layer_norm(x[0], [self.width], self.weight[0], self.bias[0], self.eps).unsqueeze(0)
        return functional.layer_norm(x, [self.width], None, None, self.eps) * self.weight.unsqueeze(1) \
            + self.bias.unsqueeze(1)


def mlp(members: int, width_in: int, hidden: int, width_out: int, norm: bool) -> nn.Sequential:
    """``[LayerNorm,] Linear, SiLU, Linear`` per member."""
    layers = [LayerNorm(members, width_in)] if norm else []
    return nn.Sequential(*layers, Linear(members, width_in, hidden), nn.SiLU(), Linear(members, hidden, width_out))


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(K, n, heads * dim)`` as ``(n, K * heads, dim)``: the members' heads side by side."""
    k, n = x.shape[0], x.shape[1]
    return x.view(k, n, heads, -1).transpose(0, 1).reshape(n, k * heads, -1)


class GraphAttention(nn.Module):
    """Multi-head attention of each atom over its neighbourhood graph, for all members at once.

    Per-edge tensors are built :data:`EDGE_CHUNK` edges at a time: they stay
    in cache instead of costing fresh memory pages, so time and peak memory
    grow linearly with the number of atoms (50 000 atoms on one core: 306 ms
    instead of 945 ms for one pass over all edges); the members' heads run
    side by side. Up to :data:`DENSE_MAX_ATOMS` atoms it runs as dense masked
    attention, and a batch of structures of at most :data:`PADDED_MAX_ATOMS` atoms each as one
    padded dense matrix per structure (a training batch of molecules: about
    half the time of the edge-wise form; of 108-atom crystals, a fifth); graphs must hold every atom's self loop (as
    :func:`~probe_ase.model.graph.radius_graph` and the taps' graphs do).
    """

    def __init__(self, members: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim, self.chunk = heads, hidden // heads, EDGE_CHUNK
        self.dense_max, self.padded_max = DENSE_MAX_ATOMS, PADDED_MAX_ATOMS
        self.qkv = Linear(members, hidden, 3 * hidden)
        self.out = Linear(members, hidden, hidden)

    def forward(self, h: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
        """Attention of each atom over its in-edges: ``h`` (K, n_atoms, hidden), ``edges`` (2, n_edges) as (dst, src),
        ``batch`` each atom's structure (structures contiguous, as :func:`~probe_ase.model.head.batch_inputs` lays
        them out)."""
        k, n = h.shape[0], h.shape[1]
        if n <= self.dense_max:
            return self._dense(h, edges)
        if n_structures > 1:
            width = int(torch.bincount(batch, minlength=n_structures).max())
            if width <= self.padded_max:
                return self._padded(h, edges, batch, n_structures, width)
        q, key, v = self.qkv(h).chunk(3, dim=-1)
        q = (to_heads(q, self.heads) / math.sqrt(self.dim)).contiguous()  # (n, K * heads, dim)
        key, v = to_heads(key, self.heads).contiguous(), to_heads(v, self.heads).contiguous()
        chunk = max(1, self.chunk // k)  # per-edge tensors of about the same size, whatever the members
        dst_chunks, src_chunks = edges[0].split(chunk), edges[1].split(chunk)
        scores = []
        for dst, src in zip(dst_chunks, src_chunks):
            scores.append((q.index_select(0, dst) * key.index_select(0, src)).sum(-1))
        alpha = segment_softmax(torch.cat(scores), edges[0], n).split(chunk)
        mixed = h.new_zeros((n, k * self.heads, self.dim))
        for dst, src, weight in zip(dst_chunks, src_chunks, alpha):
            mixed.index_add_(0, dst, weight.unsqueeze(-1) * v.index_select(0, src))
        return self.out(mixed.view(n, k, -1).transpose(0, 1))

    def _padded(self, h: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor, n_structures: int,
                width: int) -> torch.Tensor:
        """The same attention with each structure's atoms in ``width`` slots: one (width, width) matrix per
        structure, the batched form of :meth:`_dense` for many small structures (a training batch of molecules).

        Empty slots attend only to themselves and are dropped afterwards.
        """
        k, n = h.shape[0], h.shape[1]
        counts = torch.bincount(batch, minlength=n_structures)
        local = torch.arange(n, device=h.device) - (torch.cumsum(counts, 0) - counts)[batch]
        slot = batch * width + local  # each atom's place in (structures * width)
        cells = n_structures * width
        count = h.new_zeros(cells * width).index_add_(0, slot[edges[0]] * width + local[edges[1]],
                                                      h.new_ones(edges.shape[1]))
        empty = torch.ones(cells, dtype=torch.bool, device=h.device).index_fill(0, slot, False).nonzero().squeeze(1)
        count = count.index_fill(0, empty * width + empty % width, 1.0)
        mask = count.view(n_structures, 1, width, width).log()
        qkv = h.new_zeros((k, cells, 3 * self.heads * self.dim)).index_copy(1, slot, self.qkv(h))
        q, key, v = qkv.view(k, n_structures, width, 3, self.heads, self.dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        mixed = functional.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (K, structures, heads, width, dim)
        mixed = mixed.transpose(2, 3).reshape(k, cells, -1).index_select(1, slot)
        return self.out(mixed)

    def _dense(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """The same attention as an (n, n) matrix: exact, and cheaper for a few atoms.

        An edge listed m times (periodic images of one neighbour) weighs m times,
        as in the edge-wise sum: the mask holds log(m), -inf where no edge.
        """
        k, n = h.shape[0], h.shape[1]
        count = h.new_zeros(n * n).index_add_(0, edges[0] * n + edges[1], h.new_ones(edges.shape[1]))
        q, key, v = self.qkv(h).view(k, n, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = functional.scaled_dot_product_attention(q, key, v, attn_mask=count.view(n, n).log())
        return self.out(mixed.transpose(1, 2).reshape(k, n, -1))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with graph attention."""

    def __init__(self, members: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(members, hidden), LayerNorm(members, hidden)
        self.attention = GraphAttention(members, hidden, heads)
        self.mlp = mlp(members, hidden, 2 * hidden, hidden, norm=False)

    def forward(self, h: torch.Tensor, edges: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
        """Attention, then the MLP, each on layer-normed input and added back: (K, n_atoms, hidden) in and out."""
        h = h + self.attention(self.norm1(h), edges, batch, n_structures)
        return h + self.mlp(self.norm2(h))


class AttentionPool(nn.Module):
    """Pool atoms into one vector per structure with learned queries (one per head and member)."""

    def __init__(self, members: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.query = nn.Parameter(torch.empty(members, heads, self.dim))
        self.key = Linear(members, hidden, hidden)
        self.value = Linear(members, hidden, hidden)

    def reset_query(self, k: int) -> None:
        """Member ``k``'s queries: standard normal over ``sqrt(dim)``."""
        with torch.no_grad():
            self.query[k] = torch.randn(self.heads, self.dim) / math.sqrt(self.dim)

    def forward(self, h: torch.Tensor, batch: torch.Tensor, n_structures: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vectors (K, n_structures, hidden) and each atom's attention weight (K, n_atoms), averaged over
        heads."""
        k, n = h.shape[0], h.shape[1]
        keys = self.key(h).view(k, n, self.heads, self.dim)
        scores = (keys * self.query.unsqueeze(1)).sum(-1) / math.sqrt(self.dim)  # (K, n, heads)
        values = self.value(h).view(k, n, self.heads, self.dim)
        if n_structures == 1:  # one structure (a calculator step): a plain softmax over its atoms
            alpha = torch.softmax(scores, 1)
            pooled = (alpha.unsqueeze(-1) * values).sum(1, keepdim=True)
            return pooled.reshape(k, 1, -1), alpha.mean(-1)
        alpha = segment_softmax(scores.transpose(0, 1).reshape(n, -1), batch, n_structures)  # (n, K * heads)
        weighted = alpha.unsqueeze(-1) * values.transpose(0, 1).reshape(n, k * self.heads, self.dim)
        pooled = h.new_zeros((n_structures, k * self.heads, self.dim)).index_add_(0, batch, weighted)
        return pooled.view(n_structures, k, -1).transpose(0, 1), alpha.view(n, k, self.heads).mean(-1).transpose(0, 1)
