"""Attack scenarios of the hardening issue (#14), run by scripts/bench.py (alone with
`BENCH_ONLY=attacks python3 scripts/bench.py`). See BENCHMARKS.md "Attacks (issue #14)".

i: chain attack. One connection presents a TLS client certificate chain padded with 10
   self-issued CAs and calls CreateCertificate without a token, 64 in flight, while the
   legitimate load of scenario a (dev-issuer tokens, 8 other connections) runs. Targets:
   legit req/s >= 90% of the same load measured alone just before on the same bridge, and
   /healthz p99 < 50 ms (polled every 15 ms during the attack).
j: large unauthenticated messages. 200 concurrent CreateCertificate calls with a 3.9 MB junk
   CSR and no credentials on one connection, `server.maxConcurrentStreams` left at its
   production default (100). Target: peak RSS (VmHWM) < 64 MiB; the bridge still issues
   afterwards.

Each function takes the bench module (`h`) for its Bridge, loadgen and /proc helpers.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

HEALTHZ_EVERY_S = 0.015
JUNK_CSR_BYTES = 3_900_000


class HealthzPoller:
    """Polls the admin port's /healthz (a new connection each time, like a kubelet probe)."""

    def __init__(self, admin):
        self.url = f"http://127.0.0.1:{admin}/healthz"
        self.lat_ms, self.failed = [], 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                    ok = r.status == 200
            except Exception:
                ok = False
            self.lat_ms.append((time.monotonic() - t0) * 1000)
            self.failed += 0 if ok else 1
            self._stop.wait(HEALTHZ_EVERY_S)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def stats(self):
        lat = sorted(self.lat_ms)
        if not lat:
            return {"polls": 0, "failed": self.failed, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        pct = lambda p: lat[min(len(lat), max(1, -(-len(lat) * p // 100))) - 1]
        return {"polls": len(lat), "failed": self.failed, "p50_ms": pct(50), "p99_ms": pct(99),
                "max_ms": lat[-1]}


def chain_attack(h):
    b = h.Bridge("ecdsaP256").start()
    chain_dir = os.path.join(b.dir, "padded")
    subprocess.run([h.LOADGEN, "--make-padded-chain", chain_dir, "--padding-cas", "10"],
                   check=True, capture_output=True)
    legit = ["--concurrency", "64", "--connections", "8", "--duration", h.DURATION,
             "--warmup", "2000", "--identities", "1000"]
    try:
        with HealthzPoller(b.admin) as hz_base:
            base = h.loadgen(b, *legit)
        attacker = subprocess.Popen(
            [h.LOADGEN, "--json", "--addr", f"localhost:{b.grpc}", "--ca-cert", b.root_file,
             "--no-token", "--client-chain", f"{chain_dir}/chain.pem",
             "--client-key", f"{chain_dir}/key.pem",
             "--connections", "1", "--concurrency", "64", "--identities", "1", "--duration", "1h"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(1.0)  # connected and at full rate before the legit load starts
            cpu0 = (h.proc_cpu_seconds(b.proc.pid), h.proc_cpu_seconds(attacker.pid))
            with HealthzPoller(b.admin) as hz:
                under = h.loadgen(b, *legit)
            cpu = (h.proc_cpu_seconds(b.proc.pid) - cpu0[0], h.proc_cpu_seconds(attacker.pid) - cpu0[1])
        finally:
            attacker.send_signal(signal.SIGINT)
            out, _ = attacker.communicate(timeout=60)
        att = json.loads(out.strip().splitlines()[-1])
        r = {
            "name": "i: chain attack (leaf + 10 self-issued CAs, no token, 64 in flight, 1 connection)",
            "legit_base_rps": base["rps"], "legit_base_failed": base["failed"],
            "legit_attack_rps": under["rps"], "legit_attack_failed": under["failed"],
            "legit_attack_p99_ms": under["p99_ms"],
            "ratio": under["rps"] / max(base["rps"], 1e-9),
            "attack_calls_per_s": att["calls_per_s"], "attack_ok": att["ok"],
            "attack_codes": att["errors"],
            "healthz_base": hz_base.stats(), "healthz_attack": hz.stats(),
            "bridge_cpu_s_under_attack": cpu[0], "attacker_cpu_s": cpu[1],
            "legit_window_s": under["elapsed_s"],
            "peak_rss_mib": h.proc_peak_rss_mib(b.proc.pid),
        }
    finally:
        b.stop()
    r["met"] = r["ratio"] >= 0.9 and r["healthz_attack"]["p99_ms"] < 50
    print(f"  {r['name']}: legit {r['legit_base_rps']:.0f} -> {r['legit_attack_rps']:.0f} req/s "
          f"({r['ratio']:.2f}), attack {r['attack_calls_per_s']:.0f} calls/s {r['attack_codes']}, "
          f"/healthz p99 {r['healthz_attack']['p99_ms']:.1f} ms", file=sys.stderr)
    return r


def large_messages(h):
    b = h.Bridge("ecdsaP256", max_streams=None).start()
    try:
        rss_ready = h.proc_peak_rss_mib(b.proc.pid)
        att = h.loadgen(b, "--no-token", "--junk-csr-bytes", str(JUNK_CSR_BYTES), "--identities", "1",
                        "--connections", "1", "--concurrency", "200", "--count", "200")
        peak = h.proc_peak_rss_mib(b.proc.pid)
        after = h.loadgen(b, "--identities", "4", "--count", "4", "--concurrency", "1", "--connections", "1")
        r = {
            "name": "j: 200 x 3.9 MB unauthenticated CreateCertificate, 1 connection, default 100 streams",
            "rss_ready_mib": rss_ready, "peak_rss_mib": peak,
            "attack_ok": att["ok"], "attack_codes": att["errors"], "attack_elapsed_s": att["elapsed_s"],
            "legit_after_ok": after["ok"], "legit_after_failed": after["failed"],
        }
    finally:
        b.stop()
    r["met"] = r["peak_rss_mib"] < 64 and r["legit_after_ok"] == 4
    print(f"  {r['name']}: peak RSS {r['rss_ready_mib']:.1f} -> {r['peak_rss_mib']:.1f} MiB, "
          f"codes {r['attack_codes']}, legit after: {r['legit_after_ok']}/4 ok", file=sys.stderr)
    return r


def run_all(h):
    res = [chain_attack(h), large_messages(h)]
    i, j = res
    print()
    print("| attack | baseline legit req/s | legit req/s under attack | ratio | attack calls/s | attack codes "
          "| /healthz p99 / max ms | met |")
    print("|---|---|---|---|---|---|---|---|")
    hz = i["healthz_attack"]
    print(f"| {i['name']} | {i['legit_base_rps']:.0f} | {i['legit_attack_rps']:.0f} | {i['ratio']:.2f} | "
          f"{i['attack_calls_per_s']:.0f} | {i['attack_codes']} | {hz['p99_ms']:.1f} / {hz['max_ms']:.1f} | "
          f"{'yes' if i['met'] else 'NO'} |")
    print()
    print("| attack | RSS at ready MiB | peak RSS MiB | attack codes | legit call after | met |")
    print("|---|---|---|---|---|---|")
    print(f"| {j['name']} | {j['rss_ready_mib']:.1f} | {j['peak_rss_mib']:.1f} | {j['attack_codes']} | "
          f"{j['legit_after_ok']}/4 ok | {'yes' if j['met'] else 'NO'} |")
    return res
