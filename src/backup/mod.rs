//! Base backups: what walagent needs beyond the wire protocol to take and check a physical base
//! backup.
//!
//! The COPY sub-protocol of `BASE_BACKUP` is decoded in [`crate::protocol::basebackup`]; this
//! module holds what comes out of it. [`manifest`] parses the server's `backup_manifest` (JSON,
//! versions 1 and 2), verifies its own SHA-256 `Manifest-Checksum`, and checks file contents
//! against their per-file checksums (CRC32C, SHA-224/256/384/512 or none).
//!
//! A backup taken with `WAL false` needs the WAL between the manifest's `WAL-Ranges` start and end
//! LSNs from walagent's archive before it can be restored. See `proto-notes/base-backup.md`.

pub mod catalog;
pub mod extract;
pub mod listing;
pub mod manifest;
pub mod progress;
pub mod seed;
pub mod take;
pub mod tarstream;

/// Why [`connect_for_backup`] failed.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Protocol(crate::protocol::ProtocolError),
    /// The server's `server_version`, below 15.
    TooOld(String),
}

/// Connects for BASE_BACKUP, which walagent speaks in PostgreSQL 15's form only (parenthesised
/// options, one COPY for every archive and the manifest). Returns `server_version_num`.
pub(crate) async fn connect_for_backup(
    conninfo: &crate::protocol::ConnInfo,
) -> Result<(crate::protocol::Connection, u32), ConnectError> {
    let mut conn = crate::protocol::Connection::connect(conninfo)
        .await
        .map_err(ConnectError::Protocol)?;
    let version = conn
        .server_version_num()
        .await
        .map_err(ConnectError::Protocol)?;
    if version < 150000 {
        let text = conn
            .parameter("server_version")
            .unwrap_or("(unknown)")
            .to_string();
        conn.close().await;
        return Err(ConnectError::TooOld(text));
    }
    Ok((conn, version))
}
