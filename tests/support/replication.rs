//! Replication state (for the chaos suite): `pg_stat_replication` rows.

use super::cluster::PgCluster;
use super::roles::SUPERUSER;

/// One `pg_stat_replication` row.
#[derive(Clone, Debug)]
pub struct ReplicationRow {
    pub state: String,
    /// `flush_lsn` (empty when the client has not reported one).
    pub flush_lsn: String,
    pub sync_state: String,
}

impl PgCluster {
    /// `pg_replication_slots.restart_lsn` of `slot`; None when the slot is missing, has no
    /// restart_lsn, or the server does not answer.
    pub fn slot_restart_lsn(&self, slot: &str) -> Option<String> {
        self.try_psql(&format!(
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .ok()
        .filter(|s| !s.is_empty())
    }

    /// `pg_replication_slots.active` of `slot` (None when missing or the server does not answer).
    pub fn slot_active(&self, slot: &str) -> Option<bool> {
        match self.try_psql(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"
        )) {
            Ok(s) if s == "t" => Some(true),
            Ok(s) if s == "f" => Some(false),
            _ => None,
        }
    }

    /// The `pg_stat_replication` row of the client with this application_name (the first when
    /// there are several); None when it is not connected or the server does not answer.
    pub fn replication_row(&self, application_name: &str) -> Option<ReplicationRow> {
        let s = self
            .try_psql(&format!(
                "SELECT state, coalesce(flush_lsn::text, ''), sync_state FROM pg_stat_replication \
                 WHERE application_name = '{application_name}' ORDER BY backend_start LIMIT 1"
            ))
            .ok()?;
        let mut f = s.split('|');
        let (state, flush, sync) = (f.next()?, f.next()?, f.next()?);
        if state.is_empty() {
            return None;
        }
        Some(ReplicationRow {
            state: state.to_string(),
            flush_lsn: flush.to_string(),
            sync_state: sync.to_string(),
        })
    }

    /// A libpq conninfo for the superuser over the unix socket (trust auth, no password), for
    /// [`psql_conninfo`] from threads that do not hold the cluster.
    pub fn socket_conninfo(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname=postgres",
            self.socket_dir().display(),
            self.port()
        )
    }
}
