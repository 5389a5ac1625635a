//! Shared helpers for thinlun benchmarks.
