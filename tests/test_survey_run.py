"""Full-sky survey runs on a simulated sky (slow: a dozen patch runs with stores, real
processes): sources at the poles, on patch corners and on the 0/360 seam are found exactly
once; kill (SIGKILL of ``cwtflow survey``) and resume gives the identical catalog."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

import cwtflow
from cwtflow.survey_merge import survey_catalog
from cwtflow.survey_sim import simulate_allsky
from cwtflow.survey_store import complete_patches

pytestmark = pytest.mark.slow

# poles; nside-1 core corners (lat +-41.81 at lon 0/90, lat 0 at lon 45); the seam; others
SOURCES = Table(
    {
        "glon": [0.0, 200.0, 0.0, 359.7, 45.0, 90.0, 300.0, 150.0],
        "glat": [90.0, -90.0, 41.8103, 10.0, 0.0, -41.8103, 30.0, -60.0],
        "counts": [400.0] * 8,
    }
)
SETTINGS = {"binsz": 1.0, "psf_sigma": 1.5, "nside": 1, "max_distortion": 0.5, "max_iter": 4}
CLI = "from cwtflow.cli import main; main()"


@pytest.fixture(scope="module")
def sky(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("allsky")
    return simulate_allsky(folder, SOURCES, psf_sigma=1.5, diffuse_counts=2e5, nside=32)


@pytest.fixture(scope="module")
def result(sky: dict, tmp_path_factory) -> cwtflow.SurveyResult:
    out = tmp_path_factory.mktemp("run") / "sky.zarr"
    return cwtflow.run_survey(
        sky["events"], sky["background"], sky["exposure"], out=out, **SETTINGS
    )


def test_every_source_found_once_at_its_position(result) -> None:
    catalog = result.catalog
    true = SkyCoord(SOURCES["glon"], SOURCES["glat"], unit="deg", frame="galactic")
    found = SkyCoord(catalog["glon"], catalog["glat"], unit="deg", frame="galactic")
    idx, sep, _ = true.match_to_catalog_sky(found)
    assert len(set(idx)) == len(SOURCES) == len(catalog)
    assert (sep.deg < 2 * 1.0).all()  # within 2 pixels
    pos_err = np.asarray(catalog["pos_err"])[idx]
    assert (sep.deg < 5 * pos_err + 0.3).all()
    # both frames carried, consistent
    icrs = SkyCoord(catalog["ra"], catalog["dec"], unit="deg", frame="icrs")
    assert found.separation(icrs).arcsec.max() < 1e-3


def test_no_pair_closer_than_the_merge_distance(result) -> None:
    catalog = result.catalog
    coords = SkyCoord(catalog["glon"], catalog["glat"], unit="deg", frame="galactic")
    _, sep, _ = coords.match_to_catalog_sky(coords, nthneighbor=2)
    assert sep.deg.min() > catalog.meta["MERGEDIS"]


def test_allsky_image_and_picture(result, tmp_path: Path) -> None:
    model = result.image("model", nside=16)
    assert np.isfinite(model).all() and model.max() > 0
    assert result.plot(tmp_path / "sky.png", nside=16).stat().st_size > 10000


def test_cli_survey_killed_and_resumed(sky: dict, result, tmp_path: Path) -> None:
    out = tmp_path / "sky.zarr"
    args = [
        sys.executable, "-c", CLI, "survey", str(sky["events"]), "--background",
        str(sky["background"]), "--exposure", str(sky["exposure"]), "--psf", "1.5deg",
        "--binsz", "1deg", "--nside", "1", "--max-distortion", "0.5", "--max-iter", "4",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "patches").is_dir() and len(complete_patches(out, 12)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = complete_patches(out, 12)
    assert 3 <= len(done) < 12
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("complete, skipped") == len(done)
    a, b = survey_catalog(out), result.catalog
    assert a.colnames == b.colnames and len(a) == len(b)
    for name in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
