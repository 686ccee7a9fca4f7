//! Request-level parsing for the node router, kept apart from the agent so it is small, pure and
//! quick to fuzz: protocol detection on a connection's first bytes, and routing-key extraction
//! from request headers.

pub mod detect;
pub mod key;
mod routing_key;

pub use routing_key::{InvalidRoutingKey, MAX_ROUTING_KEY_LEN, validate_routing_key};
