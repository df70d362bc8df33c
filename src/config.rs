//! Configuration: defaults, then the preset, then the TOML file, then
//! `TALLY_*` environment variables, then command-line flags; later wins.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limits::{
    BATCH_MAX_DEFAULT, BATCH_MAX_LIMIT, COMMIT_BATCH_LIMIT, COMMIT_BATCH_MAX, CONNECTIONS_MAX, DATA_DEFAULT,
    FRAME_BYTES_MAX, FRAME_READ_TIMEOUT_MS, HISTORY_SEGMENT_RECORDS, HISTORY_SEGMENT_RECORDS_LIMIT,
    HISTORY_SEGMENT_RECORDS_MIN, IDLE_ANONYMOUS_MS, INFLIGHT_MAX, INFLIGHT_PER_CONNECTION_MAX, LISTEN_DEFAULT,
    SHARDS_DEFAULT, TOKEN_TTL_S_DEFAULT, WRITE_TIMEOUT_MS,
};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid TOML in {path}: {source}")]
    Toml { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: String,
    pub data: PathBuf,
    pub text_mode: bool,
    pub preset: Option<String>,
    /// Number of shard actors owning the accounts.
    pub shards: usize,
    /// Threads of the async runtime (connections, shard actors, fan-out);
    /// 0: the machine's cores less one, which the journal thread needs.
    pub workers: usize,
    pub auth: AuthConfig,
    pub mail: MailConfig,
    pub otp: OtpConfig,
    pub limits: LimitsConfig,
    pub policy: PolicyConfig,
    pub tls: TlsConfig,
    pub http: HttpConfig,
    /// `[cluster]`: this server is one member of a replicated cluster;
    /// absent, it runs alone.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: which member this is, where it listens for the other
/// members, the secret they share, and every member (`[[cluster.node]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This member's id, one of the `[[cluster.node]]` ids.
    pub id: u64,
    /// Where this member listens for the other members' Raft traffic.
    pub raft_listen: String,
    /// The members' shared secret (at least 32 bytes): it proves a
    /// connection comes from a member and keys every frame between them.
    pub secret: String,
    /// Every member, this one included.
    #[serde(default)]
    pub node: Vec<NodeConfig>,
    /// A member snapshots its ledger after this many Raft entries (each a
    /// batch) and drops the log below it but for a tenth; a member further
    /// behind catches up through a snapshot.
    #[serde(default = "snapshot_every_default")]
    pub snapshot_every: u64,
}

fn snapshot_every_default() -> u64 {
    crate::limits::CLUSTER_SNAPSHOT_EVERY
}

impl std::fmt::Debug for ClusterConfig {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("id", &self.id)
            .field("raft_listen", &self.raft_listen)
            .field("secret", &"<set>")
            .field("node", &self.node)
            .field("snapshot_every", &self.snapshot_every)
            .finish()
    }
}

/// `[[cluster.node]]`: one member and its two addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    /// Where clients reach it (its `listen`, as clients see it).
    pub client: String,
    /// Where the other members reach its `raft_listen`.
    pub raft: String,
}

/// `[http]`: the HTTP/JSON gateway, the console and `/metrics`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the HTTP listener binds; absent or empty: no HTTP. HTTPS with
    /// the `[tls]` certificate when `[tls]` has one.
    pub listen: Option<String>,
    /// Whether anyone may read `/metrics`; otherwise callers from loopback
    /// addresses and staff tokens or keys only.
    pub metrics_public: bool,
}

impl HttpConfig {
    /// The HTTP listen address, if HTTP is on.
    #[must_use]
    pub fn listen(&self) -> Option<&str> {
        self.listen.as_deref().filter(|l| !l.is_empty())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub admin_password: Option<String>,
    pub jwt_secret: Option<String>,
    pub token_ttl_s: u64,
    pub signup: bool,
    /// Whether a login leaves the user's other tokens working.
    pub sessions: Sessions,
}

/// `auth.sessions`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sessions {
    /// A login does not revoke the user's other tokens; `logout` ends the
    /// caller's token, `logout all=true` every token of the user.
    #[default]
    Multi,
    /// A login revokes every older token of the user, and so does `logout`.
    Single,
}

/// `[tls]`: the same protocol inside TLS, on its own port.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Where the TLS listener binds; absent or empty: no TLS.
    pub listen: Option<String>,
    /// The certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// The private key, PEM.
    pub key: Option<PathBuf>,
    /// If set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// The TLS listen address, if TLS is on.
    #[must_use]
    pub fn listen(&self) -> Option<&str> {
        self.listen.as_deref().filter(|l| !l.is_empty())
    }
}

impl std::fmt::Debug for AuthConfig {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("admin_password", &self.admin_password.as_ref().map(|_| "<set>"))
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("token_ttl_s", &self.token_ttl_s)
            .field("signup", &self.signup)
            .field("sessions", &self.sessions)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// `smtp://host:port`, `smtps://user:pass@host:port`, `file:///dir` or
    /// `log`; absent: `file://` into `DATA/mail` (one `.eml` per message).
    pub transport: Option<String>,
    pub from: String,
}

impl std::fmt::Debug for MailConfig {
    // An smtps:// URL may carry the relay's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let transport = self.transport.as_deref().map(|t| match t.split_once('@') {
            Some((scheme_user, host)) => {
                format!("{}://<credentials>@{host}", scheme_user.split(':').next().unwrap_or(""))
            }
            None => t.to_owned(),
        });
        f.debug_struct("MailConfig").field("transport", &transport).field("from", &self.from).finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtpConfig {
    pub ttl_s: u64,
    pub tries_max: u32,
    pub resends_max: u32,
    pub transfer_min: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub min_balance: i64,
    pub max_balance: Option<i64>,
    pub frame_bytes_max: usize,
    pub connections_max: usize,
    pub inflight_per_connection_max: usize,
    pub inflight_max: usize,
    pub commit_batch_max: usize,
    /// Transfers in one `transfer_batch`.
    pub batch_max: usize,
    /// How long a peer may take to finish a frame or line it has started.
    pub frame_timeout_ms: u64,
    /// How long a socket may take to accept one batch of replies before the
    /// connection is closed.
    pub write_timeout_ms: u64,
    /// How long a connection that is not logged in may stay silent.
    pub idle_anonymous_ms: u64,
    /// Records in one sealed history segment; 0 keeps every record in the
    /// ledger file (`store::history`).
    pub history_segment_records: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub min_events: u64,
    pub fee_same_group_bps: u32,
    pub fee_cross_group_bps: u32,
    /// `"down"` (default) or `"up"`.
    pub fee_rounding: crate::ledger::FeeRounding,
}

impl Config {
    /// The runtime's worker threads: `workers`, or the cores less one (at
    /// least one). Under load the journal thread keeps about a core busy;
    /// a worker per core on top made the runtime's threads and the journal
    /// take turns on the same cores (measured on 2 cores: one worker gave
    /// ~14% more transfers/s and ~11% less CPU per transfer than two).
    #[must_use]
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: LISTEN_DEFAULT.into(),
            data: DATA_DEFAULT.into(),
            text_mode: true,
            preset: None,
            shards: SHARDS_DEFAULT,
            workers: 0,
            auth: AuthConfig::default(),
            mail: MailConfig::default(),
            otp: OtpConfig::default(),
            limits: LimitsConfig::default(),
            policy: PolicyConfig::default(),
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            cluster: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_password: None,
            jwt_secret: None,
            token_ttl_s: TOKEN_TTL_S_DEFAULT,
            signup: true,
            sessions: Sessions::Multi,
        }
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig { transport: None, from: "Tally <noreply@localhost>".into() }
    }
}

impl Default for OtpConfig {
    fn default() -> Self {
        OtpConfig { ttl_s: 120, tries_max: 5, resends_max: 3, transfer_min: None }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            min_balance: 0,
            max_balance: None,
            frame_bytes_max: FRAME_BYTES_MAX,
            connections_max: CONNECTIONS_MAX,
            inflight_per_connection_max: INFLIGHT_PER_CONNECTION_MAX,
            inflight_max: INFLIGHT_MAX,
            commit_batch_max: COMMIT_BATCH_MAX,
            batch_max: BATCH_MAX_DEFAULT,
            frame_timeout_ms: FRAME_READ_TIMEOUT_MS,
            write_timeout_ms: WRITE_TIMEOUT_MS,
            idle_anonymous_ms: IDLE_ANONYMOUS_MS,
            history_segment_records: HISTORY_SEGMENT_RECORDS,
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.secret.len() < 32 {
            return bad("cluster.secret must be at least 32 bytes (e.g. 64 hex digits from a random source)".into());
        }
        if self.raft_listen.is_empty() {
            return bad("cluster.raft_listen is empty".into());
        }
        if !(10..=10_000_000).contains(&self.snapshot_every) {
            return bad("cluster.snapshot_every must be 10..=10000000".into());
        }
        if self.node.is_empty() || self.node.len() > crate::limits::CLUSTER_MEMBERS_MAX {
            return bad(format!("[[cluster.node]] must list 1..={} members", crate::limits::CLUSTER_MEMBERS_MAX));
        }
        let mut ids: Vec<u64> = self.node.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("two [[cluster.node]] have the same id".into());
        }
        if !ids.contains(&self.id) {
            return bad(format!("cluster.id {} is not one of the [[cluster.node]] ids", self.id));
        }
        if self.node.iter().any(|n| n.client.is_empty() || n.raft.is_empty()) {
            return bad("every [[cluster.node]] needs a client and a raft address".into());
        }
        Ok(())
    }

    /// This member's own entry.
    #[must_use]
    pub fn me(&self) -> Option<&NodeConfig> {
        self.node.iter().find(|n| n.id == self.id)
    }
}

/// Keys that may be set from the environment, per section ("" = top level).
const KEYS: &[(&str, &[&str])] = &[
    ("", &["listen", "data", "text_mode", "preset", "shards", "workers"]),
    ("auth", &["admin_password", "jwt_secret", "token_ttl_s", "signup", "sessions"]),
    ("tls", &["listen", "cert", "key", "client_ca"]),
    ("http", &["listen", "metrics_public"]),
    ("cluster", &["id", "raft_listen", "secret", "snapshot_every"]),
    ("mail", &["transport", "from"]),
    ("otp", &["ttl_s", "tries_max", "resends_max", "transfer_min"]),
    (
        "limits",
        &[
            "min_balance",
            "max_balance",
            "frame_bytes_max",
            "connections_max",
            "inflight_per_connection_max",
            "inflight_max",
            "commit_batch_max",
            "batch_max",
            "frame_timeout_ms",
            "write_timeout_ms",
            "idle_anonymous_ms",
            "history_segment_records",
        ],
    ),
    ("policy", &["min_events", "fee_same_group_bps", "fee_cross_group_bps", "fee_rounding"]),
];

/// `TALLY_*` variables read by the client side and the test scripts, not
/// by the server: present in the environment, they are not mistakes.
pub const CLIENT_VARIABLES: &[&str] = &[
    "TALLY_PASSWORD",     // tally call / backup: the password of --user
    "TALLY_KEY",          // tally call: a service key's secret
    "TALLY_NEW_PASSWORD", // tally admin reset-password
    "TALLY_LOG",          // the log filter (tracing's EnvFilter syntax)
    "TALLY_BIN",          // tests: the server binary the Python tests start
    "TALLY_TEST_PYTHON",  // tests: the Python that runs the client tests
    "TALLY_VENV",         // tests: where run-all.sh keeps its Python venv
];

/// The `TALLY_*` name of every setting, e.g. `TALLY_LIMITS_MAX_BALANCE`.
fn variable_names() -> Vec<String> {
    KEYS.iter()
        .flat_map(|(sec, keys)| {
            keys.iter().map(move |k| {
                if sec.is_empty() {
                    format!("TALLY_{}", k.to_ascii_uppercase())
                } else {
                    format!("TALLY_{}_{}", sec.to_ascii_uppercase(), k.to_ascii_uppercase())
                }
            })
        })
        .collect()
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Why `name` (a `TALLY_*` variable that names no setting) is refused,
/// with the nearest setting when there is a close one.
fn unknown_variable(name: &str) -> String {
    let names = variable_names();
    // A setting whose name contains this one minus its section, e.g.
    // TALLY_ADMIN_PASSWORD for TALLY_AUTH_ADMIN_PASSWORD.
    let tail = name.strip_prefix("TALLY_").unwrap_or(name);
    let nearest = names
        .iter()
        .map(|n| (distance(name, n), n))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, n)| n.clone())
        .or_else(|| names.iter().find(|n| n.ends_with(&format!("_{tail}"))).cloned());
    match nearest {
        Some(n) => format!("{name} names no setting (did you mean {n}?); the server does not start with it set"),
        None => format!(
            "{name} names no setting; the settings are TALLY_<SECTION>_<KEY> (see the README), and the \
             client-side variables are {}",
            CLIENT_VARIABLES.join(", ")
        ),
    }
}

/// The campus-coin rules (README, "Configuration").
fn campus_preset() -> toml::Table {
    toml::from_str(
        r#"
        [limits]
        min_balance = 0
        max_balance = 10001
        [policy]
        min_events = 6
        fee_same_group_bps = 200
        fee_cross_group_bps = 3300
        fee_rounding = "up"
        [otp]
        transfer_min = 1
        [auth]
        sessions = "single"
        "#,
    )
    .expect("the campus preset is valid TOML")
}

fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn section<'a>(table: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    if name.is_empty() {
        return table;
    }
    let entry = table.entry(name.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    entry.as_table_mut().expect("made a table above")
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Command-line values that override everything else.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub preset: Option<String>,
}

impl Config {
    /// Builds the configuration from a file, environment variables and flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut user = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                toml::from_str(&text)
                    .map_err(|source| ConfigError::Toml { path: path.to_owned(), source: Box::new(source) })?
            }
        };
        // A misspelt variable must not leave a limit silently unset.
        let mut unknown = Vec::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("TALLY_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let mut known = false;
            for (sec, keys) in KEYS {
                let key = if sec.is_empty() {
                    Some(rest.as_str())
                } else {
                    rest.strip_prefix(sec).and_then(|r| r.strip_prefix('_'))
                };
                if let Some(key) = key.filter(|k| keys.contains(k)) {
                    section(&mut user, sec).insert(key.to_owned(), env_value(&raw));
                    known = true;
                }
            }
            if !known && !CLIENT_VARIABLES.contains(&name.as_str()) {
                unknown.push(unknown_variable(&name));
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::Invalid(unknown.join("; ")));
        }
        if let Some(l) = &overrides.listen {
            user.insert("listen".into(), toml::Value::String(l.clone()));
        }
        if let Some(d) = &overrides.data {
            user.insert("data".into(), toml::Value::String(d.display().to_string()));
        }
        if let Some(p) = &overrides.preset {
            user.insert("preset".into(), toml::Value::String(p.clone()));
        }
        let mut merged = match user.get("preset").map(|p| p.as_str()) {
            None => toml::Table::new(),
            Some(Some("campus")) => campus_preset(),
            Some(other) => return Err(ConfigError::Invalid(format!("unknown preset {other:?} (known: \"campus\")"))),
        };
        merge(&mut merged, user);
        let config: Config =
            toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if let Some(max) = self.limits.max_balance {
            if max < self.limits.min_balance {
                return bad("limits.max_balance is below limits.min_balance");
            }
        }
        if self.limits.frame_bytes_max == 0 || self.limits.frame_bytes_max > FRAME_BYTES_MAX * 16 {
            return bad("limits.frame_bytes_max must be 1..=16 MiB");
        }
        if !(1..=CONNECTIONS_MAX * 10).contains(&self.limits.connections_max) {
            return bad("limits.connections_max must be 1..=100000");
        }
        if !(1..=65_536).contains(&self.limits.inflight_per_connection_max) {
            return bad("limits.inflight_per_connection_max must be 1..=65536");
        }
        if !(1..=INFLIGHT_MAX * 8).contains(&self.limits.inflight_max) {
            return bad("limits.inflight_max must be 1..=1048576");
        }
        if !(1..=BATCH_MAX_LIMIT).contains(&self.limits.batch_max) {
            return bad("limits.batch_max must be 1..=10000");
        }
        if !(1..=COMMIT_BATCH_LIMIT).contains(&self.limits.commit_batch_max) {
            return bad("limits.commit_batch_max must be 1..=65536");
        }
        let segment = self.limits.history_segment_records;
        if segment != 0 && !(HISTORY_SEGMENT_RECORDS_MIN..=HISTORY_SEGMENT_RECORDS_LIMIT).contains(&segment) {
            return bad("limits.history_segment_records must be 0 or 256..=4294967296");
        }
        if !(1..=1024).contains(&self.shards) {
            return bad("shards must be 1..=1024");
        }
        if self.workers > 1024 {
            return bad("workers must be 0..=1024 (0: cores less one)");
        }
        if self.policy.fee_same_group_bps > 10_000 || self.policy.fee_cross_group_bps > 10_000 {
            return bad("fees are at most 10000 basis points");
        }
        if !(100..=600_000).contains(&self.limits.frame_timeout_ms) {
            return bad("limits.frame_timeout_ms must be 100..=600000");
        }
        if !(100..=600_000).contains(&self.limits.write_timeout_ms) {
            return bad("limits.write_timeout_ms must be 100..=600000");
        }
        if !(100..=86_400_000).contains(&self.limits.idle_anonymous_ms) {
            return bad("limits.idle_anonymous_ms must be 100..=86400000");
        }
        if !(1..=86_400).contains(&self.otp.ttl_s) {
            return bad("otp.ttl_s must be 1..=86400");
        }
        if !(1..=100).contains(&self.otp.tries_max) || self.otp.resends_max > 100 {
            return bad("otp.tries_max must be 1..=100 and otp.resends_max at most 100");
        }
        if self.mail.from.parse::<lettre::message::Mailbox>().is_err() {
            return bad("mail.from must be a mail address, e.g. \"Tally <noreply@example.org>\"");
        }
        if self.auth.token_ttl_s == 0 {
            return bad("auth.token_ttl_s must be positive");
        }
        if self.listen.is_empty() && self.tls.listen().is_none() {
            return bad("listen is empty and tls.listen is not set: the server would not listen anywhere");
        }
        if self.tls.listen().is_some() && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return bad("tls.listen needs tls.cert and tls.key (PEM files)");
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if self.auth.admin_password.is_none() {
                // Each member would make its own admin with its own password.
                return bad("a cluster needs auth.admin_password, the same on every member");
            }
        }
        if let Some(pw) = &self.auth.admin_password {
            // An empty or short value (a variable set to nothing, say) must
            // not become the admin's password.
            if crate::auth::validate_password(pw).is_err() {
                return bad("auth.admin_password must be 8-1024 characters (or unset)");
            }
        }
        Ok(())
    }

    /// The JWT secret: `auth.jwt_secret`, or in a cluster one derived from
    /// the cluster's secret, so that a token issued by one leader works on
    /// the next (a member's own `jwt.secret` file would differ).
    #[must_use]
    pub fn jwt_secret(&self) -> Option<String> {
        match (&self.auth.jwt_secret, &self.cluster) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(c)) => {
                let key = blake3::derive_key("tally 2026 cluster jwt secret", c.secret.as_bytes());
                Some(key.iter().map(|b| format!("{b:02x}")).collect())
            }
            (None, None) => None,
        }
    }

    /// `mail.transport`, with the default (`DATA/mail`) filled in.
    #[must_use]
    pub fn mail_transport(&self) -> String {
        match &self.mail.transport {
            Some(t) => t.clone(),
            None => {
                let dir = std::path::absolute(self.data.join("mail")).unwrap_or_else(|_| self.data.join("mail"));
                format!("file://{}", dir.display())
            }
        }
    }

    /// The campus rules for the ledger core.
    #[must_use]
    pub fn ledger_policy(&self) -> crate::ledger::Policy {
        crate::ledger::Policy {
            min_events: self.policy.min_events,
            fee_same_group_bps: self.policy.fee_same_group_bps,
            fee_cross_group_bps: self.policy.fee_cross_group_bps,
            fee_rounding: self.policy.fee_rounding,
        }
    }

    /// The balance bounds for the ledger core.
    #[must_use]
    pub fn ledger_limits(&self) -> crate::ledger::Limits {
        crate::ledger::Limits { min_balance: self.limits.min_balance, max_balance: self.limits.max_balance }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7707");
        assert_eq!(c.limits.max_balance, None);
        assert_eq!(c.otp.transfer_min, None);
    }

    #[test]
    fn preset_then_env_then_flags() {
        let c = Config::load(
            None,
            env(&[
                ("TALLY_PRESET", "campus"),
                ("TALLY_OTP_TRANSFER_MIN", "0"),
                ("TALLY_LISTEN", "0.0.0.0:1"),
                ("TALLY_PASSWORD", "ignored: not a config key"),
            ]),
            &Overrides { listen: Some("127.0.0.1:9".into()), ..Overrides::default() },
        )
        .unwrap();
        assert_eq!(c.limits.max_balance, Some(10001));
        assert_eq!(c.policy.fee_cross_group_bps, 3300);
        assert_eq!(c.otp.transfer_min, Some(0));
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.auth.sessions, Sessions::Single);
    }

    #[test]
    fn sessions_default_to_multi_and_tls_needs_a_cert() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.auth.sessions, Sessions::Multi);
        assert_eq!(c.tls.listen(), None);
        let e = Config::load(None, env(&[("TALLY_TLS_LISTEN", "127.0.0.1:0")]), &Overrides::default()).unwrap_err();
        assert_eq!(e.to_string(), "invalid configuration: tls.listen needs tls.cert and tls.key (PEM files)");
        let e = Config::load(None, env(&[("TALLY_LISTEN", "")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("would not listen anywhere"), "{e}");
        let e = Config::load(None, env(&[("TALLY_AUTH_SESSIONS", "many")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("unknown variant `many`"), "{e}");
    }

    #[test]
    fn file_keys_override_the_preset_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "preset = \"campus\"\n[limits]\nmax_balance = 500\n").unwrap();
        let c = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.limits.max_balance, Some(500));
        assert_eq!(c.policy.min_events, 6);
        std::fs::write(&path, "[limits]\nmax_balanse = 500\n").unwrap();
        assert!(Config::load(Some(&path), env(&[]), &Overrides::default()).is_err());
        std::fs::write(&path, "preset = \"casino\"\n").unwrap();
        assert!(Config::load(Some(&path), env(&[]), &Overrides::default()).is_err());
    }

    #[test]
    fn unknown_variables_are_refused_by_name() {
        let e = Config::load(None, env(&[("TALLY_LIMITS_MAX_BALANC", "5")]), &Overrides::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: TALLY_LIMITS_MAX_BALANC names no setting (did you mean \
             TALLY_LIMITS_MAX_BALANCE?); the server does not start with it set"
        );
        let e = Config::load(None, env(&[("TALLY_ADMIN_PASSWORD", "x")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("did you mean TALLY_AUTH_ADMIN_PASSWORD?"), "{e}");
        let e = Config::load(None, env(&[("TALLY_FROBNICATE", "1")]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("TALLY_FROBNICATE names no setting;"), "{e}");
        // The client-side ones are allowed.
        let client: Vec<(&str, &str)> = CLIENT_VARIABLES.iter().map(|n| (*n, "x")).collect();
        Config::load(None, env(&client), &Overrides::default()).unwrap();
    }

    #[test]
    fn workers_default_to_the_cores_less_one() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.worker_threads(), (cores - 1).max(1));
        let c = Config::load(None, env(&[("TALLY_WORKERS", "3")]), &Overrides::default()).unwrap();
        assert_eq!(c.worker_threads(), 3);
        assert!(Config::load(None, env(&[("TALLY_WORKERS", "1025")]), &Overrides::default()).is_err());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let c = Config::load(
            None,
            env(&[
                ("TALLY_AUTH_ADMIN_PASSWORD", "hunter2-secret"),
                ("TALLY_MAIL_TRANSPORT", "smtps://tally:relay-secret@mail.example.org:465"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2-secret"));
        assert!(!shown.contains("relay-secret"), "{shown}");
        assert!(shown.contains("mail.example.org:465"), "{shown}");
    }

    /// A three-member `[cluster]` file for member `id`, with `secret`.
    fn cluster_file(dir: &Path, id: u64, secret: &str) -> PathBuf {
        let nodes: String = (1..=3)
            .map(|n| {
                format!("[[cluster.node]]\nid = {n}\nclient = \"127.0.0.1:770{n}\"\nraft = \"127.0.0.1:780{n}\"\n")
            })
            .collect();
        let text = format!("[cluster]\nid = {id}\nraft_listen = \"127.0.0.1:7801\"\nsecret = \"{secret}\"\n{nodes}");
        let path = dir.join(format!("c{id}-{}.toml", secret.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_cluster_needs_a_long_secret_a_listed_id_and_an_admin_password_and_hides_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "0123456789abcdef0123456789abcdef-cluster";
        let pw = ("TALLY_AUTH_ADMIN_PASSWORD", "a-long-password");
        let c = Config::load(Some(&cluster_file(dir.path(), 2, secret)), env(&[pw]), &Overrides::default()).unwrap();
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!((cluster.id, cluster.node.len(), cluster.me().unwrap().client.as_str()), (2, 3, "127.0.0.1:7702"));
        assert!(!format!("{c:?}").contains(secret));
        // Every member derives the same JWT secret, and not the cluster's.
        let jwt = c.jwt_secret().unwrap();
        assert_eq!(jwt.len(), 64);
        assert!(!jwt.contains(secret));
        // The id may come from the environment.
        let c = Config::load(
            Some(&cluster_file(dir.path(), 2, secret)),
            env(&[pw, ("TALLY_CLUSTER_ID", "3")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.cluster.unwrap().id, 3);
        let refused = |file: PathBuf, vars: &[(&str, &str)]| {
            Config::load(Some(&file), env(vars), &Overrides::default()).unwrap_err().to_string()
        };
        let e = refused(cluster_file(dir.path(), 2, "short"), &[pw]);
        assert!(e.contains("cluster.secret must be at least 32 bytes"), "{e}");
        let e = refused(cluster_file(dir.path(), 4, secret), &[pw]);
        assert!(e.contains("cluster.id 4 is not one of the [[cluster.node]] ids"), "{e}");
        let e = refused(cluster_file(dir.path(), 1, secret), &[]);
        assert!(e.contains("a cluster needs auth.admin_password"), "{e}");
    }

    #[test]
    fn the_compose_cluster_file_needs_its_secret_from_the_environment() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/cluster.toml");
        let pw = ("TALLY_AUTH_ADMIN_PASSWORD", "a-long-password");
        let e = Config::load(Some(&file), env(&[pw]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("cluster.secret must be at least 32 bytes"), "{e}");
        let secret = ("TALLY_CLUSTER_SECRET", "0123456789abcdef0123456789abcdef");
        let c =
            Config::load(Some(&file), env(&[pw, secret, ("TALLY_CLUSTER_ID", "3")]), &Overrides::default()).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!((cluster.id, cluster.me().unwrap().raft.as_str()), (3, "tally-3:7801"));
    }
}
