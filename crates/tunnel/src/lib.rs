//! Tunnels to databases sluice cannot reach directly.
//!
//! `sluice-tunnel` owns SSH bastion tunnels (`direct-tcpip` channels bridged through a
//! loopback listener, host keys pinned by fingerprint, keepalive and reconnect) and the
//! reverse tunnel that `sluice-agent` dials out to from a private network.
//!
//! It must not know about PostgreSQL beyond a host and port to forward to: callers get a
//! local address and connect through it as if it were the database.
//!
//! The tunnels arrive with the connectivity issue.
