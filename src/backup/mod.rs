//! Base backups over BASE_BACKUP: [`take`] stores one in the archive (`walagent backup`),
//! [`seed`] unpacks one into a standby's data directory (`walagent seed-standby`), [`listing`]
//! renders the catalog for `walagent backups`.
//!
//! The COPY sub-protocol of `BASE_BACKUP` is decoded in [`crate::protocol::basebackup`]; the tar
//! parser, the extractor and the `backup_manifest` checks live in [`crate::datadir`], the
//! catalog of stored backups in [`crate::archive::catalog`]. Never imports `restore`.
//!
//! A backup taken with `WAL false` needs the WAL between the manifest's `WAL-Ranges` start and end
//! LSNs from walagent's archive before it can be restored. See `proto-notes/base-backup.md`.

pub mod defaults;
pub mod listing;
pub mod seed;
pub mod take;

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
