"""The lab's feature decoder (``fastl2lir``), batched in torch.

Per unit: the ``k`` voxels whose activity correlates most (by ``|r|``) with the unit over
the training samples, then a ridge regression with a bias on them, exactly as
``fastl2lir.FastL2LiR.fit(X, Y, alpha, n_feat=k)``: ``G = X1'X1 + alpha*I`` over
``X1 = [X, 1]`` once (the bias is penalised too), and per unit the sub-block of ``G`` and
of ``X1'y`` at the selected voxels plus the bias. Voxels with variance < 1e-8 get r = 0.

Where fastl2lir loops over units one at a time (one LAPACK solve each, BLAS held to one
thread), this does a chunk of units at once: one matmul for the correlations and ``X1'Y``,
``topk`` per unit, a gather of the sub-Gram blocks and a batched Cholesky solve. The chunk
size is bounded by a memory budget, so any layer fits. ``k=None`` (or ``k`` = voxels)
is one plain ridge over all voxels: ``G`` is factorised once for every unit.

Normalisation (the lab's scripts, not the package): voxels and units are z-scored with
the training mean and std (ddof 1); a std of 0 is replaced by 1 (the column is constant:
its z-score is 0 and the unit is predicted as its mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from icnn_pl.errors import ConfigError, DataError

ZERO_VAR = 1e-8  # fastl2lir: voxels with np.var < 1e-8 get correlation 0
BLOCKS_BYTES = 2**29  # sub-Gram blocks and their factors per chunk (512 MB)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def zscore_stats(a: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof 1) over samples (axis 0), std 0 -> 1; as float64 numpy."""
    t = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float64)
    mean = t.mean(0)
    norm = t.std(0, correction=1) if t.shape[0] > 1 else torch.ones_like(mean)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    return mean.numpy(), norm.numpy()


def dtype_of(name: str) -> torch.dtype:
    """``float32`` (the lab's setting, default) or ``float64``."""
    if name not in _DTYPES:
        raise ConfigError(f"decoder.dtype={name!r} is not valid", f"use one of {list(_DTYPES)}")
    return _DTYPES[name]


def units_per_chunk(n_samples: int, n_voxels: int, n_test: int, k: int | None,
                    itemsize: int, budget_bytes: float) -> int:
    """How many units a chunk may hold in ``budget_bytes`` beside the fixed arrays (Gram
    matrix, its factor for plain ridge, training and test data); per unit: its training
    column, correlations and ``X1'y`` column, a dense weight column, test predictions,
    and with selection the sub-Gram block, its Cholesky factor and the indices. A
    ConfigError, before any work, when not even one unit fits."""
    v1 = n_voxels + 1
    fixed = (v1 * v1 * (2 if k is None else 1) + (n_samples + n_test) * v1) * itemsize
    per = n_samples + 3 * v1 + n_test
    if k is not None:
        per += 2 * (k + 1) ** 2 + 4 * (k + 1)
    per *= itemsize
    size = int((budget_bytes - fixed) // per)
    if size < 1:
        raise ConfigError(
            f"decoder.memory_gb={budget_bytes / 2**30:.3g}: a chunk does not fit (the Gram"
            f" matrix and data of {n_voxels} voxels x {n_samples} samples take"
            f" {fixed / 2**30:.3g} GB, each unit {per / 2**20:.3g} MB)",
            f"raise decoder.memory_gb to at least {(fixed + 64 * per) / 2**30:.2f}, or use a"
            " smaller ROI or k")
    return size


@dataclass
class ChunkFit:
    """One chunk of units: test predictions (de-normalised), weights and biases in the
    normalised space (fastl2lir's W and b), dense (voxels x units) and (units,)."""

    pred: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    index: torch.Tensor | None = None   # (units, k): the selected voxels, ascending
    weight: torch.Tensor | None = None  # (units, k): their weights (W at those voxels)


class TopKRidge:
    """The decoder of one (subject, ROI): training voxels fixed, units decoded chunk by chunk.

    ``X`` (samples x voxels) is z-scored, ``G`` built once; ``fit_predict(Y)`` fits a chunk of
    units (samples x units, raw values) and predicts the test samples ``X_test``.
    """

    def __init__(self, X: np.ndarray, X_test: np.ndarray, alpha: float = 100.0,
                 k: int | None = 500, device: str | torch.device = "cpu",
                 dtype: str = "float32") -> None:
        X = np.asarray(X)
        check_inputs(X, np.asarray(X_test), k, alpha)
        self.device, self.dtype = torch.device(device), dtype_of(dtype)
        self.alpha = float(alpha)
        n, v = X.shape
        self.k = None if k is None or k == 0 or k == v else int(k)
        self.x_mean, self.x_norm = zscore_stats(X)
        to = {"device": self.device, "dtype": self.dtype}
        xm, xn = torch.as_tensor(self.x_mean, **to), torch.as_tensor(self.x_norm, **to)
        Xz = (torch.as_tensor(X, **to) - xm) / xn
        ones = torch.ones(n, 1, **to)
        self.X1 = torch.cat([Xz, ones], 1)  # (n, v + 1)
        Xt = (torch.as_tensor(np.asarray(X_test), **to) - xm) / xn
        self.Xt1 = torch.cat([Xt, torch.ones(Xt.shape[0], 1, **to)], 1)
        self.G = self.X1.T @ self.X1
        self.G.diagonal().add_(self.alpha)
        # correlation terms of the (already z-scored) voxels, as fastl2lir's corrmat computes
        # them from the data it is given: centred, std with ddof 1
        self._xmean = Xz.mean(0)
        self._xstd = Xz.std(0, correction=1)
        self._dead = Xz.var(0, correction=0) < ZERO_VAR
        self.n, self.v = n, v
        self._chol = None
        if self.k is None:  # plain ridge: one factorisation for every unit
            self._chol = _cholesky(self.G[None])[0]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def chunk_size(self, memory_budget: float, n_units: int) -> int:
        """Units per chunk within ``memory_budget`` bytes (``units_per_chunk``), and at most
        ``BLOCKS_BYTES`` of sub-Gram blocks (k=500: 256 units; k=50: 25,000): larger
        chunks gain nothing on a CPU, smaller ones pay the per-chunk costs (writes) more."""
        cap = n_units if self.k is None else max(
            1, BLOCKS_BYTES // (2 * (self.k + 1) ** 2 * self.itemsize))
        return min(n_units, cap, units_per_chunk(self.n, self.v, self.Xt1.shape[0], self.k,
                                                 self.itemsize, memory_budget))

    def fit_predict(self, Y: np.ndarray | torch.Tensor, y_mean: np.ndarray,
                    y_norm: np.ndarray) -> ChunkFit:
        """Fit the units of ``Y`` (training samples x units, raw) and predict the test samples."""
        to = {"device": self.device, "dtype": self.dtype}
        ym, yn = torch.as_tensor(y_mean, **to), torch.as_tensor(y_norm, **to)
        Yz = (torch.as_tensor(Y, **to) - ym) / yn
        rhs_all = torch.cat([self.X1.T[:-1] @ Yz, Yz.sum(0, keepdim=True)], 0)  # X1'Y
        if self.k is None:
            W1 = torch.cholesky_solve(rhs_all, self._chol)  # (v + 1, c)
            idx = w = None
        else:
            W1, idx, w = self._select_solve(Yz, rhs_all)
        pred = (self.Xt1 @ W1) * yn + ym
        return ChunkFit(pred=pred, W=W1[:-1], b=W1[-1], index=idx, weight=w)

    def _select_solve(self, Yz: torch.Tensor, rhs_all: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, v, c = self.n, self.v, Yz.shape[1]
        # Pearson r = cov / (sx sy), cov from X'Y: the X'Y of the ridge's right-hand side
        ymean, ystd = Yz.mean(0), Yz.std(0, correction=1)
        cov = (rhs_all[:-1] - n * self._xmean[:, None] * ymean[None]) / (n - 1)
        r = cov / (self._xstd[:, None] * ystd[None])
        r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
        r[self._dead] = 0.0
        top = torch.topk(r.abs_(), self.k, dim=0).indices.T  # (c, k)
        idx = torch.cat([top, torch.full((c, 1), v, device=top.device, dtype=top.dtype)], 1)
        # sorted: rows of G are then read in order (the solution does not depend on the
        # order of the variables; the bias, index v, stays last)
        idx = idx.sort(1).values
        blocks = gather_blocks(self.G, idx)
        rhs = rhs_all.T.gather(1, idx)  # (c, k+1)
        w = torch.cholesky_solve(rhs[:, :, None], _cholesky(blocks))[:, :, 0]
        del blocks
        W1 = torch.zeros(v + 1, c, device=w.device, dtype=w.dtype)
        W1.scatter_(0, idx.T, w.T)
        return W1, idx[:, :-1], w[:, :-1]


def gather_blocks(G: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``G[idx_u, idx_u]`` for every row ``idx_u`` of ``idx``: (c, k+1, k+1). On the CPU
    row by row (a contiguous row copy, then a column gather: about twice as fast as one
    advanced-indexing gather, which is bound by scattered reads); on a GPU in one gather."""
    if G.device.type != "cpu":
        return G[idx[:, :, None], idx[:, None, :]]
    out = torch.empty(idx.shape[0], idx.shape[1], idx.shape[1], dtype=G.dtype)
    for u in range(idx.shape[0]):
        torch.index_select(G.index_select(0, idx[u]), 1, idx[u], out=out[u])
    return out


def _cholesky(blocks: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(blocks)
    if int(info.max()) > 0:  # alpha > 0 makes every block positive definite: only NaN/inf
        raise DataError("the ridge system is not positive definite (NaN or inf in the data?)",
                        "check the fMRI data and features for NaN/inf; use decoder.alpha > 0")
    return L


def check_inputs(X: np.ndarray, X_test: np.ndarray, k: int | None, alpha: float) -> None:
    """The decoder's preconditions, each one line: shapes, NaNs, k within the voxels."""
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise DataError(f"training fMRI data has shape {X.shape}; need samples x voxels with"
                        " at least 2 samples and 1 voxel", "check the ROI and the trials")
    if X_test.ndim != 2 or X_test.shape[1] != X.shape[1]:
        raise DataError(f"test fMRI data has shape {X_test.shape}, training {X.shape}: the"
                        " voxel counts differ", "select the same ROI in both files")
    for name, a in (("training", X), ("test", X_test)):
        bad = ~np.isfinite(a)
        if bad.any():
            cols = np.unique(np.nonzero(bad)[1])
            raise DataError(
                f"{name} fMRI data has {int(bad.sum())} NaN/inf value(s) in {cols.size}"
                f" voxel(s) (columns {cols[:8].tolist()}{' ...' if cols.size > 8 else ''})",
                "remove those voxels from the ROI or impute them before decoding")
    if k is not None and k > X.shape[1]:
        raise ConfigError(f"decoder.k={k} is larger than the ROI's {X.shape[1]} voxels",
                          f"set decoder.k<={X.shape[1]}, or decoder.k=null for ridge on all"
                          " voxels")
    if k is not None and k < 0:
        raise ConfigError(f"decoder.k={k} is negative", "use a positive k, or null")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"decoder.alpha={alpha} must be positive and finite",
                          "use the lab's decoder.alpha=100")
