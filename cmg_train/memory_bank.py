"""The memory bank of normal embeddings and its kNN distance.

The distance is |a|^2 + |b|^2 - 2ab: a Gemm and a ReduceMax or TopK. The same module runs in
training, evaluation and inside the exported ONNX graph; broadcasting a [batch, M, D]
difference instead is what blows peers' memory-bank exports up to tens of GB (and past
TensorRT's 2^31-element tensor limit).

The nearest rows are found on ab - |b|^2 / 2 (one Gemm with the constant as its bias, then
a ReduceMax or TopK) and |a|^2 is added to the k values found, not to every distance:
written as |a|^2 + |b|^2 - 2ab over the whole [patches, rows] matrix, the two elementwise
passes and the TopK took 31% of the encoder's time beside the MatMul's 45% (docs/results.md,
the patch kNN as one Gemm).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

# Distances held at once by KNNDistance in PyTorch (64M FP32 values: 256 MB per temporary).
CHUNK_ELEMENTS = 1 << 26
# Bank rows per Gemm in the exported graph. The runtime holds one block's [batch, patches,
# rows] values at a time: `small` (48 x 48 patches, 10,000 rows) at batch 8 holds 74 MB per
# temporary instead of 737 MB, for the same FLOPs and the same nearest rows. 1,000 rather than
# 2,500: a block the caches hold is 1.1 times faster at batch 8 (docs/results.md).
EXPORT_BANK_ROWS = 1000


def squared_distances(x: torch.Tensor, rows_t: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
    """|a|^2 + |b|^2 - 2ab from x [..., D] to rows given transposed [..., D, M] with their
    squared norms [..., M]: one MatMul (the module docstring says why not a difference)."""
    return (x**2).sum(-1, keepdim=True) + rows_sq - 2.0 * torch.matmul(x, rows_t)


class KNNDistance(nn.Module):
    """Mean Euclidean distance to the k nearest rows of a constant bank."""

    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] matrix, got {list(bank.shape)}")
        self.k = min(int(k), bank.shape[0])
        self.rows = int(bank.shape[0])  # a Python int: the export's blocks are static
        self.register_buffer("bank_t", bank.t().contiguous().float())
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1))
        # The Gemm's bias: a row's nearness ab - |b|^2 / 2 ranks rows as the distance does.
        self.register_buffer("neg_half_sq", -0.5 * self.bank_sq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [...] distances.

        In PyTorch (training, evaluation) the rows go through in chunks of CHUNK_ELEMENTS
        distances: a 48 x 48 patch map against 10,000 bank rows is 92 MB of FP32 distances
        per frame, and a scoring batch of 64 frames (`loop.batched`'s default) with the
        elementwise temporaries took a training past 16 GB. The exported graph cannot split
        the batch (the server sends it), so it splits the bank instead (`_nearest`)."""
        if torch.onnx.is_in_onnx_export():
            return self._nearest(x, EXPORT_BANK_ROWS)
        rows = max(1, CHUNK_ELEMENTS // self.rows)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= rows:
            return self._nearest(x, self.rows)
        return torch.cat([self._nearest(c, self.rows) for c in flat.split(rows)]).reshape(x.shape[:-1])

    def excluding(self, x: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
        """x [B, ..., D] -> [B, ...] distances with the bank rows marked in `exclude` [B, M]
        left out for that query: a training frame scored as if it had not been in the bank
        (threshold calibration; not in the served graph)."""
        if bool(exclude.all(-1).any()):
            raise ValueError(f"every one of the bank's {self.rows} rows is left out for some query")
        s = torch.matmul(x, self.bank_t).add_(self.neg_half_sq)
        s.masked_fill_(exclude.reshape(exclude.shape[0], *[1] * (x.ndim - 2), -1), float("-inf"))
        # k = 1: a plain maximum, a third of TopK's time over [B, 2304, 10000]
        best = s.amax(-1, keepdim=True) if self.k == 1 else torch.topk(s, self.k, dim=-1).values
        found = torch.isfinite(best)  # -inf: a left-out row, there only when fewer than k rows are left
        if bool(found.all()):
            return self._mean_distance(x, best)
        # a query with fewer than k rows left (`scoring.k_global` near the training images' count)
        # averages the rows it has: the left-out rows' -inf had made the mean, and the threshold, NaN
        d = torch.sqrt(torch.clamp((x**2).sum(-1, keepdim=True) - 2.0 * best, min=0.0))
        return torch.where(found, d, 0.0).sum(-1) / found.sum(-1)

    def _nearest(self, x: torch.Tensor, block_rows: int) -> torch.Tensor:
        """The k nearest rows' mean distance, the bank taken `block_rows` rows at a time. The
        graph uses blocks of EXPORT_BANK_ROWS, each a Gemm + ReduceMax (k = 1) or TopK of its k
        nearest, then the same over those: the k nearest rows of the bank are among the
        blocks' k nearest, so the result is the same; what changes is that only one block's
        values are alive at a time (the exporter folds each block's slice of the constant into
        its own initializer, which the int8 and TensorRT builds take as Gemm weights). PyTorch
        takes the whole bank as one block, on the same arithmetic."""
        flat = x.reshape(-1, x.shape[-1])
        near, found = [], 0  # found: a Python int, the graph's shapes are static
        for a in range(0, self.rows, block_rows):
            block = slice(a, min(a + block_rows, self.rows))
            s = torch.addmm(self.neg_half_sq[block], flat, self.bank_t[:, block])
            k = 1 if self.k == 1 else min(self.k, block.stop - a)
            near.append(s.amax(-1, keepdim=True) if self.k == 1 else torch.topk(s, k, dim=-1).values)
            found += k
        if self.k == 1:
            best = near[0]
            for s in near[1:]:
                best = torch.maximum(best, s)
        else:
            best = torch.cat(near, -1)
            best = torch.topk(best, self.k, dim=-1).values if found > self.k else best
        return self._mean_distance(flat, best).reshape(x.shape[:-1])

    @staticmethod
    def _mean_distance(x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """x [..., D] and its nearest rows' nearness ab - |b|^2 / 2 [..., k] -> the mean of
        their Euclidean distances sqrt(|a|^2 - 2 nearness) [...]."""
        d2 = (x**2).sum(-1, keepdim=True) - 2.0 * best
        return torch.sqrt(torch.clamp(d2, min=0.0)).mean(-1)


def greedy_coreset(x: torch.Tensor, m: int, seed: int = 0, proj_dim: int = 32,
                   progress: bool = False, top: int = 8192, flush: int = 64) -> torch.Tensor:
    """Indices of m rows of x [N, D] chosen by greedy k-center (PatchCore's coreset).

    Why not a random subsample: the rare normal patches (an unusual material, a pose seen
    twice) are exactly what a random subsample drops and what then lights up as false
    alarms; k-center keeps the rows farthest from everything chosen so far. Distances are
    taken on a random Johnson-Lindenstrauss projection to `proj_dim` dimensions.

    Why lazily: one pass over all N rows per chosen row is memory-bound (80% of training a
    two-backbone bank on 600 frames). A row's distance only shrinks, so the distances kept
    from the last full pass bound the true ones from above: the next centres are picked
    among the `top` rows with the largest kept distance (exact while the best of them is
    still at least the largest kept distance outside them), and the full pass runs once per
    `flush` centres, as one Gemm. The same rows as one pass per centre, up to ties.
    """
    n, d = x.shape
    if m >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    p = x @ (torch.randn(d, proj_dim, generator=gen) / proj_dim ** 0.5) if d > proj_dim else x
    sq = (p ** 2).sum(1)
    lifted = torch.cat([p, sq[:, None], torch.ones(n, 1)], 1)
    p = lifted[:, :-2]  # a view: the projected rows are held once
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    dist = (sq - 2.0 * (p @ p[first]) + sq[first]).clamp_min(0)
    bar = tqdm(total=m, initial=1, desc="coreset", disable=not progress, leave=False, mininterval=1.0)
    while len(chosen) < m:
        # The candidates, and the largest kept distance among the rows left out.
        k = min(top, n)
        vals, idx = torch.topk(dist, k + 1 if k < n else k)
        bound = float(vals[k]) if k < n else float("-inf")
        near, rows, rows_sq = vals[:k].clone(), p[idx[:k]], sq[idx[:k]]
        picked: list[int] = []
        while len(picked) < flush and len(chosen) < m:
            j = int(torch.argmax(near))
            if float(near[j]) < bound:  # a row outside the candidates may be farther now
                break
            i = int(idx[j])
            chosen.append(i)
            picked.append(i)
            torch.minimum(near, rows_sq - 2.0 * (rows @ p[i]) + sq[i], out=near)
        # |p|^2 - 2 p.c + |c|^2 as one Gemm: [p, |p|^2, 1] . [-2c, 1, |c|^2]
        centres = torch.cat([-2.0 * p[picked], torch.ones(len(picked), 1), sq[picked, None]], 1).T.contiguous()
        for lo in range(0, n, 1 << 16):  # blocks of rows: the [rows, flush] temporary stays in cache
            hi = min(lo + (1 << 16), n)
            torch.minimum(dist[lo:hi], (lifted[lo:hi] @ centres).amin(1), out=dist[lo:hi])
        bar.update(len(picked))
    bar.close()
    return torch.tensor(chosen)
