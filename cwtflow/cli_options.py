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

from .defaults import CATALOG_DEFAULTS, CWT_DEFAULTS, KERNEL_DEFAULTS, MAX_N_SCALE, MIN_SCALE
from .errors import InputError, StoreError
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
    "log_options",
    "make_cwt_options",
    "map_options",
    "output_options",
    "parse_angle",
    "parse_psf",
    "psf_cwt",
    "recorded_options",
    "resume_options",
    "source_kwargs",
    "source_options",
    "write_result",
]

#: Smallest tile side ``--chunks`` accepts (the API takes any size, up to
#: `cwtflow.resources.MAX_TILES` tiles): every tile is a dask task per step and a chunk file
#: per stored array and iteration, and a tile smaller than the kernels' halo is merged with its
#: neighbours anyway. 1-pixel tiles wrote 33 000 files per iteration for a 100 x 200 map;
#: 16-pixel ones write ~130 there, and a 4096 x 4096 map is at most 65 536 tiles of 16 x 16.
MIN_CLI_TILE = 16

_WRAP = {"auto": None, "yes": True, "no": False}
#: CLI option name -> API default (the option names that differ from the API's keywords).
_CLI_DEFAULTS = {
    "max_iter": CWT_DEFAULTS["max_iter"],
    "tol": CWT_DEFAULTS["tol"],
    "threshold": CWT_DEFAULTS["significance_threshold"],
    "island_threshold": CWT_DEFAULTS["significance_island_threshold"],
    "remove_isolated": CWT_DEFAULTS["remove_isolated"],
    "fft_workers": CWT_DEFAULTS["fft_workers"],
}


def _apply(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def make_cwt_options(**defaults: Any) -> Callable[[Any], Any]:
    """The CWT options, with ``defaults`` (option name -> value) replacing the API's."""
    d = {**KERNEL_DEFAULTS, **_CLI_DEFAULTS, **defaults}
    return _apply(
        [
            click.option(
                "--n-scale",
                type=click.IntRange(min=1, max=MAX_N_SCALE),
                default=d["n_scale"],
                show_default=True,
                help="Number of wavelet scales.",
            ),
            click.option(
                "--min-scale",
                type=click.FloatRange(min=MIN_SCALE),
                default=d["min_scale"],
                show_default=True,
                help=f"Smallest scale (pixels, at least {MIN_SCALE}).",
            ),
            click.option(
                "--step-scale",
                type=click.FloatRange(min=1, min_open=True),
                default=d["step_scale"],
                show_default=True,
                help="Ratio between successive scales.",
            ),
            click.option(
                "--max-iter",
                type=click.IntRange(min=1),
                default=d["max_iter"],
                show_default=True,
                help="Maximum number of iterations.",
            ),
            click.option(
                "--tol",
                type=click.FloatRange(min=0),
                default=d["tol"],
                show_default=True,
                help="Stop when the residual variance changes by less than this (relative).",
            ),
            click.option(
                "--threshold",
                type=float,
                default=d["threshold"],
                show_default=True,
                help="Significance threshold of the support.",
            ),
            click.option(
                "--island-threshold",
                type=float,
                default=d["island_threshold"],
                help="Drop support components whose peak significance is below this.",
            ),
            click.option(
                "--remove-isolated/--keep-isolated",
                default=d["remove_isolated"],
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
                default=d["fft_workers"],
                show_default=True,
                help="Threads per FFT.",
            ),
            click.option(
                "--float32",
                is_flag=True,
                help="Compute in float32: half the memory and bytes stored, faster; float64 "
                "(the default) is the exact path.",
            ),
        ]
    )


cwt_options = make_cwt_options()

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
    ]
)

log_options = _apply(
    [
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            help="Log only warnings and errors: no per-iteration lines or progress bars.",
        ),
        click.option("--verbose", "-v", is_flag=True, help="Log debug lines too."),
    ]
)


def build_cwt(options: Mapping[str, Any], *, kernels: Any = None, psf: Any = None) -> CWT:
    """The estimator described by the CWT options (``--chunks`` is checked here too, so that
    every option is refused before any work); ``kernels`` replace those of the kernel options,
    ``psf`` is recorded in the run's parameters."""
    chunks = options.get("chunks")
    if chunks is not None and min(chunks) < MIN_CLI_TILE:
        raise click.UsageError(
            f"--chunks {chunks[0]} {chunks[1]}: tiles must be at least {MIN_CLI_TILE} x "
            f"{MIN_CLI_TILE} pixels (every tile is a dask task per step and a file per stored "
            "array and iteration)"
        )
    from .engine import CWT
    from .kernels import CWTKernels

    if kernels is None:
        kernels = CWTKernels(options["n_scale"], options["min_scale"], options["step_scale"])
    return CWT(
        kernels,
        max_iter=options["max_iter"],
        tol=options["tol"],
        significance_threshold=options["threshold"],
        significance_island_threshold=options["island_threshold"],
        remove_isolated=options["remove_isolated"],
        keep_history=bool(options.get("keep_history")),
        wrap_lon=_WRAP[options["wrap_lon"]],
        fft_workers=options["fft_workers"],
        dtype="float32" if options.get("float32") else "float64",
        psf=psf,
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
    import numpy as np
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D
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
    width = options["width"] * u.deg
    cut = cutout(data, position, width)
    shape = (data.sizes["y"], data.sizes["x"])
    wcs = wcs_from_attrs(data.attrs)
    asked = Cutout2D(np.zeros(shape, bool), position, width[::-1], wcs=wcs, mode="partial")
    if asked.shape != (cut.sizes["y"], cut.sizes["x"]):
        lon, lat = (abs(float(d)) * n for d, n in zip(wcs.wcs.cdelt, shape[::-1], strict=True))
        raise click.UsageError(
            f"--width {options['width'][0]:g} {options['width'][1]:g} does not fit in the map "
            f"({shape[1]} x {shape[0]} pixels, about {lon:g} x {lat:g} deg) around the cutout "
            f"centre: it would be trimmed to {cut.sizes['x']} x {cut.sizes['y']} pixels; ask "
            "for a smaller width"
        )
    return cut


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


def write_result(
    state: xr.Dataset,
    path: Path,
    *,
    overwrite: bool,
    provenance_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write the final state to ``path`` in the format its suffix names (a zarr store already
    holds it: `CWT.analyze` wrote it there), with its provenance."""
    if result_format(path) == "zarr":
        return path
    from .state_files import write_state

    return write_state(state, path, overwrite=overwrite, provenance_record=provenance_record)


#: Stored run parameter -> CLI option (name in the command's options).
PARAMETER_OPTIONS = {
    "n_scale": "n_scale",
    "min_scale": "min_scale",
    "step_scale": "step_scale",
    "max_iter": "max_iter",
    "tol": "tol",
    "significance_threshold": "threshold",
    "significance_island_threshold": "island_threshold",
    "remove_isolated": "remove_isolated",
    "keep_history": "keep_history",
    "wrap_lon": "wrap_lon",
    "dtype": "float32",
    "psf_sigma_deg": "psf",
}
#: Options of ``cwtflow run`` recorded in the store (root attr ``provenance["options"]``) so
#: that ``--resume`` reads the same input pixels.
INPUT_OPTIONS = ("counts_hdu", "background_hdu", "exposure_hdu", "center", "width", "chunks")
#: Parameters a resumed run may change.
RESUMABLE = ("max_iter",)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comparable(name: str, value: Any) -> Any:
    if name == "float32" and isinstance(value, str):  # the stored dtype
        return value == "float32"
    if name == "psf" and value is not None:  # stored sigma (deg) or a --psf text
        sigma = parse_psf(value).sigma.to_value("deg") if isinstance(value, str) else value
        return f"{float(sigma)!r}deg"
    if name == "wrap_lon" and not isinstance(value, str):
        return {v: k for k, v in _WRAP.items()}[value]
    return list(value) if isinstance(value, tuple | list) else value


def resume_options(ctx: click.Context, options: dict[str, Any], store: Path) -> dict[str, Any]:
    """``options`` of ``cwtflow run --resume`` completed from the run held by ``store``.

    Options left at their defaults take the store's values (run parameters from the root attrs
    ``parameters``, input options from ``provenance["options"]``); an option given on the
    command line must agree with the store (only ``--max-iter`` may differ), else a
    `click.UsageError` names it. A store without cwtflow root attrs is left to the run's own
    checks.
    """
    from .store import open_group

    root = open_group(store)
    attrs = dict(root.attrs) if root is not None else {}
    stored = {
        PARAMETER_OPTIONS[k]: v
        for k, v in dict(attrs.get("parameters") or {}).items()
        if k in PARAMETER_OPTIONS
    }
    recorded = dict((attrs.get("provenance") or {}).get("options") or {})
    stored.update({k: v for k, v in recorded.items() if k in INPUT_OPTIONS})
    out = dict(options)
    for name, value in stored.items():
        value = _comparable(name, value)
        explicit = ctx.get_parameter_source(name) not in (
            click.core.ParameterSource.DEFAULT,
            None,
        )
        if not explicit:
            out[name] = tuple(value) if isinstance(value, list) else value
        elif name not in RESUMABLE and _comparable(name, options[name]) != value:
            raise click.UsageError(
                f"{_flag(name)} {_comparable(name, options[name])!r} differs from the run in "
                f"{store} ({value!r}); leave it out to continue that run"
            )
    return out


def recorded_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The input options of ``cwtflow run`` to record in a store (see `INPUT_OPTIONS`)."""
    return {k: _comparable(k, options.get(k)) for k in INPUT_OPTIONS}


# --- the PSF (``run --psf``, ``catalog --psf``; the rule: docs/psf_rule.md) -------------------


def parse_angle(text: str, name: str) -> Any:
    """An angle written with its unit (``0.15deg``, ``9arcmin``); a bare number is refused."""
    import astropy.units as u

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
    import astropy.units as u
    import numpy as np
    from astropy.wcs.utils import proj_plane_pixel_scales

    from .kernels import CWTKernels
    from .maps import wcs_from_attrs

    pixel = float(np.mean(proj_plane_pixel_scales(wcs_from_attrs(data.attrs).celestial)))
    return build_cwt(options, kernels=CWTKernels.from_psf(psf, pixel * u.deg), psf=psf)
