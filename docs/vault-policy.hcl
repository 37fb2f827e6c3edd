# Least-privilege Vault/OpenBao policy for istio-ca-bridge.
# Replace <mount>, <role>, <serverRole> and <issuerRef> with your values; the tests in
# tests/vault_*.rs load this very file (with pki_int, spiffe, serving and default).

# Sign workload certificates with the SPIFFE role, and the bridge's own serving
# certificate with its role. Nothing else: no `issue` (Vault would hold the private
# key), no `sign-verbatim` (copies whatever the CSR asks for), no role or issuer changes.
path "<mount>/sign/<role>" {
  capabilities = ["update"]
}
path "<mount>/sign/<serverRole>" {
  capabilities = ["update"]
}

# Only when backend.issuerRef is set: the issuer-path sign endpoints.
path "<mount>/issuer/<issuerRef>/sign/<role>" {
  capabilities = ["update"]
}
path "<mount>/issuer/<issuerRef>/sign/<serverRole>" {
  capabilities = ["update"]
}

# The CA chain the trust bundle is read from. Vault serves these without
# authentication too; they are listed so that the policy states everything the bridge reads.
path "<mount>/ca_chain" {
  capabilities = ["read"]
}
path "<mount>/issuer/<issuerRef>/json" {
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
