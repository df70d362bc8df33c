//! Service keys: long-lived credentials for applications, made and
//! revoked by an admin. The secret is shown once, in `create_key`'s
//! reply; the server keeps only its hash.

use std::sync::Arc;

use super::{blocking, page_limit, Ctx};
use crate::auth::{NewKey, Principal};
use crate::contract::{Command, KeyChange, KeyCmd};
use crate::error::ApiError;
use crate::limits::{SERVICE_KEYS_MAX, SERVICE_KEYS_RECORDED_MAX};
use crate::reply::ReplyTo;
use crate::store::{self, KeyRecord};
use crate::wire::{CreateKeyArgs, KeyCreated, KeyView, KeysPage, ListKeysArgs, Reply, RevokeKeyArgs};

/// Commits a change to the keys through the journal and waits for it.
async fn change(ctx: &Ctx, change: KeyChange) -> Result<KeyRecord, ApiError> {
    super::commit(ctx, |done| Command::Key(Box::new(KeyCmd { change, done }))).await
}

/// Whether one more key may be made, given (unrevoked, all) keys.
pub(crate) fn room_for_a_key((live, all): (usize, usize)) -> Result<(), ApiError> {
    if live >= SERVICE_KEYS_MAX {
        return Err(ApiError::bad_request(format!("at most {SERVICE_KEYS_MAX} unrevoked keys: revoke one first")));
    }
    if all >= SERVICE_KEYS_RECORDED_MAX {
        return Err(ApiError::bad_request(format!("at most {SERVICE_KEYS_RECORDED_MAX} keys on record")));
    }
    Ok(())
}

/// `create_key {name, role, accounts?, expires_s?}` (admin). One at a time
/// (admins make keys rarely): the count checked is the count committed.
pub(super) fn create_key(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(CreateKeyArgs, args, reply);
    let new =
        NewKey { name: &a.name, role: &a.role, accounts: a.accounts, expires_s: a.expires_s, created_by: &p.user };
    let (secret, record) = check!(new.make(crate::clock::now_ms()), reply);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _one = ctx.key_creation.lock().await;
        if let Err(e) = room_for_a_key(ctx.users.key_count()) {
            return reply.err(e);
        }
        let r = change(&ctx, KeyChange::Create(Box::new(record))).await.map(|k| {
            tracing::info!(target: "security", key = %k.key_id, role = %k.role, by = %p.user, "key created");
            Reply::KeyCreated(Box::new(KeyCreated {
                key_id: k.key_id,
                secret: secret.secret,
                name: k.name,
                role: k.role,
                accounts: k.accounts,
                expires_at: k.expires_at,
            }))
        });
        reply.send(r);
    });
}

/// `list_keys {after?, limit?}` (admin): every key, revoked ones too, in
/// key id order; never a secret or its hash.
pub(super) fn list_keys(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(ListKeysArgs, args, reply);
    let limit = check!(page_limit(a.limit), reply);
    let store = ctx.store.clone();
    blocking(reply, move || {
        let (keys, more) = store::list_keys(&*store.db()?, a.after.as_deref(), limit)?;
        let next = more.then(|| keys.last().map(|k| k.key_id.clone())).flatten();
        Ok(Reply::Keys(KeysPage { keys: keys.iter().map(KeyView::from).collect(), next }))
    });
}

/// `revoke_key {key_id}` (admin): connections bound with the key fail from
/// their next request on. Revoking a revoked key changes nothing.
pub(super) fn revoke_key(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(RevokeKeyArgs, args, reply);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = change(&ctx, KeyChange::Revoke { key_id: a.key_id, by: p.user.to_string() }).await.map(|k| {
            tracing::info!(target: "security", key = %k.key_id, by = %p.user, "key revoked");
            Reply::Key(Box::new(KeyView::from(&k)))
        });
        reply.send(r);
    });
}
