//! `cargo xtask bench <name>`.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(clap::Subcommand)]
pub enum Bench {
    /// connect()+close() rate: no program, programs attached (miss path), origin path.
    Connect,
}

pub fn run(o: &Options) -> Result<()> {
    match o.bench {
        Bench::Connect => anyhow::bail!("connect benchmark: not built yet"),
    }
}
