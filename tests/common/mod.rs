//! Starts the real `tally` binary on port 0 with a temporary data folder.

#![allow(dead_code)] // each test file uses a different part of this

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally::client::{Client, ClientError};

pub mod pki;

pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// As a value in [`Server::start_with`]: leave this variable unset.
pub const UNSET: &str = "\u{0}unset";

pub struct Server {
    pub addr: SocketAddr,
    /// The TLS listener, when the test set `TALLY_TLS_LISTEN`.
    pub tls_addr: Option<SocketAddr>,
    /// The HTTP listener, when the test set `TALLY_HTTP_LISTEN`.
    pub http_addr: Option<SocketAddr>,
    child: Child,
    pub data: PathBuf,
    _dir: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
    /// The admin token the test's admin connections share: one login (an
    /// argon2 hash) instead of one per connection, and with
    /// `auth.sessions = "single"` a new login would revoke the others.
    admin_token: std::sync::Mutex<Option<String>>,
}

impl Server {
    /// A new server with an empty data folder.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// A new server with extra `TALLY_*` environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let log = env.iter().any(|(k, _)| k == "TALLY_LOG").then(|| dir.path().join("server.log"));
        let (child, [addr, tls_addr, http_addr]) = spawn(&data, &env, log.as_deref());
        let addr = addr.expect("the plaintext listener");
        Server {
            addr,
            tls_addr,
            http_addr,
            child,
            data,
            _dir: Some(dir),
            env,
            admin_token: std::sync::Mutex::new(None),
        }
    }

    /// Kills the server with SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `within` for the server to exit on its own.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again after it stopped, with these variables
    /// changed from the first start.
    pub fn start_again_with(&mut self, env: &[(&str, &str)]) {
        for (k, v) in env {
            self.env.retain(|(key, _)| key != k);
            self.env.push(((*k).to_owned(), (*v).to_owned()));
        }
        *self.admin_token.lock().unwrap() = None;
        self.start_again();
    }

    /// Starts the server again on the same data folder (new port), after
    /// it exited by itself.
    pub fn start_again(&mut self) {
        let (child, [addr, tls_addr, http_addr]) = spawn(&self.data, &self.env, None);
        self.child = child;
        self.addr = addr.expect("the plaintext listener");
        self.tls_addr = tls_addr;
        self.http_addr = http_addr;
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the server to exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.child.wait().expect("wait")
    }

    /// Sends SIGTERM and returns at once: the stop goes on meanwhile.
    pub fn send_sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }

    /// Resident memory of the server in KiB (Linux).
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Starts the server again on the same data folder (new port).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, [addr, tls_addr, http_addr]) = spawn(&self.data, &self.env, None);
        self.child = child;
        self.addr = addr.expect("the plaintext listener");
        self.tls_addr = tls_addr;
        self.http_addr = http_addr;
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await.expect("connect")
    }

    /// A connection bound to the admin (logs in once, then reuses the token).
    pub async fn admin(&self) -> Client {
        let c = self.client().await;
        let token = self.admin_token.lock().unwrap().clone();
        match token {
            Some(t) => {
                c.call("auth", json!({ "token": t })).await.expect("admin auth");
            }
            None => {
                let r = c.login("admin", ADMIN_PASSWORD).await.expect("admin login");
                *self.admin_token.lock().unwrap() = Some(r["token"].as_str().unwrap().to_owned());
            }
        }
        c
    }
}

impl Server {
    /// The admin token the test's admin connections share.
    pub async fn admin_token(&self) -> String {
        drop(self.admin().await);
        self.admin_token.lock().unwrap().clone().expect("logged in above")
    }

    /// Peak resident memory of the server so far, in KiB (Linux `VmHWM`).
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The server's log file, when the test set `TALLY_LOG` (else it goes to the test's stderr).
pub fn log_path(s: &Server) -> PathBuf {
    s.data.parent().expect("data has a parent").join("server.log")
}

/// Waits up to 10 s for a line of the server's log file holding every one
/// of `parts`, and returns it.
pub fn log_line(s: &Server, parts: &[&str]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(log_path(s)).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no log line with {parts:?} in:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts the binary; the addresses it printed: plaintext, TLS and HTTP,
/// each when the environment turned it on.
fn spawn(data: &Path, env: &[(String, String)], log: Option<&Path>) -> (Child, [Option<SocketAddr>; 3]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
        None => Stdio::inherit(),
    };
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("TALLY_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        // The value UNSET removes a variable the harness would set.
        if v == UNSET {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let mut child = cmd.spawn().expect("spawn tally");
    let stdout = child.stdout.take().expect("stdout");
    let mut stdout = BufReader::new(stdout);
    let on = |var: &str| env.iter().any(|(k, v)| k == var && !v.is_empty() && v != UNSET);
    let https = on("TALLY_TLS_CERT");
    let wanted = [
        (true, "tally listening on "),
        (on("TALLY_TLS_LISTEN"), "tally listening with tls on "),
        (
            on("TALLY_HTTP_LISTEN"),
            if https { "tally listening with https on " } else { "tally listening with http on " },
        ),
    ];
    let addrs = wanted.map(|(on, prefix)| {
        on.then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read a listening line");
            line.trim()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
                .parse()
                .expect("address")
        })
    });
    (child, addrs)
}

/// The error code of a failed call; panics if the call succeeded.
pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code().unwrap_or_else(|| panic!("expected a server error, got {e}")).to_owned(),
    }
}

pub async fn balance(c: &Client, account: &str) -> i64 {
    c.balance(Some(account)).await.expect("balance")
}

pub async fn create(c: &Client, account: &str, initial: i64) {
    c.call("create_account", json!({"account": account, "initial": initial})).await.expect("create_account");
}

pub async fn audit_ok(c: &Client) -> Value {
    let a = c.call("audit", json!({})).await.expect("audit");
    assert_eq!(a["sum"], 0, "audit sum: {a}");
    assert_eq!(a["chain_ok"], true, "audit chain: {a}");
    a
}

/// A raw frame: the 4-byte big-endian length, then `body`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The codes in a folder of delivered mails, oldest first by arrival.
pub struct Inbox {
    dir: PathBuf,
    seen: std::collections::HashSet<PathBuf>,
}

impl Inbox {
    pub fn new(dir: PathBuf) -> Inbox {
        Inbox { dir, seen: Default::default() }
    }

    /// The next mail that arrived: (subject, code, whole text).
    pub fn next(&mut self) -> (String, String, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut new: Vec<PathBuf> = std::fs::read_dir(&self.dir)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            new.retain(|p| is_mail(p) && !self.seen.contains(p));
            // Mail files are named by time, so the oldest new one sorts first.
            new.sort();
            if let Some(p) = new.into_iter().next() {
                self.seen.insert(p.clone());
                let text = std::fs::read_to_string(&p).expect("read mail");
                return parse_mail(&text);
            }
            assert!(Instant::now() < deadline, "no new mail in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| is_mail(&e.path()))).count())
            .unwrap_or(0)
    }
}

/// A delivered mail: not a hidden file (the server writes a mail under a
/// hidden name, then renames it).
fn is_mail(p: &Path) -> bool {
    p.is_file() && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

pub fn parse_mail(text: &str) -> (String, String, String) {
    let subject = text
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_else(|| panic!("no subject in {text}"))
        .to_owned();
    let at = text.find("code is ").unwrap_or_else(|| panic!("no code in {text}")) + "code is ".len();
    let code = text[at..at + 6].to_owned();
    assert!(code.bytes().all(|b| b.is_ascii_digit()), "code {code:?} in {text}");
    (subject, code, text.to_owned())
}

/// Polls every call together, so that their requests go out pipelined.
pub async fn join_all<F: std::future::Future + Unpin>(mut calls: Vec<F>) -> Vec<F::Output> {
    let mut done: Vec<Option<F::Output>> = calls.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (f, slot) in calls.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// Sends the signal `sig` (as `kill` spells it: "-STOP") to process `pid`.
///
/// After SIGSTOP it returns only once every thread of the process has
/// stopped. `kill` returns as soon as the signal is queued for one thread;
/// the others run on until that one is scheduled and stops them (seen to
/// take up to ~40 ms on a loaded 2-core machine), long enough for a
/// "stopped" member to answer a request sent after `kill` returned.
pub fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success());
    if sig == "-STOP" {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "process {pid} did not stop within 10 s of SIGSTOP");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in
/// `/proc/<pid>/task/<tid>/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks.flatten().all(|task| {
        // A thread that ended meanwhile is not running either.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { return true };
        // The state follows the command name, which is in parentheses and
        // may itself hold spaces or parentheses.
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// Polls `check` every 20 ms until it holds; fails the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the wall clock has passed `at_ms` (ms since the epoch), a
/// time the server gave (an expiry), polling rather than guessing a sleep.
pub async fn wait_past(at_ms: u64) {
    while tally::clock::now_ms() <= at_ms {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server whose user transfers of 100 or more need a code, mailing into
/// a folder of the test's.
pub struct MailServer {
    pub s: Server,
    pub mail: Inbox,
    pub mail_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl MailServer {
    pub fn start(extra: &[(&str, &str)]) -> MailServer {
        let dir = tempfile::tempdir().unwrap();
        let mail_dir = dir.path().join("mail");
        let transport = format!("file://{}", mail_dir.display());
        let mut env = vec![("TALLY_MAIL_TRANSPORT", transport.as_str()), ("TALLY_OTP_TRANSFER_MIN", "100")];
        env.extend_from_slice(extra);
        let s = Server::start_with(&env);
        MailServer { s, mail: Inbox::new(mail_dir.clone()), mail_dir, _dir: dir }
    }
}

/// Sets a server's file-size limit (bytes; `None`: unlimited): to redb, a
/// write past it fails as on a full file system.
pub fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let value = bytes.unwrap_or(libc::RLIM_INFINITY);
    let limit = libc::rlimit { rlim_cur: value, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit only reads `limit`; the old value is not asked for.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, &raw const limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Whether the redb file at `path` was left open: its process ended
/// without closing it. Read from redb's header (the "recovery required"
/// bit of the byte after its 9-byte magic number, redb 4's layout), since
/// the ledger's commits save redb's allocator state ("quick repair"), so
/// opening a file left open repairs nothing and a repair callback cannot
/// tell.
pub fn left_open(path: &Path) -> bool {
    const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    const RECOVERY_REQUIRED: u8 = 2;
    let mut header = [0u8; 10];
    std::io::Read::read_exact(&mut std::fs::File::open(path).expect("the file opens"), &mut header)
        .expect("a redb header");
    assert_eq!(header[..9], MAGIC, "{} is not a redb file", path.display());
    header[9] & RECOVERY_REQUIRED != 0
}
