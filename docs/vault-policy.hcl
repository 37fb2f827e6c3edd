# Least-privilege Vault/OpenBao policy for istio-ca-bridge.
# Replace <mount>, <role> and <serverRole> with your values; the tests in
# tests/vault_*.rs load this very file (with pki_int, spiffe and serving).

# Sign workload certificates with the SPIFFE role, and the bridge's own serving
# certificate with its role. Nothing else: no `issue` (Vault would hold the private
# key), no `sign-verbatim` (copies whatever the CSR asks for), no role or issuer changes.
path "<mount>/sign/<role>" {
  capabilities = ["update"]
}
path "<mount>/sign/<serverRole>" {
  capabilities = ["update"]
}

# The issuer-path sign endpoints: with backend.issuerRef set (that issuer), and during a
# rotation of the mount's root (docs/root-rotation.md), when the bridge pins each call to
# the issuer under the root of the phase. To forbid rotation following, replace `+` with
# your issuerRef and set rotation.followUpstream: false.
path "<mount>/issuer/+/sign/<role>" {
  capabilities = ["update"]
}
path "<mount>/issuer/+/sign/<serverRole>" {
  capabilities = ["update"]
}

# The CA chain the trust bundle is read from, and the mount's issuers: a new root issuer
# is how the bridge learns that Vault's root is rotating. Reading an issuer shows its
# certificate, chain, key ID and usage, never a key.
path "<mount>/ca_chain" {
  capabilities = ["read"]
}
path "<mount>/issuers" {
  capabilities = ["list"]
}
path "<mount>/issuer/+" {
  capabilities = ["read"]
}

# Keep its own token alive and learn its TTL (Vault's `default` policy grants these too;
# listed so that the bridge also works with token_no_default_policy=true).
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
