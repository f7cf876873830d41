//! End-to-end: identity isolation. Each pod is presented only as itself, certificates exist only
//! for the agent's own node's pods, a removed pod's certificate is dropped, and no workload key
//! is written to disk or to the log. Runs as root.

use std::{path::Path, time::Duration};

use anyhow::Result;
use testbed::{agent::WorkloadsFile, mesh::Mesh};

const NS: &str = "shop";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{sa}")
}

/// Every file under `dir` whose content holds a PEM private key.
fn files_with_keys(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return found };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_with_keys(&p));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(11).any(|w| w == b"PRIVATE KEY")) {
            found.push(p.display().to_string());
        }
    }
    found
}

#[test]
fn pods_are_presented_only_as_themselves_and_keys_stay_in_memory() -> Result<()> {
    let mut m = Mesh::build("id-iso", NS, &[("node1", "a"), ("node1", "b"), ("node2", "c")])?;
    let (file, _) = m.workloads("workloads", &["a", "b", "c"])?;
    let ca = m.ca("ca")?;
    m.start_agent("node1", &file, &ca, &[])?;
    m.start_agent("node2", &file, &ca, &[])?;

    // Certificates only for the agent's own node's pods.
    let certs = m.agent("node1").certs()?;
    let mut pods: Vec<&str> = certs.iter().filter_map(|c| c["workload"].as_str()).collect();
    pods.sort();
    assert_eq!(pods, ["a.shop", "b.shop"]);
    let certs2 = m.agent("node2").certs()?;
    assert_eq!(certs2.len(), 1);
    assert_eq!(certs2[0]["identity"], spiffe("c"));

    // a and b share a node, agent and CA; each is presented to c as itself only.
    for from in ["a", "b"] {
        let (out, ok) = m.client(from, &["--connect", &m.dst("c"), "--message", from])?;
        assert!(ok && out == format!("c:{from}"), "{out}");
        let rec = m.agent("node2").wait_connection(Duration::from_secs(5), |c| {
            c["direction"] == "inbound"
                && c["bytesSent"] == 1
                && c["sourcePod"] == format!("{from}.shop").as_str()
        })?;
        assert_eq!(rec["peerIdentity"], spiffe(from), "{rec}");
    }

    // No workload key on disk (the CA's own key is the only one) nor in any log line.
    let mut on_disk = files_with_keys(Path::new(&ca));
    on_disk.retain(|f| !f.ends_with("ca-key.pem"));
    on_disk.extend(files_with_keys(&m.agent("node1").bpffs));
    assert!(on_disk.is_empty(), "keys written to {on_disk:?}");
    for node in ["node1", "node2"] {
        let log = m.agent(node).log();
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains("BEGIN"),
            "key material in the log of {node}"
        );
    }

    // A pod removed from the workloads drops its certificate (and key) from memory.
    let mut w = WorkloadsFile::default();
    w.workloads.push(testbed::agent::WorkloadEntry::of(m.bed.pod("a"), NS));
    w.workloads.push(testbed::agent::WorkloadEntry::of(m.bed.pod("c"), NS));
    w.write(&file)?;
    m.agent("node1").wait_log("released pod=b.shop", Duration::from_secs(2))?;
    let certs = m.agent("node1").certs()?;
    assert!(certs.iter().all(|c| c["workload"] != "b.shop"), "{certs:#?}");
    Ok(())
}
