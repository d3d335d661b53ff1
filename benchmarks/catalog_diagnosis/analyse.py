"""Completeness at equal false-detection rate, cwtflow variants vs the peer; miss diagnosis."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

AREA_PIX = 100 * 1000 if os.environ.get("DIAG_SIM") == "catalog" else 120 * 1000
RATES = (2e-4, 1e-3)  # false per PSF beam (4 pi sigma^2)


def load_peer():
    out = {}
    for cfg in common.configs():
        f = (
            Path(os.environ.get("DIAG_DIR", "/tmp/catalog-diagnosis"))
            / "peer"
            / (common.key(*cfg) + ".npy")
        )
        if f.exists():
            out[common.key(*cfg)] = np.load(f)
    return out


def match(det, truth, radius):
    """best sig per truth (-inf none), and sig of false detections."""
    if len(det) == 0:
        return np.full(len(truth), -np.inf), np.zeros(0)
    d = np.hypot(det[:, 0][:, None] - truth[:, 0][None], det[:, 1][:, None] - truth[:, 1][None])
    real = d.min(axis=1) <= radius
    best = np.where(d <= radius, det[:, 2][:, None], -np.inf).max(axis=0)
    return best, det[~real, 2]


def group_stats(dets, truths, keys, psf):
    radius = max(2 * psf, 2.0)
    best, false = [], []
    for k in keys:
        b, f = match(dets[k], truths[k], radius)
        best.append(b)
        false.append(f)
    return np.concatenate(best), np.concatenate(false)


def threshold_at(false, n_allowed, floor=3.0):
    order = np.sort(false)[::-1]
    n = int(np.floor(n_allowed))
    return floor if order.size <= n else max(floor, float(order[n]) + 1e-9)


def compare(tools, truths, keys_by_group, verbose=True):
    """tools: name -> {key: det (x,y,sig)}; returns table rows."""
    rows = []
    totals = {}
    for (psf, err), keys in keys_by_group.items():
        beams = len(keys) * AREA_PIX / (4 * np.pi * psf**2)
        for name, dets in tools.items():
            best, false = group_stats(dets, truths, keys, psf)
            for rate in RATES:
                thr = threshold_at(false, rate * beams)
                found = int((best >= thr).sum())
                totals[(name, rate, err)] = totals.get((name, rate, err), 0) + found
                rows.append(
                    (psf, err, name, rate, thr, found, best.size, int((false >= thr).sum()))
                )
            for t in (4, 5, 6, 7):
                totals[(name, f"t{t}", err)] = totals.get((name, f"t{t}", err), 0) + int(
                    (best >= t).sum()
                )
                totals[(name, f"f{t}", err)] = totals.get((name, f"f{t}", err), 0) + int(
                    (false >= t).sum()
                )
    if verbose:
        for r in rows:
            psf, err, name, rate, thr, found, n, false = r
            print(
                f"psf {psf:.1f} err {err:.1f} {name:<14} rate {rate:.0e} thr {thr:.2f} "
                f"found {found:4d}/{n:4d} false {false}"
            )
    return rows, totals


def print_totals(totals, names, ntrue):
    for err in common.ERRS:
        print(f"== background error {err}: ({ntrue[err]} true sources)")
        for name in names:
            s = f"{name:<14}"
            for rate in RATES:
                s += f" @{rate:.0e}/beam {totals[(name, rate, err)]:5d}"
            s += "  | fixed thr found/false:"
            for t in (4, 5, 6, 7):
                s += f" {t}:{totals[(name, f't{t}', err)]}/{totals[(name, f'f{t}', err)]}"
            print(s)


def setup(variants):
    peer = load_peer()
    data = {
        v: pickle.loads(
            (
                Path(
                    os.environ.get(
                        "DIAG_OUT",
                        str(Path(os.environ.get("DIAG_DIR", "/tmp/catalog-diagnosis")) / "ours"),
                    )
                )
                / f"{v}.pkl"
            ).read_bytes()
        )
        for v in variants
    }
    first = data[variants[0]]
    keys = [k for k in first if (k in peer or not peer)]
    truths = {k: first[k]["truth"] for k in keys}
    groups = {}
    for cfg in common.configs():
        k = common.key(*cfg)
        if k in keys:
            groups.setdefault((cfg[0], cfg[3]), []).append(k)
    tools = {v: {k: data[v][k]["det"] for k in keys} for v in variants}
    if peer:
        tools["peer"] = {k: peer[k] for k in keys}
    ntrue = {
        e: sum(len(truths[k]) for (p, ee), ks in groups.items() if ee == e for k in ks)
        for e in common.ERRS
    }
    return data, peer, tools, truths, groups, ntrue


if __name__ == "__main__":
    variants = [a for a in sys.argv[1:] if not a.startswith("-")]
    data, peer, tools, truths, groups, ntrue = setup(variants)
    rows, totals = compare(tools, truths, groups, verbose="-v" in sys.argv)
    print_totals(totals, list(tools), ntrue)
