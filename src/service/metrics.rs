//! Prometheus metrics and health endpoints (work in progress).
