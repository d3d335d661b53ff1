"""Full-sky surveys, fast parts: partition geometry, event binning, HEALPix/CAR resampling,
the merge rule, one patch against a standalone run, refused inputs (nothing written)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy_healpix import HEALPix

import cwtflow
from cwtflow import CWT, InputError, StoreError
from cwtflow.events import bin_events, read_events
from cwtflow.resample import read_sky_map, resample
from cwtflow.sky import SkyPartition, pixel_solid_angle, scale_distortion
from cwtflow.survey_merge import merge_catalogs
from cwtflow.survey_patch import PatchJob, patch_inputs, patch_store, run_patch
from cwtflow.survey_sim import simulate_allsky, write_healpix_map
from cwtflow.survey_store import create_survey_store

CLI = "from cwtflow.cli import main; main()"
SOURCES = Table({"glon": [0.0, 359.7, 45.0], "glat": [90.0, 10.0, 0.0], "counts": [400.0] * 3})


@pytest.fixture(scope="module")
def sky(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sky")
    return simulate_allsky(folder, SOURCES, psf_sigma=1.5, diffuse_counts=5e4, nside=16)


def random_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    return np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360, np.degrees(np.arcsin(v[:, 2]))


# --- geometry -------------------------------------------------------------------------------


def test_every_point_has_one_core_inside_its_patch_with_the_margin() -> None:
    partition = SkyPartition(2, 1.0, 6)
    lon, lat = random_points(20000)
    owner = partition.owner(lon, lat)
    assert set(np.unique(owner)) == set(range(48))
    for patch in partition.patches:
        mine = owner == patch.index
        assert patch.contains(lon[mine], lat[mine], margin=6).all()


def test_default_partition_keeps_the_distortion_bound() -> None:
    partition = SkyPartition.choose(0.1, 16, max_distortion=0.01)
    assert partition.nside == 8 and partition.npatch == 768
    assert partition.max_scale_distortion <= 0.01
    assert SkyPartition(4, 0.1, 16).max_scale_distortion > 0.01


def test_distortion_formulas() -> None:
    assert scale_distortion(16.1, "ZEA") == pytest.approx(0.01, rel=0.01)
    assert scale_distortion(5.7, "TAN") == pytest.approx(0.01, rel=0.02)


def test_zea_pixels_have_equal_solid_angles() -> None:
    patch = SkyPartition(1, 1.0, 4).patches[0]
    area = pixel_solid_angle(patch.wcs(), patch.shape)
    np.testing.assert_allclose(area, math.radians(1.0) ** 2, rtol=1e-4)


# --- inputs ---------------------------------------------------------------------------------


def test_events_in_either_frame_bin_the_same(sky: dict, tmp_path: Path) -> None:
    icrs = simulate_allsky(
        tmp_path, SOURCES, psf_sigma=1.5, diffuse_counts=5e4, nside=16, columns="icrs"
    )
    patch = SkyPartition(1, 1.0, 4).patches[4]
    a = bin_events(read_events(sky["events"]), patch.wcs(), patch.shape, 90)
    b = bin_events(read_events(icrs["events"]), patch.wcs(), patch.shape, 90)
    assert a.sum() > 1000 and np.abs(a - b).sum() <= 2  # rounding of the frame conversion
    cut = bin_events(read_events(sky["events"], emin=1000), patch.wcs(), patch.shape, 90)
    assert 0 < cut.sum() < 0.2 * a.sum()  # E^-2 from 100 MeV: ~10 % above 1 GeV


def test_bad_event_columns(tmp_path: Path) -> None:
    path = tmp_path / "ev.fits"
    fits.BinTableHDU.from_columns([fits.Column(name="X", format="D", array=[1.0])]).writeto(path)
    with pytest.raises(InputError, match="GLON/GLAT or RA/DEC"):
        read_events(path)


def test_healpix_resampling_keeps_the_integral(tmp_path: Path) -> None:
    hp = HEALPix(32, order="ring")
    density = 1e4  # counts per sr
    path = write_healpix_map(
        tmp_path / "flat.fits", np.full(hp.npix, density * 4 * np.pi / hp.npix)
    )
    patch = SkyPartition(1, 1.0, 4).patches[3]
    out = resample(read_sky_map(path), patch.wcs(), patch.shape, extensive=True, binsz=1.0)
    # ZEA is equal-area; 4e-5 is the spherical-quadrilateral estimate of a 1 deg ZEA pixel
    np.testing.assert_allclose(out, density * math.radians(1.0) ** 2, rtol=1e-4)


def test_ring_and_nested_give_the_same_patch(sky: dict, tmp_path: Path) -> None:
    ring = read_sky_map(sky["background"])
    nested = HEALPix(16, order="nested")
    lon, lat = nested.healpix_to_lonlat(np.arange(nested.npix))
    values = ring.data[HEALPix(16, order="ring").lonlat_to_healpix(lon, lat)]
    path = write_healpix_map(tmp_path / "nested.fits", values, nested=True)
    patch = SkyPartition(1, 1.0, 4).patches[5]
    a = resample(ring, patch.wcs(), patch.shape, extensive=True, binsz=1.0)
    b = resample(read_sky_map(path), patch.wcs(), patch.shape, extensive=True, binsz=1.0)
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_car_and_healpix_maps_agree(tmp_path: Path) -> None:
    from cwtflow.maps import default_wcs

    wcs = default_wcs((180, 360), binsz=1.0)
    wcs.wcs.crval = [180.0, 0.0]
    _, lat = wcs.wcs_pix2world(*np.meshgrid(np.arange(360), np.arange(180)), 0)
    car_density = 100.0 + 50.0 * np.cos(np.radians(lat))  # per sr
    car = car_density * pixel_solid_angle(wcs, (180, 360))
    fits.PrimaryHDU(car, header=wcs.to_header()).writeto(tmp_path / "car.fits")
    hp = HEALPix(64, order="ring")
    _, hlat = hp.healpix_to_lonlat(np.arange(hp.npix))
    hpx = (100.0 + 50.0 * np.cos(hlat.rad)) * hp.pixel_area.value
    write_healpix_map(tmp_path / "hpx.fits", hpx)
    patch = SkyPartition(1, 1.0, 4).patches[0]
    a = resample(
        read_sky_map(tmp_path / "car.fits"), patch.wcs(), patch.shape, extensive=True, binsz=1.0
    )
    b = resample(
        read_sky_map(tmp_path / "hpx.fits"), patch.wcs(), patch.shape, extensive=True, binsz=1.0
    )
    np.testing.assert_allclose(a, b, rtol=5e-3)  # bilinear interpolation error


@pytest.mark.parametrize(
    ("cards", "message"),
    [({"ORDERING": "SPIRAL", "COORDSYS": "G"}, "ORDERING"), ({"ORDERING": "RING"}, "COORDSYS")],
)
def test_bad_healpix_headers(tmp_path: Path, cards: dict, message: str) -> None:
    hdu = fits.BinTableHDU.from_columns([fits.Column(name="V", format="D", array=np.ones(12))])
    hdu.header.update(cards)
    hdu.writeto(tmp_path / "bad.fits")
    with pytest.raises(InputError, match=message):
        read_sky_map(tmp_path / "bad.fits")


# --- merge ----------------------------------------------------------------------------------


def _table(rows: list[tuple]) -> Table:
    names = ("id", "patch", "owner", "lon", "lat", "significance", "glon", "glat", "ra", "dec")
    table = Table(rows=[(*r[:6], r[3], r[4], 0.0, 0.0) for r in rows], names=names)
    return table


def test_merge_decides_edge_sources_once() -> None:
    a = _table([(1, 0, 0, 10.0, 5.0, 9.0), (2, 0, 1, 20.0, 5.0, 7.0), (3, 0, 1, 30.0, 5.0, 8.0)])
    b = _table([(1, 1, 0, 20.05, 5.0, 6.0), (2, 1, 0, 10.02, 5.0, 12.0)])
    merged = merge_catalogs([a, b], merge_distance=0.3)
    # 10: core detection of patch 0 wins over patch 1's brighter non-core one;
    # 20: neither patch placed it in its own core, kept once (owner confirmed);
    # 30: in patch 1's core, patch 1 did not see it: an edge artefact, dropped
    assert sorted(zip(merged["patch"], merged["patch_source"], strict=True)) == [(0, 1), (0, 2)]
    assert list(merged["id"]) == [1, 2]


# --- patches ---------------------------------------------------------------------------------


def test_patch_equals_standalone_run(sky: dict, tmp_path: Path) -> None:
    survey = cwtflow.Survey(binsz=1.0, psf_sigma=1.5, nside=1, max_distortion=0.5, max_iter=3)
    settings, inputs = survey.check_inputs(sky["events"], sky["background"], sky["exposure"])
    out = tmp_path / "sky.zarr"
    create_survey_store(
        out, survey.partition, settings.to_dict(), inputs, resume=False, overwrite=False
    )
    patch = survey.partition.patches[4]
    row = run_patch(PatchJob(patch, survey.partition.to_dict(), settings, str(out), False))
    assert row["iterations"] == 3
    stored = cwtflow.open_history(patch_store(out, patch)).final
    alone = CWT(survey.kernels, max_iter=3).analyze(patch_inputs(patch, settings))
    assert np.array_equal(stored["counts"].values, np.rint(stored["counts"].values))
    for name in ("model", "approx", "transform_3d", "error"):
        e = alone[name].values
        np.testing.assert_allclose(stored[name].values, e, rtol=1e-10, atol=1e-10 * abs(e).max())
    np.testing.assert_array_equal(stored["support"].values, alone["support"].values)
    again = run_patch(PatchJob(patch, survey.partition.to_dict(), settings, str(out), True))
    assert again["skipped"]


def test_bad_inputs_write_nothing(sky: dict, tmp_path: Path) -> None:
    survey = cwtflow.Survey(binsz=1.0, psf_sigma=1.5, nside=1, max_distortion=0.5, flux=True)
    out = tmp_path / "sky.zarr"
    with pytest.raises(InputError, match="exposure"):
        survey.run(sky["events"], sky["background"], out=out)
    with pytest.raises(InputError, match=r"ORDERING|COORDSYS|HEALPix|image"):
        survey.run(sky["events"], sky["events"], sky["exposure"], out=out)
    assert not out.exists()
    (out / "x").mkdir(parents=True)
    with pytest.raises(StoreError, match="not a cwtflow survey store"):
        survey.run(sky["events"], sky["background"], sky["exposure"], out=out)


def run_survey_cli(counts: Path, sky: dict, out: Path, *options: str):
    """``cwtflow survey COUNTS --background ... --psf 1.5deg --binsz 1deg OPTIONS --out OUT``
    in a subprocess."""
    return subprocess.run(
        [sys.executable, "-c", CLI, "survey", str(counts), "--background",
         str(sky["background"]), "--psf", "1.5deg", "--binsz", "1deg", *options,
         "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_bad_input_one_line(sky: dict, tmp_path: Path) -> None:
    out = tmp_path / "sky.zarr"
    options = ("--nside", "1", "--max-distortion", "0.5", "--emin", "1000")
    proc = run_survey_cli(sky["background"], sky, out, *options)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("cwtflow: error: ")
    assert "energy cut needs an event list" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_kernel_options_need_min_scale(sky: dict, tmp_path: Path) -> None:
    """Without --min-scale the kernels follow from --psf: --n-scale alone is refused."""
    out = tmp_path / "sky.zarr"
    proc = run_survey_cli(sky["events"], sky, out, "--n-scale", "3")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "cwtflow: error: --n-scale and --step-scale need --min-scale (without them the "
        "kernels follow from --psf)"
    )
    assert not out.exists()
