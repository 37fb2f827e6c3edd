# Least-privilege Vault/OpenBao policy for istio-ca-bridge in intermediate mode
# (backend.mode: intermediate). Replace <mount>; tests/intermediate.rs loads this very
# file (with pki_int).
#
# The bridge only asks the mount to sign its own intermediate CA, once per intermediate
# lifetime per replica; it signs workload and serving certificates itself. No sign/<role>,
# no issue, no sign-verbatim, no changes to roles or issuers.
path "<mount>/root/sign-intermediate" {
  capabilities = ["update"]
}

# With backend.issuerRef set, and during a rotation of the mount's root
# (docs/root-rotation.md): sign with the issuer under the phase's root.
path "<mount>/issuer/+/sign-intermediate" {
  capabilities = ["update"]
}

# The CA chain the trust bundle is read from, and the mount's issuers (a new root issuer
# starts a rotation). Reading an issuer shows no key.
path "<mount>/ca_chain" {
  capabilities = ["read"]
}
path "<mount>/issuers" {
  capabilities = ["list"]
}
path "<mount>/issuer/+" {
  capabilities = ["read"]
}

# Keep its own token alive and learn its TTL.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
