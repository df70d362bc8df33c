//! openraft's log lines, at most one per source line every
//! [`OPENRAFT_LINE_EVERY_MS`].
//!
//! openraft logs at error level each heartbeat and each read-index round
//! that a member misses: with one member down and reads arriving, the
//! leader wrote about 600 lines a second, one per round. The first line
//! of a kind always shows; its repeats within the interval are dropped.
//! Tally's own lines are never dropped: only warnings and errors of
//! targets under `openraft`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing_subscriber::layer::{Context, Filter};

use crate::guard::Recent;
use crate::limits::OPENRAFT_LINE_EVERY_MS;

/// A [`Filter`] letting through one line per openraft call site per
/// interval, and everything else.
pub struct Quiet {
    every_ms: u64,
    /// What the milliseconds count from.
    start: Instant,
    /// The lines each call site got through lately: one entry per call
    /// site in openraft's code, so bounded by its source.
    shown: Mutex<HashMap<Identifier, Recent>>,
}

impl Default for Quiet {
    fn default() -> Self {
        Quiet::new(OPENRAFT_LINE_EVERY_MS)
    }
}

impl Quiet {
    #[must_use]
    pub fn new(every_ms: u64) -> Quiet {
        Quiet { every_ms, start: Instant::now(), shown: Mutex::new(HashMap::new()) }
    }

    /// openraft's warnings and errors: its debug lines are shown only to
    /// an operator who asked for them (`TALLY_LOG`), and then whole.
    fn throttled(metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("openraft") && *metadata.level() <= tracing::Level::WARN
    }

    /// Whether a line from `site` at `now_ms` is shown.
    fn admit(&self, site: Identifier, now_ms: u64) -> bool {
        let Ok(mut shown) = self.shown.lock() else { return true };
        shown.entry(site).or_default().take(1, self.every_ms, now_ms).is_ok()
    }
}

impl<S> Filter<S> for Quiet {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    /// Counted here, once every filter let the event through: a line the
    /// log filter drops does not take its call site's turn.
    fn event_enabled(&self, event: &tracing::Event<'_>, _: &Context<'_, S>) -> bool {
        let metadata = event.metadata();
        !Self::throttled(metadata)
            || self.admit(metadata.callsite(), u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        // Asked per event for openraft's, so each can be counted.
        if Self::throttled(metadata) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two distinct call sites, as openraft's two `error!`s would be (a
    /// subscriber is set, so the spans are enabled and have metadata).
    fn sites() -> (Identifier, Identifier) {
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            let one = tracing::info_span!("one").metadata().expect("enabled").callsite();
            (one, tracing::info_span!("two").metadata().expect("enabled").callsite())
        })
    }

    #[test]
    fn one_line_per_call_site_per_interval() {
        let quiet = Quiet::new(10_000);
        let (a, b) = sites();
        assert!(quiet.admit(a.clone(), 0));
        assert!(!quiet.admit(a.clone(), 1));
        assert!(!quiet.admit(a.clone(), 9_999));
        // Another line is not held back by the first.
        assert!(quiet.admit(b.clone(), 1));
        assert!(quiet.admit(a.clone(), 10_000));
        assert!(!quiet.admit(a, 11_000));
        assert!(!quiet.admit(b, 5_000));
    }
}
