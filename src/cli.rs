//! Command-line parsing. Stub: being written.
