//! `WorkloadSet::parse` on arbitrary text, then the look-ups the agent makes on an accepted set
//! (by IP, service VIPs, services of a pod). A rejection must point at a line of the file.

#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use libfuzzer_sys::fuzz_target;
use mtls_agent::{services::ServiceTable, workloads::WorkloadSet};

fuzz_target!(|data: &[u8]| {
    // The file is read with read_to_string: anything that is not UTF-8 never gets here.
    let Ok(src) = std::str::from_utf8(data) else { return };
    match WorkloadSet::parse(src, Path::new("workloads.yaml")) {
        Ok(ws) => {
            for w in &ws.workloads {
                let _ = w.key();
                assert!(ws.by_ip(w.ip).is_some(), "pod {} not found by its own IP", w.key());
                let _ = ws.find(&w.name, &w.namespace);
                let _ = ws.services_for(w).count();
            }
            let table = ServiceTable::build(&ws, "node1");
            for s in &ws.services {
                if let Some(vip) = s.vip {
                    for p in &s.ports {
                        assert!(table.get(SocketAddr::new(vip, p.port)).is_some());
                    }
                }
            }
            let _ = table.get(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80));
            let _ = ws.by_ip(IpAddr::V6(Ipv6Addr::LOCALHOST));
            let _ = ws.on_node("node1").count();
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("workloads.yaml"), "error does not name the file: {text}");
            if let Some(line) = e.line() {
                // A line past the end of the text points nowhere. libyaml ends an unterminated
                // last line itself, so an error at the very end may be one line further.
                let lines = yaml_lines(src) + usize::from(!src.ends_with(['\n', '\r']));
                assert!(
                    (1..=lines).contains(&line),
                    "error points at line {line} of a {lines}-line file: {text}"
                );
            }
        }
    }
});

/// Lines as YAML (1.1, libyaml) counts them: `\r\n`, a lone `\r`, `\n`, NEL, LS and PS each end
/// one.
fn yaml_lines(src: &str) -> usize {
    let unified = src.replace("\r\n", "\n");
    let breaks = unified
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    breaks + 1
}
