//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and compiles Istio's CA protocol
//! (`proto/istio/v1/auth/ca.proto`) with protox, so no `protoc` is needed.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MTLS_AGENT_EBPF_OBJ");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let obj = std::env::var_os("MTLS_AGENT_EBPF_OBJ").map(PathBuf::from).unwrap_or_else(|| {
        manifest.join("../target/ebpf/bpfel-unknown-none/release/mtls-agent-ebpf")
    });
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (or set MTLS_AGENT_EBPF_OBJ to a built object)",
            obj.display()
        );
    }
    // Warn when the programs' sources are newer than the object being embedded.
    let src = manifest.join("../agent-ebpf/src");
    println!("cargo:rerun-if-changed={}", src.display());
    let obj_time = std::fs::metadata(&obj).and_then(|m| m.modified()).ok();
    let newest_src = walk_newest(&src);
    if let (Some(o), Some(s)) = (obj_time, newest_src) {
        if s > o {
            println!(
                "cargo:warning=the eBPF object is older than agent-ebpf/src: run `cargo xtask build-ebpf`"
            );
        }
    }
    println!("cargo:rustc-env=MTLS_AGENT_EBPF_OBJ={}", obj.display());
    compile_ca_proto();
}

fn compile_ca_proto() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["istio/v1/auth/ca.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/istio/v1/auth/ca.proto: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the CA protocol's code: {e}"));
}

fn walk_newest(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            walk_newest(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}
