//! Routing as pure data and functions. `Tables` is what the control plane wants the node to do;
//! the kernel maps are a projection of it, the router reads it through a snapshot, and
//! `redirectctl explain` calls the same decisions. Nothing here touches the kernel or an API.

mod connect;
mod protocol;
mod request;
mod tables;

pub use connect::{ConnectDecision, ConnectInput, at_connect, at_connect_observed};
pub use protocol::PortProtocol;
pub use request::{BaselineWhy, RequestRoute, RouteView, for_request};
pub use tables::{KeyInfo, ServiceName, Tables};
