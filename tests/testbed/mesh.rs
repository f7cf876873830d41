//! A small cluster for end-to-end tests: nodes and pods of a test bed, an echo server in every
//! pod, agents per node, CAs and workloads files, all removed on drop.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Result;

use crate::{
    agent::{AgentOptions, AgentProcess, CaDir, WorkloadEntry, WorkloadsFile},
    e2e_tool_path, PodProcess, Testbed,
};

/// The port every pod's echo server listens on.
pub const PORT: u16 = 8080;

/// Pods on nodes, an echo server in every pod, one agent per node. Unless a test says
/// otherwise, all agents share one CA and one workloads file.
/// An echo server on every address of `pod`, port [`PORT`], answering `<pod>:<what it got>`;
/// returns once it listens.
pub fn echo_server(bed: &Testbed, pod: &str) -> Result<PodProcess> {
    let mut cmd = Command::new(e2e_tool_path()?);
    cmd.args([
        "echo-server",
        "--listen",
        &format!("0.0.0.0:{PORT}"),
        "--prefix",
        &format!("{pod}:"),
    ]);
    let p = bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

pub struct Mesh {
    // Drop order: processes and agents before the bed.
    pub servers: HashMap<String, PodProcess>,
    pub agents: HashMap<String, AgentProcess>,
    pub files: Vec<PathBuf>,
    _cas: Vec<CaDir>,
    pub bed: Testbed,
    /// Namespace of every pod.
    pub namespace: String,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Mesh {
    /// `pods`: (node, pod). Builds the bed and starts the servers; agents come separately.
    pub fn build(test: &str, namespace: &str, pods: &[(&str, &str)]) -> Result<Mesh> {
        let mut bed = Testbed::new(test)?;
        let mut nodes: Vec<&str> = Vec::new();
        for (n, _) in pods {
            if !nodes.contains(n) {
                nodes.push(n);
            }
        }
        for n in nodes {
            bed.add_node(n)?;
        }
        let mut servers = HashMap::new();
        for (node, pod) in pods {
            bed.add_pod(node, pod)?;
            servers.insert(pod.to_string(), echo_server(&bed, pod)?);
        }
        Ok(Mesh {
            servers,
            agents: HashMap::new(),
            files: vec![],
            _cas: vec![],
            bed,
            namespace: namespace.to_owned(),
        })
    }

    /// The workloads file listing `pods` (all others are outside the mesh).
    pub fn workloads(&mut self, name: &str, pods: &[&str]) -> Result<(PathBuf, WorkloadsFile)> {
        let mut file = WorkloadsFile::default();
        for p in pods {
            file.workloads.push(WorkloadEntry::of(self.bed.pod(p), &self.namespace));
        }
        let path = std::env::temp_dir().join(format!("{}-{name}.yaml", self.bed.id()));
        file.write(&path)?;
        self.files.push(path.clone());
        Ok((path, file))
    }

    pub fn ca(&mut self, label: &str) -> Result<PathBuf> {
        let ca = CaDir::init(&format!("{}-{label}", self.bed.id()), "cluster.local")?;
        let path = ca.path.clone();
        self._cas.push(ca);
        Ok(path)
    }

    pub fn start_agent(
        &mut self,
        node: &str,
        workloads: &Path,
        ca: &Path,
        extra: &[&str],
    ) -> Result<()> {
        let mut opts = AgentOptions::new(node, workloads);
        opts.ca_dir = Some(ca.to_owned());
        opts.extra_args = extra.iter().map(|s| s.to_string()).collect();
        let agent = AgentProcess::start(&self.bed, opts)?;
        self.agents.insert(node.to_owned(), agent);
        Ok(())
    }

    /// Starts `node`'s agent with its certificates from `ca` (no CA directory on the node).
    pub fn start_agent_with_ca_service(
        &mut self,
        node: &str,
        workloads: &Path,
        ca: &crate::certservice::CaService,
        extra: &[&str],
    ) -> Result<()> {
        let mut opts = AgentOptions::new(node, workloads);
        opts.ca_service = Some(ca.agent_args(node));
        opts.extra_args = extra.iter().map(|s| s.to_string()).collect();
        let agent = AgentProcess::start(&self.bed, opts)?;
        self.agents.insert(node.to_owned(), agent);
        Ok(())
    }

    pub fn agent(&self, node: &str) -> &AgentProcess {
        &self.agents[node]
    }

    pub fn dst(&self, pod: &str) -> String {
        format!("{}:{PORT}", self.bed.pod(pod).ip)
    }

    /// Runs the e2e client in `pod`: (stdout, success).
    pub fn client(&self, pod: &str, args: &[&str]) -> Result<(String, bool)> {
        let mut cmd = Command::new(e2e_tool_path()?);
        cmd.arg("client").args(args);
        let out = self.bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(60))?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
    }

    pub fn accepted(&self, pod: &str) -> usize {
        self.servers[pod].stdout().lines().filter(|l| l.contains("accepted")).count()
    }
}

/// A policy directory removed on drop.
pub struct PolicyDir(pub PathBuf);

impl PolicyDir {
    pub fn new(id: &str) -> Result<PolicyDir> {
        let p = std::env::temp_dir().join(format!("mtls-test-policies-{id}"));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(PolicyDir(p))
    }

    /// Writes a file atomically (write + rename), as a config manager would.
    pub fn write(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.0.join(name))?;
        Ok(())
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A namespace-wide PeerAuthentication named `default`.
pub fn namespace_pa(ns: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: {ns}\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}
