# Least-privilege Vault/OpenBao policy for istio-ca-bridge in intermediate mode
# (backend.mode: intermediate). Replace <mount> and <issuerRef>; tests/intermediate.rs
# loads this very file (with pki_int and default).
#
# The bridge only asks the mount to sign its own intermediate CA, once per intermediate
# lifetime per replica; it signs workload and serving certificates itself. No sign/<role>,
# no issue, no sign-verbatim, no changes to roles or issuers.
path "<mount>/root/sign-intermediate" {
  capabilities = ["update"]
}

# Only when backend.issuerRef is set: sign with that issuer.
path "<mount>/issuer/<issuerRef>/sign-intermediate" {
  capabilities = ["update"]
}

# The CA chain the trust bundle is read from.
path "<mount>/ca_chain" {
  capabilities = ["read"]
}
path "<mount>/issuer/<issuerRef>/json" {
  capabilities = ["read"]
}

# Keep its own token alive and learn its TTL.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
