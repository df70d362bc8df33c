//! Administration on the host: what an operator does with the data folder
//! while the server is stopped (`tally admin ...`).

use std::path::Path;

use crate::auth;
use crate::store;

/// Opens the data folder's database. It allows one opener, so this fails
/// cleanly while the server runs.
fn open(path: &Path) -> Result<redb::Database, String> {
    // A cluster member's rows are written through Raft only; a change made
    // here would exist on this member alone.
    if path.with_file_name("raft.redb").exists() {
        return Err(format!(
            "{} belongs to a cluster member: make the change through the leader (create_key, create_user, \
             change_password) so that every member has it",
            path.parent().unwrap_or(path).display()
        ));
    }
    store::open(path).map_err(|e| match e {
        store::StoreError::Redb(redb::Error::DatabaseAlreadyOpen) => {
            format!("{} is in use: stop the server first", path.display())
        }
        e => format!("cannot open {}: {e}", path.display()),
    })
}

/// Sets `user`'s password to `password` and revokes every token of the
/// user, directly in the data folder.
pub fn reset_password(data: &Path, user: &str, password: &str) -> Result<(), String> {
    auth::validate_password(password).map_err(|e| e.message)?;
    let path = data.join("tally.redb");
    if !path.exists() {
        return Err(format!("no database at {}", path.display()));
    }
    let db = open(&path)?;
    let mut record = store::get_user(&db, user)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no user {user:?} in {}", path.display()))?;
    record.password_hash = auth::hash_password(password).map_err(|e| e.message)?;
    record.token_epoch += 1;
    store::put_user(&db, &record).map_err(|e| e.to_string())?;
    tracing::info!(target: "security", user, "password set on the host (tally admin reset-password)");
    Ok(())
}

/// Makes a service key directly in the data folder (created if it does
/// not exist yet, so that a deployment can start with a key and no
/// password), and returns its id and secret: the only time the secret is
/// shown.
pub fn create_key(data: &Path, new: auth::NewKey<'_>) -> Result<auth::KeySecret, String> {
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let db = open(&data.join("tally.redb"))?;
    let keys = store::load_keys(&db).map_err(|e| e.to_string())?;
    let live = keys.iter().filter(|k| k.revoked_at.is_none()).count();
    crate::api::keys::room_for_a_key((live, keys.len())).map_err(|e| e.message)?;
    let (secret, record) = new.make(crate::clock::now_ms()).map_err(|e| e.message)?;
    store::put_key(&db, &record).map_err(|e| e.to_string())?;
    tracing::info!(target: "security", key = %record.key_id, role = %record.role, "key created on the host (tally admin create-key)");
    Ok(secret)
}
