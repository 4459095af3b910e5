#!/usr/bin/env python3
"""Prints hboned's tunnel/raw ratios from criterion's last run (target/criterion).

For each group with a raw_tcp baseline, prints the median of every other benchmark, the
baseline's, and the ratio as throughput (tunnel/raw: 1.0 = as fast as raw TCP).
Usage: python3 benches/ratio.py [target/criterion]
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")


def median_ns(group, bench):
    est = root / group / bench / "new" / "estimates.json"
    if not est.exists():
        return None
    return json.loads(est.read_text())["median"]["point_estimate"]


def benchmark_json(group, bench):
    p = root / group / bench / "new" / "benchmark.json"
    return json.loads(p.read_text()) if p.exists() else {}


found = False
for group_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
    group = group_dir.name
    base = median_ns(group, "raw_tcp")
    if base is None:
        continue
    for bench_dir in sorted(group_dir.iterdir()):
        bench = bench_dir.name
        if bench in ("raw_tcp", "report"):
            continue
        t = median_ns(group, bench)
        if t is None:
            continue
        found = True
        tp = benchmark_json(group, bench).get("throughput") or {}
        line = f"{group}/{bench}: median {t/1e6:.3f} ms vs raw_tcp {base/1e6:.3f} ms; tunnel/raw throughput ratio {base/t:.2f}"
        if "Bytes" in tp:
            gbit = tp["Bytes"] * 8 / t
            raw_gbit = tp["Bytes"] * 8 / base
            line += f" ({gbit:.2f} vs {raw_gbit:.2f} Gbit/s)"
        elif "Elements" in tp:
            line += f" ({1e9/t:,.0f} vs {1e9/base:,.0f} per second)"
        print(line)
if not found:
    sys.exit(f"no criterion results with a raw_tcp baseline under {root}")
