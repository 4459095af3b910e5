#!/usr/bin/env python3
"""User-space instructions per MiB through the tunnel, counted by callgrind: repeatable within
about 1% on a machine too noisy for timings to show a change of a few percent.

Runs one iteration (criterion's --test) of each named row of benches/throughput.rs under
`valgrind --tool=callgrind`, and of its group's raw_tcp row as the baseline (the same process
and setup, the bytes through the kernel alone), and prints what each row adds per MiB it moves,
in the categories of benches/profile.py:

    cargo bench --bench throughput --no-run
    python3 benches/instructions.py download/hbone download/hbone_to_16k_frames

To compare two builds, run it with --bin on each. valgrind's CPU has no AVX-512 or VAES, so
AES-GCM runs aws-lc's AVX2 code here, and it counts a `rep movsb` a byte at a time: the memcpy
line reads as bytes copied.
"""

import argparse
import collections
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("hboned_profile", HERE / "profile.py")
profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile)

# "  176,443,158 (22.20%)  /path/file.S:function [/object]"
LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[[^\]]*\])?$")


def bench_binary():
    """The newest throughput bench executable cargo built."""
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", HERE.parent / "target"))
    found = [
        p for p in (target / "release" / "deps").glob("throughput-*")
        if p.suffix == "" and os.access(p, os.X_OK)
    ]
    if not found:
        sys.exit("no bench binary: run `cargo bench --bench throughput --no-run` first, or pass --bin")
    return max(found, key=lambda p: p.stat().st_mtime)


def bytes_moved():
    """What one iteration moves: BULK in benches/throughput.rs."""
    src = (HERE / "throughput.rs").read_text()
    m = re.search(r"const BULK: usize = (\d+(?: \* \d+)*);", src)
    if not m:
        sys.exit("benches/throughput.rs: no `const BULK: usize = A * B ...;` to read the bytes from")
    n = 1
    for factor in m.group(1).split("*"):
        n *= int(factor)
    return n


def count(binary, row, out):
    """Instructions per function (self cost) for one iteration of `row`."""
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(binary),
         "--test", f"{row}$"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", out],
        check=True, capture_output=True, text=True,
    ).stdout
    functions = collections.Counter()
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        # "file:function": the file holds no ':', the function may ("h2::proto::...").
        file, _, function = m.group(2).partition(":")
        if "jitterentropy" in file:
            # aws-lc seeding its entropy pool at start: work that varies run to run, not bytes.
            continue
        functions[function or file] += int(m.group(1).replace(",", ""))
    return functions


# Before profile.py's: the bench runs on glibc's allocator (the proxy's jemalloc is set in
# its binary), and h2's tracing spans are visible here.
EXTRA = [
    ("user: malloc (glibc)", r"malloc|_int_free|^free$|realloc"),
    ("user: tracing", r"tracing"),
]


def by_category(functions):
    cats = collections.Counter()
    for name, n in functions.items():
        cat = next((c for c, pat in EXTRA if re.search(pat, name)), None)
        cats[cat or profile.category(name, "")] += n
    return cats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="benchmark rows, as group/name (e.g. download/hbone)")
    ap.add_argument("--bin", type=pathlib.Path, help="the bench executable (default: the newest built)")
    ap.add_argument("--runs", type=int, default=2, help="counts of each row (default 2)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install valgrind)")
    binary = args.bin or bench_binary()
    mib = bytes_moved() / 2**20
    print(f"{binary}: {mib:g} MiB an iteration, {args.runs} run(s) each; instructions per MiB over raw_tcp")
    with tempfile.TemporaryDirectory() as tmp:
        baselines = {}
        for row in args.rows:
            group = row.split("/", 1)[0]
            if group not in baselines:
                baselines[group] = [
                    by_category(count(binary, f"{group}/raw_tcp", f"{tmp}/base{i}"))
                    for i in range(args.runs)
                ]
            runs = []
            for i in range(args.runs):
                cats = by_category(count(binary, row, f"{tmp}/row{i}"))
                base = baselines[group][i]
                runs.append({c: (cats[c] - base[c]) / mib for c in set(cats) | set(base)})
            totals = ", ".join(f"{sum(r.values()) / 1e6:.2f}" for r in runs)
            print(f"\n{row}: {totals} M")
            names = sorted({c for r in runs for c in r}, key=lambda c: -max(r.get(c, 0) for r in runs))
            for c in names:
                values = ", ".join(f"{r.get(c, 0) / 1e6:.3f}" for r in runs)
                print(f"  {c:<28} {values} M")


if __name__ == "__main__":
    main()
