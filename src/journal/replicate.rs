//! A cluster leader's journal: decides batches as a single server does
//! and proposes each as one Raft entry. While one is in flight, another
//! goes out only if a full batch is waiting (up to
//! [`CLUSTER_PROPOSALS_IN_FLIGHT`]), so that a flood does not wait a
//! round per batch and a trickle is not cut into many small entries.
//!
//! Why pipelining keeps every answer right:
//!
//! - **Decisions see what is in flight.** The machine in memory already
//!   includes every batch proposed; the rows it reads from disk are read
//!   through [`Overlay`], the in-flight batches' writes (newest first)
//!   over the database, so a batch decides on exactly the state its `base`
//!   head names.
//! - **Answers go out in proposal order**, each when its own entry was
//!   applied (`Verdict::Applied`), whatever order the answers come back in.
//! - **A failure deposes.** A proposal that is not applied (a timeout, the
//!   leader lost its place, a stale base) stops the journal proposing: the
//!   batches after it were decided on top of it, so they are either applied
//!   with it or skipped as stale by every member; each gets its own
//!   verdict, and the member restarts its ledger from what the cluster
//!   applied.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::commit::RedbCold;
use super::machine::{Cold, Writes};
use super::{no_quorum, not_leader, unavailable, unknown_outcome, Journal};
use crate::cluster::ledger::DecidedRef;
use crate::cluster::{Batch, TypeConfig, Verdict};
use crate::contract::{Command, Committed, Outcome};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{CLUSTER_COMMIT_TIMEOUT_MS, CLUSTER_PROPOSALS_IN_FLIGHT};
use crate::store::{AccountMeta, HoldRecord, KeyRecord, RedeemRecord, StoreError, UserRecord};

type Written = Result<
    openraft::raft::ClientWriteResponse<TypeConfig>,
    openraft::error::ClientWriteError<u64, crate::cluster::Member>,
>;
/// What came back for a proposal: its response, or `None` after the timeout.
type Answer = Option<Written>;

/// A batch proposed and not yet answered, or a batch refused at once
/// (kept in line so that answers leave in order).
struct InFlight {
    batch: Vec<Command>,
    outcomes: Vec<Outcome>,
    /// What it wrote, for the batches decided after it ([`Overlay`]).
    writes: Writes,
    time: u64,
    records: u64,
    answer: Option<Answer>,
    /// Refused before it was proposed.
    refused: Option<ApiError>,
}

/// Rows as the in-flight batches left them (newest first), over the database.
struct Overlay<'a> {
    pending: &'a VecDeque<InFlight>,
    cold: RedbCold<'a>,
}

impl Overlay<'_> {
    fn find<T: Clone>(&self, pick: impl Fn(&Writes) -> Option<&T>) -> Option<T> {
        self.pending.iter().rev().find_map(|f| pick(&f.writes).cloned())
    }
}

impl Cold for Overlay<'_> {
    fn meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.find(|w| w.accounts.get(account)).map_or_else(|| self.cold.meta(account), |m| Ok(Some(m)))
    }
    fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        self.find(|w| w.users.get(user)).map_or_else(|| self.cold.user(user), |u| Ok(Some(u)))
    }
    fn hold(&self, id: u64) -> Result<Option<HoldRecord>, StoreError> {
        self.find(|w| w.holds.get(&id)).map_or_else(|| self.cold.hold(id), |h| Ok(Some(h)))
    }
    fn redeem(&self, id: u64) -> Result<Option<RedeemRecord>, StoreError> {
        self.find(|w| w.redeems.get(&id)).map_or_else(|| self.cold.redeem(id), |r| Ok(Some(r)))
    }
    fn service_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.find(|w| w.service_keys.get(key_id)).map_or_else(|| self.cold.service_key(key_id), |k| Ok(Some(k)))
    }
    fn tagged(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let mut members: BTreeSet<String> = self.cold.tagged(tag)?.into_iter().collect();
        for f in self.pending {
            f.writes.retag(tag, &mut members);
        }
        Ok(members.into_iter().collect())
    }
}

impl Journal {
    /// The leader's loop: until every handle is dropped or a shutdown
    /// arrives (which waits for the proposals in flight).
    pub(super) fn run_replicated(
        mut self,
        rx: &Receiver<Command>,
        fanout: &tokio::sync::mpsc::UnboundedSender<Committed>,
    ) {
        let (answers_tx, answers) = crossbeam_channel::unbounded::<(u64, Answer)>();
        let mut pending: VecDeque<InFlight> = VecDeque::new();
        // The sequence number of `pending[0]`.
        let mut first = 0u64;
        let mut stops: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        loop {
            while pending.front().is_some_and(|f| f.answer.is_some() || f.refused.is_some()) {
                let done = pending.pop_front().expect("checked");
                first += 1;
                if fanout.send(self.finish(done)).is_err() {
                    return;
                }
            }
            if !stops.is_empty() && pending.is_empty() {
                tracing::info!(head = self.machine.head.id, "journal stopped");
                for done in stops {
                    let _ = done.send(());
                }
                return;
            }
            let mut batch = Vec::new();
            // Another proposal goes out while some are in flight only when
            // a full batch is waiting: smaller ones cost a Raft round each
            // for little (measured: three in flight at any size gave
            // batches of ~840 and 20% fewer transfers/s than one).
            let full = rx.len() >= self.batch_max;
            let room =
                stops.is_empty() && (pending.is_empty() || (full && pending.len() < CLUSTER_PROPOSALS_IN_FLIGHT));
            if room {
                self.due_holds(&mut batch);
            }
            if batch.is_empty() {
                let got = if room {
                    crossbeam_channel::select! {
                        recv(answers) -> a => a.map(Err).ok(),
                        recv(rx) -> c => match c {
                            Ok(c) => Some(Ok(c)),
                            // Every handle dropped: finish what is in flight.
                            Err(_) => { stops.push(tokio::sync::oneshot::channel().0); continue }
                        },
                        default(self.idle_wait()) => continue,
                    }
                } else {
                    // Looks again at the queue now and then: a full batch
                    // may be waiting before the oldest answer comes.
                    match answers.recv_timeout(Duration::from_millis(1)) {
                        Ok(a) => Some(Err(a)),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => None,
                    }
                };
                match got {
                    Some(Ok(c)) => batch.push(c),
                    Some(Err((seq, answer))) => {
                        if let Some(f) = seq.checked_sub(first).and_then(|i| pending.get_mut(i as usize)) {
                            f.answer = Some(answer);
                        }
                        continue;
                    }
                    None => return,
                }
            }
            self.fill(&mut batch, rx, self.batch_max, &mut stops);
            if !batch.is_empty() {
                let seq = first + pending.len() as u64;
                let f = self.start(batch, &pending, seq, &answers_tx);
                pending.push_back(f);
            }
        }
    }

    /// Decides `batch` on top of the batches in flight and proposes it
    /// (answered through `answers` as number `seq`), or refuses it.
    fn start(
        &mut self,
        batch: Vec<Command>,
        pending: &VecDeque<InFlight>,
        seq: u64,
        answers: &Sender<(u64, Answer)>,
    ) -> InFlight {
        let refused = |batch: Vec<Command>, e: ApiError| InFlight {
            batch,
            outcomes: Vec::new(),
            writes: Writes::default(),
            time: 0,
            records: 0,
            answer: None,
            refused: Some(e),
        };
        let Some(r) = self.replicate.as_ref() else { unreachable!("only run with a cluster") };
        if r.deposed.is_cancelled() {
            return refused(batch, not_leader(None));
        }
        if let Some(why) = no_quorum(&r.raft, r.me) {
            return refused(batch, ApiError::new(ErrorCode::Unavailable, why));
        }
        let time = self.clock.now_ms();
        let base = self.machine.head;
        self.writes.clear();
        let decided = self.store.db().and_then(|db| {
            let overlay = Overlay { pending, cold: RedbCold::new(&db) };
            self.machine.apply(&overlay, &batch, time, &mut self.writes)
        });
        let outcomes = match decided {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "the leader's journal cannot read the ledger; restarting it");
                r.deposed.cancel();
                return refused(batch, unavailable());
            }
        };
        let entry = DecidedRef { seq: r.batches, base, head: self.machine.head, writes: &self.writes }.encode();
        // Handed to Raft here, on this thread, so that entries reach the
        // log in the order they were decided; only the wait is spawned.
        let receiver = match r.rt.block_on(r.raft.client_write_ff(Batch(entry))) {
            Ok(rx) => rx,
            Err(e) => {
                // Raft stopped: the entry never reached it.
                tracing::error!(error = %e, "raft refused a proposal; restarting the ledger");
                r.deposed.cancel();
                return refused(batch, unavailable());
            }
        };
        let answers = answers.clone();
        let wait = Duration::from_millis(CLUSTER_COMMIT_TIMEOUT_MS);
        let rt = r.rt.clone();
        if let Some(r) = self.replicate.as_mut() {
            r.batches += 1;
        }
        rt.spawn(async move {
            // A dropped responder (Raft stopped) is as unknown as a timeout.
            let answer = tokio::time::timeout(wait, receiver).await.ok().and_then(Result::ok);
            let _ = answers.send((seq, answer));
        });
        InFlight {
            batch,
            outcomes,
            writes: self.writes.clone(),
            time,
            records: self.machine.head.id - base.id,
            answer: None,
            refused: None,
        }
    }

    /// The outcomes of an answered (or refused) batch; anything but
    /// "applied" deposes the journal.
    fn finish(&mut self, f: InFlight) -> Committed {
        let refuse = |batch: Vec<Command>, e: &ApiError| {
            Committed(batch.into_iter().filter_map(|c| Outcome::refused(&c, e).map(|o| (c, o))).collect())
        };
        if let Some(e) = f.refused {
            return refuse(f.batch, &e);
        }
        let refusal = match f.answer.flatten() {
            Some(Ok(resp)) if resp.data == Verdict::Applied => {
                self.health.committed(f.time);
                self.stats.record_batch(f.batch.len() as u64, f.records);
                return Committed(f.batch.into_iter().zip(f.outcomes).collect());
            }
            Some(Ok(_)) => {
                ApiError::new(ErrorCode::Unavailable, "the leader changed while this was decided; nothing was changed")
            }
            Some(Err(openraft::error::ClientWriteError::ForwardToLeader(l))) => {
                // Refused before it reached the log, or cut from it: never applied.
                not_leader(l.leader_node.map(|n| n.client))
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "a proposal failed; its outcome is unknown");
                unknown_outcome()
            }
            None => {
                tracing::warn!("a proposal was not applied in time; its outcome is unknown");
                unknown_outcome()
            }
        };
        if let Some(r) = &self.replicate {
            r.deposed.cancel();
        }
        refuse(f.batch, &refusal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(writes: Writes) -> InFlight {
        InFlight { batch: Vec::new(), outcomes: Vec::new(), writes, time: 0, records: 0, answer: None, refused: None }
    }

    #[test]
    fn a_batch_in_flight_is_seen_newest_first_over_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(&dir.path().join("tally.redb")).unwrap();
        let meta = |num: u32| AccountMeta { num, tags: vec!["t".into()], ..AccountMeta::default() };
        let mut older = Writes::default();
        older.accounts.insert("a".into(), meta(7));
        older.tags.insert(("t".into(), "a".into()), true);
        older.tags.insert(("t".into(), "b".into()), true);
        let mut newer = Writes::default();
        newer.accounts.insert("a".into(), meta(8));
        newer.tags.insert(("t".into(), "b".into()), false);
        let pending: VecDeque<InFlight> = [in_flight(older), in_flight(newer)].into_iter().collect();
        let overlay = Overlay { pending: &pending, cold: RedbCold::new(&db) };
        // The newest write of a row wins; rows nobody wrote come from disk.
        assert_eq!(overlay.meta("a").unwrap().map(|m| m.num), Some(8));
        assert_eq!(overlay.meta("@mint").unwrap().map(|m| m.num), Some(0));
        assert_eq!(overlay.meta("nobody").unwrap(), None);
        // Tags: added by the older batch, one taken away by the newer.
        assert_eq!(overlay.tagged("t").unwrap(), vec!["a".to_owned()]);
        assert_eq!(overlay.tagged("u").unwrap(), Vec::<String>::new());
    }
}
