//! Tally: a ledger server for points, coins and tokens.
//!
//! # Layout
//!
//! - [`ledger`]: the money rules as plain functions over plain data (no IO).
//! - [`frame`], [`text`], [`protocol`]: the wire format, the dev text mode,
//!   and every op's arguments and results.
//! - [`server`]: start-up, accept loop, one reader and one writer task per
//!   connection; [`ops`]: the dispatcher with the authorization checks.
//! - [`shard`]: ractor actors, each the single writer of the accounts hashed
//!   to it; they reserve debits and never wait on anything.
//! - [`journal`]: the one redb writer, committing in groups, and the fan-out
//!   that tells owners and clients after each durable commit.
//! - [`otp`]: the OTP supervisor actor owning pending one-time-password
//!   sessions, and its child [`mail`], the mailer actor (lettre).
//! - [`store`]: the redb tables and read-side queries; [`auth`]: passwords
//!   and tokens; [`config`]; [`constants`]: every limit.
//! - [`client`]: the async Rust client used by the CLI, tests and benchmarks.
//!
//! Run it with `tally serve`; the README explains the design.

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod constants;
pub mod error;
pub mod frame;
pub mod guard;
pub mod journal;
pub mod ledger;
pub mod mail;
pub mod ops;
pub mod otp;
pub mod protocol;
pub mod reply;
pub mod server;
pub mod shard;
pub mod stats;
pub mod store;
pub mod text;
