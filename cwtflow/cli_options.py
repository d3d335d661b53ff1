"""Options of the ``cwtflow`` commands and the builders that turn them into API calls.

A new option means one decorator entry here and one line in a builder (`build_cwt`,
`load_maps`, `analyze_kwargs`, `write_result`). Defaults come from `cwtflow.defaults`, the
values `CWT` itself takes (and that `find_sources` is tested against), so that the command
line cannot drift from the API. Heavy modules (numpy, dask, xarray, astropy, the engine) are
imported by the builders, not here: ``cwtflow --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .defaults import CATALOG_DEFAULTS, CWT_DEFAULTS, KERNEL_DEFAULTS
from .errors import StoreError
from .formats import result_format

if TYPE_CHECKING:
    import xarray as xr

    from .engine import CWT

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
    "source_kwargs",
    "source_options",
    "write_result",
]

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

#: Where the maps are (HDUs, other files); `cwtflow run` and `cwtflow convert` share them.
source_options = _apply(
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
            "--background",
            "background_file",
            default=None,
            metavar="FILE[HDU]",
            help="Read the background from this FITS file instead, e.g. bkg.fits[BACKGROUND] "
            "(without [HDU]: its BACKGROUND HDU, else its only image).",
        ),
        click.option(
            "--exposure",
            "exposure_file",
            default=None,
            metavar="FILE[HDU]",
            help="Read the exposure from this FITS file, e.g. exp.fits[EXPOSURE].",
        ),
    ]
)

map_options = _apply(
    [
        source_options,
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
    from .engine import CWT
    from .kernels import CWTKernels

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


def source_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `read_maps` / `convert_maps` naming where the maps are."""
    from .inputs import parse_source

    kwargs: dict[str, Any] = {
        "counts_hdu": _hdu_key(options["counts_hdu"]),
        "background_hdu": _hdu_key(options["background_hdu"]),
        "exposure_hdu": _hdu_key(options["exposure_hdu"]),
    }
    for role in ("background", "exposure"):
        if options.get(f"{role}_file") is not None:
            kwargs[role] = parse_source(options[f"{role}_file"])
    return kwargs


def load_maps(path: Path, options: Mapping[str, Any]) -> xr.Dataset:
    """Read the input maps and apply the optional cutout. Large maps (and any map run with
    ``--chunks``) are read chunk by chunk, in the tiles of the run."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import wcs_to_celestial_frame

    from .io import read_maps
    from .maps import cutout, map_center, wcs_from_attrs

    if options["center"] is not None and options["width"] is None:
        raise click.UsageError("--center needs --width")
    chunks = options.get("chunks")
    data = read_maps(
        path,
        **source_kwargs(options),
        chunks="auto" if chunks is None else tuple(chunks),
        check_values=False,  # CWT.analyze checks the pixels it runs on, in its first pass
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
    from .io import check_output

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
    from .io import write_state

    if result_format(path) == "zarr":
        return path
    return write_state(state, path, overwrite=overwrite)
