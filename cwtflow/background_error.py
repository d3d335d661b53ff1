"""The background model's error, measured on the map it is used on.

A diffuse background model is never exact, and where it is too low a likelihood fit with the
model fixed finds sources that are not there; letting its normalisation float freely on each
fit window removes them but takes part of every faint source's counts with it (``docs/
psf_rule.md``). Between the two, the catalog fit (`cwtflow.likelihood.fit_sources`) can
give the window's normalisation ``beta`` a Gaussian prior of mean 1 and width ``tau``: the
relative rms of the model's error on the scale of a fit window. `measured_background_error`
measures ``tau`` on the map itself, so that an exact model keeps the fixed fit's sensitivity
and a poor one gets the floating fit's caution, with nothing chosen by hand.

The map is cut into square blocks of the fit window's side; blocks that touch any
candidate's window are left out (what is left holds no detected source). For a block of
observed counts ``C`` and model counts ``B``, ``E[(C - B)^2 / B] = 1 + tau^2 B`` when the
model is off by a relative ``tau`` (rms over blocks) and the counts are Poisson: the moment
estimate ``tau^2 = (sum (C - B)^2 / B - n) / sum B`` over the ``n`` blocks, clipped at 0 (the
heterogeneity estimate of a random-effects meta-analysis with a known mean). Undetected
sources in the blocks add to ``tau`` as a model error would: they are fluctuations the model
does not hold. The block sums are one dask reduction over the maps (numpy maps too).
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np

__all__ = ["MIN_BLOCKS", "measured_background_error"]

#: Fewer source-free blocks than this measure nothing: the error counts as unknown
#: (``inf``, a free normalisation).
MIN_BLOCKS = 20


def _block_sums(image: Any, side: int) -> Any:
    """Sums over ``side`` x ``side`` blocks (the incomplete last row and column dropped)."""
    array = image if isinstance(image, da.Array) else da.from_array(np.asarray(image))
    ny, nx = (n // side * side for n in array.shape)
    return da.coarsen(np.sum, array[:ny, :nx].astype(np.float64), {0: side, 1: side})


def measured_background_error(
    counts: Any, background: Any, centres: np.ndarray, half: int
) -> tuple[float, int]:
    """Relative rms error of ``background`` on windows of side ``2 half + 1`` away from the
    candidates at ``centres`` ((k, 2) map pixels (y, x)), and the number of blocks it was
    measured on. ``inf`` when fewer than `MIN_BLOCKS` blocks are free."""
    side = 2 * half + 1
    c, b = dask.compute(_block_sums(counts, side), _block_sums(background, side))
    free = b > 0
    for y, x in np.reshape(centres, (-1, 2)):
        rows = slice(max(0, math.floor((y - half) / side)), math.floor((y + half) / side) + 1)
        cols = slice(max(0, math.floor((x - half) / side)), math.floor((x + half) / side) + 1)
        free[rows, cols] = False
    n = int(free.sum())
    if n < MIN_BLOCKS:
        return math.inf, n
    c, b = c[free], b[free]
    tau2 = (np.sum((c - b) ** 2 / b) - n) / np.sum(b)
    return math.sqrt(max(float(tau2), 0.0)), n
