"""Command-line interface: ``cwtflow run``, ``cwtflow demo``, ``cwtflow info``,
``cwtflow catalog``.

A thin layer over the public API: options are turned into API calls by the builders of
`cwtflow.cli_options`, so a new option means one decorator entry and one line in a builder.
Every error cwtflow raises on purpose (`CWTFlowError`), every OS error on a path and every usage
error ends the program with one line on stderr and exit code 1 (2 for usage errors), without a
traceback; outputs are checked before any work starts, so a refused run writes nothing.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import xarray as xr
from astropy.table import Table
from tqdm import tqdm

from .analysis import state_metrics
from .cli_options import (
    CATALOG_DEFAULTS,
    analyze_kwargs,
    build_cwt,
    check_result,
    cwt_options,
    load_maps,
    map_options,
    output_options,
    parse_angle,
    parse_psf,
    psf_cwt,
    write_result,
)
from .engine import CWT
from .errors import CWTFlowError, InputError, StoreError
from .formats import catalog_format, is_store, result_format
from .io import check_output, read_state, write_maps
from .iteration import IterationInfo, iteration_table
from .kernels import CWTKernels

__all__ = ["cli", "main"]

#: Files `cwtflow demo` writes into its output folder.
DEMO_FILES = {
    "maps": "demo-maps.fits",
    "sources": "demo-sources.ecsv",
    "result": "demo-result.fits",
    "plot": "demo-result.png",
}
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
@click.option(
    "--psf",
    default=None,
    metavar="ANGLE",
    help="The instrument's PSF, a Gaussian sigma (e.g. 0.15deg; r68=0.23deg for a 68 % "
    "containment radius): sets the kernels by the PSF rule (docs/psf_rule.md), overriding "
    "--n-scale/--min-scale/--step-scale, and is kept with the result for `cwtflow catalog`.",
)
@map_options
@cwt_options
@output_options
def run(maps: Path, out: Path, plot: Path | None, psf: str | None, **options: Any) -> None:
    """Run the CWT on MAPS (a FITS file with counts and background) and write the result."""
    psf_value = None if psf is None else parse_psf(psf)
    out = check_result(out, overwrite=options["overwrite"], resume=options["resume"])
    if result_format(out) == "zarr":
        options["store"] = out
    if plot is not None:
        check_output(plot, overwrite=options["overwrite"], hint="--overwrite")
    data = load_maps(maps, options)
    cwt = build_cwt(options) if psf_value is None else psf_cwt(psf_value, data, options)
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


def _echo_table(title: str, table: Table) -> None:
    click.echo(f"\n{title}")
    click.echo("\n".join(table.pformat(max_lines=-1, max_width=-1)))


@cli.command()
@click.argument("result", type=click.Path(path_type=Path))
def info(result: Path) -> None:
    """Print the kernels, the iterations and the metric tables of a RESULT file."""
    if is_store(result):
        from .history import open_history

        history = open_history(result)
        state, table = history.final, history.table()
    else:
        state = read_state(result)
        rows = state.attrs.get("table") or []
        try:
            table = iteration_table([IterationInfo.from_attrs(row) for row in rows])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{result}: bad iteration table in the attrs: {exc}") from None
    ny, nx = state.sizes["y"], state.sizes["x"]
    click.echo(f"{result}: {ny} x {nx} pixels, {state.sizes['scale']} scales")
    params = dict(state.attrs.get("parameters") or {})
    if {"n_scale", "min_scale", "step_scale"} <= params.keys():
        _echo_table("Kernels", CWTKernels.from_dict(params).info_table())
    if params:
        _echo_table(
            "Parameters",
            Table(rows=[(k, repr(v)) for k, v in params.items()], names=("Parameter", "Value")),
        )
    converged = "yes" if state.attrs.get("converged") else "no"
    _echo_table(
        f"Iterations (run: {state.attrs.get('iterations', 0)}, converged: {converged})", table
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
    default=CATALOG_DEFAULTS["min_significance"],
    show_default=True,
    help="Drop sources below this Poisson likelihood significance.",
)
@click.option(
    "--psf",
    default=None,
    metavar="ANGLE",
    help="The instrument's PSF, a Gaussian sigma (e.g. 0.15deg; r68=0.23deg for a 68 % "
    "containment radius). Default: the PSF `cwtflow run --psf` kept with the result.",
)
@click.option(
    "--fit-extension/--no-fit-extension",
    default=CATALOG_DEFAULTS["fit_extension"],
    show_default=True,
    help="Also fit a Gaussian extension to every source.",
)
@click.option(
    "--fit-background/--fixed-background",
    default=CATALOG_DEFAULTS["fit_background"],
    show_default=True,
    help="Let the background model's normalisation float on each fit window.",
)
@click.option(
    "--deblend/--no-deblend",
    default=CATALOG_DEFAULTS["deblend"],
    show_default=True,
    help="Split multi-peak islands.",
)
@click.option(
    "--contrast",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=CATALOG_DEFAULTS["contrast"],
    show_default=True,
    help="Relative dip below a secondary peak for it to be a source of its own.",
)
@click.option(
    "--min-separation",
    default=None,
    metavar="ANGLE",
    help="Sources closer than this angle (e.g. 0.3deg) are one source (default: 2 PSF sigmas).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def catalog(result: Path, out: Path, regions: Path | None, maps: Path | None, **options: Any):
    """Find the sources in a RESULT (.fits from `cwtflow run`, or a .zarr store) and write
    them as a FITS or ECSV catalog (and DS9 regions). A .zarr store also keeps the catalog,
    next to its history (group 'catalog')."""
    import warnings

    from .catalog_files import write_catalog, write_regions
    from .store_catalog import catalog_of_result, write_store_catalog

    try:
        catalog_format(out, regions=False)
    except InputError as exc:
        raise click.UsageError(f"--out: {exc} (region files: --regions)") from None
    overwrite = options.pop("overwrite")
    check_output(out, overwrite=overwrite, hint="--overwrite")
    if regions is not None:
        check_output(regions, overwrite=overwrite, hint="--overwrite")
    psf = options.pop("psf")
    separation = options.pop("min_separation")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table, in_store = catalog_of_result(
            result,
            exposure_maps=maps,
            overwrite=overwrite,
            psf=None if psf is None else parse_psf(psf),
            min_separation=(
                None if separation is None else parse_angle(separation, "--min-separation")
            ),
            **options,
        )
    for warning in caught:
        click.echo(f"cwtflow: warning: {_one_line(str(warning.message))}", err=True)
    write_catalog(table, out, overwrite=overwrite)
    click.echo(f"wrote {out} ({len(table)} sources)")
    if in_store:
        write_store_catalog(result, table, overwrite=overwrite)
        click.echo(f"kept the catalog in {result} (group 'catalog')")
    if regions is not None:
        write_regions(table, regions, overwrite=overwrite)
        click.echo(f"wrote {regions}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``cwtflow``)."""
    cli.main(args=argv, prog_name="cwtflow")
