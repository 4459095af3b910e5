#!/usr/bin/env python3
"""Where the proxies' CPU goes, per byte: reads `perf script -F pid,comm,ip,sym,dso` of a
system-wide `perf record` over the netns benchmark and prints, for each process group (node A's
hboned, node B's hboned, the plain relay's socat processes), the share of its CPU samples in
each category, and with --per-core-gbps, milliseconds of CPU per MiB moved.

    perf record -a -F 999 -e cpu-clock -o /tmp/bench.perf -- target/release/hboned demo --bench
    perf script -i /tmp/bench.perf -F pid,comm,ip,sym,dso | python3 benches/profile.py \\
        --proxies PID_A,PID_B --per-core-gbps 3.8,6.8

Without --proxies, the two processes with the most samples among those whose threads are
named tokio-rt-worker are taken as node A's and node B's proxy, in pid order (node A starts
first). On a VM without hardware counters (cpu-clock sampling), time spent with interrupts off
(softirq delivery, wake-ups) is reported where they are turned back on: the
`_raw_spin_unlock_irqrestore` line.
"""

import argparse
import collections
import re
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")

# (category, pattern on the symbol); the first match wins. Kernel and user space apart.
KERNEL = [
    ("kernel: copy to/from user", r"_copy_(to|from)_iter|copy_user|__check_object_size|rep_movs"),
    ("kernel: irqs-off work (wake-ups, softirq delivery)", r"_raw_spin_unlock_irq|handle_softirqs|__do_softirq"),
    ("kernel: scheduler", r"finish_task_switch|schedule|try_to_wake_up|pick_next|enqueue_task|dequeue_task|update_curr|select_task"),
    ("kernel: netfilter and conntrack", r"^nf_|^nft_|^__nf_|ipt_|conntrack|nf_hook"),
    ("kernel: veth, loopback, device queue", r"veth|loopback|netif_|__dev_queue_xmit|dev_hard_start|process_backlog|net_rx_action|napi|enqueue_to_backlog"),
    ("kernel: TCP/IP", r"tcp|^ip_|^__ip|inet|^sk_|skb|fib_|dst_|raw_v4|^__inet|ip_rcv|route"),
    ("kernel: syscalls, epoll, sockets", r"syscall|entry_SYSCALL|^ep_|epoll|^__sys_|^__x64_sys|fdget|fput|^sock_|sockfd|futex|^do_iter|vfs_|rw_verify"),
    ("kernel: memory (pages, slab)", r"page|folio|kmem|kfree|slab|__alloc|alloc_|free_|memcg|mem_cgroup|rmqueue"),
]
USER = [
    ("user: AES-GCM", r"aes_gcm|gcm_|aes_hw|aesni|ghash"),
    ("user: memcpy/memmove", r"memmove|memcpy|memset"),
    ("user: rustls", r"rustls"),
    ("user: h2", r"\bh2::|<h2::|h2::"),
    ("user: tokio, mio", r"tokio|mio::"),
    ("user: jemalloc", r"je_|_rjem|jemalloc"),
    ("user: locks (std, pthread)", r"mutex|Mutex|pthread|futex"),
    ("user: hboned", r"hboned"),
]


def category(sym, dso):
    if "kernel" in dso:
        for name, pat in KERNEL:
            if re.search(pat, sym):
                return name
        return "kernel: other"
    for name, pat in USER:
        if re.search(pat, sym):
            return name
    return "user: other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxies", help="node A's and node B's proxy pids, comma-separated")
    ap.add_argument("--per-core-gbps", help="hboned's and the relay's Gbit/s per core, comma-separated")
    args = ap.parse_args()
    samples = collections.defaultdict(collections.Counter)
    workers = collections.Counter()
    relay = set()
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, _, sym, dso = m.groups()
        samples[pid][category(sym, dso)] += 1
        if comm == "tokio-rt-worker":
            workers[pid] += 1
        if comm == "socat":
            relay.add(pid)
    if args.proxies:
        a, b = args.proxies.split(",")
    else:
        top = sorted(p for p, _ in workers.most_common(3))
        # The demo process's own runtime is a tokio process too: the proxies are its children,
        # started after it, so the two highest pids among the busiest three.
        a, b = top[-2], top[-1]
    groups = {"node A (client side)": [a], "node B (server side)": [b]}
    if relay:
        groups["plain relay (socat, both nodes)"] = sorted(relay)
    gbps = [float(x) for x in args.per_core_gbps.split(",")] if args.per_core_gbps else None
    names = [n for n, _ in KERNEL] + ["kernel: other"] + [n for n, _ in USER] + ["user: other"]
    totals = {g: sum(sum(samples[p].values()) for p in pids) for g, pids in groups.items()}
    print("| category | " + " | ".join(f"{g} ({totals[g]} samples)" for g in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for name in names:
        row = []
        for g, pids in groups.items():
            n = sum(samples[p][name] for p in pids)
            row.append(f"{100 * n / max(1, totals[g]):.1f}%")
        if any(r != "0.0%" for r in row):
            print(f"| {name} | " + " | ".join(row) + " |")
    if gbps:
        # CPU seconds per MiB for a path at g Gbit/s per core: 8 * 2^20 / (g * 1e9).
        both = totals["node A (client side)"] + totals["node B (server side)"]
        ms = 8 * 2**20 / (gbps[0] * 1e9) * 1e3
        print(f"hboned, both proxies: {ms:.2f} ms of CPU per MiB (node A {ms * totals['node A (client side)'] / both:.2f}, node B {ms * totals['node B (server side)'] / both:.2f})")
        if relay and len(gbps) > 1:
            print(f"plain relay, both nodes: {8 * 2**20 / (gbps[1] * 1e9) * 1e3:.2f} ms of CPU per MiB")


if __name__ == "__main__":
    main()
