"""Kept rows back into a full-size tensor: the scatter ssProp and VCAS share.

Both methods compute part of a gradient on a subset of rows (dim 0) and must return it
full size with zeros in the other rows: ssProp's weight gradient (the kept output
channels), VCAS's input gradient (the kept samples). :func:`scatter_rows` does it in
the template's memory format. On CPU, for large floating tensors, the C++
``scatter_rows_`` op of :mod:`greenprop.kernels` writes each byte of a fresh empty
tensor once; elsewhere (GPU, ``GREENPROP_NO_KERNELS=1``, small tensors) ``zeros`` plus
``index_copy_``. Measured on both methods' shapes at 1 thread (``benchmarks/row_scatter.py``,
docs/benchmarks.md): the op takes 0.45-0.79 of the fallback's time on the tensors it
serves; zeroing only the dropped rows with ``index_fill_`` instead takes 0.79-1.03 of it
at ratio 0.8 on VCAS's input gradients, 0.98-1.25 at 0.5 and 0.96-1.78 on ssProp's
weight gradients, and its ``nonzero`` would make a GPU wait, so it is not used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from greenprop import kernels

__all__ = ["physical_channels_last", "row_matrix", "scatter_rows"]


def physical_channels_last(t: Tensor) -> bool:
    """True when a 4-D tensor's channels are its innermost physical dimension."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def row_matrix(t: Tensor) -> Tensor | None:
    """An ``(rows, -1)`` view of ``t``'s physical layout (dim 0 outermost), or None if it has none."""
    physical = t.permute(0, 2, 3, 1) if physical_channels_last(t) else t
    return physical.view(t.shape[0], math.prod(t.shape[1:])) if physical.is_contiguous() else None


def scatter_rows(kept: Tensor, idx: Tensor, like: Tensor | torch.Size) -> Tensor:
    """Zeros shaped ``like`` with ``kept[j]`` written at row ``idx[j]`` of dim 0.

    ``like`` is the full shape, or a template tensor whose dtype and memory format
    (channels_last) the result takes; it is never read. With a shape, the result has
    ``kept``'s dtype and memory format. ``idx``: int64 row indices on ``kept``'s device.
    """
    shape = like if isinstance(like, torch.Size) else like.shape
    template = kept if isinstance(like, torch.Size) else like
    fmt = torch.channels_last if physical_channels_last(template) else torch.contiguous_format
    kept = kept.to(template.dtype)
    out = torch.empty(shape, dtype=kept.dtype, device=kept.device, memory_format=fmt)
    if kernels.available(out):
        out_matrix, kept_matrix = row_matrix(out), row_matrix(kept.contiguous(memory_format=fmt))
        if out_matrix is not None and kept_matrix is not None:
            kernels.scatter_rows_(out_matrix, idx, kept_matrix)
            return out
    return out.zero_().index_copy_(0, idx, kept)
