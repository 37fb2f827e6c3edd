#!/usr/bin/env python3
"""A/B of scenario a (local CA, P-256, 64 in flight) between two builds of the bridge, and
with the audit log on (default, stdout) and off, in alternating rounds so that machine noise
spreads over all variants. See BENCHMARKS.md.

    git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release --bins)
    cargo build --release --bins
    python3 scripts/bench_ab.py /tmp/base/target/release [rounds]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    base_dir = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    base = (os.path.join(base_dir, "istio-ca-bridge"), os.path.join(base_dir, "loadgen"))
    cur = (bench.BRIDGE, bench.LOADGEN)
    variants = [
        ("base", base, ""),
        ("current, audit stdout", cur, ""),
        ("current, audit none", cur, "audit:\n  sink: none\n"),
    ]
    common = ["--warmup", "2000", "--identities", "1000"]
    results = {}
    for _ in range(rounds):
        for label, bins, extra in variants:
            bench.BRIDGE, bench.LOADGEN = bins
            backend = lambda d, extra=extra: bench.local_backend("ecdsaP256")(d) + extra
            r = bench.scenario(label, "ecdsaP256", "--concurrency", "64", "--connections", "8",
                               "--duration", "8s", *common, backend=backend)
            results.setdefault(label, []).append(r)
    print("| variant | req/s per round | CPU s / 1000 certs | p99 ms |")
    print("|---|---|---|---|")
    for label, rs in results.items():
        col = lambda key, fmt: " / ".join(format(r[key], fmt) for r in rs)
        print(f"| {label} | {col('rps', '.0f')} | {col('cpu_s_per_1000', '.3f')} | {col('p99_ms', '.1f')} |")

if __name__ == "__main__":
    main()
