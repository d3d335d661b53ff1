"""Command-line interface: ``cwtflow run``, ``cwtflow demo``, ``cwtflow info``,
``cwtflow catalog``.

A thin layer over the public API: options are turned into API calls by a few builder functions
(`build_cwt`, `load_maps`, `analyze_kwargs`, `write_result`), so a new option means one
decorator entry and one line in a builder. Every error cwtflow raises on purpose
(`CWTFlowError`), every OS error on a path and every usage error ends the program with one line
on stderr and exit code 1 (2 for usage errors), without a traceback; outputs are checked before
any work starts, so a refused run writes nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import astropy.units as u
import click
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs.utils import wcs_to_celestial_frame
from tqdm import tqdm

from .analysis import state_metrics
from .engine import CWT, IterationInfo, variance_ratio
from .errors import CWTFlowError, InputError, StoreError
from .history import read_result
from .io import check_output, read_maps, read_state, write_maps, write_state
from .kernels import CWTKernels
from .maps import cutout, map_center, wcs_from_attrs

__all__ = ["analyze_kwargs", "build_cwt", "cli", "load_maps", "main", "write_result"]

#: Kernel defaults: the CWT tutorial's (CWTKernels itself has none).
KERNEL_DEFAULTS = {"n_scale": 2, "min_scale": 6.0, "step_scale": 1.3}
#: Estimator defaults, read from `CWT` so the CLI cannot drift from the API.
CWT_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(CWT.__init__).parameters.items()
    if param.default is not inspect.Parameter.empty
}
#: Suffixes written as FITS by `write_result`.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
#: Files `cwtflow demo` writes into its output folder.
DEMO_FILES = {
    "maps": "demo-maps.fits",
    "sources": "demo-sources.ecsv",
    "result": "demo-result.fits",
    "plot": "demo-result.png",
}
_WRAP = {"auto": None, "yes": True, "no": False}


# --------------------------------------------------------------------------------------------
# Error handling: one line on stderr, no traceback


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = 1) -> int:
    click.echo(f"cwtflow: error: {_one_line(message)}", err=True)
    return code


def _os_message(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


class _Group(click.Group):
    """A click group whose ``main`` turns expected errors into one line on stderr."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            code = 2
        except click.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            code = _fail("aborted")
        except CWTFlowError as exc:
            code = _fail(str(exc))
        except OSError as exc:
            code = _fail(_os_message(exc))
        if standalone_mode:
            sys.exit(code)
        return code


# --------------------------------------------------------------------------------------------
# Option groups (decorators) and the builders that turn options into API calls


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


def _result_format(path: Path) -> str:
    if path.name.lower().endswith(FITS_SUFFIXES):
        return "fits"
    if path.name.lower().endswith(".zarr"):
        return "zarr"
    raise InputError(f"unsupported output format: {path.name} (use .fits, .fits.gz or .zarr)")


def check_result(path: Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Refuse an output the run could not write, before any work starts."""
    if _result_format(path) == "zarr":
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
    if _result_format(path) == "zarr":
        return path
    if _result_format(path) == "fits":
        return write_state(state, path, overwrite=overwrite)
    raise AssertionError("unreachable: _result_format accepts only known formats")


def _format_info(info: IterationInfo) -> str:
    ratio = "n/a" if math.isnan(info.variance_ratio) else f"{info.variance_ratio:.3e}"
    flag = " (converged)" if info.converged else ""
    return (
        f"iteration {info.iteration}: residual variance {info.residual_variance:.6g}, "
        f"variance ratio {ratio}, support {info.support_size} pixels{flag}"
    )


def _analyze(cwt: CWT, data: xr.Dataset, options: Mapping[str, Any]) -> xr.Dataset:
    """Run `CWT.analyze` with log lines and a progress bar on stderr (unless ``--quiet``)."""
    quiet = options["quiet"]
    with tqdm(
        total=cwt.max_iter,
        desc="CWT",
        unit="it",
        file=sys.stderr,
        disable=True if quiet else None,
        leave=False,
    ) as bar:

        def report(info: IterationInfo) -> None:
            if not quiet:
                tqdm.write(_format_info(info), file=sys.stderr)
            bar.update(1)

        with _cluster(options, quiet=quiet) as client:
            return cwt.analyze(data, callback=report, client=client, **analyze_kwargs(options))


@contextlib.contextmanager
def _cluster(options: Mapping[str, Any], *, quiet: bool) -> Iterator[Any]:
    """The dask client of ``--scheduler`` / ``--workers`` (None without either: dask's threaded
    scheduler in this process), with the cluster line and a task progress bar on stderr."""
    from .cluster import TaskProgress, open_client

    echo = None if quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    scheduler, workers = options.get("scheduler"), options.get("workers")
    with open_client(scheduler=scheduler, workers=workers, echo=echo) as client:
        if client is None:
            yield None
            return
        with TaskProgress(client, file=sys.stderr, disable=quiet):
            yield client


def _summary(state: xr.Dataset) -> str:
    converged = "converged" if state.attrs.get("converged") else "not converged"
    support = state.attrs.get("support_size", "?")
    return f"{state.attrs.get('iterations', '?')} iterations, {converged}, support {support} pixels"


# --------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cwtflow")
def cli() -> None:
    """Find gamma-ray sources in sky maps with the iterative CWT filter."""


@cli.command()
@click.argument("maps", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Result file (.fits), or zarr history store (.zarr) receiving every iteration.",
)
@click.option("--plot", type=click.Path(path_type=Path), help="Also save the images as PNG.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in the --out .zarr store where it stopped."
)
@click.option(
    "--chunks",
    nargs=2,
    type=click.IntRange(min=1),
    default=None,
    metavar="NY NX",
    help="Run tile by tile (dask) with tiles of NY x NX pixels.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS|FILE",
    help="Run on the dask cluster whose scheduler is at ADDRESS (tcp://host:8786, tls://...) "
    "or named in a scheduler FILE; tiled (1024 x 1024 unless --chunks).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Run on a local dask cluster of this many worker processes bound to 127.0.0.1.",
)
@map_options
@cwt_options
@output_options
def run(maps: Path, out: Path, plot: Path | None, **options: Any) -> None:
    """Run the CWT on MAPS (a FITS file with counts and background) and write the result."""
    out = check_result(out, overwrite=options["overwrite"], resume=options["resume"])
    if _result_format(out) == "zarr":
        options["store"] = out
    if plot is not None:
        check_output(plot, overwrite=options["overwrite"], hint="--overwrite")
    cwt = build_cwt(options)
    data = load_maps(maps, options)
    state = _analyze(cwt, data, options)
    write_result(state, out, overwrite=options["overwrite"])
    click.echo(f"wrote {out} ({_summary(state)})")
    if plot is not None:
        from .plotting import plot_images

        plot_images(state, plot)
        click.echo(f"wrote {plot}")


def _check_folder(folder: Path, names: list[str], *, overwrite: bool) -> None:
    """The output folder (or its nearest existing ancestor) can take ``names``."""
    if folder.exists():
        for name in names:
            check_output(folder / name, overwrite=overwrite, hint="--overwrite")
        return
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StoreError(f"cannot create output folder {folder}: {ancestor} is not a folder")
    check_output(ancestor / names[0], overwrite=True)


@cli.command()
@click.option(
    "--out",
    "-o",
    "folder",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Output folder (created if missing).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the sky.")
@click.option(
    "--size",
    nargs=2,
    type=click.IntRange(min=1),
    default=(200, 400),
    show_default=True,
    metavar="NY NX",
    help="Map size in pixels.",
)
@click.option(
    "--n-sources",
    type=click.IntRange(min=0),
    default=None,
    help="Number of sources (default: one per 3200 pixels).",
)
@cwt_options
@output_options
def demo(folder: Path, seed: int, size: tuple[int, int], n_sources: int | None, **options: Any):
    """Simulate a sky with known sources, run the CWT on it and write maps, true sources,
    result and a PNG of the result's images."""
    from .plotting import plot_images
    from .simulate import simulate_sky

    paths = {key: folder / name for key, name in DEMO_FILES.items()}
    _check_folder(folder, list(DEMO_FILES.values()), overwrite=options["overwrite"])
    cwt = build_cwt(options)
    data, sources = simulate_sky(tuple(size), n_sources=n_sources, seed=seed)
    state = _analyze(cwt, data, options)
    folder.mkdir(parents=True, exist_ok=True)
    overwrite = options["overwrite"]
    write_maps(data, paths["maps"], overwrite=overwrite)
    click.echo(
        f"wrote {paths['maps']} (simulated counts, background, exposure; {size[0]} x "
        f"{size[1]} pixels, seed {seed})"
    )
    _write_table(sources, paths["sources"], overwrite=overwrite)
    click.echo(f"wrote {paths['sources']} ({len(sources)} true sources)")
    write_result(state, paths["result"], overwrite=overwrite)
    click.echo(f"wrote {paths['result']} ({_summary(state)})")
    plot_images(state, paths["plot"])
    click.echo(f"wrote {paths['plot']}")


def _write_table(table: Table, path: Path, *, overwrite: bool) -> None:
    from .io import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp:
        table.write(tmp, format="ascii.ecsv")


def _iteration_table(state: xr.Dataset) -> Table:
    variances = [float(v) for v in state.attrs.get("residual_variance", [])]
    ratios = [variance_ratio(variances[i - 1] if i else None, v) for i, v in enumerate(variances)]
    return Table(
        {
            "iteration": list(range(1, len(variances) + 1)),
            "residual_variance": variances,
            "variance_ratio": ratios,
        }
    )


def _echo_table(title: str, table: Table) -> None:
    click.echo(f"\n{title}")
    click.echo("\n".join(table.pformat(max_lines=-1, max_width=-1)))


@cli.command()
@click.argument("result", type=click.Path(path_type=Path))
def info(result: Path) -> None:
    """Print the kernels, the iterations and the metric tables of a RESULT file."""
    state = read_result(result) if result.name.lower().endswith(".zarr") else read_state(result)
    ny, nx = state.sizes["y"], state.sizes["x"]
    click.echo(f"{result}: {ny} x {nx} pixels, {state.sizes['scale']} scales")
    params = dict(state.attrs.get("parameters") or {})
    if {"n_scale", "min_scale", "step_scale"} <= params.keys():
        kernels = CWTKernels(params["n_scale"], params["min_scale"], params["step_scale"])
        _echo_table("Kernels", kernels.info_table())
    if params:
        _echo_table(
            "Parameters",
            Table(rows=[(k, repr(v)) for k, v in params.items()], names=("Parameter", "Value")),
        )
    converged = "yes" if state.attrs.get("converged") else "no"
    _echo_table(
        f"Iterations (run: {state.attrs.get('iterations', 0)}, converged: {converged})",
        _iteration_table(state),
    )
    _echo_table("Metrics", state_metrics(state))


@cli.command()
@click.argument("result", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Catalog file (.fits, .fits.gz or .ecsv).",
)
@click.option("--regions", type=click.Path(path_type=Path), help="Also write a DS9 region file.")
@click.option(
    "--maps",
    type=click.Path(path_type=Path),
    help="FITS maps with an EXPOSURE HDU, for fluxes (a .zarr RESULT has its own exposure).",
)
@click.option(
    "--min-significance",
    type=float,
    default=5.0,
    show_default=True,
    help="Drop sources below this Poisson likelihood significance.",
)
@click.option(
    "--psf-sigma",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Gaussian PSF sigma (deg): test point sources instead of the model's shape.",
)
@click.option(
    "--deblend/--no-deblend", default=True, show_default=True, help="Split multi-peak islands."
)
@click.option(
    "--contrast",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=0.2,
    show_default=True,
    help="Relative dip below a secondary peak for it to be a source of its own.",
)
@click.option(
    "--min-separation",
    type=click.FloatRange(min=0),
    default=None,
    help="Peaks closer than this (pixels) are one source (default: smallest wavelet width).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def catalog(result: Path, out: Path, regions: Path | None, maps: Path | None, **options: Any):
    """Find the sources in a RESULT (.fits from `cwtflow run`, or a .zarr store) and write
    them as a FITS or ECSV catalog (and DS9 regions). A .zarr store also keeps the catalog,
    next to its history (group 'catalog')."""
    import warnings

    from .catalog import _format_of, find_sources, write_catalog, write_regions
    from .history import open_history
    from .store_catalog import read_store_catalog, write_store_catalog

    if _format_of(out, None) == "ds9":
        raise click.UsageError("--out takes a .fits, .fits.gz or .ecsv catalog; use --regions")
    check_output(out, overwrite=options["overwrite"], hint="--overwrite")
    if regions is not None:
        check_output(regions, overwrite=options["overwrite"], hint="--overwrite")
    exposure = None
    in_store = result.name.lower().endswith(".zarr")
    if in_store:
        history = open_history(result)
        if read_store_catalog(result) is not None and not options["overwrite"]:
            raise StoreError(f"{result} already holds a catalog (use --overwrite to replace it)")
        state = history.final
        exposure = history.inputs["exposure"] if "exposure" in history.inputs else None
    else:
        state = read_state(result)
    if maps is not None:
        data = read_maps(maps)
        if "exposure" not in data:
            raise InputError(f"{maps} has no EXPOSURE HDU")
        exposure = data["exposure"]
    psf = options["psf_sigma"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table = find_sources(
            state,
            exposure=exposure,
            min_significance=options["min_significance"],
            deblend=options["deblend"],
            contrast=options["contrast"],
            min_separation=options["min_separation"],
            psf_sigma=None if psf is None else psf * u.deg,
        )
    for warning in caught:
        click.echo(f"cwtflow: warning: {_one_line(str(warning.message))}", err=True)
    write_catalog(table, out, overwrite=options["overwrite"])
    click.echo(f"wrote {out} ({len(table)} sources)")
    if in_store:
        write_store_catalog(result, table, overwrite=options["overwrite"])
        click.echo(f"kept the catalog in {result} (group 'catalog')")
    if regions is not None:
        write_regions(table, regions, overwrite=options["overwrite"])
        click.echo(f"wrote {regions}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``cwtflow``)."""
    cli.main(args=argv, prog_name="cwtflow")
