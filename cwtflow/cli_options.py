"""Options of the ``cwtflow`` commands and the builders that turn them into API calls.

A new option means one decorator entry here and one line in a builder (`build_cwt`,
`load_maps`, `analyze_kwargs`, `write_result`). Defaults are read from the API's signatures
(`CWT`, `cwtflow.find_sources`) so that the command line cannot drift from the API.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import astropy.units as u
import click
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.wcs.utils import wcs_to_celestial_frame

from .catalog import find_sources
from .engine import CWT
from .errors import InputError, StoreError
from .formats import result_format
from .io import check_output, read_maps, write_state
from .kernels import CWTKernels
from .maps import cutout, map_center, wcs_from_attrs

__all__ = [
    "CATALOG_DEFAULTS",
    "CWT_DEFAULTS",
    "analyze_kwargs",
    "build_cwt",
    "check_result",
    "cwt_options",
    "load_maps",
    "map_options",
    "output_options",
    "parse_angle",
    "parse_psf",
    "psf_cwt",
    "write_result",
]

#: Kernel defaults: the CWT tutorial's (CWTKernels itself has none).
KERNEL_DEFAULTS = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}


def _defaults(func: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: param.default
        for name, param in inspect.signature(func).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


#: Estimator defaults, read from `CWT` so the CLI cannot drift from the API.
CWT_DEFAULTS = _defaults(CWT.__init__)
#: Catalog defaults, read from `find_sources` alike.
CATALOG_DEFAULTS = _defaults(find_sources)
_WRAP = {"auto": None, "yes": True, "no": False}


def _apply(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


cwt_options = _apply(
    [
        click.option(
            "--n-scale",
            type=click.IntRange(min=1),
            default=KERNEL_DEFAULTS["n_scale"],
            show_default=True,
            help="Number of wavelet scales.",
        ),
        click.option(
            "--min-scale",
            type=click.FloatRange(min=0, min_open=True),
            default=KERNEL_DEFAULTS["min_scale"],
            show_default=True,
            help="Smallest scale (pixels).",
        ),
        click.option(
            "--step-scale",
            type=click.FloatRange(min=1, min_open=True),
            default=KERNEL_DEFAULTS["step_scale"],
            show_default=True,
            help="Ratio between successive scales.",
        ),
        click.option(
            "--max-iter",
            type=click.IntRange(min=1),
            default=CWT_DEFAULTS["max_iter"],
            show_default=True,
            help="Maximum number of iterations.",
        ),
        click.option(
            "--tol",
            type=click.FloatRange(min=0),
            default=CWT_DEFAULTS["tol"],
            show_default=True,
            help="Stop when the residual variance changes by less than this (relative).",
        ),
        click.option(
            "--threshold",
            type=float,
            default=CWT_DEFAULTS["significance_threshold"],
            show_default=True,
            help="Significance threshold of the support.",
        ),
        click.option(
            "--island-threshold",
            type=float,
            default=CWT_DEFAULTS["significance_island_threshold"],
            help="Drop support components whose peak significance is below this.",
        ),
        click.option(
            "--remove-isolated/--keep-isolated",
            default=CWT_DEFAULTS["remove_isolated"],
            show_default=True,
            help="Drop one-pixel support components.",
        ),
        click.option(
            "--wrap-lon",
            type=click.Choice(list(_WRAP)),
            default="auto",
            show_default=True,
            help="Periodic longitude (auto: for CAR maps spanning 360 deg).",
        ),
        click.option(
            "--fft-workers",
            type=click.IntRange(min=1),
            default=CWT_DEFAULTS["fft_workers"],
            show_default=True,
            help="Threads per FFT.",
        ),
    ]
)

map_options = _apply(
    [
        click.option("--counts-hdu", default="COUNTS", show_default=True, help="Counts HDU."),
        click.option(
            "--background-hdu", default="BACKGROUND", show_default=True, help="Background HDU."
        ),
        click.option(
            "--exposure-hdu",
            default=None,
            help="Exposure HDU (default: EXPOSURE when the file has one).",
        ),
        click.option(
            "--center",
            nargs=2,
            type=float,
            default=None,
            metavar="LON LAT",
            help="Cutout centre (deg, in the map's frame); default: the map centre.",
        ),
        click.option(
            "--width",
            nargs=2,
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="LON LAT",
            help="Cut out this many degrees in longitude and latitude before the run.",
        ),
    ]
)

output_options = _apply(
    [
        click.option("--overwrite", is_flag=True, help="Replace existing output files."),
        click.option(
            "--quiet", "-q", is_flag=True, help="No per-iteration log lines or progress bar."
        ),
    ]
)


def build_cwt(options: Mapping[str, Any]) -> CWT:
    """The estimator described by the CWT options."""
    kernels = CWTKernels(options["n_scale"], options["min_scale"], options["step_scale"])
    return CWT(
        kernels,
        max_iter=options["max_iter"],
        tol=options["tol"],
        significance_threshold=options["threshold"],
        significance_island_threshold=options["island_threshold"],
        remove_isolated=options["remove_isolated"],
        wrap_lon=_WRAP[options["wrap_lon"]],
        fft_workers=options["fft_workers"],
    )


def analyze_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `CWT.analyze` other than ``data`` and ``callback``: tiles
    (``--chunks``) and the zarr history store (``--out run.zarr``, ``--resume``)."""
    kwargs: dict[str, Any] = {}
    if options.get("chunks") is not None:
        kwargs["chunks"] = tuple(options["chunks"])
    if options.get("store") is not None:
        resume = bool(options.get("resume"))
        overwrite = bool(options.get("overwrite")) and not resume
        kwargs.update(store=options["store"], resume=resume, overwrite=overwrite)
    return kwargs


def _hdu_key(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def load_maps(path: Path, options: Mapping[str, Any]) -> xr.Dataset:
    """Read the input maps and apply the optional cutout."""
    if options["center"] is not None and options["width"] is None:
        raise click.UsageError("--center needs --width")
    data = read_maps(
        path,
        counts_hdu=_hdu_key(options["counts_hdu"]),
        background_hdu=_hdu_key(options["background_hdu"]),
        exposure_hdu=_hdu_key(options["exposure_hdu"]),
        check_values=False,  # CWT.analyze checks the pixels it runs on
    )
    if options["width"] is None:
        return data
    if options["center"] is None:
        position = map_center(data)
    else:
        frame = wcs_to_celestial_frame(wcs_from_attrs(data.attrs))
        lon, lat = options["center"]
        position = SkyCoord(lon * u.deg, lat * u.deg, frame=frame)
    return cutout(data, position, options["width"] * u.deg)


def check_result(path: Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Refuse an output the run could not write, before any work starts."""
    if result_format(path) == "zarr":
        path = path.expanduser()
        if not path.parent.is_dir():
            raise StoreError(f"output folder does not exist: {path.parent}")
        if path.exists() and not (path.is_dir() and (overwrite or resume)):
            raise StoreError(
                f"output store exists: {path} (use --resume to continue it or --overwrite to "
                "replace it)"
            )
        return path
    if resume:
        raise click.UsageError("--resume needs a zarr store output (--out run.zarr)")
    return check_output(path, overwrite=overwrite, hint="--overwrite")


def write_result(state: xr.Dataset, path: Path, *, overwrite: bool) -> Path:
    """Write the final state to ``path`` in the format its suffix names (a zarr store already
    holds it: `CWT.analyze` wrote every iteration there)."""
    if result_format(path) == "zarr":
        return path
    return write_state(state, path, overwrite=overwrite)


# --- the PSF (``run --psf``, ``catalog --psf``; the rule: docs/psf_rule.md) -------------------


def parse_angle(text: str, name: str) -> u.Quantity:
    """An angle written with its unit (``0.15deg``, ``9arcmin``); a bare number is refused."""
    from .psf import as_angle

    try:
        value = u.Quantity(text)
    except (TypeError, ValueError):
        raise InputError(f"{name}: cannot read {text!r} as an angle, e.g. 0.15deg") from None
    return as_angle(value, name, example="0.15deg")


def parse_psf(text: str) -> Any:
    """``--psf``: a Gaussian sigma (``0.15deg``) or a 68 % containment radius (``r68=0.23deg``)."""
    from .psf import PSF

    if text.strip().lower().startswith("r68="):
        return PSF.from_r68(parse_angle(text.split("=", 1)[1], "--psf r68"))
    return PSF.gaussian(parse_angle(text, "--psf"))


def psf_cwt(psf: Any, data: xr.Dataset, options: Mapping[str, Any]) -> CWT:
    """The estimator of `build_cwt` with the kernels the PSF rule gives for ``data``'s pixels,
    recording the PSF in the run's parameters."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    pixel = float(np.mean(proj_plane_pixel_scales(wcs_from_attrs(data.attrs).celestial)))
    kernels = CWTKernels.from_psf(psf, pixel * u.deg)
    return CWT(
        kernels,
        max_iter=options["max_iter"],
        tol=options["tol"],
        significance_threshold=options["threshold"],
        significance_island_threshold=options["island_threshold"],
        remove_isolated=options["remove_isolated"],
        wrap_lon=_WRAP[options["wrap_lon"]],
        fft_workers=options["fft_workers"],
        psf=psf,
    )
