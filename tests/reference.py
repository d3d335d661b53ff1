"""Brute-force implementation of the CWT specification, used only by the tests.

Written from the specification (``docs/algorithm.md``) without looking at how cwtflow does it,
and as plainly as possible: kernels straight from the formulas, convolutions by direct spatial
summation (``scipy.ndimage.convolve``, no FFT anywhere), support cleaning with a Python loop that
scans the whole image once per component, and a plain loop for the iteration and its history.

Where the specification leaves a choice to cwtflow it is defined here as follows:

- ``E_i == 0`` (or a negative ``conv(total, K_i**2)``, which makes the reference's square root
  NaN): the error is 0 and the pixel is not significant; significance is 0 there.
- A residual variance that was 0 and stays 0 counts as converged (ratio 0); one that was 0 and
  is no longer 0 gives an infinite ratio (not converged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, signal

STATE_VARS = (
    "counts",
    "background",
    "model",
    "approx",
    "approx_bkg",
    "transform_2d",
    "transform_3d",
    "error",
    "support",
)


# --- kernels ------------------------------------------------------------------------------


def grid_size(width: float) -> int:
    """``ceil(8 * width)``, plus one when that is even."""
    n = math.ceil(8 * width)
    if n % 2 == 0:
        n += 1
    return n


def _r2(width: float) -> np.ndarray:
    n = grid_size(width)
    r2 = np.empty((n, n))
    c = n // 2
    for i in range(n):
        for j in range(n):
            r2[i, j] = float((i - c) ** 2 + (j - c) ** 2)
    return r2


def ricker(width: float) -> np.ndarray:
    """``1/(pi w^4) * (1 - r^2/(2 w^2)) * exp(-r^2/(2 w^2))`` on its odd grid."""
    r2 = _r2(width)
    return 1 / (math.pi * width**4) * (1 - r2 / (2 * width**2)) * np.exp(-r2 / (2 * width**2))


def gaussian(sigma: float) -> np.ndarray:
    """``1/(2 pi s^2) * exp(-r^2/(2 s^2))`` on its odd grid (not re-normalised)."""
    r2 = _r2(sigma)
    return 1 / (2 * math.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))


@dataclass
class Kernels:
    n_scale: int
    min_scale: float
    step_scale: float
    scales: list[float] = field(init=False)
    wavelets: list[np.ndarray] = field(init=False)
    approx: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scales = [self.min_scale * self.step_scale**i for i in range(self.n_scale)]
        self.wavelets = [ricker(s * self.step_scale) for s in self.scales]
        self.approx = gaussian(self.min_scale * self.step_scale**self.n_scale)


# --- convolution --------------------------------------------------------------------------


def conv(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """ "same"-size linear convolution with zeros outside the image, by direct summation.

    ``convolve2d(mode="same")`` keeps the centre of the full convolution, i.e. centres an odd
    kernel on the output pixel, as ``fftconvolve(mode="same")`` does. (``ndimage.convolve`` is
    not used: it silently drops kernel weights below DBL_EPSILON, and the squared wavelets of
    large scales are far below that, which costs ~1e-7 relative accuracy.)
    """
    image = np.asarray(image, dtype=np.float64)
    return signal.convolve2d(image, kernel, mode="same", boundary="fill", fillvalue=0.0)


def conv_wrap_x(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Like `conv` but periodic along x (axis 1): explicit wrap padding, then crop."""
    half = kernel.shape[1] // 2
    padded = np.pad(np.asarray(image, dtype=np.float64), ((0, 0), (half, half)), mode="wrap")
    return conv(padded, kernel)[:, half : half + image.shape[1]]


# --- one iteration ------------------------------------------------------------------------


def significance(transform: np.ndarray, error_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error and significance, pixel by pixel; E == 0 (or E**2 < 0) is not significant."""
    error = np.zeros_like(error_sq)
    sig = np.zeros_like(transform)
    for idx in np.ndindex(error_sq.shape):
        if error_sq[idx] > 0:
            error[idx] = math.sqrt(error_sq[idx])
            sig[idx] = transform[idx] / error[idx]
    return error, sig


def clean(
    sig: np.ndarray,
    threshold: float,
    *,
    remove_isolated: bool,
    island_threshold: float | None,
    valid: np.ndarray | None = None,
    wrap_x: bool = False,
) -> np.ndarray:
    """Thresholded mask of one scale, cleaned component by component (one image scan each).

    ``valid`` marks pixels that may be significant at all (``E > 0``). With ``wrap_x`` the
    components join across the x seam (first and last columns are neighbours).
    """
    mask = sig > threshold
    if valid is not None:
        mask &= valid
    labels, n = ndimage.label(mask)  # default structure: 4-connectivity
    if wrap_x and n:
        labels = _merge_seam(labels)
    out = np.zeros_like(mask)
    for lab in np.unique(labels):
        if lab == 0:
            continue
        component = labels == lab  # the whole-image scan the reference does per component
        if remove_isolated and component.sum() == 1:
            continue
        if island_threshold is not None and sig[component].max() < island_threshold:
            continue
        out |= component
    return out


def _merge_seam(labels: np.ndarray) -> np.ndarray:
    """Relabel so that components touching across the x seam share a label (union by loop)."""
    labels = labels.copy()
    changed = True
    while changed:
        changed = False
        for row in range(labels.shape[0]):
            a, b = labels[row, 0], labels[row, -1]
            if a and b and a != b:
                labels[labels == max(a, b)] = min(a, b)
                changed = True
    return labels


def initial_state(counts: np.ndarray, background: np.ndarray, n_scale: int) -> dict:
    counts = np.asarray(counts, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    zeros = np.zeros_like(counts)
    cube = np.zeros((n_scale, *counts.shape))
    return {
        "counts": counts.copy(),
        "background": background.copy(),
        "model": zeros.copy(),
        "approx": zeros.copy(),
        "approx_bkg": zeros.copy(),
        "transform_2d": zeros.copy(),
        "transform_3d": cube.copy(),
        "error": cube.copy(),
        "support": np.zeros(cube.shape, dtype=bool),
    }


def iterate(state: dict, kernels: Kernels, params: dict, *, wrap_x: bool = False) -> dict:
    """The state after one more iteration (spec steps 1-6)."""
    convolve = conv_wrap_x if wrap_x else conv
    counts, background = state["counts"], state["background"]
    model, approx = state["model"], state["approx"]
    total = model + background + approx
    excess = counts - total
    transform = np.stack([convolve(excess, k) for k in kernels.wavelets])
    error_sq = np.stack([convolve(total, k**2) for k in kernels.wavelets])
    new_approx = convolve(counts - model - background, kernels.approx)
    approx_bkg = convolve(background, kernels.approx)
    error, sig = significance(transform, error_sq)
    support = state["support"].copy()
    for i in range(kernels.n_scale):
        support[i] |= clean(
            sig[i],
            params["threshold"],
            remove_isolated=params["remove_isolated"],
            island_threshold=params["island_threshold"],
            valid=error[i] > 0,
            wrap_x=wrap_x,
        )
    transform_2d = np.zeros_like(model)
    for i in range(kernels.n_scale):
        transform_2d += support[i] * transform[i]
    new_model = model + np.maximum(transform_2d, 0)
    return {
        "counts": counts,
        "background": background,
        "model": new_model,
        "approx": new_approx,
        "approx_bkg": approx_bkg,
        "transform_2d": transform_2d,
        "transform_3d": transform,
        "error": error,
        "support": support,
    }


# --- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    state: dict
    history: list[dict]
    variances: list[float]
    converged: bool

    @property
    def iterations(self) -> int:
        return len(self.variances)


def run(
    counts: np.ndarray,
    background: np.ndarray,
    *,
    n_scale: int,
    min_scale: float,
    step_scale: float,
    max_iter: int = 10,
    tol: float = 1e-5,
    threshold: float = 3.0,
    island_threshold: float | None = None,
    remove_isolated: bool = True,
    wrap_x: bool = False,
) -> Run:
    """Run the iteration until the stopping rule; the history is always kept."""
    kernels = Kernels(n_scale, min_scale, step_scale)
    params = {
        "threshold": threshold,
        "island_threshold": island_threshold,
        "remove_isolated": remove_isolated,
    }
    state = initial_state(counts, background, n_scale)
    history = [state]
    variances: list[float] = []
    converged = False
    for k in range(max_iter):
        state = iterate(state, kernels, params, wrap_x=wrap_x)
        history.append(state)
        residual = state["counts"] - (state["model"] + state["approx"])
        v = float(np.mean((residual - residual.mean()) ** 2))
        if k > 0:
            v_prev = variances[-1]
            if v_prev == 0:
                ratio = 0.0 if v == 0 else math.inf
            else:
                ratio = abs(v_prev - v) / v_prev
            converged = ratio < tol
        variances.append(v)
        if converged:
            break
    return Run(state, history, variances, converged)


# --- comparison ---------------------------------------------------------------------------


def assert_state_matches(actual, expected: dict, *, rtol: float = 1e-10, label: str = "") -> None:
    """``actual`` (a cwtflow state Dataset) equals the brute-force ``expected`` state.

    Support must be identical; every other variable must agree to ``rtol`` times its largest
    absolute value, and be finite. The error ``E = sqrt(conv(total, K**2))`` is compared through
    its square, the convolution itself: the square root turns an absolute rounding difference
    ``d`` of a near-zero variance into a difference ``sqrt(d)`` of E (about 1e-8 of max E in
    zero-background regions, with any correct FFT), which says nothing about fidelity.
    """
    for name in STATE_VARS:
        a = np.asarray(actual[name].values)
        e = np.asarray(expected[name])
        where = f"{label}{name}"
        assert a.shape == e.shape, f"{where}: shape {a.shape} != {e.shape}"
        if name == "support":
            assert a.dtype == bool, f"{where}: dtype {a.dtype}"
            n_diff = int((a != e).sum())
            assert n_diff == 0, f"{where}: {n_diff} pixels differ"
            continue
        assert np.isfinite(a).all(), f"{where}: NaN or inf"
        if name == "error":
            a, e = a * a, e * e
        scale = float(np.abs(e).max())
        diff = float(np.abs(a - e).max())
        assert diff <= rtol * scale, f"{where}: max |diff| {diff:.3g} > {rtol:g} * {scale:.3g}"
