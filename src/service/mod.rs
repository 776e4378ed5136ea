//! `walagent run`: one process serving many clusters from a config file (streams, scheduled
//! backups, retention), with Prometheus metrics, health endpoints, JSON logs, SIGHUP reload and
//! systemd notify. Sits above the command modules and below `cli`.

pub mod config;
pub mod log;
pub mod metrics;
