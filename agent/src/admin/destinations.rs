//! `GET /debug/destinations?ips=A,B,...`: for each address, the pod the agent knows there (the
//! workload set in force), by an indexed lookup: the cheap per-event probe of "is this pod
//! change applied" (the scale bench polls it for the pods of a rollout-sized burst).

use std::net::IpAddr;

use serde::Serialize;

use crate::workloads::WorkloadSet;

/// At most this many addresses per request: the answer stays small and quick.
pub const MAX_IPS: usize = 256;

/// What is known at one address.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Destination {
    pub ip: IpAddr,
    /// `name.namespace`, if a pod has the address.
    pub pod: Option<String>,
    /// Its `metadata.uid` (Kubernetes mode): tells a replacement from the pod it replaced.
    pub uid: Option<String>,
}

/// Why a query was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("usage: /debug/destinations?ips=IP,IP,... (at most {MAX_IPS})")]
    Usage,
    #[error("ips: invalid IP address {0:?}")]
    InvalidIp(String),
    #[error("ips: more than {MAX_IPS} addresses")]
    TooMany,
}

/// Answers the query string `query` from `ws`.
pub fn lookup(ws: &WorkloadSet, query: &str) -> Result<Vec<Destination>, QueryError> {
    let list = form_urlencoded::parse(query.as_bytes())
        .find_map(|(k, v)| (k == "ips").then(|| v.into_owned()))
        .ok_or(QueryError::Usage)?;
    let mut out = Vec::new();
    for s in list.split(',').filter(|s| !s.is_empty()) {
        if out.len() == MAX_IPS {
            return Err(QueryError::TooMany);
        }
        let ip: IpAddr = s.parse().map_err(|_| QueryError::InvalidIp(s.to_owned()))?;
        let w = ws.by_ip(ip);
        out.push(Destination {
            ip,
            pod: w.map(|w| w.key()),
            uid: w.and_then(|w| w.uid.as_ref().map(|u| u.to_string())),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn ws() -> WorkloadSet {
        WorkloadSet::parse(
            "workloads:\n- {name: a, namespace: ns, ip: 10.0.0.1, node: n2}\n",
            Path::new("workloads.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn each_address_says_which_pod_is_there() {
        let got = lookup(&ws(), "ips=10.0.0.1,10.0.0.2").unwrap();
        assert_eq!(got[0].pod.as_deref(), Some("a.ns"));
        assert_eq!(got[1], Destination { ip: "10.0.0.2".parse().unwrap(), pod: None, uid: None });
    }

    #[test]
    fn bad_queries_are_refused_with_what_is_wrong() {
        assert_eq!(lookup(&ws(), "pod=a"), Err(QueryError::Usage));
        assert_eq!(
            lookup(&ws(), "ips=10.0.0.1,10.0.0.300"),
            Err(QueryError::InvalidIp("10.0.0.300".into()))
        );
        let many: Vec<String> =
            (0..=MAX_IPS).map(|i| format!("10.1.{}.{}", i / 256, i % 256)).collect();
        assert_eq!(lookup(&ws(), &format!("ips={}", many.join(","))), Err(QueryError::TooMany));
    }
}
