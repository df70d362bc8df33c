//! Who is asking: password hashing (argon2) and login tokens (HS256 JWT).
//!
//! Hashing costs tens of milliseconds by design, so it always runs on the
//! blocking pool, never on the threads that move money.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::constants::{GUARD_ENTRIES_MAX, LOGIN_PAIR, LOGIN_SOURCE, LOGIN_UNDER_ATTACK, LOGIN_USER_FAILURES_MAX};
use crate::error::{ApiError, ErrorCode};
use crate::guard::{source_key, Backoff, Table};

/// A user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    User,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
    #[must_use]
    pub fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// The user a connection is bound to.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user: Arc<str>,
    pub role: Role,
}

impl Principal {
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
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

    /// A token for `user`, and its expiry in milliseconds.
    pub fn issue(&self, user: &str, role: Role, epoch: u64) -> Result<(String, u64), ApiError> {
        let now = crate::store::now_ms() / 1000;
        let claims =
            Claims { sub: user.to_owned(), role: role.as_str().to_owned(), exp: now + self.ttl_s, iat: now, ep: epoch };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| ApiError::internal("could not sign the token"))?;
        Ok((token, claims.exp * 1000))
    }

    /// The claims of a valid token; anything else is `unauthenticated`.
    pub fn check(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| ApiError::new(ErrorCode::Unauthenticated, format!("invalid token: {}", e.kind_name())))
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
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hexed = crate::store::hex(&secret).into_bytes();
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
    pub group: Option<Box<str>>,
    pub events: u64,
}

impl UserState {
    #[must_use]
    pub fn of(u: &crate::store::UserRecord) -> UserState {
        UserState {
            role: Role::parse(&u.role),
            epoch: u.token_epoch,
            group: u.group.as_deref().map(Into::into),
            events: u.events,
        }
    }
}

/// Every user's [`UserState`]. Writes come only from the fan-out task
/// after a commit (and from start-up); each write bumps `generation`, so a
/// connection re-checks its token only when something changed.
#[derive(Default)]
pub struct Users {
    map: std::sync::RwLock<std::collections::HashMap<Box<str>, UserState>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Users {
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
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The user a connection is bound to, and what its token allows.
#[derive(Clone, Debug)]
pub struct Binding {
    pub principal: Principal,
    pub epoch: u64,
    /// Token expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// [`Users::generation`] when the binding was last checked.
    pub checked: u64,
}

/// Wrong passwords, counted three ways so that guessing is slow and a
/// guesser cannot lock anyone else out (constants in `constants.rs`):
///
/// - per (user, source address): 5 free, then waits from 1 s doubling;
///   this is what a guesser from one address meets.
/// - per user, from any address: past `LOGIN_USER_FAILURES_MAX` the user is
///   under attack, and each address that has failed for the user gets one
///   free try, then waits from a minute. An address with no failure for
///   the user is let through at once: the right password from elsewhere
///   always gets its try.
/// - per source address, whatever the user: a spray across many user ids
///   gets 20 free, then waits from 1 s doubling.
///
/// The tables are bounded; when one is full of live entries, a new key is
/// refused (`rate_limited`) rather than forgetting someone's failures.
pub struct LoginGuard {
    inner: std::sync::Mutex<GuardTables>,
}

struct GuardTables {
    pairs: Table<(Box<str>, IpAddr), Backoff>,
    users: Table<Box<str>, Backoff>,
    sources: Table<IpAddr, Backoff>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard {
            inner: std::sync::Mutex::new(GuardTables {
                pairs: Table::new(GUARD_ENTRIES_MAX),
                users: Table::new(GUARD_ENTRIES_MAX),
                sources: Table::new(GUARD_ENTRIES_MAX),
            }),
        }
    }
}

fn refused(wait_ms: u64) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!("too many failed logins; try again in {}", crate::guard::wait_text(wait_ms)),
    )
}

impl LoginGuard {
    /// `Err(rate_limited)` while a password from `source` for `user` must
    /// wait; the password is then not even checked.
    pub fn check(&self, user: &str, source: IpAddr, now_ms: u64) -> Result<(), ApiError> {
        let source = source_key(source);
        let Ok(t) = self.inner.lock() else { return Err(refused(1000)) };
        if let Some(s) = t.sources.get(&source) {
            let wait = s.wait_ms(&LOGIN_SOURCE, now_ms);
            if wait > 0 {
                return Err(refused(wait));
            }
        }
        let Some(pair) = t.pairs.get(&(user.into(), source)) else {
            // No failure from here for this user: the first try is never refused.
            return Ok(());
        };
        let under_attack = t
            .users
            .get(&Box::<str>::from(user))
            .is_some_and(|u| !u.forgotten(&LOGIN_PAIR, now_ms) && u.failures >= LOGIN_USER_FAILURES_MAX);
        let rule = if under_attack { &LOGIN_UNDER_ATTACK } else { &LOGIN_PAIR };
        let wait = pair.wait_ms(rule, now_ms);
        if wait > 0 {
            return Err(refused(wait));
        }
        Ok(())
    }

    /// Counts a wrong password for `user` from `source`.
    pub fn failed(&self, user: &str, source: IpAddr, now_ms: u64) {
        let source = source_key(source);
        let Ok(mut t) = self.inner.lock() else { return };
        let under_attack = t
            .users
            .get(&Box::<str>::from(user))
            .is_some_and(|u| !u.forgotten(&LOGIN_PAIR, now_ms) && u.failures >= LOGIN_USER_FAILURES_MAX);
        let rule = if under_attack { LOGIN_UNDER_ATTACK } else { LOGIN_PAIR };
        // A full table forgets nothing: the failure simply is not counted
        // there, and `check` keeps refusing whoever is already waiting.
        if let Some(p) = t.pairs.entry(&(user.into(), source), |b| b.forgotten(&LOGIN_UNDER_ATTACK, now_ms)) {
            p.fail(&rule, now_ms);
        }
        if let Some(u) = t.users.entry(&user.into(), |b| b.forgotten(&LOGIN_PAIR, now_ms)) {
            u.fail(&LOGIN_PAIR, now_ms);
        }
        if let Some(s) = t.sources.entry(&source, |b| b.forgotten(&LOGIN_SOURCE, now_ms)) {
            s.fail(&LOGIN_SOURCE, now_ms);
        }
    }

    /// A right password from `source`: its failures for `user` are forgiven.
    pub fn succeeded(&self, user: &str, source: IpAddr) {
        if let Ok(mut t) = self.inner.lock() {
            t.pairs.remove(&(user.into(), source_key(source)));
        }
    }
}

/// Checks a new password: long enough to resist guessing, short enough to hash quickly.
pub fn validate_password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if n < crate::constants::PASSWORD_CHARS_MIN {
        return Err(ApiError::bad_request(format!(
            "passwords have at least {} characters",
            crate::constants::PASSWORD_CHARS_MIN
        )));
    }
    if password.len() > crate::constants::PASSWORD_BYTES_MAX {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn one_address_gets_five_tries_then_waits_that_double() {
        let g = LoginGuard::default();
        for t in 0..5 {
            g.check("alice", ip(2), t).unwrap();
            g.failed("alice", ip(2), t);
        }
        let e = g.check("alice", ip(2), 4).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        g.check("alice", ip(2), 4 + 1000).unwrap();
        g.failed("alice", ip(2), 1004);
        assert!(g.check("alice", ip(2), 1004 + 1999).is_err());
        g.check("alice", ip(2), 1004 + 2000).unwrap();
        // Other addresses and other users are not affected.
        g.check("alice", ip(1), 1005).unwrap();
        g.check("bob", ip(2), 1005).unwrap();
        // The right password forgives that address.
        g.succeeded("alice", ip(2));
        g.check("alice", ip(2), 1005).unwrap();
    }

    #[test]
    fn a_user_under_attack_slows_every_failing_address_but_never_a_new_one() {
        let g = LoginGuard::default();
        // 20 failures from 20 addresses, one each.
        for n in 0..20 {
            g.failed("admin", ip(10 + n), 0);
        }
        // Now a failing address waits a minute after its first failure...
        g.failed("admin", ip(100), 1);
        assert!(g.check("admin", ip(100), 59_000).is_err());
        g.check("admin", ip(100), 60_001).unwrap();
        // ...but an address that never failed for the user goes straight in.
        g.check("admin", ip(1), 2).unwrap();
    }

    #[test]
    fn a_spray_across_users_from_one_address_is_slowed_per_address() {
        let g = LoginGuard::default();
        for n in 0..20 {
            let user = format!("user{n}");
            g.check(&user, ip(2), 0).unwrap();
            g.failed(&user, ip(2), 0);
        }
        assert_eq!(g.check("someone-else", ip(2), 0).unwrap_err().code, ErrorCode::RateLimited);
        g.check("someone-else", ip(2), 1000).unwrap();
        g.check("someone-else", ip(3), 0).unwrap();
    }
}
