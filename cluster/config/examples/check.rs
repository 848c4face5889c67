//! Checks a configuration file and prints the diagnostics, like
//! `tandem-guest validate --config FILE` will.

fn main() {
    let path = std::env::args().nth(1).expect("usage: check FILE");
    match tandem_config::check(&path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("{w}");
            }
            println!("{path}: ok ({} nodes, {} groups)", c.config.nodes.len(), c.config.groups.len());
        }
        Err(e) => {
            for w in &e.warnings {
                eprintln!("{w}");
            }
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
