#!/usr/bin/env python3
"""Scale scenarios (#17 item 4): how the bridge's costs grow with the cluster, each at two sizes.

The measured side is the release bridge and `loadgen` (bench.BRIDGE, bench.LOADGEN); the
counterpart is the test suite's fake Kubernetes API server as a process (`fake-apiserver`,
a debug build with `--features testing`, as in bench_tokens.py; a fake because no
kube-apiserver runs offline).

- pods: the pod cache with 10,000 and 100,000 running pods (100 per node, one ztunnel per
  node; plus a baseline of one node with one pod): the bridge's RSS once the cache has synced
  and what it adds per pod, and ztunnel's impersonation calls (ztunnel's token, a pod on its
  node as `ImpersonatedIdentity`), 64 in flight: req/s, p50, p99.
- tokens: the TokenReview cache with 1,000 and 10,000 live entries (distinct valid tokens,
  each reviewed once, then every call answered from the cache; `authn.kubernetes.cacheSize`
  is left at its default, 10,000): req/s and p99 with all cached, the reviews that pass
  made (0 expected), RSS per entry. The fill runs at qps 5000 (default 50, which would take
  200 s to fill 10,000; the measured pass sends no review).
- namespaces: root ConfigMaps in 500 and 5,000 namespaces: time from process start until
  every namespace holds the root, then, after `rotation/start` (the bundle becomes A + B),
  time until every namespace holds B, and the API calls each took. The publisher has no
  client-side rate limit of its own (the qps above is for TokenReviews only): it applies
  one ConfigMap at a time, so the time is the API server's latency per apply times N; the
  fake adds none.
- bundle: a local CA whose trust bundle has 1 and 10 roots (its own and 9 others, from
  `rootBundleFile`), 64 in flight: req/s, p99, CPU ms per certificate, answer size.

Run alone: `python3 scripts/bench_scale.py` (builds what it needs; writes
bench-results-scale.json). `BENCH_SCALE=pods,tokens` runs only those.
"""
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (free_port, http_ok, proc_*, scenario, paths)
import bench_tokens  # noqa: E402  (FAKE, build)


def rss_mib(pid):
    return bench.proc_status_mib(pid, "VmRSS")


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(what, cond, limit, every=0.02):
    """Polls `cond` until true; the seconds it took. Fails after `limit` seconds."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise SystemExit(f"timed out after {limit} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - t0


def pems(text):
    end = "-----END CERTIFICATE-----"
    return [p.strip() + "\n" + end + "\n" for p in text.split(end) if "BEGIN" in p]


class Fake:
    """fake-apiserver with `args`, until stop()."""

    def __init__(self, *args):
        self.dir = tempfile.mkdtemp(prefix="icb-scale-")
        self.control = bench.free_port()
        self.proc = subprocess.Popen(
            [bench_tokens.FAKE, "--dir", self.dir, "--control-port", str(self.control), "--junk", "0", *args],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "fake.log"), "w"))
        wait_for("fake-apiserver", lambda: os.path.exists(os.path.join(self.dir, "ready"))
                 or self.proc.poll() is not None, 300)
        if self.proc.poll() is not None:
            raise SystemExit(f"fake-apiserver exited; see {self.dir}/fake.log")

    def counts(self):
        return json.loads(get(f"http://127.0.0.1:{self.control}/counts"))

    def holding(self, text):
        q = urllib.parse.urlencode({"name": "istio-ca-root-cert", "text": text})
        return int(get(f"http://127.0.0.1:{self.control}/configmaps-holding?{q}"))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def delta(a, b):
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}


class KubeBridge:
    """The release bridge (local CA) with `authn.kubernetes` pointing at `fake`."""

    def __init__(self, fake, nodes=(), qps=50, burst=100, kube="  caSecret: {enabled: false}\n"):
        self.dir = os.path.join(fake.dir, "bridge")
        os.makedirs(self.dir)
        self.grpc, self.admin = bench.free_port(), bench.free_port()
        self.cfg = os.path.join(self.dir, "bridge.yaml")
        with open(self.cfg, "w") as f:
            f.write(f"""
trustDomain: cluster.local
server:
  listen: 127.0.0.1:{self.grpc}
  tls: {{mode: issued, dnsNames: [localhost]}}
  maxConcurrentStreams: 4096
admin: {{listen: 127.0.0.1:{self.admin}}}
authn:
  trustedNodeAccounts: {json.dumps(list(nodes))}
  kubernetes:
    clusters:
    - id: Kubernetes
      kubeconfig: {fake.dir}/kubeconfig
      qps: {qps}
      burst: {burst}
kubernetes:
{kube}backend:
  type: local
  stateDir: {self.dir}/ca
""")

    def start(self, ready=True):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([bench.BRIDGE, "serve", "--config", self.cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "bridge.log"), "w"),
                                     env={**os.environ, "RUST_LOG": "warn"})
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self):
        url = f"http://127.0.0.1:{self.admin}/readyz"
        wait_for("the bridge's /readyz", lambda: bench.http_ok(url) or self.proc.poll() is not None, 120)
        if self.proc.poll() is not None:
            raise SystemExit(f"bridge exited; see {self.dir}/bridge.log")
        self.root = os.path.join(self.dir, "roots.pem")
        with open(self.root, "w") as f:
            f.write(self.roots())

    def roots(self):
        return get(f"http://127.0.0.1:{self.admin}/roots")

    def loadgen(self, tokens, *args, check=True):
        cmd = [bench.LOADGEN, "--json", "--addr", f"localhost:{self.grpc}", "--ca-cert", self.root,
               "--tokens-file", tokens, *args]
        out = subprocess.run(cmd, check=check, capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {"ok": 0}

    def cpu(self):
        return bench.proc_cpu_seconds(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


LOAD = ["--concurrency", "64", "--connections", "8"]


def pods(size):
    """The pod cache with `size` running pods: RSS once synced, impersonation at 64 in flight."""
    nodes = max(1, size // 100)
    fake = Fake("--nodes", str(nodes), "--pods", str(size))
    try:
        b = KubeBridge(fake, nodes=["istio-system/ztunnel"]).start()
        zt = os.path.join(fake.dir, "ztunnel-token")
        imp = ["--identity", "ns-0/sa-0", "--impersonate"]
        # Synced: the first impersonation call succeeds (until the first list, calls are
        # refused UNAVAILABLE after podSyncWait).
        wait_for("the pod cache", lambda: b.loadgen(zt, *imp, "--concurrency", "1", "--connections", "1",
                                                   "--count", "1", check=False)["ok"] == 1, 300, every=0.1)
        synced_s = time.monotonic() - b.t0
        rss, hwm = rss_mib(b.proc.pid), bench.proc_peak_rss_mib(b.proc.pid)
        c0, cpu0 = fake.counts(), b.cpu()
        r = b.loadgen(zt, *imp, *LOAD, "--warmup", "500", "--duration", bench.DURATION)
        cpu = b.cpu() - cpu0
        calls = delta(c0, fake.counts())
        b.stop()
    finally:
        fake.stop()
    name = f"pod cache, {size:,} pods on {nodes:,} nodes" if size > 1 else "pod cache, baseline: 1 node, 1 pod"
    row = dict(scenario="pods", size=size, name=name,
               nodes=nodes, synced_s=synced_s, rss_mib=rss, peak_rss_mib=hwm,
               cpu_ms_per_cert=cpu / max(r["ok"], 1) * 1000, api_calls_during_load=calls,
               **{k: r[k] for k in ("ok", "failed", "errors", "rps", "p50_ms", "p99_ms", "max_ms")})
    print(f"  {row['name']}: synced in {synced_s:.1f} s, RSS {rss:.1f} MiB (peak {hwm:.1f}), "
          f"impersonation {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, failed {r['failed']}", file=sys.stderr)
    return row


def tokens(size):
    """`size` live TokenReview cache entries: one review each, then calls served from the cache."""
    fake = Fake("--real", str(size), "--review-latency", "5ms")
    try:
        b = KubeBridge(fake, qps=5000, burst=5000).start()
        all_tokens = os.path.join(fake.dir, "real-tokens")
        one = os.path.join(fake.dir, "one-token")
        with open(all_tokens) as f, open(one, "w") as g:
            g.write(f.readline())
        ident = ["--identity", "default/web"]
        # Warm the serving path with one token, so the RSS difference is the cache's.
        b.loadgen(one, *ident, *LOAD, "--count", "2000")
        rss0 = rss_mib(b.proc.pid)
        c0 = fake.counts()
        fill = b.loadgen(all_tokens, *ident, *LOAD, "--count", str(size))
        c1 = fake.counts()
        rss1 = rss_mib(b.proc.pid)
        cpu0 = b.cpu()
        r = b.loadgen(all_tokens, *ident, *LOAD, "--duration", bench.DURATION)
        cpu = b.cpu() - cpu0
        c2 = fake.counts()
        hwm = bench.proc_peak_rss_mib(b.proc.pid)
        b.stop()
    finally:
        fake.stop()
    row = dict(scenario="tokens", size=size, name=f"TokenReview cache, {size:,} live entries",
               fill_rps=fill["rps"], fill_failed=fill["failed"], fill_reviews=c1["tokenreviews"] - c0["tokenreviews"],
               reviews_cached_pass=c2["tokenreviews"] - c1["tokenreviews"],
               rss_before_mib=rss0, rss_filled_mib=rss1, peak_rss_mib=hwm,
               bytes_per_entry=(rss1 - rss0) * 1048576 / size,
               cpu_ms_per_cert=cpu / max(r["ok"], 1) * 1000,
               **{k: r[k] for k in ("ok", "failed", "errors", "rps", "p50_ms", "p99_ms", "max_ms")})
    print(f"  {row['name']}: fill {fill['rps']:.0f}/s with {row['fill_reviews']} reviews; cached "
          f"{r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, {row['reviews_cached_pass']} reviews, "
          f"RSS {rss0:.1f} -> {rss1:.1f} MiB", file=sys.stderr)
    return row


def namespaces(size):
    """Root ConfigMaps in `size` namespaces: convergence at start and after a bundle change."""
    fake = Fake("--namespaces", str(size))
    kube = "  rootConfigMap: {enabled: true}\n"  # the CA in the Secret, as deployed
    try:
        b = KubeBridge(fake, kube=kube).start(ready=False)
        url = f"http://127.0.0.1:{b.admin}/roots"
        wait_for("/roots", lambda: bench.http_ok(url) or b.proc.poll() is not None, 120)
        root_a = b.roots()
        wait_for("root A everywhere", lambda: fake.holding(root_a) >= size, 1800, every=0.05)
        first_s = time.monotonic() - b.t0  # from process start
        c_start = fake.counts()
        time.sleep(1)  # quiet: what the bridge spends with nothing to do
        c_idle = fake.counts()
        t0 = time.monotonic()
        req = urllib.request.Request(f"http://127.0.0.1:{b.admin}/rotation/start?reason=bench", method="POST")
        urllib.request.urlopen(req, timeout=30).read()
        new = [p for p in pems(b.roots()) if p not in root_a]
        if len(new) != 1:
            raise SystemExit(f"expected one new root after rotation/start, got {len(new)}")
        wait_for("root B everywhere", lambda: fake.holding(new[0]) >= size, 1800, every=0.05)
        rotate_s = time.monotonic() - t0
        c_end = fake.counts()
        b.stop()
    finally:
        fake.stop()
    start_calls, idle_calls, rotate_calls = delta({}, c_start), delta(c_start, c_idle), delta(c_idle, c_end)
    row = dict(scenario="namespaces", size=size, name=f"root ConfigMaps, {size:,} namespaces",
               start_converge_s=first_s, start_calls=start_calls, idle_calls_1s=idle_calls,
               rotate_converge_s=rotate_s, rotate_calls=rotate_calls,
               rotate_applies=rotate_calls.get("configmaps.apply", 0),
               rotate_ms_per_namespace=rotate_s * 1000 / size)
    print(f"  {row['name']}: all written {first_s:.1f} s after start ({start_calls.get('configmaps.apply', 0)} "
          f"applies); after rotation/start all hold B in {rotate_s:.1f} s ({row['rotate_applies']} applies, "
          f"calls {rotate_calls})", file=sys.stderr)
    return row


def make_ca(work, roots):
    """A P-256 root CA and `roots - 1` other roots: (cert file, key file, bundle file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def root(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert.public_bytes(serialization.Encoding.PEM)

    key, ca = root("bench root 0")
    files = [os.path.join(work, n) for n in ("ca-cert.pem", "ca-key.pem", "bundle.pem")]
    with open(files[0], "wb") as f:
        f.write(ca)
    with open(files[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(files[2], "wb") as f:
        f.write(ca + b"".join(root(f"bench root {i}")[1] for i in range(1, roots)))
    return files


def bundle(roots):
    """A local CA whose trust bundle holds `roots` roots, 64 in flight (as bench.py's a)."""
    work = tempfile.mkdtemp(prefix="icb-bundle-")
    name = f"trust bundle of {roots} root{'s' if roots > 1 else ''}"
    try:
        cert, key, bundle_file = make_ca(work, roots)
        backend = lambda d: f"""backend:
  type: local
  caCertFile: {cert}
  caKeyFile: {key}
  rootBundleFile: {bundle_file}
"""
        r = bench.scenario(name, "ecdsaP256", *LOAD, "--duration", bench.DURATION,
                           "--warmup", "2000", "--identities", "1000", backend=backend, root_file=bundle_file)
        bundle_bytes = os.path.getsize(bundle_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(scenario="bundle", size=roots, name=name,
                bundle_pem_bytes=bundle_bytes, cpu_ms_per_cert=r["cpu_s_per_1000"], peak_rss_mib=r["peak_rss_mib"],
                **{k: r[k] for k in ("ok", "failed", "errors", "rps", "p50_ms", "p99_ms", "max_ms")})


# (family, runner, sizes); pods also runs a baseline: one node, its ztunnel, one pod.
FAMILIES = [
    ("pods", pods, (1, 10_000, 100_000)),
    ("tokens", tokens, (1_000, 10_000)),
    ("namespaces", namespaces, (500, 5_000)),
    ("bundle", bundle, (1, 10)),
]


def scenarios():
    only = [s for s in os.environ.get("BENCH_SCALE", "").split(",") if s]
    out = []
    for family, run, sizes in FAMILIES:
        if not only or family in only:
            out.extend(run(n) for n in sizes)
    return out


def growth(rows):
    """Per family: how the figures grow from the smaller measured size to the larger."""
    g = {}
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], []).append(r)
    if len(p := [r for r in by.get("pods", []) if r["size"] > 1]) == 2:
        lo, hi = p
        g["pods"] = {"bytes_per_pod": (hi["rss_mib"] - lo["rss_mib"]) * 1048576 / (hi["size"] - lo["size"]),
                     "p99_ratio": hi["p99_ms"] / lo["p99_ms"], "rps_ratio": hi["rps"] / lo["rps"],
                     "synced_s_ratio": hi["synced_s"] / lo["synced_s"]}
    if len(t := by.get("tokens", [])) == 2:
        lo, hi = t
        g["tokens"] = {"bytes_per_entry": (hi["rss_filled_mib"] - hi["rss_before_mib"] - lo["rss_filled_mib"]
                                           + lo["rss_before_mib"]) * 1048576 / (hi["size"] - lo["size"]),
                       "p99_ratio": hi["p99_ms"] / lo["p99_ms"], "rps_ratio": hi["rps"] / lo["rps"]}
    if len(n := by.get("namespaces", [])) == 2:
        lo, hi = n
        g["namespaces"] = {"rotate_s_ratio": hi["rotate_converge_s"] / lo["rotate_converge_s"],
                           "applies_ratio": hi["rotate_applies"] / max(lo["rotate_applies"], 1),
                           "size_ratio": hi["size"] / lo["size"]}
    if len(b := by.get("bundle", [])) == 2:
        lo, hi = b
        g["bundle"] = {"cpu_ms_per_extra_root": (hi["cpu_ms_per_cert"] - lo["cpu_ms_per_cert"]) / (hi["size"] - lo["size"]),
                       "p99_ratio": hi["p99_ms"] / lo["p99_ms"], "rps_ratio": hi["rps"] / lo["rps"]}
    return g


COLUMNS = {
    "pods": [("synced s", "synced_s", "{:.1f}"), ("RSS MiB", "rss_mib", "{:.1f}"),
             ("peak RSS MiB", "peak_rss_mib", "{:.1f}"), ("impersonation req/s", "rps", "{:.0f}"),
             ("p50 ms", "p50_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"), ("failed", "failed", "{}"),
             ("CPU ms / cert", "cpu_ms_per_cert", "{:.3f}")],
    "tokens": [("fill req/s", "fill_rps", "{:.0f}"), ("fill reviews", "fill_reviews", "{}"),
               ("cached req/s", "rps", "{:.0f}"), ("p50 ms", "p50_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"),
               ("reviews, cached pass", "reviews_cached_pass", "{}"), ("failed", "failed", "{}"),
               ("RSS before -> filled MiB", None, None), ("bytes / entry", "bytes_per_entry", "{:.0f}")],
    "namespaces": [("all written after start s", "start_converge_s", "{:.1f}"),
                   ("applies at start", None, None), ("bundle change -> all hold it s", "rotate_converge_s", "{:.2f}"),
                   ("ms / namespace", "rotate_ms_per_namespace", "{:.2f}"), ("applies", "rotate_applies", "{}"),
                   ("other calls", None, None)],
    "bundle": [("bundle PEM bytes", "bundle_pem_bytes", "{}"), ("req/s", "rps", "{:.0f}"),
               ("p50 ms", "p50_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"), ("failed", "failed", "{}"),
               ("CPU ms / cert", "cpu_ms_per_cert", "{:.3f}"), ("peak RSS MiB", "peak_rss_mib", "{:.1f}")],
}


def cell(r, key, fmt, header):
    if key is not None:
        return fmt.format(r[key])
    if header.startswith("RSS before"):
        return f"{r['rss_before_mib']:.1f} -> {r['rss_filled_mib']:.1f}"
    if header == "applies at start":
        return str(r["start_calls"].get("configmaps.apply", 0))
    other = {k: v for k, v in r["rotate_calls"].items() if k != "configmaps.apply"}
    return ", ".join(f"{k} {v}" for k, v in other.items()) or "0"


def table(rows):
    for family, cols in COLUMNS.items():
        fr = [r for r in rows if r["scenario"] == family]
        if not fr:
            continue
        print()
        print("| scenario | " + " | ".join(h for h, _, _ in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for r in fr:
            print(f"| {r['name']} | " + " | ".join(cell(r, k, f, h) for h, k, f in cols) + " |")


def main():
    if bench.PROFILE == "release":
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=bench.ROOT, check=True)
    bench_tokens.build()
    rows = scenarios()
    g = growth(rows)
    table(rows)
    print()
    for family, figures in g.items():
        print(f"{family}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    with open(os.path.join(bench.ROOT, "bench-results-scale.json"), "w") as f:
        json.dump({"machine": bench.machine(), "profile": bench.PROFILE, "results": rows, "growth": g}, f, indent=2)


if __name__ == "__main__":
    main()
