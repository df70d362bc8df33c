//! A cluster of three real `tally` processes on loopback, started by the
//! test with a `[cluster]` configuration each: they form by themselves,
//! only the leader serves the ledger, and killing the leader with SIGKILL
//! loses no acknowledged transfer.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally::client::{Client, ClientError};

use common::ADMIN_PASSWORD;

const SECRET: &str = "a cluster secret of at least thirty-two bytes";
/// Elections, restarts and catching up, on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// One member: its process, its folder and its two addresses.
struct Member {
    id: u64,
    client: SocketAddr,
    raft: SocketAddr,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// Writes member `id`'s configuration into `dir` (every member of
    /// `nodes` listed: id, client, raft) and starts it.
    fn start(
        dir: &std::path::Path,
        (id, client, raft): (u64, SocketAddr, SocketAddr),
        listen: SocketAddr,
        extra: &str,
        nodes: &[(u64, SocketAddr, SocketAddr)],
    ) -> Member {
        let nodes: String = nodes
            .iter()
            .map(|(id, client, raft)| {
                format!("[[cluster.node]]\nid = {id}\nclient = \"{client}\"\nraft = \"{raft}\"\n")
            })
            .collect();
        let config = dir.join(format!("member-{id}.toml"));
        let text = format!(
            "listen = \"{client}\"\ntext_mode = false\n\n[cluster]\nid = {id}\nraft_listen = \"{listen}\"\nsecret = \"{SECRET}\"\n{extra}\n\n{nodes}"
        );
        std::fs::write(&config, text).unwrap();
        let mut m = Member {
            id,
            client,
            raft,
            config,
            data: dir.join(format!("data-{id}")),
            log: dir.join(format!("member-{id}.log")),
            child: None,
        };
        m.spawn();
        m
    }

    /// The member's `tally serve` command, its output not yet directed.
    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
        c.args(["serve", "--config"])
            .arg(&self.config)
            .arg("--data")
            .arg(&self.data)
            .env("TALLY_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("TALLY_LOG", "info,openraft=warn");
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut child = self.command().stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn().expect("spawn tally");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a listening line");
        let want = format!("tally listening on {}", self.client);
        assert_eq!(line.trim(), want, "member {} did not start; its log:\n{}", self.id, self.log());
        self.child = Some(child);
    }

    fn signal(&self, sig: &str) {
        common::signal(self.child.as_ref().expect("running").id(), sig);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    members: BTreeMap<u64, Member>,
}

/// A free port on loopback (bound, then let go for the member to take),
/// below the kernel's ephemeral range (32768 and up by default): a port
/// from that range, once let go, can be taken by any outgoing connection
/// before the member binds it. Each call in this process tries the next
/// port, so the tests running side by side never pick the same one.
fn free_port() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let offset = std::process::id() % 1000 * 11;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (offset + n) % 12_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap();
        }
    }
}

impl Cluster {
    fn start(n: u64) -> Cluster {
        Self::start_with(n, "")
    }

    /// `n` members, each with `extra` in its `[cluster]` section.
    fn start_with(n: u64, extra: &str) -> Cluster {
        let addrs = (1..=n).map(|id| (id, (free_port(), free_port(), None))).collect();
        Self::start_on(addrs, extra)
    }

    /// Members with these addresses: (client, raft as the others reach
    /// it, raft_listen if it differs).
    fn start_on(addrs: BTreeMap<u64, (SocketAddr, SocketAddr, Option<SocketAddr>)>, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<(u64, SocketAddr, SocketAddr)> = addrs.iter().map(|(&id, &(c, r, _))| (id, c, r)).collect();
        let mut members = BTreeMap::new();
        for (&id, &(client, raft, listen)) in &addrs {
            let m = Member::start(dir.path(), (id, client, raft), listen.unwrap_or(raft), extra, &nodes);
            members.insert(id, m);
        }
        Cluster { _dir: dir, members }
    }

    /// The member every running member agrees leads, once one serves.
    async fn leader(&self) -> u64 {
        self.leader_without(None).await
    }

    /// The one member that says it leads, leaving out `left_out` (paused or
    /// cut off: it cannot answer, or cannot know it was replaced).
    async fn leader_without(&self, left_out: Option<u64>) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut leaders = Vec::new();
            for m in self.members.values().filter(|m| m.child.is_some() && Some(m.id) != left_out) {
                if let Ok(h) = hello(m.client).await {
                    if h["role"] == "leader" {
                        leaders.push(m.id);
                    }
                }
            }
            if let [one] = leaders[..] {
                return one;
            }
            assert!(Instant::now() < deadline, "no single leader within {WAIT:?}: {leaders:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds the leader, logs in there and opens `accounts` bank accounts
    /// of [`EACH`]: the leader, the admin's token and its connection.
    async fn open_bank(&self, accounts: usize) -> (u64, String, Client) {
        let leader = self.leader().await;
        let token = admin_token(self.members[&leader].client).await;
        let admin = self.admin(leader, &token).await;
        for i in 0..accounts {
            common::create(&admin, &account(i), EACH).await;
        }
        (leader, token, admin)
    }

    /// Starts a member `id` that is not in the cluster yet; its own
    /// configuration lists every member and itself.
    fn join(&mut self, id: u64) -> (SocketAddr, SocketAddr) {
        let (client, raft) = (free_port(), free_port());
        let mut nodes: Vec<(u64, SocketAddr, SocketAddr)> =
            self.members.values().map(|m| (m.id, m.client, m.raft)).collect();
        nodes.push((id, client, raft));
        let m = Member::start(self._dir.path(), (id, client, raft), raft, "", &nodes);
        self.members.insert(id, m);
        (client, raft)
    }

    fn logs(&self) -> String {
        self.members.values().map(|m| format!("---- member {} ----\n{}", m.id, m.log())).collect()
    }

    /// An admin connection to member `id`, logged in at the leader.
    async fn admin(&self, id: u64, token: &str) -> Client {
        let c = Client::connect(self.members[&id].client).await.expect("connect");
        c.call("auth", json!({ "token": token })).await.expect("auth with the leader's token");
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what the members said.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

impl Cluster {
    /// Waits until every running member's `audit` is `head`, asking over a
    /// fresh connection each time (a member closes its connections when it
    /// starts or stops leading).
    async fn agree_on(&self, token: &str, head: &Value) {
        for m in self.members.values().filter(|m| m.child.is_some()) {
            let deadline = Instant::now() + WAIT;
            loop {
                let a = async {
                    let c = Client::connect(m.client).await.ok()?;
                    c.call("auth", json!({ "token": token })).await.ok()?;
                    c.call("audit", json!({})).await.ok()
                };
                let a = a.await.unwrap_or_default();
                if a == *head {
                    break;
                }
                assert!(Instant::now() < deadline, "member {} is at {a}, the leader at {head}\n{}", m.id, self.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn hello(addr: SocketAddr) -> Result<Value, ClientError> {
    let c = tokio::time::timeout(Duration::from_secs(2), Client::connect(addr))
        .await
        .map_err(|_| ClientError::Closed)??;
    tokio::time::timeout(Duration::from_secs(2), c.call("hello", json!({}))).await.map_err(|_| ClientError::Closed)?
}

async fn admin_token(addr: SocketAddr) -> String {
    let c = Client::connect(addr).await.expect("connect");
    let r = c.login("admin", ADMIN_PASSWORD).await.expect("admin login at the leader");
    r["token"].as_str().unwrap().to_owned()
}

const ACCOUNTS: usize = 8;
const EACH: i64 = 1_000;

fn account(i: usize) -> String {
    format!("bank-{i}")
}

/// What a worker sent and what became of it: key -> (from, to, amount,
/// the record id if acknowledged).
type Sent = BTreeMap<String, (usize, usize, i64, Option<u64>)>;

/// Sends keyed transfers, `depth` at a time, on one connection to `addr`
/// until the connection fails or `stop` is set; returns what it sent.
async fn worker(
    addr: SocketAddr,
    token: String,
    name: String,
    depth: usize,
    acked: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Sent {
    let mut sent = Sent::new();
    let Ok(c) = Client::connect(addr).await else { return sent };
    if c.call("auth", json!({ "token": token })).await.is_err() {
        return sent;
    }
    let c = Arc::new(c);
    let mut n = 0usize;
    loop {
        let mut calls = Vec::new();
        for _ in 0..depth {
            n += 1;
            let from = n % ACCOUNTS;
            let to = (n * 7 + 3) % ACCOUNTS;
            let to = if to == from { (to + 1) % ACCOUNTS } else { to };
            let amount = (n % 5 + 1) as i64;
            let key = format!("{name}-{n}");
            sent.insert(key.clone(), (from, to, amount, None));
            let c = c.clone();
            calls.push(Box::pin(async move {
                let r = c.transfer(Some(&account(from)), &account(to), amount, Some(&key)).await;
                (key, r)
            }));
        }
        let mut failed = false;
        for (key, r) in common::join_all(calls).await {
            match r {
                Ok(v) => {
                    sent.get_mut(&key).unwrap().3 = Some(v["id"].as_u64().expect("an id"));
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Amounts are small and balances start at 1,000, but a
                // run of debits can still empty an account.
                Err(e) if e.code() == Some("insufficient_funds") => {}
                Err(_) => failed = true,
            }
        }
        if failed || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return sent;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_transfers_survive_five_kills_of_the_leader() {
    let mut cluster = Cluster::start(3);
    let (leader, token, admin) = cluster.open_bank(ACCOUNTS).await;
    drop(admin);

    // A follower refuses the ledger and names the leader.
    let follower = *cluster.members.keys().find(|&&id| id != leader).unwrap();
    let f = cluster.admin(follower, &token).await;
    let e = f.balance(Some(&account(0))).await.unwrap_err();
    assert_eq!(e.code(), Some("not_leader"), "{e}");
    let h = hello(cluster.members[&follower].client).await.unwrap();
    assert_eq!(h["role"], "follower", "{h}");
    assert_eq!(h["leader"], cluster.members[&leader].client.to_string(), "{h}");
    assert_eq!(h["node"], follower, "{h}");
    drop(f);

    let mut all = Sent::new();
    let mut leader = leader;
    for round in 0..5 {
        let token = admin_token(cluster.members[&leader].client).await;
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let addr = cluster.members[&leader].client;
                let never = Arc::new(std::sync::atomic::AtomicBool::new(false));
                tokio::spawn(worker(addr, token.clone(), format!("r{round}w{w}"), 16, acked.clone(), never))
            })
            .collect();
        // Kill the leader once the workers are well under way.
        let deadline = Instant::now() + WAIT;
        while acked.load(std::sync::atomic::Ordering::Relaxed) < 300 {
            assert!(Instant::now() < deadline, "round {round}: the workers made no progress\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.members.get_mut(&leader).unwrap().kill9();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        let killed = leader;
        leader = cluster.leader().await;
        assert_ne!(leader, killed);
        cluster.members.get_mut(&killed).unwrap().spawn();
    }

    // Settle every transfer whose answer was lost: the same key again, at
    // the leader, answers with the original record if it was applied.
    let leader = cluster.leader().await;
    let token = admin_token(cluster.members[&leader].client).await;
    let admin = cluster.admin(leader, &token).await;
    let mut acknowledged = 0;
    for (key, (from, to, amount, id)) in &all {
        let again = admin.transfer(Some(&account(*from)), &account(*to), *amount, Some(key)).await;
        match (id, again) {
            (Some(id), Ok(v)) => {
                assert_eq!(v["id"].as_u64(), Some(*id), "key {key}: a replay gives the acknowledged record");
                acknowledged += 1;
            }
            (None, Ok(_)) => {}
            (_, Err(e)) if e.code() == Some("insufficient_funds") => {
                assert!(id.is_none(), "key {key}: acknowledged, then refused on replay");
            }
            (_, Err(e)) => panic!("key {key}: {e}"),
        }
    }
    assert!(acknowledged >= 5 * 300, "acknowledged {acknowledged}");
    for (key, (from, to, amount, id)) in &all {
        if let Some(id) = id {
            let t = admin.call("get_transfer", json!({ "id": id })).await.expect("an acknowledged transfer");
            assert_eq!(
                (t["from"].as_str(), t["to"].as_str(), t["amount"].as_i64()),
                (Some(account(*from).as_str()), Some(account(*to).as_str()), Some(*amount)),
                "key {key}"
            );
        }
    }
    let mut total = 0;
    for i in 0..ACCOUNTS {
        let b = common::balance(&admin, &account(i)).await;
        assert!(b >= 0, "{} is {b}", account(i));
        total += b;
    }
    assert_eq!(total, EACH * ACCOUNTS as i64);
    let head = common::audit_ok(&admin).await;

    // Every member ends at the same head.
    cluster.agree_on(&token, &head).await;
}

/// Transfers `n` units from bank-0 to bank-1 at `leader`, each keyed.
async fn pay(c: &Client, n: usize, tag: &str) {
    for i in 0..n {
        c.transfer(Some(&account(0)), &account(1), 1, Some(&format!("{tag}-{i}"))).await.expect("a transfer");
    }
}

/// A keyed write whose answer timed out, and whose resend found no leader
/// within the client's patience, may have been applied: the client says
/// `unknown_outcome`, never `unavailable` (which says nothing changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_whose_answer_timed_out_is_an_unknown_outcome() {
    let cluster = Cluster::start(3);
    let (_, token, _admin) = cluster.open_bank(2).await;
    let members = cluster.members.values().map(|m| m.client.to_string()).collect();
    let mut c = tally::client::ClusterClient::new(members).with_timeout(Some(Duration::from_secs(2)));
    c.auth(token);
    // Bound to the leader by a read; then no member answers anyone.
    let b = c.call("balance", json!({"account": account(0)})).await.expect("a balance from the leader");
    assert_eq!(b["balance"], EACH);
    c.patience = Duration::from_millis(500);
    cluster.members.values().for_each(|m| m.signal("-STOP"));
    let t = json!({"from": account(0), "to": account(1), "amount": 1, "key": "timed-out"});
    let sent = tokio::time::timeout(WAIT, c.call("transfer", t)).await;
    cluster.members.values().for_each(|m| m.signal("-CONT"));
    let e = sent.expect("an answer within the client's own bounds").expect_err("no answer from stopped members");
    assert_eq!(e.code(), Some("unknown_outcome"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_once_resumed_accepts_no_write_as_leader() {
    let cluster = Cluster::start(3);
    // A connection made while it led, used once it no longer does.
    let (old, token, stale) = cluster.open_bank(2).await;
    cluster.members[&old].signal("-STOP");
    let paused = Instant::now();
    // The paused member cannot answer hello, so only the others count.
    let new = cluster.leader_without(Some(old)).await;
    eprintln!("a new leader ({new}) {} ms after the pause", paused.elapsed().as_millis());
    // Through a client that follows the leader among the other two: on a
    // loaded machine leadership may move once more between them (the
    // ledger of a member that stops leading closes its connections).
    let others = cluster.members.iter().filter(|(id, _)| **id != old).map(|(_, m)| m.client.to_string()).collect();
    let mut admin = tally::client::ClusterClient::new(others);
    admin.patience = WAIT;
    admin.auth(token.clone());
    for i in 0..10 {
        let args = json!({"from": account(0), "to": account(1), "amount": 1, "key": format!("after-pause-{i}")});
        admin.call("transfer", args).await.unwrap_or_else(|e| panic!("transfer {i}: {e}"));
    }

    cluster.members[&old].signal("-CONT");
    // The old leader's next write is refused, whatever it believed.
    let e = stale.transfer(Some(&account(0)), &account(1), 100, Some("from-the-old-leader")).await.unwrap_err();
    assert!(
        matches!(e.code(), Some("not_leader" | "unavailable" | "unknown_outcome")) || matches!(e, ClientError::Closed),
        "{e}"
    );
    // ...and nothing of it reached the ledger: 10 units moved, not 110.
    let b = admin.call("balance", json!({"account": account(1)})).await.expect("balance");
    assert_eq!(b["balance"], EACH + 10);
    // The old leader follows, and refuses a write naming the leader its
    // `hello` names. A connection the member accepted just as its ledger
    // restarted (it stopped leading, or leadership moved once more on a
    // loaded machine) is closed, and a hint may name a leader that has
    // just changed: ask again until both agree.
    let deadline = Instant::now() + WAIT;
    loop {
        let h = hello(cluster.members[&old].client).await.unwrap_or_default();
        if let (true, Some(named)) = (h["role"] == "follower", h["leader"].as_str()) {
            assert!(cluster.members.iter().any(|(id, m)| *id != old && m.client.to_string() == named), "{h}");
            let refused = async {
                let c = Client::connect(cluster.members[&old].client).await.ok()?;
                c.call("auth", json!({ "token": token })).await.ok()?;
                Some(c.transfer(Some(&account(0)), &account(1), 100, None).await)
            };
            match refused.await {
                Some(Ok(r)) => panic!("the old leader took a write: {r:?}"),
                Some(Err(e)) if e.code() == Some("not_leader") && e.leader() == Some(named) => break,
                Some(Err(e)) => assert!(e.code() == Some("not_leader") || matches!(e, ClientError::Closed), "{e}"),
                None => {}
            }
        }
        assert!(Instant::now() < deadline, "the old leader does not follow: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A leader answers a read only once a majority confirms, after the read
/// arrived, that it still leads (the read index): with its followers
/// paused, nothing it holds is served as current, however recently they
/// answered. A lease would still serve it for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_followers_stopped_answers_no_read_until_a_majority_confirms_it() {
    let cluster = Cluster::start(3);
    let (leader, token, admin) = cluster.open_bank(2).await;
    pay(&admin, 3, "before").await;
    assert_eq!(common::balance(&admin, &account(1)).await, EACH + 3);
    let followers: Vec<u64> = cluster.members.keys().copied().filter(|id| *id != leader).collect();
    for id in &followers {
        cluster.members[id].signal("-STOP");
    }
    // Pipelined reads of kinds the read index guards, sent at once.
    let args = json!({"account": account(1)});
    let answers = tokio::join!(
        admin.call("balance", args.clone()),
        admin.call("account", args.clone()),
        admin.call("history", args),
        admin.call("list_accounts", json!({})),
        admin.call("stats", json!({})),
    );
    let answers = [("balance", answers.0), ("account", answers.1), ("history", answers.2)]
        .into_iter()
        .chain([("list_accounts", answers.3), ("stats", answers.4)]);
    for (op, answer) in answers {
        let e = answer.expect_err(op);
        assert_eq!(e.code(), Some("unavailable"), "{op}: {e}");
    }

    for id in &followers {
        cluster.members[id].signal("-CONT");
    }
    // Once they answer again, the leader (this one, or one after it)
    // serves reads.
    let now = cluster.leader().await;
    let admin = cluster.admin(now, &token).await;
    assert_eq!(common::balance(&admin, &account(1)).await, EACH + 3);
}

/// A follower that stops answering makes openraft log an error for every
/// read round and heartbeat it misses: the leader writes one line per
/// openraft source line a while, not one per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_follower_does_not_flood_the_leaders_log() {
    let cluster = Cluster::start(3);
    let (leader, _token, admin) = cluster.open_bank(2).await;
    let follower = cluster.members.keys().copied().find(|id| *id != leader).unwrap();
    let before = cluster.members[&leader].log().len();
    cluster.members[&follower].signal("-STOP");
    // Each read waits for a round of its own; the other follower makes
    // the majority.
    for _ in 0..300 {
        assert_eq!(common::balance(&admin, &account(1)).await, EACH);
    }
    let log = cluster.members[&leader].log();
    cluster.members[&follower].signal("-CONT");
    let openraft: Vec<&str> = log[before..].lines().filter(|l| l.contains("openraft")).collect();
    // Logged once, now or within the 10 s before.
    assert!(log.contains("confirming leadership"), "the missed rounds were not logged at all");
    assert!(openraft.len() <= 30, "{} openraft lines for 300 reads:\n{}", openraft.len(), openraft.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_data_was_wiped_catches_up_through_a_snapshot() {
    // Snapshots every 10 entries, so the log the wiped member would need
    // is gone and only a snapshot can bring it back.
    let mut cluster = Cluster::start_with(3, "snapshot_every = 10");
    let (leader, token, mut admin) = cluster.open_bank(2).await;
    // Member 1, the one that formed the cluster: with its data gone it must
    // not form another.
    let wiped = 1;
    cluster.members.get_mut(&wiped).unwrap().kill9();
    if leader == wiped {
        admin = cluster.admin(cluster.leader().await, &token).await;
    }
    pay(&admin, 40, "while-away").await;
    std::fs::remove_dir_all(&cluster.members[&wiped].data).unwrap();
    cluster.members.get_mut(&wiped).unwrap().spawn();
    pay(&admin, 5, "after-return").await;
    let head = common::audit_ok(&admin).await;
    assert_eq!(head["transfers"], 2 + 45);
    cluster.agree_on(&token, &head).await;
    let log = cluster.members[&wiped].log();
    assert!(log.contains("installed a snapshot"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_and_another_leaves_under_load() {
    let mut cluster = Cluster::start(3);
    let (leader, token, admin) = cluster.open_bank(ACCOUNTS).await;
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(worker(
        cluster.members[&leader].client,
        token.clone(),
        "steady".into(),
        8,
        acked.clone(),
        stop.clone(),
    ));

    let (client, raft) = cluster.join(4);
    let r = admin
        .call("add_node", json!({"id": 4, "client": client.to_string(), "raft": raft.to_string()}))
        .await
        .expect("add_node");
    assert_eq!(r["voters"], json!([1, 2, 3, 4]));
    let gone = *cluster.members.keys().find(|&&id| id != leader && id != 4).unwrap();
    let r = admin.call("remove_node", json!({"id": gone})).await.expect("remove_node");
    let mut voters: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&id| id != gone).collect();
    voters.sort_unstable();
    assert_eq!(r["voters"], json!(voters));
    // Not a voter any more: refused, and the change is idempotent-safe.
    let e = admin.call("remove_node", json!({"id": gone})).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"), "{e}");
    cluster.members.get_mut(&gone).unwrap().kill9();
    cluster.members.remove(&gone);

    // The writer never stopped; stop it once it has gone on a little.
    let before = acked.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while acked.load(std::sync::atomic::Ordering::Relaxed) < before + 100 {
        assert!(Instant::now() < deadline, "no progress after the change\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Its last requests are answered before it returns.
    load.await.unwrap();
    let h = hello(client).await.unwrap();
    assert_eq!((h["role"].as_str(), h["node"].as_u64()), (Some("follower"), Some(4)), "{h}");
    assert_eq!(h["leader"], cluster.members[&leader].client.to_string());

    let head = common::audit_ok(&admin).await;
    cluster.agree_on(&token, &head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_follows_the_leader_and_resends_only_keyed_writes() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader().await;
    let token = admin_token(cluster.members[&leader].client).await;
    let addrs = cluster.members.values().map(|m| m.client.to_string()).collect();
    let mut client = tally::client::ClusterClient::new(addrs);
    client.patience = WAIT;
    client.auth(token);
    for i in 0..2 {
        client.call("create_account", json!({"account": account(i), "initial": EACH})).await.expect("create");
    }
    // The leader dies halfway through; every keyed transfer is answered,
    // and each is applied exactly once.
    for i in 0..40 {
        if i == 20 {
            cluster.members.get_mut(&leader).unwrap().kill9();
        }
        let args = json!({"from": account(0), "to": account(1), "amount": 1, "key": format!("follow-{i}")});
        client.call("transfer", args).await.unwrap_or_else(|e| panic!("transfer {i}: {e}"));
    }
    let b = client.call("balance", json!({"account": account(1)})).await.expect("balance");
    assert_eq!(b["balance"], EACH + 40);
    assert_ne!(cluster.leader().await, leader);
}

/// A proxy in front of one member's client port that can end the
/// connections it carries with a reset. A member closes a connection with
/// a FIN, after which a client's next request still leaves; after a reset
/// it cannot. On loopback the reset reaches the client's socket before the
/// proxy's `close` returns, so once [`ClientProxy::cut`] returns, the
/// client's next write on that connection fails, if its reader has not
/// already seen the connection end.
struct ClientProxy {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections being carried now.
    live: Arc<tokio::sync::watch::Sender<usize>>,
    cut: tokio::sync::watch::Sender<u64>,
    /// Reset the connection to which the member answers next, the answer
    /// not passed on: the request was applied and its answer lost.
    lose_answer: Arc<std::sync::atomic::AtomicBool>,
}

/// One connection carried: counted in `live` until it ends.
struct Carried(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl ClientProxy {
    async fn start(real: SocketAddr) -> ClientProxy {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, watch) = tokio::sync::watch::channel(0u64);
        let live = Arc::new(tokio::sync::watch::channel(0usize).0);
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let lose_answer = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, carried, losing) = (accepted.clone(), live.clone(), lose_answer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                count.fetch_add(1, SeqCst);
                carried.send_modify(|n| *n += 1);
                let carried = Carried(carried.clone());
                // A cut sent before this connection was accepted does not end it.
                let mut watch = watch.clone();
                watch.borrow_and_update();
                let lose = losing.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(real).await else {
                        drop(inbound);
                        drop(carried);
                        return;
                    };
                    let reset = {
                        let (mut from_client, mut to_client) = inbound.split();
                        let (mut from_member, mut to_member) = outbound.split();
                        let down = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = from_member.read(&mut buf).await.unwrap_or(0);
                                if n == 0 {
                                    return false;
                                }
                                if lose.swap(false, SeqCst) {
                                    return true;
                                }
                                if to_client.write_all(&buf[..n]).await.is_err() {
                                    return false;
                                }
                            }
                        };
                        tokio::select! {
                            reset = down => reset,
                            _ = tokio::io::copy(&mut from_client, &mut to_member) => false,
                            r = watch.changed() => r.is_ok(),
                        }
                    };
                    if reset {
                        // Deprecated as blocking the thread on close, which
                        // a zero linger never does: it resets at once.
                        #[allow(deprecated)]
                        inbound.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
                    }
                    // Closed (and reset) before it counts as ended.
                    drop(inbound);
                    drop(carried);
                });
            }
        });
        ClientProxy { addr, accepted, live, cut, lose_answer }
    }

    /// Resets every connection it carries, and returns once they are. No
    /// connection may arrive meanwhile: one accepted as the cut is sent
    /// may not be reset, and the wait would then run out.
    async fn cut(&self) {
        let mut live = self.live.subscribe();
        self.cut.send_modify(|g| *g += 1);
        let none = tokio::time::timeout(WAIT, live.wait_for(|&n| n == 0)).await;
        none.expect("the connections reset in time").expect("the proxy runs");
    }

    /// Loses the next answer the member sends (see `lose_answer`).
    fn lose_next_answer(&self) {
        self.lose_answer.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A cluster with two accounts of [`EACH`], a proxy in front of its
    /// leader, a cluster client given only the proxy and bound to the
    /// leader through it by a read, and an admin connection to the leader.
    async fn bound() -> (Cluster, ClientProxy, tally::client::ClusterClient, Client) {
        let cluster = Cluster::start(3);
        let (leader, token, admin) = cluster.open_bank(2).await;
        let proxy = ClientProxy::start(cluster.members[&leader].client).await;
        let mut client = tally::client::ClusterClient::new(vec![proxy.addr.to_string()]);
        client.patience = WAIT;
        client.auth(token);
        let b = client.call("balance", json!({"account": account(1)})).await.expect("a balance through the proxy");
        assert_eq!(b["balance"], EACH);
        (cluster, proxy, client, admin)
    }
}

/// A call on a connection that ended before the call began never left,
/// so it goes again on a new connection, an unkeyed write too, and is
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_never_sent_on_an_ended_connection_goes_again_on_a_new_one() {
    let (_cluster, proxy, client, admin) = ClientProxy::bound().await;
    proxy.cut().await;
    let before = proxy.accepted();
    let t = json!({"from": account(0), "to": account(1), "amount": 7});
    let r = client.call("transfer", t).await.expect("the unkeyed transfer, sent on a new connection");
    assert_eq!((r["from_balance"].as_i64(), r["to_balance"].as_i64()), (Some(EACH - 7), Some(EACH + 7)), "{r}");
    assert!(proxy.accepted() > before, "sent on a new connection");
    let b = admin.call("balance", json!({"account": account(1)})).await.expect("a balance at the leader");
    assert_eq!(b["balance"], EACH + 7);
}

/// A write whose answer was lost may have been applied: an unkeyed one is
/// `unknown_outcome` and not sent again, a keyed one is sent again, and
/// its key makes the resend answer with the first send's record. Here
/// both first sends were applied, so a resend of either shows in the
/// balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_sent_again_only_with_its_key() {
    let (_cluster, proxy, client, admin) = ClientProxy::bound().await;
    let admin = &admin;
    let balance = move |c: &'static str| async move {
        let b = admin.call("balance", json!({"account": account(1)})).await.expect(c);
        b["balance"].as_i64().expect("a balance")
    };
    // Bound to the leader, so the next answer is the transfer's.
    proxy.lose_next_answer();
    let t = json!({"from": account(0), "to": account(1), "amount": 7});
    let e = client.call("transfer", t).await.expect_err("the answer was lost");
    assert_eq!(e.code(), Some("unknown_outcome"), "{e}");
    assert_eq!(balance("a balance at the leader").await, EACH + 7, "applied once, not sent again");

    let b = client.call("balance", json!({"account": account(1)})).await.expect("a balance on a new connection");
    assert_eq!(b["balance"], EACH + 7);
    let before = proxy.accepted();
    proxy.lose_next_answer();
    let t = json!({"from": account(0), "to": account(1), "amount": 5, "key": "lost-once"});
    let r = client.call("transfer", t).await.expect("the keyed transfer, sent again");
    assert_eq!((r["amount"].as_i64(), r["key"].as_str()), (Some(5), Some("lost-once")), "{r}");
    assert!(proxy.accepted() > before, "sent again on a new connection");
    assert_eq!(balance("a balance at the leader").await, EACH + 12, "applied once");
}

/// A fault-injecting network between members: a proxy in front of each
/// member's Raft port. Member `i` listens on 127.0.0.(10+i) and dials from
/// that address, so a proxy knows which member is calling; connections
/// between members that are cut off from each other are closed, old and new.
struct Partition {
    cut: Arc<std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Partition {
    /// Cuts `id` off from every other member, both ways.
    fn isolate(&self, id: u64, n: u64) {
        let mut cut = self.cut.lock().unwrap();
        for other in (1..=n).filter(|&o| o != id) {
            cut.insert((id, other));
            cut.insert((other, id));
        }
        drop(cut);
        self.changed.send_modify(|g| *g += 1);
    }

    fn heal(&self) {
        self.cut.lock().unwrap().clear();
        self.changed.send_modify(|g| *g += 1);
    }
}

/// Forwards connections to member `target` at `real`, unless cut.
async fn proxy(
    listener: tokio::net::TcpListener,
    target: u64,
    real: SocketAddr,
    cut: Arc<std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>>>,
    changed: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        let Ok((mut inbound, peer)) = listener.accept().await else { return };
        let std::net::IpAddr::V4(ip) = peer.ip() else { continue };
        let from = u64::from(ip.octets()[3]) - 10;
        let is_cut = {
            move |cut: &std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>>| {
                cut.lock().unwrap().contains(&(from, target))
            }
        };
        if is_cut(&cut) {
            continue;
        }
        let (cut, mut changed) = (cut.clone(), changed.clone());
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(real).await else { return };
            let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
            tokio::pin!(copy);
            loop {
                tokio::select! {
                    _ = &mut copy => return,
                    r = changed.changed() => if r.is_err() || is_cut(&cut) { return },
                }
            }
        });
    }
}

impl Cluster {
    /// `n` members behind a [`Partition`].
    async fn start_partitionable(n: u64) -> (Cluster, Partition) {
        let cut = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let (changed, watch) = tokio::sync::watch::channel(0);
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let ip = format!("127.0.0.{}", 10 + id);
            let real = std::net::TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap();
            let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.insert(id, (free_port(), front.local_addr().unwrap(), Some(real)));
            tokio::spawn(proxy(front, id, real, cut.clone(), watch.clone()));
        }
        (Self::start_on(addrs, ""), Partition { cut, changed })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_refuses_writes_while_the_majority_goes_on_and_all_agree_after() {
    let (cluster, net) = Cluster::start_partitionable(3).await;
    let (old, token, admin) = cluster.open_bank(2).await;
    pay(&admin, 5, "before").await;

    net.isolate(old, 3);
    // The majority elects a leader of its own (the old one may still think
    // it leads: nobody can tell it otherwise).
    let new = cluster.leader_without(Some(old)).await;
    let majority = cluster.admin(new, &token).await;
    pay(&majority, 10, "majority").await;
    // The minority serves no stale read (it still has the old balance)...
    let e = admin.balance(Some(&account(1))).await.unwrap_err();
    assert!(matches!(e.code(), Some("unavailable" | "not_leader")), "{e}");
    // ...not even one asked for as stale: it follows no leader.
    let deadline = Instant::now() + WAIT;
    let e = loop {
        let c = cluster.admin(old, &token).await;
        match c.call("balance", json!({"account": account(1), "consistency": "stale"})).await {
            // It stood down as leader meanwhile, closing its connections.
            Err(ClientError::Closed | ClientError::Io(_)) if Instant::now() < deadline => continue,
            other => break other.expect_err("a stale read from a member cut off"),
        }
    };
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    // ...refuses writes, and nothing of what it was asked is applied.
    let e = admin.transfer(Some(&account(0)), &account(1), 100, Some("minority")).await.unwrap_err();
    assert!(matches!(e.code(), Some("unavailable" | "not_leader" | "unknown_outcome")), "{e}");
    assert_eq!(common::balance(&majority, &account(1)).await, EACH + 15);

    net.heal();
    let head = common::audit_ok(&majority).await;
    cluster.agree_on(&token, &head).await;
    let h = hello(cluster.members[&old].client).await.unwrap();
    assert_eq!(h["role"], "follower", "{h}");
    // The refused transfer was never applied anywhere.
    assert_eq!(common::balance(&majority, &account(1)).await, EACH + 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_admin_password_survives_restarts_and_host_commands_refuse_a_members_folder() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader().await;
    let c = Client::connect(cluster.members[&leader].client).await.unwrap();
    c.login("admin", ADMIN_PASSWORD).await.unwrap();
    let new = "the admin's new password, changed through the leader";
    c.call("change_password", json!({"old_password": ADMIN_PASSWORD, "new_password": new})).await.unwrap();
    let ids: Vec<u64> = cluster.members.keys().copied().collect();
    for id in &ids {
        cluster.members.get_mut(id).unwrap().kill9();
    }
    // A host command on a member's folder would change that member alone.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["admin", "create-key", "--name", "shop", "--role", "operator", "--data"])
        .arg(&cluster.members[&ids[0]].data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to a cluster member"), "{out:?}");
    // Every member starts again with the old password in its configuration:
    // none of them brings it back.
    for id in &ids {
        cluster.members.get_mut(id).unwrap().spawn();
    }
    let leader = cluster.leader().await;
    let c = Client::connect(cluster.members[&leader].client).await.unwrap();
    let e = c.login("admin", ADMIN_PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthenticated"), "{e}");
    c.login("admin", new).await.expect("the changed password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_at_the_leader_stops_working_on_every_member() {
    let cluster = Cluster::start(3);
    let (leader, _token, admin) = cluster.open_bank(0).await;
    let key = admin.call("create_key", json!({"name": "shop", "role": "auditor"})).await.expect("create_key");
    let secret = key["secret"].as_str().unwrap().to_owned();
    let follower = *cluster.members.keys().find(|&&id| id != leader).unwrap();
    let auth_at = |id: u64| {
        let (addr, secret) = (cluster.members[&id].client, secret.clone());
        async move {
            let c = Client::connect(addr).await.unwrap();
            c.call("auth", json!({ "key": secret })).await
        }
    };
    // The follower learns of the key from the log...
    let deadline = Instant::now() + WAIT;
    while auth_at(follower).await.is_err() {
        assert!(Instant::now() < deadline, "the follower never accepts the new key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and of its revocation.
    admin.call("revoke_key", json!({"key_id": key["key_id"]})).await.expect("revoke_key");
    let deadline = Instant::now() + WAIT;
    loop {
        match auth_at(follower).await {
            Err(e) if e.code() == Some("unauthenticated") => break,
            other => assert!(Instant::now() < deadline, "the follower still takes the revoked key: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A follower answers `balance`, `account`, `history` and `get_transfer`
/// with `consistency = "stale"` from what it has applied, with the
/// leader's rules for who sees what; without it, and for any write, it
/// names the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_stale_reads_from_what_it_applied_and_refuses_the_rest() {
    let cluster = Cluster::start(3);
    let (leader, token, admin) = cluster.open_bank(2).await;
    let user =
        json!({"user": "ann", "role": "user", "name": "Ann", "email": "ann@example.com", "password": "ann-password-1"});
    admin.call("create_user", user).await.expect("create_user");
    admin.call("mint", json!({"to": "ann", "amount": 40})).await.expect("mint");
    let paid =
        admin.call("transfer", json!({"from": "bank-0", "to": "bank-1", "amount": 300})).await.expect("transfer");
    let held = admin.call("hold", json!({"from": "bank-0", "to": "bank-1", "amount": 50})).await.expect("hold");

    let follower = *cluster.members.keys().find(|&&id| id != leader).unwrap();
    let at = cluster.admin(follower, &token).await;
    let stale = |args: Value| {
        let mut args = args;
        args["consistency"] = json!("stale");
        args
    };
    // Without it: the leader's address.
    let e = at.call("balance", json!({"account": "bank-0"})).await.unwrap_err();
    assert_eq!(e.code(), Some("not_leader"), "{e:?}");
    // A write asking for a stale answer is still the leader's.
    let e = at.call("transfer", stale(json!({"from": "bank-0", "to": "bank-1", "amount": 1}))).await.unwrap_err();
    assert_eq!(e.code(), Some("not_leader"), "{e:?}");

    // The follower applies the hold a little after the leader answered it.
    let deadline = Instant::now() + WAIT;
    let balance = loop {
        let b = at.call("balance", stale(json!({"account": "bank-0"}))).await.expect("stale balance");
        if b["held"] == 50 {
            break b;
        }
        assert!(Instant::now() < deadline, "the follower never applies the hold: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // As of the hold's record, the last one: every answer says so.
    let last = held["transfer"]["id"].clone();
    assert!(last.as_u64().is_some_and(|id| id > paid["id"].as_u64().unwrap()), "{held}");
    assert_eq!(balance, json!({"account": "bank-0", "balance": 700, "held": 50, "available": 650, "as_of": last}));
    // Every read answers what the leader does, as of the same entries.
    for (op, args) in [
        ("account", json!({"account": "bank-1"})),
        ("history", json!({"account": "bank-0", "limit": 10})),
        ("history", json!({"account": "bank-0", "limit": 1, "after": paid["id"]})),
        ("get_transfer", json!({"id": paid["id"]})),
    ] {
        let mut want = admin.call(op, args.clone()).await.expect(op);
        assert!(want.get("as_of").is_none(), "the leader's answer is current: {want}");
        if op != "get_transfer" {
            want["as_of"] = last.clone();
        }
        assert_eq!(at.call(op, stale(args)).await.expect(op), want, "{op}");
    }

    // A user sees their own account there, and nobody else's.
    let ann = Client::connect(cluster.members[&follower].client).await.unwrap();
    let t = Client::connect(cluster.members[&leader].client).await.unwrap();
    let ann_token = t.login("ann", "ann-password-1").await.expect("ann logs in at the leader")["token"].clone();
    ann.call("auth", json!({"token": ann_token})).await.expect("auth at the follower");
    let mine = ann.call("balance", stale(json!({}))).await.expect("ann's own balance");
    assert_eq!(mine, json!({"account": "ann", "balance": 40, "held": 0, "available": 40, "as_of": last}));
    let e = ann.call("balance", stale(json!({"account": "bank-0"}))).await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e:?}");
    let e = ann.call("get_transfer", stale(json!({"id": paid["id"]}))).await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e:?}");
    let e = at.call("balance", stale(json!({"account": "nobody"}))).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"), "{e:?}");
    // An admin-only op stays refused, stale or not.
    let e = ann.call("list_accounts", stale(json!({}))).await.unwrap_err();
    assert_eq!(e.code(), Some("not_leader"), "{e:?}");

    // `tally call` given every member, followers first, finds the leader.
    let mut order: Vec<u64> = cluster.members.keys().copied().filter(|&id| id != leader).collect();
    order.push(leader);
    let members: Vec<String> = order.iter().map(|id| cluster.members[id].client.to_string()).collect();
    let cli = |password: &str, op: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["call", "--connect", &members.join(","), "--user", "admin"])
            .args(op)
            .env("TALLY_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = cli(ADMIN_PASSWORD, &["transfer", "from=bank-1", "to=bank-0", "amount=5", "key=cli-1"]);
    assert!(out.status.success(), "{out:?}");
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&record["from"], &record["to"], &record["amount"]), (&json!("bank-1"), &json!("bank-0"), &json!(5)));
    let b = admin.call("balance", json!({"account": "bank-1"})).await.unwrap();
    assert_eq!(b["balance"], 1_295);
    let out = cli("not the password", &["balance", "account=bank-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("login failed"), "{out:?}");
}

/// A member's stop closes its ledger and its log before the process frees
/// its memory (seconds with millions of accounts), so that a kill in that
/// time (a container's stop timeout) leaves no file open for redb to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_with_sigterm_closes_both_files_before_it_exits() {
    let mut cluster = Cluster::start(3);
    let (leader, token, admin) = cluster.open_bank(2).await;
    pay(&admin, 5, "before-stop").await;
    drop(admin);
    // The leader: its journal stops, then Raft, then its state machine.
    stopped_clean(cluster.members.get_mut(&leader).unwrap()).await;
    let next = cluster.leader().await;
    let admin = cluster.admin(next, &token).await;
    pay(&admin, 3, "after-stop").await;
    let head = common::audit_ok(&admin).await;
    assert_eq!(head["transfers"], 2 + 5 + 3);
    drop(admin);
    // A follower: no journal; its state machine wrote its ledger.
    let follower = *cluster.members.keys().find(|&&id| id != leader && id != next).unwrap();
    stopped_clean(cluster.members.get_mut(&follower).unwrap()).await;
    // Both come back with everything.
    for id in [leader, follower] {
        cluster.members.get_mut(&id).unwrap().spawn();
    }
    cluster.agree_on(&token, &head).await;
}

/// Sends the member SIGTERM, waits until it says both its files are
/// closed, kills it at once (as a container's stop timeout would) and
/// checks that neither file was left open.
async fn stopped_clean(m: &mut Member) {
    m.signal("-TERM");
    let deadline = Instant::now() + WAIT;
    while !["database closed", "raft log closed"].iter().all(|l| m.log().contains(l)) {
        assert!(Instant::now() < deadline, "member {} did not close its files:\n{}", m.id, m.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.kill9();
    // The state-machine worker let go of its copy: the stop did not wait out its bound.
    assert!(!m.log().contains("had not run what Raft queued in time"), "{}", m.log());
    for file in ["tally.redb", "raft.redb"] {
        assert!(!common::left_open(&m.data.join(file)), "member {}'s {file} was left open", m.id);
    }
}

/// A member whose ledger is behind the start of its own Raft log (an
/// older ledger file put back, or a snapshot install cut short: openraft
/// purges the log as it queues the install) refuses to start, saying why
/// and what to do; started with an empty folder, it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_ledger_is_behind_its_log_says_so_and_comes_back_emptied() {
    let mut cluster = Cluster::start_with(3, "snapshot_every = 10");
    let (leader, token, admin) = cluster.open_bank(2).await;
    let behind = *cluster.members.keys().find(|&&id| id != leader).unwrap();
    let old = cluster._dir.path().join("older-ledger.redb");
    let m = cluster.members.get_mut(&behind).unwrap();
    m.kill9();
    std::fs::copy(m.data.join("tally.redb"), &old).unwrap();
    let (_, last_then) = log_range(&m.data);
    let last_then = last_then.expect("the member's log holds entries");
    // Transfers until the member has snapshotted and purged its log past
    // everything the older file could have applied.
    let deadline = Instant::now() + WAIT;
    let mut paid = 0;
    loop {
        cluster.members.get_mut(&behind).unwrap().spawn();
        pay(&admin, 20, &format!("round-{paid}")).await;
        paid += 20;
        let head = common::audit_ok(&admin).await;
        cluster.agree_on(&token, &head).await;
        let m = cluster.members.get_mut(&behind).unwrap();
        m.kill9();
        if log_range(&m.data).0.is_some_and(|first| first > last_then + 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the member's log was not purged past entry {last_then}");
    }
    let m = cluster.members.get_mut(&behind).unwrap();
    std::fs::copy(&old, m.data.join("tally.redb")).unwrap();
    let mut child = m.command().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the member with an older ledger did not stop within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("cannot catch up from it") && err.contains("start it with an empty one"), "{err}");
    // Emptied, it comes back through a snapshot with everything.
    std::fs::remove_dir_all(&m.data).unwrap();
    m.spawn();
    let head = common::audit_ok(&admin).await;
    assert_eq!(head["transfers"], 2 + paid);
    cluster.agree_on(&token, &head).await;
}

/// The first and last entry indexes held in a stopped member's Raft log.
fn log_range(data: &std::path::Path) -> (Option<u64>, Option<u64>) {
    use redb::{ReadableDatabase, ReadableTable};
    let db = redb::Database::open(data.join("raft.redb")).expect("the log opens");
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("raft_log")).unwrap();
    let first = table.first().unwrap().map(|(k, _)| k.value());
    let last = table.last().unwrap().map(|(k, _)| k.value());
    (first, last)
}
