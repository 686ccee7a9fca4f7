//! Request-level parsing for the node router, kept apart from the agent so it is small, pure and
//! quick to fuzz: protocol detection on a connection's first bytes, routing-key extraction from
//! request headers, and HTTP/1.1 heads and chunked bodies framed in place.

pub mod chunked;
pub mod detect;
pub mod head;
pub mod key;
mod routing_key;

pub use routing_key::{InvalidRoutingKey, MAX_ROUTING_KEY_LEN, validate_routing_key};
