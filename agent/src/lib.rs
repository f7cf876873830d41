//! mtls-agent: a per-node, sidecar-less mTLS agent. eBPF captures pods' TCP connections; the
//! agent carries them from inside each pod's network namespace.
//!
//! Modules, in the direction data flows: `workloads` (what pods exist) -> `capture` (eBPF
//! programs and maps) -> `inpod` (sockets in pod namespaces) -> `tunnel` (carrying
//! connections) -> `admin` (what the operator sees; `procnet` reads a pod's UDP listeners for
//! it); `agent` ties them together and `cli` parses the command line.

pub mod admin;
pub mod agent;
pub mod authz;
pub mod capture;
pub mod certservice;
pub mod cli;
pub mod enrollment;
pub mod identity;
pub mod inpod;
pub mod kubernetes;
pub mod loglimit;
pub mod owners;
pub mod policy;
pub mod procnet;
pub mod refused;
pub mod services;
pub mod tunnel;
pub mod uninstall;
pub mod workloads;
pub mod yamlde;
pub mod yamlpos;

/// An error and its causes on one line, each cause once. Most of our errors already name
/// their source in their own message, so anyhow's `{:#}` would print it twice
/// ("… (os error 2): … (os error 2)").
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_names_each_cause_once() {
        let io = || std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(io()).context(format!("reading /x: {}", io()));
        assert_eq!(error_text(&e), format!("reading /x: {}", io()));
        let e = anyhow::Error::new(io()).context("reading /x");
        assert_eq!(error_text(&e), format!("reading /x: {}", io()));
        let e = e.context("starting");
        assert_eq!(error_text(&e), format!("starting: reading /x: {}", io()));
    }
}
