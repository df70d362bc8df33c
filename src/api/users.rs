//! Users: signup, login, binding a token, logout, password change,
//! `whoami`, `set_events`, and the per-request check that a connection's
//! token still works.

use std::sync::Arc;

use super::{blocking, Ctx, Session};
use crate::auth::{self, Binding, Bound, KeySecret, Principal, Role, KEY_ACTOR_PREFIX};
use crate::config::Sessions;
use crate::contract::{Command, CreateCmd, UserChange, UserCmd};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{self, is_system};
use crate::limits::{PASSWORD_BYTES_MAX, USER_ID_BYTES_MAX};
use crate::reply::ReplyTo;
use crate::shard::ShardMsg;
use crate::store::{self, AccountMeta, UserRecord};
use crate::wire::{
    AuthArgs, AuthReply, ChangePasswordArgs, CreateUserArgs, KeyView, LoggedOut, LoginArgs, LoginReply, LogoutArgs,
    NoArgs, Reply, SetEventsArgs, SignupArgs, UserView,
};

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message)
}

/// An argon2id hash checked against when the user does not exist, so that
/// timing does not reveal which user ids exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2/2D7Jm9d0hXhm1NHxu0Vn6cUHxYCOqGKq/KCN4cVJ8";

/// The caller of a bound connection, if what it is bound with still
/// works: a token not expired nor revoked (by a logout, a password change,
/// or in single-session mode a later login), or a key not expired nor
/// revoked.
pub(super) fn current(ctx: &Ctx, session: &mut Session) -> Result<Principal, ApiError> {
    let Some(b) = session.binding.as_mut() else {
        return Err(unauthenticated("log in first (login or auth)"));
    };
    let now = if session.read_ms > 0 { session.read_ms } else { crate::clock::now_ms() };
    if now >= b.expires_ms {
        let why = match b.by {
            Bound::Token(_) => "the token expired; log in again",
            Bound::Key(_) => "the key expired",
        };
        session.binding = None;
        return Err(unauthenticated(why));
    }
    let generation = ctx.users.generation();
    if generation != b.checked {
        let role = match &b.by {
            Bound::Token(jti) => ctx
                .users
                .get(&b.principal.user)
                .filter(|s| s.epoch == b.epoch && !s.revoked.iter().any(|r| r == jti))
                .map(|s| s.role),
            Bound::Key(key_id) => ctx.users.key(key_id).filter(|k| !k.revoked).map(|k| k.role),
        };
        match role {
            Some(role) => {
                b.principal.role = role;
                b.checked = generation;
            }
            None => {
                let why = match b.by {
                    Bound::Token(_) => "the token was revoked; log in again",
                    Bound::Key(_) => "the key was revoked",
                };
                session.binding = None;
                return Err(unauthenticated(why));
            }
        }
    }
    Ok(b.principal.clone())
}

/// Runs argon2 on the blocking pool, at most `PASSWORD_HASHES_CONCURRENT_MAX` at once.
pub(super) async fn on_hash_pool<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let permit = ctx.hashing.clone().acquire_owned().await.map_err(|_| ApiError::internal("shutting down"))?;
    // The permit goes with the hash: if the caller stops waiting, the hash
    // still runs to its end, and still counts.
    let hash = move || {
        let _permit = permit;
        f()
    };
    tokio::task::spawn_blocking(hash).await.map_err(|_| ApiError::internal("password hashing failed"))
}

/// Commits a change to a user through the journal and waits for it.
pub(super) async fn change(ctx: &Ctx, user: &str, change: UserChange) -> Result<UserRecord, ApiError> {
    super::commit(ctx, |done| Command::User(Box::new(UserCmd { user: user.into(), change, done }))).await
}

/// Issues a token for `u` and binds the connection with it. The token
/// carries the user's epoch as the registry has it now (a `logout
/// all=true` or password change may have committed while the password was
/// hashed): the generation is read first, so any later change is
/// re-checked at the next request.
fn bind_new_token(ctx: &Ctx, session: &mut Session, u: &UserRecord) -> Result<Reply, ApiError> {
    let checked = ctx.users.generation();
    let state = ctx.users.get(&u.user).ok_or_else(|| unauthenticated("wrong user or password"))?;
    let issued = ctx.tokens.issue(&u.user, state.role, state.epoch)?;
    session.binding = Some(Binding {
        principal: Principal::user(&u.user, state.role),
        by: Bound::Token(issued.jti.into()),
        epoch: state.epoch,
        expires_ms: issued.expires_ms,
        checked,
    });
    Ok(Reply::Login(LoginReply {
        token: issued.token,
        expires_at: issued.expires_ms,
        user: u.user.clone(),
        role: state.role.as_str(),
    }))
}

/// `signup`: the user and an account with the same id, created together
/// by the owning shard and the journal.
pub(super) async fn signup(ctx: &Arc<Ctx>, session: &Session, args: &[u8], reply: ReplyTo) {
    let a = args!(SignupArgs, args, reply);
    let (meta, user) = check!(checked_signup(ctx, a).await, reply);
    tracing::info!(target: "security", user = %user.user, source = %session.peer, "signup");
    let account = user.user.clone();
    let by: Arc<str> = account.as_str().into();
    let cmd = CreateCmd { account: account.as_str().into(), meta, initial: 0, user: Some(user), by, reply };
    ctx.router.send(&account, ShardMsg::Create(Box::new(cmd)));
}

/// Checks signup arguments and hashes the password.
async fn checked_signup(ctx: &Arc<Ctx>, a: SignupArgs) -> Result<(AccountMeta, Box<UserRecord>), ApiError> {
    if !ctx.config.auth.signup {
        return Err(ApiError::forbidden("signup is turned off"));
    }
    let user = new_user(ctx, a, Role::User).await?;
    Ok((account_of(&user), user))
}

/// The account a user with role `user` gets, with the user's id.
fn account_of(user: &UserRecord) -> AccountMeta {
    AccountMeta {
        num: 0,
        owner: Some(user.user.clone()),
        tags: Vec::new(),
        created: crate::clock::now_ms(),
        memo: Some("signup".into()),
        deleted: None,
    }
}

/// Checks a new user's fields and hashes the password.
async fn new_user(ctx: &Arc<Ctx>, a: SignupArgs, role: Role) -> Result<Box<UserRecord>, ApiError> {
    ledger::validate_account_id(&a.user)
        .map_err(|_| ApiError::bad_request(format!("user ids are 1-{USER_ID_BYTES_MAX} bytes of A-Za-z0-9._:@-")))?;
    if is_system(&a.user) {
        return Err(ApiError::forbidden("user ids cannot start with @"));
    }
    // Records and logs name a service key `key:<key_id>`: no user may look like one.
    if a.user.starts_with(KEY_ACTOR_PREFIX) {
        return Err(ApiError::forbidden(format!("user ids cannot start with {KEY_ACTOR_PREFIX}")));
    }
    let name = a.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must be 1-100 printable characters"));
    }
    auth::validate_email(&a.email)?;
    auth::validate_password(&a.password)?;
    if let Some(g) = &a.group {
        if g.is_empty() || g.len() > 32 || !g.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(ApiError::bad_request("group must be 1-32 characters of A-Za-z0-9._-"));
        }
    }
    let password = a.password;
    let password_hash = on_hash_pool(ctx, move || auth::hash_password(&password)).await??;
    Ok(Box::new(UserRecord {
        user: a.user,
        name: name.to_owned(),
        email: a.email,
        password_hash,
        role: role.as_str().into(),
        group: a.group,
        events: 0,
        token_epoch: 0,
        revoked_tokens: Vec::new(),
    }))
}

/// `create_user {user, role, name, email, password, group?}` (admin): a
/// user with any role, whether or not signup is open. A `user` gets an
/// account with its id, as at signup; staff own no account.
pub(super) async fn create_user(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(CreateUserArgs, args, reply);
    let Some(role) = Role::from_name(&a.role) else {
        return reply.err(ApiError::bad_request("role must be admin, operator, auditor or user"));
    };
    let signup = SignupArgs { user: a.user, name: a.name, email: a.email, password: a.password, group: a.group };
    let user = check!(new_user(ctx, signup, role).await, reply);
    tracing::info!(target: "security", user = %user.user, role = role.as_str(), by = %p.user, "user created");
    if role == Role::User {
        let account = user.user.clone();
        let meta = account_of(&user);
        let cmd = CreateCmd { account: account.as_str().into(), meta, initial: 0, user: Some(user), by: p.user, reply };
        return ctx.router.send(&account, ShardMsg::Create(Box::new(cmd)));
    }
    let name = user.user.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = change(&ctx, &name, UserChange::Create(user)).await;
        reply.send(r.map(|u| Reply::User(Box::new(UserView::from(&u)))));
    });
}

/// `login`: awaited, so the connection's next request runs as the user.
pub(super) async fn login(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    let a = args!(LoginArgs, args, reply);
    reply.send(checked_login(ctx, session, a).await);
}

/// Checks the password, revokes the user's older tokens, binds the connection.
async fn checked_login(ctx: &Arc<Ctx>, session: &mut Session, a: LoginArgs) -> Result<Reply, ApiError> {
    let denied = || unauthenticated("wrong user or password");
    if a.user.len() > USER_ID_BYTES_MAX || a.password.len() > PASSWORD_BYTES_MAX {
        return Err(denied());
    }
    let source = session.peer;
    if let Err(e) = ctx.logins.check(&a.user, source, crate::clock::now_ms()) {
        tracing::warn!(target: "security", user = %a.user, %source, "login refused: rate limited");
        return Err(e);
    }
    let store = ctx.store.clone();
    let (user, password) = (a.user.clone(), a.password);
    let checked = on_hash_pool(ctx, move || -> Result<Option<UserRecord>, ApiError> {
        let db = store.db()?;
        let Some(u) = store::get_user(&db, &user)? else {
            let _ = auth::verify_password(&password, DUMMY_HASH);
            return Ok(None);
        };
        Ok(auth::verify_password(&password, &u.password_hash).then_some(u))
    })
    .await??;
    let Some(checked) = checked else {
        ctx.logins.failed(&a.user, source, crate::clock::now_ms());
        tracing::warn!(target: "security", user = %a.user, %source, "login failed: wrong user or password");
        return Err(denied());
    };
    ctx.logins.succeeded(&a.user, source);
    let u = match ctx.config.auth.sessions {
        // A new login revokes every older token of the user.
        Sessions::Single => change(ctx, &a.user, UserChange::NewEpoch).await?,
        Sessions::Multi => checked,
    };
    let reply = bind_new_token(ctx, session, &u)?;
    tracing::info!(target: "security", user = %u.user, role = %u.role, %source, "logged in");
    Ok(reply)
}

/// `auth {token}` or `auth {key}`.
pub(super) fn auth(ctx: &Ctx, session: &mut Session, args: &[u8], reply: ReplyTo) {
    let a = args!(AuthArgs, args, reply);
    let r = match (a.token, a.key) {
        (Some(token), None) => bind_token(ctx, session, &token),
        (None, Some(key)) => bind_key(ctx, session, &key),
        _ => Err(ApiError::bad_request("auth takes token or key (one of them)")),
    };
    reply.send(r);
}

/// Binds the connection to a valid, unrevoked token.
fn bind_token(ctx: &Ctx, session: &mut Session, token: &str) -> Result<Reply, ApiError> {
    let claims = ctx.tokens.check(token)?;
    // Read before the registry: a change after this is re-checked.
    let checked = ctx.users.generation();
    let revoked = || unauthenticated("the token was revoked");
    let state = ctx.users.get(&claims.sub).ok_or_else(revoked)?;
    if state.epoch != claims.ep || state.revoked.iter().any(|r| **r == *claims.jti) {
        return Err(revoked());
    }
    session.binding = Some(Binding {
        principal: Principal::user(&claims.sub, state.role),
        by: Bound::Token(claims.jti.into()),
        epoch: claims.ep,
        expires_ms: claims.exp.saturating_mul(1000),
        checked,
    });
    Ok(Reply::Auth(AuthReply { user: claims.sub, role: state.role.as_str() }))
}

/// Binds the connection to a service key. A wrong secret, an unknown,
/// revoked or expired key get the same answer; each guess costs a login
/// attempt against the key id and the source, as a password does.
fn bind_key(ctx: &Ctx, session: &mut Session, secret: &str) -> Result<Reply, ApiError> {
    let denied = || unauthenticated("invalid key");
    let key_id = KeySecret::key_id_of(secret).ok_or_else(denied)?;
    let actor = format!("{KEY_ACTOR_PREFIX}{key_id}");
    let source = session.peer;
    let now = crate::clock::now_ms();
    ctx.logins.check(&actor, source, now)?;
    let hash = blake3::Hash::from(KeySecret::hash(secret));
    // Read before the registry: a revocation after this is re-checked.
    let checked = ctx.users.generation();
    let state = ctx
        .users
        .key(key_id)
        // Constant-time: the comparison does not tell how much of a guess was right.
        .filter(|k| hash == blake3::Hash::from(k.hash) && !k.revoked && now < k.expires_ms);
    let Some(state) = state else {
        ctx.logins.failed(&actor, source, now);
        tracing::warn!(target: "security", key = %key_id, %source, "key refused");
        return Err(denied());
    };
    ctx.logins.succeeded(&actor, source);
    let principal = state.principal(key_id);
    let reply = AuthReply { user: principal.user.to_string(), role: state.role.as_str() };
    session.binding =
        Some(Binding { principal, by: Bound::Key(key_id.into()), epoch: 0, expires_ms: state.expires_ms, checked });
    tracing::info!(target: "security", key = %key_id, role = state.role.as_str(), %source, "bound with a key");
    Ok(Reply::Auth(reply))
}

/// `logout {all?}`: ends the caller's token (with `all=true`, or in
/// single-session mode, every token of the user) and unbinds the
/// connection. A connection bound with a key is only unbound: a key ends
/// with `revoke_key`.
pub(super) async fn logout(ctx: &Arc<Ctx>, session: &mut Session, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(LogoutArgs, args, reply);
    let all = a.all.unwrap_or(false);
    let Some(binding) = session.binding.as_ref() else {
        return reply.err(unauthenticated("log in first (login or auth)"));
    };
    let change_for = match (&binding.by, ctx.config.auth.sessions) {
        (Bound::Key(_), _) if all => {
            return reply.err(ApiError::bad_request("a key has no other sessions: revoke_key ends it"));
        }
        (Bound::Key(_), _) => None,
        (Bound::Token(_), Sessions::Single) => Some(UserChange::NewEpoch),
        (Bound::Token(_), Sessions::Multi) if all => Some(UserChange::NewEpoch),
        (Bound::Token(jti), Sessions::Multi) => {
            Some(UserChange::RevokeToken { jti: jti.to_string(), exp_ms: binding.expires_ms })
        }
    };
    let r = match change_for {
        Some(c) => change(ctx, &p.user, c).await.map(|_| ()),
        None => Ok(()),
    };
    if r.is_ok() {
        session.binding = None;
    }
    reply.send(r.map(|()| Reply::LoggedOut(LoggedOut { logged_out: true })));
}

/// `whoami`: the caller's user record, without secrets.
pub(super) fn whoami(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let store = ctx.store.clone();
    if p.key {
        // A key answers with its record (never the secret).
        let key_id = p.user.strip_prefix(KEY_ACTOR_PREFIX).unwrap_or(&p.user).to_owned();
        return blocking(reply, move || {
            let k = store::get_key(&*store.db()?, &key_id)?.ok_or_else(|| ApiError::not_found("key"))?;
            Ok(Reply::Key(Box::new(KeyView::from(&k))))
        });
    }
    blocking(reply, move || {
        let u = store::get_user(&*store.db()?, &p.user)?.ok_or_else(|| ApiError::not_found("user"))?;
        Ok(Reply::User(Box::new(UserView::from(&u))))
    });
}

/// `set_events` (admin): a user's count of events attended.
pub(super) fn set_events(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(SetEventsArgs, args, reply);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = change(&ctx, &a.user, UserChange::Events(a.events)).await;
        reply.send(r.map(|u| Reply::User(Box::new(UserView::from(&u)))));
    });
}

/// `change_password`: awaited, like `login`.
pub(super) async fn change_password(ctx: &Arc<Ctx>, session: &mut Session, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(ChangePasswordArgs, args, reply);
    if p.key {
        return reply.err(ApiError::forbidden("a key has no password"));
    }
    reply.send(checked_change_password(ctx, session, &p, a).await);
}

/// Sets a new password (the old one is required), revokes every older
/// token, and rebinds this connection with a new one.
async fn checked_change_password(
    ctx: &Arc<Ctx>,
    session: &mut Session,
    p: &Principal,
    a: ChangePasswordArgs,
) -> Result<Reply, ApiError> {
    auth::validate_password(&a.new_password)?;
    let source = session.peer;
    ctx.logins.check(&p.user, source, crate::clock::now_ms())?;
    let store = ctx.store.clone();
    let user = p.user.to_string();
    let ok = on_hash_pool(ctx, move || -> Result<Option<String>, ApiError> {
        let db = store.db()?;
        let u = store::get_user(&db, &user)?.ok_or_else(|| ApiError::not_found("user"))?;
        if !auth::verify_password(&a.old_password, &u.password_hash) {
            return Ok(None);
        }
        auth::hash_password(&a.new_password).map(Some)
    })
    .await??;
    let Some(hash) = ok else {
        ctx.logins.failed(&p.user, source, crate::clock::now_ms());
        tracing::warn!(target: "security", user = %p.user, %source, "password change refused: wrong old password");
        return Err(ApiError::forbidden("the old password is wrong"));
    };
    let u = change(ctx, &p.user, UserChange::Password(hash)).await?;
    tracing::info!(target: "security", user = %p.user, %source, "password changed");
    bind_new_token(ctx, session, &u)
}
