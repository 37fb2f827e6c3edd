#!/usr/bin/env python3
"""Checks charts/istio-ca-bridge with the real Helm v4 engine (helm-python-sdk) and the real
istio-ca-bridge binary. Driven by tests/helm.rs (`cargo test --test helm`), one check per run:

    check_chart.py CHECK --chart DIR --bin PATH [--fake-apiserver PATH]

CHECK is one of: lint, render, structure, rbac, image, failures, schema, backends, alerts, live.
Each prints what it proved ("ok: ...") and exits 0, or prints the reason and exits 1. Nothing
is mocked: templates are rendered by Helm's Go engine, every rendered config is validated by
`istio-ca-bridge check-config`, rules by `promtool`, and `live` runs the binary exactly as the
rendered Deployment would (args, env, files where the volumes would put them; a Kubernetes
install against the test suite's fake API server, `fake-apiserver`, as its cluster).
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

try:
    import helm_python as helm
except ImportError:  # the Rust driver checks this first; keep the hint for direct runs
    sys.exit("python module helm_python is missing: pip install helm-python-sdk==0.2.2")

RELEASE = "istio-ca-bridge"
NAMESPACE = "istio-system"
CONFIG_PATH = "/etc/istio-ca-bridge/config.yaml"
HARDENED_UID = 65532
# Metric name prefixes the bridge exports; other names in rules (up, kube_*) come from elsewhere.
OWN_METRIC = re.compile(r"\b((?:istio_ca_bridge|citadel_server)_[a-z0-9_]+)\b")


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def ok(msg):
    print(f"ok: {msg}", flush=True)


# ---------------------------------------------------------------- chart access


class Chart:
    def __init__(self, directory, binary, fake_apiserver=None):
        self.dir = os.path.abspath(directory)
        self.bin = os.path.abspath(binary)
        self.fake_apiserver = fake_apiserver and os.path.abspath(fake_apiserver)
        self.chart = helm.Chart.load(self.dir)
        self.tmp = tempfile.mkdtemp(prefix="helm-check-")

    def ci_files(self):
        d = os.path.join(self.dir, "ci")
        files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith((".yaml", ".yml")))
        check(files, f"no values files in {d}")
        return files

    def values_file(self, path):
        with open(path) as f:
            return helm.values_from_yaml(f.read())

    def render(self, values):
        """Template path -> list of parsed objects (NOTES.txt excluded)."""
        out = self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        docs = {}
        for path, text in out.items():
            if path.endswith("NOTES.txt"):
                continue
            objs = []
            for doc in re.split(r"(?m)^---\s*$", text):
                if not doc.strip() or all(
                    not ln.strip() or ln.lstrip().startswith("#") for ln in doc.splitlines()
                ):
                    continue
                try:
                    obj = helm.values_from_yaml(doc)
                except helm.HelmError as e:
                    raise CheckFailed(f"{path} does not parse as YAML: {e}\n{doc}")
                check(
                    isinstance(obj, dict) and obj.get("apiVersion") and obj.get("kind"),
                    f"{path}: a document without apiVersion/kind:\n{doc}",
                )
                objs.append(obj)
            docs[path] = objs
        return docs

    def notes(self, values):
        out = self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return next(v for k, v in out.items() if k.endswith("NOTES.txt"))

    def render_error(self, values):
        try:
            self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as e:
            return str(e)
        return None

    def check_config(self, text, label):
        """Runs the real binary's check-config; returns its effective config (JSON)."""
        path = os.path.join(self.tmp, f"config-{hashlib.sha1(label.encode()).hexdigest()[:8]}.yaml")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([self.bin, "check-config", path], capture_output=True, text=True, timeout=30)
        check(
            p.returncode == 0,
            f"{label}: istio-ca-bridge check-config rejected the rendered config "
            f"(exit {p.returncode}):\n{p.stderr}\n--- config ---\n{text}",
        )
        return json.loads(p.stdout)


def objects(docs, kind=None):
    for objs in docs.values():
        for o in objs:
            if kind is None or o["kind"] == kind:
                yield o


def one(docs, kind):
    found = list(objects(docs, kind))
    check(len(found) == 1, f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def rendered_config(docs):
    """The config.yaml the Deployment mounts, as text."""
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == CONFIG_PATH), None)
    check(mount is not None, f"no volumeMount at {CONFIG_PATH}")
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    check("configMap" in vol, f"{CONFIG_PATH} does not come from a ConfigMap: {vol}")
    cm = next(
        (o for o in objects(docs, "ConfigMap") if o["metadata"]["name"] == vol["configMap"]["name"]),
        None,
    )
    check(cm is not None, f"ConfigMap {vol['configMap']['name']} is mounted but not rendered")
    key = mount.get("subPath")
    check(key in cm.get("data", {}), f"ConfigMap {cm['metadata']['name']} has no key {key!r}")
    return cm["data"][key]


HUMANTIME = {
    "nsec": 1e-9, "ns": 1e-9, "usec": 1e-6, "us": 1e-6, "msec": 1e-3, "ms": 1e-3,
    "seconds": 1, "second": 1, "sec": 1, "s": 1, "minutes": 60, "minute": 60, "min": 60, "m": 60,
    "hours": 3600, "hour": 3600, "hr": 3600, "h": 3600, "days": 86400, "day": 86400, "d": 86400,
    "weeks": 604800, "week": 604800, "w": 604800, "months": 2630016, "month": 2630016,
    "M": 2630016, "years": 31557600, "year": 31557600, "y": 31557600,
}


def seconds(d):
    """A humantime duration as printed by check-config ("20s", "1m 30s", "1day")."""
    parts = re.findall(r"([0-9]+)\s*([a-zA-Z]+)", d)
    check(parts and re.fullmatch(r"(\s*[0-9]+\s*[a-zA-Z]+\s*)+", d), f"unparsable duration {d!r}")
    return sum(int(n) * HUMANTIME[u] for n, u in parts)


def listen_port(addr):
    return int(addr.rsplit(":", 1)[1])


# ---------------------------------------------------------------- value sets

CA_SECRET = {"backends": {"local": {"caSecret": {"name": "istio-ca-bridge-ca", "rootBundleKey": "ca.crt"}}}}


def variants(chart):
    """(label, values) for every values file in ci/ plus variants that move what the chart
    derives (ports, grace period, serving-cert files mode)."""
    out = [(os.path.relpath(p, chart.dir), chart.values_file(p)) for p in chart.ci_files()]
    out.append(("defaults (2 replicas sharing one generated root through the CA Secret)", {}))
    out.append(("no Kubernetes API, generated root in the state dir, replicaCount 1",
                {"replicaCount": 1, "kubernetes": {"enabled": False}}))
    out.append(
        (
            "moved ports, IPv6, long grace, CA Secret, 3 replicas",
            {
                "replicaCount": 3,
                **CA_SECRET,
                "config": {
                    "server": {"listen": "[::]:9443", "shutdownGrace": "1m30s", "maxCsrBytes": 1048576,
                               "maxConcurrentStreams": 4294967295},
                    "admin": {"listen": "0.0.0.0:9090"},
                },
                "terminationGraceExtraSeconds": 5,
            },
        )
    )
    out.append(
        (
            "serving certificate from a Secret (files mode), sub-second grace",
            {
                "replicaCount": 1,
                "servingCert": {"secretName": "istio-ca-bridge-serving"},
                "config": {"server": {"tls": {"mode": "files"}, "shutdownGrace": "1500ms"}},
            },
        )
    )
    vault = {"type": "vault", "address": "https://vault.example:8200", "role": "istio"}
    out.append(("Vault token from a Secret, Vault CA from a Secret, JWT authn",
                {"backends": {"vault": {"authSecret": {"name": "vault-token", "tokenKey": "vault-token"},
                                        "caBundle": {"secretName": "vault-tls"}}},
                 "jwksConfigMaps": [{"name": "jwks"}],
                 "config": {"backend": {**vault, "auth": {"method": "token"}},
                            "authn": {"jwt": [{"issuer": "https://k8s.example", "jwksFile": "/etc/istio-ca-bridge/jwks/jwks/jwks.json"}]}}}))
    out.append(("Vault JWT login with its own audience, extra roots ConfigMap",
                {"replicaCount": 1, "kubernetes": {"enabled": True},
                 "backends": {"vault": {"serviceAccountToken": {"audience": "https://vault.example"},
                                        "rootBundleConfigMap": {"name": "next-root"}}},
                 "config": {"backend": {**vault, "rootsFromMount": False, "auth": {"method": "jwt", "role": "bridge"}}}}))
    out.append(("AWS Private CA with extra roots, no Kubernetes API",
                {"kubernetes": {"enabled": False},
                 "backends": {"awsPca": {"extraRootsConfigMap": {"name": "next-root", "key": "r.pem"}}},
                 "config": {"authn": {"jwt": [{"issuer": "https://k8s.example", "jwksUri": "https://k8s.example/jwks"}]},
                            "backend": {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/x"}}}))
    out.append(("AWS Private CA in intermediate mode, state on node disk, audit to a shared volume",
                {"backends": {"awsPca": {}}, "intermediateState": {"medium": "", "sizeLimit": "2Mi"},
                 "auditLog": {"volume": {"persistentVolumeClaim": {"claimName": "bridge-audit"}}},
                 "config": {"backend": {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/x",
                                        "mode": "intermediate", "intermediateTemplateArn": "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1",
                                        "intermediate": {"ttl": "7days", "stateDir": "/var/lib/bridge/intermediate"}},
                            "audit": {"sink": "file", "path": "/var/log/audit/issued.jsonl"}}}))
    out.append(("Vault in intermediate mode without a state dir (memory only)",
                {"backends": {"vault": {"authSecret": {"name": "vault-token"}}},
                 "config": {"backend": {**vault, "auth": {"method": "token"}, "mode": "intermediate"}, "audit": {"sink": "none"}}}))
    out.append(("DigiCert mTLS host: client certificate Secret, roots from a Secret, DigiCert's CA from a ConfigMap",
                {"replicaCount": 3,
                 "backends": {"digicert": {"clientCertSecret": {"name": "digicert-client"},
                                           "trustBundle": {"secretName": "digicert-roots", "rootsKey": "ca.crt"},
                                           "caBundle": {"configMapName": "proxy-ca", "key": "proxy.pem"}}},
                 "config": {"authn": {"jwt": [{"issuer": "https://k8s.example", "jwksUri": "https://k8s.example/jwks"}]},
                            "backend": {"type": "digicert", "baseUrl": "https://clientauth.one.digicert.com", "profileId": "p-1",
                                        "seat": {"strategy": "fixed", "id": "istio-mesh"}, "validityUnit": "days"},
                            "audit": {"sink": "file"}}}))
    out.append(
        (
            "Kubernetes integration with a CA Secret, 2 replicas",
            {**CA_SECRET, "kubernetes": {"enabled": True, "clusterId": "primary"},
             "config": {"kubernetes": {"istiodCert": {"revisions": ["canary"]}}}},
        )
    )
    out.append(
        (
            "shared generated root in a Secret of its own namespace, ClusterTrustBundle, 3 replicas",
            {"replicaCount": 3,
             "config": {"kubernetes": {"caSecret": {"namespace": "mesh-ca", "name": "mesh-root"},
                                       "clusterTrustBundle": {"enabled": True}},
                        "rotation": {"skew": "10m", "autoAdvance": False, "pollInterval": "30s"}}},
        )
    )
    return out


# ---------------------------------------------------------------- checks


def check_lint(chart):
    sets = [("default values", None)] + [(os.path.relpath(p, chart.dir), chart.values_file(p)) for p in chart.ci_files()]
    for label, values in sets:
        report = helm.lint(chart.dir, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [e for e in report["errors"]]
        check(not problems, f"helm lint --strict ({label}) reports:\n" + json.dumps(problems, indent=2))
        info = [m["error"] for m in report["messages"] if m["severity"] < 2]
        ok(f"helm lint --strict passes with {label}" + (f" (info only: {info})" if info else ""))
    # Control: the same lint call does report a broken value, so the passes above mean something.
    report = helm.lint(chart.dir, {"replicaCount": "two"}, strict=True, namespace=NAMESPACE)
    check(
        any("replicaCount" in e for e in report["errors"]),
        f"lint did not report replicaCount: \"two\": {report}",
    )
    ok("lint reports a schema violation (control)")


def check_render(chart):
    for path in chart.ci_files():
        label = os.path.relpath(path, chart.dir)
        values = chart.values_file(path)
        chart.chart.validate_schema(values)
        docs = chart.render(values)
        kinds = sorted(o["kind"] for o in objects(docs))
        text = rendered_config(docs)
        eff = chart.check_config(text, label)
        ok(f"{label}: {len(kinds)} objects parse ({', '.join(kinds)}); check-config accepts the config "
           f"(backend {eff['backend']['type']}, trust domain {eff['trustDomain']})")
        # What each realistic install promises.
        want = {"Deployment", "Service", "ServiceAccount", "ConfigMap", "PodDisruptionBudget"}
        if "ca-secret" in label:
            want |= {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
            dash = [o for o in objects(docs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
            check(len(dash) == 1, f"{label}: no Grafana dashboard ConfigMap")
            board = json.loads(next(iter(dash[0]["data"].values())))
            check(board.get("panels"), f"{label}: dashboard has no panels")
            check(eff["backend"]["caCertFile"] and eff["backend"]["caKeyFile"], f"{label}: CA files not set")
            ok(f"{label}: dashboard JSON parses ({len(board['panels'])} panels); CA from the Secret")
        if eff["backend"]["type"] == "awsPca":
            # IRSA: the role ARN is on the ServiceAccount the pod runs as.
            sa = one(docs, "ServiceAccount")
            arn = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
            check(re.fullmatch(r"arn:aws:iam::[0-9]{12}:role/.+", arn), f"{label}: no IRSA role ARN on the ServiceAccount")
            check(one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"],
                  f"{label}: the pod does not run as the annotated ServiceAccount")
            ok(f"{label}: IRSA role {arn} on ServiceAccount {sa['metadata']['name']}; CA {eff['backend']['caArn']}")
        missing = want - set(kinds)
        check(not missing, f"{label}: missing {sorted(missing)}")
    # The defaults alone install: 2 replicas signing with ONE generated root, which the bridge
    # keeps in the Secret every replica reads (Config::shared_local_ca), with the RBAC for it.
    chart.chart.validate_schema({})
    docs = chart.render({})
    eff = chart.check_config(rendered_config(docs), "default values")
    dep = one(docs, "Deployment")
    k = eff["kubernetes"]
    check(dep["spec"]["replicas"] == 2, f"default values: {dep['spec']['replicas']} replicas")
    check(eff["backend"]["type"] == "local" and eff["backend"]["caCertFile"] is None and eff["authn"]["kubernetes"]
          and k["caSecret"]["enabled"], f"default values: the generated root is not shared: {eff['backend']} {k['caSecret']}")
    ns, name = k["caSecret"]["namespace"] or k["leaderElection"]["namespace"], k["caSecret"]["name"]
    check((ns, name) == (NAMESPACE, "istio-ca-bridge-ca"), f"default values: CA Secret {ns}/{name}")
    grants = rbac_grants(docs, "default values")
    check({(ns, "", "secrets", name, "get"), (ns, "", "secrets", name, "update"), (ns, "", "secrets", None, "create")} <= grants,
          f"default values: the CA Secret's grants are missing: {sorted(grants, key=str)}")
    ok(f"default values: {len(list(objects(docs)))} objects, 2 replicas; check-config accepts the config; the generated "
       f"root is shared through Secret {ns}/{name} (get/update by name, create)")


def backend_files(be):
    """Files a backend's effective config reads (each must come from a read-only mount)."""
    if be["type"] == "local":
        return [be.get(k) for k in ("caCertFile", "caKeyFile", "chainFile", "rootBundleFile")]
    if be["type"] == "vault":
        a = be["auth"]
        return [be["tls"].get(k) for k in ("caFile", "clientCertFile", "clientKeyFile")] + [be.get("rootBundleFile")] + \
            [a.get(k) for k in ("tokenFile", "roleIdFile", "secretIdFile")]
    if be["type"] == "awsPca":
        return [be.get("extraRootsFile")]
    if be["type"] == "digicert":
        return [be["auth"].get(k) for k in ("apiKeyFile", "clientCertFile", "clientKeyFile")] + \
            [be.get(k) for k in ("caFile", "trustBundleFile", "intermediatesFile")]
    if be["type"] == "certManager":
        return [be.get("kubeconfig"), be.get("rootBundleFile")]
    raise CheckFailed(f"backend type {be['type']} unknown to this test: add its files to backend_files")


def check_structure(chart):
    for label, values in variants(chart):
        docs = chart.render(values)
        eff = chart.check_config(rendered_config(docs), label)
        dep = one(docs, "Deployment")
        svc = one(docs, "Service")
        pod_t = dep["spec"]["template"]
        pod = pod_t["spec"]
        check(len(pod["containers"]) == 1, f"{label}: expected one container")
        c = pod["containers"][0]

        # Ports: Service == container == the rendered config's listen addresses.
        grpc, admin = listen_port(eff["server"]["listen"]), listen_port(eff["admin"]["listen"])
        cports = {p["name"]: p["containerPort"] for p in c["ports"]}
        sports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(cports == {"grpc": grpc, "http-monitoring": admin},
              f"{label}: container ports {cports} != config listen ports grpc={grpc} admin={admin}")
        check(set(sports) == {"grpc", "http-monitoring"}, f"{label}: Service ports {sorted(sports)}")
        for name, want in (("grpc", grpc), ("http-monitoring", admin)):
            sp = sports[name]
            check(sp["port"] == want and sp["targetPort"] in (name, want),
                  f"{label}: Service port {name} = {sp} but the config listens on {want}")
        # Probes: real paths on the admin port.
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            g = c[probe]["httpGet"]
            port = cports.get(g["port"], g["port"])
            check(g["path"] == path and port == admin,
                  f"{label}: {probe} {g} should be GET {path} on the admin port {admin}")
        # Command (= the image's ENTRYPOINT, checked in `image`) and config mount.
        check(c["command"] == ["istio-ca-bridge", "serve", "--config", CONFIG_PATH] and "args" not in c,
              f"{label}: command {c.get('command')} args {c.get('args')}")
        # Grace period derived from the config's shutdownGrace.
        grace = seconds(eff["server"]["shutdownGrace"])
        tgps = pod["terminationGracePeriodSeconds"]
        check(isinstance(tgps, int) and tgps > grace,
              f"{label}: terminationGracePeriodSeconds {tgps} is not above shutdownGrace {grace}s")
        # Hardened security context (container level, pod level for the pod-wide fields).
        sc, psc = c["securityContext"], pod.get("securityContext", {})
        for k, want in (("runAsNonRoot", True), ("runAsUser", HARDENED_UID), ("runAsGroup", HARDENED_UID),
                        ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
            check(sc.get(k) == want, f"{label}: securityContext.{k} = {sc.get(k)!r}, want {want!r}")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities {sc.get('capabilities')}")
        check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccompProfile {sc.get('seccompProfile')}")
        check(psc.get("runAsNonRoot") is True and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
              f"{label}: pod securityContext {psc}")
        kube_on = eff["authn"].get("kubernetes") is not None
        check(pod.get("automountServiceAccountToken") is kube_on,
              f"{label}: automountServiceAccountToken {pod.get('automountServiceAccountToken')!r}, but the bridge "
              f"{'calls' if kube_on else 'does not call'} the Kubernetes API")
        check(c.get("resources", {}).get("requests"), f"{label}: no resource requests")
        # Selectors: Service, PDB and spread constraints pick exactly these pods.
        labels = pod_t["metadata"]["labels"]
        sel = dep["spec"]["selector"]["matchLabels"]
        check(sel.items() <= labels.items(), f"{label}: Deployment selector {sel} vs pod labels {labels}")
        check(svc["spec"]["selector"] == sel, f"{label}: Service selector {svc['spec']['selector']} != {sel}")
        pdb = one(docs, "PodDisruptionBudget")
        check(pdb["spec"]["selector"]["matchLabels"] == sel, f"{label}: PDB selector")
        tsc = pod.get("topologySpreadConstraints", [])
        check(tsc and all(t["labelSelector"]["matchLabels"] == sel for t in tsc), f"{label}: topologySpreadConstraints {tsc}")
        check(labels.get("sidecar.istio.io/inject") == "false", f"{label}: the CA pod would get a sidecar")
        check(dep["spec"]["replicas"] == values.get("replicaCount", 2), f"{label}: replicas {dep['spec']['replicas']}")
        # Every file the config names is provided by a mount; the state dir is writable.
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}

        def mount_for(path):
            best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default=None)
            check(best is not None, f"{label}: {path} (from the config) is not under any volumeMount")
            return mounts[best], vols[mounts[best]["name"]]

        be = eff["backend"]
        # Where the config makes the bridge write (the root filesystem is read-only): each on a
        # writable volume of its own, and no writable volume anywhere else.
        writable = {}
        if be["type"] == "local":
            m, v = mount_for(be["stateDir"])
            check(not m.get("readOnly") and ("emptyDir" in v or "persistentVolumeClaim" in v),
                  f"{label}: backend.stateDir is not on a writable volume: {m} {v}")
            writable[m["mountPath"]] = "backend.stateDir"
        if be.get("mode") == "intermediate" and be["intermediate"]["stateDir"]:
            sd = be["intermediate"]["stateDir"]
            m, v = mount_for(sd)
            # Per pod, never shared: every replica must have its own intermediate and key.
            check(m["mountPath"] == sd and not m.get("readOnly") and set(v) == {"name", "emptyDir"} and "subPath" not in m,
                  f"{label}: backend.intermediate.stateDir {sd} is not its own writable per-pod emptyDir: {m} {v}")
            writable[m["mountPath"]] = "backend.intermediate.stateDir"
        if eff["audit"]["sink"] == "file":
            ap = eff["audit"]["path"]
            m, v = mount_for(ap)
            check(m["mountPath"] == os.path.dirname(ap) and not m.get("readOnly") and "subPath" not in m,
                  f"{label}: audit.path {ap}: its directory is not a writable mount of its own: {m}")
            check(m["mountPath"] not in writable, f"{label}: audit.path shares the volume of {writable.get(m['mountPath'])}")
            if "emptyDir" in v:
                pass
            else:  # a user-given volume, maybe shared: one directory per replica
                check(m.get("subPathExpr") == "$(POD_NAME)" and {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                      in c.get("env", []), f"{label}: the audit volume {v} is not split per pod (subPathExpr $(POD_NAME)): {m}")
            writable[m["mountPath"]] = "audit.path"
        else:
            check(eff["audit"]["path"] is None, f"{label}: audit.path {eff['audit']['path']} without sink file")
        extra = {m["mountPath"] for m in c["volumeMounts"]} - set(writable) - \
            {m["mountPath"] for m in values.get("extraVolumeMounts", [])}
        for mp in extra:
            mm, vv = mounts[mp], vols[mounts[mp]["name"]]
            check(mm.get("readOnly") or mp == CONFIG_PATH and "configMap" in vv,
                  f"{label}: {mp} is mounted writable ({vv}) but the config writes nothing there")
        files = backend_files(be)
        files += [eff["server"]["tls"].get(k) for k in ("certFile", "keyFile")]
        files += [j.get("jwksFile") for j in eff["authn"]["jwt"]]
        for f in filter(None, files):
            m, v = mount_for(f)
            src = v.get("secret") or v.get("configMap") or v.get("projected")
            check(src is not None and m.get("readOnly"),
                  f"{label}: {f} should come from a read-only Secret/ConfigMap/projected mount")
            key = os.path.relpath(f, m["mountPath"])
            check("/" not in key, f"{label}: {f} is nested below its mount")
            if "projected" in v:  # only ever the Vault login token: a short-lived token for Vault's audience
                src = v["projected"]["sources"]
                want_aud = values.get("backends", {}).get("vault", {}).get("serviceAccountToken", {}).get("audience", "vault")
                check(be["type"] == "vault" and f == be["auth"].get("tokenFile") and len(src) == 1
                      and src[0]["serviceAccountToken"]["audience"] == want_aud and src[0]["serviceAccountToken"]["path"] == key,
                      f"{label}: projected volume {v} for {f}")
        # Named Secrets and ConfigMaps are the ones the values name (never inlined: the chart
        # renders no Secret at all).
        check(not list(objects(docs, "Secret")), f"{label}: the chart rendered a Secret")
        vw = values.get("backends", {}).get("vault", {})
        dw = values.get("backends", {}).get("digicert", {})
        for field, want_name, kind in (
            (be.get("auth", {}).get("tokenFile") if be["type"] == "vault" and be["auth"]["method"] == "token" else None,
             vw.get("authSecret", {}).get("name"), "secret"),
            (be.get("auth", {}).get("roleIdFile") if be["type"] == "vault" else None, vw.get("authSecret", {}).get("name"), "secret"),
            (be.get("tls", {}).get("caFile") if be["type"] == "vault" else None,
             vw.get("caBundle", {}).get("secretName") or vw.get("caBundle", {}).get("configMapName"),
             "secret" if vw.get("caBundle", {}).get("secretName") else "configMap"),
            (be.get("rootBundleFile") if be["type"] == "vault" else None, vw.get("rootBundleConfigMap", {}).get("name"), "configMap"),
            (be.get("extraRootsFile") if be["type"] == "awsPca" else None,
             values.get("backends", {}).get("awsPca", {}).get("extraRootsConfigMap", {}).get("name"), "configMap"),
            (be["auth"].get("apiKeyFile") if be["type"] == "digicert" else None, dw.get("apiKeySecret", {}).get("name"), "secret"),
            (be["auth"].get("clientCertFile") if be["type"] == "digicert" else None, dw.get("clientCertSecret", {}).get("name"), "secret"),
            (be["auth"].get("clientKeyFile") if be["type"] == "digicert" else None, dw.get("clientCertSecret", {}).get("name"), "secret"),
            (be.get("trustBundleFile") if be["type"] == "digicert" else None,
             dw.get("trustBundle", {}).get("secretName") or dw.get("trustBundle", {}).get("configMapName"),
             "secret" if dw.get("trustBundle", {}).get("secretName") else "configMap"),
            (be.get("intermediatesFile") if be["type"] == "digicert" else None,
             dw.get("trustBundle", {}).get("secretName") or dw.get("trustBundle", {}).get("configMapName"),
             "secret" if dw.get("trustBundle", {}).get("secretName") else "configMap"),
            (be.get("caFile") if be["type"] == "digicert" else None,
             dw.get("caBundle", {}).get("secretName") or dw.get("caBundle", {}).get("configMapName"),
             "secret" if dw.get("caBundle", {}).get("secretName") else "configMap"),
        ):
            if field and want_name:
                _, v = mount_for(field)
                got = v.get(kind, {}).get("secretName" if kind == "secret" else "name")
                check(got == want_name, f"{label}: {field} mounted from {v}, want {kind} {want_name}")
        if "caSecret" in values.get("backends", {}).get("local", {}):
            _, v = mount_for(eff["backend"]["caCertFile"])
            check(v["secret"]["secretName"] == values["backends"]["local"]["caSecret"]["name"],
                  f"{label}: CA mounted from {v} instead of the named Secret")
        # Serving certificate names cover the Service (the host in Istio's caAddress).
        if eff["server"]["tls"]["mode"] == "issued":
            host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
            check(host in eff["server"]["tls"]["dnsNames"], f"{label}: {host} not in dnsNames {eff['server']['tls']['dnsNames']}")
        # RBAC: exactly what the binary's effective config makes it call, nothing like "*".
        grants = rbac_grants(docs, label)
        check(grants == expected_grants(eff), f"{label}: RBAC differs from the calls the config makes:\n"
              f"  granted, not needed: {sorted(grants - expected_grants(eff))}\n"
              f"  needed, not granted: {sorted(expected_grants(eff) - grants)}")
        ok(f"{label}: ports grpc={grpc} admin={admin} agree (Service, container, config); probes /healthz,/readyz; "
           f"terminationGracePeriodSeconds {tgps} > shutdownGrace {grace}s; hardened; selectors; mounts "
           f"(writable exactly: {', '.join(f'{w} {p}' for p, w in sorted(writable.items())) or 'none'}); "
           f"RBAC = the config's API calls ({len(grants)} grants)")
    # The config checksum follows the config, so a values change rolls the pods.
    a = one(chart.render({"replicaCount": 1}), "Deployment")
    b = one(chart.render({"replicaCount": 1, "config": {"policy": {"maxTtl": "48h"}}}), "Deployment")
    ka = a["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    kb = b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    check(ka != kb, "checksum/config does not change with the config")
    ok("checksum/config changes with the config")


# ---------------------------------------------------------------- RBAC

RBAC_API = "rbac.authorization.k8s.io/v1"


def rbac_grants(docs, label):
    """Every (scope, apiGroup, resource, resourceName|None, verb) the rendered RBAC grants to the
    bridge's service account; scope is "cluster" or the Role's namespace. Checks on the way that
    nothing is a wildcard, that Secrets are never granted cluster-wide, and that every binding
    binds a rendered role to the chart's service account and every role is bound."""
    sa = one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {}
    bound = set()
    for o in objects(docs):
        if not o["apiVersion"].startswith("rbac.authorization.k8s.io/"):
            continue
        check(o["apiVersion"] == RBAC_API, f"{label}: {o['kind']} uses {o['apiVersion']}")
        kind, name, ns = o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")
        if kind in ("ClusterRole", "Role"):
            check((kind == "Role") == (ns is not None), f"{label}: {kind} {name} namespace {ns!r}")
            check("aggregationRule" not in o, f"{label}: {kind} {name} aggregates other roles")
            for r in o["rules"]:
                for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                    check("*" not in r.get(field, []) and all("*" not in x for x in r.get(field, [])),
                          f"{label}: {kind} {name} grants a wildcard in {field}: {r}")
                if "nonResourceURLs" in r:
                    check(kind == "ClusterRole" and not r.get("resources") and not r.get("apiGroups"),
                          f"{label}: {kind} {name} mixes non-resource URLs into a resource rule: {r}")
                    check("*" not in "".join(r["nonResourceURLs"]),
                          f"{label}: {kind} {name} grants a wildcard non-resource URL: {r}")
            roles[(kind, ns, name)] = o["rules"]
        elif kind in ("ClusterRoleBinding", "RoleBinding"):
            ref = o["roleRef"]
            check(ref["apiGroup"] == "rbac.authorization.k8s.io", f"{label}: {kind} {name} roleRef {ref}")
            target = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
            check(target in roles or any(k == target for k in roles),
                  f"{label}: {kind} {name} binds {ref['kind']} {ref['name']}, which the chart does not render")
            check(o["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
                  f"{label}: {kind} {name} subjects {o['subjects']}, want only ServiceAccount {NAMESPACE}/{sa}")
            check(kind == "RoleBinding" or ref["kind"] == "ClusterRole", f"{label}: {kind} {name} -> {ref}")
            bound.add(target)
        else:
            raise CheckFailed(f"{label}: unexpected RBAC kind {kind}")
    check(bound == set(roles), f"{label}: roles without binding: {sorted(set(roles) - bound)}; "
          f"bindings to nothing: {sorted(bound - set(roles))}")
    out = set()
    for (kind, ns, name), rules in roles.items():
        scope = "cluster" if kind == "ClusterRole" else ns
        for r in rules:
            for url in r.get("nonResourceURLs", []):
                for v in r["verbs"]:
                    out.add((scope, "nonResourceURL", url, None, v))
            for g in r.get("apiGroups", []):
                for res in r["resources"]:
                    check(not (scope == "cluster" and res == "secrets"), f"{label}: {name} grants Secrets cluster-wide")
                    for rn in r.get("resourceNames") or [None]:
                        for v in r["verbs"]:
                            out.add((scope, g, res, rn, v))
    return out


def expected_grants(eff):
    """The API calls the bridge makes for an effective config (check-config's output), written
    down from src/k8s.rs, src/k8s/{pods,leader,ca_secret}.rs and src/trust/{configmap,istiod_cert}.rs:
    TokenReview create, and GET /openid/v1/jwks (the service-account issuer keys every token is
    checked against first); the pod watch (LIST+WATCH) for impersonation; the namespace watch and a
    server-side apply of the root ConfigMap (PATCH, authorized as `create` too, with the name,
    when it creates the object); the Lease get / create (POST: no name to restrict) / replace;
    istiod-tls get + server-side apply; the shared local CA's Secret (Config::shared_local_ca:
    local backend without CA files, authn.kubernetes, caSecret.enabled; or a remote backend whose
    roots are followed, Config::upstream_rotation_secret) get / create (POST: no
    name) / replace (PUT: `update`), in caSecret.namespace or else leaderElection.namespace; the
    ClusterTrustBundle get / create (not restricted by name) / server-side apply, plus `attest`
    on its signer, which the API server requires to write a bundle naming that signer."""
    kube = eff["authn"].get("kubernetes")
    if kube is None:
        return set()
    want = {("cluster", "authentication.k8s.io", "tokenreviews", None, "create"),
            ("cluster", "nonResourceURL", "/openid/v1/jwks", None, "get")}
    if eff["authn"]["trustedNodeAccounts"]:
        want |= {("cluster", "", "pods", None, v) for v in ("list", "watch")}
    k = eff["kubernetes"]
    rc, ic, le = k["rootConfigMap"], k["istiodCert"], k["leaderElection"]
    if rc["enabled"]:
        want |= {("cluster", "", "namespaces", None, v) for v in ("list", "watch")}
        want |= {("cluster", "", "configmaps", rc["name"], v) for v in ("create", "patch")}
    if ic["enabled"]:
        want |= {(ic["namespace"], "", "secrets", ic["secretName"], v) for v in ("get", "create", "patch")}
    cs, ctb, be = k["caSecret"], k["clusterTrustBundle"], eff["backend"]
    shared_local = be["type"] == "local" and be["caCertFile"] is None
    # Config::upstream_rotation_secret: a remote backend's rotation state (upstream-roots.json).
    follows_upstream = be["type"] != "local" and eff["rotation"]["followUpstream"]
    if (shared_local or follows_upstream) and cs["enabled"]:
        ns = cs["namespace"] or le["namespace"]
        want.add((ns, "", "secrets", None, "create"))
        want |= {(ns, "", "secrets", cs["name"], v) for v in ("get", "update")}
    if be["type"] == "certManager" and be["kubeconfig"] is None:
        # backend/cert_manager/client.rs: create, watch by name, get (an expired watch),
        # delete; signer.rs: get on the roots' ConfigMap or Secret.
        want |= {(be["namespace"], "cert-manager.io", "certificaterequests", None, v) for v in ("create", "get", "watch", "delete")}
        for res, src in (("configmaps", be["rootBundleConfigMap"]), ("secrets", be["rootBundleSecret"])):
            if src:
                want.add((src["namespace"] or be["namespace"], "", res, src["name"], "get"))
    if ctb["enabled"]:
        name = ctb["name"] or ctb["signerName"].replace("/", ":") + ":root-cert"
        want.add(("cluster", "certificates.k8s.io", "clustertrustbundles", None, "create"))
        want |= {("cluster", "certificates.k8s.io", "clustertrustbundles", name, v) for v in ("get", "patch")}
        want.add(("cluster", "certificates.k8s.io", "signers", ctb["signerName"], "attest"))
    if rc["enabled"] or ic["enabled"] or ctb["enabled"]:
        want.add((le["namespace"], "coordination.k8s.io", "leases", None, "create"))
        want |= {(le["namespace"], "coordination.k8s.io", "leases", le["leaseName"], v) for v in ("get", "update")}
    return want


def dockerfile_runtime(path):
    """(USER uid, gid, ENTRYPOINT list, binary destination, EXPOSE ports) of the Dockerfile's last
    stage."""
    with open(path) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    stages = [i for i, ln in enumerate(lines) if re.match(r"(?i)^FROM\s", ln)]
    check(stages, f"{path}: no FROM")
    final = [ln.strip() for ln in lines[stages[-1]:] if ln.strip() and not ln.lstrip().startswith("#")]
    user = entry = dest = None
    ports = []
    for ln in final:
        word, _, rest = ln.partition(" ")
        word = word.upper()
        if word == "USER":
            user = rest.strip()
        elif word == "ENTRYPOINT":
            entry = json.loads(rest)
        elif word == "COPY" and "istio-ca-bridge" in rest:
            dest = rest.split()[-1]
        elif word == "EXPOSE":
            ports += [int(p.split("/")[0]) for p in rest.split()]
    check(user and re.fullmatch(r"[0-9]+:[0-9]+", user), f"{path}: final stage USER {user!r} is not a numeric uid:gid")
    check(isinstance(entry, list), f"{path}: ENTRYPOINT must be exec (JSON) form, got {entry!r}")
    uid, gid = (int(x) for x in user.split(":"))
    return uid, gid, entry, dest, ports


def check_image(chart):
    """The chart's defaults run the image the Dockerfile builds: the same command, uid and gid,
    ports. (No container runtime here to build it; this keeps the two from drifting.)"""
    path = os.path.join(chart.dir, "..", "..", "Dockerfile")
    uid, gid, entry, dest, ports = dockerfile_runtime(path)
    with open(path) as f:
        text = f.read()
    froms = re.findall(r"(?im)^FROM\s+(\S+)", text)
    check(len(froms) >= 2 and froms[0].startswith("rust:1.95"), f"builder stage {froms[:1]} is not rust:1.95")
    check(froms[-1] in ("gcr.io/distroless/cc-debian12:nonroot", "debian:bookworm-slim"), f"runtime base {froms[-1]}")
    check("cargo build --release --locked" in text, "the Dockerfile does not build with --release --locked")
    check(dest == "/usr/local/bin/istio-ca-bridge", f"binary copied to {dest}")
    check(entry[0] in ("istio-ca-bridge", dest), f"ENTRYPOINT runs {entry[0]}")
    for label, values in [("default values", {})] + [
            (os.path.relpath(p, chart.dir), chart.values_file(p)) for p in chart.ci_files()]:
        docs = chart.render(values)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c = pod["containers"][0]
        cmd = c.get("command", entry) + c.get("args", [])
        check(cmd == entry, f"{label}: the container runs {cmd}, the image's ENTRYPOINT is {entry}")
        sc, psc = c["securityContext"], pod["securityContext"]
        check(sc["runAsUser"] == psc["runAsUser"] == uid and sc["runAsGroup"] == psc["runAsGroup"] == gid,
              f"{label}: runs as {sc['runAsUser']}:{sc['runAsGroup']}, the image's USER is {uid}:{gid}")
        eff = chart.check_config(rendered_config(docs), label)
        if label == "default values":
            cports = sorted(p["containerPort"] for p in c["ports"])
            check(cports == sorted(ports), f"default container ports {cports} != Dockerfile EXPOSE {ports}")
        check(eff["server"]["listen"] and eff["admin"]["listen"], label)
    ok(f"Dockerfile: builder rust:1.95, binary at {dest}, USER {uid}:{gid}, ENTRYPOINT {entry}, EXPOSE {ports}; "
       "the default and every ci/ Deployment run exactly that command as that user")


def check_rbac(chart):
    """Per feature combination, the exact grants, written out literally (not derived), and the
    rendered config of each passes check-config."""
    tr = {("cluster", "authentication.k8s.io", "tokenreviews", None, "create"),
          ("cluster", "nonResourceURL", "/openid/v1/jwks", None, "get")}
    pods = {("cluster", "", "pods", None, "list"), ("cluster", "", "pods", None, "watch")}

    def roots(name="istio-ca-root-cert"):
        return {("cluster", "", "namespaces", None, "list"), ("cluster", "", "namespaces", None, "watch"),
                ("cluster", "", "configmaps", name, "create"), ("cluster", "", "configmaps", name, "patch")}

    def istiod(ns=NAMESPACE, name="istiod-tls"):
        return {(ns, "", "secrets", name, v) for v in ("get", "create", "patch")}

    def lease(ns=NAMESPACE, name=RELEASE):
        return {(ns, "coordination.k8s.io", "leases", None, "create"),
                (ns, "coordination.k8s.io", "leases", name, "get"), (ns, "coordination.k8s.io", "leases", name, "update")}

    def ca(ns=NAMESPACE, name="istio-ca-bridge-ca"):
        # POST (create) names no object; get and replace (PUT: update) are by name.
        return {(ns, "", "secrets", None, "create"), (ns, "", "secrets", name, "get"), (ns, "", "secrets", name, "update")}

    def bundle(name="istio.io:istiod-ca:root-cert", signer="istio.io/istiod-ca"):
        return {("cluster", "certificates.k8s.io", "clustertrustbundles", None, "create"),
                ("cluster", "certificates.k8s.io", "clustertrustbundles", name, "get"),
                ("cluster", "certificates.k8s.io", "clustertrustbundles", name, "patch"),
                ("cluster", "certificates.k8s.io", "signers", signer, "attest")}

    on = {"replicaCount": 1, "kubernetes": {"enabled": True}}
    no_ca_secret = {"caSecret": {"enabled": False}}

    def cfg(**c):
        return {**on, "config": c}

    cases = [
        ("kubernetes.enabled false", {"replicaCount": 1, "kubernetes": {"enabled": False}}, set()),
        ("defaults (2 replicas; TokenReview, impersonation, root ConfigMaps, istiod-tls, the generated root's Secret)", {},
         tr | pods | roots() | istiod() | lease() | ca()),
        ("kubernetes.enabled, 1 replica: the same grants", on, tr | pods | roots() | istiod() | lease() | ca()),
        ("no impersonation (trustedNodeAccounts: [])", cfg(authn={"trustedNodeAccounts": []}),
         tr | roots() | istiod() | lease() | ca()),
        ("root ConfigMaps off", cfg(kubernetes={"rootConfigMap": {"enabled": False}}), tr | pods | istiod() | lease() | ca()),
        ("istiod-tls off", cfg(kubernetes={"istiodCert": {"enabled": False}}), tr | pods | roots() | lease() | ca()),
        ("CA Secret off (1 replica, root in the state dir)", cfg(kubernetes=no_ca_secret),
         tr | pods | roots() | istiod() | lease()),
        ("the CA Secret alone needs no Lease (writers off)",
         cfg(kubernetes={"rootConfigMap": {"enabled": False}, "istiodCert": {"enabled": False}}), tr | pods | ca()),
        ("authentication only (no writers, no impersonation, CA Secret off)",
         cfg(authn={"trustedNodeAccounts": []},
             kubernetes={"rootConfigMap": {"enabled": False}, "istiodCert": {"enabled": False}, **no_ca_secret}), tr),
        ("own CA from backends.local.caSecret: no CA Secret grants", {**CA_SECRET, "kubernetes": {"enabled": True}},
         tr | pods | roots() | istiod() | lease()),
        ("own CA files (config.backend.caCertFile): no CA Secret grants",
         cfg(backend={"type": "local", "caCertFile": "/etc/extra/ca.pem", "caKeyFile": "/etc/extra/ca.key"}),
         tr | pods | roots() | istiod() | lease()),
        ("a remote backend (Vault): the CA Secret holds its rotation state",
         {**on, "backends": {"vault": {"authSecret": {"name": "vault-token"}}}, "config": {"backend": {**VAULT_TOKEN}}},
         tr | pods | roots() | istiod() | lease() | ca()),
        ("a remote backend not followed through rotations: no CA Secret grants",
         {**on, "backends": {"vault": {"authSecret": {"name": "vault-token"}}},
          "config": {"backend": {**VAULT_TOKEN}, "rotation": {"followUpstream": False}}},
         tr | pods | roots() | istiod() | lease()),
        ("renamed objects, istiod and the Lease elsewhere (the CA Secret follows the Lease)",
         cfg(kubernetes={"rootConfigMap": {"name": "mesh-roots"}, "istiodCert": {"namespace": "istiod-ns", "secretName": "istiod-cert"},
                         "leaderElection": {"namespace": "bridge-leases", "leaseName": "bridge-writer"}}),
         tr | pods | roots("mesh-roots") | istiod("istiod-ns", "istiod-cert") | lease("bridge-leases", "bridge-writer")
         | ca("bridge-leases")),
        ("CA Secret renamed, in a namespace of its own",
         cfg(kubernetes={"caSecret": {"namespace": "mesh-ca", "name": "mesh-root"}}),
         tr | pods | roots() | istiod() | lease() | ca("mesh-ca", "mesh-root")),
        ("CA Secret name from the release's full name", {**on, "fullnameOverride": "bridge"},
         tr | pods | roots() | istiod() | lease(name="bridge") | ca(name="bridge-ca")),
        ("ClusterTrustBundle (istiod's signer)", cfg(kubernetes={"clusterTrustBundle": {"enabled": True}}),
         tr | pods | roots() | istiod() | lease() | ca() | bundle()),
        ("ClusterTrustBundle the only writer, own signer: still the Lease",
         cfg(kubernetes={"rootConfigMap": {"enabled": False}, "istiodCert": {"enabled": False},
                         "clusterTrustBundle": {"enabled": True, "signerName": "mesh.example.com/roots"}}),
         tr | pods | lease() | ca() | bundle("mesh.example.com:roots:root-cert", "mesh.example.com/roots")),
        ("cert-manager backend: its CertificateRequests and the roots' ConfigMap, nothing else of it",
         {**on, "config": {"backend": {"type": "certManager", "namespace": "mesh-pki", "issuerRef": {"name": "mesh-ca"},
                                       "rootBundleConfigMap": {"name": "mesh-roots"}}}},
         tr | pods | roots() | istiod() | lease()
         | {("mesh-pki", "cert-manager.io", "certificaterequests", None, v) for v in ("create", "get", "watch", "delete")}
         | {("mesh-pki", "", "configmaps", "mesh-roots", "get")}
         | ca()),
        ("cert-manager backend in another cluster (its kubeconfig): no grants for it here",
         {**on, "config": {"backend": {"type": "certManager", "kubeconfig": "/etc/cm/kubeconfig", "issuerRef": {"name": "mesh-ca"},
                                       "rootBundleSecret": {"namespace": "pki", "name": "mesh-roots"}}}},
         tr | pods | roots() | istiod() | lease() | ca()),
        ("ClusterTrustBundle with its own name",
         cfg(kubernetes={"clusterTrustBundle": {"enabled": True, "name": "istio.io:istiod-ca:root-cert:mesh"}}),
         tr | pods | roots() | istiod() | lease() | ca() | bundle("istio.io:istiod-ca:root-cert:mesh")),
    ]
    for label, values, want in cases:
        docs = chart.render(values)
        eff = chart.check_config(rendered_config(docs), label)
        got = rbac_grants(docs, label)
        check(got == want, f"{label}: grants differ\n  extra: {sorted(got - want)}\n  missing: {sorted(want - got)}")
        check(expected_grants(eff) == want, f"{label}: the derivation from the effective config disagrees with the table")
        dep = one(docs, "Deployment")
        check(dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is bool(want),
              f"{label}: automountServiceAccountToken")
        kinds = sorted(f"{o['kind']}/{o['metadata'].get('namespace', '-')}/{o['metadata']['name']}" for o in objects(docs)
                       if o["apiVersion"] == RBAC_API)
        ok(f"{label}: exactly {len(want)} grants; {', '.join(kinds) or 'no RBAC objects'}; check-config accepts the config")
    # The rendered authn.kubernetes: this cluster, in-cluster credentials, audience istio-ca.
    eff = chart.check_config(rendered_config(chart.render({**on, "kubernetes": {"enabled": True, "clusterId": "east"}})), "clusterId")
    check(eff["authn"]["kubernetes"]["clusters"] == [{"id": "east", "inCluster": True, "kubeconfig": None, "trustDomain": None,
                                                       "qps": 50.0, "burst": 100}]
          and eff["authn"]["kubernetes"]["audiences"] == ["istio-ca"],
          f"authn.kubernetes rendered as {eff['authn']['kubernetes']}")
    ok("kubernetes.clusterId east -> authn.kubernetes.clusters [{id: east, inCluster: true}], audiences [istio-ca]")


DIGICERT = {"type": "digicert", "profileId": "p-1"}
VAULT_TOKEN = {"type": "vault", "address": "https://v:8200", "role": "r", "auth": {"method": "token"}}


def check_failures(chart):
    off = {"kubernetes": {"enabled": False}}
    one_root_each = ["generate its own root", "kubernetes.enabled: true", "config.kubernetes.caSecret",
                     "backends.local.caSecret.name", "replicaCount: 1"]
    cases = [
        ("2 replicas, generated root, no Kubernetes API (no shared Secret)", off,
         ["replicaCount is 2", "(kubernetes.enabled is false)"] + one_root_each),
        ("3 replicas, generated root, the CA Secret switched off",
         {"replicaCount": 3, "config": {"kubernetes": {"caSecret": {"enabled": False}}}},
         ["replicaCount is 3", "(config.kubernetes.caSecret.enabled is false)"] + one_root_each),
        ("authn.kubernetes without kubernetes.enabled",
         {"replicaCount": 1, **off, "config": {"authn": {"kubernetes": {"clusters": [{"id": "Kubernetes", "inCluster": True}]}}}},
         ["config.authn.kubernetes", "kubernetes.enabled: true", "RBAC"]),
        ("a cluster writer without kubernetes.enabled",
         {"replicaCount": 1, **off, "config": {"kubernetes": {"istiodCert": {"enabled": True}}}},
         ["config.kubernetes.istiodCert.enabled", "kubernetes.enabled: true"]),
        ("a ClusterTrustBundle without kubernetes.enabled",
         {"replicaCount": 1, **off, "config": {"kubernetes": {"clusterTrustBundle": {"enabled": True}}}},
         ["config.kubernetes.clusterTrustBundle.enabled", "kubernetes.enabled: true"]),
        ("loopback listener", {"replicaCount": 1, "config": {"server": {"listen": "127.0.0.1:15012"}}}, None),
        ("same port twice", {"replicaCount": 1, "config": {"admin": {"listen": "0.0.0.0:15012"}}},
         ["config.admin.listen", "different port"]),
        ("CA Secret and explicit CA paths", {**CA_SECRET, "config": {"backend": {"type": "local", "caCertFile": "/x", "caKeyFile": "/y"}}},
         ["caSecret.name is set"]),
        ("Vault token login without the token", {"replicaCount": 1, "config": {"backend": {
            "type": "vault", "address": "https://v:8200", "role": "r", "auth": {"method": "token"}}}},
         ["auth.method token", "backends.vault.authSecret.name"]),
        ("Vault AppRole login without the Secret", {"replicaCount": 1, "config": {"backend": {
            "type": "vault", "address": "https://v:8200", "role": "r", "auth": {"method": "approle"}}}},
         ["approle", "backends.vault.authSecret.name"]),
        ("a login Secret for the Kubernetes auth method", {"replicaCount": 1, "backends": {"vault": {"authSecret": {"name": "s"}}},
                                                          "config": {"backend": {"type": "vault", "address": "https://v:8200", "role": "r",
                                                                                 "auth": {"method": "kubernetes", "role": "b"}}}},
         ["authSecret", "projected service-account token"]),
        ("Vault CA from a Secret and a ConfigMap", {"replicaCount": 1,
                                                    "backends": {"vault": {"authSecret": {"name": "s"}, "caBundle": {"secretName": "a", "configMapName": "b"}}},
                                                    "config": {"backend": {"type": "vault", "address": "https://v:8200", "role": "r",
                                                                           "auth": {"method": "token"}}}},
         ["caBundle", "not both"]),
        ("another backend's wiring", {"replicaCount": 1, "backends": {"vault": {"authSecret": {"name": "s"}}}},
         ["backends.vault is set", "config.backend.type is \"local\""]),
        ("serving Secret without files mode", {"replicaCount": 1, "servingCert": {"secretName": "s"}}, ["config.server.tls.mode: files"]),
        ("DigiCert without credentials", {"backends": {"digicert": {"trustBundle": {"configMapName": "t"}}},
                                          "config": {"backend": {**DIGICERT}}},
         ["digicert needs credentials", "backends.digicert.apiKeySecret.name", "backends.digicert.clientCertSecret.name"]),
        ("DigiCert API key and client certificate", {"backends": {"digicert": {"apiKeySecret": {"name": "k"}, "clientCertSecret": {"name": "c"},
                                                                               "trustBundle": {"configMapName": "t"}}},
                                                     "config": {"backend": {**DIGICERT}}}, ["not both"]),
        ("DigiCert API key Secret and an API key file", {"backends": {"digicert": {"apiKeySecret": {"name": "k"}, "trustBundle": {"configMapName": "t"}}},
                                                        "config": {"backend": {**DIGICERT, "auth": {"apiKeyFile": "/x"}}}},
         ["leave config.backend.auth.apiKeyFile"]),
        ("DigiCert without its roots", {"backends": {"digicert": {"apiKeySecret": {"name": "k"}}}, "config": {"backend": {**DIGICERT}}},
         ["backends.digicert.trustBundle.configMapName", "roots"]),
        ("DigiCert roots from a Secret and a ConfigMap", {"backends": {"digicert": {"apiKeySecret": {"name": "k"},
                                                                                    "trustBundle": {"configMapName": "t", "secretName": "u"}}},
                                                          "config": {"backend": {**DIGICERT}}}, ["trustBundle", "not both"]),
        ("DigiCert wiring with the local backend", {"replicaCount": 1, "backends": {"digicert": {"apiKeySecret": {"name": "k"}}}},
         ["backends.digicert is set", "config.backend.type is \"local\""]),
        ("audit path without sink file", {"replicaCount": 1, "config": {"audit": {"path": "/var/log/a.jsonl"}}},
         ["config.audit.path is set", "sink: file"]),
        ("audit file among the read-only mounts", {"replicaCount": 1, "config": {"audit": {"sink": "file", "path": "/etc/istio-ca-bridge/audit.jsonl"}}},
         ["config.audit.path", "/etc/istio-ca-bridge", "read-only"]),
        ("audit file in the local state dir", {"replicaCount": 1, "config": {"audit": {"sink": "file", "path": "/var/lib/istio-ca-bridge/audit.jsonl"}}},
         ["config.audit.path", "config.backend.stateDir", "its own directory"]),
        ("audit file at the filesystem root", {"replicaCount": 1, "config": {"audit": {"sink": "file", "path": "/audit.jsonl"}}},
         ["config.audit.path", "below /"]),
        ("intermediate state dir in the audit dir", {"replicaCount": 1, "backends": {"vault": {"authSecret": {"name": "s"}}},
                                                     "config": {"backend": {**VAULT_TOKEN, "mode": "intermediate", "intermediate": {"stateDir": "/var/log/bridge/state"}},
                                                                "audit": {"sink": "file", "path": "/var/log/bridge/audit.jsonl"}}},
         ["config.backend.intermediate.stateDir", "overlaps"]),
        ("intermediate alert that fires on every rotation", {"replicaCount": 1, "backends": {"vault": {"authSecret": {"name": "s"}}},
                                                             "prometheusRule": {"enabled": True, "intermediateRemainingFraction": 0.25},
                                                             "config": {"backend": {**VAULT_TOKEN, "mode": "intermediate"}}},
         ["prometheusRule.intermediateRemainingFraction 0.25", "activateAt (0.167)", "every rotation"]),
    ]
    for label, values, want in cases:
        err = chart.render_error(values)
        check(err is not None, f"{label}: rendering succeeded but must fail")
        for w in want or []:
            check(w in err, f"{label}: the error does not say {w!r}:\n{err}")
        ok(f"{label}: refused: {err.splitlines()[0][:160]}")
    # The loopback case is stopped by the schema, and by the template for anyone bypassing it.
    err = chart.render_error({"replicaCount": 1, "config": {"server": {"listen": "127.0.0.1:15012"}}})
    check("/config/server/listen" in err, f"loopback listener: {err}")
    # Controls: the fixes the messages suggest do render.
    for label, values in (("the defaults: 2 replicas sharing the generated root through the CA Secret", {}),
                          ("kubernetes.enabled with 3 replicas", {"replicaCount": 3, "kubernetes": {"enabled": True}}),
                          ("no Kubernetes API, replicaCount 1", {"replicaCount": 1, **off}),
                          ("CA Secret switched off, replicaCount 1", {"replicaCount": 1, "config": {"kubernetes": {"caSecret": {"enabled": False}}}}),
                          ("no Kubernetes API, CA Secret, 2 replicas", {**CA_SECRET, **off}),
                          ("CA Secret, 2 replicas", CA_SECRET),
                          ("DigiCert with an API key Secret and roots", {"backends": {"digicert": {"apiKeySecret": {"name": "k"},
                                                                                                   "trustBundle": {"configMapName": "t"}}},
                                                                         "config": {"backend": {**DIGICERT}}}),
                          ("DigiCert with apiKeyEnv (extraEnv) and its own roots file",
                           {"extraEnv": [{"name": "DIGICERT_API_KEY", "valueFrom": {"secretKeyRef": {"name": "k", "key": "api-key"}}}],
                            "config": {"backend": {**DIGICERT, "auth": {"apiKeyEnv": "DIGICERT_API_KEY"}, "trustBundleFile": "/etc/extra/roots.pem"}}}),
                          ("audit file in a directory of its own", {"replicaCount": 1, "config": {"audit": {"sink": "file", "path": "/var/log/bridge/a.jsonl"}}}),
                          ("intermediate alert below 1 - activateAt", {"replicaCount": 1, "backends": {"vault": {"authSecret": {"name": "s"}}},
                                                                       "prometheusRule": {"enabled": True, "intermediateRemainingFraction": 0.15},
                                                                       "config": {"backend": {**VAULT_TOKEN, "mode": "intermediate"}}})):
        check(chart.render_error(values) is None, f"{label} should render: {chart.render_error(values)}")
        ok(f"the suggested fix renders: {label}")


def schema_paths(schema, node, prefix, out):
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].split("/")[-1]]
    for branch in node.get("oneOf", []) + node.get("allOf", []):
        schema_paths(schema, branch, prefix, out)
    if "then" in node:
        schema_paths(schema, node["then"], prefix, out)
    for k, sub in node.get("properties", {}).items():
        p = f"{prefix}.{k}" if prefix else k
        out.add(p)
        schema_paths(schema, sub, p, out)
    if isinstance(node.get("items"), dict):
        schema_paths(schema, node["items"], prefix + "[]", out)
    return out


def value_paths(v, prefix, out):
    if isinstance(v, dict):
        for k, sub in v.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            value_paths(sub, p, out)
    elif isinstance(v, list):
        for item in v:
            value_paths(item, prefix + "[]", out)
    return out


# One full config per backend type (several where a type has variants whose keys differ, like
# Vault's login methods): check-config prints all of the type's keys with their defaults.
# Adding a backend is one entry here (the schema test fails until it is added).
INTERMEDIATE = {"ttl": "72h", "keyType": "ecdsaP384", "pathLenZero": True, "prepareAt": 0.5, "activateAt": 0.8,
                "readyMargin": "2h", "retryBackoff": "2s", "retryMaxBackoff": "10m", "stateDir": "/state"}
BACKEND_CONFIGS = {
    "local": [{"type": "local", "caCertFile": "/ca.pem", "caKeyFile": "/ca.key", "chainFile": "/chain.pem",
               "rootBundleFile": "/roots.pem"}],
    "vault": [
        {"type": "vault", "address": "https://vault.example:8200", "role": "istio", "namespace": "ns",
         "serverRole": "server", "issuerRef": "current", "rootBundleFile": "/roots.pem",
         "tls": {"caFile": "/ca.pem", "clientCertFile": "/c.pem", "clientKeyFile": "/c.key"},
         "auth": {"method": "token", "tokenFile": "/token"}},
        {"type": "vault", "address": "https://vault.example:8200", "role": "istio", "auth": {"method": "kubernetes", "role": "r"},
         "mode": "intermediate", "intermediate": INTERMEDIATE},
        {"type": "vault", "address": "https://vault.example:8200", "role": "istio",
         "auth": {"method": "approle", "roleIdFile": "/id", "secretIdFile": "/secret"}},
        {"type": "vault", "address": "https://vault.example:8200", "role": "istio", "auth": {"method": "jwt", "tokenFile": "/jwt"}},
    ],
    "awsPca": [{"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/x",
                "region": "us-east-1", "endpoint": "https://acm-pca.us-east-1.amazonaws.com",
                "assumeRoleArn": "arn:aws:iam::111122223333:role/r", "signingAlgorithm": "SHA256WITHECDSA",
                "extraRootsFile": "/roots.pem"},
               {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/x", "mode": "intermediate",
                "intermediate": INTERMEDIATE,
                "intermediateTemplateArn": "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0_CSRPassthrough/V1"}],
    "digicert": [
        {"type": "digicert", "baseUrl": "https://one.digicert.com", "auth": {"apiKeyFile": "/key"}, "caFile": "/ca.pem",
         "profileId": "p-1", "seat": {"strategy": "spiffeId"}, "validityUnit": "hours", "requestTimeout": "5s",
         "pollInitialInterval": "250ms", "pollMaxInterval": "2s", "rateLimit": 10, "rateBurst": 20,
         "trustBundleFile": "/roots.pem", "intermediatesFile": "/intermediates.pem"},
        {"type": "digicert", "baseUrl": "https://clientauth.one.digicert.com", "auth": {"clientCertFile": "/c.pem", "clientKeyFile": "/c.key"},
         "profileId": "p-1", "seat": {"strategy": "fixed", "id": "mesh"}, "validityUnit": "days", "trustBundleFile": "/roots.pem"},
        {"type": "digicert", "auth": {"apiKeyEnv": "DIGICERT_API_KEY"}, "profileId": "p-1", "trustBundleFile": "/roots.pem"},
    ],
    "certManager": [
        {"type": "certManager", "namespace": "istio-system", "issuerRef": {"name": "mesh-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
         "labels": {}, "annotations": {}, "preserveRequests": False, "requestTimeout": "8s", "qps": 20, "burst": 40,
         "rootBundleConfigMap": {"name": "mesh-roots", "key": "ca.crt"}, "rootRefreshInterval": "1m"},
        {"type": "certManager", "issuerRef": {"name": "mesh-ca"}, "rootBundleFile": "/roots.pem", "mode": "intermediate",
         "intermediate": INTERMEDIATE},
        {"type": "certManager", "issuerRef": {"name": "ext", "kind": "StepIssuer", "group": "certmanager.step.sm"},
         "rootBundleSecret": {"namespace": "pki", "name": "mesh-roots"}},
    ],
}


def check_schema(chart):
    c = chart.chart
    for label, values, field in (
        ("replicaCount: \"two\"", {"replicaCount": "two"}, "replicaCount"),
        ("unknown top-level key", {"replicaCont": 2}, "replicaCont"),
        ("typo in the bridge config", {"config": {"backend": {"type": "local", "stateDri": "/x"}}}, "stateDri"),
        ("bad enum", {"config": {"policy": {"overMax": "sometimes"}}}, "overMax"),
        ("bad duration", {"config": {"policy": {"maxTtl": "forever"}}}, "maxTtl"),
        ("grace the chart cannot compute with", {"config": {"server": {"shutdownGrace": "1 min"}}}, "shutdownGrace"),
        ("unknown backend type", {"config": {"backend": {"type": "ejbca"}}}, "/config/backend/type"),
        ("digicert without its profile", {"config": {"backend": {"type": "digicert"}}}, "'profileId'"),
        ("another backend's key for digicert", {"config": {"backend": {"type": "digicert", "profileId": "p", "address": "https://v:8200"}}},
         "'address' not allowed"),
        ("bad digicert seat strategy", {"config": {"backend": {"type": "digicert", "profileId": "p", "seat": {"strategy": "perPod"}}}},
         "/config/backend/seat/strategy"),
        ("digicert over plain http", {"config": {"backend": {"type": "digicert", "profileId": "p", "baseUrl": "http://one.digicert.com"}}},
         "/config/backend/baseUrl"),
        ("unknown backend mode", {"config": {"backend": {"type": "vault", "address": "https://v:8200", "role": "r",
                                                         "auth": {"method": "kubernetes", "role": "b"}, "mode": "subordinate"}}},
         "/config/backend/mode"),
        ("intermediate fraction out of range", {"config": {"backend": {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:1:certificate-authority/x",
                                                                       "mode": "intermediate", "intermediate": {"prepareAt": 1.5}}}},
         "/config/backend/intermediate/prepareAt"),
        ("intermediate keys on the local backend", {"config": {"backend": {"type": "local", "mode": "intermediate"}}}, "'mode' not allowed"),
        ("unknown audit sink", {"config": {"audit": {"sink": "syslog"}}}, "/config/audit/sink"),
        ("relative audit path", {"config": {"audit": {"sink": "file", "path": "audit.jsonl"}}}, "/config/audit/path"),
        ("vault without its required keys", {"config": {"backend": {"type": "vault"}}}, "'address', 'role', 'auth'"),
        ("wrong type in a vault login", {"config": {"backend": {"type": "vault", "address": "https://v:8200", "role": "r",
                                                                "auth": {"method": "token", "tokenFile": 5}}}},
         "/config/backend/auth/tokenFile"),
        ("unknown vault login method", {"config": {"backend": {"type": "vault", "address": "https://v:8200", "role": "r",
                                                               "auth": {"method": "userpass"}}}}, "/config/backend/auth/method"),
        ("wrong type for awsPca", {"config": {"backend": {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:1:certificate-authority/x",
                                                          "rateLimit": "fast"}}}, "/config/backend/rateLimit"),
        ("another backend's key", {"config": {"backend": {"type": "awsPca", "caArn": "arn:aws:acm-pca:us-east-1:1:certificate-authority/x",
                                                          "role": "r"}}}, "'role' not allowed"),
        ("CA Secret name that is no object name", {"config": {"kubernetes": {"caSecret": {"name": "Root CA"}}}},
         "/config/kubernetes/caSecret/name"),
        ("CA Secret switch as a string", {"config": {"kubernetes": {"caSecret": {"enabled": "no"}}}},
         "/config/kubernetes/caSecret/enabled"),
        ("signer name without a path", {"config": {"kubernetes": {"clusterTrustBundle": {"enabled": True, "signerName": "istio.io"}}}},
         "/config/kubernetes/clusterTrustBundle/signerName"),
        ("rotation skew that is no duration", {"config": {"rotation": {"skew": "a while"}}}, "/config/rotation/skew"),
        ("relative rotation token file", {"config": {"admin": {"rotationTokenFile": "token"}}}, "/config/admin/rotationTokenFile"),
    ):
        try:
            c.validate_schema(values)
        except helm.HelmValuesError as e:
            msg = str(e)
        else:
            raise CheckFailed(f"{label}: values.schema.json accepted {values}")
        check(field in msg, f"{label}: the schema error does not name {field!r}:\n{msg}")
        err = chart.render_error(values)
        check(err and field in err, f"{label}: render does not refuse it naming {field!r}: {err}")
        ok(f"{label}: refused naming the field: {msg.strip().splitlines()[-1].strip()}")
    for p in chart.ci_files():
        c.validate_schema(chart.values_file(p))
    ok("every ci/ values file satisfies the schema")

    # The schema's config subtree and the binary's config know exactly the same keys: every
    # section but the backend from one config using every optional section, then each backend
    # type on its own (check-config prints every key a config has, defaults included).
    schema = c.schema if isinstance(c.schema, dict) else json.loads(c.schema)
    full = {
        "authn": {"jwt": [{"issuer": "https://issuer.example", "jwksFile": "/jwks.json"}], "devIssuer": {"dir": "/dev"},
                  "kubernetes": {"clusters": [{"id": "Kubernetes", "kubeconfig": "/kubeconfig"}]}},
        "backend": {"type": "local"},
        "audit": {"sink": "file", "path": "/var/log/audit.jsonl"},
    }
    eff = chart.check_config(json.dumps(full), "every section")
    not_backend = lambda paths: {p for p in paths if p != "backend" and not p.startswith("backend.")}
    binary = not_backend(value_paths(eff, "", set()))
    chart_paths = not_backend(schema_paths(schema, schema["properties"]["config"], "", set()))
    check(binary == chart_paths,
          "values.schema.json's config and the binary's config disagree:\n"
          f"  only in the binary: {sorted(binary - chart_paths)}\n  only in the schema: {sorted(chart_paths - binary)}")
    ok(f"schema config keys == the binary's config keys outside backend ({len(binary)} paths)")
    c.validate_schema({"replicaCount": 1, "config": eff})
    ok("the binary's effective config (all defaults, humantime durations) satisfies the schema")

    backend_node = schema["properties"]["config"]["properties"]["backend"]
    branches = {}
    for rule in backend_node["allOf"]:
        branches[rule["if"]["properties"]["type"]["const"]] = rule["then"]
    check(set(branches) == set(backend_node["properties"]["type"]["enum"]) == set(BACKEND_CONFIGS),
          f"backend types: schema branches {sorted(branches)}, schema enum {backend_node['properties']['type']['enum']}, "
          f"tested here {sorted(BACKEND_CONFIGS)}")
    for btype, configs in BACKEND_CONFIGS.items():
        binary = set()
        for i, b in enumerate(configs):
            eff = chart.check_config(json.dumps({"backend": b}), f"backend {btype} #{i}")
            check(eff["backend"]["type"] == btype, f"backend {btype} #{i}: check-config says type {eff['backend']['type']}")
            binary |= value_paths(eff["backend"], "", set())
            c.validate_schema({"replicaCount": 1, "config": eff})
        branch = schema_paths(schema, branches[btype], "", set())
        check(binary == branch,
              f"backend {btype}: the schema branch and the binary disagree:\n"
              f"  only in the binary: {sorted(binary - branch)}\n  only in the schema: {sorted(branch - binary)}")
        ok(f"backend {btype}: schema branch keys == the binary's ({len(branch)} paths from {len(configs)} full configs); "
           "the binary's effective config with its defaults satisfies the schema")

    # The chart README documents every value the schema allows.
    every = schema_paths(schema, schema, "", set())
    leaves = {p for p in every if not any(q.startswith(p + ".") or q.startswith(p + "[]") for q in every)}
    with open(os.path.join(chart.dir, "README.md")) as f:
        readme = f.read()
    undocumented = sorted(p for p in leaves if f"`{p}`" not in readme)
    check(not undocumented, f"values missing from the chart README: {undocumented}")
    defaults = value_paths(c.values, "", set())
    unknown = sorted(p for p in defaults if p not in every and not any(p.startswith((q + ".", q + "[]")) for q in leaves))
    check(not unknown, f"values.yaml keys the schema does not describe: {unknown}")
    ok(f"the chart README documents all {len(leaves)} values; values.yaml holds no undescribed key")


def backend_branches(schema):
    """Backend type -> its schema definition (the `then` of its if/then, $ref resolved)."""
    node = schema["properties"]["config"]["properties"]["backend"]
    out = {}
    for rule in node["allOf"]:
        then = rule["then"]
        while "$ref" in then:
            then = schema["$defs"][then["$ref"].split("/")[-1]]
        out[rule["if"]["properties"]["type"]["const"]] = then
    return node["properties"]["type"]["enum"], out


# A Go template string literal: "..." with escapes, or `...`.
TEMPLATE_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')


def enumerations(text, types):
    """Template actions ({{ ... }}, comments dropped) whose string literals name two or more of
    the backend types: a list, dict or message enumerating them."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)
    found = []
    for action in re.findall(r"\{\{.*?\}\}", text, flags=re.S):
        literals = " ".join(TEMPLATE_STRING.findall(action))
        named = {t for t in types if re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", literals)}
        if len(named) > 1:
            found.append((sorted(named), action.strip()))
    return found


def check_backends(chart):
    """values.schema.json is the chart's one list of backend types: the enum of
    config.backend.type with one if/then branch each; the templates key off backends.<type>."""
    c = chart.chart
    schema = c.schema if isinstance(c.schema, dict) else json.loads(c.schema)
    types, branches = backend_branches(schema)
    check(sorted(types) == sorted(set(types)), f"config.backend.type enum repeats a type: {types}")
    check(set(branches) == set(types), f"schema branches {sorted(branches)} != config.backend.type enum {sorted(types)}")
    check(set(schema["properties"]["backends"]["properties"]) == set(types) == set(c.values["backends"]),
          f"backends.<type>: schema {sorted(schema['properties']['backends']['properties'])}, "
          f"values.yaml {sorted(c.values['backends'])}, config.backend.type enum {sorted(types)}")
    ok(f"backend types {types}: one enum entry, one if/then branch and one backends.<type> block each")

    # (a) An unknown type is refused by the schema, naming the field and the allowed types.
    unknown = {"replicaCount": 1, "config": {"backend": {"type": "ejbca"}}}
    allowed = "value must be one of " + ", ".join(f"'{t}'" for t in types)
    try:
        c.validate_schema(unknown)
    except helm.HelmValuesError as e:
        msg = str(e)
    else:
        raise CheckFailed("values.schema.json accepted config.backend.type ejbca")
    check("/config/backend/type" in msg and allowed in msg,
          f"unknown backend type: the schema error does not name /config/backend/type and {allowed!r}:\n{msg}")
    err = chart.render_error(unknown)
    check(err and "/config/backend/type" in err and allowed in err, f"unknown backend type: render does not refuse it so: {err}")
    ok(f"unknown backend type refused by the schema: {msg.strip().splitlines()[-1].strip()}")
    # ... and by the templates when the schema is skipped, from the backends.<type> keys.
    bare = os.path.join(chart.tmp, "without-schema")
    shutil.copytree(chart.dir, bare, ignore=shutil.ignore_patterns("values.schema.json"))
    bare_chart = helm.Chart.load(bare)
    check(not bare_chart.schema, "the copy without values.schema.json still has a schema")
    try:
        bare_chart.render(unknown, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        err = str(e)
    else:
        raise CheckFailed("without the schema, config.backend.type ejbca renders")
    want = f'config.backend.type "ejbca": this chart supports {", ".join(sorted(types))}'
    check(want in err, f"without the schema, the template error does not say {want!r}:\n{err}")
    ok(f"without the schema the templates refuse it too: {want}")

    # Which types have an intermediate mode is the schema's too: the branches that allow mode.
    with_mode = sorted(t for t, b in branches.items() if "mode" in b.get("properties", {}))
    check(with_mode, "no backend branch allows mode: intermediate")
    for t in types:
        conf = next((b for b in BACKEND_CONFIGS[t] if b.get("mode") == "intermediate"), None)
        if t not in with_mode:
            check(conf is None, f"backend {t}: BACKEND_CONFIGS has an intermediate config but its schema branch has no mode")
            values = {"replicaCount": 1, "config": {"backend": {**BACKEND_CONFIGS[t][0], "mode": "intermediate"}}}
            err = chart.render_error(values)
            check(err and "'mode' not allowed" in err, f"backend {t}: mode: intermediate is not refused by the schema: {err}")
            continue
        check(conf is not None, f"backend {t}: its schema branch allows mode but BACKEND_CONFIGS has no intermediate config")
        docs = chart.render({"replicaCount": 1, "config": {"backend": conf}})
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        state = conf["intermediate"]["stateDir"]
        mount = next((m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == state), None)
        check(mount is not None and not mount.get("readOnly"), f"backend {t} in intermediate mode: no writable mount at {state}")
        vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        check("emptyDir" in vol, f"backend {t} in intermediate mode: {state} is not a per-pod emptyDir: {vol}")
        check("Mode:                         intermediate" in chart.notes({"replicaCount": 1, "config": {"backend": conf}}),
              f"backend {t} in intermediate mode: NOTES do not say so")
    ok(f"intermediate mode for exactly the branches with mode ({', '.join(with_mode)}): their per-pod state volume "
       "is wired; the other types' mode is refused by the schema")

    # (b) No template enumerates the types: per-type logic keys off the configured type.
    tdir = os.path.join(chart.dir, "templates")
    names = sorted(os.listdir(tdir))
    for name in names:
        with open(os.path.join(tdir, name)) as f:
            found = enumerations(f.read(), types)
        check(not found, f"templates/{name} enumerates backend types (keep that list in values.schema.json only):\n"
              + "\n".join(f"  {n}: {a[:200]}" for n, a in found))
    probe = '{{- if not (has $t (list "local" "vault")) }}{{ fail "this chart supports local and vault" }}{{ end }}'
    check(len(enumerations(probe, types)) == 2, "the enumeration scan misses a list of types")
    ok(f"no template ({len(names)} files) names two backend types in one action: no list, dict or message of them")


def run(cmd, label, timeout=60, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    check(p.returncode == 0, f"{label} failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


INTERMEDIATE_ALERTS = ("IstioCABridgeIntermediateExpiringSoon", "IstioCABridgeIntermediatePreparationFailing")


def check_alerts(chart):
    promtool = shutil.which("promtool")
    check(promtool, "promtool is required: apt-get install -y prometheus")
    work = tempfile.mkdtemp(dir=chart.tmp)
    # The local install (direct signing) and the intermediate-mode one: the intermediate alerts
    # exist only where the config runs in intermediate mode (their thresholds come from it).
    rendered = {}
    for name in ("local-ca-secret-values.yaml", "vault-intermediate-values.yaml"):
        values = chart.values_file(os.path.join(chart.dir, "ci", name))
        groups = one(chart.render(values), "PrometheusRule")["spec"]["groups"]
        rules_file = os.path.join(work, f"rules-{name}")
        with open(rules_file, "w") as f:
            json.dump({"groups": groups}, f)
        run([promtool, "check", "rules", rules_file], f"promtool check rules (ci/{name})")
        alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
        ok(f"ci/{name}: promtool check rules accepts {len(alerts)} alerts: {', '.join(alerts)}")
        rendered[name] = (values, groups, alerts)
    check(not set(INTERMEDIATE_ALERTS) & set(rendered["local-ca-secret-values.yaml"][2]),
          "intermediate alerts rendered for a direct-mode install")
    check(set(INTERMEDIATE_ALERTS) <= set(rendered["vault-intermediate-values.yaml"][2]),
          "intermediate alerts missing from the intermediate-mode install")
    ok("intermediate alerts are rendered for the intermediate-mode install only")
    values, groups, _ = rendered["vault-intermediate-values.yaml"]

    # Unit tests on synthetic series: each alert fires when it should and stays quiet otherwise.
    # Annotations are left out here (checked above); labels and expressions are what is tested.
    bare = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]}
    bare_file = os.path.join(work, "bare-rules.yaml")
    with open(bare_file, "w") as f:
        json.dump(bare, f)
    sel = f'namespace="{NAMESPACE}",job="{RELEASE}"'
    day = 86400
    req = "istio_ca_bridge_requests_total"
    sign = "istio_ca_bridge_backend_sign_duration_seconds_count"
    prep = "istio_ca_bridge_intermediate_preparations_total"
    tests = {
        "rule_files": [bare_file],
        "evaluation_interval": "1m",
        "tests": [
            {   # A failing backend: most calls UNAVAILABLE, backend sign errors, root and CA close to expiry.
                "interval": "1m",
                "input_series": [
                    {"series": f'{req}{{{sel},pod="a",result="success",code="OK"}}', "values": "0+1x60"},
                    {"series": f'{req}{{{sel},pod="a",result="error",code="UNAVAILABLE"}}', "values": "0+10x60"},
                    {"series": f'{sign}{{{sel},pod="a",backend="local",result="unavailable"}}', "values": "0+10x60"},
                    {"series": f'{sign}{{{sel},pod="a",backend="local",result="success"}}', "values": "0+1x60"},
                    {"series": f'istio_ca_bridge_root_cert_expiry_timestamp_seconds{{{sel},pod="a"}}', "values": f"{10 * day}x180"},
                    {"series": f'istio_ca_bridge_signing_ca_expiry_timestamp_seconds{{{sel},pod="a",backend="local"}}', "values": f"{5 * day}x180"},
                    {"series": f'istio_ca_bridge_serving_cert_expiry_timestamp_seconds{{{sel},pod="a"}}', "values": f"{3 * day}x180"},
                    {"series": f'up{{{sel},pod="a"}}', "values": "1x180"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "IstioCABridgeIssuanceErrors",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE}}]},
                    {"eval_time": "30m", "alertname": "IstioCABridgeRequestsRejected",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
                    {"eval_time": "30m", "alertname": "IstioCABridgeBackendFailing",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE, "backend": "local"}}]},
                    {"eval_time": "150m", "alertname": "IstioCABridgeRootExpiringSoon",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
                    {"eval_time": "150m", "alertname": "IstioCABridgeSigningCAExpiringSoon",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "backend": "local"}}]},
                    # 3 days left on the serving cert: above the 4 h threshold, no alert.
                    {"eval_time": "150m", "alertname": "IstioCABridgeServingCertExpiringSoon", "exp_alerts": []},
                    {"eval_time": "150m", "alertname": "IstioCABridgeDown", "exp_alerts": []},
                ],
            },
            {   # A healthy bridge: no alert at all; then the targets go down.
                "interval": "1m",
                "input_series": [
                    {"series": f'{req}{{{sel},pod="a",result="success",code="OK"}}', "values": "0+100x60"},
                    {"series": f'{req}{{{sel},pod="a",result="error",code="UNAUTHENTICATED"}}', "values": "0+1x60"},
                    {"series": f'{sign}{{{sel},pod="a",backend="local",result="success"}}', "values": "0+100x60"},
                    {"series": f'istio_ca_bridge_root_cert_expiry_timestamp_seconds{{{sel},pod="a"}}', "values": f"{3650 * day}x60"},
                    {"series": f'istio_ca_bridge_signing_ca_expiry_timestamp_seconds{{{sel},pod="a",backend="local"}}', "values": f"{365 * day}x60"},
                    {"series": f'istio_ca_bridge_serving_cert_expiry_timestamp_seconds{{{sel},pod="a"}}', "values": f"{2 * 3600}x60"},
                    {"series": f'istio_ca_bridge_serving_cert_errors_total{{{sel},pod="a"}}', "values": "0x20 1+1x40"},
                    {"series": f'up{{{sel},pod="a"}}', "values": "1x30 0x30"},
                    {"series": f'{prep}{{{sel},pod="a",backend="vault",result="success"}}', "values": "0+1x60"},
                    {"series": f'istio_ca_bridge_intermediate_expiry_timestamp_seconds{{{sel},pod="a",backend="vault"}}',
                     "values": f"{60 * 3600}x60"},
                    {"series": f'istio_ca_bridge_audit_write_errors_total{{{sel},pod="a"}}', "values": "0x60"},
                    {"series": f'istio_ca_bridge_root_rotation_phase{{{sel},pod="a"}}', "values": "0x60"},
                    {"series": f'istio_ca_bridge_root_rotation_next_phase_timestamp_seconds{{{sel},pod="a"}}', "values": "0x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": a, "exp_alerts": []}
                    for a in ("IstioCABridgeIssuanceErrors", "IstioCABridgeRequestsRejected", "IstioCABridgeBackendFailing",
                              "IstioCABridgeRootExpiringSoon", "IstioCABridgeSigningCAExpiringSoon", "IstioCABridgeDown",
                              "IstioCABridgeServingCertRotationErrors", "IstioCABridgeIntermediatePreparationFailing",
                              "IstioCABridgeIntermediateExpiringSoon", "IstioCABridgeAuditWriteErrors",
                              "IstioCABridgeRootRotationStalled", "IstioCABridgeRootRotationReplicasDisagree")
                ] + [
                    # 2 h left on a pod's serving cert: below the 4 h threshold.
                    {"eval_time": "20m", "alertname": "IstioCABridgeServingCertExpiringSoon",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE, "job": RELEASE, "pod": "a"}}]},
                    {"eval_time": "50m", "alertname": "IstioCABridgeServingCertRotationErrors",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": RELEASE, "pod": "a"}}]},
                    {"eval_time": "40m", "alertname": "IstioCABridgeDown", "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
                ],
            },
            {   # Intermediate mode (ci/vault-intermediate-values.yaml: 72 h intermediates, alert below
                # 10 % = 7.2 h): pod a's successor never comes, so its intermediate (8 h left at t=0)
                # crosses 7.2 h at 48m and the alert fires after `for` (5m); pod b rotated and has 70 h.
                "interval": "1m",
                "input_series": [
                    {"series": f'istio_ca_bridge_intermediate_expiry_timestamp_seconds{{{sel},pod="a",backend="vault"}}',
                     "values": f"{8 * 3600}x120"},
                    {"series": f'istio_ca_bridge_intermediate_expiry_timestamp_seconds{{{sel},pod="b",backend="vault"}}',
                     "values": f"{70 * 3600}x120"},
                    {"series": f'istio_ca_bridge_intermediate_successor_ready{{{sel},pod="b",backend="vault"}}', "values": "0x120"},
                ],
                "alert_rule_test": [
                    {"eval_time": "40m", "alertname": "IstioCABridgeIntermediateExpiringSoon", "exp_alerts": []},
                    # Condition true since 48m, still pending within `for`.
                    {"eval_time": "51m", "alertname": "IstioCABridgeIntermediateExpiringSoon", "exp_alerts": []},
                    {"eval_time": "60m", "alertname": "IstioCABridgeIntermediateExpiringSoon",
                     "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NAMESPACE, "pod": "a", "backend": "vault"}}]},
                ],
            },
            {   # Preparations: pod a's fail every minute and never succeed; pod b's failed for
                # 4 minutes, then one succeeded (and no more failures); pod c's always succeed.
                # Audit: pod a fails one write at 11m; pod b writes records without errors.
                "interval": "1m",
                "input_series": [
                    {"series": f'{prep}{{{sel},pod="a",backend="vault",result="failure"}}', "values": "0+1x90"},
                    {"series": f'{prep}{{{sel},pod="b",backend="vault",result="failure"}}', "values": "0+1x3 3x87"},
                    {"series": f'{prep}{{{sel},pod="b",backend="vault",result="success"}}', "values": "0x4 1x86"},
                    {"series": f'{prep}{{{sel},pod="c",backend="vault",result="success"}}', "values": "0+1x90"},
                    {"series": f'istio_ca_bridge_audit_write_errors_total{{{sel},pod="a"}}', "values": "0x10 1x80"},
                    {"series": f'istio_ca_bridge_audit_write_errors_total{{{sel},pod="b"}}', "values": "0x90"},
                    {"series": f'istio_ca_bridge_audit_records_total{{{sel},pod="b"}}', "values": "0+50x90"},
                ],
                "alert_rule_test": [
                    # Pending after 1m of failures, within `for` (10m).
                    {"eval_time": "8m", "alertname": "IstioCABridgeIntermediatePreparationFailing", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "IstioCABridgeIntermediatePreparationFailing",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "pod": "a", "backend": "vault"}}]},
                    {"eval_time": "5m", "alertname": "IstioCABridgeAuditWriteErrors", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "IstioCABridgeAuditWriteErrors",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": RELEASE, "pod": "a"}}]},
                    # The failed write has left the 15m window.
                    {"eval_time": "40m", "alertname": "IstioCABridgeAuditWriteErrors", "exp_alerts": []},
                ],
            },
            {   # Root rotation: the next phase became safe at t=10m (unix 600) and nothing advanced;
                # pod b applied publishing (1) while pod a stayed idle (0) for 30 minutes.
                "interval": "1m",
                "input_series": [
                    {"series": f'istio_ca_bridge_root_rotation_next_phase_timestamp_seconds{{{sel},pod="a"}}', "values": "600x120"},
                    {"series": f'istio_ca_bridge_root_rotation_phase{{{sel},pod="a"}}', "values": "0x30 1x90"},
                    {"series": f'istio_ca_bridge_root_rotation_phase{{{sel},pod="b"}}', "values": "1x120"},
                ],
                "alert_rule_test": [
                    # Safe since 10m: an hour later (70m) the condition holds, firing after `for` (15m).
                    {"eval_time": "60m", "alertname": "IstioCABridgeRootRotationStalled", "exp_alerts": []},
                    {"eval_time": "80m", "alertname": "IstioCABridgeRootRotationStalled", "exp_alerts": []},
                    {"eval_time": "90m", "alertname": "IstioCABridgeRootRotationStalled",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
                    {"eval_time": "5m", "alertname": "IstioCABridgeRootRotationReplicasDisagree", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "IstioCABridgeRootRotationReplicasDisagree",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
                    {"eval_time": "45m", "alertname": "IstioCABridgeRootRotationReplicasDisagree", "exp_alerts": []},
                ],
            },
        ],
    }
    tests_file = os.path.join(work, "tests.yaml")
    with open(tests_file, "w") as f:
        json.dump(tests, f)
    run([promtool, "test", "rules", tests_file], "promtool test rules")
    ok("promtool test rules: issuance errors, rejections, backend failing, root/signing-CA/serving-cert/intermediate "
       "expiry, intermediate preparations failing, audit write errors, rotation errors, a stalled or split root "
       "rotation and down fire on synthetic "
       "series and stay quiet on a healthy bridge")

    def expiry_rule(v):
        rule = one(chart.render(v), "PrometheusRule")
        return next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "IstioCABridgeIntermediateExpiringSoon")

    pr = values["prometheusRule"]
    # The lifetime comes from the config's intermediate.ttl: 0.1 of 72h = 25920 s (as tested above).
    r = expiry_rule(values)
    check(re.search(r"<\s*25920\s*$", r["expr"]), f"intermediate alert does not follow intermediate.ttl 72h: {r['expr']}")
    b = values["config"]["backend"]
    r = expiry_rule({**values, "config": {**values["config"], "backend": {**b, "intermediate": {**b["intermediate"], "ttl": "1week"}}}})
    check(re.search(r"<\s*60480\s*$", r["expr"]), f"intermediate alert does not follow intermediate.ttl 1week: {r['expr']}")
    # ... unless the lifetime is given: 0.125 of 4 h = 1800 s.
    r = expiry_rule({**values, "prometheusRule": {**pr, "intermediateLifetimeHours": 4, "intermediateRemainingFraction": 0.125,
                                                  "intermediateExpiryFor": "15m"}})
    check(re.search(r"<\s*1800\s*$", r["expr"]) and r["for"] == "15m", f"intermediate alert ignores its values: {r}")
    rule = one(chart.render({**values, "prometheusRule": {**pr, "intermediatePreparationWindow": "1h"}}), "PrometheusRule")
    r = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "IstioCABridgeIntermediatePreparationFailing")
    check(r["expr"].count("[1h]") == 2, f"preparation alert ignores intermediatePreparationWindow: {r['expr']}")
    ok("the intermediate alerts' thresholds follow config.backend.intermediate.ttl (72h, 1week) or "
       "prometheusRule.intermediateLifetimeHours, and intermediateRemainingFraction/ExpiryFor/PreparationWindow")


# ---------------------------------------------------------------- live: run what the chart renders


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TestPki:
    """An offline root and an intermediate in cert-manager's Secret layout, and a token signer
    standing in for the cluster's service-account issuer."""

    def __init__(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.hashes, self.ser, self.ec = x509, hashes, serialization, ec
        now = datetime.datetime.now(datetime.timezone.utc)

        def ca(name, key, issuer_name, issuer_key, days, pathlen):
            return (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"), x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(issuer_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(issuer_key, hashes.SHA256())
            )

        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"), x509.NameAttribute(NameOID.COMMON_NAME, "offline root")])
        self.root = ca("offline root", root_key, root_name, root_key, 3650, 1)
        inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = ca("istio-ca-bridge intermediate", inter_key, root_name, root_key, 365, 0)
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()
        self.ca_secret = {
            "tls.crt": pem(self.inter),
            "tls.key": inter_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode(),
            "ca.crt": pem(self.root),
        }
        self.sa_key = ec.generate_private_key(ec.SECP256R1())
        nums = self.sa_key.public_key().public_numbers()
        self.jwks = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "sa-1", "alg": "ES256", "use": "sig",
                                          "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big"))}]})

    def token(self, issuer, audience, ns, sa):
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = b64url(json.dumps({"alg": "ES256", "kid": "sa-1", "typ": "JWT"}).encode())
        claims = b64url(json.dumps({"iss": issuer, "aud": [audience], "sub": f"system:serviceaccount:{ns}:{sa}",
                                    "iat": now, "nbf": now, "exp": now + 600}).encode())
        der = self.sa_key.sign(f"{header}.{claims}".encode(), self.ec.ECDSA(self.hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{header}.{claims}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def raw_create_certificate(addr, host, root_file, token, cluster_id, csr):
    """One CreateCertificate call through Python grpcio with a hand-encoded request (field 1,
    csr); returns the gRPC status code name."""
    import grpc

    with open(root_file, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    request = b"\x0a" + _varint(len(csr)) + csr
    with grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", host)]) as ch:
        call = ch.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(request, metadata=[("authorization", f"Bearer {token}"), ("clusterid", cluster_id)], timeout=10)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def _varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def metric_names_in(expr):
    return set(OWN_METRIC.findall(expr))


# Metrics the bridge registers only once a backend runs in intermediate mode (labelled by
# backend, so they appear with their first intermediate). The live run uses the local backend
# (Vault and AWS Private CA cannot run here), so they cannot be seen exported; what is checked
# instead is that the binary under test carries each name (no typo in a panel or alert), and
# promtool tests their alerts on synthetic series. Chart README, "Intermediate mode".
INTERMEDIATE_MODE_ONLY = {
    "istio_ca_bridge_intermediate_expiry_timestamp_seconds",
    "istio_ca_bridge_intermediate_preparations_total",
    "istio_ca_bridge_intermediate_rotations_total",
    "istio_ca_bridge_intermediate_successor_ready",
}


def live_unrunnable(cfg):
    """Why a rendered install cannot be run on this machine as its pod would run, or None. The
    pod's own environment is what is missing, not the binary's abilities: Vault must be the one
    at the install's address, AWS Private CA needs the install's real CA ARN and IRSA
    credentials, DigiCert its tenant and API key, a remote cluster its kubeconfig. (In-cluster
    Kubernetes credentials are the one thing moved: the fake API server of the test suite
    stands in for this cluster, see FakeApiServer. tests/kubernetes_*.rs, tests/vault_*.rs,
    tests/aws_pca.rs and tests/digicert.rs drive the other code paths against a fake API
    server, OpenBao, moto and a fake DigiCert.)"""
    if cfg["backend"]["type"] == "vault":
        return f"the Vault at {cfg['backend']['address']}"
    if cfg["backend"]["type"] == "awsPca":
        return f"the AWS Private CA {cfg['backend']['caArn']} and IRSA credentials"
    if cfg["backend"]["type"] == "digicert":
        return f"DigiCert ONE at {cfg['backend'].get('baseUrl', 'https://one.digicert.com')}, its profile and API key"
    if cfg["backend"]["type"] == "certManager":
        return f"cert-manager and the issuer {cfg['backend']['issuerRef']['name']} in the cluster (tests/cert_manager.rs plays them on the fake API)"
    kube = cfg["authn"].get("kubernetes")
    if kube and not all(c.get("inCluster") for c in kube["clusters"]):
        return "the remote clusters' kubeconfigs"
    return None


class FakeApiServer:
    """The test suite's fake Kubernetes API server (src/testing/fake_kube, the fake-apiserver
    binary) as this cluster's API server: it serves TokenReviews, the pod and namespace
    watches, Secrets, ConfigMaps and Leases as the real one does (not RBAC: the grants are
    checked by `rbac`/`structure`). A rendered install's in-cluster credentials become its
    kubeconfig; everything else in the config stays as rendered."""

    def __init__(self, binary, tmp):
        self.dir = tempfile.mkdtemp(dir=tmp, prefix="fake-apiserver-")
        self.log = open(os.path.join(self.dir, "log"), "w+")
        self.proc = subprocess.Popen(
            [binary, "--dir", self.dir, "--control-port", str(free_port()), "--real", "1", "--junk", "0",
             "--namespace", NAMESPACE, "--namespace", "default"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(self.dir, "ready")):
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise CheckFailed(f"fake-apiserver did not start:\n{self.log.read()}")
            time.sleep(0.1)
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        with open(self.kubeconfig) as f:
            kc = helm.values_from_yaml(f.read())
        self.server = kc["clusters"][0]["cluster"]["server"]
        self.client_token = kc["users"][0]["user"]["token"]
        import ssl
        self.ssl = ssl.create_default_context(
            cadata=base64.b64decode(kc["clusters"][0]["cluster"]["certificate-authority-data"]).decode())
        with open(os.path.join(self.dir, "real-tokens")) as f:
            # A service-account token of default/web (audience istio-ca) the fake reviews as valid.
            self.workload_token = f.readline().strip()

    def get(self, path):
        """GET as the bridge's service account would; (status, parsed JSON or None)."""
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.client_token}"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=self.ssl) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, None

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Pod:
    """One replica of a rendered Deployment, run the way its pod would run: its args and env,
    its config file from the rendered ConfigMap, every Secret/ConfigMap/emptyDir volume
    materialised under a temporary root at its mountPath. Only listen addresses move (to free
    loopback ports) and, given a fake API server, in-cluster credentials become its kubeconfig.
    The read-only root filesystem is emulated by checking, after the run, that everything the
    bridge wrote is below a writable (emptyDir/PVC) mount."""

    def __init__(self, chart, label, docs, values, pki, fake=None):
        self.chart, self.label = chart, label
        dep = one(docs, "Deployment")
        self.pod = pod = dep["spec"]["template"]["spec"]
        self.c = c = pod["containers"][0]
        self.root = root = tempfile.mkdtemp(dir=chart.tmp, prefix="pod-")
        self.client = tempfile.mkdtemp(dir=chart.tmp, prefix="client-")  # the workload's side, not the pod's
        at = self.at = lambda p: root + p
        self.grpc, self.admin = free_port(), free_port()
        cfg = helm.values_from_yaml(rendered_config(docs))

        def remap(v):
            if isinstance(v, dict):
                return {k: remap(x) for k, x in v.items()}
            if isinstance(v, list):
                return [remap(x) for x in v]
            if isinstance(v, str) and v.startswith("/"):
                return at(v)
            return v

        cfg = remap(cfg)
        cfg["server"]["listen"] = f"127.0.0.1:{self.grpc}"
        cfg["admin"]["listen"] = f"127.0.0.1:{self.admin}"
        if cfg["authn"].get("kubernetes"):
            check(fake is not None, f"{label}: a Kubernetes install needs the fake API server")
            for cl in cfg["authn"]["kubernetes"]["clusters"]:
                cl.pop("inCluster")
                cl["kubeconfig"] = fake.kubeconfig
        self.cfg = cfg
        self.vols = vols = {v["name"]: v for v in pod["volumes"]}
        for m in c["volumeMounts"]:
            v = vols[m["name"]]
            dst = at(m["mountPath"])
            if "emptyDir" in v:
                os.makedirs(dst, exist_ok=True)
            elif "configMap" in v and m["mountPath"] == CONFIG_PATH:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "w") as f:
                    json.dump(cfg, f)  # JSON is YAML
            elif "configMap" in v:  # a JWKS ConfigMap from jwksConfigMaps
                os.makedirs(dst, exist_ok=True)
                with open(os.path.join(dst, "jwks.json"), "w") as f:
                    f.write(pki.jwks)
            elif "secret" in v:
                check(v["secret"]["secretName"] == values["backends"]["local"]["caSecret"]["name"], f"unexpected Secret {v}")
                os.makedirs(dst, exist_ok=True)
                for k, data in pki.ca_secret.items():
                    with open(os.path.join(dst, k), "w") as f:
                        f.write(data)
            else:
                raise CheckFailed(f"{label}: no way to materialise volume {v}")
        self.before = {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}
        env = dict(os.environ)
        env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
        args = [at(a) if a == CONFIG_PATH else a for a in c["command"][1:] + c.get("args", [])]
        self.log = open(os.path.join(self.client, "bridge.log"), "w+")
        self.proc = subprocess.Popen([chart.bin] + args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def bridge_log(self):
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self):
        c = self.c
        deadline = time.time() + 30
        status = None
        while time.time() < deadline and self.proc.poll() is None:
            status, _ = http_get(f"http://127.0.0.1:{self.admin}{c['readinessProbe']['httpGet']['path']}")
            if status == 200:
                break
            time.sleep(0.2)
        check(status == 200, f"{self.label}: readiness probe never passed (last {status}); bridge log:\n{self.bridge_log()}")
        status, _ = http_get(f"http://127.0.0.1:{self.admin}{c['livenessProbe']['httpGet']['path']}")
        check(status == 200, f"{self.label}: liveness probe path answers {status}")

    def stop(self):
        """SIGTERM, as the kubelet sends it: the bridge must be gone within the pod's grace
        period, with exit code 0, having written only below its writable mounts."""
        grace = self.pod["terminationGracePeriodSeconds"]
        start = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise CheckFailed(f"{self.label}: still running {grace}s after SIGTERM")
        took = time.time() - start
        check(code == 0, f"{self.label}: exit code {code} after SIGTERM; bridge log:\n{self.bridge_log()}")
        self.log.close()
        ok(f"{self.label}: SIGTERM -> clean exit in {took:.1f}s (terminationGracePeriodSeconds {grace})")
        root, vols = self.root, self.vols
        writable = [self.at(m["mountPath"]) for m in self.c["volumeMounts"] if not m.get("readOnly")
                    and ("emptyDir" in vols[m["name"]] or "persistentVolumeClaim" in vols[m["name"]])]
        self.written = sorted({os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs} - self.before)
        stray = [f[len(root):] for f in self.written if not any(f.startswith(w.rstrip("/") + "/") for w in writable)]
        check(not stray, f"{self.label}: the bridge wrote {stray} outside its writable mounts (the pod's root filesystem is read-only)")
        ok(f"{self.label}: everything the bridge wrote ({', '.join(f[len(root):] for f in self.written) or 'nothing'}) "
           "is on a writable mount")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def request_cert(chart, pod, host, trust, token_file, spiffe, cluster_id, out):
    """istio-ca-bridge request, as istio-agent calls: TLS verified against `trust` and the
    Service's name, the issued chain verified; returns its summary lines."""
    text = run([chart.bin, "request", "--addr", f"127.0.0.1:{pod.grpc}", "--server-name", host, "--ca-cert", trust,
                "--token-file", token_file, "--spiffe-id", spiffe, "--cluster-id", cluster_id, "--out-dir", out],
               f"{pod.label}: istio-ca-bridge request", timeout=30)
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.startswith(("issuer:", "chain:")))


def live_jwt_install(chart, label, docs, values, pki, exported):
    """One replica authenticating workloads with a JWT issuer (the JWKS from a ConfigMap)."""
    svc = one(docs, "Service")
    p = Pod(chart, label, docs, values, pki)
    cfg = p.cfg
    try:
        p.wait_ready()
        ok(f"{label}: the rendered pod starts; its readiness and liveness probe paths answer 200")
        # A workload calls like istio-agent: Kubernetes-shaped token from the configured issuer,
        # TLS verified against the trusted root and the Service's DNS name (Istio's caAddress host).
        jwt = cfg["authn"]["jwt"][0]
        tok = os.path.join(p.client, "token")
        with open(tok, "w") as f:
            f.write(pki.token(jwt["issuer"], jwt["audiences"][0], "default", "demo"))
        if "caCertFile" in cfg["backend"]:
            trust = os.path.join(p.client, "root.pem")
            with open(trust, "w") as f:
                f.write(pki.ca_secret["ca.crt"])
        else:
            trust = os.path.join(cfg["backend"]["stateDir"], "root-cert.pem")
        host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        spiffe = f"spiffe://{cfg['trustDomain']}/ns/default/sa/demo"
        summary = request_cert(chart, p, host, trust, tok, spiffe, jwt.get("clusterId", "Kubernetes"),
                               os.path.join(p.client, "issued"))
        ok(f"{label}: a workload token from {jwt['issuer']} gets {spiffe} over TLS to {host} ({summary})")
        # Refused calls, so the error-side series exist too: an unparsable CSR from a valid
        # caller (a permanent INVALID_ARGUMENT, istiod's CSR_ERROR), then an unknown issuer.
        code = raw_create_certificate(f"127.0.0.1:{p.grpc}", host, trust, pki.token(jwt["issuer"], jwt["audiences"][0], "default", "demo"),
                                      jwt.get("clusterId", "Kubernetes"), b"not a CSR")
        check(code == "INVALID_ARGUMENT", f"{label}: a garbage CSR got {code}, want INVALID_ARGUMENT")
        with open(tok, "w") as f:
            f.write(pki.token("https://not-the-issuer.example", "istio-ca", "default", "demo"))
        r = subprocess.run([chart.bin, "request", "--addr", f"127.0.0.1:{p.grpc}", "--server-name", host, "--ca-cert", trust,
                            "--token-file", tok, "--spiffe-id", spiffe, "--out-dir", os.path.join(p.client, "refused")],
                           capture_output=True, text=True, timeout=30)
        check(r.returncode != 0, f"{label}: a token from an unknown issuer was accepted")
        status, text = http_get(f"http://127.0.0.1:{p.admin}/metrics")
        check(status == 200, f"{label}: /metrics answers {status}")
        exported |= {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")}
    except BaseException:
        p.kill()
        raise
    p.stop()
    if cfg["audit"].get("sink") == "file":
        with open(cfg["audit"]["path"]) as f:
            records = [json.loads(ln) for ln in f if ln.strip()]
        mine = [r for r in records if r.get("identity") == spiffe and r.get("event")]
        root = p.root
        check(mine, f"{label}: no audit record for {spiffe} in {cfg['audit']['path'][len(root):]}: {records}")
        ok(f"{label}: {len(records)} audit records in {cfg['audit']['path'][len(root):]} (writable volume), "
           f"one for {spiffe} ({mine[0]['event']}, serial {mine[0].get('serial')})")


def live_kubernetes_install(chart, label, docs, values, pki, fake, exported):
    """Every replica of a Kubernetes install (TokenReview against the fake API server), started
    together. With the local backend's generated root they must all sign with the ONE root the
    first of them put in the shared Secret (config.kubernetes.caSecret), and the Lease holder
    must publish that root (istiod-tls' ca.crt)."""
    svc = one(docs, "Service")
    replicas = one(docs, "Deployment")["spec"]["replicas"]
    pods = [Pod(chart, f"{label} [replica {i + 1}/{replicas}]", docs, values, pki, fake) for i in range(replicas)]
    cfg = pods[0].cfg
    k = cfg["kubernetes"]
    try:
        for p in pods:
            p.wait_ready()
        ok(f"{label}: {replicas} replicas started together against the fake API server; readiness and liveness answer 200")
        host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        cluster_id = cfg["authn"]["kubernetes"]["clusters"][0]["id"]
        client = pods[0].client
        tok = os.path.join(client, "token")
        with open(tok, "w") as f:
            f.write(fake.workload_token)
        spiffe = f"spiffe://{cfg['trustDomain']}/ns/default/sa/web"
        shared = cfg["backend"]["type"] == "local" and not cfg["backend"].get("caCertFile") and k.get("caSecret", {}).get("enabled", True)
        check(shared, f"{label}: only the local backend's shared generated root is run against the fake here")
        ns, name = k["caSecret"]["namespace"], k["caSecret"]["name"]
        code, secret = fake.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
        check(code == 200, f"{label}: Secret {ns}/{name} (config.kubernetes.caSecret) not found ({code})")
        root_pem = base64.b64decode(secret["data"]["ca-cert.pem"]).decode()
        check("ca-key.pem" in secret["data"] and secret["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "istio-ca-bridge",
              f"{label}: Secret {ns}/{name} is not the bridge's: {sorted(secret['data'])} {secret['metadata'].get('labels')}")
        trust = os.path.join(client, "root-from-secret.pem")
        with open(trust, "w") as f:
            f.write(root_pem)
        statuses = []
        for i, p in enumerate(pods):
            out = os.path.join(client, f"issued-{i}")
            summary = request_cert(chart, p, host, trust, tok, spiffe, cluster_id, out)
            with open(os.path.join(out, "root-cert.pem")) as f:
                check(f.read().strip() == root_pem.strip(), f"{p.label}: the answer's root is not the Secret's")
            status, roots = http_get(f"http://127.0.0.1:{p.admin}/roots")
            check(status == 200 and roots.strip() == root_pem.strip(), f"{p.label}: /roots is not the Secret's root:\n{roots}")
            ok(f"{p.label}: a TokenReview'd token gets {spiffe} over TLS to {host}, chained to the root in Secret "
               f"{ns}/{name} ({summary}); /roots is that root alone")
            # What the README and NOTES tell operators to run (through kubectl exec: loopback).
            st = json.loads(run([chart.bin, "rotate", "status", "--admin", f"http://127.0.0.1:{p.admin}"],
                                f"{p.label}: istio-ca-bridge rotate status", timeout=30))
            statuses.append(st)
        check(all(st["phase"] == "idle" and st["store"] == f"Secret {ns}/{name}" for st in statuses)
              and len({json.dumps(st["roots"], sort_keys=True) for st in statuses}) == 1,
              f"{label}: the replicas do not report one rotation state in Secret {ns}/{name}: {statuses}")
        ok(f"{label}: rotate status on every replica: phase idle, state in Secret {ns}/{name}, the same root "
           f"(serial {statuses[0]['roots'][0].get('serial')})")
        # The Lease holder writes istiod-tls with the same root as its ca.crt.
        ic = k["istiodCert"]
        if ic["enabled"]:
            deadline, code, tls = time.time() + 30, None, None
            while time.time() < deadline:
                code, tls = fake.get(f"/api/v1/namespaces/{ic['namespace']}/secrets/{ic['secretName']}")
                if code == 200:
                    break
                time.sleep(0.3)
            check(code == 200, f"{label}: {ic['namespace']}/{ic['secretName']} never written ({code})")
            ca_crt = base64.b64decode(tls["data"]["ca.crt"]).decode()
            check(ca_crt.strip() == root_pem.strip(), f"{label}: istiod-tls ca.crt is not the shared root")
            le = k["leaderElection"]
            code, lease = fake.get(f"/apis/coordination.k8s.io/v1/namespaces/{le['namespace']}/leases/{le['leaseName']}")
            check(code == 200 and lease["spec"].get("holderIdentity"), f"{label}: Lease {le['namespace']}/{le['leaseName']}: {code} {lease}")
            ok(f"{label}: the Lease holder ({lease['spec']['holderIdentity']}) wrote {ic['namespace']}/{ic['secretName']} "
               "with the shared root as ca.crt")
        # Refused: a token the API server does not know (TokenReview unauthenticated).
        with open(tok, "w") as f:
            f.write(junk_token())
        r = subprocess.run([chart.bin, "request", "--addr", f"127.0.0.1:{pods[0].grpc}", "--server-name", host, "--ca-cert", trust,
                            "--token-file", tok, "--spiffe-id", spiffe, "--cluster-id", cluster_id,
                            "--out-dir", os.path.join(client, "refused")], capture_output=True, text=True, timeout=30)
        check(r.returncode != 0, f"{label}: a token the API server does not know was accepted")
        for p in pods:
            status, text = http_get(f"http://127.0.0.1:{p.admin}/metrics")
            check(status == 200, f"{p.label}: /metrics answers {status}")
            exported |= {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")}
        for p in pods:
            p.stop()
            state = [f for f in p.written if f.startswith(p.cfg["backend"]["stateDir"] + "/")]
            check(not any(f.endswith("root-cert.pem") for f in state),
                  f"{p.label}: a root was written to the pod's stateDir although the Secret holds it: {state}")
    finally:
        for p in pods:
            p.kill()


def junk_token():
    """JWT-shaped, unknown to the API server."""
    head = b64url(json.dumps({"alg": "ES256", "kid": "nobody"}).encode())
    body = b64url(json.dumps({"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:default:web",
                              "aud": ["istio-ca"], "exp": int(time.time()) + 600}).encode())
    return f"{head}.{body}.{b64url(os.urandom(64))}"


def check_live(chart):
    """Runs the binary the way each ci/ install's Deployment, and the chart's defaults, would
    (see Pod): the JWT installs one replica each; the Kubernetes installs with every replica
    against the fake API server (FakeApiServer), which for the defaults proves that 2
    replicas sign with one generated root, kept in the shared Secret."""
    pki = TestPki()
    exported = set()
    referenced = {}
    ran = []
    fake = None
    installs = [(os.path.relpath(p, chart.dir), chart.values_file(p)) for p in chart.ci_files()]
    installs.append(("default values", {}))
    try:
        for label, values in installs:
            docs = chart.render(values)
            # What the alerts and dashboard of every install use (run for real or not).
            for o in objects(docs, "PrometheusRule"):
                for g in o["spec"]["groups"]:
                    for r in g["rules"]:
                        referenced.setdefault(f"alert {r.get('alert')}", set()).update(metric_names_in(r["expr"]))
            for o in objects(docs, "ConfigMap"):
                if o["metadata"]["name"].endswith("-dashboard"):
                    board = json.loads(next(iter(o["data"].values())))
                    for panel in board["panels"]:
                        for t in panel.get("targets", []):
                            referenced.setdefault(f"panel {panel['title']!r}", set()).update(metric_names_in(t["expr"]))
                    for var in board["templating"]["list"]:
                        if isinstance(var.get("query"), dict):
                            referenced.setdefault(f"variable {var['name']}", set()).update(metric_names_in(var["query"]["query"]))
            cfg = helm.values_from_yaml(rendered_config(docs))
            why_not = live_unrunnable(cfg)
            if why_not:
                print(f"not run for real: {label}: {why_not} (rendered, check-config'd and structurally checked by "
                      "render/structure/rbac instead)", flush=True)
                continue
            ran.append(label)
            if cfg["authn"].get("kubernetes"):
                check(chart.fake_apiserver, f"{label}: needs --fake-apiserver (the fake-apiserver binary)")
                if fake is None:
                    fake = FakeApiServer(chart.fake_apiserver, chart.tmp)
                live_kubernetes_install(chart, label, docs, values, pki, fake, exported)
            else:
                live_jwt_install(chart, label, docs, values, pki, exported)
    finally:
        if fake is not None:
            fake.stop()

    def family(name):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in exported:
                return name[: -len(suffix)]
        return name

    check(len(ran) >= 3 and "default values" in ran, f"only {ran} could be run for real")
    check(referenced, "no PrometheusRule or dashboard was rendered by any ci/ file run for real")
    unknown = {where: sorted(n for n in names if family(n) not in exported and n not in INTERMEDIATE_MODE_ONLY)
               for where, names in referenced.items()}
    unknown = {k: v for k, v in unknown.items() if v}
    check(not unknown, f"metric names the bridge does not export: {unknown}\nexported: {sorted(exported)}")
    used = set().union(*referenced.values())
    with open(chart.bin, "rb") as f:
        binary = f.read()
    for n in sorted(INTERMEDIATE_MODE_ONLY):
        check(n not in exported, f"{n} is exported in direct mode now: remove it from INTERMEDIATE_MODE_ONLY")
        check(n.encode() in binary, f"{n} (used by the chart) is not a metric name of this binary")
        users = sorted(w for w, names in referenced.items() if n in names)
        print(f"not seen exported (intermediate mode only, no Vault/AWS here): {n}, used by {', '.join(users) or 'nothing'}; "
              "the binary carries the name", flush=True)
    check(INTERMEDIATE_MODE_ONLY <= used, f"intermediate metrics no panel or alert uses: {sorted(INTERMEDIATE_MODE_ONLY - used)}")
    ok(f"all {len(used - INTERMEDIATE_MODE_ONLY)} direct-mode metric names used by {len(referenced)} alerts/panels are "
       f"exported by the running bridge; the {len(INTERMEDIATE_MODE_ONLY)} intermediate-mode ones are named in the binary")


CHECKS = {
    "lint": check_lint,
    "render": check_render,
    "structure": check_structure,
    "failures": check_failures,
    "schema": check_schema,
    "backends": check_backends,
    "alerts": check_alerts,
    "rbac": check_rbac,
    "image": check_image,
    "live": check_live,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=sorted(CHECKS))
    ap.add_argument("--chart", required=True)
    ap.add_argument("--bin", required=True, help="the istio-ca-bridge binary")
    ap.add_argument("--fake-apiserver", help="the fake-apiserver binary (live: the Kubernetes installs)")
    a = ap.parse_args()
    chart = Chart(a.chart, a.bin, a.fake_apiserver)
    try:
        CHECKS[a.check](chart)
    except (CheckFailed, helm.HelmError) as e:
        print(f"FAILED ({a.check}): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(chart.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
