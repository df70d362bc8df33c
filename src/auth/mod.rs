//! Who is asking: password hashing (argon2) and login tokens (HS256 JWT).
//!
//! Hashing costs tens of milliseconds by design, so it always runs on the
//! blocking pool, never on the threads that move money.

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
        let now = crate::clock::now_ms() / 1000;
        let claims =
            Claims { sub: user.to_owned(), role: role.as_str().to_owned(), exp: now + self.ttl_s, iat: now, ep: epoch };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| ApiError::internal("could not sign the token"))?;
        Ok((token, claims.exp * 1000))
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
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hexed = crate::wire::Hash32(secret).hex().to_vec();
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
