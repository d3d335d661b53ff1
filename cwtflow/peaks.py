"""Per-island numerics of the source catalog: pure numpy/scipy on one island cut-out.

Every function trusts its inputs (float64 arrays of matching shapes, a boolean island mask);
validation, dask, WCS and table assembly live in `cwtflow.catalog`. An island is one connected
component of the 2-D CWT support; its cut-out is the island's bounding box, with every pixel
outside the island masked off.

Deblending is a watershed on the model image done as a persistence merge:

1. every island pixel points at its highest 8-neighbour inside the island when that neighbour is
   strictly higher; following the pointers (pointer jumping) gives each pixel the local maximum
   it ascends to, i.e. its *basin*;
2. two basins touching each other (8-neighbours) meet at a *saddle*, the highest value of
   ``min(v_p, v_q)`` over touching pixel pairs;
3. saddles are visited from the highest down; at each, the basin with the lower peak is merged
   into the other when its peak rises less than ``contrast`` times its height above the saddle
   (a shoulder, not a separate source) or when the two peaks are closer than ``min_separation``.

What remains are the deblended components; each is then measured on its own pixels: model
moments and centroid, a Poisson likelihood-ratio test of a source (the component's model shape,
or a Gaussian PSF) over the null background (`template_significance`), the Cramér-Rao position
error of that fit, and the wavelet significance at the model peak (`peak_significance`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "IslandSources",
    "ascent_basins",
    "basin_saddles",
    "island_sources",
    "merge_basins",
    "peak_significance",
    "template_significance",
]

# 8-neighbour offsets in a fixed order (ties between equal neighbours go to the first one).
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Half of them: every unordered neighbour pair is visited once.
_HALF_OFFSETS = ((0, 1), (1, -1), (1, 0), (1, 1))


def ascent_basins(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Label every pixel of ``mask`` with the local maximum of ``values`` it ascends to.

    Returns an int array of ``values.shape``: -1 outside ``mask``, else the flat index of the
    basin's peak pixel (steepest ascent over 8-neighbours inside the mask; a pixel with no
    strictly higher neighbour is its own peak, so a plateau holds one basin per pixel, which the
    saddle merge joins again at zero persistence).
    """
    ny, nx = values.shape
    padded = np.full((ny + 2, nx + 2), -np.inf)
    padded[1:-1, 1:-1] = np.where(mask, values, -np.inf)
    neighbours = np.stack(
        [padded[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx] for dy, dx in _OFFSETS]
    )
    best = np.argmax(neighbours, axis=0)
    best_value = np.take_along_axis(neighbours, best[None], axis=0)[0]
    flat = np.arange(ny * nx).reshape(ny, nx)
    dy = np.array([o[0] for o in _OFFSETS])[best]
    dx = np.array([o[1] for o in _OFFSETS])[best]
    up = best_value > values
    parent = np.where(up, flat + dy * nx + dx, flat).ravel()
    while True:  # pointer jumping: depth halves every pass
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    return np.where(mask.ravel(), parent, -1).reshape(ny, nx)


def basin_saddles(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Saddles between touching basins.

    Parameters
    ----------
    labels : ndarray of int, shape (ny, nx)
        Basin index per pixel (0 .. k-1), -1 outside the island.
    values : ndarray, shape (ny, nx)
        The image the basins ascend.

    Returns
    -------
    ndarray, shape (n_pairs, 3)
        Rows ``(a, b, saddle)`` with ``a < b`` (as floats), one per touching pair, sorted by
        saddle value descending (ties by ``a``, ``b``).
    """
    ny, nx = labels.shape
    keys, heights = [], []
    k = int(labels.max()) + 1
    for dy, dx in _HALF_OFFSETS:
        ys = slice(0, ny - dy)
        xs = slice(max(0, -dx), nx - max(0, dx))
        ys2 = slice(dy, ny)
        xs2 = slice(max(0, dx), nx - max(0, -dx))
        a, b = labels[ys, xs], labels[ys2, xs2]
        touch = (a >= 0) & (b >= 0) & (a != b)
        if not touch.any():
            continue
        lo = np.minimum(a[touch], b[touch]).astype(np.int64)
        hi = np.maximum(a[touch], b[touch]).astype(np.int64)
        keys.append(lo * k + hi)
        heights.append(np.minimum(values[ys, xs][touch], values[ys2, xs2][touch]))
    if not keys:
        return np.empty((0, 3))
    key = np.concatenate(keys)
    height = np.concatenate(heights)
    unique, inverse = np.unique(key, return_inverse=True)
    saddle = np.full(unique.size, -np.inf)
    np.maximum.at(saddle, inverse, height)
    out = np.column_stack([unique // k, unique % k, saddle]).astype(np.float64)
    order = np.lexsort((out[:, 1], out[:, 0], -out[:, 2]))
    return out[order]


def merge_basins(
    peaks: np.ndarray,
    positions: np.ndarray,
    saddles: np.ndarray,
    *,
    contrast: float,
    min_separation: float,
) -> np.ndarray:
    """Persistence merge of basins into deblended components.

    Parameters
    ----------
    peaks : ndarray, shape (k,)
        Peak value of each basin.
    positions : ndarray, shape (k, 2)
        Peak pixel (y, x) of each basin.
    saddles : ndarray, shape (n, 3)
        Output of `basin_saddles` (highest saddle first).
    contrast : float
        A lower peak survives a saddle only if ``peak - saddle >= contrast * peak``.
    min_separation : float
        Peaks closer than this (pixels) are always merged.

    Returns
    -------
    ndarray of int, shape (k,)
        Component of each basin: the index of the basin whose peak leads it.
    """
    root = np.arange(peaks.size)

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = int(root[i])
        return i

    for a, b, saddle in saddles:
        ra, rb = find(int(a)), find(int(b))
        if ra == rb:
            continue
        # the lower peak (ties: the later basin) is the one that may die here
        if (peaks[ra], -ra) < (peaks[rb], -rb):
            low, high = ra, rb
        else:
            low, high = rb, ra
        shallow = peaks[low] - saddle < contrast * peaks[low]
        close = np.hypot(*(positions[low] - positions[high])) < min_separation
        if shallow or close:
            root[low] = high
    return np.array([find(i) for i in range(peaks.size)], dtype=np.int64)


def peak_significance(
    transform: np.ndarray,
    error: np.ndarray,
    model: np.ndarray,
    region: np.ndarray,
    peak: tuple[int, int],
    wavelets: tuple[np.ndarray, ...],
) -> tuple[float, int]:
    """Wavelet significance of one component at its peak pixel, and the scale where it peaks.

    The component's own wavelet transform is added back to the residual transform of the
    state: ``sig_i = (T_i + conv(M_c, K_i)) / E_i`` at the peak pixel, with ``M_c`` the model on
    the component's pixels only. ``T_i`` is the transform of ``C - (M + B + A)`` and ``E_i``
    its Poisson error, so ``sig_i`` is the significance on scale ``i`` of the component against
    the background, the approximation and every other component. Returns the maximum over
    scales and its scale index (0 where ``E_i`` is 0).

    Parameters
    ----------
    transform, error : ndarray, shape (n_scale, ny, nx)
        ``T_i`` and ``E_i`` on the island's box.
    model : ndarray, shape (ny, nx)
        Model M on the same box.
    region : ndarray of bool, shape (ny, nx)
        The component's pixels.
    peak : (int, int)
        The (y, x) pixel the significance is evaluated at.
    wavelets : tuple of ndarray
        The run's wavelet kernels (square, odd sides, centred).
    """
    py, px = peak
    qy, qx = np.nonzero(region)
    weights = model[qy, qx]
    dy, dx = qy - py, qx - px
    sig = np.zeros(len(wavelets))
    for i, kernel in enumerate(wavelets):
        half = kernel.shape[0] // 2
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
        own = float(np.dot(weights[inside], kernel[half - dy[inside], half - dx[inside]]))
        e = error[i, py, px]
        sig[i] = (transform[i, py, px] + own) / e if e > 0 else 0.0
    best = int(np.argmax(sig))
    return float(sig[best]), best


def template_significance(
    counts: np.ndarray, background: np.ndarray, template: np.ndarray
) -> tuple[float, float]:
    """Poisson likelihood-ratio significance of a source of fixed shape over a known background.

    Maximises ``log L(a) = sum(C ln(b + a m) - (b + a m))`` over the amplitude ``a >= 0`` of the
    template ``m`` (Cash 1979), ``TS = 2 (log L(a*) - log L(0))`` and the significance is
    ``sqrt(TS)``; for a template constant over one pixel set this is Li & Ma (1983) eq. 17 with
    a perfectly known background. Pixels where both ``b`` and ``m`` are 0 are left out (no
    hypothesis predicts counts there). ``log L`` is concave in ``a``: safeguarded Newton steps
    inside a shrinking bracket find the maximum to relative precision 1e-10.

    Parameters
    ----------
    counts, background, template : ndarray, shape (n,)
        Observed counts C, background b >= 0 and source template m >= 0 per pixel.

    Returns
    -------
    significance : float
        ``sqrt(TS)`` (0 when the best amplitude is 0; ``inf`` when counts fall where only the
        source predicts any).
    amplitude : float
        The best amplitude ``a*``: ``a* * sum(m)`` is the fitted source counts.
    """
    use = (background > 0) | (template > 0)
    c, b, m = counts[use], background[use], template[use]
    total_m = float(m.sum())
    if total_m <= 0:
        return 0.0, 0.0
    if np.any((b <= 0) & (c > 0)):
        # counts where only the source predicts any: the background-only hypothesis is excluded
        return float("inf"), float(c.sum() / total_m)
    # pixels without counts add only -a * m to log L: the sums below run over the others
    hit = c > 0
    c, b, m = c[hit], b[hit], m[hit]
    cm = c * m

    def gradient(a: float) -> tuple[float, float]:
        ratio = cm / (b + a * m)
        return float(ratio.sum()) - total_m, -float((ratio * ratio / c).sum())

    g0, _ = gradient(0.0)
    if g0 <= 0:
        return 0.0, 0.0
    lo, hi = 0.0, float(c.sum()) / total_m + 1.0  # the gradient is negative at hi
    a = min(max((float(c.sum()) - float(b.sum())) / total_m, 0.0), hi) or 0.5 * hi
    for _ in range(200):
        g, h = gradient(a)
        if g > 0:
            lo = a
        else:
            hi = a
        step = a - g / h if h < 0 else 0.5 * (lo + hi)
        a_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(a_new - a) <= 1e-10 * max(a, 1e-300):
            a = a_new
            break
        a = a_new
    ts = 2.0 * (float(np.sum(c * np.log1p(a * m / b))) - a * total_m)
    return float(np.sqrt(max(ts, 0.0))), float(a)


class IslandSources(NamedTuple):
    """Deblended sources of one island, in the island cut-out's pixel frame.

    Every field but ``labels`` is an array with one entry per source; ``labels`` is the
    cut-out's source image: -1 outside the island or in dropped components, else the source's
    index.
    """

    x: np.ndarray
    y: np.ndarray
    x_var: np.ndarray
    y_var: np.ndarray
    peak_x: np.ndarray
    peak_y: np.ndarray
    peak_significance: np.ndarray
    peak_scale: np.ndarray
    moment_xx: np.ndarray
    moment_yy: np.ndarray
    moment_xy: np.ndarray
    npix: np.ndarray
    model_counts: np.ndarray
    source_counts: np.ndarray
    counts: np.ndarray
    background: np.ndarray
    significance: np.ndarray
    mean_exposure: np.ndarray
    labels: np.ndarray


_FIELDS_INT = ("peak_x", "peak_y", "peak_scale", "npix")


def _components(
    mask: np.ndarray, model: np.ndarray, *, deblend: bool, contrast: float, min_separation: float
) -> np.ndarray:
    """Component index per pixel (-1 outside the island), components ordered by peak height."""
    if not deblend:
        return np.where(mask, 0, -1)
    basins = ascent_basins(model, mask)
    roots = np.unique(basins[mask])
    peaks = model.ravel()[roots]
    order = np.lexsort((roots, -peaks))  # highest peak first, ties by pixel index
    roots, peaks = roots[order], peaks[order]
    index = np.full(model.size, -1, dtype=np.int64)
    index[roots] = np.arange(roots.size)
    labels = np.where(mask, index[np.maximum(basins, 0)], -1)
    if roots.size > 1:
        positions = np.column_stack(np.unravel_index(roots, model.shape)).astype(np.float64)
        saddles = basin_saddles(labels, model)
        leader = merge_basins(
            peaks, positions, saddles, contrast=contrast, min_separation=min_separation
        )
        # renumber components 0.. in order of their leading (highest) peak
        _, compact = np.unique(leader, return_inverse=True)
        labels = np.where(mask, compact[np.maximum(labels, 0)], -1)
    return labels


def _position_variance(
    amplitude: float,
    template: np.ndarray,
    background: np.ndarray,
    grad_x: np.ndarray,
    grad_y: np.ndarray,
) -> tuple[float, float]:
    """Cramér-Rao variance (pixel²) of the x and y position of a source ``amplitude * template``
    over ``background``: ``1 / sum((a dm/dx)^2 / (b + a m))`` (Poisson Fisher information)."""
    rate = background + amplitude * template
    out = []
    for grad in (grad_x, grad_y):
        g2 = (amplitude * grad) ** 2
        info = float(np.sum(np.divide(g2, rate, out=np.zeros_like(rate), where=rate > 0)))
        out.append(1.0 / info if info > 0 else np.inf)
    return out[0], out[1]


#: Half-width of the point-source likelihood window, in PSF sigmas.
PSF_WINDOW = 4.0


def _model_likelihood(
    counts: np.ndarray,
    null: np.ndarray,
    template: np.ndarray,
    grad_x: np.ndarray,
    grad_y: np.ndarray,
) -> tuple[float, float, float, float]:
    """Significance, fitted counts and Cramér-Rao position variances (x, y) of a source with
    the shape ``template`` (the region's pixels, flattened; ``grad_*`` are the gradients of the
    whole model there: the region's edge is not an edge of the source)."""
    sig, amplitude = template_significance(counts, null, template)
    x_var, y_var = _position_variance(amplitude, template, null, grad_x, grad_y)
    return sig, amplitude * float(template.sum()), x_var, y_var


def _point_likelihood(
    counts: np.ndarray,
    null: np.ndarray,
    positive: np.ndarray,
    labels: np.ndarray,
    component: int,
    centre: tuple[float, float],
    psf_sigma: float,
) -> tuple[float, float, float, float]:
    """As `_model_likelihood` for a point source: a unit-integral Gaussian of ``psf_sigma`` at
    ``centre`` (x, y) over a window of `PSF_WINDOW` sigmas of the cut-out, with the model of
    every other source (``positive`` outside ``labels == component``) added to the null."""
    cx, cy = centre
    ny, nx = counts.shape
    half = PSF_WINDOW * psf_sigma
    y0, y1 = max(0, math.floor(cy - half)), min(ny, math.ceil(cy + half) + 1)
    x0, x1 = max(0, math.floor(cx - half)), min(nx, math.ceil(cx + half) + 1)
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    s2 = psf_sigma * psf_sigma
    template = np.exp(-(dx * dx + dy * dy) / (2 * s2)) / (2 * math.pi * s2)
    box = (slice(y0, y1), slice(x0, x1))
    b = null[box] + np.where(labels[box] == component, 0.0, positive[box])
    sig, amplitude = template_significance(counts[box].ravel(), b.ravel(), template.ravel())
    grad_x = -template * dx / s2 * np.ones_like(dy)
    grad_y = -template * dy / s2 * np.ones_like(dx)
    x_var, y_var = _position_variance(
        amplitude, template.ravel(), b.ravel(), grad_x.ravel(), grad_y.ravel()
    )
    return sig, amplitude, x_var, y_var


def island_sources(
    mask: np.ndarray,
    model: np.ndarray,
    transform: np.ndarray,
    error: np.ndarray,
    counts: np.ndarray,
    background: np.ndarray,
    approx: np.ndarray,
    exposure: np.ndarray | None,
    wavelets: tuple[np.ndarray, ...],
    *,
    min_significance: float,
    deblend: bool,
    contrast: float,
    min_separation: float,
    approx_in_null: bool = False,
    psf_sigma: float | None = None,
) -> IslandSources:
    """Deblend one island and measure its sources.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
        The island's pixels in its cut-out (its bounding box, with a margin for the
        point-source likelihood window when ``psf_sigma`` is given).
    model, counts, background, approx : ndarray, shape (ny, nx)
        M, C, B and A of the state on the cut-out.
    transform, error : ndarray, shape (n_scale, ny, nx)
        T_i and E_i of the state on the cut-out.
    exposure : ndarray, shape (ny, nx), or None
        Exposure (cm2 s) on the cut-out.
    wavelets : tuple of ndarray
        The run's wavelet kernels.
    min_significance : float
        Sources whose likelihood significance is below this are dropped.
    deblend : bool
        Split the island into components (else one source per island).
    contrast, min_separation : float
        Deblending settings (see `merge_basins`).
    approx_in_null : bool
        The background of the likelihood test is ``max(B + A, 0)`` instead of ``B``.
    psf_sigma : float, optional
        Gaussian PSF sigma (pixels): test a point source at the centroid (see
        `_source_likelihood`) instead of the source's model shape.

    Returns
    -------
    IslandSources
        Per source (ordered by peak model value, highest first): model-weighted centroid
        ``x``, ``y`` and its Cramér-Rao variance (pixel², see `cwtflow.catalog`), peak pixel,
        peak significance and its scale index, model second moments (pixel²), pixel count, model
        counts, fitted source counts and likelihood significance, observed counts and
        null-hypothesis background summed over the region, and the model-weighted mean exposure
        (NaN without exposure).
    """
    labels = _components(
        mask, model, deblend=deblend, contrast=contrast, min_separation=min_separation
    )
    rows: dict[str, list] = {name: [] for name in IslandSources._fields if name != "labels"}
    keep_labels = np.full(labels.shape, -1, dtype=np.int64)
    positive = np.maximum(model, 0.0)
    null = np.maximum(background + approx, 0.0) if approx_in_null else np.maximum(background, 0.0)
    if psf_sigma is None:
        # gradients of the whole model: the region's edge is not an edge of the source
        if min(model.shape) > 1:
            grad_y, grad_x = np.gradient(positive)
        else:
            grad_y = grad_x = np.zeros_like(positive)
    # each component is handled on its own bounding box
    for c, box in enumerate(ndimage.find_objects(labels + 1)):
        region = labels[box] == c
        oy, ox = box[0].start, box[1].start
        sub_model = model[box]
        peak = np.unravel_index(int(np.argmax(np.where(region, sub_model, -np.inf))), region.shape)
        qy, qx = np.nonzero(region)
        weight = positive[box][region]
        total = float(weight.sum())
        if total > 0:
            cx = float((weight * qx).sum() / total)
            cy = float((weight * qy).sum() / total)
            dx, dy = qx - cx, qy - cy
            mxx = float((weight * dx * dx).sum() / total)
            myy = float((weight * dy * dy).sum() / total)
            mxy = float((weight * dx * dy).sum() / total)
        else:
            cx, cy = float(peak[1]), float(peak[0])
            mxx = myy = mxy = 0.0
        cx, cy = cx + ox, cy + oy
        if psf_sigma is None:
            significance, source_counts, x_var, y_var = _model_likelihood(
                counts[box][region],
                null[box][region],
                weight,
                grad_x[box][region],
                grad_y[box][region],
            )
        else:
            significance, source_counts, x_var, y_var = _point_likelihood(
                counts, null, positive, labels, c, (cx, cy), psf_sigma
            )
        if not significance >= min_significance:
            continue
        sig, scale = peak_significance(
            transform[(slice(None), *box)],
            error[(slice(None), *box)],
            sub_model,
            region,
            peak,
            wavelets,
        )
        if exposure is not None and total > 0:
            mean_exposure = float((weight * exposure[box][region]).sum() / total)
        else:
            mean_exposure = np.nan
        keep_labels[box][region] = len(rows["x"])
        values = {
            "x": cx,
            "y": cy,
            "x_var": x_var,
            "y_var": y_var,
            "peak_x": int(peak[1]) + ox,
            "peak_y": int(peak[0]) + oy,
            "peak_significance": sig,
            "peak_scale": scale,
            "moment_xx": mxx,
            "moment_yy": myy,
            "moment_xy": mxy,
            "npix": int(qy.size),
            "model_counts": float(sub_model[region].sum()),
            "source_counts": source_counts,
            "counts": float(counts[box][region].sum()),
            "background": float(null[box][region].sum()),
            "significance": significance,
            "mean_exposure": mean_exposure,
        }
        for name, value in values.items():
            rows[name].append(value)
    arrays = {
        name: np.asarray(v, dtype=np.int64 if name in _FIELDS_INT else np.float64)
        for name, v in rows.items()
    }
    return IslandSources(**arrays, labels=keep_labels)
