#!/usr/bin/env python3
"""Where a proxy's live heap goes: reads jemalloc's heap profile as `jeprof --collapsed` prints
it (one call stack and its bytes per line) and prints the bytes in each category, in total and
per connection. benches/heap-profile runs it on both proxies with 2,000 idle connections held.

    jeprof --collapsed BINARY DUMP | python3 benches/heap.py --connections 2000

The figures are jemalloc's estimates from sampled allocations, so they vary by a few percent
between runs; what the resident set grew by also holds the allocator's partly used pages and
its own metadata, which no call stack owns.
"""

import argparse
import collections
import sys

# (category, substrings of which the call stack (frames joined by ';') must contain all); the
# first match wins.
CATEGORIES = [
    # A task is one allocation (tokio's cell), named by the future its `new_task` frame holds.
    ("inbound stream task (relay)", ["new_task<hboned::proxy::inbound::{impl#1}::relay"]),
    ("outbound connection task", ["new_task<hboned::proxy::outbound::{impl#1}::handle"]),
    ("HBONE client connection task (pool)", ["new_task<hboned::proxy::pool"]),
    ("HBONE server connection task", ["new_task<hboned::proxy::inbound::{impl#1}::serve"]),
    ("other tasks", ["new_task<"]),
    ("h2: streams (slab)", ["h2::proto::streams::store"]),
    ("h2: received frames (slab)", ["h2::proto::streams::buffer::Deque::push_back"]),
    ("h2: frames to send (slab)", ["queue_frame"]),
    ("h2: stream ids (index map)", ["indexmap", "h2::"]),
    ("h2: hpack tables", ["hpack"]),
    ("h2: read and write buffers", ["h2::codec"]),
    ("h2: read and write buffers", ["h2::server::Builder::handshake"]),
    ("live connection table", ["hboned::proxy::live"]),
    ("tokio: socket registrations", ["registration_set"]),
    ("rustls: connection state and buffers", ["rustls"]),
    ("aws-lc (keys, entropy pool)", ["aws_lc"]),
    ("CONNECT requests (hpack-indexed values)", ["ConnectRequest::to_http"]),
    ("connection records and names", ["hboned::metrics::record"]),
    ("tracing", ["tracing_subscriber"]),
]


def category(stack: str) -> str:
    for name, parts in CATEGORIES:
        if all(p in stack for p in parts):
            return name
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=2000, help="connections held")
    args = ap.parse_args()
    totals: collections.Counter[str] = collections.Counter()
    for line in sys.stdin:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        totals[category(stack)] += int(count)
    whole = sum(totals.values())
    if whole == 0:
        print("no samples (was the dump empty, or the binary not the one that wrote it?)")
        return 1
    n = args.connections
    print(f"  {'live heap':45s} {whole / 1024:9.0f} KiB {whole / n:7.0f} B per connection")
    for name, b in totals.most_common():
        print(f"  {name:45s} {b / 1024:9.0f} KiB {b / n:7.0f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
