"""Where cwtflow (a variant) loses true sources the peer finds, at equal false rate."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyse import AREA_PIX, group_stats, match, setup, threshold_at

variant = sys.argv[1]
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
data, peer, tools, truths, groups, ntrue = setup([variant])
cats = {}
for (psf, err), keys in groups.items():
    radius = max(2 * psf, 2.0)
    beams = len(keys) * AREA_PIX / (4 * np.pi * psf**2)
    _, f_o = group_stats(tools[variant], truths, keys, psf)
    _, f_p = group_stats(tools["peer"], truths, keys, psf)
    t_o, t_p = threshold_at(f_o, rate * beams), threshold_at(f_p, rate * beams)
    for k in keys:
        tr = truths[k]
        d = data[variant][k]
        b_o, _ = match(tools[variant][k], tr, radius)
        b_p, _ = match(tools["peer"][k], tr, radius)
        seeds, cand = d["seeds"], d["cand"]
        for j in range(len(tr)):
            fo, fp = b_o[j] >= t_o, b_p[j] >= t_p
            if fo:
                c = "found"
            else:
                ds = (
                    np.hypot(seeds[:, 0] - tr[j, 0], seeds[:, 1] - tr[j, 1])
                    if len(seeds)
                    else np.zeros(0)
                )
                near = ds <= radius
                if not near.any():
                    c = "a:no seed"
                elif seeds[near, 3].max() < t_o - 1.5:
                    c = "a:seed below cut"
                else:
                    dc = np.hypot(cand[:, 0] - tr[j, 0], cand[:, 1] - tr[j, 1])
                    idx = np.flatnonzero(near)
                    kept = cand[idx, 3] > 0
                    within = dc[idx] <= radius
                    if (kept & within).any():
                        c = "b:fit TS low"
                    elif within.any():
                        c = "b:dropped(merged)"
                    else:
                        c = "b:fit moved away"
            cats.setdefault((psf, err), {}).setdefault((c, fp), []).append(tr[j, 2])
tot = {}
for (psf, err), d in sorted(cats.items()):
    print(
        f"PSF {psf} err {err}:",
        {f"{c}|peer {'Y' if fp else 'n'}": len(v) for (c, fp), v in sorted(d.items())},
    )
    for kk, v in d.items():
        tot[kk] = tot.get(kk, 0) + len(v)
print("TOTAL:")
for (c, fp), n in sorted(tot.items()):
    print(f"  {c:<20} peer {'found' if fp else 'missed':<7} {n}")
