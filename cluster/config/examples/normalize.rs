//! Prints a configuration file in canonical form (defaults filled in,
//! dependencies explicit), or its errors.

fn main() {
    let path = std::env::args().nth(1).expect("usage: normalize FILE");
    match tandem_config::load(&path) {
        Ok(c) => print!("{}", tandem_config::to_toml(&c)),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
