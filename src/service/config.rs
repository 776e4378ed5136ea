//! The TOML configuration file (work in progress).
