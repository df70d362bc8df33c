//! Where a request's answer goes, and the permits it holds until then.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::error::ApiError;
use crate::wire::{BatchItem, Op, Reply};

/// One answer on its way to a connection's writer.
pub struct Outgoing {
    pub id: Option<u64>,
    pub result: Result<Reply, ApiError>,
    /// Released when the writer has taken the answer: this is what bounds
    /// the requests in flight per connection and in the whole server.
    pub permits: Permits,
}

/// The per-connection and server-wide in-flight permits of one request.
#[derive(Default)]
pub struct Permits {
    pub connection: Option<OwnedSemaphorePermit>,
    pub server: Option<OwnedSemaphorePermit>,
}

impl Permits {
    /// Takes over `other`'s permits, so that one release returns both (a
    /// release locks the semaphore; the writer releases once per write).
    pub fn absorb(&mut self, other: Permits) {
        fn merge(into: &mut Option<OwnedSemaphorePermit>, p: Option<OwnedSemaphorePermit>) {
            match (into.as_mut(), p) {
                (Some(a), Some(b)) if std::sync::Arc::ptr_eq(a.semaphore(), b.semaphore()) => a.merge(b),
                (None, p) => *into = p,
                // Another semaphore (not made by this server): released at once.
                (Some(_), p) => drop(p),
            }
        }
        merge(&mut self.connection, other.connection);
        merge(&mut self.server, other.server);
    }
}

/// The return address of one request. Every path sends exactly one answer;
/// if a reply is dropped unanswered anyway (an actor killed with requests in
/// its mailbox), the client gets `internal` instead of waiting forever.
pub struct ReplyTo {
    inner: Option<Inner>,
}

enum Inner {
    /// To a connection's writer, or to an op awaiting it.
    Channel {
        tx: mpsc::UnboundedSender<Outgoing>,
        id: Option<u64>,
        permits: Permits,
        /// The op slot this request is counted under in the metrics, if it
        /// is a client's request (not one an op runs inside another).
        counted: Option<u8>,
    },
    /// Into item `index` of a batch's [`Slots`].
    Item { slots: Arc<Slots>, index: usize },
}

impl ReplyTo {
    #[must_use]
    pub fn new(tx: mpsc::UnboundedSender<Outgoing>, id: Option<u64>, permits: Permits) -> Self {
        ReplyTo { inner: Some(Inner::Channel { tx, id, permits, counted: None }) }
    }

    /// The answer of item `index` of the batch gathered in `slots`.
    #[must_use]
    pub fn item(slots: &Arc<Slots>, index: usize) -> Self {
        ReplyTo { inner: Some(Inner::Item { slots: slots.clone(), index }) }
    }

    /// Counts this request in the metrics (`tally_requests_total`, in
    /// flight until answered) as one for `op` (`None`: unknown or unreadable).
    #[must_use]
    pub fn counted(mut self, op: Option<Op>) -> Self {
        if let Some(Inner::Channel { counted: counted @ None, .. }) = self.inner.as_mut() {
            crate::metrics::started();
            *counted = Some(crate::metrics::op_slot(op));
        }
        self
    }

    /// A reply whose answer the caller awaits itself (an op that runs
    /// another op first, e.g. a check before an OTP session is opened).
    #[must_use]
    pub fn channel() -> (ReplyTo, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ReplyTo::new(tx, None, Permits::default()), rx)
    }

    /// Sends the answer; a closed connection simply drops it.
    pub fn send(mut self, result: Result<Reply, ApiError>) {
        if let Some(i) = self.inner.take() {
            i.deliver(result);
        }
    }

    pub fn ok(self, reply: Reply) {
        self.send(Ok(reply));
    }

    pub fn err(self, error: ApiError) {
        self.send(Err(error));
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if let Some(i) = self.inner.take() {
            i.deliver(Err(ApiError::internal("the request was dropped before it was answered")));
        }
    }
}

impl Inner {
    fn deliver(self, result: Result<Reply, ApiError>) {
        match self {
            Inner::Channel { tx, id, permits, counted } => {
                if let Some(slot) = counted {
                    crate::metrics::answered(slot, &result);
                }
                let _ = tx.send(Outgoing { id, result, permits });
            }
            Inner::Item { slots, index } => slots.put(index, result),
        }
    }
}

/// A batch's items' answers, each written into its own place as it comes.
///
/// Why not a channel of answers: a batch of 1,000 items then sent 1,000
/// messages, each moved twice and each waking the gathering task; the
/// answers' traffic was about a fifth of the runtime worker's time under
/// batched load. Here an answer takes a lock no one else holds for long,
/// and the gatherer is woken when the answers it waits for are in, not
/// at each one.
///
/// Why it always ends: every [`ReplyTo::item`] answers exactly once (sent,
/// or dropped unanswered, which answers `internal`), so the count of
/// answers reaches the number of items made.
pub struct Slots {
    state: Mutex<SlotsState>,
    woken: Notify,
}

struct SlotsState {
    results: Vec<Option<Result<BatchItem, ApiError>>>,
    answered: usize,
    /// The count of answers the gatherer waits for.
    awaited: usize,
}

impl Slots {
    /// Room for `results.len()` items, of which those already `Some`
    /// count as answered (refused before they were sent anywhere).
    #[must_use]
    pub fn new(results: Vec<Option<Result<BatchItem, ApiError>>>) -> Arc<Slots> {
        let answered = results.iter().filter(|r| r.is_some()).count();
        let awaited = results.len();
        Arc::new(Slots { state: Mutex::new(SlotsState { results, answered, awaited }), woken: Notify::new() })
    }

    fn put(&self, index: usize, result: Result<Reply, ApiError>) {
        let item = result.map(|r| match r {
            Reply::Item(item) => item,
            _ => BatchItem::Failed {
                code: crate::error::ErrorCode::Internal,
                message: "an answer of the wrong kind".into(),
            },
        });
        let mut s = self.lock();
        debug_assert!(index < s.results.len(), "a batch's replies are made for its places");
        // A place answers once (a `ReplyTo` is consumed by its answer, and
        // the places answered before the items were sent get none): an
        // answer for a place that has one changes nothing.
        let Some(slot @ None) = s.results.get_mut(index) else { return };
        *slot = Some(item);
        s.answered += 1;
        if s.answered >= s.awaited {
            self.woken.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsState> {
        // A panic aborts the process (the release profile and main's
        // hook), so a poisoned lock is never seen; its data is sound anyway.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `awaited` items have answered.
    pub async fn answered(&self, awaited: usize) {
        loop {
            {
                let mut s = self.lock();
                if s.answered >= awaited {
                    return;
                }
                s.awaited = awaited;
            }
            // A wake-up stored before this wait (a `notify_one` with no one
            // waiting) ends it at once; the count is then read again.
            self.woken.notified().await;
        }
    }

    /// `f` of the answers so far, in order (`None`: not answered yet).
    pub fn read<R>(&self, f: impl FnOnce(&[Option<Result<BatchItem, ApiError>>]) -> R) -> R {
        f(&self.lock().results)
    }

    /// The answers so far, in order: `None` where an item has not answered.
    #[must_use]
    pub fn take(&self) -> Vec<Option<Result<BatchItem, ApiError>>> {
        std::mem::take(&mut self.lock().results)
    }
}

/// Awaits the one answer sent to a [`ReplyTo::channel`].
pub async fn answer(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Result<Reply, ApiError> {
    rx.recv().await.map_or_else(|| Err(ApiError::internal("no answer")), |o| o.result)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;
    use crate::error::ErrorCode;

    fn done(id: u64) -> Result<Reply, ApiError> {
        Ok(Reply::Item(BatchItem::Done { id, from_balance: Some(1), to_balance: None }))
    }

    /// Whether `fut` is ready at its first poll.
    fn ready(fut: impl Future<Output = ()>) -> bool {
        pin!(fut).poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[test]
    fn a_batch_hears_every_item_in_its_place_whatever_the_order() {
        let slots = Slots::new(vec![None, Some(Err(ApiError::bad_request("refused early"))), None, None]);
        let (a, c, d) = (ReplyTo::item(&slots, 0), ReplyTo::item(&slots, 2), ReplyTo::item(&slots, 3));
        d.send(done(30));
        assert!(!ready(slots.answered(4)), "two of four answered");
        a.send(done(10));
        assert!(!ready(slots.answered(4)), "three of four answered");
        // A place answered already keeps its answer, and is not counted again.
        ReplyTo::item(&slots, 1).send(done(99));
        assert!(!ready(slots.answered(4)), "still three of four answered");
        // A dropped reply answers `internal`; an answer of another kind is refused.
        drop(c);
        assert!(ready(slots.answered(4)));
        let results = slots.take();
        let code = |r: &Option<Result<BatchItem, ApiError>>| match r {
            Some(Err(e)) => Some(e.code),
            _ => None,
        };
        assert!(matches!(results[0], Some(Ok(BatchItem::Done { id: 10, from_balance: Some(1), to_balance: None }))));
        assert_eq!(code(&results[1]), Some(ErrorCode::BadRequest));
        assert_eq!(code(&results[2]), Some(ErrorCode::Internal));
        assert!(matches!(results[3], Some(Ok(BatchItem::Done { id: 30, from_balance: Some(1), to_balance: None }))));

        let other = Slots::new(vec![None]);
        ReplyTo::item(&other, 0).ok(Reply::Text("ok"));
        assert!(matches!(&other.take()[0], Some(Ok(BatchItem::Failed { code: ErrorCode::Internal, .. }))));
    }

    /// Waits for `slots` to hear `awaited` answers on a task of its own,
    /// so that only a wake-up can end the wait.
    fn gatherer(slots: &Arc<Slots>, awaited: usize) -> tokio::task::JoinHandle<()> {
        let slots = slots.clone();
        tokio::spawn(async move { slots.answered(awaited).await })
    }

    #[tokio::test]
    async fn the_gatherer_is_woken_once_the_answers_it_waits_for_are_in() {
        let wait = |h| tokio::time::timeout(std::time::Duration::from_secs(10), h);
        let slots = Slots::new((0..3).map(|_| None).collect());
        let mut replies = (0..3).map(|i| ReplyTo::item(&slots, i)).collect::<Vec<_>>().into_iter();
        // Fewer than all of them (an atomic batch's others were handed back).
        let two = gatherer(&slots, 2);
        tokio::task::yield_now().await;
        replies.next().unwrap().send(done(1));
        assert!(!ready(slots.answered(2)), "one of the two awaited");
        replies.next().unwrap().send(done(2));
        wait(two).await.expect("woken at two answers").unwrap();
        let three = gatherer(&slots, 3);
        tokio::task::yield_now().await;
        replies.next().unwrap().send(done(3));
        wait(three).await.expect("woken at three answers").unwrap();
        assert!(slots.take().iter().all(Option::is_some));
    }
}
