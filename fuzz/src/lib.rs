//! The fuzz targets' entry points live in `entries.rs`, which depends only on `walagent` and
//! `bytes`, so the stable test `tests/fuzz_corpus.rs` can include it with `#[path]` and replay
//! every corpus file through exactly the same code.

#[path = "../entries.rs"]
pub mod entries;
