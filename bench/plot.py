"""Plots and a summary table of the load generator's JSON reports (run through
bench/plot.sh).

latency.png: publish→deliver latency by percentile, one line per report of the
`latency` scenario. rss.png: server RSS while an `idle` fleet was opening, one line per
report of the `idle` scenario. summary.md: one row per report, the numbers BENCHMARKS.md
quotes.
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(path, report):
    return path.stem


def fmt(v, digits=0):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def summary(reports):
    rows = ["| report | held | msg/s delivered | msg/s acked | p50 / p90 / p99 / max ms | RSS KiB (per conn) | rounds / catch-up s | errors | load avg |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path, r in reports:
        lat = r["latency"]
        latency = "—" if not lat["samples"] else " / ".join(fmt(lat[k], 1) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        rss = fmt(r.get("server_rss_kib"))
        if r.get("server_rss_per_connection_kib") is not None:
            rss += f" ({r['server_rss_per_connection_kib']:.1f})"
        timing = "—"
        if r.get("round_seconds"):
            timing = ", ".join(fmt(s, 3) for s in r["round_seconds"])
        elif "catch_up_seconds" in r:
            timing = f"{fmt(r['catch_up_seconds'], 3)} (lost {r['messages_lost']})"
        rows.append(
            f"| {path.stem} | {fmt(r.get('connections_held'))} | {fmt(r.get('delivered_per_second'))} | "
            f"{fmt(r.get('acked_per_second'))} | {latency} | {rss} | {timing} | {r['errors']} | "
            f"{r['load_average'].split()[0]} |"
        )
    return "\n".join(rows) + "\n"


def main(results):
    reports = []
    for path in sorted(results.glob("*.json")):
        try:
            reports.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError as e:
            sys.exit(f"{path} is not a loadgen report ({e}); remove it or re-run it")

    (results / "summary.md").write_text(summary(reports))
    print(f"wrote {results / 'summary.md'}")

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
