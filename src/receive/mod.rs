//! The streaming loop. Stub: being written.
