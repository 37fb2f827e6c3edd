#!/usr/bin/env python3
"""An independent Istio CA client: Python grpcio + cryptography, no Rust involved.

Generates the gRPC stubs from proto/ca.proto at run time (grpc_tools.protoc), builds CSRs
the way Istio's clients do, calls istio.v1.auth.IstioCertificateService/CreateCertificate
over TLS with Istio's headers and checks what comes back. Prints one JSON object on stdout
and exits 0 only if every check passed (1 otherwise; 2 on usage/environment problems).

Modes:
  issue      one CreateCertificate for --shape (agent|ztunnel) and --key (ec|rsa); checks
             the response layout, writes leaf+intermediates (leaf.pem), the root bundle
             (root.pem) and the private key (key.pem) into --out.
  errors     requests that must fail with an exact gRPC code (CSR for another namespace's
             identity: UNAUTHENTICATED; garbage CSRs: INVALID_ARGUMENT; no token:
             UNAUTHENTICATED).
  keepalive  one channel with aggressive client keepalive (ping every 1 s, also without
             calls); one call, --idle seconds idle, a second call on the SAME channel. The
             channel must never leave READY after the first call (a GOAWAY, e.g.
             "too_many_pings", would make it go IDLE/reconnect).

CSR shapes (protocol notes, section 2):
  agent    istio-agent: subject with one empty O attribute ("O="), no CN, only a CRITICAL
           subjectAltName with one URI. Go's encoding/asn1 (what istio-agent uses) encodes the
           empty string as PrintableString; cryptography accepts an empty O and we ask for
           PrintableString explicitly (its `_type` parameter); if that parameter were gone we
           fall back to cryptography's default UTF8String and report it ("o_encoding").
  ztunnel  ztunnel: empty subject, only a subjectAltName with one URI (critical, as RFC 5280
           requires with an empty subject and as rcgen, which ztunnel uses, emits it).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def fail_env(msg):
    print(json.dumps({"ok": False, "error": msg}))
    sys.exit(2)


def load_stubs(tmp):
    """Runs grpc_tools.protoc on ca.proto into tmp and imports the generated modules."""
    try:
        import grpc_tools
    except ImportError:
        fail_env("python module grpc_tools missing: pip install grpcio grpcio-tools cryptography")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto_dir = os.path.normpath(PROTO_DIR)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        "-I", proto_dir, "-I", include,
        "--python_out", tmp, "--grpc_python_out", tmp,
        os.path.join(proto_dir, "ca.proto"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail_env(f"protoc failed ({r.returncode}): {r.stderr}")
    sys.path.insert(0, tmp)
    import ca_pb2  # noqa: E402
    import ca_pb2_grpc  # noqa: E402
    return ca_pb2, ca_pb2_grpc


def spiffe(td, ns, sa):
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


def make_key(kind):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def empty_o_attribute():
    """(NameAttribute O="", encoding name)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        from cryptography.x509.name import _ASN1Type
        return (
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _type=_ASN1Type.PrintableString),
            "PrintableString",
        )
    except (ImportError, TypeError):
        return x509.NameAttribute(NameOID.ORGANIZATION_NAME, ""), "UTF8String"


def make_csr(key, uri, shape):
    """PEM CSR in istio-agent or ztunnel shape, and the O encoding used (or None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    o_enc = None
    if shape == "agent":
        attr, o_enc = empty_o_attribute()
        subject = x509.Name([attr])
    elif shape == "ztunnel":
        subject = x509.Name([])
    else:
        raise ValueError(shape)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), o_enc


def spki(pub):
    from cryptography.hazmat.primitives import serialization
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def channel(args, extra_options=()):
    import grpc
    with open(args.root, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", args.server_name)] + list(extra_options)
    return grpc.secure_channel(args.address, creds, options=options)


def build_request(ca_pb2, csr, ttl=86400):
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    req.metadata.update({"CertSigner": ""})
    assert req.metadata.fields["CertSigner"].WhichOneof("kind") == "string_value"
    return req


def call_metadata(token):
    md = [("clusterid", "Kubernetes")]
    if token is not None:
        md.insert(0, ("authorization", f"Bearer {token}"))
    return md


def check_chain(chain, identity, key):
    """Checks the response layout of protocol section 3. Returns (problems, facts)."""
    from cryptography import x509
    problems = []
    facts = {"chain_elements": len(chain)}
    if len(chain) < 2:
        problems.append(f"chain has {len(chain)} elements, need >= 2")
        return problems, facts
    for i, el in enumerate(chain):
        if not el.endswith("\n"):
            problems.append(f"element {i} does not end with a newline")
        n = el.count("-----BEGIN CERTIFICATE-----")
        if i < len(chain) - 1 and n != 1:
            problems.append(f"element {i} (not last) holds {n} PEM certificates, need exactly 1")
        if i == len(chain) - 1 and n < 1:
            problems.append("last element holds no certificate")
    if problems:
        return problems, facts
    certs = [x509.load_pem_x509_certificate(el.encode()) for el in chain[:-1]]
    roots = x509.load_pem_x509_certificates(chain[-1].encode())
    facts["roots"] = len(roots)
    leaf = certs[0]
    # cryptography parses extensions with a strict DER parser (e.g. it rejects a
    # BasicConstraints that encodes the DEFAULT cA=FALSE explicitly, which X.690 forbids).
    for i, c in enumerate(certs + roots):
        try:
            c.extensions
        except ValueError as e:
            what = "leaf" if i == 0 else f"certificate {i}"
            problems.append(f"{what} is not valid DER (cryptography {_crypto_version()}): {e}")
    if problems:
        return problems, facts
    try:
        san_ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        problems.append("leaf has no subjectAltName")
        return problems, facts
    uris = san_ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    facts["uri_sans"] = uris
    facts["dns_sans"] = san_ext.value.get_values_for_type(x509.DNSName)
    facts["san_critical"] = san_ext.critical
    facts["leaf_subject"] = leaf.subject.rfc4514_string()
    facts["not_before"] = int(leaf.not_valid_before_utc.timestamp())
    facts["not_after"] = int(leaf.not_valid_after_utc.timestamp())
    if not uris or uris[0] != identity:
        problems.append(f"leaf's first URI SAN {uris[:1]} != {identity}")
    if spki(leaf.public_key()) != spki(key.public_key()):
        problems.append("leaf public key differs from the CSR key")
    # Signatures: each certificate is signed by the next; the last non-root one by a root.
    for i, c in enumerate(certs):
        issuers = [certs[i + 1]] if i + 1 < len(certs) else roots
        if not any(_issued_by(c, p) for p in issuers):
            problems.append(f"certificate {i} is not signed by the next element")
    return problems, facts


def _crypto_version():
    import cryptography
    return cryptography.__version__


def _issued_by(cert, parent):
    try:
        cert.verify_directly_issued_by(parent)
        return True
    except Exception:
        return False


def mode_issue(args, ca_pb2, ca_pb2_grpc):
    from cryptography.hazmat.primitives import serialization
    identity = spiffe(args.trust_domain, args.ns, args.sa)
    key = make_key(args.key)
    csr, o_enc = make_csr(key, identity, args.shape)
    with channel(args) as ch:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        resp = stub.CreateCertificate(
            build_request(ca_pb2, csr, args.ttl), metadata=call_metadata(args.token), timeout=args.timeout
        )
    chain = list(resp.cert_chain)
    problems, facts = check_chain(chain, identity, key)
    os.makedirs(args.out, exist_ok=True)
    leaf_f = os.path.join(args.out, "leaf.pem")
    root_f = os.path.join(args.out, "root.pem")
    key_f = os.path.join(args.out, "key.pem")
    with open(leaf_f, "w") as f:
        f.write("".join(chain[:-1]))
    with open(root_f, "w") as f:
        f.write(chain[-1] if chain else "")
    with open(key_f, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    out = {
        "ok": not problems, "mode": "issue", "shape": args.shape, "key": args.key,
        "identity": identity, "o_encoding": o_enc, "problems": problems,
        "leaf_file": leaf_f, "root_file": root_f, "key_file": key_f,
    }
    out.update(facts)
    return out


def mode_errors(args, ca_pb2, ca_pb2_grpc):
    import grpc
    garbage_pem = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        "bm90IGEgY2VydGlmaWNhdGUgcmVxdWVzdCwganVzdCBzb21lIGJ5dGVzIGluIGEgUEVNIGFybW91cg==\n"
        "-----END CERTIFICATE REQUEST-----\n"
    )
    key = make_key("ec")
    other, _ = make_csr(key, spiffe(args.trust_domain, args.ns + "-other", args.sa), "agent")
    own, _ = make_csr(key, spiffe(args.trust_domain, args.ns, args.sa), "agent")
    cases = [
        ("csr_for_other_namespace", other, args.token, grpc.StatusCode.UNAUTHENTICATED),
        ("garbage_csr_text", "this is not a CSR\n", args.token, grpc.StatusCode.INVALID_ARGUMENT),
        ("garbage_csr_pem", garbage_pem, args.token, grpc.StatusCode.INVALID_ARGUMENT),
        ("no_token", own, None, grpc.StatusCode.UNAUTHENTICATED),
    ]
    results = []
    with channel(args) as ch:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        for name, csr, token, want in cases:
            r = {"name": name, "expected": want.name}
            try:
                resp = stub.CreateCertificate(
                    build_request(ca_pb2, csr), metadata=call_metadata(token), timeout=args.timeout
                )
                r.update(got="OK", chain_elements=len(resp.cert_chain))
            except grpc.RpcError as e:
                r.update(got=e.code().name, details=e.details())
            r["ok"] = r["got"] == r["expected"]
            results.append(r)
    return {"ok": all(r["ok"] for r in results), "mode": "errors", "cases": results}


def mode_keepalive(args, ca_pb2, ca_pb2_grpc):
    import grpc
    identity = spiffe(args.trust_domain, args.ns, args.sa)
    states = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def on_state(s):
        with lock:
            states.append((round(time.monotonic() - t0, 3), s.name))

    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    ch = channel(args, options)
    ch.subscribe(on_state, try_to_connect=True)
    stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
    calls = []
    problems = []
    try:
        for i in range(2):
            if i == 1:
                time.sleep(args.idle)
            key = make_key("ec")
            csr, _ = make_csr(key, identity, "agent")
            t = round(time.monotonic() - t0, 3)
            try:
                resp = stub.CreateCertificate(
                    build_request(ca_pb2, csr), metadata=call_metadata(args.token), timeout=args.timeout
                )
                p, _ = check_chain(list(resp.cert_chain), identity, key)
                problems += [f"call {i + 1}: {x}" for x in p]
                calls.append({"at": t, "code": "OK"})
            except grpc.RpcError as e:
                calls.append({"at": t, "code": e.code().name, "details": e.details()})
                problems.append(f"call {i + 1} failed: {e.code().name} {e.details()}")
        # Let any late state change (a GOAWAY right after the second call) land.
        time.sleep(0.5)
    finally:
        ch.unsubscribe(on_state)
        ch.close()
    with lock:
        seen = list(states)
    names = [s for _, s in seen]
    if "READY" not in names:
        problems.append("channel never reported READY")
    else:
        after = names[names.index("READY") + 1:]
        if after:
            problems.append(f"channel left READY after the first connection: {after} "
                            "(GOAWAY/disconnect, e.g. too_many_pings)")
    return {"ok": not problems, "mode": "keepalive", "idle_seconds": args.idle,
            "calls": calls, "states": seen, "problems": problems}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["issue", "errors", "keepalive"])
    p.add_argument("--address", required=True, help="host:port of the gRPC listener")
    p.add_argument("--server-name", default="localhost", help="TLS name to verify (target name override)")
    p.add_argument("--root", required=True, help="PEM root bundle that signs the serving cert")
    p.add_argument("--token-file", required=True, help="file holding the bearer token")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--ns", default="default")
    p.add_argument("--sa", default="default")
    p.add_argument("--shape", choices=["agent", "ztunnel"], default="agent")
    p.add_argument("--key", choices=["ec", "rsa"], default="ec")
    p.add_argument("--ttl", type=int, default=86400, help="validity_duration in seconds")
    p.add_argument("--out", default=".", help="directory for leaf.pem, root.pem, key.pem")
    p.add_argument("--idle", type=float, default=5.0, help="keepalive mode: idle seconds between calls")
    p.add_argument("--timeout", type=float, default=20.0, help="deadline of each call, seconds")
    args = p.parse_args()
    if args.mode == "keepalive":
        # Before grpc is imported: C-core reads these once. Lets the caller see pings and
        # any GOAWAY on stderr.
        os.environ.setdefault("GRPC_VERBOSITY", "debug")
        os.environ.setdefault("GRPC_TRACE", "http_keepalive")
    with open(args.token_file) as f:
        args.token = f.read().strip()
    try:
        import grpc  # noqa: F401
        import cryptography  # noqa: F401
    except ImportError as e:
        fail_env(f"{e}: pip install grpcio grpcio-tools cryptography")
    with tempfile.TemporaryDirectory(prefix="ca-stubs-") as tmp:
        ca_pb2, ca_pb2_grpc = load_stubs(tmp)
        result = {"issue": mode_issue, "errors": mode_errors, "keepalive": mode_keepalive}[args.mode](
            args, ca_pb2, ca_pb2_grpc
        )
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
