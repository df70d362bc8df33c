//! The `tally` command: `tally serve` runs the server, `tally call` sends one request.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally::config::{Config, Overrides};

/// mimalloc instead of the system allocator: requests are allocated on the
/// connection threads and freed on the journal and fan-out threads, and
/// glibc's malloc spent ~13% of the server's CPU on that under load
/// (`perf`); mimalloc frees across threads cheaply.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tally", version, about = "A ledger server for points, coins and tokens")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    ///
    /// With no arguments: 127.0.0.1:7707, data in ./tally-data.
    /// Example: TALLY_AUTH_ADMIN_PASSWORD=secret tally serve --preset campus
    Serve {
        /// TOML configuration file (every key can also be set as TALLY_<SECTION>_<KEY>).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:0 for any free port.
        #[arg(long)]
        listen: Option<String>,
        /// Data folder (created if missing).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Rule preset: "campus".
        #[arg(long)]
        preset: Option<String>,
    },
    /// Asks a running server for a consistent backup copy (admin).
    ///
    /// The copy is written by the server to DATA/backups/<OUT> through one
    /// read transaction while it keeps serving. To restore, copy that file to
    /// NEWDATA/tally.redb (and DATA/jwt.secret beside it to keep tokens valid)
    /// and run `tally serve --data NEWDATA`.
    ///
    /// Example: TALLY_PASSWORD=secret tally backup --user admin --out nightly-2026-11-21.redb
    #[command(verbatim_doc_comment)]
    Backup {
        #[command(flatten)]
        connect: Connect,
        /// Admin user to log in as (password from --password or TALLY_PASSWORD).
        #[arg(long, default_value = "admin")]
        user: String,
        /// Password for --user (prefer the TALLY_PASSWORD environment variable).
        #[arg(long, env = "TALLY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// File name of the copy under the server's DATA/backups/.
        #[arg(long)]
        out: String,
    },
    /// Administration on the host, against the data folder, while the
    /// server is stopped (the database refuses a second opener).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Sends one request and prints its result as JSON.
    ///
    /// Arguments are key=value pairs, typed like the text mode: integers,
    /// true/false, null, [a,b] lists, anything else a string.
    /// Exits 1 with the error code on stderr when the server refuses, and 3
    /// when the outcome is unknown (unknown_outcome, or no answer: none
    /// within --timeout, or the connection lost).
    ///
    /// Examples:
    ///   tally call ping
    ///   TALLY_PASSWORD=secret tally call --user admin create_account account=alice initial=100
    ///   tally call --user admin --password secret transfer from=alice to=bob amount=5 memo="for lunch"
    ///   TALLY_KEY=tally_... tally call --tls --ca ca.pem --connect localhost:7708 stats
    ///   tally call --connect 10.0.0.1:7707,10.0.0.2:7707,10.0.0.3:7707 --user admin balance account=alice
    ///
    /// With several addresses (a cluster's members) the request goes to the
    /// leader, following not_leader; a write whose answer was lost is sent
    /// again only if it carries key=..., and otherwise reported as
    /// unknown_outcome, with exit code 3 (it may or may not have been
    /// applied: do not simply retry without a key).
    #[command(verbatim_doc_comment)]
    Call {
        #[command(flatten)]
        connect: Connect,
        /// Log in as this user first (password from --password or TALLY_PASSWORD).
        #[arg(long)]
        user: Option<String>,
        /// Bind with this service key's secret (prefer the TALLY_KEY environment variable).
        #[arg(long, env = "TALLY_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Password for --user (prefer the TALLY_PASSWORD environment variable).
        #[arg(long, env = "TALLY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// The op, e.g. transfer.
        op: String,
        /// Arguments as key=value.
        args: Vec<String>,
    },
}

/// How `tally call` and `tally backup` reach the server.
#[derive(clap::Args)]
struct Connect {
    /// Server address (host:port; over TLS the certificate must name the
    /// host); for `call`, a cluster's members as host:port,host:port,...
    #[arg(long, default_value = tally::limits::LISTEN_DEFAULT)]
    connect: String,
    /// Speak TLS (to the server's [tls] listen port).
    #[arg(long)]
    tls: bool,
    /// With --tls: trust this CA file (PEM) instead of the system's roots.
    #[arg(long, requires = "tls")]
    ca: Option<PathBuf>,
    /// With --tls: present this client certificate (PEM), for mutual TLS.
    #[arg(long, requires_all = ["tls", "client_key"])]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Send a password or key without TLS to a host that is not this one.
    #[arg(long)]
    allow_plaintext: bool,
    /// Seconds to wait for each answer. Default: 60, and 3600 for audit,
    /// backup, bulk_add and reap, whose time grows with the ledger.
    /// Connecting takes at most 10 s whatever this says.
    #[arg(long, value_parser = seconds)]
    timeout: Option<std::time::Duration>,
}

/// A positive number of seconds.
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|f| std::time::Duration::try_from_secs_f64(f).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

impl Connect {
    /// Whether a credential would cross a network in clear: no TLS, to a
    /// host other than this one.
    fn exposes_credentials(&self) -> bool {
        if self.tls || self.allow_plaintext {
            return false;
        }
        self.addresses().iter().any(|addr| {
            let host = match addr.rsplit_once(':') {
                Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => addr,
            };
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            !loopback
        })
    }

    /// The addresses in `--connect`: one server's, or a cluster's members'.
    fn addresses(&self) -> Vec<&str> {
        self.connect.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
    }

    /// How long `op`'s answer may take: `--timeout`, else the client's
    /// default for the op.
    fn timeout(&self, op: &str) -> std::time::Duration {
        self.timeout.unwrap_or_else(|| tally::client::timeout_for(op))
    }

    fn tls(&self) -> tally::tls::ClientTls {
        tally::tls::ClientTls { ca: self.ca.clone(), cert: self.client_cert.clone().zip(self.client_key.clone()) }
    }

    async fn client(&self) -> Result<tally::client::Client, tally::client::ClientError> {
        if !self.tls {
            return tally::client::Client::connect(self.connect.as_str()).await;
        }
        tally::client::Client::connect_tls(&self.connect, &self.tls()).await
    }
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Sets a user's password and revokes every token of the user. This is
    /// how an admin's password is reset: `reset_password` over the wire
    /// never resets an admin.
    ///
    /// The new password comes from TALLY_NEW_PASSWORD, else from the first
    /// line of standard input.
    ///
    /// Example: TALLY_NEW_PASSWORD='a long new passphrase' tally admin reset-password --data ./tally-data admin
    #[command(verbatim_doc_comment)]
    ResetPassword {
        /// Data folder of the (stopped) server.
        #[arg(long, default_value = tally::limits::DATA_DEFAULT)]
        data: PathBuf,
        /// The user whose password is set.
        user: String,
    },
    /// Makes a service key and prints its id and secret (shown this once:
    /// the server keeps only a hash). Creates the data folder if needed, so
    /// a deployment can start with a key and no admin password.
    ///
    /// Example: tally admin create-key --data ./tally-data --name shop --role operator --accounts shop,till
    #[command(verbatim_doc_comment)]
    CreateKey {
        /// Data folder of the (stopped) server.
        #[arg(long, default_value = tally::limits::DATA_DEFAULT)]
        data: PathBuf,
        /// What the key is for, e.g. the application's name.
        #[arg(long)]
        name: String,
        /// admin, operator or auditor.
        #[arg(long)]
        role: String,
        /// Limit the key to moving money out of these accounts (comma-separated).
        #[arg(long, value_delimiter = ',')]
        accounts: Option<Vec<String>>,
        /// Dead after this many seconds (default: until revoked).
        #[arg(long)]
        expires_s: Option<u64>,
    },
}

/// Runs `tally admin reset-password`: returns the exit code.
fn admin_reset_password(data: &std::path::Path, user: &str) -> ExitCode {
    let password = match std::env::var("TALLY_NEW_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() {
                eprintln!("tally: cannot read the new password from standard input");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    match tally::admin::reset_password(data, user, &password) {
        Ok(()) => {
            println!("the password of {user} is set; every token of {user} is revoked");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A panic is a bug: rather than run on with an actor or the journal
/// missing, print it and stop the whole process at once. A restart replays
/// the journal, so nothing acknowledged is lost.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("tally: a thread panicked (a bug); aborting so that a restart recovers the ledger from the journal");
        std::process::abort();
    }));
}

/// Who `tally call` acts as: a user with a password, a key, or nobody.
enum As<'a> {
    Nobody,
    User(&'a str, Option<&'a str>),
    Key(&'a str),
}

/// Runs `tally call`: returns the exit code.
async fn call(connect: &Connect, who: As<'_>, op: &str, args: &[String]) -> ExitCode {
    let mut map = serde_json::Map::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            eprintln!("tally: argument {a:?} is not key=value");
            return ExitCode::from(2);
        };
        map.insert(k.to_owned(), tally::wire::text::bare_value(v.to_owned()).to_json());
    }
    if !matches!(who, As::Nobody) && connect.exposes_credentials() {
        eprintln!(
            "tally: refusing to send a password or key in clear to {}: use --tls (or --allow-plaintext)",
            connect.connect
        );
        return ExitCode::from(2);
    }
    if let As::User(_, None) = who {
        eprintln!("tally: --user needs --password or TALLY_PASSWORD");
        return ExitCode::from(2);
    }
    if connect.addresses().len() > 1 {
        return cluster_call(connect, who, op, serde_json::Value::Object(map)).await;
    }
    let client = match connect.client().await {
        Ok(c) => c.with_timeout(Some(connect.timeout(op))),
        Err(e) => {
            eprintln!("tally: cannot connect to {}: {e}", connect.connect);
            return ExitCode::FAILURE;
        }
    };
    let bound = match who {
        As::Nobody => Ok(serde_json::Value::Null),
        As::User(user, password) => client.login(user, password.unwrap_or_default()).await,
        As::Key(key) => client.call("auth", serde_json::json!({ "key": key })).await,
    };
    if let Err(e) = bound {
        eprintln!("tally: login failed: {e}");
        return ExitCode::FAILURE;
    }
    answer(client.call(op, serde_json::Value::Object(map)).await)
}

/// `tally call` against a cluster: to whichever member leads.
async fn cluster_call(connect: &Connect, who: As<'_>, op: &str, args: serde_json::Value) -> ExitCode {
    let members = connect.addresses().into_iter().map(str::to_owned).collect();
    let mut client = tally::client::ClusterClient::new(members).with_timeout(Some(connect.timeout(op)));
    if connect.tls {
        client = client.with_tls(connect.tls());
    }
    match who {
        As::Nobody => {}
        As::User(user, password) => {
            if let Err(e) = client.login(user, password.unwrap_or_default()).await {
                eprintln!("tally: login failed: {e}");
                return ExitCode::FAILURE;
            }
        }
        As::Key(key) => client.auth_key(key),
    }
    answer(client.call(op, args).await)
}

/// Prints an answer, or the error; the exit code says which (3: the
/// request may or may not have been applied).
fn answer(got: Result<serde_json::Value, tally::client::ClientError>) -> ExitCode {
    match got {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally: {e}");
            // Sent whole, and then no answer: it may or may not have been
            // applied. (`NotSent` was not: 1.)
            let lost = matches!(
                e,
                tally::client::ClientError::Timeout
                    | tally::client::ClientError::Closed
                    | tally::client::ClientError::Io(_)
            );
            if lost || e.code() == Some("unknown_outcome") {
                return ExitCode::from(3);
            }
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("tally: cannot start the runtime: {e}");
            None
        }
    }
}

/// Turns transparent huge pages off for the server. mimalloc asks for
/// them on its arenas, and every fresh 2 MiB page it touches is zeroed
/// whole by the kernel, inline in whichever thread touched it. In a
/// cluster that was 18% of the members' CPU under load (`perf`:
/// `clear_page_erms` under `do_huge_pmd_anonymous_page`, from mimalloc
/// extending its free lists). On a single server they lengthened the
/// latency tail: at 100,000 transfers/s offered, commits that stalled for
/// milliseconds were 1.5-3x as many, and the p99 was 1.3-17x that without
/// them (6 interleaved pairs). A large book lost nothing measurable (1M
/// and 10M accounts: the same throughput within the noise, and 10M loaded
/// faster). Figures: docs/performance.md.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's memory
    // map; a kernel without it answers EINVAL and nothing changes.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (a full disk under the log
        // file) is lost; reporting it would print to the same stderr,
        // whose failure panics, and a panic stops the server.
        .log_internal_errors(false)
        .with_filter(tally::cluster::quiet::Quiet::default());
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
        .with(lines)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen, data, preset } => {
            abort_on_panic();
            // Everything the server creates (database, secrets, mails,
            // backups) is for its own user only.
            #[cfg(unix)]
            // SAFETY: umask only sets the process's file-creation mask, and
            // signal(SIGXFSZ, SIG_IGN) only its disposition: a file-size
            // limit must reach the journal as a write error (which it
            // survives) rather than kill the process.
            unsafe {
                libc::umask(0o077);
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            }
            let overrides = Overrides { listen, data, preset };
            let config = match Config::load(config.as_deref(), std::env::vars(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tally: {e}");
                    return ExitCode::from(2);
                }
            };
            no_huge_pages();
            let workers = config.worker_threads();
            tracing::info!(workers, "starting the runtime");
            let Some(runtime) = runtime(Some(workers)) else { return ExitCode::FAILURE };
            match runtime.block_on(tally::server::serve(config)) {
                // Everything is on disk and the file closed: leave now
                // rather than free the ledger's memory piece by piece (8-13 s
                // with 10M accounts), which the system does at once.
                Ok(tally::server::Stopped::Closed) => std::process::exit(0),
                Ok(tally::server::Stopped::Open) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tally: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backup { connect, user, password, out } => {
            let Some(runtime) = runtime(None) else { return ExitCode::FAILURE };
            runtime.block_on(call(&connect, As::User(&user, password.as_deref()), "backup", &[format!("out={out}")]))
        }
        Command::Admin(AdminCommand::ResetPassword { data, user }) => admin_reset_password(&data, &user),
        Command::Admin(AdminCommand::CreateKey { data, name, role, accounts, expires_s }) => {
            #[cfg(unix)]
            // SAFETY: umask only sets the process's file-creation mask (a
            // data folder made here holds secrets, as the server's does).
            unsafe {
                libc::umask(0o077);
            }
            let new = tally::auth::NewKey { name: &name, role: &role, accounts, expires_s, created_by: "host" };
            match tally::admin::create_key(&data, new) {
                Ok(k) => {
                    println!("key_id {}", k.key_id);
                    println!("secret {}", k.secret);
                    eprintln!("tally: keep the secret now: it is not stored and cannot be shown again");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tally: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Call { connect, user, key, password, op, args } => {
            let Some(runtime) = runtime(None) else { return ExitCode::FAILURE };
            let who = match (&user, &key) {
                (Some(u), _) => As::User(u, password.as_deref()),
                (None, Some(k)) => As::Key(k),
                (None, None) => As::Nobody,
            };
            runtime.block_on(call(&connect, who, &op, &args))
        }
    }
}
