//! What a member's Raft log costs per append: one entry (one journal
//! batch) written and fsynced, as openraft's `append` does before a member
//! answers the leader. `cargo bench --bench raft_log`.
//!
//! The figure bounds replication: a leader that waits for each entry before
//! proposing the next commits at most 1 / (this + a round trip) batches a
//! second, so batches must stay in flight.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tally::cluster::log::LogStore;
use tally::cluster::{Batch, TypeConfig};

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
    let mut group = c.benchmark_group("raft log append + fsync");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut index = 0u64;
    // About 100 bytes per transfer record: 10 and 1,000 transfers a batch.
    for bytes in [1_000usize, 100_000] {
        group.bench_function(format!("one entry of {bytes} bytes"), |b| {
            b.iter(|| {
                index += 1;
                let entry: Entry<TypeConfig> = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(Batch(vec![7; bytes])),
                };
                rt.block_on(log.blocking_append([entry])).unwrap();
                black_box(index)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
