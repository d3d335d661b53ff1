"""A catalog kept in the run's zarr store, next to the history."""

import warnings

import numpy as np
import pytest
import zarr
from astropy.coordinates import SkyCoord
from astropy.table import QTable, Table
from click.testing import CliRunner

import cwtflow
from cwtflow import StoreError, read_store_catalog, write_store_catalog
from cwtflow.cli import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "run.zarr"
    maps, _ = cwtflow.simulate_sky((64, 128), seed=5)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 1.5, 2.0), max_iter=3)
    result = cwt.analyze(maps, store=path, chunks=64)
    return path, cwtflow.find_sources(result)


def _same(a, b):
    assert a.colnames == b.colnames
    for name in a.colnames:
        if isinstance(a[name], SkyCoord):
            assert isinstance(b[name], SkyCoord)
            np.testing.assert_allclose(a[name].l.deg, b[name].l.deg, atol=1e-12)
            np.testing.assert_allclose(a[name].b.deg, b[name].b.deg, atol=1e-12)
            continue
        assert getattr(a[name], "unit", None) == getattr(b[name], "unit", None), name
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_round_trip_and_plain_zarr(run, tmp_path):
    path, table = run
    assert len(table) > 0
    write_store_catalog(path, table, overwrite=True)
    back = read_store_catalog(path)
    assert isinstance(back, QTable)
    _same(back, table)
    assert back["flux"].unit == "cm-2 s-1" and back["pos_err_95"].unit == "deg"
    group = zarr.open_group(str(path), path="catalog", mode="r")
    assert group.attrs["cwtflow_complete"] is True
    assert group["lon"].metadata.dimension_names == ("source",)
    assert group["lon"].attrs["units"] == "deg"
    # the history still opens and lists only its iterations
    assert cwtflow.open_history(path).iterations[-1] == 3


def test_refuses_to_replace_without_overwrite_and_keeps_empty(run):
    path, table = run
    write_store_catalog(path, table, overwrite=True)
    with pytest.raises(StoreError, match="already holds a catalog"):
        write_store_catalog(path, table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        empty = cwtflow.find_sources(cwtflow.read_result(path), min_significance=1e9)
    write_store_catalog(path, empty, overwrite=True)
    got = read_store_catalog(path)
    assert len(got) == 0 and got.colnames == table.colnames


def test_unmarked_catalog_is_ignored(run):
    path, table = run
    write_store_catalog(path, table, overwrite=True)
    group = zarr.open_group(str(path), path="catalog", mode="r+")
    attrs = dict(group.attrs)
    attrs.pop("cwtflow_complete")
    group.attrs.put(attrs)  # as a kill between data and marker leaves it
    assert read_store_catalog(path) is None
    write_store_catalog(path, table)  # an unmarked leftover is replaced without overwrite
    _same(read_store_catalog(path), table)


def test_not_a_store_is_refused(tmp_path):
    with pytest.raises(StoreError):
        write_store_catalog(tmp_path / "nothing.zarr", Table())


@pytest.mark.slow
def test_cli_keeps_the_catalog_in_the_store(run, tmp_path):
    """A kept catalog is written out again as it is; a catalog option or --recompute finds the
    sources again, and replacing the kept catalog then needs --overwrite."""
    path, table = run
    write_store_catalog(path, table, overwrite=True)
    runner = CliRunner()
    out = tmp_path / "sources.ecsv"
    kept = runner.invoke(cli, ["catalog", str(path), "--out", str(out)])
    assert kept.exit_code == 0, kept.output
    assert f"the catalog kept in {path}" in kept.stdout
    _same(table, cwtflow.read_catalog(out))
    for option in (["--min-significance", "6"], ["--recompute"]):
        other = tmp_path / "other.ecsv"
        refused = runner.invoke(cli, ["catalog", str(path), "--out", str(other), *option])
        assert refused.exit_code != 0 and "keeps a catalog" in refused.output
        assert option[0] in refused.output and "--overwrite" in refused.output
        assert not other.exists()
    done = runner.invoke(cli, ["catalog", str(path), "-o", str(out), "--recompute", "--overwrite"])
    assert done.exit_code == 0, done.output
    _same(read_store_catalog(path), cwtflow.read_catalog(out))
