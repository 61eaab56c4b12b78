"""Plots of the load generator's JSON reports (run through bench/plot.sh).

latency.png: publish→deliver latency by percentile, one line per report of the
`latency` scenario. rss.png: server RSS while an `idle` fleet was opening, one line per
report of the `idle` scenario.
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(path, report):
    return path.stem


def main(results):
    reports = []
    for path in sorted(results.glob("*.json")):
        try:
            reports.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError as e:
            sys.exit(f"{path} is not a loadgen report ({e}); remove it or re-run it")

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for path, r in reports:
        if r.get("scenario") != "Latency" or not r["latency"]["samples"]:
            continue
        points = r["latency"]["percentiles_ms"]
        # x = 1/(1-p): the tail gets as much room as the median.
        xs = [1 / (1 - p / 100) if p < 100 else 1e5 for p, _ in points]
        ax.plot(xs, [v for _, v in points], marker="o", label=label(path, r))
        drawn += 1
    if drawn:
        ticks = [50, 90, 99, 99.9, 99.99, 100]
        ax.set_xscale("log")
        ax.set_xticks([1 / (1 - p / 100) if p < 100 else 1e5 for p in ticks])
        ax.set_xticklabels([f"p{p:g}" if p < 100 else "max" for p in ticks])
        ax.set_yscale("log")
        ax.set_ylabel("publish → deliver (ms)")
        ax.set_title("Latency distribution (targeted publishes at a fixed rate)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / "latency.png", dpi=110)
        print(f"wrote {results / 'latency.png'} ({drawn} runs)")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for path, r in reports:
        if r.get("scenario") != "Idle" or not r.get("rss_samples"):
            continue
        samples = r["rss_samples"]
        ax.plot([c for c, _ in samples], [k / 1024 for _, k in samples], marker=".", label=label(path, r))
        drawn += 1
    if drawn:
        ax.set_xlabel("open WebSocket connections")
        ax.set_ylabel("server RSS (MiB)")
        ax.set_title("Server memory while idle connections open")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / "rss.png", dpi=110)
        print(f"wrote {results / 'rss.png'} ({drawn} runs)")
    plt.close(fig)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
