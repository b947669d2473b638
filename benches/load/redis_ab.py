#!/usr/bin/env python3
"""Before/after runs of the paired Redis bench on a noisy machine: runs two (or more)
`redis_paired` binaries alternately, N times each, and prints per variant the median over
the runs of each run's median ratio to `GET` (throughput with 64 callers, latency), with
the range, plus Redis's and the client's CPU per decision.

    python3 benches/load/redis_ab.py RUNS before=/path/to/bin after=/path/to/bin

Environment (`KEYWARD_BENCH_ROUNDS`, `KEYWARD_BENCH_SET`) is passed on to the binaries.
"""

import re
import statistics
import subprocess
import sys


def parse(out):
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.match(r"^[0-9.]+x", cells[2] or ""):
            rows.setdefault(cells[0], {})["latency"] = float(cells[2].split("x")[0])
            rows[cells[0]]["latency_us"] = float(cells[1])
            rows[cells[0]]["throughput"] = float(cells[4].split("x")[0])
            rows[cells[0]]["per_s"] = float(cells[3])
        elif len(cells) == 6 and re.match(r"^[0-9.]+ \(", cells[1] or ""):
            rows.setdefault(cells[0], {})["redis_cpu"] = float(cells[1].split()[0])
            rows[cells[0]]["client_cpu"] = float(cells[5])
    return rows


def main():
    runs = int(sys.argv[1])
    bins = [arg.split("=", 1) for arg in sys.argv[2:]]
    results = {name: [] for name, _ in bins}
    for i in range(runs):
        order = bins if i % 2 == 0 else list(reversed(bins))
        for name, path in order:
            out = subprocess.run([path], capture_output=True, text=True, check=True).stdout
            results[name].append(parse(out))
            load = open("/proc/loadavg").read().split()[0]
            print(f"run {i + 1} {name} done (load {load})", file=sys.stderr)
    variants = list(results[bins[0][0]][0].keys())
    for metric, label in [
        ("throughput", "throughput, 64 callers, vs GET"),
        ("latency", "latency vs GET"),
        ("redis_cpu", "Redis CPU µs per decision"),
        ("client_cpu", "client CPU µs per decision"),
        ("per_s", "per second, 64 callers"),
        ("latency_us", "latency µs, one caller"),
    ]:
        print(f"\n| variant | " + " | ".join(f"{label}: {name}" for name, _ in bins) + " |")
        print("|---|" + "---|" * len(bins))
        for variant in variants:
            cells = []
            for name, _ in bins:
                values = [r[variant][metric] for r in results[name] if variant in r]
                m = statistics.median(values)
                fmt = {"per_s": "{:.0f}", "latency_us": "{:.1f}"}.get(metric, "{:.2f}")
                suffix = "x" if metric in ("throughput", "latency") else ""
                cells.append(
                    (fmt + suffix + " (" + fmt + "–" + fmt + ")").format(m, min(values), max(values))
                )
            print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
