//! The journal: the one thread that writes redb, committing in groups.
//!
//! It takes every command queued since its last commit (up to
//! `commit_batch_max`, more under a deep queue: [`commit_limit`]), has the
//! state machine ([`machine`]) apply them in order to the ledger in
//! memory, writes what they did in one redb transaction ([`commit`]) and
//! commits with fsync. Only then does the fan-out (`shard::fanout`) tell
//! the owning shards what changed and answer the clients. An idle journal
//! commits at once; under load the queue fills while it syncs, so batches
//! grow by themselves.
//!
//! In a cluster (`[cluster]`), the leader's journal decides a batch the
//! same way and proposes what it decided as one Raft entry instead of
//! writing it ([`Replicate`], `replicate.rs`); every member writes it when
//! a majority has it (`cluster::ledger`), and the clients are answered
//! after that. A proposal that fails or times out leaves this journal
//! ahead of the cluster, so it is deposed: it refuses everything from then
//! on and the node restarts the ledger from what the cluster applied.
//!
//! If a commit fails (a full disk), nothing of its batch was applied and
//! every command in it is refused `unavailable`; the journal then refuses
//! writes, reports it through [`Health`], and reopens the database once it
//! can (redb refuses everything after an IO error until then).

pub mod commit;
pub mod machine;
mod replicate;

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use redb::Database;

use self::commit::{RedbCold, Sweep};
use self::machine::{Machine, Writes};
use crate::clock::Clock;
use crate::contract::{Command, Committed, Outcome, SettleCmd, SettleOp};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::FeeRounding;
use crate::limits::{
    COMMIT_BATCH_LIMIT, COMMIT_DEEP_QUEUE_FACTOR, HISTORY_NICE, HISTORY_RETRY_MAX_MS, HISTORY_RETRY_MS,
    JOURNAL_RECOVERY_RETRY_MS, SWEEP_IDLE_AFTER_MS,
};
use crate::reply::ReplyTo;
use crate::stats::Stats;
use crate::store::{self, Store, StoreError};

/// Whether the journal can commit, for the `health` op: shared between
/// the journal (which sets it) and every connection (which reads it).
#[derive(Default)]
pub struct Health {
    /// Why the journal cannot commit; `None` while it can.
    failure: std::sync::Mutex<Option<String>>,
    /// When a commit last succeeded, ms since the Unix epoch.
    last_commit_ms: std::sync::atomic::AtomicU64,
}

impl Health {
    /// `Err(reason)` while the journal cannot commit.
    pub fn status(&self) -> Result<(), String> {
        match self.failure.lock() {
            Ok(f) => f.clone().map_or(Ok(()), Err),
            Err(_) => Err("the health state is poisoned".into()),
        }
    }

    /// When a commit last succeeded (ms since the epoch; 0: none yet).
    #[must_use]
    pub fn last_commit_ms(&self) -> u64 {
        self.last_commit_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    fn committed(&self, now_ms: u64) {
        self.last_commit_ms.store(now_ms, std::sync::atomic::Ordering::Release);
        if let Ok(mut f) = self.failure.lock() {
            if f.is_some() {
                *f = None;
            }
        }
    }

    fn failing(&self, reason: String) {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(reason);
        }
    }
}

/// The answer of every command while the journal cannot commit.
fn unavailable() -> ApiError {
    ApiError::new(ErrorCode::Unavailable, "the journal could not commit; nothing was changed; try again shortly")
}

fn unknown_outcome() -> ApiError {
    ApiError::new(
        ErrorCode::UnknownOutcome,
        "the write was proposed but no majority confirmed it in time: it may or may not have been applied; \
         retry only with the same idempotency key",
    )
}

/// Why a leader cannot expect a majority now (`None`: it can): one that has
/// heard from none for a while refuses rather than waits out a timeout.
fn no_quorum(raft: &openraft::Raft<crate::cluster::TypeConfig>, me: u64) -> Option<String> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let fresh = m.millis_since_quorum_ack.is_some_and(|ms| ms <= crate::limits::CLUSTER_QUORUM_STALE_MS);
    let alone = fresh || m.membership_config.membership().voter_ids().all(|id| id == me);
    (!alone && !fresh).then(|| {
        format!(
            "no majority of the cluster has answered this leader for {}; nothing was changed",
            m.millis_since_quorum_ack.map_or_else(|| "ever".to_owned(), |ms| format!("{ms} ms"))
        )
    })
}

/// A journal that cannot commit: why, and the database it took out of the
/// store, kept until every reader has let go of it.
struct Failure {
    reason: String,
    retired: Option<Arc<Database>>,
}

/// How a cluster leader's journal proposes its batches.
pub struct Replicate {
    pub raft: openraft::Raft<crate::cluster::TypeConfig>,
    /// The runtime the proposals wait on (the journal is a plain thread).
    pub rt: tokio::runtime::Handle,
    /// This member's id (a member that is the only voter has no quorum to check).
    pub me: u64,
    /// How many decided batches the cluster had applied when this journal
    /// loaded the ledger: the `seq` of its first proposal.
    pub batches: u64,
    /// Cancelled when the journal stops proposing: its state may be ahead
    /// of what the cluster applied, and only a restart from the applied
    /// state mends that.
    pub deposed: tokio_util::sync::CancellationToken,
}

/// `not_leader`, naming the leader when it is known.
#[must_use]
pub fn not_leader(leader: Option<String>) -> ApiError {
    let mut e = ApiError::new(ErrorCode::NotLeader, "this member is not the cluster's leader; nothing was changed");
    e.leader = leader;
    e
}

/// What the journal starts from.
pub struct JournalArgs {
    pub store: Arc<Store>,
    /// The ledger as loaded at start-up.
    pub loaded: store::Loaded,
    pub batch_max: usize,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub fee_rounding: FeeRounding,
    pub clock: Clock,
    /// In a cluster: propose batches rather than write them.
    pub replicate: Option<Replicate>,
    /// Records in one history segment (`limits.history_segment_records`;
    /// 0: keep every record in the ledger file).
    pub segment_records: u64,
}

pub struct Journal {
    store: Arc<Store>,
    machine: Machine,
    /// What the batch being committed writes (its buffers are reused).
    writes: Writes,
    batch_max: usize,
    stats: Arc<Stats>,
    health: Arc<Health>,
    clock: Clock,
    sweep: Sweep,
    /// Set while the journal cannot commit.
    failure: Option<Failure>,
    replicate: Option<Replicate>,
    /// Seals history segments off the journal's thread (`store::history`).
    archiver: Option<Archiver>,
    /// The ledger's own chunks start after this (`None`: not read yet).
    archived: Option<u64>,
}

/// The thread that writes history segments, woken after commits once
/// enough old records have gathered; the journal then records each
/// segment and trims what it holds, in its own commits.
struct Archiver {
    wake: crossbeam_channel::Sender<()>,
    records: u64,
}

impl Archiver {
    fn start(store: Arc<Store>, records: u64) -> std::io::Result<Archiver> {
        // One wake-up waiting is enough: the thread seals all it can.
        let (wake, woken) = crossbeam_channel::bounded::<()>(1);
        std::thread::Builder::new().name("tally-history".into()).spawn(move || {
            // Copying a segment is background work: on two cores it must
            // not take turns with the journal and the runtime as an equal.
            // SAFETY: setpriority only changes this thread's nice value.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, HISTORY_NICE) };
            let mut retry_ms = HISTORY_RETRY_MS;
            while woken.recv().is_ok() {
                loop {
                    match store.history().seal_next(&|| store.db(), records) {
                        Ok(Some(_)) => retry_ms = HISTORY_RETRY_MS,
                        Ok(None) => break,
                        Err(StoreError::Unavailable) => break,
                        Err(e) => {
                            // Nothing relies on a segment not yet recorded.
                            // Every commit wakes this thread, so it waits
                            // before it tries again, longer each time, rather
                            // than rewrite a segment that fails at every commit.
                            tracing::warn!(error = %e, retry_s = retry_ms / 1000, "a history segment could not be written; trying again later");
                            std::thread::sleep(Duration::from_millis(retry_ms));
                            retry_ms = (retry_ms * 2).min(HISTORY_RETRY_MAX_MS);
                            while woken.try_recv().is_ok() {}
                            break;
                        }
                    }
                }
            }
        })?;
        Ok(Archiver { wake, records })
    }
}

/// How much a single server's commit takes when `queued` commands wait:
/// `commit_batch_max`, or half of the queue once more than twice that
/// many wait, up to four times `commit_batch_max` (and
/// [`COMMIT_BATCH_LIMIT`]). The queue counts an atomic batch once, where
/// the limit counts its items: a queue of atomic batches looks shallower
/// than it is, which errs towards the setting.
///
/// A commit's two fsyncs take about as long whatever it holds. When
/// batches keep the queue deep (tens of thousands of transfers waiting
/// behind the journal), commits of ~2,000 left the two cores 12% idle
/// (waiting for the disk included): the runtime had handed everything in
/// flight to the journal and waited with it. Taking half leaves the other
/// half for the next commit, so the runtime keeps working while this one
/// is written; with less waiting (single transfers, 4,096 in flight)
/// nothing changes. A cluster's leader keeps `commit_batch_max`: there,
/// larger proposals left none in flight while one was replicated.
fn commit_limit(batch_max: usize, queued: usize) -> usize {
    let most = batch_max.saturating_mul(COMMIT_DEEP_QUEUE_FACTOR).min(COMMIT_BATCH_LIMIT).max(batch_max);
    (queued / 2).clamp(batch_max, most)
}

impl Journal {
    #[must_use]
    pub fn new(a: JournalArgs) -> Journal {
        let store::Loaded { book, head, expiring, .. } = a.loaded;
        Journal {
            store: a.store,
            machine: Machine { book, head, expiring: expiring.into_iter().collect(), fee_rounding: a.fee_rounding },
            writes: Writes::default(),
            batch_max: a.batch_max,
            stats: a.stats,
            health: a.health,
            clock: a.clock,
            sweep: Sweep { cursor: 0, from: head.id, checkpoint: 0 },
            failure: None,
            archiver: None,
            archived: None,
            replicate: a.replicate,
        }
        .with_archiver(a.segment_records)
    }

    /// Starts sealing history segments of `records` each (0: never). A
    /// cluster's journal proposes rather than writes and seals none.
    fn with_archiver(mut self, records: u64) -> Journal {
        if records > 0 && self.replicate.is_none() {
            match Archiver::start(self.store.clone(), records) {
                Ok(a) => self.archiver = Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "the history's thread cannot start; every record stays in the ledger file")
                }
            }
        }
        self
    }

    /// The segments to record in the next commit, if any.
    fn sealed_to_note(&self) -> Option<u64> {
        self.archiver.as_ref()?;
        let sealed = self.store.history().sealed();
        (self.archived != Some(sealed)).then_some(sealed)
    }

    /// Wakes the history's thread once a segment's worth of records are
    /// older than the checkpoint.
    fn wake_archiver(&self) {
        if let Some(a) = &self.archiver {
            if self.sweep.checkpoint > self.store.history().sealed().saturating_add(a.records) {
                let _ = a.wake.try_send(());
            }
        }
    }

    /// Runs until every handle is dropped or a [`Command::Shutdown`]
    /// arrives, then writes a full checkpoint and returns. Committed batches
    /// go to `fanout` in commit order.
    pub fn run(mut self, rx: &Receiver<Command>, fanout: &tokio::sync::mpsc::UnboundedSender<Committed>) {
        if self.replicate.is_some() {
            return self.run_replicated(rx, fanout);
        }
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        loop {
            if self.failure.is_some() {
                match self.run_failing(rx, fanout) {
                    Some(()) => continue,
                    None => return,
                }
            }
            self.due_holds(&mut batch);
            if batch.is_empty() {
                match rx.recv_timeout(self.idle_wait()) {
                    Ok(c) => batch.push(c),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        self.catch_up(rx);
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
            let mut stops = Vec::new();
            self.fill(&mut batch, rx, commit_limit(self.batch_max, rx.len()), &mut stops);
            let committed = self.commit(std::mem::take(&mut batch));
            if fanout.send(committed).is_err() {
                break;
            }
            if !stops.is_empty() {
                self.stop();
                for done in stops {
                    let _ = done.send(());
                }
                return;
            }
        }
        self.stop();
    }

    /// Adds what is queued to `batch`, up to `max` (atomic batches count
    /// their items, so that a commit holds at most about that many
    /// records), and takes the shutdowns out into `stops`.
    fn fill(
        &self,
        batch: &mut Vec<Command>,
        rx: &Receiver<Command>,
        max: usize,
        stops: &mut Vec<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut weight: usize = batch.iter().map(Command::weight).sum();
        while weight < max {
            match rx.try_recv() {
                Ok(c) => {
                    weight += c.weight();
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        batch.retain_mut(|c| match c {
            Command::Shutdown(done) => {
                let (placeholder, _) = tokio::sync::oneshot::channel();
                stops.push(std::mem::replace(done, placeholder));
                false
            }
            _ => true,
        });
    }

    /// One round of a journal that cannot commit: refuses whatever is
    /// queued (`unavailable`, through the fan-out so that owners release
    /// their reservations), and now and then tries to reopen the database.
    /// `None` when the journal must stop.
    fn run_failing(
        &mut self,
        rx: &Receiver<Command>,
        fanout: &tokio::sync::mpsc::UnboundedSender<Committed>,
    ) -> Option<()> {
        let first = match rx.recv_timeout(Duration::from_millis(JOURNAL_RECOVERY_RETRY_MS)) {
            Ok(c) => Some(c),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
        };
        let mut refused = Vec::new();
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if let Command::Shutdown(done) = cmd {
                let _ = fanout.send(Committed(refused));
                tracing::warn!("stopping while the journal cannot commit; the next start recovers");
                let _ = done.send(());
                return None;
            }
            if let Some(o) = Outcome::refused(&cmd, &unavailable()) {
                refused.push((cmd, o));
            }
        }
        if !refused.is_empty() && fanout.send(Committed(refused)).is_err() {
            return None;
        }
        self.try_recover();
        Some(())
    }

    /// Applies and commits one batch; every command gets its outcome.
    fn commit(&mut self, batch: Vec<Command>) -> Committed {
        let time = self.clock.now_ms();
        let head_before = self.machine.head;
        self.writes.clear();
        let sealed = self.sealed_to_note();
        let result = self.store.db().and_then(|db| {
            let outcomes = self.machine.apply(&RedbCold::new(&db), &batch, time, &mut self.writes)?;
            let archived = commit::write(
                &db,
                self.store.keys(),
                &mut self.writes,
                &mut self.machine.book,
                self.machine.head,
                &mut self.sweep,
                sealed,
            )?;
            Ok((outcomes, archived))
        });
        match result {
            Ok((outcomes, archived)) => {
                if let Some(a) = archived.filter(|&a| Some(a) != self.archived) {
                    if a > 0 && a == self.store.history().sealed() {
                        tracing::info!(archived = a, "the ledger's own records now start after the history's segments");
                    }
                    self.archived = archived;
                }
                self.wake_archiver();
                self.health.committed(time);
                self.stats.record_batch(batch.len() as u64, self.machine.head.id - head_before.id);
                Committed(batch.into_iter().zip(outcomes).collect())
            }
            Err(e) => {
                // Nothing of this batch reached the disk: the machine goes
                // back to what did when the database is reopened
                // (`try_recover`); every command is refused.
                self.machine.head = head_before;
                self.fail(&e);
                let failed = unavailable();
                Committed(batch.into_iter().filter_map(|c| Outcome::refused(&c, &failed).map(|o| (c, o))).collect())
            }
        }
    }

    /// Records a failed commit: health turns failing, and the database is
    /// taken out of the store to be reopened (redb refuses everything after
    /// an IO error until then).
    fn fail(&mut self, e: &StoreError) {
        let reason = e.to_string();
        tracing::error!(error = %reason, "the journal cannot commit; refusing writes until the storage recovers");
        self.health.failing(reason.clone());
        let retired = self.store.take();
        self.failure = Some(Failure { reason, retired });
    }

    /// Tries once to reopen the database and carry on from what it holds.
    fn try_recover(&mut self) {
        let Some(failure) = self.failure.as_mut() else { return };
        if let Some(old) = failure.retired.take() {
            if Arc::strong_count(&old) > 1 {
                // A reader (a backup, a page of history) still holds it.
                failure.retired = Some(old);
                return;
            }
            drop(old);
        }
        let db = match store::open(self.store.path()) {
            Ok(db) => db,
            Err(e) => {
                if e.to_string() != failure.reason {
                    tracing::warn!(error = %e, "the database cannot be reopened yet");
                    failure.reason = e.to_string();
                    self.health.failing(failure.reason.clone());
                }
                return;
            }
        };
        let loaded = match store::load(&db, self.machine.book.limits) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the reopened database cannot be loaded yet");
                return;
            }
        };
        if loaded.head != self.machine.head {
            // The failed commit reached the disk after all, so its commands
            // were refused but applied: the owners' views are wrong. Only a
            // fresh start rebuilds everything from the disk.
            tracing::error!(
                disk = loaded.head.id,
                memory = self.machine.head.id,
                "a commit reported as failed is on disk; stopping so that a restart rebuilds the ledger"
            );
            std::process::abort();
        }
        self.machine.book = loaded.book;
        self.machine.expiring = loaded.expiring.into_iter().collect();
        self.sweep = Sweep { cursor: 0, from: self.machine.head.id, checkpoint: self.sweep.checkpoint };
        if let Err(e) = self.store.put(Arc::new(db)) {
            tracing::warn!(error = %e, "the reopened database's recent keys cannot be read yet");
            return;
        }
        // Healthy only once a commit has gone through.
        let reason = self.failure.take().map(|f| f.reason).unwrap_or_default();
        let committed = self.commit(Vec::new());
        debug_assert!(committed.0.is_empty());
        if self.failure.is_none() {
            tracing::warn!(after = %reason, "the storage recovered; the journal commits again");
        }
    }

    /// Queues a void for every hold whose timeout has passed (at most a
    /// batch's worth at a time).
    fn due_holds(&mut self, batch: &mut Vec<Command>) {
        let now = self.clock.now_ms();
        while batch.len() < self.batch_max {
            let Some(&(expires_at, hold)) = self.machine.expiring.first() else { break };
            if expires_at > now {
                break;
            }
            self.machine.expiring.pop_first();
            // Nobody waits for this answer.
            let (reply, _) = ReplyTo::channel();
            batch.push(Command::Settle(Box::new(SettleCmd {
                hold,
                op: SettleOp::Expire,
                by: None,
                note: None,
                reply,
            })));
        }
    }

    /// How long to wait for work: until the next hold expires, at most
    /// until the idle sweep.
    fn idle_wait(&self) -> Duration {
        let now = self.clock.now_ms();
        let idle = Duration::from_millis(SWEEP_IDLE_AFTER_MS);
        self.machine.expiring.first().map_or(idle, |&(at, _)| idle.min(Duration::from_millis(at.saturating_sub(now))))
    }

    /// While idle, keeps sweeping until the checkpoint reaches the head, so
    /// that start-up, `audit` and `list_accounts` replay almost nothing.
    /// Stops as soon as real work arrives.
    fn catch_up(&mut self, rx: &Receiver<Command>) {
        while (self.sweep.checkpoint < self.machine.head.id || self.sealed_to_note().is_some())
            && rx.is_empty()
            && self.failure.is_none()
        {
            let before = (self.sweep.checkpoint, self.sweep.cursor, self.archived);
            let committed = self.commit(Vec::new());
            debug_assert!(committed.0.is_empty());
            if (self.sweep.checkpoint, self.sweep.cursor, self.archived) == before {
                // The commit failed (it was logged): try again on the next
                // idle period rather than spinning on a sick disk.
                break;
            }
        }
    }

    /// Leaves a full checkpoint, so the next start replays nothing.
    fn stop(&mut self) {
        let written = self
            .store
            .db()
            .and_then(|db| commit::final_checkpoint(&db, &mut self.machine.book, self.machine.head, &mut self.sweep));
        if let Err(e) = written {
            tracing::warn!(error = %e, "final checkpoint failed; the next start replays the tail");
        }
        tracing::info!(head = self.machine.head.id, "journal stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::commit_limit;
    use crate::limits::{COMMIT_BATCH_LIMIT, COMMIT_BATCH_MAX};

    #[test]
    fn a_commit_takes_half_a_deep_queue_within_four_times_the_setting() {
        let m = COMMIT_BATCH_MAX;
        // Up to twice the setting waiting: the setting, as before.
        assert_eq!(commit_limit(m, 0), m);
        assert_eq!(commit_limit(m, 2 * m + 1), m);
        // Deeper: half of what waits.
        assert_eq!(commit_limit(m, 5 * m), 5 * m / 2);
        // At most four times the setting...
        assert_eq!(commit_limit(m, 100 * m), 4 * m);
        assert_eq!(commit_limit(1, usize::MAX), 4);
        // ...and never past the largest setting allowed, nor below the one set.
        assert_eq!(commit_limit(COMMIT_BATCH_LIMIT / 2, usize::MAX), COMMIT_BATCH_LIMIT);
        assert_eq!(commit_limit(COMMIT_BATCH_LIMIT, usize::MAX), COMMIT_BATCH_LIMIT);
        assert_eq!(commit_limit(usize::MAX, 0), usize::MAX);
    }
}
