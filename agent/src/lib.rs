//! mtls-agent: a per-node, sidecar-less mTLS agent. eBPF captures pods' TCP connections; the
//! agent carries them from inside each pod's network namespace.
//!
//! Modules, in the direction data flows: `workloads` (what pods exist) -> `capture` (eBPF
//! programs and maps) -> `inpod` (sockets in pod namespaces) -> `tunnel` (carrying
//! connections) -> `admin` (what the operator sees); `agent` ties them together and `cli`
//! parses the command line.

pub mod admin;
pub mod agent;
pub mod capture;
pub mod cli;
pub mod identity;
pub mod inpod;
pub mod kubernetes;
pub mod policy;
pub mod tunnel;
pub mod workloads;
pub mod yamlde;
pub mod yamlpos;
