//! Shared helpers for thinlun integration tests.
