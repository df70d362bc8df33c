//! Users: signup, login, binding a token, logout, password change,
//! `whoami`, `set_events`, and the per-request check that a connection's
//! token still works.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{blocking, Ctx, Session};
use crate::auth::{self, Binding, Principal, Role};
use crate::contract::{Command, CreateCmd, UserChange, UserCmd};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{self, is_system};
use crate::limits::{PASSWORD_BYTES_MAX, USER_ID_BYTES_MAX};
use crate::reply::ReplyTo;
use crate::shard::ShardMsg;
use crate::store::{self, AccountMeta, UserRecord};
use crate::wire::{
    AuthArgs, AuthReply, ChangePasswordArgs, LoggedOut, LoginArgs, LoginReply, NoArgs, Reply, SetEventsArgs,
    SignupArgs, UserView,
};

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message)
}

/// An argon2id hash checked against when the user does not exist, so that
/// timing does not reveal which user ids exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2/2D7Jm9d0hXhm1NHxu0Vn6cUHxYCOqGKq/KCN4cVJ8";

/// The caller of a bound connection, if its token still works: not expired,
/// not revoked by a later login, logout or password change.
pub(super) fn current(ctx: &Ctx, session: &mut Session) -> Result<Principal, ApiError> {
    let Some(b) = session.binding.as_mut() else {
        return Err(unauthenticated("log in first (login or auth)"));
    };
    let now = if session.read_ms > 0 { session.read_ms } else { crate::clock::now_ms() };
    if now >= b.expires_ms {
        session.binding = None;
        return Err(unauthenticated("the token expired; log in again"));
    }
    let generation = ctx.users.generation();
    if generation != b.checked {
        match ctx.users.get(&b.principal.user) {
            Some(state) if state.epoch == b.epoch => {
                b.principal.role = state.role;
                b.checked = generation;
            }
            _ => {
                session.binding = None;
                return Err(unauthenticated("the token was revoked; log in again"));
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
    let _permit = ctx.hashing.acquire().await.map_err(|_| ApiError::internal("shutting down"))?;
    tokio::task::spawn_blocking(f).await.map_err(|_| ApiError::internal("password hashing failed"))
}

/// Commits a change to a user through the journal and waits for it.
pub(super) async fn change(ctx: &Ctx, user: &str, change: UserChange) -> Result<UserRecord, ApiError> {
    let (done, rx) = oneshot::channel();
    ctx.journal
        .send(Command::User(Box::new(UserCmd { user: user.into(), change, done })))
        .map_err(|_| ApiError::internal("the journal has stopped"))?;
    rx.await.map_err(|_| ApiError::internal("the journal has stopped"))?
}

fn bind(ctx: &Ctx, session: &mut Session, u: &UserRecord, expires_ms: u64) -> Role {
    let role = Role::parse(&u.role);
    session.binding = Some(Binding {
        principal: Principal { user: u.user.as_str().into(), role },
        epoch: u.token_epoch,
        expires_ms,
        checked: ctx.users.generation(),
    });
    role
}

/// `signup`: the user and an account with the same id, created together
/// by the owning shard and the journal.
pub(super) async fn signup(ctx: &Arc<Ctx>, session: &Session, args: &[u8], reply: ReplyTo) {
    let a = args!(SignupArgs, args, reply);
    let (meta, user) = check!(checked_signup(ctx, a).await, reply);
    tracing::info!(target: "security", user = %user.user, source = %session.peer, "signup");
    let account = user.user.clone();
    let cmd = CreateCmd { account: account.as_str().into(), meta, initial: 0, user: Some(user), reply };
    ctx.router.send(&account, ShardMsg::Create(Box::new(cmd)));
}

/// Checks signup arguments and hashes the password.
async fn checked_signup(ctx: &Arc<Ctx>, a: SignupArgs) -> Result<(AccountMeta, Box<UserRecord>), ApiError> {
    if !ctx.config.auth.signup {
        return Err(ApiError::forbidden("signup is turned off"));
    }
    ledger::validate_account_id(&a.user)
        .map_err(|_| ApiError::bad_request(format!("user ids are 1-{USER_ID_BYTES_MAX} bytes of A-Za-z0-9._:@-")))?;
    if is_system(&a.user) {
        return Err(ApiError::forbidden("user ids cannot start with @"));
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
    let user = UserRecord {
        user: a.user.clone(),
        name: name.to_owned(),
        email: a.email,
        password_hash,
        role: Role::User.as_str().into(),
        group: a.group,
        events: 0,
        token_epoch: 0,
    };
    let meta = AccountMeta {
        num: 0,
        owner: Some(a.user),
        tags: Vec::new(),
        created: crate::clock::now_ms(),
        memo: Some("signup".into()),
        deleted: None,
    };
    Ok((meta, Box::new(user)))
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
    if checked.is_none() {
        ctx.logins.failed(&a.user, source, crate::clock::now_ms());
        tracing::warn!(target: "security", user = %a.user, %source, "login failed: wrong user or password");
        return Err(denied());
    }
    ctx.logins.succeeded(&a.user, source);
    // A new login revokes every older token of the user.
    let u = change(ctx, &a.user, UserChange::NewEpoch).await?;
    let role = Role::parse(&u.role);
    let (token, expires_at) = ctx.tokens.issue(&u.user, role, u.token_epoch)?;
    bind(ctx, session, &u, expires_at);
    tracing::info!(target: "security", user = %u.user, role = role.as_str(), %source, "logged in");
    Ok(Reply::Login(LoginReply { token, expires_at, user: u.user, role: role.as_str() }))
}

/// `auth {token}`.
pub(super) fn auth(ctx: &Ctx, session: &mut Session, args: &[u8], reply: ReplyTo) {
    let a = args!(AuthArgs, args, reply);
    reply.send(bind_token(ctx, session, &a.token));
}

/// Binds the connection to a valid, unrevoked token.
fn bind_token(ctx: &Ctx, session: &mut Session, token: &str) -> Result<Reply, ApiError> {
    let claims = ctx.tokens.check(token)?;
    let revoked = || unauthenticated("the token was revoked");
    let state = ctx.users.get(&claims.sub).ok_or_else(revoked)?;
    if state.epoch != claims.ep {
        return Err(revoked());
    }
    session.binding = Some(Binding {
        principal: Principal { user: claims.sub.as_str().into(), role: state.role },
        epoch: claims.ep,
        expires_ms: claims.exp.saturating_mul(1000),
        checked: ctx.users.generation(),
    });
    Ok(Reply::Auth(AuthReply { user: claims.sub, role: state.role.as_str() }))
}

/// `logout`: revokes every token of the caller and unbinds the connection.
pub(super) async fn logout(ctx: &Arc<Ctx>, session: &mut Session, p: Principal, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let r = change(ctx, &p.user, UserChange::NewEpoch).await;
    if r.is_ok() {
        session.binding = None;
    }
    reply.send(r.map(|_| Reply::LoggedOut(LoggedOut { logged_out: true })));
}

/// `whoami`: the caller's user record, without secrets.
pub(super) fn whoami(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let store = ctx.store.clone();
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
    let role = Role::parse(&u.role);
    let (token, expires_at) = ctx.tokens.issue(&u.user, role, u.token_epoch)?;
    bind(ctx, session, &u, expires_at);
    Ok(Reply::Login(LoginReply { token, expires_at, user: u.user, role: role.as_str() }))
}
