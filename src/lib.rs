//! Tally: a ledger server for points, coins and tokens.
//!
//! # Layout
//!
//! Each module depends only on the ones listed before it.
//!
//! - [`limits`], [`clock`], [`error`], [`guard`], [`random`]: every limit,
//!   the time, the error codes, the budgets of anything that can be
//!   retried, random ids and secrets.
//! - [`ledger`]: the money rules as plain functions over plain data (no IO).
//! - [`wire`]: the frame codec, the text mode, the op table, every op's
//!   arguments and result shapes; [`metrics`]: requests by op and result,
//!   commit sizes and fsync times, mails (for `/metrics`).
//! - [`store`]: the redb tables, the stored record, recovery, queries.
//! - [`auth`]: passwords, tokens, login throttling.
//! - [`reply`]: where a request's answer goes; [`contract`]: what shards
//!   send the journal and what it answers.
//! - [`cluster`]: replication with openraft: the Raft log, the members'
//!   network, the ledger as the replicated state machine.
//! - [`journal`]: the one redb writer: a pure state machine applying each
//!   batch, then one commit.
//! - [`shard`]: the owner actors (single writers), the router, the fan-out.
//! - [`otp`]: the OTP supervisor, its session rules and its mailer.
//! - [`api`]: the ops behind the op table; [`net`]: connections, plaintext
//!   or [`tls`], speaking the protocol or, through [`http`], HTTP/JSON;
//!   [`server`]: start-up; [`admin`]: host commands; [`config`], [`stats`].
//! - [`client`]: the async Rust client used by the CLI, tests and benchmarks.
//!
//! ARCHITECTURE.md draws the map and follows a transfer through it.

pub mod admin;
pub mod api;
pub mod auth;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod contract;
pub mod error;
pub mod guard;
pub mod http;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod otp;
pub mod random;
pub mod reply;
pub mod server;
pub mod shard;
pub mod stats;
pub mod store;
pub mod tls;
pub mod wire;
