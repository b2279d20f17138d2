"""Plots benchmark runs (scripts/bench JSON last lines, one per line of the input file).

Left: objects/s against consumer processes (runs with the most common object count).
Right: objects/s against object count (runs with two consumers).
One line per server for our pipeline; the peers measured in the same runs as points.
Called by scripts/plot-performance.
"""

import json
import sys
from collections import Counter, defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"rclone-nocheck": "v", "rclone": "^", "s5cmd": "s"}


def load(path):
    runs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"plot-performance: {path}:{n}: not a JSON line: {e}")
    if not runs:
        sys.exit(f"plot-performance: {path} holds no run")
    return runs


def points(runs, x_of, keep):
    """{(server, tool): [(x, objects/s)]} for the runs `keep` accepts, runs at S3's limit
    (`--throttle`) left out; where several runs share an x, the first (the side-by-side run of the
    first line, which the other points were measured against)."""
    series = defaultdict(dict)
    for run in runs:
        if not keep(run) or run.get("throttle_per_s") is not None:
            continue
        for server, tools in run.get("servers", {}).items():
            for tool, m in tools.items():
                if tool == "pipeline" or tool in MARKERS:
                    series[(server, tool)].setdefault(x_of(run), m["objects_per_s"])
    return {key: list(xy.items()) for key, xy in series.items()}


def draw(ax, series, xlabel, title, log_x=False):
    for (server, tool), xy in sorted(series.items()):
        xy.sort()
        xs, ys = [p[0] for p in xy], [p[1] for p in xy]
        if tool == "pipeline":
            ax.plot(xs, ys, marker="o", linewidth=2, label=f"ours, {server}")
        else:
            ax.scatter(xs, ys, marker=MARKERS[tool], alpha=0.7, label=f"{tool}, {server}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects/s (end to end for ours)")
    ax.set_title(title)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.set_xticks(sorted({x for xy in series.values() for x, _ in xy}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def main():
    runs, out = load(sys.argv[1]), sys.argv[2]
    usual = Counter(r["objects"] for r in runs).most_common(1)[0][0]
    by_consumers = points(runs, lambda r: r["consumers"], lambda r: r["objects"] == usual)
    by_objects = points(runs, lambda r: r["objects"], lambda r: r["consumers"] == 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw(left, by_consumers, "consumer processes", f"{usual:,} objects")
    draw(right, by_objects, "objects", "2 consumers", log_x=True)
    fig.suptitle("scripts/bench on a 2-core machine (servers on the same machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot-performance: wrote {out} from {len(runs)} runs")


if __name__ == "__main__":
    main()
