//! Every limit Tally enforces, in one place.
//!
//! Config may lower most of these (see `config.rs`); none can be raised past
//! the hard maxima here without a code change, because each one bounds memory
//! or time that a single client could otherwise claim.

/// Default listen address of `tally serve`.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7707";
/// Default data folder of `tally serve`.
pub const DATA_DEFAULT: &str = "./tally-data";

/// Largest frame body accepted by default (`limits.frame_bytes_max`).
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;
/// Longest text-mode line, newline excluded.
pub const LINE_BYTES_MAX: usize = 64 * 1024;
/// Deepest nesting of MessagePack arrays and maps accepted in a request.
pub const DECODE_DEPTH_MAX: usize = 16;
/// Connections served at once by default (`limits.connections_max`).
pub const CONNECTIONS_MAX: usize = 10_000;
/// Requests in flight on one connection by default (`limits.inflight_per_connection_max`).
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 1024;
/// Requests in flight in the whole server (bounds every shard mailbox and
/// the journal queue; `limits.inflight_max`).
pub const INFLIGHT_MAX: usize = 131_072;
/// How long a peer may take to finish sending a frame it has started.
pub const FRAME_READ_TIMEOUT_MS: u64 = 30_000;

/// Most commands the journal applies in one redb write transaction. Larger
/// batches cost less per transfer, but a request that just misses one waits
/// for all of it. With 4,096 requests in flight: 1,024 measured ~5% more
/// throughput and ~5% lower p99 than 8,192 (session 3); with the fan-out on
/// the runtime and one worker per spare core, 2,048 did better than 1,024
/// (8 interleaved pairs: more transfers/s in 6, lower p99 in 6, less CPU per
/// transfer in 7), and 4,096 was mixed.
pub const COMMIT_BATCH_MAX: usize = 2048;
/// Most records in one stored chunk (one redb row): bounds what reading a
/// single record (`get_transfer`, a history step) has to walk.
pub const CHUNK_RECORDS_MAX: usize = 64;
/// The largest `limits.commit_batch_max` a configuration may set.
pub const COMMIT_BATCH_LIMIT: usize = 65_536;
/// Number of shard actors; each is the single writer of the accounts hashed to it.
pub const SHARDS_DEFAULT: usize = 32;
/// Committed idempotency keys each shard keeps in memory (older ones are read from disk).
pub const KEYS_CACHED_PER_SHARD_MAX: usize = 16_384;

/// Longest account id in bytes (SPEC: 1-64 bytes).
pub const ACCOUNT_ID_BYTES_MAX: usize = 64;
/// Longest memo in bytes.
pub const MEMO_BYTES_MAX: usize = 256;
/// Longest idempotency key in bytes.
pub const KEY_BYTES_MAX: usize = 64;
/// Longest tag in bytes.
pub const TAG_BYTES_MAX: usize = 32;
/// Most tags on one account.
pub const TAGS_PER_ACCOUNT_MAX: usize = 16;
/// Longest user id in bytes.
pub const USER_ID_BYTES_MAX: usize = 64;
/// Longest password in bytes (argon2 takes any length; this bounds hashing time).
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// Default and largest page of `history` and `list_accounts`.
pub const PAGE_LIMIT_DEFAULT: usize = 100;
pub const PAGE_LIMIT_MAX: usize = 1000;

/// Default lifetime of a login token.
pub const TOKEN_TTL_S_DEFAULT: u64 = 1800;

/// redb's page cache. The hot path only appends and sweeps balance rows in
/// key order, so a small cache costs little; reads of old pages fall back to
/// the OS page cache, which does not count against the server's memory.
pub const REDB_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Shortest password accepted at signup or change.
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Password hashes (argon2, ~19 MiB and tens of ms each) computed at once;
/// more logins wait their turn instead of starving transfers of CPU and memory.
pub const PASSWORD_HASHES_CONCURRENT_MAX: usize = 2;

/// Pending OTP sessions kept at once, all users together; more get `overloaded`.
pub const OTP_SESSIONS_MAX: usize = 100_000;
/// Pending OTP sessions of one user; more get `rate_limited`.
pub const OTP_SESSIONS_PER_USER_MAX: usize = 8;
/// How often the OTP supervisor drops expired sessions.
pub const OTP_SWEEP_INTERVAL_MS: u64 = 1000;
/// Mails queued for the mailer at once; more get `overloaded`.
pub const MAIL_QUEUE_MAX: usize = 256;
/// Attempts at delivering one mail over SMTP (transient failures only).
pub const MAIL_ATTEMPTS_MAX: u32 = 3;
/// Wait before the second attempt; the n-th retry waits n times this.
pub const MAIL_RETRY_DELAY_MS: u64 = 200;
/// Longest an SMTP conversation may take before it counts as failed.
pub const MAIL_SEND_TIMEOUT_MS: u64 = 10_000;

/// Longest `timeout_s` of a hold: 30 days.
pub const HOLD_TIMEOUT_S_MAX: u64 = 30 * 86_400;
/// Longest redeem item name in bytes.
pub const ITEM_BYTES_MAX: usize = 100;
