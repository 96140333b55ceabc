"""Each A/B peer against the op's default, over every result row that timed it: what a run says about the
switches it compared (``python -m reparam_kernels bench --peers DIR``; run_gpu.sh writes it to peers.md).

The bench scripts time the paths the op did not take as peers (``cuda_post_scale``, ``cuda_x_ahead``,
``pivoted_expand``, ...). A switch is worth flipping where its peer beats the default on the cases its target
covers, not on one lucky row: the table gives, per peer and mode, how many rows timed it, how many it won by
more than the noise margin, the geometric mean of peer / ours, and its best and worst rows.
"""
import math
import sys

from .results import load

MARGIN = 0.03  # a peer "wins" a row when it is this much faster than ours (run-to-run noise is ~1-2%)
BASELINES = {"triton", "tinygemm", "two_cublas", "torch_fft"}  # other libraries' paths, not our switches


def _case(row):
    params = ",".join(f"{k}={v}" for k, v in sorted((row.get("params") or {}).items()))
    return f"{row['op']} {row['dtype']} M={row['M']} {row['N']}x{row['K']}" + (f" {params}" if params else "")


def summarize(paths):
    """{(peer, mode): {"rows", "wins", "geomean", "best": (ratio, case), "worst": (ratio, case)}} over the
    rows of the result files `paths` (ratio = peer µs / ours µs: below 1, the peer was faster)."""
    out = {}
    for path in paths:
        try:
            rows = load(path)["rows"]
        except (ValueError, KeyError, OSError) as e:  # not a results file (or a broken one): say so, go on
            print(f"peers: skipped {path}: {e}", file=sys.stderr)
            continue
        for row in rows:
            ours = row.get("ours_us")
            for peer, us in (row.get("peers") or {}).items():
                if peer in BASELINES or not us or not ours or not math.isfinite(us) or not math.isfinite(ours):
                    continue
                ratio = us / ours
                s = out.setdefault((peer, row["mode"]), {"rows": 0, "wins": 0, "logs": 0.0,
                                                          "best": (math.inf, ""), "worst": (0.0, "")})
                s["rows"] += 1
                s["wins"] += ratio < 1 - MARGIN
                s["logs"] += math.log(ratio)
                s["best"] = min(s["best"], (ratio, _case(row)))
                s["worst"] = max(s["worst"], (ratio, _case(row)))
    for s in out.values():
        s["geomean"] = math.exp(s.pop("logs") / s["rows"])
    return out


def render(summary):
    """The summary as a markdown table, peers that won most often first."""
    if not summary:
        return "No A/B peers in these results.\n"
    lines = ["| peer | mode | rows | faster than ours by > 3% | geomean peer / ours | best row | worst row |",
             "|---|---|---|---|---|---|---|"]
    order = sorted(summary.items(), key=lambda kv: (-kv[1]["wins"] / kv[1]["rows"], kv[1]["geomean"], kv[0]))
    for (peer, mode), s in order:
        lines.append(f"| {peer} | {mode} | {s['rows']} | {s['wins']} | {s['geomean']:.3f} | "
                     f"{s['best'][0]:.3f} ({s['best'][1]}) | {s['worst'][0]:.3f} ({s['worst'][1]}) |")
    return "\n".join(lines) + "\n"
