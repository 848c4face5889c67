//! Regenerates docs/config.schema.json: `cargo run -p tandem-config --example schema`.

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.schema.json");
    std::fs::write(&path, tandem_config::json_schema()).expect("write docs/config.schema.json");
    println!("wrote {}", path.display());
}
