//! The `mpreg` command; everything it does lives in `mpreg::cli`.

use clap::Parser;

fn main() {
    let cli = mpreg::cli::Cli::parse();
    match mpreg::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
