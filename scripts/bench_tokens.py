#!/usr/bin/env python3
"""Benchmark k: junk Kubernetes tokens against the TokenReview budget (hardening issue, item 5).

The release bridge (local CA) authenticates by TokenReview against the test suite's fake
Kubernetes API server run as a process (`fake-apiserver`, a debug build with `--features
testing`; a fake because no kube-apiserver runs offline). It answers each review after 5 ms.

- k1: 600 distinct JWT-shaped tokens (the cluster key's kid, plausible claims, random
  signatures), 64 in flight: how many TokenReviews reach the API server (target: < 10).
- k2: the same junk as a continuous flood (64 in flight, 6 s) while a real workload with a
  fresh, valid token asks once after 1 s: its latency (target: < 500 ms), and the reviews.

Run alone: `python3 scripts/bench_tokens.py` (builds what it needs); bench.py runs it too.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (free_port, http_ok, proc_peak_rss_mib, paths)

# The counterpart, not what is measured: a debug build (its reviews are delayed by
# --review-latency anyway), which saves a second release build of the library.
FAKE = os.path.join(bench.TARGET, "debug", "fake-apiserver")


def counts(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/counts", timeout=5) as r:
        return json.loads(r.read())


def run_loadgen(bridge, root, tokens, *args):
    cmd = [bench.LOADGEN, "--json", "--addr", f"localhost:{bridge}", "--ca-cert", root,
           "--tokens-file", tokens, "--identity", "default/web", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenarios():
    work = tempfile.mkdtemp(prefix="icb-tokens-")
    control = bench.free_port()
    fake = subprocess.Popen([FAKE, "--dir", work, "--control-port", str(control), "--real", "2",
                             "--junk", "600", "--review-latency", "5ms"],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "fake.log"), "w"))
    grpc, admin = bench.free_port(), bench.free_port()
    cfg = os.path.join(work, "bridge.yaml")
    with open(cfg, "w") as f:
        f.write(f"""
trustDomain: cluster.local
server:
  listen: 127.0.0.1:{grpc}
  tls: {{mode: issued, dnsNames: [localhost]}}
admin: {{listen: 127.0.0.1:{admin}}}
authn:
  trustedNodeAccounts: []
  kubernetes:
    clusters:
    - id: Kubernetes
      kubeconfig: {work}/kubeconfig
backend:
  type: local
  stateDir: {work}/ca
""")
    out = []
    bridge = None
    try:
        t0 = time.monotonic()
        while not os.path.exists(os.path.join(work, "ready")):
            if fake.poll() is not None or time.monotonic() - t0 > 30:
                raise SystemExit(f"fake-apiserver did not start; see {work}/fake.log")
            time.sleep(0.02)
        bridge = subprocess.Popen([bench.BRIDGE, "serve", "--config", cfg], stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(work, "bridge.log"), "w"),
                                  env={**os.environ, "RUST_LOG": "warn"})
        while not bench.http_ok(f"http://127.0.0.1:{admin}/readyz"):
            if bridge.poll() is not None or time.monotonic() - t0 > 60:
                raise SystemExit(f"bridge did not start; see {work}/bridge.log")
            time.sleep(0.02)
        root = os.path.join(work, "ca", "root-cert.pem")
        junk = os.path.join(work, "junk-tokens")
        with open(os.path.join(work, "real-tokens")) as f:
            real = f.read().split()
        real_files = []
        for i, t in enumerate(real):
            p = os.path.join(work, f"real-{i}")
            with open(p, "w") as f:
                f.write(t + "\n")
            real_files.append(p)

        c0 = counts(control)
        r = run_loadgen(grpc, root, junk, "--concurrency", "64", "--connections", "8", "--count", "600")
        c1 = counts(control)
        r.update(name="k1: 600 junk tokens (cluster kid, random signatures), 64 in flight",
                 token_reviews=c1["tokenreviews"] - c0["tokenreviews"], jwks_fetches=c1["jwks"] - c0["jwks"])
        print(f"  {r['name']}: {r['rps'] if r['ok'] else r['failed'] / r['elapsed_s']:.0f} calls/s, "
              f"{r['token_reviews']} TokenReviews, errors {r['errors']}", file=sys.stderr)
        out.append(r)

        # k2: continuous flood; the real workload asks once, 1 s in, with a fresh token.
        flood = {}

        def run_flood():
            flood.update(run_loadgen(grpc, root, junk, "--concurrency", "64", "--connections", "8",
                                     "--duration", "6s"))
        th = threading.Thread(target=run_flood)
        c0 = counts(control)
        th.start()
        time.sleep(1.0)
        alone = run_loadgen(grpc, root, real_files[0], "--concurrency", "1", "--connections", "1",
                            "--count", "1")
        th.join()
        c1 = counts(control)
        flood.update(name="k2: junk flood, 64 in flight, 6 s; one real workload with a fresh token",
                     token_reviews=c1["tokenreviews"] - c0["tokenreviews"],
                     real_ok=alone["ok"], real_latency_ms=alone["max_ms"],
                     peak_rss_mib=bench.proc_peak_rss_mib(bridge.pid))
        rate = flood["failed"] / flood["elapsed_s"]
        print(f"  {flood['name']}: junk refused at {rate:.0f}/s, real workload ok={alone['ok']} in "
              f"{alone['max_ms']:.1f} ms, {flood['token_reviews']} TokenReviews", file=sys.stderr)
        out.append(flood)
    finally:
        for p in (bridge, fake):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return out


def build():
    subprocess.run(["cargo", "build", "--features", "testing", "--bin", "fake-apiserver"],
                   cwd=bench.ROOT, check=True)


if __name__ == "__main__":
    if bench.PROFILE == "release":
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=bench.ROOT, check=True)
    build()
    results = scenarios()
    print(json.dumps(results, indent=1))
