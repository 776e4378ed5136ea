//! Errors at the edge of the protocol module. Every message is one line that names the cause;
//! [`ProtocolError::hint`] adds the fix where there is a well-known one. No message ever carries
//! a password: connection targets are printed from `ConnInfo::display_safe` or as `host:port`.

use super::codec::{CodecError, ServerNotice};
use super::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("could not connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {target}")]
    ConnectTimeout { target: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server closed the connection unexpectedly {context}")]
    Closed { context: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("server error: {0}")]
    Server(ServerNotice),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("TLS handshake with {0}")]
    TlsHandshake(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("protocol violation: {0}")]
    Unexpected(String),
}

impl ProtocolError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ProtocolError::Server(n) => Some(&n.code),
            _ => None,
        }
    }

    pub fn server_message(&self) -> Option<&str> {
        match self {
            ProtocolError::Server(n) => Some(&n.message),
            _ => None,
        }
    }

    /// True for failures that a retry after a pause may cure (network, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            ProtocolError::Connect { .. }
            | ProtocolError::ConnectTimeout { .. }
            | ProtocolError::Io { .. }
            | ProtocolError::Closed { .. } => true,
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
            // 53300 too_many_connections, 08xxx connection exceptions
            ProtocolError::Server(n) => {
                matches!(n.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
                    || n.code.starts_with("08")
            }
            _ => false,
        }
    }

    /// What the user can do about it, when a fix is known.
    pub fn hint(&self) -> Option<String> {
        match self {
            ProtocolError::Connect { .. } | ProtocolError::ConnectTimeout { .. } => Some(
                "check that the server is running and accepts TCP connections on that host and port \
                 (listen_addresses, port, firewall)"
                    .into(),
            ),
            ProtocolError::Server(n) => server_hint(n),
            _ => None,
        }
    }
}

fn server_hint(n: &ServerNotice) -> Option<String> {
    let msg = n.message.as_str();
    Some(match n.code.as_str() {
        "28P01" => "check the password given in the connection string, PGPASSWORD or ~/.pgpass".into(),
        "28000" if msg.contains("pg_hba.conf") => "add a line for this user to pg_hba.conf with database \
             `replication`, e.g. `host replication USER 127.0.0.1/32 scram-sha-256`, then reload the server"
            .into(),
        "28000" | "42501" => "the role needs the REPLICATION attribute: ALTER ROLE ... REPLICATION".into(),
        "42704" if msg.contains("replication slot") => {
            "create the slot with --create-slot, or SELECT pg_create_physical_replication_slot('NAME', true)".into()
        }
        "55006" if msg.contains("replication slot") => "another client is streaming from this slot; stop it or \
             use a different --slot"
            .into(),
        "58P01" if msg.contains("already been removed") => "the server has recycled WAL this archive still \
             needs; keep a replication slot for the agent, then start a new archive from a fresh base backup"
            .into(),
        "53300" => "the server has no free WAL sender: raise max_wal_senders or stop an idle replication client"
            .into(),
        "3D000" => "the database in the connection string does not exist; leave dbname out for replication".into(),
        _ => return n.hint.clone(),
    })
}
