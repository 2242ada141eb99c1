//! Compiles the .proto files with protox (pure Rust; no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/novacron/agent/v1/agent.proto",
        "proto/novacron/coordinator/v1/coordinator.proto",
        "proto/novacron/coordinator/v1/raft.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
