//! `entitlectl`: the operator CLI over Entitle's admin API.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = entitlectl::Cli::parse();
    let mut out = std::io::stdout();
    if let Err(e) = entitlectl::run(cli, &mut out).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
