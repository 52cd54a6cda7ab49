// Package pki is the cluster's trust: a cluster CA, the certificates it issues to servers,
// agents and clients, the TLS configurations built from them, join tokens that let a new
// agent trust the cluster before it has the CA, and a Raft stream layer over mutual TLS.
//
// # Identity
//
// A certificate's role (server, agent, client, ingress) is its single Subject OrganizationalUnit
// "fireworks-<role>"; its CommonName is the node or client name. Authorisation between
// cluster members is "chains to the cluster CA and carries the expected role": peer
// addresses (pod IPs, headless-Service names) change, the CA and the role do not, so the
// Raft layer does not check host names. Clients that dial a server by name (ClientTLS with a
// serverName) do check it.
//
// # Join tokens
//
// A join token is one copy-pasteable string:
//
//	fwj1_<id: 16 hex>_<secret: 64 hex>_<CA fingerprint: 64 hex>
//
// Its parts, and why:
//
//   - "fwj1_" names the kind and version, so an API token ("fwk_…") pasted where a join
//     token belongs gets a precise error, secret scanners can match it, and a later format
//     can be told apart.
//   - id names the server's stored record, so the server never scans or compares hashes of
//     other tokens.
//   - secret is 256 random bits. The server stores only HashSecret(secret) (SHA-256): with
//     that much entropy a slow hash buys nothing and a leaked state snapshot yields no
//     usable token.
//   - the fingerprint is SHA-256 of the CA certificate's DER. The joining agent has no CA
//     yet; it dials the server with PinnedCA, which accepts the server only if the chain the
//     server sends verifies up to a CA certificate with exactly that fingerprint (the
//     kubeadm --discovery-token-ca-cert-hash idea, folded into the token so there is one
//     thing to copy). The agent then keeps that CA and sends a CSR (NewCSR) with the token.
//
// "_" separates the fields because none of them can contain it, and the whole token
// survives shells, URLs and YAML unquoted.
package pki
