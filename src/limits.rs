//! Every limit Tally enforces, in one place.
//!
//! Config may lower most of these (see `src/config.rs`); none can be raised past
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
/// Reply slots (requests in flight) on one connection by default (`limits.inflight_per_connection_max`).
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 1024;
/// Reply slots (requests in flight) in the whole server (bounds every
/// shard mailbox, the journal queue and the replies waiting to be written;
/// `limits.inflight_max`).
pub const INFLIGHT_MAX: usize = 131_072;
/// How long a peer may take to finish sending a frame it has started.
pub const FRAME_READ_TIMEOUT_MS: u64 = 30_000;
/// Largest frame a connection not yet logged in may send (a login or a
/// signup needs a few hundred bytes), so that anonymous connections cannot
/// make the server hold `frame_bytes_max` each.
pub const ANONYMOUS_FRAME_BYTES_MAX: usize = 64 * 1024;
/// How long a socket may take no bytes of pending replies before the
/// connection is closed (`limits.write_timeout_ms`).
pub const WRITE_TIMEOUT_MS: u64 = 30_000;
/// How long a connection that is not logged in may send nothing
/// (`limits.idle_anonymous_ms`).
pub const IDLE_ANONYMOUS_MS: u64 = 60_000;
/// What one reply slot stands for. Every reply but a page fits in one
/// (error messages are cut to `ERROR_MESSAGE_BYTES_MAX`); a page takes one
/// slot per `REPLY_SLOT_BYTES` of [`PAGE_ITEM_BYTES_MAX`] items. Slots are
/// held until the reply is written, so the replies queued for a connection
/// stay under `inflight_per_connection_max` x 2 KiB (2 MiB by default),
/// and for the whole server under `inflight_max` x 2 KiB (256 MiB).
pub const REPLY_SLOT_BYTES: usize = 2048;
/// The most one item of a page (a transfer record, an account, a redeem
/// request) takes on the wire, in MessagePack or JSON.
pub const PAGE_ITEM_BYTES_MAX: usize = 1536;
/// Longest error message sent; longer ones (which may quote input) are cut.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 512;

/// Most commands the journal applies in one redb write transaction (an
/// atomic batch counting its items); on a single server, up to
/// [`COMMIT_DEEP_QUEUE_FACTOR`] times that when more than twice as many
/// commands wait (`journal::commit_limit`). Larger batches cost less per
/// transfer, but a request that just misses one waits for all of it; on 2
/// cores with 4,096 requests in flight, 2,048 did best
/// (docs/performance.md).
pub const COMMIT_BATCH_MAX: usize = 2048;
/// Transfers in one `transfer_batch` by default (`limits.batch_max`).
pub const BATCH_MAX_DEFAULT: usize = 1000;
/// The most `limits.batch_max` may be set to.
pub const BATCH_MAX_LIMIT: usize = 10_000;
/// What one item of a `transfer_batch` counts for its reply slots: its
/// entry in the reply (under 256 bytes: its error message is cut to
/// `BATCH_ERROR_BYTES_MAX`) and its request's state until then.
pub const BATCH_ITEM_SLOT_BYTES: usize = 512;
/// An item's error message in a `transfer_batch` reply is cut to this.
pub const BATCH_ERROR_BYTES_MAX: usize = 160;
/// Most records in one stored chunk (one redb row): bounds what reading a
/// single record (`get_transfer`, a history step) has to walk and hash
/// (it and the records before it in its chunk, each ~50-60 bytes).
pub const CHUNK_RECORDS_MAX: usize = 64;
/// The largest `limits.commit_batch_max` a configuration may set.
pub const COMMIT_BATCH_LIMIT: usize = 65_536;
/// How many times `commit_batch_max` a single server's commit may take
/// when the queue behind the journal is deep (`journal::commit_limit`).
pub const COMMIT_DEEP_QUEUE_FACTOR: usize = 4;
/// Records in one sealed history segment (`limits.history_segment_records`):
/// ~4M records are ~400 MB, so the ledger file keeps at most about two
/// segments' worth of records besides its accounts, and redb's repair
/// after a crash walks that much rather than the whole history.
pub const HISTORY_SEGMENT_RECORDS: u64 = 1 << 22;
/// How long the history's thread waits after a segment failed to be
/// written (a full disk, a folder it may not write) before it tries again.
pub const HISTORY_RETRY_MS: u64 = 10_000;
/// The longest wait between tries, the wait doubling after each failure.
pub const HISTORY_RETRY_MAX_MS: u64 = 640_000;
/// The nice value of the thread that copies history segments (background work).
pub const HISTORY_NICE: libc::c_int = 10;
/// The smallest non-zero `limits.history_segment_records` (four full chunks).
pub const HISTORY_SEGMENT_RECORDS_MIN: u64 = 256;
/// The largest `limits.history_segment_records`.
pub const HISTORY_SEGMENT_RECORDS_LIMIT: u64 = 1 << 32;
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

/// Digits of a one-time code.
pub const OTP_CODE_DIGITS: usize = 6;
/// Pending OTP sessions kept at once, all users together; more get `overloaded`.
pub const OTP_SESSIONS_MAX: usize = 100_000;
/// Pending OTP sessions of one user; more get `rate_limited`.
/// Transfers held by all open batch sessions together (~400 bytes each at most).
pub const OTP_BATCH_ITEMS_MAX: usize = 100_000;
/// Transfers in one user's `transfer_batch` (a person's, confirmed by one code).
pub const USER_BATCH_MAX: usize = 100;
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

/// Wrong codes per user and purpose (password reset; confirming a
/// transfer, hold or redeem): 5 free, then waits of 1, 2, 4, ... minutes up
/// to a day; a day without a wrong code forgives them. New sessions do not
/// refill it: it belongs to the user. At most 15 guesses in any day (see
/// SECURITY.md), each with 1-in-a-million odds.
pub const OTP_GUESSES: crate::guard::BackoffRule =
    crate::guard::BackoffRule { free: 5, base_ms: 60_000, cap_ms: 86_400_000, forget_ms: 86_400_000 };
/// Password resets asked for one user per hour (sessions opened, known user or not).
pub const RESETS_PER_USER_PER_HOUR: usize = 3;
/// Password resets asked for from one source address (IPv4, or IPv6 /64) per hour.
pub const RESETS_PER_SOURCE_PER_HOUR: usize = 10;
/// Reset mails (first codes and resends) to one mail address per hour.
pub const RESET_MAILS_PER_ADDRESS_PER_HOUR: usize = 5;
/// Codes mailed for one user's own transfers, holds and redeems per hour
/// (resends included).
pub const CODE_MAILS_PER_USER_PER_HOUR: usize = 30;
/// Users, addresses and mail addresses each guard table tracks at once. A
/// full table refuses new keys (`rate_limited`) rather than forget a budget.
pub const GUARD_ENTRIES_MAX: usize = 100_000;
/// One hour, the window of the hourly limits above.
pub const HOUR_MS: u64 = 3_600_000;

/// Wrong passwords for one user from one source address: 5 free, then
/// waits from 1 s doubling up to 15 min; forgotten after an hour.
pub const LOGIN_PAIR: crate::guard::BackoffRule =
    crate::guard::BackoffRule { free: 5, base_ms: 1_000, cap_ms: 900_000, forget_ms: HOUR_MS };
/// Wrong passwords for one user from any address before it counts as under
/// attack. Then every address that has failed for the user gets one free
/// try and waits from a minute doubling up to an hour ([`LOGIN_UNDER_ATTACK`]);
/// an address that has not failed still gets its first try at once, so a
/// correct password from elsewhere is never locked out.
pub const LOGIN_USER_FAILURES_MAX: u32 = 20;
/// The per-address rule for a user under attack.
pub const LOGIN_UNDER_ATTACK: crate::guard::BackoffRule =
    crate::guard::BackoffRule { free: 1, base_ms: 60_000, cap_ms: HOUR_MS, forget_ms: HOUR_MS };
/// Wrong passwords from one source address, whatever the users (a spray
/// across many user ids): 20 free, then waits from 1 s doubling up to 15 min.
pub const LOGIN_SOURCE: crate::guard::BackoffRule =
    crate::guard::BackoffRule { free: 20, base_ms: 1_000, cap_ms: 900_000, forget_ms: HOUR_MS };

/// A full sweep of the balance rows takes about one record for this many
/// accounts, between [`SWEEP_RECORDS`] and [`SWEEP_RECORDS_MAX`]
/// (`journal::commit::sweep_records`); the replay at start-up reads up to
/// about two sweeps' records.
pub const SWEEP_ACCOUNTS_PER_RECORD: usize = 4;
/// The fewest records a full sweep of the balance rows takes (every ledger
/// of up to about a million accounts).
pub const SWEEP_RECORDS: usize = 262_144;
/// The most records a full sweep of the balance rows takes (about 2 s of
/// replay at 10M accounts for the two sweeps a start may read). A longer
/// sweep writes each leaf of rows after more transfers: 1.22x the
/// throughput of half this at 10M accounts (docs/performance.md).
pub const SWEEP_RECORDS_MAX: usize = 2_097_152;
/// Recent idempotency keys held in memory before they are frozen into a
/// run and merged into the `keys` table (`store::key_index`): ~100 bytes
/// each, and at most two such sets at a time.
pub const KEYS_FREEZE_AT: usize = 262_144;
/// Records whose keys are held in memory before they are frozen: bounds
/// what a start reads to rebuild them, as the sweep bounds the replay.
pub const KEYS_FREEZE_RECORDS: usize = 262_144;
/// The least of a run a commit merges into the `keys` table (more when
/// the commit brings more new keys: twice as many).
pub const KEYS_MERGE_MIN: usize = 4096;
/// Key runs frozen at most this large are sorted on the journal's thread;
/// larger ones (tens of milliseconds) on a thread of their own.
pub const KEYS_SORT_INLINE_MAX: usize = 4096;
/// The least capacity of the filter of the `keys` table's keys (12 bits,
/// 1.5 bytes, each).
pub const KEYS_FILTER_MIN: usize = 1 << 20;
/// The most keys the filter is sized for (96 MiB): past that its false
/// positives grow, and new keys are looked up more often.
pub const KEYS_FILTER_MAX: usize = 1 << 26;
/// The fewest account numbers a commit that wrote records sweeps.
pub const SWEEP_CHUNK_MIN: usize = 256;
/// The fewest account numbers a commit without records (the idle journal
/// catching up) sweeps.
pub const SWEEP_CHUNK_IDLE: usize = 4096;
/// An idle journal catches up in at most this many commits.
pub const SWEEP_IDLE_COMMITS: usize = 64;
/// How long the journal waits for work before it sweeps on its own.
pub const SWEEP_IDLE_AFTER_MS: u64 = 50;
/// How often a journal that cannot commit tries to reopen the database.
pub const JOURNAL_RECOVERY_RETRY_MS: u64 = 500;
/// A commit this recent proves to `health` that the journal can commit.
pub const HEALTH_FRESH_MS: u64 = 1000;
/// Longest `health` waits for its probe to be committed.
pub const HEALTH_PROBE_TIMEOUT_MS: u64 = 5000;
/// How often the OTP guard tables drop entries that no longer matter.
pub const GUARD_SWEEP_INTERVAL_MS: u64 = 60_000;
/// Longest deletion reason (`delete_account`, `reap`).
pub const REASON_BYTES_MAX: usize = 256;
/// Most index entries one `list_accounts` page examines. A selective
/// balance filter can match few accounts; the page then ends early with a
/// `next` cursor, so no single request scans everything.
pub const LIST_SCAN_MAX: usize = 200_000;
/// `list_accounts` pages read at once; the others wait their turn. A page
/// holds up to [`LIST_SCAN_MAX`] small candidates (~20 MB) while it reads,
/// so this bounds the sum however many staff callers ask together.
pub const LIST_PAGES_AT_ONCE: usize = 2;
/// Longest a `list_accounts` page waits for its turn before it is refused
/// `overloaded`: the queue behind [`LIST_PAGES_AT_ONCE`] is bounded by the
/// callers' reply slots, but a wait must also be bounded in time.
pub const LIST_WAIT_MAX_MS: u64 = 10_000;
/// Longest an `audit` waits for its turn (the audits queued ahead of it),
/// then refused `overloaded`. An audit reads every record: with 10M
/// accounts it took 10-14 s over 100M records on one machine and 35-40 s
/// over 44M on another, so this lets about two wait behind a running scan.
pub const AUDIT_WAIT_MAX_MS: u64 = 120_000;
/// Replies a connection's writer gathers into one write.
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Longest mail error passed on to the caller (an SMTP server's words).
pub const MAIL_ERROR_BYTES_MAX: usize = 200;
/// Tokens one user may have revoked one by one (`logout`) at once; past
/// that, a logout revokes all of them (a new token epoch).
pub const REVOKED_TOKENS_PER_USER_MAX: usize = 64;

/// Live (unrevoked) service keys at once.
pub const SERVICE_KEYS_MAX: usize = 1000;

/// Service keys a data folder may hold on record, revoked ones included
/// (each stays, to say who made and revoked it).
pub const SERVICE_KEYS_RECORDED_MAX: usize = 10_000;

/// Accounts a key may be limited to: a key's view stays within a page
/// item's bytes.
pub const KEY_ACCOUNTS_MAX: usize = 16;

/// Bytes of a key's name.
pub const KEY_NAME_BYTES_MAX: usize = 64;

/// The longest a key may be made to live: ten years.
pub const KEY_EXPIRES_S_MAX: u64 = 10 * 366 * 86_400;

// ---- Cluster (`[cluster]`) ----

/// Most members a cluster may list: every write waits for a majority.
pub const CLUSTER_MEMBERS_MAX: usize = 7;
/// How long the leader's journal waits for a batch to be committed by a
/// majority and applied before it answers `unknown_outcome`.
pub const CLUSTER_COMMIT_TIMEOUT_MS: u64 = 3_000;
/// Batches a cluster leader's journal has proposed and not yet seen
/// applied: deciding the next overlaps the disks and network of the last.
pub const CLUSTER_PROPOSALS_IN_FLIGHT: usize = 3;
/// A leader that has heard from no majority for this long refuses writes
/// (`unavailable`) instead of proposing them: they could only time out.
pub const CLUSTER_QUORUM_STALE_MS: u64 = 1_000;
/// A leader answers only while a majority has acknowledged it this
/// recently: less than the shortest election timeout, so that no other
/// member can have been elected meanwhile. Its reads also wait for a round
/// of the read index (`cluster::read_index`); the lease fences the rest.
pub const CLUSTER_READ_LEASE_MS: u64 = 400;
/// The longest a read on the leader waits for the read index to confirm
/// that this member still leads; then `unavailable`.
pub const CLUSTER_READ_INDEX_TIMEOUT_MS: u64 = 2_000;
/// Raft's heartbeat, and the range an election timeout is drawn from.
pub const CLUSTER_HEARTBEAT_MS: u64 = 100;
pub const CLUSTER_ELECTION_MIN_MS: u64 = 600;
pub const CLUSTER_ELECTION_MAX_MS: u64 = 1_200;
/// How long a new leader waits to have applied everything committed
/// before it serves; it tries again after that.
pub const CLUSTER_CATCH_UP_TIMEOUT_MS: u64 = 5_000;
/// `cluster.snapshot_every`'s default: a member snapshots its ledger after
/// this many entries, and keeps a tenth of that below a snapshot for
/// members a little behind (the rest catch up through a snapshot).
pub const CLUSTER_SNAPSHOT_EVERY: u64 = 10_000;
/// How long a member has to take one chunk of a snapshot (the last one
/// installs it: the whole database written, synced and checked).
pub const CLUSTER_SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 30_000;
/// How long `add_node` (a learner catching up, then joint consensus) or
/// `remove_node` may take before it is answered `unknown_outcome`.
pub const CLUSTER_MEMBERSHIP_TIMEOUT_MS: u64 = 60_000;
/// How long a member's stop waits, once Raft has stopped, for openraft's
/// state-machine worker to apply (or install) what it still has queued;
/// what is left after that is refused, and the log brings it again at the
/// next start.
pub const CLUSTER_STOP_DRAIN_MS: u64 = 10_000;
/// Raft entries per append message between members: each is one batch of
/// up to `commit_batch_max` records, and a message must stay well below
/// the member port's frame bound.
pub const CLUSTER_ENTRIES_PER_MESSAGE: u64 = 8;

/// Stale reads a member runs at once; more are refused (`rate_limited`).
/// They run on the blocking pool, which also carries the member's Raft log
/// and state machine: a flood of them must not stall its replication.
pub const CLUSTER_STALE_READS_MAX: usize = 8;

/// openraft's own log lines: at most one per source line in this long. A
/// member that stops answering makes openraft log an error for every
/// heartbeat and every read round it misses, hundreds a second under
/// reads: unbounded, they would fill the disk under the log.
pub const OPENRAFT_LINE_EVERY_MS: u64 = 10_000;
