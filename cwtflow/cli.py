"""Command-line interface: ``cwtflow run``, ``cwtflow demo``, ``cwtflow info``,
``cwtflow catalog``, ``cwtflow verify``, ``cwtflow unlock``.

A thin layer over the public API: options are turned into API calls by the builders of
`cwtflow.cli_options`, so a new option means one decorator entry and one line in a builder.
Every error cwtflow raises on purpose (`CWTFlowError`), every OS error on a path and every usage
error ends the program with one line on stderr and exit code 1 (2 for usage errors), without a
traceback; outputs are checked before any work starts, so a refused run writes nothing.

Log lines (per-iteration statistics, the cluster, warnings) go through Python `logging`
(logger ``cwtflow``) to stderr, at the level of ``--quiet`` / ``--verbose`` (given before or
after the command); stdout carries only the ``wrote ...`` result lines. Progress bars are drawn
only on a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_demo import DEMO_FILES, demo
from .cli_options import (
    CATALOG_DEFAULTS,
    build_cwt,
    check_result,
    cwt_options,
    load_maps,
    log_options,
    map_options,
    output_options,
    parse_angle,
    parse_psf,
    psf_cwt,
    recorded_options,
    resume_options,
    source_kwargs,
    source_options,
    write_result,
)
from .cli_run import (
    analyze,
    command_line,
    logged_warnings,
    one_line,
    setup_logging,
    summary,
)
from .errors import CWTFlowError, InputError, StoreError
from .formats import catalog_format, is_store, result_format

if TYPE_CHECKING:  # heavy modules load when a command needs them: `cwtflow --help` is fast
    from astropy.table import Table

__all__ = ["DEMO_FILES", "cli", "main"]

# --------------------------------------------------------------------------------------------
# Error handling: one line on stderr, no traceback


def _fail(message: str, code: int = 1) -> int:
    click.echo(f"cwtflow: error: {one_line(message)}", err=True)
    return code


def _os_message(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


class _Group(click.Group):
    """A click group whose ``main`` turns expected errors into one line on stderr."""

    def make_context(  # type: ignore[override]
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> click.Context:
        argv = ["cwtflow", *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["cwtflow.argv"] = argv
        return ctx

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        logger = logging.getLogger("cwtflow")
        saved = (list(logger.handlers), logger.level, logger.propagate)
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
        finally:  # a command sets up the cwtflow logger for itself; a host program keeps its own
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
        if standalone_mode:
            sys.exit(code)
        return code


# --------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cwtflow")
@log_options
def cli(quiet: bool, verbose: bool) -> None:
    """Find gamma-ray sources in sky maps with the iterative CWT filter.

    Log lines go to stderr (--quiet: warnings and errors only; --verbose: debug lines too;
    also accepted after the command); result lines ('wrote ...') to stdout.
    """


cli.add_command(demo)


@cli.command()
@click.argument("maps", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Result file (.fits), or zarr store (.zarr) of the run: its inputs and its newest "
    "complete iteration (all of them with --keep-history), written as the run goes.",
)
@click.option("--plot", type=click.Path(path_type=Path), help="Also save the images (.png/.pdf).")
@click.option(
    "--keep-history",
    is_flag=True,
    help="Keep every iteration in the --out .zarr store (default: only the newest; the "
    "statistics of every iteration are kept either way).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in the --out .zarr store where it stopped, with its parameters and "
    "input options (an option given again must agree; --max-iter may be raised).",
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
@log_options
@click.pass_context
def run(
    ctx: click.Context,
    maps: Path,
    out: Path,
    plot: Path | None,
    psf: str | None,
    **options: Any,
) -> None:
    """Run the CWT on MAPS (a FITS file with counts and background, or a .zarr of them) and
    write the result.

    The result records its provenance: date, command line, input files with their sha256 and
    package versions (FITS primary header; store root attr 'provenance').
    """
    from .io import check_output
    from .provenance import provenance

    quiet = setup_logging(ctx, options)
    out = check_result(out, overwrite=options["overwrite"], resume=options["resume"])
    store = result_format(out) == "zarr"
    if store:
        if options["resume"]:
            options = resume_options(ctx, options, out)
        options["store"] = out
    elif options["keep_history"]:
        raise click.UsageError("--keep-history needs a zarr store output (--out run.zarr)")
    if plot is not None:
        from .plotting import plot_format

        check_output(plot, overwrite=options["overwrite"], hint="--overwrite")
        plot_format(plot)  # a suffix matplotlib can write, refused before any work
    data = load_maps(maps, options)
    psf = options.pop("psf", psf)  # --resume may take it from the store
    cwt = build_cwt(options) if psf is None else psf_cwt(parse_psf(psf), data, options)
    record = {**provenance([maps], command_line()), "options": recorded_options(options)}
    on_iteration = (lambda info: _store_provenance(out, record)) if store else None
    state = analyze(cwt, data, options, quiet=quiet, on_iteration=on_iteration)
    if store:
        _store_provenance(out, record)
    else:
        write_result(state, out, overwrite=options["overwrite"], provenance_record=record)
    click.echo(f"wrote {out} ({summary(state)})")
    if plot is not None:
        from .plotting import plot_images

        plot_images(state, plot)
        click.echo(f"wrote {plot}")


def _store_provenance(path: Path, record: dict[str, Any]) -> None:
    """Put ``record`` into the store's root attrs (``provenance``; the records of earlier
    commands that wrote the store, e.g. before a resume, under ``earlier``) and consolidate
    the store's metadata."""
    import zarr

    from .store import json_value
    from .store_integrity import update_root
    from .store_meta import consolidate

    root = zarr.open_group(str(path), mode="r+")
    old = root.attrs.get("provenance")
    if isinstance(old, dict) and old.get("date") and "earlier" not in record:
        previous = [*old.get("earlier", []), {k: old.get(k) for k in ("date", "command")}]
        record["earlier"] = previous
    record.setdefault("earlier", [])
    if old != json_value(record):  # through the store's root digest (cwtflow.store_integrity)
        update_root(path, {"provenance": json_value(record)})
    consolidate(path)


def _echo_table(title: str, table: Table) -> None:
    click.echo(f"\n{title}")
    click.echo("\n".join(table.pformat(max_lines=-1, max_width=-1)))


@cli.command()
@click.argument("result", type=click.Path(path_type=Path))
def info(result: Path) -> None:
    """Print the kernels, the iterations and the metric tables of a RESULT file."""
    from astropy.table import Table

    from .analysis import state_metrics
    from .iteration import IterationInfo, iteration_table
    from .kernels import CWTKernels
    from .state_files import read_state

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
@click.option(
    "--recompute",
    is_flag=True,
    help="Find the sources again even though the .zarr RESULT keeps a catalog (replacing "
    "the kept one needs --overwrite).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@log_options
@click.pass_context
def catalog(
    ctx: click.Context,
    result: Path,
    out: Path,
    regions: Path | None,
    maps: Path | None,
    **options: Any,
) -> None:
    """Find the sources in a RESULT (.fits from `cwtflow run`, or a .zarr store) and write
    them as a FITS or ECSV catalog (and DS9 regions with --regions).

    A .zarr store also keeps the catalog, next to its history (group 'catalog'). Once it does,
    the kept catalog is written out again without recomputing it, unless a catalog option
    (--min-significance, --psf, --deblend, --contrast, --min-separation, --fit-extension,
    --fit-background, --maps) is
    given or --recompute: then the sources are found again, and replacing the kept catalog
    needs --overwrite.
    """
    from .catalog_files import write_catalog, write_regions
    from .io import check_output
    from .provenance import provenance
    from .store_catalog import catalog_of_result, read_store_catalog, write_store_catalog
    from .store_meta import consolidate

    setup_logging(ctx, options)
    try:
        catalog_format(out, regions=False)
    except InputError as exc:
        raise click.UsageError(f"--out: {exc} (region files: --regions)") from None
    overwrite, recompute = options.pop("overwrite"), options.pop("recompute")
    check_output(out, overwrite=overwrite, hint="--overwrite")
    if regions is not None:
        check_output(regions, overwrite=overwrite, hint="--overwrite")
    from .survey_store import is_survey_store

    if is_survey_store(result):
        from .survey_merge import survey_catalog

        table = survey_catalog(result, min_significance=options["min_significance"])
        write_catalog(table, out, overwrite=overwrite)
        missing = table.meta.get("NINCOMPL", 0)
        click.echo(f"wrote {out} ({len(table)} sources, {missing} patches incomplete)")
        if regions is not None:
            write_regions(table, regions, overwrite=overwrite)
            click.echo(f"wrote {regions}")
        return
    given = [
        name
        for name in ("maps", *options)
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    kept = read_store_catalog(result) if is_store(result) else None
    if kept is not None and not given and not recompute:
        table, in_store = kept, False
        source = f", the catalog kept in {result}"
    else:
        if kept is not None and not overwrite:
            what = ", ".join(f"--{n.replace('_', '-')}" for n in given) or "--recompute"
            raise StoreError(
                f"{result} keeps a catalog; {what} would replace it: add --overwrite (or leave "
                "out the catalog options to write the kept catalog)"
            )
        psf = options.pop("psf")
        separation = options.pop("min_separation")
        with logged_warnings():
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
        source = ""
    inputs = [result] if maps is None else [result, maps]
    table.meta["CWTPROV"] = json.dumps(provenance(inputs, command_line()))
    write_catalog(table, out, overwrite=overwrite)
    click.echo(f"wrote {out} ({len(table)} sources{source})")
    if in_store:
        write_store_catalog(result, table, overwrite=overwrite)
        consolidate(result)
        click.echo(f"kept the catalog in {result} (group 'catalog')")
    if regions is not None:
        write_regions(table, regions, overwrite=overwrite)
        click.echo(f"wrote {regions}")


# --------------------------------------------------------------------------------------------
# Store integrity (cwtflow.store_integrity, cwtflow.store_lock)


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
def verify(store: Path) -> None:
    """Check every complete group of a .zarr STORE against its manifest: root attrs, array
    metadata, every chunk's presence and CRC32C checksum, chunk order, iteration attrs."""
    from .store_integrity import verify_store

    click.echo(verify_store(store).summary())


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
def unlock(store: Path) -> None:
    """Break the writer's lock of a .zarr STORE left by a process that is gone (refused while
    its owner runs on this host; for another host, make sure the owner is gone first)."""
    from .store_lock import break_lock

    owner = break_lock(store)
    click.echo(
        f"{store}: removed the lock of {owner.describe()}" if owner else f"{store}: not locked"
    )


# Full-sky surveys: the command lives in cli_survey (its options are many)
from .cli_survey import survey  # noqa: E402

cli.add_command(survey)


# --------------------------------------------------------------------------------------------
# cwtflow convert: input maps converted once


@cli.command()
@click.argument("maps", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@source_options
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Zarr chunk side (pixels); memory holds CHUNK rows of one map at a time.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output store.")
def convert(maps: Path, out: Path, chunk: int, overwrite: bool, **options: Any) -> None:
    """Convert FITS MAPS (e.g. a large .fits.gz) once into a zarr store OUT (.zarr) that
    `cwtflow run` reads chunk by chunk, streaming with bounded memory."""
    from .convert import convert_maps

    if out.suffix != ".zarr":
        raise click.UsageError(f"OUT must be a .zarr directory, got {out}")
    convert_maps(maps, out, chunk=chunk, overwrite=overwrite, **source_kwargs(options))
    click.echo(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``cwtflow``)."""
    cli.main(args=argv, prog_name="cwtflow")
