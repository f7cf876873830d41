//! Kubernetes mode on the test bed (placeholder).
