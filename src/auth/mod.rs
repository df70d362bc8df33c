//! Who is asking: password hashing (argon2), login tokens (HS256 JWT),
//! service keys, and the in-memory registry that checks them on every
//! request.
//!
//! Hashing a password costs tens of milliseconds by design, so it always
//! runs on the blocking pool, never on the threads that move money. A
//! service key's secret is 256 random bits, so a fast hash (BLAKE3) stores
//! it safely.

use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};

mod guard;
pub use guard::LoginGuard;

pub use crate::wire::Role;

/// Who a connection acts as: a user, or a service key.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The acting name, as records and logs show it: a user id, or
    /// `key:<key_id>` for a service key.
    pub user: Arc<str>,
    pub role: Role,
    /// A key limited to these accounts moves money out of them only.
    pub accounts: Option<Arc<[Box<str>]>>,
    /// A service key (whatever its name looks like), not a user.
    pub key: bool,
}

impl Principal {
    /// A user, with no account limit.
    #[must_use]
    pub fn user(user: &str, role: Role) -> Principal {
        Principal { user: user.into(), role, accounts: None, key: false }
    }

    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether it may read any account (staff), not only its own.
    #[must_use]
    pub fn sees_any(&self) -> bool {
        self.role.is_staff()
    }

    /// Whether it may move money out of `account`, owned by `owner()`: an
    /// admin or operator any (a limited key: its accounts only), an auditor
    /// none, a user the accounts it owns. The owner is asked for only for a
    /// user: in an owner shard it sits in the account's cold part, a cache
    /// miss on every staff debit otherwise (~3% of the server's CPU).
    #[must_use]
    pub fn may_debit<'a>(&self, account: &str, owner: impl FnOnce() -> Option<&'a str>) -> bool {
        match self.role {
            Role::Admin | Role::Operator => self.accounts.as_ref().is_none_or(|a| a.iter().any(|x| &**x == account)),
            Role::Auditor => false,
            Role::User => owner() == Some(&*self.user),
        }
    }
}

/// Hashes a password into an argon2id PHC string (blocking: call from the blocking pool).
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|_| ApiError::internal("could not hash the password"))
}

/// Checks a password against a PHC string in constant time (blocking).
#[must_use]
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// The claims inside a login token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    pub iat: u64,
    /// The user's token epoch when issued; a later epoch revokes this token.
    pub ep: u64,
    /// This token's id, which `logout` revokes alone.
    #[serde(default)]
    pub jti: String,
}

/// A token just issued.
pub struct Issued {
    pub token: String,
    pub jti: String,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// Issues and checks tokens with one HS256 secret.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    pub ttl_s: u64,
}

impl Tokens {
    #[must_use]
    pub fn new(secret: &[u8], ttl_s: u64) -> Tokens {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is exact: a token is dead the second its lifetime ends.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_s,
        }
    }

    /// A token for `user`, with its id and expiry.
    pub fn issue(&self, user: &str, role: Role, epoch: u64) -> Result<Issued, ApiError> {
        let now = crate::clock::now_ms() / 1000;
        let claims = Claims {
            sub: user.to_owned(),
            role: role.as_str().to_owned(),
            exp: now + self.ttl_s,
            iat: now,
            ep: epoch,
            jti: crate::random::hex::<16>()?,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| ApiError::internal("could not sign the token"))?;
        Ok(Issued { token, jti: claims.jti, expires_ms: claims.exp * 1000 })
    }

    /// The claims of a valid token; anything else is `unauthenticated`.
    pub fn check(&self, token: &str) -> Result<Claims, ApiError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| ApiError::new(ErrorCode::Unauthenticated, format!("invalid token: {}", e.kind_name())))?;
        // The JWT check works in whole seconds and lets a token live through
        // the second of its `exp`; `expires_at` (exp x 1000 ms) is exact.
        if crate::clock::now_ms() >= claims.exp.saturating_mul(1000) {
            return Err(ApiError::new(ErrorCode::Unauthenticated, "invalid token: expired"));
        }
        Ok(claims)
    }
}

trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for jsonwebtoken::errors::Error {
    fn kind_name(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind as K;
        match self.kind() {
            K::ExpiredSignature => "expired",
            K::InvalidSignature => "bad signature",
            K::InvalidAlgorithm => "wrong algorithm",
            _ => "malformed",
        }
    }
}

/// The JWT secret: from config, else generated once (CSPRNG) and kept in
/// the data folder with mode 0600.
pub fn load_secret(configured: Option<&str>, data: &Path) -> std::io::Result<Vec<u8>> {
    if let Some(s) = configured {
        return Ok(s.as_bytes().to_vec());
    }
    let path = data.join("jwt.secret");
    match std::fs::read(&path) {
        Ok(s) if s.len() >= 32 => return Ok(s),
        Ok(_) => {
            return Err(std::io::Error::other(format!("{} is too short", path.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let hexed = crate::random::hex::<32>().map_err(|e| std::io::Error::other(e.message))?.into_bytes();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path)?;
    std::io::Write::write_all(&mut f, &hexed)?;
    f.sync_all()?;
    Ok(hexed)
}

/// What the server keeps in memory about each user: enough to check a
/// token on every request without touching the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserState {
    pub role: Role,
    /// Tokens carrying an older epoch are revoked.
    pub epoch: u64,
    /// Ids of tokens revoked one by one (`logout`), until they expire.
    pub revoked: Arc<[Box<str>]>,
    pub group: Option<Box<str>>,
    pub events: u64,
}

impl UserState {
    #[must_use]
    pub fn of(u: &crate::store::UserRecord) -> UserState {
        UserState {
            role: Role::parse(&u.role),
            epoch: u.token_epoch,
            revoked: u.revoked_tokens.iter().map(|(jti, _)| jti.as_str().into()).collect(),
            group: u.group.as_deref().map(Into::into),
            events: u.events,
        }
    }
}

/// What the registry keeps about a service key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub role: Role,
    pub accounts: Option<Arc<[Box<str>]>>,
    /// BLAKE3 of the secret.
    pub hash: [u8; 32],
    /// Dead from this time on (ms since the epoch); `u64::MAX`: never.
    pub expires_ms: u64,
    pub revoked: bool,
}

impl KeyState {
    #[must_use]
    pub fn of(k: &crate::store::KeyRecord) -> KeyState {
        KeyState {
            role: Role::parse(&k.role),
            accounts: k.accounts.as_ref().map(|a| a.iter().map(|x| x.as_str().into()).collect()),
            hash: k.hash,
            expires_ms: k.expires_at.unwrap_or(u64::MAX),
            revoked: k.revoked_at.is_some(),
        }
    }

    /// The principal a connection bound with this key acts as.
    #[must_use]
    pub fn principal(&self, key_id: &str) -> Principal {
        Principal {
            user: format!("{KEY_ACTOR_PREFIX}{key_id}").into(),
            role: self.role,
            accounts: self.accounts.clone(),
            key: true,
        }
    }
}

/// How records and logs name a service key: `key:<key_id>` (user ids
/// cannot start with it).
pub const KEY_ACTOR_PREFIX: &str = "key:";

/// A service key's secret: `tally_<key_id>_<43 characters>`, so that the
/// key is found without trying every hash.
pub struct KeySecret {
    pub key_id: String,
    pub secret: String,
}

/// Characters of a secret's random part (base64url of 32 bytes).
const KEY_SECRET_CHARS: usize = 43;

impl KeySecret {
    /// A new key id and secret from the OS's CSPRNG.
    pub fn generate() -> Result<KeySecret, ApiError> {
        let key_id = crate::random::hex::<6>()?;
        let random = crate::random::base64url::<32>()?;
        Ok(KeySecret { secret: format!("tally_{key_id}_{random}"), key_id })
    }

    /// The key id in a secret, if it has the shape of one.
    #[must_use]
    pub fn key_id_of(secret: &str) -> Option<&str> {
        let rest = secret.strip_prefix("tally_")?;
        let (id, random) = rest.split_once('_')?;
        (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && random.len() == KEY_SECRET_CHARS).then_some(id)
    }

    /// What is stored of a secret.
    #[must_use]
    pub fn hash(secret: &str) -> [u8; 32] {
        *blake3::hash(secret.as_bytes()).as_bytes()
    }
}

/// What `create_key` (and `tally admin create-key`) asks for.
pub struct NewKey<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub accounts: Option<Vec<String>>,
    pub expires_s: Option<u64>,
    /// Who creates it: a user id, `key:<key_id>`, or `host` for the CLI.
    pub created_by: &'a str,
}

impl NewKey<'_> {
    /// Checks the request and makes the key: its secret (to show once)
    /// and its record (which holds only the secret's hash).
    pub fn make(self, now_ms: u64) -> Result<(KeySecret, crate::store::KeyRecord), ApiError> {
        use crate::limits::{KEY_ACCOUNTS_MAX, KEY_EXPIRES_S_MAX, KEY_NAME_BYTES_MAX};
        let name = self.name.trim();
        if name.is_empty() || name.len() > KEY_NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!("name must be 1-{KEY_NAME_BYTES_MAX} bytes of printable text")));
        }
        // A key acts for a service, not a person: it owns no accounts, so
        // the `user` role would let it do nothing.
        let role = match Role::from_name(self.role) {
            Some(r) if r.is_staff() => r,
            _ => return Err(ApiError::bad_request("a key's role is admin, operator or auditor")),
        };
        if let Some(accounts) = &self.accounts {
            // An admin key could make itself an unlimited key or user.
            if role == Role::Admin {
                return Err(ApiError::bad_request("an admin key cannot be limited to accounts: use role operator"));
            }
            if accounts.is_empty() || accounts.len() > KEY_ACCOUNTS_MAX {
                return Err(ApiError::bad_request(format!("accounts lists 1-{KEY_ACCOUNTS_MAX} accounts")));
            }
            for a in accounts {
                crate::ledger::validate_account_id(a)?;
            }
        }
        let expires_at = match self.expires_s {
            None => None,
            Some(s) if (1..=KEY_EXPIRES_S_MAX).contains(&s) => Some(now_ms + s * 1000),
            Some(_) => return Err(ApiError::bad_request(format!("expires_s must be 1..={KEY_EXPIRES_S_MAX}"))),
        };
        let secret = KeySecret::generate()?;
        let record = crate::store::KeyRecord {
            key_id: secret.key_id.clone(),
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            accounts: self.accounts,
            hash: KeySecret::hash(&secret.secret),
            created: now_ms,
            created_by: self.created_by.to_owned(),
            expires_at,
            revoked_at: None,
            revoked_by: None,
        };
        Ok((secret, record))
    }
}

/// Every user's [`UserState`]. Writes come only from the fan-out task
/// after a commit (and from start-up); each write bumps `generation`, so a
/// connection re-checks its token only when something changed.
#[derive(Default)]
pub struct Users {
    map: std::sync::RwLock<std::collections::HashMap<Box<str>, UserState>>,
    keys: std::sync::RwLock<std::collections::HashMap<Box<str>, KeyState>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Users {
    /// Sets every user and key the database holds (a ledger's start, and a
    /// cluster member handing a started ledger its registry).
    pub fn load(&self, db: &redb::Database) -> Result<(), crate::store::StoreError> {
        for u in crate::store::load_users(db)? {
            if u.user.starts_with(KEY_ACTOR_PREFIX) {
                // Made before such ids were refused: records by this user
                // read like a key's.
                tracing::warn!(target: "security", user = %u.user, "a user id that looks like a service key's; rename the user");
            }
            self.set(&u.user, UserState::of(&u));
        }
        for k in crate::store::load_keys(db)? {
            self.set_key(&k.key_id, KeyState::of(&k));
        }
        Ok(())
    }

    #[must_use]
    pub fn get(&self, user: &str) -> Option<UserState> {
        self.map.read().ok()?.get(user).cloned()
    }

    pub fn set(&self, user: &str, state: UserState) {
        if let Ok(mut m) = self.map.write() {
            m.insert(user.into(), state);
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    #[must_use]
    pub fn key(&self, key_id: &str) -> Option<KeyState> {
        self.keys.read().ok()?.get(key_id).cloned()
    }

    /// How many keys there are: (unrevoked, all).
    #[must_use]
    pub fn key_count(&self) -> (usize, usize) {
        self.keys.read().map_or((0, 0), |m| (m.values().filter(|k| !k.revoked).count(), m.len()))
    }

    pub fn set_key(&self, key_id: &str, state: KeyState) {
        if let Ok(mut m) = self.keys.write() {
            m.insert(key_id.into(), state);
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The user a connection is bound to, and what its token allows.
#[derive(Clone, Debug)]
pub struct Binding {
    pub principal: Principal,
    /// What the connection is bound with.
    pub by: Bound,
    pub epoch: u64,
    /// Token expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// [`Users::generation`] when the binding was last checked.
    pub checked: u64,
}

/// What a connection was bound with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// A login token, by its id.
    Token(Box<str>),
    /// A service key, by its id.
    Key(Box<str>),
}

/// Checks a new password: long enough to resist guessing, short enough to hash quickly.
pub fn validate_password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if n < crate::limits::PASSWORD_CHARS_MIN {
        return Err(ApiError::bad_request(format!(
            "passwords have at least {} characters",
            crate::limits::PASSWORD_CHARS_MIN
        )));
    }
    if password.len() > crate::limits::PASSWORD_BYTES_MAX {
        return Err(ApiError::bad_request("password too long"));
    }
    Ok(())
}

/// A plausible email address: one `@`, a dotted domain, no spaces.
pub fn validate_email(email: &str) -> Result<(), ApiError> {
    let bad = || ApiError::bad_request("invalid email address");
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = email.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err(bad());
    }
    Ok(())
}
