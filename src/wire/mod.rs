//! The wire: what crosses a connection and how it is read and written.
//!
//! - [`frame`]: the length-prefixed MessagePack codec (a bounded hand
//!   parser, fuzzed, and a hand encoder proved byte-equal to serde's).
//! - [`text`]: the dev text mode (`op key=value` lines in, JSON lines out).
//! - [`ops`]: the op table: every op's name and who may call it.
//! - [`args`]: the arguments of every op; [`replies`]: every result shape.

pub mod args;
pub mod frame;
pub mod ops;
pub mod replies;
pub mod text;

pub use args::*;
pub use ops::{Access, Op, Role, PROTOCOL_VERSION};
pub use replies::*;
