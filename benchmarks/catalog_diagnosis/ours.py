"""cwtflow on the diagnosis grid: per map and variant, the seeds (with their seed significance)
and every refined candidate (kept or not, its TS), plus the truth. Cached per variant."""

import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import cwtflow
import cwtflow.catalog as cat
import cwtflow.likelihood as lk
import cwtflow.peaks as pk
import cwtflow.refine as rf

OUT = Path(
    os.environ.get(
        "DIAG_OUT", str(Path(os.environ.get("DIAG_DIR", "/tmp/catalog-diagnosis")) / "ours")
    )
)
OUT.mkdir(parents=True, exist_ok=True)

_rec = {}
_orig_refine = cat.refine
_orig_island = pk.island_sources


def _refine(windows, seeds, *a, **k):
    fit = _orig_refine(windows, seeds, *a, **k)
    _rec["seeds"] = np.array(seeds)
    _rec["fit"] = fit
    return fit


def _island(*a, **k):
    s = _orig_island(*a, **k)
    _rec.setdefault("seedsig", []).append(s.significance)
    return s


_orig_merge = cat.merge_large


def _merge(*a, **k):
    fit = _orig_merge(*a, **k)
    _rec["fit"] = fit  # the candidates after the merge of large sources
    return fit


cat.refine = _refine
cat.merge_large = _merge
pk.island_sources = _island

#: Systematic weights (variants "weighted<eps>"): the likelihood of every fit window weighted
#: per pixel by w = 1 / (1 + eps^2 N), N the background counts within the PSF (the background
#: smoothed by the PSF's Gaussian, times 4 pi sigma^2), for a diffuse model whose error is a
#: fraction eps of it on the PSF's scale; an experiment, not in cwtflow.
_WEIGHT_EPS = [0.0]
_orig_loglike = lk.poisson_loglike


def _weighted_loglike(counts, mu, valid):
    if not _WEIGHT_EPS[0]:
        return _orig_loglike(counts, mu, valid)
    mu = np.maximum(mu, 1e-10)
    return np.sum(valid * (counts * np.log(mu) - mu), axis=(1, 2))


def _weighted_refine(windows, seeds, psf_sigma, **kw):
    eps = _WEIGHT_EPS[0]
    if eps:
        smooth = [ndimage.gaussian_filter(b, psf_sigma, mode="nearest") for b in windows.background]
        n_psf = np.stack(smooth) * 4 * np.pi * psf_sigma**2
        windows = windows._replace(valid=windows.valid / (1.0 + eps**2 * n_psf))
    return _refine(windows, seeds, psf_sigma, **kw)


lk.poisson_loglike = _weighted_loglike  # the fit's float ``valid`` becomes its weights
cat.refine = _weighted_refine

VARIANTS = {
    # name: (CWT options, find_sources options, cwtflow.refine constants)
    "float": ({}, {"fit_background": True}),
    "fixed": ({}, {"fit_background": False}),
    "float_win4": ({}, {"fit_background": True}, {"POINT_WINDOW": 4.0}),
    "float_win7": ({}, {"fit_background": True}, {"POINT_WINDOW": 7.0}),
    "float_win9": ({}, {"fit_background": True}, {"POINT_WINDOW": 9.0}),
    # the extension fit on, as the catalog's defaults: with and without the merge of sources
    # larger than the extension model (cwtflow.merge)
    "extended": ({}, {"fit_extension": True}),
    "extended_nomerge": ({}, {"fit_extension": True}, {"catalog.AT_CAP": np.inf}),
    # the same with the systematic weights (see _WEIGHT_EPS)
    **{
        f"weighted{eps}": ({}, {"fit_extension": True}, {"weights.eps": eps})
        for eps in (0.03, 0.05, 0.1, 0.2)
    },
}


def run(maps, psf, cwt_opts, cat_opts):
    psfq = psf * 0.1 * u.deg
    kern = cwt_opts.pop("kernels", None) or cwtflow.CWTKernels.from_psf(psfq, 0.1 * u.deg)
    result = cwtflow.CWT(kern, psf=psfq, **cwt_opts).analyze(maps)
    _rec.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opts = {"min_significance": 3.0, "fit_extension": False, **cat_opts}
        table = cwtflow.find_sources(result, **opts)
    fit = _rec.get("fit")
    if fit is None:
        cand = np.zeros((0, 6))
        seeds = np.zeros((0, 4))
    else:
        cand = np.column_stack(
            [
                fit.x,
                fit.y,
                np.sqrt(fit.ts),
                fit.keep & np.isfinite(fit.x_err),
                fit.counts,
                fit.converged,
            ]
        )
        ss = np.concatenate(_rec["seedsig"]) if _rec["seedsig"] else np.zeros(0)
        seeds = np.column_stack([_rec["seeds"][:, 1], _rec["seeds"][:, 2], _rec["seeds"][:, 0], ss])
    det = (
        np.column_stack(
            [
                np.asarray(table["x"].value),
                np.asarray(table["y"].value),
                np.asarray(table["significance"].value),
            ]
        )
        if len(table)
        else np.zeros((0, 3))
    )
    return {"cand": cand, "seeds": seeds, "det": det}


def run_variant(name, cwt_opts, cat_opts, configs=None):
    f = OUT / f"{name}.pkl"
    if f.exists():
        return pickle.loads(f.read_bytes())
    res = {}
    t0 = time.perf_counter()
    for cfg in configs or common.configs():
        maps, truth = common.sim(*cfg)
        r = run(maps, cfg[0], dict(cwt_opts), dict(cat_opts))
        r["truth"] = np.column_stack(
            [
                np.asarray(truth["x"], float),
                np.asarray(truth["y"], float),
                np.asarray(truth["counts"], float),
            ]
        )
        res[common.key(*cfg)] = r
    f.write_bytes(pickle.dumps(res))
    print(name, f"{time.perf_counter() - t0:.0f}s", flush=True)
    return res


if __name__ == "__main__":
    for name in sys.argv[1:]:
        v = VARIANTS[name]
        changed = v[2] if len(v) > 2 else {}
        saved = {}
        _WEIGHT_EPS[0] = changed.get("weights.eps", 0.0)
        for attr, val in changed.items():
            module, _, name_ = attr.rpartition(".")
            if module == "weights":
                continue
            target = cat if module == "catalog" else rf
            saved[(target, name_)] = getattr(target, name_)
            setattr(target, name_, val)
        run_variant(name, v[0], v[1])
        for (target, name_), val in saved.items():
            setattr(target, name_, val)
