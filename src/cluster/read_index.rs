//! Linearizable reads on the leader: a read is answered only after a round
//! of openraft's read index that began after the read arrived.
//!
//! A leader's ledger holds every write it acknowledged (owners hear of a
//! commit before the client does). What it cannot know alone is whether it
//! still leads: paused, or cut off, it may have been replaced by a leader
//! that has since acknowledged writes it never saw. A round
//! (`Raft::get_read_log_id`) sends a heartbeat in this leader's term and
//! succeeds once a majority of voters accepts it. Why one that *began after
//! the read arrived* is enough:
//!
//! - Any leader elected before the read arrived was voted in by a majority
//!   that had moved to a later term. A round begun later reaches at least
//!   one of them, which refuses it (openraft then steps this leader down).
//!   So a confirmed round means no other leader can have acknowledged a
//!   write before the read arrived, and the read sees every write
//!   acknowledged before it was sent.
//! - Nothing rests on clocks. A lease does: it trusts that followers keep
//!   their election timeouts and that clocks run at the same rate.
//!
//! What it costs, and what bounds it:
//!
//! - **One round serves every read that arrived before it began**, and at
//!   most one round is in flight per leader: a flood of reads makes rounds
//!   back to back, never more. A read waits for at most the round in flight
//!   (begun before it arrived, so no use to it) and the next one.
//! - **A read's arrival is the socket read that brought its bytes**
//!   ([`ReadIndex::ticket`]), so a client's pipelined reads share a round.
//! - **Every wait ends.** openraft gives each heartbeat of a round its
//!   heartbeat interval; a round that fails for want of answers is tried
//!   again, at most [`TRIES`] times for one read, and the whole wait is
//!   bounded by [`CLUSTER_READ_INDEX_TIMEOUT_MS`]: then `unavailable`. A
//!   round refused because another member leads answers `not_leader` at
//!   once.
//!
//! A round confirms one term. The read index is the member's, not a ledger
//! run's: a member that lost leadership and won it back in a later term
//! confirms rounds again, while a run started in the earlier term (not yet
//! stopped) lacks what the leader in between acknowledged. A read counts a
//! round only if it confirmed the term the read's run leads in; any other
//! term answers `not_leader`.
//!
//! Writes need no round: they commit through Raft, and a refusal by the
//! rules changes nothing (the lease still fences it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::Raft;
use tokio::sync::watch;

use super::TypeConfig;
use crate::limits::CLUSTER_READ_INDEX_TIMEOUT_MS;

/// How many failed rounds begun after it a read sits through before it is
/// refused (within the overall timeout).
pub const TRIES: u32 = 3;

/// Why a read was not confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A member with a later term answered: this one no longer leads.
    NotLeader,
    /// No majority answered in time.
    NoQuorum,
}

/// One round: a majority confirms this member as the leader of a term, or
/// why not.
pub type Round = Pin<Box<dyn Future<Output = Result<u64, Refused>> + Send>>;

/// The rounds so far. Numbers count up from 1; only one runs at a time, so
/// they end in the order they began.
#[derive(Clone, Copy, Debug, Default)]
struct Rounds {
    /// The last round begun.
    begun: u64,
    /// Whether round `begun` is still running.
    running: bool,
    /// The last round confirmed (0: none), and the term it confirmed.
    confirmed: (u64, u64),
    /// The last round that failed, and why.
    failed: (u64, Option<Refused>),
}

/// The leader's read index: [`ReadIndex::ticket`] when a read arrives,
/// [`ReadIndex::confirm`] before it is answered.
pub struct ReadIndex {
    rounds: watch::Sender<Rounds>,
    round: Box<dyn Fn() -> Round + Send + Sync>,
    timeout: Duration,
}

impl ReadIndex {
    /// Rounds made by `round`, each read waiting at most `timeout`.
    pub fn new(round: impl Fn() -> Round + Send + Sync + 'static, timeout: Duration) -> Arc<ReadIndex> {
        Arc::new(ReadIndex { rounds: watch::Sender::new(Rounds::default()), round: Box::new(round), timeout })
    }

    /// Rounds of `raft`'s read index.
    #[must_use]
    pub fn of(raft: Raft<TypeConfig>) -> Arc<ReadIndex> {
        let round = move || -> Round {
            let raft = raft.clone();
            Box::pin(async move {
                // The read log id is at least the leader's first entry of
                // its term, so its term is the term confirmed.
                match raft.get_read_log_id().await {
                    Ok((Some(read), _)) => Ok(read.leader_id.term),
                    Ok((None, _)) => Err(Refused::NotLeader),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => Err(Refused::NotLeader),
                    Err(_) => Err(Refused::NoQuorum),
                }
            })
        };
        ReadIndex::new(round, Duration::from_millis(CLUSTER_READ_INDEX_TIMEOUT_MS))
    }

    /// What a read arriving now waits for: a round numbered above this.
    #[must_use]
    pub fn ticket(&self) -> u64 {
        self.rounds.borrow().begun
    }

    /// Returns once a round begun after `ticket` was taken confirms this
    /// member as the leader of `term`, or says why none did.
    pub async fn confirm(self: &Arc<Self>, ticket: u64, term: u64) -> Result<(), Refused> {
        let mut rounds = self.rounds.subscribe();
        let wait = async {
            let mut seen_failed = ticket;
            let mut tries = 0;
            loop {
                let idle = {
                    let r = rounds.borrow_and_update();
                    if r.confirmed.0 > ticket {
                        return if r.confirmed.1 == term { Ok(()) } else { Err(Refused::NotLeader) };
                    }
                    if r.failed.0 > seen_failed {
                        seen_failed = r.failed.0;
                        tries += 1;
                        let why = r.failed.1.unwrap_or(Refused::NoQuorum);
                        if why == Refused::NotLeader || tries >= TRIES {
                            return Err(why);
                        }
                    }
                    !r.running
                };
                if idle {
                    self.begin();
                }
                if rounds.changed().await.is_err() {
                    return Err(Refused::NoQuorum);
                }
            }
        };
        tokio::time::timeout(self.timeout, wait).await.unwrap_or(Err(Refused::NoQuorum))
    }

    /// Begins a round unless one is running.
    fn begin(self: &Arc<Self>) {
        let mut number = None;
        // Not a change anyone waits for: readers wake when a round ends.
        self.rounds.send_if_modified(|r| {
            if !r.running {
                r.running = true;
                r.begun += 1;
                number = Some(r.begun);
            }
            false
        });
        let Some(n) = number else { return };
        let round = (self.round)();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(me.timeout, round).await.unwrap_or(Err(Refused::NoQuorum));
            me.rounds.send_modify(|r| {
                r.running = false;
                match outcome {
                    Ok(term) => r.confirmed = (n, term),
                    Err(why) => r.failed = (n, Some(why)),
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::*;

    /// Rounds the test ends by hand: each one begun leaves a sender here.
    #[derive(Default)]
    struct Hand {
        begun: AtomicU64,
        open: Mutex<Vec<oneshot::Sender<Result<u64, Refused>>>>,
    }

    impl Hand {
        fn index(self: &Arc<Self>) -> Arc<ReadIndex> {
            let hand = self.clone();
            ReadIndex::new(
                move || -> Round {
                    hand.begun.fetch_add(1, Ordering::SeqCst);
                    let (tx, rx) = oneshot::channel();
                    hand.open.lock().unwrap().push(tx);
                    Box::pin(async move { rx.await.unwrap_or(Err(Refused::NoQuorum)) })
                },
                Duration::from_secs(60),
            )
        }

        /// Ends the one round running, once it has begun.
        async fn end(&self, outcome: Result<u64, Refused>) {
            let tx = loop {
                if let Some(tx) = self.open.lock().unwrap().pop() {
                    break tx;
                }
                tokio::task::yield_now().await;
            };
            tx.send(outcome).unwrap();
        }
    }

    /// The term the reads' ledger run leads in.
    const TERM: u64 = 7;

    /// A read arriving now in a run leading in [`TERM`], waiting for its
    /// confirmation.
    fn arrive(index: &Arc<ReadIndex>) -> tokio::task::JoinHandle<Result<(), Refused>> {
        let (index, ticket) = (index.clone(), index.ticket());
        tokio::spawn(async move { index.confirm(ticket, TERM).await })
    }

    /// Whether `read` is still waiting after everything runnable has run
    /// (the test's runtime has one thread: yielding runs the rest).
    async fn waiting<T>(read: &tokio::task::JoinHandle<T>) -> bool {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        !read.is_finished()
    }

    #[tokio::test]
    async fn a_read_is_confirmed_only_by_a_round_begun_after_it_arrived() {
        let hand = Arc::new(Hand::default());
        let index = hand.index();
        let first = arrive(&index);
        assert!(waiting(&first).await);
        assert_eq!(hand.begun.load(Ordering::SeqCst), 1);
        // Arrives while round 1 runs: round 1 may have sent its heartbeats
        // before this read came, so it must not count for it.
        let second = arrive(&index);
        hand.end(Ok(TERM)).await;
        assert_eq!(first.await.unwrap(), Ok(()));
        assert!(waiting(&second).await, "confirmed by a round begun before it arrived");
        assert_eq!(hand.begun.load(Ordering::SeqCst), 2);
        hand.end(Ok(TERM)).await;
        assert_eq!(second.await.unwrap(), Ok(()));
    }

    /// A run of an earlier term, still answering while this member leads
    /// again in a later one, lacks what the leader in between wrote.
    #[tokio::test]
    async fn a_round_that_confirmed_another_term_refuses_the_read() {
        let hand = Arc::new(Hand::default());
        let index = hand.index();
        let read = arrive(&index);
        hand.end(Ok(TERM + 2)).await;
        assert_eq!(read.await.unwrap(), Err(Refused::NotLeader));
        let read = arrive(&index);
        hand.end(Ok(TERM)).await;
        assert_eq!(read.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn reads_that_arrived_together_share_one_round() {
        let hand = Arc::new(Hand::default());
        let index = hand.index();
        let ticket = index.ticket();
        let reads: Vec<_> = (0..50)
            .map(|_| {
                let index = index.clone();
                tokio::spawn(async move { index.confirm(ticket, TERM).await })
            })
            .collect();
        for r in &reads {
            assert!(waiting(r).await);
        }
        hand.end(Ok(TERM)).await;
        for r in reads {
            assert_eq!(r.await.unwrap(), Ok(()));
        }
        assert_eq!(hand.begun.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_deposed_leader_refuses_at_once_and_a_lost_majority_after_some_tries() {
        let hand = Arc::new(Hand::default());
        let index = hand.index();
        let read = arrive(&index);
        hand.end(Err(Refused::NotLeader)).await;
        assert_eq!(read.await.unwrap(), Err(Refused::NotLeader));
        assert_eq!(hand.begun.load(Ordering::SeqCst), 1);

        let read = arrive(&index);
        for _ in 1..TRIES {
            hand.end(Err(Refused::NoQuorum)).await;
            assert!(waiting(&read).await, "refused before {TRIES} tries");
        }
        hand.end(Err(Refused::NoQuorum)).await;
        assert_eq!(read.await.unwrap(), Err(Refused::NoQuorum));
        assert_eq!(hand.begun.load(Ordering::SeqCst), 1 + u64::from(TRIES));
    }

    #[tokio::test]
    async fn a_round_that_never_ends_refuses_its_reads_within_the_timeout() {
        let hand = Arc::new(Hand::default());
        let index = ReadIndex::new(
            {
                let hand = hand.clone();
                move || -> Round {
                    hand.begun.fetch_add(1, Ordering::SeqCst);
                    Box::pin(std::future::pending())
                }
            },
            Duration::from_millis(500),
        );
        let started = tokio::time::Instant::now();
        assert_eq!(index.confirm(index.ticket(), TERM).await, Err(Refused::NoQuorum));
        assert!(started.elapsed() >= Duration::from_millis(500));
        // The round was given up too: the next read begins another.
        let read = arrive(&index);
        assert!(waiting(&read).await);
        assert_eq!(hand.begun.load(Ordering::SeqCst), 2);
        read.abort();
    }
}
