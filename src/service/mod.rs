//! `walagent run`: one process serving many clusters from a config file (streams, scheduled
//! backups, retention), with Prometheus metrics, health endpoints, JSON logs, SIGHUP reload and
//! systemd notify. Sits above the command modules and below `cli`.
//!
//! [`config`] reads the file; [`run`] supervises one task per cluster and reloads on SIGHUP;
//! [`notify`] talks to systemd; [`metrics`] serves the figures.

pub mod config;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod run;
