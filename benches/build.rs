//! Compiles the etcd KV subset the coordinator benchmark uses as its reference (protox: no
//! system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/etcd_kv.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
