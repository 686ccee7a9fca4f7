//! The flags every test server shares: who it is and where it listens.

use std::net::SocketAddr;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Sent back as `x-served-by` and in the body.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    pub listen: Vec<SocketAddr>,
}
