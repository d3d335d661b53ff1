"""``cwtflow survey``: a full-sky run over the patches of a sky partition (`cwtflow.survey`),
one log line per patch; ``cwtflow catalog`` on the survey store merges the catalogs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from .defaults import CWT_DEFAULTS, KERNEL_DEFAULTS
from .errors import InputError

__all__ = ["survey"]


@contextlib.contextmanager
def _cluster(options: Mapping[str, Any], *, quiet: bool) -> Iterator[Any]:
    """The dask client of ``--scheduler`` / ``--workers`` (None without either)."""
    from .cluster import open_client

    echo = None if quiet else (lambda line: click.echo(line, err=True))
    with open_client(
        scheduler=options.get("scheduler"), workers=options.get("workers"), echo=echo
    ) as client:
        yield client


@click.command()
@click.argument("counts", metavar="EVENTS_OR_MAP", type=click.Path(path_type=Path))
@click.option(
    "--background",
    required=True,
    type=click.Path(path_type=Path),
    help="Predicted background counts: HEALPix or all-sky CAR FITS map.",
)
@click.option(
    "--exposure",
    type=click.Path(path_type=Path),
    help="Exposure (cm2 s): HEALPix or all-sky CAR FITS map.",
)
@click.option("--psf", required=True, help="Gaussian PSF sigma, e.g. 0.15deg.")
@click.option("--binsz", required=True, help="Pixel size of the patches, e.g. 0.1deg.")
@click.option(
    "--out", "-o", required=True, type=click.Path(path_type=Path), help="Survey store (.zarr)."
)
@click.option(
    "--nside",
    type=click.IntRange(min=1),
    default=None,
    help="HEALPix nside of the patch cores (default: lowest within --max-distortion).",
)
@click.option("--proj", type=click.Choice(["ZEA", "TAN"]), default="ZEA", show_default=True)
@click.option(
    "--max-distortion",
    type=float,
    default=0.01,
    show_default=True,
    help="Largest pixel-scale error at the patch corners.",
)
@click.option(
    "--min-scale",
    type=float,
    default=None,
    help="Explicit kernels: smallest scale in pixels (default: the kernels follow from --psf, "
    "docs/psf_rule.md).",
)
@click.option(
    "--n-scale",
    type=click.IntRange(min=1),
    default=None,
    help=f"With --min-scale: number of scales [{KERNEL_DEFAULTS['n_scale']}].",
)
@click.option(
    "--step-scale",
    type=float,
    default=None,
    help=f"With --min-scale: ratio of successive scales [{KERNEL_DEFAULTS['step_scale']}].",
)
@click.option(
    "--threshold",
    type=float,
    default=CWT_DEFAULTS["significance_threshold"],
    show_default=True,
    help="Significance threshold of the CWT.",
)
@click.option(
    "--max-iter", type=click.IntRange(min=1), default=CWT_DEFAULTS["max_iter"], show_default=True
)
@click.option("--emin", type=float, default=None, help="Energy cut (ENERGY column's unit).")
@click.option("--emax", type=float, default=None, help="Energy cut (ENERGY column's unit).")
@click.option("--flux", is_flag=True, help="Ask for fluxes (needs --exposure).")
@click.option(
    "--chunks",
    nargs=2,
    type=click.IntRange(min=1),
    default=None,
    metavar="NY NX",
    help="Tile large patches (dask inside the worker).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Run the patches on a local dask cluster of this many worker processes.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS|FILE",
    help="Run the patches on the dask cluster of this scheduler.",
)
@click.option("--resume", is_flag=True, help="Skip complete patches, continue a half-done one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing survey store.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def survey(counts: Path, out: Path, **options: Any) -> None:
    """Run the CWT over the whole sky: EVENTS_OR_MAP (a FITS event list or a HEALPix/CAR
    counts map) cut into patches, each a cwtflow run with its own store inside --out."""
    from .kernels import CWTKernels
    from .survey import Survey, angle_deg

    psf = angle_deg(options.pop("psf"), "--psf")
    binsz = angle_deg(options.pop("binsz"), "--binsz")
    min_scale, n_scale, step_scale = (
        options.pop(name) for name in ("min_scale", "n_scale", "step_scale")
    )
    kernels = None  # the PSF rule's
    if min_scale is not None:
        n_scale = KERNEL_DEFAULTS["n_scale"] if n_scale is None else n_scale
        step_scale = KERNEL_DEFAULTS["step_scale"] if step_scale is None else step_scale
        kernels = CWTKernels(n_scale, min_scale, step_scale)
    elif n_scale is not None or step_scale is not None:
        raise InputError(
            "--n-scale and --step-scale need --min-scale (without them the kernels follow "
            "from --psf)"
        )
    survey_est = Survey(
        binsz=binsz,
        psf_sigma=psf,
        kernels=kernels,
        nside=options["nside"],
        proj=options["proj"],
        max_distortion=options["max_distortion"],
        emin=options["emin"],
        emax=options["emax"],
        flux=options["flux"],
        chunks=options["chunks"],
        significance_threshold=options["threshold"],
        max_iter=options["max_iter"],
    )
    partition, quiet = survey_est.partition, options["quiet"]
    if not quiet:
        click.echo(
            f"survey: {partition.npatch} patches (nside {partition.nside}, {partition.proj}, "
            f"{partition.binsz:g} deg pixels, margin {partition.margin} pixels, pixel-scale "
            f"distortion <= {partition.max_scale_distortion:.2%})",
            err=True,
        )

    def report(row: dict[str, Any]) -> None:
        if quiet:
            return
        if row.get("skipped"):
            click.echo(f"patch {row['patch']:04d}: complete, skipped", err=True)
            return
        flag = "converged" if row["converged"] else "not converged"
        click.echo(
            f"patch {row['patch']:04d}: {row['iterations']} iterations ({flag}), "
            f"{row['sources']} sources ({row['core_sources']} in its core), "
            f"{row['seconds']:.1f} s",
            err=True,
        )

    with _cluster(options, quiet=quiet) as client:
        result = survey_est.run(
            counts,
            options["background"],
            options["exposure"],
            out=out,
            resume=options["resume"],
            overwrite=options["overwrite"],
            client=client,
            callback=report,
        )
    skipped = int(sum(result.patches["skipped"]))
    click.echo(f"wrote {out} ({partition.npatch} patches, {skipped} already complete)")
