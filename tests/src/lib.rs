//! Mini-cluster harness.
