"""Wavelet and approximation kernels of the CWT filter (pure numpy)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.table import Table

from .checks import integer, number
from .defaults import MAX_N_SCALE, MIN_SCALE
from .errors import InputError, ResourceError

__all__ = [
    "MAX_KERNEL_BYTES",
    "MAX_KERNEL_SIDE",
    "MAX_N_SCALE",
    "MIN_SCALE",
    "CWTKernels",
    "gaussian_kernel",
    "kernel_size",
    "ricker_kernel",
]

#: Largest side (pixels) of any kernel: the approximation kernel and the largest wavelet both
#: have width ``w = min_scale * step_scale**n_scale`` and side ``kernel_size(w)``, odd
#: ``ceil(8 w)``, so this bounds ``w <= 512.125`` px (51 deg on 0.1 deg pixels, far beyond
#: any source). One such kernel is 134 MB of float64 built in ~0.5 s, each of its spectra on
#: an FFT grid at least as large twice that; at 8193 px a kernel takes 537 MB and ~10 s to
#: build before any check of the map could refuse it.
MAX_KERNEL_SIDE = 4097
#: Largest total size (bytes) of the kernel arrays (wavelets and approximation): 1 GiB, room
#: for two kernels of the largest side plus a geometric series of smaller ones down to
#: step_scale ~1.1.
MAX_KERNEL_BYTES = 1024**3


def kernel_size(width: float) -> int:
    """Side of the square grid a kernel of ``width`` is sampled on: ``ceil(8 * width)``, odd."""
    n = math.ceil(8 * width)
    return n + 1 if n % 2 == 0 else n


def _radius2(width: float) -> np.ndarray:
    half = kernel_size(width) // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2


def ricker_kernel(width: float) -> np.ndarray:
    """2-D Ricker ("Mexican hat") wavelet of ``width`` pixels, analytic normalisation.

    ``K(r) = 1 / (pi w^4) * (1 - r^2 / (2 w^2)) * exp(-r^2 / (2 w^2))`` sampled at integer
    offsets on a ``kernel_size(width)`` square grid; not re-normalised.
    """
    r2 = _radius2(width)
    w2 = width * width
    return (1.0 - r2 / (2.0 * w2)) * np.exp(-r2 / (2.0 * w2)) / (math.pi * w2 * w2)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """2-D Gaussian of ``sigma`` pixels, analytic normalisation (discrete sum slightly below 1)."""
    r2 = _radius2(sigma)
    s2 = sigma * sigma
    return np.exp(-r2 / (2.0 * s2)) / (2.0 * math.pi * s2)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _check_size(n_scale: int, min_scale: float, step_scale: float) -> None:
    """Refuse kernels beyond `MAX_KERNEL_SIDE` or `MAX_KERNEL_BYTES`, before building them."""
    # log space: step_scale**n_scale may overflow a float
    log_width = math.log(min_scale) + n_scale * math.log(step_scale)
    if log_width > math.log(MAX_KERNEL_SIDE / 8):
        raise ResourceError(
            f"kernels too large: the largest kernel (width min_scale * step_scale**n_scale = "
            f"{math.exp(min(log_width, 700.0)):.4g} px) would be more than {MAX_KERNEL_SIDE} "
            "pixels wide; lower n_scale, min_scale or step_scale"
        )
    widths = [min_scale * step_scale ** (i + 1) for i in range(n_scale)]
    sides = [kernel_size(w) for w in (*widths, widths[-1])]
    total = 8 * sum(side * side for side in sides)
    if total > MAX_KERNEL_BYTES:
        raise ResourceError(
            f"kernels too large: their arrays would take {total / 1024**3:.3g} GiB (limit "
            f"{MAX_KERNEL_BYTES / 1024**3:g} GiB); lower n_scale or min_scale, or raise step_scale"
        )


@dataclass(frozen=True)
class CWTKernels:
    """The kernels of a CWT run: one Ricker wavelet per scale and one Gaussian approximation.

    Parameters
    ----------
    n_scale : int
        Number of wavelet scales, 1 to `MAX_N_SCALE` (100).
    min_scale : float
        Smallest scale in pixels, at least `MIN_SCALE` (0.5 px: finer kernels are
        under-sampled).
    step_scale : float
        Ratio between successive scales (> 1).

    Raises
    ------
    ParameterError
        A parameter of the wrong type or outside the ranges above.
    ResourceError
        The largest kernel, of width ``min_scale * step_scale**n_scale``, would exceed
        `MAX_KERNEL_SIDE` (4097) pixels, or the kernels together `MAX_KERNEL_BYTES` (1 GiB).
        Both are checked before any array is built.

    Attributes
    ----------
    scales : ndarray, shape (n_scale,)
        ``min_scale * step_scale**i`` in pixels.
    wavelets : tuple of ndarray
        Wavelet kernel of each scale, width ``scales[i] * step_scale``; square, odd side.
    approx : ndarray
        Gaussian approximation kernel of sigma ``min_scale * step_scale**n_scale``.
    halo : int
        Half side of the largest kernel: the overlap (pixels) a tile needs on each side to
        reproduce the whole-map convolution exactly.
    """

    n_scale: int
    min_scale: float
    step_scale: float
    scales: np.ndarray = field(init=False, repr=False, compare=False)
    wavelets: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)
    approx: np.ndarray = field(init=False, repr=False, compare=False)
    halo: int = field(init=False, repr=False, compare=False)

    def __new__(cls, *args: Any, **kwargs: Any) -> CWTKernels:
        # scales are pixels: an angle here is a mistake that deserves a clear message
        for value in (*args, *kwargs.values()):
            if hasattr(value, "unit") and hasattr(value, "to_value"):
                raise InputError(
                    f"CWTKernels takes scales in pixels, got {value!r}; for angles use "
                    "CWTKernels.from_psf(psf, pixel_size), e.g. "
                    "CWTKernels.from_psf(0.15 * u.deg, 0.1 * u.deg)"
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        n_scale = integer("n_scale", self.n_scale, low=1, high=MAX_N_SCALE)
        min_scale = number("min_scale", self.min_scale, low=MIN_SCALE)
        step_scale = number("step_scale", self.step_scale, low=1.0, low_open=True)
        _check_size(n_scale, min_scale, step_scale)
        object.__setattr__(self, "n_scale", n_scale)
        object.__setattr__(self, "min_scale", min_scale)
        object.__setattr__(self, "step_scale", step_scale)
        scales = self.min_scale * self.step_scale ** np.arange(self.n_scale, dtype=np.float64)
        wavelets = tuple(_frozen(ricker_kernel(s * self.step_scale)) for s in scales)
        approx = _frozen(gaussian_kernel(self.approx_sigma))
        object.__setattr__(self, "scales", _frozen(scales))
        object.__setattr__(self, "wavelets", wavelets)
        object.__setattr__(self, "approx", approx)
        sizes = [k.shape[0] for k in (*wavelets, approx)]
        object.__setattr__(self, "halo", max(sizes) // 2)

    @property
    def approx_sigma(self) -> float:
        """Sigma (pixels) of the approximation kernel: one step beyond the largest scale."""
        return self.min_scale * self.step_scale**self.n_scale

    @property
    def size(self) -> int:
        """Side (pixels) of the largest kernel, ``2 * halo + 1``."""
        return 2 * self.halo + 1

    def info_table(self) -> Table:
        """Kernel summary as a table with columns ``Name`` / ``Source`` (7 + 3 * n_scale rows)."""
        rows: list[tuple[str, str]] = [
            ("Number of scales", str(self.n_scale)),
            ("Minimal scale", str(self.min_scale)),
            ("Step scale", str(self.step_scale)),
            ("Scales", " ".join(repr(float(s)) for s in self.scales)),
            ("Approx kernel width", str(self.approx.shape[0])),
            ("Approx kernel sum", str(self.approx.sum())),
            ("Approx kernel max", str(self.approx.max())),
        ]
        for i, kernel in enumerate(self.wavelets):
            rows += [
                (f"Kernel {i} width", str(kernel.shape[0])),
                (f"Kernel {i} sum", str(kernel.sum())),
                (f"Kernel {i} max", str(kernel.max())),
            ]
        return Table(rows=rows, names=("Name", "Source"), dtype=(str, str))

    def to_dict(self) -> dict[str, float | int]:
        """The three defining parameters, JSON-ready."""
        return {"n_scale": self.n_scale, "min_scale": self.min_scale, "step_scale": self.step_scale}

    @classmethod
    def from_psf(cls, psf: Any, pixel_size: Any) -> CWTKernels:
        """The kernels the PSF rule gives (``docs/psf_rule.md``; `cwtflow.psf.psf_settings`).

        Parameters
        ----------
        psf : astropy Quantity or cwtflow.psf.PSF
            The PSF: a Gaussian sigma as an angle (``0.15 * u.deg``), or a `cwtflow.psf.PSF`
            (from a sigma, a 68 % containment radius or a radial profile).
        pixel_size : astropy Quantity
            The map's pixel size (an angle). The kernels' scales stay in pixels.
        """
        from .psf import psf_settings

        settings = psf_settings(psf, pixel_size)
        return cls(settings["n_scale"], settings["min_scale"], settings["step_scale"])

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> CWTKernels:
        """The kernels of ``params`` (`to_dict`'s keys; other keys, such as the rest of a run's
        parameters, are ignored). A missing key raises `InputError`."""
        try:
            return cls(params["n_scale"], params["min_scale"], params["step_scale"])
        except (KeyError, TypeError) as exc:  # not a mapping, or a key missing
            raise InputError(f"kernel parameters incomplete or malformed: {exc!r}") from None
