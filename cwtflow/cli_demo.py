"""``cwtflow demo``: a simulated sky with known sources, the CWT run on it with the settings of
the README pictures, its catalog, and how many true sources were found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_options import build_cwt, log_options, make_cwt_options, output_options, write_result
from .cli_run import analyze, command_line, find_sources_logged, setup_logging, summary
from .errors import StoreError

if TYPE_CHECKING:  # heavy modules load when the command runs (fast --help)
    import xarray as xr
    from astropy.table import Table

__all__ = [
    "DEMO_FILES",
    "DEMO_KERNELS",
    "DEMO_MATCH_RADIUS",
    "DEMO_SETTINGS",
    "check_folder",
    "demo",
    "demo_matches",
    "write_table",
]

#: Files `cwtflow demo` writes into its output folder.
DEMO_FILES = {
    "maps": "demo-maps.fits",
    "sources": "demo-sources.ecsv",
    "result": "demo-result.fits",
    "plot": "demo-result.png",
    "catalog": "demo-catalog.ecsv",
    "regions": "demo-catalog.reg",
}
#: Settings of `cwtflow demo`, the same as the README pictures (`docs/make_figures.py`):
#: kernels matched to the simulation's PSF (sigma 2 pixels), and a tolerance of 1 %: the
#: support stops changing after 2 iterations, while the residual variance keeps falling by
#: under 1 % per iteration for hundreds of iterations (the API default 1e-5 is not reached).
DEMO_KERNELS = {"n_scale": 2, "min_scale": 2.0, "step_scale": 2.0}
DEMO_SETTINGS = {"significance_threshold": 3.0, "max_iter": 10, "tol": 0.01}
#: A detection within this many pixels of a true source finds it (as the README pictures).
DEMO_MATCH_RADIUS = 3.0


def check_folder(folder: Path, names: list[str], *, overwrite: bool) -> None:
    """The output folder (or its nearest existing ancestor) can take ``names``."""
    from .io import check_output

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


_DEMO_DEFAULTS = {
    **DEMO_KERNELS,
    "threshold": DEMO_SETTINGS["significance_threshold"],
    "max_iter": DEMO_SETTINGS["max_iter"],
    "tol": DEMO_SETTINGS["tol"],
}


@click.command()
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
@make_cwt_options(**_DEMO_DEFAULTS)
@output_options
@log_options
@click.pass_context
def demo(
    ctx: click.Context,
    folder: Path,
    seed: int,
    size: tuple[int, int],
    n_sources: int | None,
    **options: Any,
) -> None:
    """Simulate a sky with known sources, run the CWT on it (the settings of the README
    pictures) and write the maps, the true sources, the result, a PNG of its images and its
    catalog (ECSV and DS9 regions); then say how many true sources were found and how many
    detections match none."""
    from .catalog_files import write_catalog, write_regions
    from .io import write_maps
    from .plotting import plot_images
    from .provenance import provenance
    from .simulate import simulate_sky

    quiet = setup_logging(ctx, options)
    paths = {key: folder / name for key, name in DEMO_FILES.items()}
    check_folder(folder, list(DEMO_FILES.values()), overwrite=options["overwrite"])
    cwt = build_cwt(options)
    data, sources = simulate_sky(tuple(size), n_sources=n_sources, seed=seed)
    state = analyze(cwt, data, options, quiet=quiet)
    folder.mkdir(parents=True, exist_ok=True)
    overwrite = options["overwrite"]
    record = provenance([], command_line())
    write_maps(data, paths["maps"], overwrite=overwrite, provenance_record=record)
    click.echo(
        f"wrote {paths['maps']} (simulated counts, background, exposure; {size[0]} x "
        f"{size[1]} pixels, seed {seed})"
    )
    write_table(sources, paths["sources"], overwrite=overwrite)
    click.echo(f"wrote {paths['sources']} ({len(sources)} true sources)")
    write_result(state, paths["result"], overwrite=overwrite, provenance_record=record)
    click.echo(f"wrote {paths['result']} ({summary(state)})")
    plot_images(state, paths["plot"])
    click.echo(f"wrote {paths['plot']}")
    table = find_sources_logged(state)
    table.meta["CWTPROV"] = json.dumps(provenance([paths["result"]], command_line()))
    write_catalog(table, paths["catalog"], overwrite=overwrite)
    write_regions(table, paths["regions"], overwrite=overwrite)
    click.echo(f"wrote {paths['catalog']} ({len(table)} sources)")
    click.echo(f"wrote {paths['regions']}")
    found, false = demo_matches(table, sources, state)
    click.echo(
        f"found {int(found.sum())} of {len(sources)} true sources (a detection within "
        f"{DEMO_MATCH_RADIUS:g} pixels); {int(false.sum())} of {len(table)} detections match "
        "no true source"
    )


def demo_matches(table: Table, truth: Table, state: xr.Dataset) -> tuple[Any, Any]:
    """Boolean arrays: which true sources have a detection within `DEMO_MATCH_RADIUS` pixels,
    which detections have no true source that close (sky separations,
    `SkyCoord.match_to_catalog_sky`)."""
    import astropy.units as u
    import numpy as np
    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import proj_plane_pixel_scales

    from .maps import wcs_from_attrs

    if len(table) == 0 or len(truth) == 0:
        return np.zeros(len(truth), bool), np.zeros(len(table), bool)
    wcs = wcs_from_attrs(state.attrs)
    radius = DEMO_MATCH_RADIUS * float(proj_plane_pixel_scales(wcs.celestial).mean()) * u.deg
    frame = str(table.meta.get("FRAME", "galactic"))
    found = SkyCoord(table["lon"], table["lat"], unit="deg", frame=frame)
    true = SkyCoord(truth["lon"], truth["lat"], unit="deg", frame="galactic")
    _, to_found, _ = true.match_to_catalog_sky(found)
    _, to_true, _ = found.match_to_catalog_sky(true)
    return to_found < radius, to_true >= radius


def write_table(table: Table, path: Path, *, overwrite: bool) -> None:
    from .io import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp:
        table.write(tmp, format="ascii.ecsv")
