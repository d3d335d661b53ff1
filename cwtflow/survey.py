"""Full-sky surveys: `Survey` (settings) and its `Survey.run` over the patches of a sky
partition, each an ordinary cwtflow run with its own store; patches are the unit of parallelism
(one dask task per patch) and of resume.

Geometry, resampling and merge rules: ``docs/fullsky.md``.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import astropy.units as u
from astropy.table import Table

from .engine import CWT
from .errors import InputError
from .events import is_event_list, read_events
from .kernels import CWTKernels
from .resample import read_sky_map
from .sky import SkyPartition
from .survey_merge import allsky_image, plot_allsky, survey_catalog
from .survey_patch import PatchJob, SurveySettings, run_patch
from .survey_store import create_survey_store, file_provenance

__all__ = ["Survey", "SurveyResult", "angle_deg", "run_survey"]


def angle_deg(value: Any, name: str) -> float:
    """An angle in degrees from a number (deg), a Quantity or a string such as ``"0.1deg"``."""
    try:
        deg = (
            u.Quantity(value, u.deg).to_value(u.deg)
            if not isinstance(value, float | int)
            else value
        )
    except (TypeError, ValueError, u.UnitsError):
        raise InputError(f"{name} must be an angle (e.g. '0.1deg' or 0.1), got {value!r}") from None
    if not (math.isfinite(deg) and deg > 0):
        raise InputError(f"{name} must be a positive angle, got {value!r}")
    return float(deg)


@dataclass
class SurveyResult:
    """What `Survey.run` returns: the store, the partition and one summary row per patch."""

    path: Path
    partition: SkyPartition
    patches: Table
    _catalog: Table | None = field(default=None, repr=False)

    @property
    def catalog(self) -> Table:
        """The merged all-sky catalog (`cwtflow.survey_merge.survey_catalog`)."""
        if self._catalog is None:
            self._catalog = survey_catalog(self.path)
        return self._catalog

    def image(self, name: str = "model", *, nside: int = 64) -> Any:
        """One image of the patches as an all-sky HEALPix map (NESTED)."""
        return allsky_image(self.path, name, nside=nside)

    def plot(self, filename: str | os.PathLike[str], name: str = "model", *, nside: int = 64):
        """A Mollweide PNG of `image` with the catalog."""
        return plot_allsky(
            self.image(name, nside=nside), filename, catalog=self.catalog, title=name
        )


class Survey:
    """A full-sky CWT survey (settings in the constructor; `run` processes the inputs).

    Parameters
    ----------
    binsz : angle
        Pixel size of the patches (deg or a Quantity / string such as ``"0.1deg"``).
    psf_sigma : angle
        Gaussian PSF sigma: the kernels (`CWTKernels.from_psf`, the rule of
        ``docs/psf_rule.md``) and the catalog's point-source template and separations.
    kernels : CWTKernels, optional
        Explicit kernels (in pixels of ``binsz``) instead of the PSF rule's.
    nside : int, optional
        HEALPix nside of the cores; by default the lowest whose patch corners keep the pixel
        scale within ``max_distortion``. An explicit nside over the bound is refused.
    proj, frame
        Patch projection ("ZEA", "TAN") and survey frame ("galactic", "icrs").
    merge_distance : angle, optional
        Detections closer than this are one source (default ``2 * psf_sigma``, at least
        2 pixels). The patch margin is ``halo + ceil(merge_distance / binsz) + 2`` pixels.
    emin, emax : float or Quantity, optional
        Energy cut on the events' ENERGY column.
    flux : bool
        Ask for fluxes: an exposure map is then required.
    chunks : (int, int), optional
        Run large patches tile by tile (dask, inside the worker).
    **cwt
        Keyword arguments of `CWT` (``significance_threshold``, ``max_iter``, ``tol``, ...);
        ``min_significance``, ``deblend``, ``contrast`` go to `find_sources`.
    """

    def __init__(
        self,
        *,
        binsz: Any,
        psf_sigma: Any,
        kernels: CWTKernels | None = None,
        nside: int | None = None,
        proj: str = "ZEA",
        frame: str = "galactic",
        max_distortion: float = 0.01,
        merge_distance: Any = None,
        emin: Any = None,
        emax: Any = None,
        flux: bool = False,
        chunks: tuple[int, int] | None = None,
        min_significance: float = 5.0,
        deblend: bool = True,
        contrast: float = 0.2,
        **cwt: Any,
    ) -> None:
        self.binsz = angle_deg(binsz, "binsz")
        self.psf_sigma = angle_deg(psf_sigma, "psf_sigma")
        self.kernels = kernels or CWTKernels.from_psf(self.psf_sigma * u.deg, self.binsz * u.deg)
        CWT(self.kernels, **cwt)  # checks the estimator's settings now
        self.cwt = dict(cwt)
        self.catalog = {
            "min_significance": float(min_significance),
            "deblend": bool(deblend),
            "contrast": float(contrast),
        }
        default_merge = max(2 * self.psf_sigma, 2 * self.binsz)
        self.merge_distance = (
            default_merge if merge_distance is None else angle_deg(merge_distance, "merge_distance")
        )
        margin = self.kernels.halo + math.ceil(self.merge_distance / self.binsz) + 2
        if nside is None:
            self.partition = SkyPartition.choose(
                self.binsz, margin, proj=proj, frame=frame, max_distortion=max_distortion
            )
        else:
            self.partition = SkyPartition(nside, self.binsz, margin, proj=proj, frame=frame)
            if self.partition.max_scale_distortion > max_distortion:
                worst = self.partition.max_scale_distortion
                raise InputError(
                    f"nside {nside}: pixel scale distortion {worst:.3f} at the patch corners "
                    f"exceeds max_distortion={max_distortion}"
                )
        self.emin, self.emax = emin, emax
        self.flux = bool(flux)
        self.chunks = None if chunks is None else (int(chunks[0]), int(chunks[1]))

    def settings(self, counts: Path, kind: str, background: Path, exposure: Path | None):
        def energy(value: Any) -> float | None:
            if value is None:
                return None
            if isinstance(value, u.Quantity):
                return float(value.to_value(u.MeV))
            return float(value)

        return SurveySettings(
            kernels=self.kernels.to_dict(),
            cwt=self.cwt,
            catalog=self.catalog,
            psf_sigma=self.psf_sigma,
            merge_distance=self.merge_distance,
            counts=str(counts),
            counts_kind=kind,
            background=str(background),
            exposure=None if exposure is None else str(exposure),
            emin=energy(self.emin),
            emax=energy(self.emax),
            chunks=self.chunks,
        )

    def check_inputs(self, counts: Any, background: Any, exposure: Any = None):
        """Read and check every input (columns, frames, HEALPix ordering, ...) before anything
        is written; returns the settings of the run and the inputs' provenance."""
        counts, background = Path(counts).expanduser(), Path(background).expanduser()
        exposure = None if exposure is None else Path(exposure).expanduser()
        if self.flux and exposure is None:
            raise InputError("fluxes need an exposure map (--exposure)")
        if is_event_list(counts):
            kind = "events"
            settings = self.settings(counts.resolve(), kind, background.resolve(), exposure)
            read_events(counts, frame=self.partition.frame, emin=settings.emin, emax=settings.emax)
        else:
            kind = "map"
            if self.emin is not None or self.emax is not None:
                raise InputError(f"{counts}: an energy cut needs an event list, not a map")
            read_sky_map(counts)
        read_sky_map(background)
        if exposure is not None:
            read_sky_map(exposure)
            exposure = exposure.resolve()
        settings = self.settings(counts.resolve(), kind, background.resolve(), exposure)
        inputs = {
            "counts": file_provenance(counts, kind),
            "background": file_provenance(background, "map"),
        }
        if exposure is not None:
            inputs["exposure"] = file_provenance(exposure, "map")
        return settings, inputs

    def run(
        self,
        counts: str | os.PathLike[str],
        background: str | os.PathLike[str],
        exposure: str | os.PathLike[str] | None = None,
        *,
        out: str | os.PathLike[str],
        resume: bool = False,
        overwrite: bool = False,
        client: Any = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> SurveyResult:
        """Run every patch (on ``client``'s cluster, one task per patch, or here in turn) into
        the survey store ``out``; ``resume`` skips complete patches and continues a half-done
        one. ``callback`` receives each patch's summary as it completes."""
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other")
        settings, inputs = self.check_inputs(counts, background, exposure)
        out = Path(out).expanduser()
        create_survey_store(
            out, self.partition, settings.to_dict(), inputs, resume=resume, overwrite=overwrite
        )
        jobs = [
            PatchJob(patch, self.partition.to_dict(), settings, str(out.resolve()), resume)
            for patch in self.partition.patches
        ]
        rows = []
        if client is None:
            for job in jobs:
                rows.append(run_patch(job))
                if callback is not None:
                    callback(rows[-1])
        else:
            from distributed import as_completed

            token = uuid.uuid4().hex[:8]
            futures = [
                client.submit(run_patch, job, key=f"cwtflow-patch-{job.patch.name}-{token}")
                for job in jobs
            ]
            with client.as_current():
                for future in as_completed(futures):
                    rows.append(future.result())
                    if callback is not None:
                        callback(rows[-1])
        rows.sort(key=lambda row: row["patch"])
        columns = (
            "patch",
            "skipped",
            "iterations",
            "converged",
            "sources",
            "core_sources",
            "seconds",
        )
        table = Table(rows=[[row.get(c) for c in columns] for row in rows], names=columns)
        return SurveyResult(out, self.partition, table)


def run_survey(
    counts: str | os.PathLike[str],
    background: str | os.PathLike[str],
    exposure: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    resume: bool = False,
    overwrite: bool = False,
    client: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **settings: Any,
) -> SurveyResult:
    """``Survey(**settings).run(...)`` in one call."""
    return Survey(**settings).run(
        counts,
        background,
        exposure,
        out=out,
        resume=resume,
        overwrite=overwrite,
        client=client,
        callback=callback,
    )
