//! Test support: throw-away PostgreSQL clusters (15, or 16/17/18 for the version matrix) on
//! 127.0.0.1, temp dirs, and the walagent binary.
//!
//! Everything here is synchronous (std::process::Command), so it works from plain `#[test]`s
//! and from `#[tokio::test]`s alike.
//!
//! # Layout
//! All files live under one test root: `$WALAGENT_TEST_ROOT` if set; else
//! `/dev/shm/walagent-tests` when /dev/shm is a tmpfs with at least 4 GiB available (clusters
//! on disk are several times slower to create and to crash-recover when many tests fsync in
//! parallel); else `/tmp/walagent-tests`. Non-root users get `walagent-tests-<uid>` (the
//! fallback then under $TMPDIR). Each cluster gets its own directory
//! `<root>/w<pid>-<starttime>-<seq>-<kind>`:
//!
//! ```text
//! <dir>/data/             PGDATA
//! <dir>/.s.PGSQL.<port>   unix socket (unix_socket_directories = <dir>)
//! <dir>/postgres.log      server log
//! <dir>/ca.crt            CA certificate (tls only)
//! ```
//!
//! # Root
//! initdb/pg_ctl/postgres refuse to run as root. When the tests run as root (the CI case),
//! every server-side command runs as the `postgres` OS user through `runuser -u postgres --`,
//! and cluster directories are chowned to it. psql runs as the calling user (root may use the
//! postgres-owned socket directory).
//!
//! # Speed
//! `initdb` runs once per WAL segment size: the result (with roles already created) is cached
//! as a template under the test root (built in a private directory, published with an atomic
//! rename, serialized with a lock file). A new cluster is `cp -a` of the template, followed by
//! giving it a fresh, unique system identifier (pg_control is patched and `pg_resetwal`
//! rewrites the WAL), so clusters never share a system identifier.
//!
//! # Clean-up
//! Dropping a [`PgCluster`] stops it (`-m immediate`) and removes its directory unless
//! `WALAGENT_KEEP_TEST_DIRS` is set. If the thread is panicking, the tail of the server log is
//! printed to stderr (the test harness shows it with the failure). Directories (and servers)
//! left behind by test processes that no longer exist are removed the first time a later test
//! process uses the test root.
//!
//! # Environment
//! - `WALAGENT_PG_BIN`: PostgreSQL 15's bin directory (default /usr/lib/postgresql/15/bin,
//!   else `pg_config --bindir`): the client tools (psql, ...) of every cluster and the server
//!   of clusters without [`PgOptions::server_bin`].
//! - `WALAGENT_PG_VERSIONS`: the directory holding `16/bin`, `17/bin`, `18/bin` for the version
//!   matrix (default /opt/walagent-pg as root, else `~/.cache/walagent-pg`), filled by
//!   `.ci/install-pg-versions`; see [`versions`].
//! - `WALAGENT_TEST_ROOT`: the test root (see above), e.g. `/tmp/walagent-tests` to keep the
//!   clusters on disk. Its path must be short (the unix socket path has to stay below 108
//!   bytes) and, as root, traversable by `postgres`.
//! - `WALAGENT_TEST_TIMING`: print how long each step of a cluster start took.
//! - `WALAGENT_KEEP_TEST_DIRS`: keep cluster and temp directories (servers are still stopped).
//!
//! # Modules
//! [`archive`] (segment names in a local archive, the object(s) holding a segment raw or `.zst`), [`cluster`] (PgCluster, options), [`replication`] (pg_stat_replication rows), [`template`]
//! (initdb template, system identifiers, TLS, pg_hba), [`roles`], [`cmd`] (walagent, psql,
//! PostgreSQL tools, running walagent), [`dirs`] (test root, temp dirs, ownership), [`process`]
//! (/proc, process trees), [`wait`] (polling), [`tmpfs`], [`s3`] (the s3s-fs server),
//! [`versions`] (server bin directories of the PostgreSQL version matrix). Every
//! public name is re-exported here, so tests use `support::NAME`.
#![allow(dead_code)]
mod archive;
mod cluster;
mod cmd;
mod dirs;
pub mod lifecycle;
mod process;
mod replication;
mod roles;
pub mod s3;
mod template;
pub mod tls_proxy;
mod tmpfs;
mod versions;
mod wait;

// Every name stays reachable as `support::NAME`; each test file uses only some of them.
#[allow(unused_imports)]
pub use self::{
    archive::{
        archived_segment_path, archived_segments, assert_contiguous, damage_archived_segment,
        encode_like, is_archived, is_segment_name, raw_segments, read_archived_segment,
        read_wal_object, remove_archived_segment, replace_file, replace_segment_wal,
        segment_objects, set_segment_aside, sole_segment_object, try_archived_segment_path,
        wait_for_compaction, wal_key, zst_segments, SetAside,
    },
    cluster::{free_port, PgCluster, PgOptions, WalRange},
    cmd::{
        assert_ok, compress_inline, error_line, inline_env, is_root, pg_bin, psql_conninfo,
        run_command, run_walagent, sigterm, stderr_of, stream_cmd, wait_output, walagent,
        walagent_path_for_postgres, INLINE,
    },
    dirs::{chown_postgres_path, chown_postgres_tree, tempdir, TestDir},
    process::{pid_alive, stop_prefetch_worker},
    replication::ReplicationRow,
    roles::{
        password_for, MD5_USER, NOREPL_USER, REPL_PASSWORD, REPL_USER, SCRAM_USER, SSL_USER,
        SUPERUSER, SUPER_PASSWORD, TRUST_USER,
    },
    tmpfs::TmpfsMount,
    versions::{
        install_hint, pg_versions_dir, server_bin_for, server_bin_or_skip, server_major, PG_MATRIX,
    },
    wait::{wait_for, wait_until},
};
