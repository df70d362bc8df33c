//! Load harness: drives a Tally server over TCP and reports throughput and
//! latency percentiles (measured from send to reply).
//!
//! ```text
//! cargo bench --bench load -- --spawn --accounts 100000 --connections 64 --pipeline 64 --duration 10
//! cargo bench --bench load -- --connect 127.0.0.1:7707 --user admin   # TALLY_PASSWORD in the env
//! cargo bench --bench load -- --spawn --tls   # over TLS, with certificates made for the run
//! cargo bench --bench load -- --spawn --batch 1000 --pipeline 4   # transfer_batch requests
//! cargo bench --bench load -- --spawn --rate 100000   # open loop: a fixed schedule
//! cargo bench --bench load -- --cluster 3 --failover   # 3 members; the leader killed halfway
//! cargo bench --bench load -- --connect ADDR1,ADDR2,ADDR3   # a running cluster: drives its leader
//! ```
//!
//! All flags: `cargo bench --bench load -- --help` (workloads, read mix,
//! `--json`, `--plot`, `--bin` to compare two server builds).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tally::client::Client;
use tally::tls::ClientTls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

// The tests' certificate maker; the harness uses only the server's part.
#[allow(dead_code)]
#[path = "../tests/common/pki.rs"]
mod pki;

const USAGE: &str = "\
usage: cargo bench --bench load -- [flags]

  --spawn               start a server of its own (temp data folder); the default
  --bin PATH            with --spawn: run this tally binary (compare two builds)
  --connect ADDR        drive a running server instead (password in TALLY_PASSWORD);
                        ADDR1,ADDR2,...: a cluster's members, the leader is driven
  --cluster N           start a cluster of N members of its own (temp folders, loopback)
  --failover            with --cluster: kill -9 the leader halfway; connections follow the
                        new leader; reports the longest time without an acknowledgement
  --user NAME           admin user for --connect (default admin)
  --tls                 speak TLS (with --spawn: certificates made for the run)
  --ca FILE             with --tls --connect: the CA to trust (default: system roots)
  --accounts N          funded accounts to create first (default 10000)
  --existing            the N accounts exist already (a server driven before): do not create them
  --duration S          seconds of load (default 10)
  --connections C       connections (default 64)
  --pipeline P          requests in flight per connection (default 64; closed loop)
  --batch N             send transfer_batch requests of N transfers (default: single transfers)
  --atomic              with --batch: atomic batches
  --keys                give every transfer an idempotency key
  --rate R              open loop: offer R transfers/s in all on a fixed schedule, whatever
                        the replies; latency counts from the scheduled send time, and
                        `sent after due` says how much of it is the harness's own lateness
  --workload W          uniform | zipf | hot (default uniform)
  --reads PCT           share of balance reads instead of transfers (default 0)
  --logins K            K users logging in over and over meanwhile
  --admin-ops           time bulk_add and a full list_accounts walk first
  --plot FILE.svg       latency over time and histogram
  --timeout S           the longest the harness waits for the server at any one step
                        (connecting, logging in, a call, a reply or a write on a load
                        connection; bulk_add and the audit that ends the run: at least
                        3600 s) before it ends the run with a message and exit status 1
                        (default 30)
  --json                the summary as one JSON object on the last line";

/// The same allocator as the server, so the load generator stays cheap.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Uniform,
    Zipf,
    Hot,
}

#[derive(Clone, Debug)]
struct Opts {
    connect: Option<String>,
    spawn: bool,
    /// The tally binary `--spawn` runs (to compare two builds side by side).
    bin: Option<String>,
    user: String,
    password: String,
    accounts: usize,
    duration_s: f64,
    connections: usize,
    pipeline: usize,
    workload: Workload,
    reads_pct: u32,
    logins: usize,
    admin_ops: bool,
    plot: Option<String>,
    json: bool,
    tls: bool,
    ca: Option<String>,
    /// Transfers per request (0: single `transfer` requests).
    batch: usize,
    atomic: bool,
    keys: bool,
    existing: bool,
    /// Transfers per second offered in all (open loop).
    rate: Option<f64>,
    /// Members of a cluster to start (0: none).
    cluster: usize,
    failover: bool,
    /// The longest wait for the server at any one step.
    timeout: Duration,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        connect: None,
        spawn: false,
        bin: None,
        user: "admin".into(),
        password: String::new(),
        accounts: 10_000,
        duration_s: 10.0,
        connections: 64,
        pipeline: 64,
        workload: Workload::Uniform,
        reads_pct: 0,
        logins: 0,
        admin_ops: false,
        plot: None,
        json: false,
        tls: false,
        ca: None,
        batch: 0,
        atomic: false,
        keys: false,
        existing: false,
        rate: None,
        cluster: 0,
        failover: false,
        timeout: Duration::from_secs(30),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--connect" => o.connect = Some(val()),
            "--spawn" => o.spawn = true,
            "--bin" => o.bin = Some(val()),
            "--user" => o.user = val(),
            "--accounts" => o.accounts = val().parse().expect("--accounts N"),
            "--duration" => o.duration_s = val().parse().expect("--duration S"),
            "--connections" => o.connections = val().parse().expect("--connections C"),
            "--pipeline" => o.pipeline = val().parse().expect("--pipeline P"),
            "--reads" => o.reads_pct = val().parse().expect("--reads PCT"),
            "--logins" => o.logins = val().parse().expect("--logins K"),
            "--admin-ops" => o.admin_ops = true,
            "--plot" => o.plot = Some(val()),
            "--workload" => {
                o.workload = match val().as_str() {
                    "uniform" => Workload::Uniform,
                    "zipf" => Workload::Zipf,
                    "hot" => Workload::Hot,
                    w => panic!("unknown workload {w}"),
                }
            }
            "--json" => o.json = true,
            "--tls" => o.tls = true,
            "--ca" => o.ca = Some(val()),
            "--batch" => o.batch = val().parse().expect("--batch N"),
            "--atomic" => o.atomic = true,
            "--keys" => o.keys = true,
            "--existing" => o.existing = true,
            "--rate" => o.rate = Some(val().parse().expect("--rate R")),
            "--cluster" => o.cluster = val().parse().expect("--cluster N"),
            "--failover" => o.failover = true,
            "--timeout" => {
                o.timeout = Duration::try_from_secs_f64(val().parse().expect("--timeout S"))
                    .ok()
                    .filter(|t| !t.is_zero() && *t <= Duration::from_secs(86_400))
                    .expect("--timeout S: a positive number of seconds, at most a day");
            }
            "--bench" => {} // passed by `cargo bench`
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown flag {other}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    if o.failover && o.cluster == 0 {
        eprintln!("--failover needs --cluster N (the harness kills a member it started)");
        std::process::exit(2);
    }
    if o.connect.is_none() && o.cluster == 0 {
        o.spawn = true;
    }
    // A spawned server has the harness's own password, whatever the
    // environment says (TALLY_PASSWORD is for --connect).
    o.password = if o.spawn || o.cluster > 0 {
        SPAWNED_PASSWORD.into()
    } else {
        std::env::var("TALLY_PASSWORD").unwrap_or_else(|_| SPAWNED_PASSWORD.into())
    };
    o
}

/// The admin password of a server the harness starts.
const SPAWNED_PASSWORD: &str = "bench-admin";

/// The server processes and data folders this run started. A run that
/// ends early ([`give_up`], or a panic, which aborts in the bench profile
/// without dropping anything) stops and removes them in [`clean_up`], so
/// it leaves no server behind holding a port, a core or a folder.
static STARTED: std::sync::Mutex<Started> = std::sync::Mutex::new(Started { pids: Vec::new(), dirs: Vec::new() });

struct Started {
    pids: Vec<u32>,
    dirs: Vec<std::path::PathBuf>,
}

fn started() -> std::sync::MutexGuard<'static, Started> {
    STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills a server the harness started and waits for it to end.
fn stop_server(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
    started().pids.retain(|&p| p != child.id());
}

/// Kills every server still running that this run started, and removes
/// their folders.
fn clean_up() {
    let mut s = started();
    for pid in s.pids.drain(..) {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    for dir in s.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Ends the run with `why` and exit status 1, leaving nothing it started.
fn give_up(why: &str) -> ! {
    eprintln!("{why}");
    clean_up();
    std::process::exit(1)
}

/// xorshift64*: fast, good enough to pick accounts.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn pick(rng: &mut Rng, w: Workload, n: usize) -> usize {
    match w {
        Workload::Uniform | Workload::Hot => rng.below(n),
        // P(rank <= k) = ln k / ln n: a Zipf-like skew with s = 1.
        Workload::Zipf => ((n as f64).powf(rng.unit()) as usize).saturating_sub(1).min(n - 1),
    }
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc
/// (Linux): a measure of cost per transfer that machine noise moves far
/// less than throughput.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count fields after its ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the first after the
    // name is field 3.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Starts a server; with `tls`, also on a TLS port with certificates made
/// in its temp folder. Returns the address to drive and the CA to trust.
fn spawn_server(bin: Option<&str>, tls: bool) -> (Child, String, Option<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(bin.unwrap_or(env!("CARGO_BIN_EXE_tally")));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .env("TALLY_AUTH_ADMIN_PASSWORD", SPAWNED_PASSWORD)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped());
    let ca = tls.then(|| {
        let pki = pki::Pki::make(dir.path());
        cmd.env("TALLY_TLS_LISTEN", "127.0.0.1:0")
            .env("TALLY_TLS_CERT", &pki.server_cert)
            .env("TALLY_TLS_KEY", &pki.server_key);
        pki.ca.display().to_string()
    });
    let mut child = cmd.spawn().expect("spawn tally");
    started().pids.push(child.id());
    started().dirs.push(dir.path().to_owned());
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let mut addr = line.trim().strip_prefix("tally listening on ").expect("listening line").to_owned();
    if tls {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let port = line.trim().rsplit_once(':').expect("TLS listening line").1.to_owned();
        // By name: the certificate names localhost.
        addr = format!("localhost:{port}");
    }
    (child, addr, ca, dir)
}

/// A cluster's members: their client addresses, and the processes the
/// harness started (`--cluster`).
struct Members {
    addrs: Vec<String>,
    children: Vec<Option<Child>>,
    _dir: Option<tempfile::TempDir>,
}

impl Members {
    fn pids(&self) -> Vec<String> {
        self.children.iter().flatten().map(|c| c.id().to_string()).collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            stop_server(&mut c);
        }
    }
}

/// Starts `n` members on loopback, each with its own folder.
fn spawn_cluster(n: usize, bin: Option<&str>) -> Members {
    let dir = tempfile::tempdir().expect("temp dir");
    started().dirs.push(dir.path().to_owned());
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let addrs: Vec<_> = (0..n).map(|_| (port(), port())).collect();
    let nodes: String = addrs
        .iter()
        .enumerate()
        .map(|(i, (c, r))| format!("[[cluster.node]]\nid = {}\nclient = \"{c}\"\nraft = \"{r}\"\n", i + 1))
        .collect();
    let mut children = Vec::new();
    for (i, (client, raft)) in addrs.iter().enumerate() {
        let config = dir.path().join(format!("member-{}.toml", i + 1));
        let secret = "the harness's cluster secret, 32 bytes or more";
        let text = format!(
            "listen = \"{client}\"\n[cluster]\nid = {}\nraft_listen = \"{raft}\"\nsecret = \"{secret}\"\n{nodes}",
            i + 1
        );
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(bin.unwrap_or(env!("CARGO_BIN_EXE_tally")))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(dir.path().join(format!("data-{}", i + 1)))
            .env("TALLY_AUTH_ADMIN_PASSWORD", SPAWNED_PASSWORD)
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tally");
        started().pids.push(child.id());
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.starts_with("tally listening on "), "member {}: {line}", i + 1);
        children.push(Some(child));
    }
    Members { addrs: addrs.iter().map(|(c, _)| c.to_string()).collect(), children, _dir: Some(dir) }
}

/// The member that says it leads, asked over and over for up to `within`.
async fn find_leader(addrs: &[String], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for (i, a) in addrs.iter().enumerate() {
            let asked = tokio::time::timeout(Duration::from_millis(500), async {
                Client::connect(a.as_str()).await.ok()?.call("hello", json!({})).await.ok()
            });
            if asked.await.ok().flatten().is_some_and(|h| h["role"] == "leader") {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A connection's byte stream: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the load goes, and how to connect to it.
#[derive(Clone)]
struct Dial {
    addr: String,
    tls: Option<ClientTls>,
    /// Each call's timeout (`--timeout`).
    timeout: Duration,
}

impl Dial {
    async fn client(&self) -> Client {
        let c = match &self.tls {
            None => Client::connect(self.addr.as_str()).await,
            Some(tls) => Client::connect_tls(&self.addr, tls).await,
        };
        match c {
            Ok(c) => c.with_timeout(Some(self.timeout)),
            Err(e) => give_up(&format!("cannot connect to {}: {e}", self.addr)),
        }
    }
}

/// `r`'s value, or the run ends saying what failed (`Timeout` included).
fn or_give_up<T>(r: Result<T, tally::client::ClientError>, what: &str) -> T {
    r.unwrap_or_else(|e| give_up(&format!("{what}: {e}")))
}

fn account_name(i: usize) -> String {
    format!("acct{i}")
}

/// Writes [`account_name`]`(i)` as a MessagePack string, without allocating.
fn write_account(w: &mut impl std::io::Write, i: usize) {
    let mut name = [0u8; ACCOUNT_BYTES_MAX];
    let n = put_account(&mut name, i);
    let _ = w.write_all(&name[..n]);
}

/// The most bytes [`put_account`] writes: a fixstr's marker, `acct` and
/// up to 20 digits.
const ACCOUNT_BYTES_MAX: usize = 1 + 4 + 20;

/// Puts [`account_name`]`(i)` as a MessagePack string at the start of
/// `out`; returns the bytes written.
fn put_account(out: &mut [u8], i: usize) -> usize {
    let digits = i.checked_ilog10().unwrap_or(0) as usize + 1;
    out[0] = 0xa0 | (4 + digits) as u8;
    out[1..5].copy_from_slice(b"acct");
    let mut n = i;
    for k in (5..5 + digits).rev() {
        out[k] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    5 + digits
}

async fn setup(dial: &Dial, o: &Opts) -> Result<(Client, String), String> {
    let admin = dial.client().await;
    let login = admin.login(&o.user, &o.password).await.map_err(|e| format!("login as {} failed: {e}", o.user))?;
    let token = login["token"].as_str().expect("token").to_owned();
    if o.existing {
        return Ok((admin, token));
    }
    // Create the accounts in parallel over a few connections.
    let per = o.accounts.div_ceil(8);
    let mut tasks = Vec::new();
    for part in 0..8 {
        let (dial, token) = (dial.clone(), token.clone());
        let n = o.accounts;
        tasks.push(tokio::spawn(async move {
            let c = Arc::new(dial.client().await);
            or_give_up(c.call("auth", json!({ "token": token })).await, "auth");
            let mut inflight = Vec::new();
            for i in part * per..((part + 1) * per).min(n) {
                let c = c.clone();
                inflight.push(tokio::spawn(async move {
                    let args = json!({"account": account_name(i), "initial": 1_000_000_000, "tags": ["bench"]});
                    let r = c.call("create_account", args).await;
                    match r {
                        Ok(_) => {}
                        Err(e) if e.code() == Some("exists") => {}
                        Err(e) => give_up(&format!("create_account: {e}")),
                    }
                }));
                if inflight.len() >= 256 {
                    for t in inflight.drain(..) {
                        t.await.unwrap();
                    }
                }
            }
            for t in inflight {
                t.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Ok((admin, token))
}

struct Totals {
    transfers: AtomicU64,
    reads: AtomicU64,
    errors: std::sync::Mutex<HashMap<String, u64>>,
    /// When the last acknowledgement came (µs since the start), and the
    /// longest time between two, over every connection.
    last_ack_us: AtomicU64,
    max_gap_us: AtomicU64,
}

impl Totals {
    fn acked(&self, now_us: u64) {
        let prev = self.last_ack_us.swap(now_us, Ordering::Relaxed);
        self.max_gap_us.fetch_max(now_us.saturating_sub(prev), Ordering::Relaxed);
    }

    fn error(&self, code: &str, n: u64) {
        *self.errors.lock().unwrap().entry(code.to_owned()).or_default() += n;
    }
}

/// Where a connection goes again when its member fails or stops leading.
#[derive(Clone)]
struct Follow {
    members: Arc<Vec<String>>,
    token: String,
    tls: Option<ClientTls>,
    timeout: Duration,
}

fn encode(out: &mut BytesMut, id: u64, op: &str, args: &Value) {
    tally::wire::frame::encode_request(out, id, op, args).expect("encode");
}

/// Times `bulk_add` over every (tagged) account and a full `list_accounts`
/// walk, before the transfer run.
async fn admin_ops(admin: &Client, accounts: usize) {
    let t0 = Instant::now();
    let args = json!({"tag": "bench", "delta": 1, "memo": "bench bonus"});
    let r = or_give_up(admin.call_within(Some(tally::client::LONG_TIMEOUT), "bulk_add", args).await, "bulk_add");
    println!("bulk_add on {} tagged accounts: {:.3}s", r["count"], t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let first = or_give_up(admin.call("list_accounts", json!({"limit": 1000})).await, "list_accounts");
    let page_s = t0.elapsed().as_secs_f64();
    let mut listed = first["accounts"].as_array().unwrap().len();
    let mut next = first["next"].clone();
    while let Some(after) = next.as_str() {
        let p = or_give_up(admin.call("list_accounts", json!({"limit": 1000, "after": after})).await, "list_accounts");
        listed += p["accounts"].as_array().unwrap().len();
        next = p["next"].clone();
    }
    println!(
        "list_accounts over {accounts} accounts: first page of 1000 in {page_s:.3}s, all {listed} in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// An SVG with latency over time (p50 and p99 per second, and throughput)
/// on top and the latency histogram below. Written by hand: two polylines
/// and some bars need no plotting library.
fn plot_svg(hist: &Histogram<u64>, per_second: &[Histogram<u64>], throughput: &[f64]) -> String {
    use std::fmt::Write;
    let (w, h, pad) = (900.0, 320.0, 50.0);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{}' font-family='sans-serif' font-size='12'>",
        2.0 * h + 40.0
    );
    let line = |points: &[(f64, f64)], color: &str, ymax: f64, top: f64| {
        let n = points.len().max(2) as f64 - 1.0;
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!("{:.1},{:.1}", pad + x / n * (w - 2.0 * pad), top + h - pad - y / ymax * (h - 2.0 * pad))
            })
            .collect();
        format!("<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>", pts.join(" "))
    };
    let p50: Vec<(f64, f64)> =
        per_second.iter().enumerate().map(|(i, s)| (i as f64, s.value_at_quantile(0.5) as f64 / 1000.0)).collect();
    let p99: Vec<(f64, f64)> =
        per_second.iter().enumerate().map(|(i, s)| (i as f64, s.value_at_quantile(0.99) as f64 / 1000.0)).collect();
    let ymax = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let tmax = throughput.iter().copied().fold(1.0, f64::max) * 1.1;
    let tp: Vec<(f64, f64)> = throughput.iter().enumerate().map(|(i, t)| (i as f64, t / tmax * ymax)).collect();
    let _ = write!(
        svg,
        "<text x='{pad}' y='20'>latency per second (ms): p50 blue, p99 red; throughput green (max {tmax:.0}/s)</text>"
    );
    let _ = write!(svg, "<text x='5' y='{}'>{ymax:.1} ms</text>", pad);
    svg += &line(&p50, "#1f77b4", ymax, 0.0);
    svg += &line(&p99, "#d62728", ymax, 0.0);
    svg += &line(&tp, "#2ca02c", ymax, 0.0);
    // Histogram: counts per power-of-two latency bucket.
    let buckets: Vec<(u64, u64)> = (0..26)
        .map(|b| {
            let (lo, hi) = (1u64 << b, (1u64 << (b + 1)) - 1);
            (
                lo,
                hist.iter_recorded()
                    .filter(|v| (lo..=hi).contains(&v.value_iterated_to()))
                    .map(|v| v.count_at_value())
                    .sum(),
            )
        })
        .filter(|(_, c)| *c > 0)
        .collect();
    let cmax = buckets.iter().map(|b| b.1).max().unwrap_or(1) as f64;
    let top = h + 40.0;
    let _ =
        write!(svg, "<text x='{pad}' y='{}'>latency histogram (count per power-of-two bucket, µs)</text>", top + 10.0);
    let bw = (w - 2.0 * pad) / buckets.len().max(1) as f64;
    for (i, (lo, c)) in buckets.iter().enumerate() {
        let bh = *c as f64 / cmax * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        let _ = write!(
            svg,
            "<rect x='{x:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='#9467bd'/><text x='{x:.1}' y='{:.1}'>{lo}</text>",
            top + h - pad - bh,
            bw * 0.9,
            top + h - pad + 14.0
        );
    }
    svg + "</svg>"
}

/// The parts of a reply the load generator reads.
#[derive(serde::Deserialize)]
struct ReplyHead<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    err: Option<ErrHead<'a>>,
    #[allow(dead_code)] // skipped, never read
    ok: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct ErrHead<'a> {
    code: &'a str,
}

/// The id of a reply and whether it is `ok`, read without decoding the
/// `ok` value (most of the bytes): the server writes `id` first, then `ok`
/// or `err`. Also gives the bytes from that value on. `None` if the frame
/// is laid out otherwise.
fn fast_head(body: &[u8]) -> Option<(u64, bool, &[u8])> {
    let mut rd = body;
    rmp::decode::read_map_len(&mut rd).ok()?;
    let (key, rest) = rmp::decode::read_str_from_slice(rd).ok()?;
    if key != "id" {
        return None;
    }
    rd = rest;
    let id: u64 = rmp::decode::read_int(&mut rd).ok()?;
    match rmp::decode::read_str_from_slice(rd).ok()? {
        ("ok", rest) => Some((id, true, rest)),
        ("err", rest) => Some((id, false, rest)),
        _ => None,
    }
}

/// The counts of a `transfer_batch` reply, for one that [`fast_head`]
/// cannot read (its results are skipped).
#[derive(serde::Deserialize)]
struct BatchCounts {
    applied: u64,
    failed: u64,
}

#[derive(serde::Deserialize)]
struct BatchHead {
    ok: Option<BatchCounts>,
}

/// `(applied, failed)` of a `transfer_batch` reply's `ok` value, its
/// per-item results skipped by their lengths alone (the server's own
/// walker, [`tally::wire::frame::value_len`]): decoded with serde,
/// as before, the results (every string checked as UTF-8) were a quarter
/// of the load generator's time. `None` if the value is not a map with
/// both counts.
fn batch_counts(mut rd: &[u8]) -> Option<(u64, u64)> {
    let pairs = rmp::decode::read_map_len(&mut rd).ok()?;
    let (mut applied, mut failed) = (None, None);
    for _ in 0..pairs {
        let (key, rest) = rmp::decode::read_str_from_slice(rd).ok()?;
        rd = rest;
        match key {
            "applied" => applied = Some(rmp::decode::read_int(&mut rd).ok()?),
            "failed" => failed = Some(rmp::decode::read_int(&mut rd).ok()?),
            _ => rd = rd.get(tally::wire::frame::value_len(rd)?..)?,
        }
    }
    Some((applied?, failed?))
}

/// `(applied, failed)` of the batch reply `body`, whose `ok` value
/// [`fast_head`] found at `ok` (empty if it found none: a reply laid out
/// otherwise than the server's is decoded whole).
fn reply_counts(body: &[u8], ok: &[u8]) -> Option<(u64, u64)> {
    batch_counts(ok).or_else(|| {
        let head = rmp_serde::from_slice::<BatchHead>(body).ok()?;
        head.ok.map(|c| (c.applied, c.failed))
    })
}

/// What one request carries: its transfers, and how they are sent.
struct Shape {
    /// Transfers per request (0: a single `transfer`).
    batch: usize,
    atomic: bool,
    /// Prefix of the idempotency keys (unique per connection), if keyed.
    keys: Option<String>,
}

/// Appends a `transfer` frame (`transfers` holds one pair) or a
/// `transfer_batch` frame, written directly with rmp (no JSON value in
/// between). Item `i` of request `id` is keyed `PREFIX-id-i`.
fn encode_transfers(out: &mut BytesMut, id: u64, transfers: &[(usize, usize)], shape: &Shape) {
    use bytes::BufMut;
    let start = out.len();
    out.put_u32(0);
    let mut w = out.writer();
    let _ = rmp::encode::write_map_len(&mut w, 3);
    let _ = rmp::encode::write_str(&mut w, "id");
    let _ = rmp::encode::write_uint(&mut w, id);
    let _ = rmp::encode::write_str(&mut w, "op");
    let _ = rmp::encode::write_str(&mut w, if shape.batch == 0 { "transfer" } else { "transfer_batch" });
    let _ = rmp::encode::write_str(&mut w, "args");
    if shape.batch > 0 {
        let _ = rmp::encode::write_map_len(&mut w, 2);
        let _ = rmp::encode::write_str(&mut w, "atomic");
        let _ = rmp::encode::write_bool(&mut w, shape.atomic);
        let _ = rmp::encode::write_str(&mut w, "transfers");
        let _ = rmp::encode::write_array_len(&mut w, transfers.len() as u32);
    }
    let out = w.into_inner();
    for (i, &(from, to)) in transfers.iter().enumerate() {
        // One item is built on the stack and copied once: written a field
        // at a time through `Write`, the items were a third of the load
        // generator's time, which it takes from the server's two cores.
        let mut item = [0u8; 1 + 5 + ACCOUNT_BYTES_MAX + 3 + ACCOUNT_BYTES_MAX + 8];
        item[0] = 0x80 | if shape.keys.is_some() { 4 } else { 3 };
        item[1..6].copy_from_slice(b"\xa4from");
        let mut n = 6 + put_account(&mut item[6..], from);
        item[n..n + 3].copy_from_slice(b"\xa2to");
        n += 3;
        n += put_account(&mut item[n..], to);
        item[n..n + 8].copy_from_slice(b"\xa6amount\x01");
        out.put_slice(&item[..n + 8]);
        if let Some(prefix) = &shape.keys {
            let mut w = (&mut *out).writer();
            let _ = rmp::encode::write_str(&mut w, "key");
            let _ = rmp::encode::write_str(&mut w, &format!("{prefix}-{id}-{i}"));
        }
    }
    let len = u32::try_from(out.len() - start - 4).unwrap();
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// [`open`], or why not: the server is gone, refuses the token, or does
/// not answer within the dial's timeout.
async fn try_open(dial: &Dial, token: &str) -> Result<Box<dyn Io>, String> {
    let opening = async {
        let stream = TcpStream::connect(dial.addr.as_str()).await.map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut stream: Box<dyn Io> = match &dial.tls {
            None => Box::new(stream),
            Some(tls) => {
                let name = tally::tls::server_name(&dial.addr).map_err(|e| e.to_string())?;
                let connector = tokio_rustls::TlsConnector::from(tls.config().map_err(|e| e.to_string())?);
                Box::new(connector.connect(name, stream).await.map_err(|e| format!("TLS: {e}"))?)
            }
        };
        let mut out = BytesMut::new();
        encode(&mut out, 0, "auth", &json!({ "token": token }));
        let mut body = Vec::new();
        let exchanged: std::io::Result<()> = async {
            stream.write_all(&out).await?;
            stream.flush().await?;
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await?;
            body.resize(u32::from_be_bytes(len) as usize, 0);
            stream.read_exact(&mut body).await?;
            Ok(())
        }
        .await;
        exchanged.map_err(|e| format!("auth: {e}"))?;
        let v: Value = rmp_serde::from_slice(&body).map_err(|e| format!("auth's answer: {e}"))?;
        if v["ok"].is_object() {
            Ok(stream)
        } else {
            Err(format!("auth failed: {v}"))
        }
    };
    match tokio::time::timeout(dial.timeout, opening).await {
        Ok(opened) => opened,
        Err(_) => Err(format!("no answer within {} s", dial.timeout.as_secs_f64())),
    }
}

/// Opens a connection and binds it with the admin token (no password
/// hashing per connection, so the run starts at full speed).
async fn open(dial: &Dial, token: &str) -> Box<dyn Io> {
    try_open(dial, token).await.unwrap_or_else(|e| give_up(&format!("opening a load connection to {}: {e}", dial.addr)))
}

/// The most an open-loop connection writes before it reads again.
const WRITE_PIECE: usize = 256 * 1024;

/// A histogram of microseconds, 1 µs to a minute, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Requests in flight on one connection: id -> (sent at, is a read).
type Sent = HashMap<u64, (Instant, bool), foldhash::fast::FixedState>;

/// What one connection measured.
struct Drove {
    /// Every request's latency.
    hist: Histogram<u64>,
    /// Latency per second of the run, for the plot.
    per_second: Vec<Histogram<u64>>,
    /// Open loop: how long after it was due each request was sent.
    late: Histogram<u64>,
}

/// One connection sending requests until `stop`: closed loop, keeping
/// `pipeline` requests in flight; or open loop (`--rate`), sending on a
/// fixed schedule whatever the replies, each request's latency counted from
/// when it was due (so a stall shows in full, as wrk2 counts).
///
/// With `follow` (a cluster), a connection whose member dies or stops
/// leading finds the new leader and goes on; what it had in flight counts
/// as `lost` (its outcome unknown to the harness).
#[allow(clippy::too_many_arguments)] // one connection's whole setting
async fn drive(
    mut stream: Box<dyn Io>,
    o: Opts,
    seed: u64,
    stop: Arc<AtomicBool>,
    totals: Arc<Totals>,
    start: Instant,
    follow: Option<Follow>,
) -> Drove {
    let mut hist = latency_histogram();
    let mut late = latency_histogram();
    // Latency per second of the run, for the plot.
    let mut per_second: Vec<Histogram<u64>> = Vec::new();
    let mut out = BytesMut::new();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut rng = Rng(seed | 1);
    let mut sent: Sent = HashMap::with_capacity_and_hasher(o.pipeline * 2, foldhash::fast::FixedState::default());
    let mut next_id = 1u64;
    let n = o.accounts;
    let shape = Shape { batch: o.batch, atomic: o.atomic, keys: o.keys.then(|| format!("{seed:x}")) };
    let mut pairs = Vec::with_capacity(o.batch.max(1));
    let mut make = |out: &mut BytesMut, sent: &mut Sent, rng: &mut Rng, at: Instant| {
        let id = next_id;
        next_id += 1;
        let is_read = o.reads_pct > 0 && (rng.below(100) as u32) < o.reads_pct;
        if is_read {
            encode(out, id, "balance", &json!({"account": account_name(pick(rng, o.workload, n))}));
        } else {
            pairs.clear();
            for _ in 0..o.batch.max(1) {
                let from = pick(rng, o.workload, n);
                let mut to = if o.workload == Workload::Hot { 0 } else { pick(rng, o.workload, n) };
                if to == from {
                    to = (from + 1) % n;
                }
                pairs.push((from, to));
            }
            encode_transfers(out, id, &pairs, &shape);
        }
        sent.insert(id, (at, is_read));
    };
    // Open loop: one request every `interval`, the k-th due at start + k * interval.
    let per_request = o.batch.max(1) as f64;
    let interval = o.rate.map(|r| Duration::from_secs_f64(o.connections as f64 * per_request / r));
    let mut due = start;
    if interval.is_none() {
        for _ in 0..o.pipeline {
            make(&mut out, &mut sent, &mut rng, Instant::now());
        }
    }
    // When the server last answered, or had nothing to answer: a
    // connection waiting on it for longer than `--timeout` is not measuring.
    let mut heard = Instant::now();
    // Its timer, moved on only when it fires (not at every reply, which
    // would cost the closed loop a timer's update per read).
    let silence = tokio::time::sleep_until((heard + o.timeout).into());
    tokio::pin!(silence);
    loop {
        let mut broken = false;
        if sent.is_empty() {
            heard = Instant::now();
        } else if heard.elapsed() >= o.timeout {
            if follow.is_none() {
                give_up(&format!(
                    "no reply from the server for {} s with {} requests in flight on a load connection",
                    o.timeout.as_secs_f64(),
                    sent.len()
                ));
            }
            broken = true;
        }
        if let Some(interval) = interval {
            let now = Instant::now();
            while due <= now && !stop.load(Ordering::Relaxed) {
                let _ = late.record((now.duration_since(due).as_micros() as u64).max(1));
                make(&mut out, &mut sent, &mut rng, due);
                due += interval;
            }
        }
        // Replies are read in place (no buffer split per frame) and one
        // clock reading per reply serves its latency, its second of the run
        // and the send time of the request that replaces it.
        let mut pos = 0;
        while buf.len() - pos >= 4 {
            let len = u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
            if buf.len() - pos - 4 < len {
                break;
            }
            let body = &buf[pos + 4..pos + 4 + len];
            pos += 4 + len;
            // Only the id and the error code are read, to keep the load
            // generator cheap: an `ok` value is not even parsed (a batch's
            // counts are).
            let (id, code, ok) = match fast_head(body) {
                Some((id, true, ok)) => (id, None, ok),
                _ => {
                    let v: ReplyHead<'_> = rmp_serde::from_slice(body).expect("reply");
                    (v.id.unwrap_or(u64::MAX), v.err.map(|e| e.code), &[][..])
                }
            };
            let Some((t0, is_read)) = sent.remove(&id) else {
                continue;
            };
            let now = Instant::now();
            heard = now;
            let us = now.duration_since(t0).as_micros() as u64;
            let _ = hist.record(us.max(1));
            let second = now.duration_since(start).as_secs() as usize;
            while per_second.len() <= second {
                per_second.push(Histogram::new_with_bounds(1, 60_000_000, 2).unwrap());
            }
            let _ = per_second[second].record(us.max(1));
            if let Some(code) = code {
                totals.error(code, 1);
                if follow.is_some() && matches!(code, "not_leader" | "unknown_outcome" | "unavailable") {
                    broken = true;
                }
            } else if is_read {
                totals.reads.fetch_add(1, Ordering::Relaxed);
            } else if o.batch > 0 {
                let (applied, failed) = reply_counts(body, ok).expect("a batch reply with its counts");
                totals.transfers.fetch_add(applied, Ordering::Relaxed);
                if failed > 0 {
                    *totals.errors.lock().unwrap().entry("batch_item".into()).or_default() += failed;
                }
            } else {
                totals.transfers.fetch_add(1, Ordering::Relaxed);
            }
            if code.is_none() && !is_read {
                totals.acked(now.duration_since(start).as_micros() as u64);
            }
            if interval.is_none() && !stop.load(Ordering::Relaxed) {
                make(&mut out, &mut sent, &mut rng, now);
            }
        }
        buf.advance(pos);
        if sent.is_empty() && stop.load(Ordering::Relaxed) {
            return Drove { hist, per_second, late };
        }
        if !broken && !out.is_empty() {
            // Written a piece at a time (a cancelled `write` writes nothing),
            // so that a server that stops reading is noticed like one that
            // stops answering. Only a reply counts as hearing from it: the
            // kernel takes megabytes for a server that reads nothing. The
            // open loop reads between pieces of `WRITE_PIECE`: after a stall
            // its backlog may be more than the server takes in before its
            // answers are read.
            let mut wrote = 0;
            let written = loop {
                let flushing = out.is_empty();
                let step = async {
                    if flushing {
                        // A no-op on TCP; TLS may hold the last record back until then.
                        stream.flush().await.map(|()| None)
                    } else {
                        stream.write(&out).await.map(Some)
                    }
                };
                tokio::select! {
                    r = step => match r {
                        Ok(None) => break Ok(()),
                        Ok(Some(0)) => break Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(Some(n)) => {
                            out.advance(n);
                            wrote += n;
                            if interval.is_some() && wrote >= WRITE_PIECE && !out.is_empty() {
                                break Ok(());
                            }
                        }
                        Err(e) => break Err(e),
                    },
                    () = &mut silence => {
                        if heard.elapsed() >= o.timeout {
                            break Err(std::io::ErrorKind::TimedOut.into());
                        }
                        silence.as_mut().reset((heard + o.timeout).into());
                    }
                }
            };
            match written {
                Ok(()) => {}
                Err(_) if follow.is_some() => broken = true,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => give_up(&format!(
                    "no reply from the server for {} s while a load connection's requests waited to be written",
                    o.timeout.as_secs_f64()
                )),
                Err(e) => panic!("write: {e}"),
            }
        }
        if !broken {
            // Woken by a reply, the next request due (open loop), or the
            // server's silence reaching `--timeout`, checked above.
            let read = match interval {
                Some(_) if !stop.load(Ordering::Relaxed) => tokio::select! {
                    r = stream.read_buf(&mut buf) => r,
                    () = tokio::time::sleep_until(due.min(heard + o.timeout).into()) => continue,
                },
                _ => tokio::select! {
                    r = stream.read_buf(&mut buf) => r,
                    () = &mut silence => {
                        silence.as_mut().reset((heard + o.timeout).into());
                        continue;
                    }
                },
            };
            match read {
                Ok(0) if follow.is_none() => return Drove { hist, per_second, late },
                Ok(0) => broken = true,
                Ok(_) => {}
                Err(_) if follow.is_some() => broken = true,
                Err(e) => panic!("read: {e}"),
            }
        }
        if broken {
            let Some(f) = &follow else { return Drove { hist, per_second, late } };
            totals.error("lost", sent.len() as u64);
            sent.clear();
            buf.clear();
            out.clear();
            if stop.load(Ordering::Relaxed) {
                return Drove { hist, per_second, late };
            }
            stream = loop {
                if stop.load(Ordering::Relaxed) {
                    return Drove { hist, per_second, late };
                }
                let Some(leader) = find_leader(&f.members, Duration::from_secs(30)).await else {
                    return Drove { hist, per_second, late };
                };
                let dial = Dial { addr: f.members[leader].clone(), tls: f.tls.clone(), timeout: f.timeout };
                match try_open(&dial, &f.token).await {
                    Ok(s) => break s,
                    // Leadership moved again, or the leader is not serving yet.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            heard = Instant::now();
            if interval.is_none() {
                for _ in 0..o.pipeline {
                    make(&mut out, &mut sent, &mut rng, Instant::now());
                }
            }
        }
    }
}

/// The hand-written encoding and reading above agree with serde's, checked
/// at every start: the load generator has no tests of its own.
fn check_hand_coding() {
    for i in [0, 7, 10, 99, 12_345, 999_999, 1_000_000, usize::MAX] {
        let (mut fast, mut plain) = (Vec::new(), Vec::new());
        write_account(&mut fast, i);
        rmp::encode::write_str(&mut plain, &account_name(i)).unwrap();
        assert_eq!(fast, plain, "account name {i}");
    }
    let pairs = [(0, 1), (12_345, 7), (usize::MAX, 999_999)];
    for (batch, atomic, keys) in [(0, false, None), (3, false, None), (3, true, Some("k".to_owned()))] {
        let shape = Shape { batch, atomic, keys };
        let sent = &pairs[..batch.max(1)];
        let mut out = BytesMut::new();
        encode_transfers(&mut out, 42, sent, &shape);
        assert_eq!(u32::from_be_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
        let got: Value = rmp_serde::from_slice(&out[4..]).expect("a request the harness wrote");
        let items: Vec<Value> = sent
            .iter()
            .enumerate()
            .map(|(i, &(f, t))| {
                let mut item = json!({"from": account_name(f), "to": account_name(t), "amount": 1});
                if let Some(k) = &shape.keys {
                    item["key"] = json!(format!("{k}-42-{i}"));
                }
                item
            })
            .collect();
        let want = if batch == 0 {
            json!({"id": 42, "op": "transfer", "args": items[0]})
        } else {
            json!({"id": 42, "op": "transfer_batch", "args": {"atomic": atomic, "transfers": items}})
        };
        assert_eq!(got, want, "request of shape {batch} {atomic}");
    }
    #[derive(serde::Serialize)]
    struct Counts {
        results: Value,
        applied: u64,
        failed: u64,
    }
    #[derive(serde::Serialize)]
    struct Reply {
        id: u64,
        ok: Counts,
    }
    // Items as the server writes them: applied, and failed.
    let results =
        json!([{"id": 9, "from_balance": -5, "to_balance": 5}, {"code": "insufficient_funds", "message": "é"}]);
    let body =
        rmp_serde::to_vec_named(&Reply { id: 42, ok: Counts { results: results.clone(), applied: 1, failed: 1 } })
            .unwrap();
    let (id, ok, rest) = fast_head(&body).expect("a reply laid out as the server's");
    assert_eq!((id, ok, reply_counts(&body, rest)), (42, true, Some((1, 1))));
    let mut reordered = vec![0x82, 0xa2, b'o', b'k'];
    reordered.extend(rmp_serde::to_vec(&json!({"applied": 3, "failed": 4, "results": []})).unwrap());
    reordered.extend([0xa2, b'i', b'd', 42]);
    assert_eq!(fast_head(&reordered), None);
    assert_eq!(reply_counts(&reordered, &[]), Some((3, 4)));
    assert_eq!(batch_counts(&rest[..rest.len() - 1]), None);
    let sorted = rmp_serde::to_vec(&json!({"applied": 1_000, "failed": 0, "results": results})).unwrap();
    assert_eq!(batch_counts(&sorted), Some((1_000, 0)));
}

// One thread, like redis-benchmark: it keeps up (about 1 µs of CPU per
// transfer) and leaves the second core to the server; in interleaved runs
// it measured cheaper than two threads and no slower.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = parse_opts();
    check_hand_coding();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        clean_up();
    }));
    let mut members: Option<Members> = None;
    let (child, dial, _dir) = if o.spawn {
        let (c, addr, ca, d) = spawn_server(o.bin.as_deref(), o.tls);
        let tls = ca.map(|ca| ClientTls { ca: Some(ca.into()), cert: None });
        (Some(c), Dial { addr, tls, timeout: o.timeout }, Some(d))
    } else {
        let tls = o.tls.then(|| ClientTls { ca: o.ca.clone().map(Into::into), cert: None });
        let m = if o.cluster > 0 {
            spawn_cluster(o.cluster, o.bin.as_deref())
        } else {
            let addrs: Vec<String> = o.connect.clone().unwrap().split(',').map(str::to_owned).collect();
            Members { addrs, children: Vec::new(), _dir: None }
        };
        let addr = if m.addrs.len() > 1 {
            let Some(leader) = find_leader(&m.addrs, Duration::from_secs(60)).await else {
                give_up(&format!("no member of {:?} says it leads", m.addrs));
            };
            eprintln!("driving the leader, member {} at {}", leader + 1, m.addrs[leader]);
            m.addrs[leader].clone()
        } else {
            m.addrs[0].clone()
        };
        if m.addrs.len() > 1 {
            members = Some(m);
        }
        (None, Dial { addr, tls, timeout: o.timeout }, None)
    };
    let t_setup = Instant::now();
    let (admin, token) = match setup(&dial, &o).await {
        Ok(a) => a,
        Err(e) => give_up(&e),
    };
    let follow = members.as_ref().map(|m| Follow {
        members: Arc::new(m.addrs.clone()),
        token: token.clone(),
        tls: dial.tls.clone(),
        timeout: o.timeout,
    });
    let setup_s = t_setup.elapsed().as_secs_f64();
    eprintln!("created {} accounts in {setup_s:.1}s", o.accounts);
    if o.admin_ops {
        admin_ops(&admin, o.accounts).await;
    }
    let before = or_give_up(admin.call("stats", json!({})).await, "stats");

    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals {
        transfers: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        errors: std::sync::Mutex::new(HashMap::new()),
        last_ack_us: AtomicU64::new(0),
        max_gap_us: AtomicU64::new(0),
    });
    let mut streams = Vec::new();
    for _ in 0..o.connections {
        streams.push(open(&dial, &token).await);
    }
    // Every server process: the one spawned, or a cluster's members.
    let server_pids: Vec<String> = match (&child, &members) {
        (Some(c), _) => vec![c.id().to_string()],
        (None, Some(m)) => m.pids(),
        (None, None) => Vec::new(),
    };
    let server_cpu =
        |pids: &[String]| (!pids.is_empty()).then(|| pids.iter().filter_map(|p| cpu_seconds(p)).sum::<f64>());
    let cpu_before = (server_cpu(&server_pids), cpu_seconds("self"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let seed = 0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1234_5678_9abc);
        tasks.push(tokio::spawn(drive(stream, o.clone(), seed, stop.clone(), totals.clone(), start, follow.clone())));
    }
    // Optional login storm: K users logging in over and over while the
    // transfers run (each login is an argon2 check plus a durable commit).
    let mut login_tasks = Vec::new();
    for k in 0..o.logins {
        let (dial, stop) = (dial.clone(), stop.clone());
        login_tasks.push(tokio::spawn(async move {
            let c = dial.client().await;
            let user = format!("bench-login-{k}-{}", std::process::id());
            let password = "bench login password";
            let _ = c
                .call(
                    "signup",
                    json!({"user": user, "name": "Bench", "email": "bench@example.org", "password": password}),
                )
                .await;
            let mut hist = latency_histogram();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                or_give_up(c.login(&user, password).await, "login");
                let _ = hist.record(t0.elapsed().as_micros() as u64);
            }
            hist
        }));
    }
    let deadline = start + Duration::from_secs_f64(o.duration_s);
    // A live progress bar on a terminal (indicatif hides it otherwise).
    let bar = indicatif::ProgressBar::new((o.duration_s * 10.0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = (0u64, Instant::now());
    let mut throughput = Vec::new();
    let halfway = start + Duration::from_secs_f64(o.duration_s / 2.0);
    let mut killed = None;
    while Instant::now() < deadline {
        if o.failover && killed.is_none() && Instant::now() >= halfway {
            if let Some(m) = &mut members {
                if let Some(leader) = find_leader(&m.addrs, Duration::from_secs(5)).await {
                    m.kill(leader);
                    killed = Some((leader, start.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now()))).await;
        bar.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
        if last.1.elapsed() >= Duration::from_secs(1) {
            let now = totals.transfers.load(Ordering::Relaxed);
            let rate = (now - last.0) as f64 / last.1.elapsed().as_secs_f64();
            throughput.push(rate);
            bar.set_message(format!("{rate:>9.0} transfers/s"));
            last = (now, Instant::now());
        }
    }
    bar.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    let mut hist = latency_histogram();
    let mut per_second: Vec<Histogram<u64>> = Vec::new();
    let mut late = latency_histogram();
    for t in tasks {
        let Drove { hist: h, per_second: seconds, late: l } = t.await.unwrap();
        hist.add(h).unwrap();
        late.add(l).unwrap();
        for (i, s) in seconds.into_iter().enumerate() {
            if per_second.len() <= i {
                per_second.push(s);
            } else {
                per_second[i].add(s).unwrap();
            }
        }
    }
    if let Some(path) = &o.plot {
        std::fs::write(path, plot_svg(&hist, &per_second, &throughput)).expect("write the plot");
        println!("plot written to {path}");
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_after = (server_cpu(&server_pids), cpu_seconds("self"));
    let transfers = totals.transfers.load(Ordering::Relaxed);
    let reads = totals.reads.load(Ordering::Relaxed);
    let errors = totals.errors.lock().unwrap().clone();
    let mut logins = latency_histogram();
    for t in login_tasks {
        logins.add(t.await.unwrap()).unwrap();
    }
    if o.logins > 0 {
        println!(
            "logins {} ({:.0}/s), login latency us: p50 {} p99 {}",
            logins.len(),
            logins.len() as f64 / seconds,
            logins.value_at_quantile(0.5),
            logins.value_at_quantile(0.99)
        );
    }

    // A cluster's leader may have changed: ask the one leading now (its
    // counters started with its leadership, so they are not compared).
    let admin = match &members {
        None => admin,
        Some(m) => {
            let leader = find_leader(&m.addrs, Duration::from_secs(30)).await.expect("a leader after the run");
            let c = Dial { addr: m.addrs[leader].clone(), tls: None, timeout: o.timeout }.client().await;
            or_give_up(c.call("auth", json!({ "token": token })).await, "auth at the leader");
            c
        }
    };
    let after = or_give_up(admin.call("stats", json!({})).await, "stats");
    let server_transfers = after["transfers"].as_u64().unwrap() - before["transfers"].as_u64().unwrap_or(0);
    let audit_within = o.timeout.max(tally::client::LONG_TIMEOUT);
    let audit = or_give_up(admin.call_within(Some(audit_within), "audit", json!({})).await, "audit");
    let counters_agree = members.is_some() || server_transfers == transfers;
    let audit_ok = audit["sum"] == 0 && audit["chain_ok"] == true;

    let tps = transfers as f64 / seconds;
    let sending = match o.rate {
        Some(r) => format!("open loop at {r:.0} transfers/s offered"),
        None => format!("pipeline {}", o.pipeline),
    };
    let per_request = match o.batch {
        0 => "single transfers".to_owned(),
        b => format!("batches of {b}{}", if o.atomic { ", atomic" } else { "" }),
    };
    println!(
        "workload {:?}: {} connections, {sending}, {per_request}{}, {} accounts, {:.1}s",
        o.workload,
        o.connections,
        if o.keys { ", keyed" } else { "" },
        o.accounts,
        seconds
    );
    println!("transfers {transfers}  reads {reads}  errors {errors:?}");
    let max_gap_ms = totals.max_gap_us.load(Ordering::Relaxed) as f64 / 1000.0;
    if let Some(m) = &members {
        println!("cluster of {} members; longest time without an acknowledgement: {max_gap_ms:.0} ms", m.addrs.len());
        if let Some((leader, at)) = killed {
            println!("killed the leader (member {}) with SIGKILL at {:.1}s", leader + 1, at.as_secs_f64());
        }
    }
    println!("transfers/s {tps:.0}  ops/s {:.0}", (transfers + reads) as f64 / seconds);
    println!(
        "latency us: p50 {} p90 {} p99 {} p999 {} max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    if o.rate.is_some() {
        // The harness's own share of the latency above.
        println!(
            "sent after due us: p50 {} p99 {} max {}",
            late.value_at_quantile(0.5),
            late.value_at_quantile(0.99),
            late.max()
        );
    }
    println!(
        "server: commits {} batch_mean {:.1} batch_max {}; counters agree: {counters_agree}; audit sum {} chain_ok {}",
        after["commits"],
        after["batch_mean"].as_f64().unwrap_or(0.0),
        after["batch_max"],
        audit["sum"],
        audit["chain_ok"]
    );
    // CPU per operation, server and load generator (the harness's own
    // figure includes setting up, which is small next to the run).
    let per_op = |before: Option<f64>, after: Option<f64>| {
        let ops = (transfers + reads).max(1) as f64;
        Some(((after? - before?) * 1e6 / ops * 100.0).round() / 100.0)
    };
    let server_cpu_us = per_op(cpu_before.0, cpu_after.0);
    let harness_cpu_us = per_op(cpu_before.1, cpu_after.1);
    if let Some(s) = server_cpu_us {
        println!("cpu per operation: server {s} us, load generator {} us", harness_cpu_us.unwrap_or(0.0));
    }
    let mut rss_kb = None;
    if let Some(c) = &child {
        // Peak and current resident memory of the spawned server (Linux).
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", c.id())) {
            let field = |name: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            };
            rss_kb = field("VmRSS:");
            println!(
                "server memory: VmRSS {} kB, VmHWM (peak) {} kB",
                rss_kb.unwrap_or(0),
                field("VmHWM:").unwrap_or(0)
            );
        }
    }
    if o.json {
        println!(
            "{}",
            json!({
                "transfers": transfers, "seconds": seconds, "transfers_per_s": tps,
                "p50_us": hist.value_at_quantile(0.5), "p90_us": hist.value_at_quantile(0.9),
                "p99_us": hist.value_at_quantile(0.99), "p999_us": hist.value_at_quantile(0.999),
                "max_us": hist.max(), "errors": errors, "reads": reads,
                "counters_agree": counters_agree, "audit_ok": audit_ok, "server_rss_kb": rss_kb,
                "server_cpu_us_per_op": server_cpu_us, "harness_cpu_us_per_op": harness_cpu_us,
                "p99_per_s_us": per_second.iter().map(|h| h.value_at_quantile(0.99)).collect::<Vec<_>>(),
                "batch": o.batch, "atomic": o.atomic, "keys": o.keys, "rate": o.rate,
                "requests": hist.len(), "max_gap_ms": max_gap_ms,
                "late_p99_us": o.rate.map(|_| late.value_at_quantile(0.99)),
            })
        );
    }
    if let Some(mut c) = child {
        stop_server(&mut c);
    }
    if let Some(m) = &mut members {
        (0..m.children.len()).for_each(|i| m.kill(i));
    }
    if !counters_agree || !audit_ok {
        give_up("verification failed");
    }
}
