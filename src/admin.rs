//! Administration on the host: what an operator does with the data folder
//! while the server is stopped (`tally admin ...`).

use std::path::Path;

use crate::auth;
use crate::store;

/// Sets `user`'s password to `password` and revokes every token of the
/// user, directly in the data folder. The database allows one opener, so
/// this fails cleanly while the server runs.
pub fn reset_password(data: &Path, user: &str, password: &str) -> Result<(), String> {
    auth::validate_password(password).map_err(|e| e.message)?;
    let path = data.join("tally.redb");
    if !path.exists() {
        return Err(format!("no database at {}", path.display()));
    }
    let db = store::open(&path).map_err(|e| match e {
        store::StoreError::Redb(redb::Error::DatabaseAlreadyOpen) => {
            format!("{} is in use: stop the server first", path.display())
        }
        e => format!("cannot open {}: {e}", path.display()),
    })?;
    let mut record = store::get_user(&db, user)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no user {user:?} in {}", path.display()))?;
    record.password_hash = auth::hash_password(password).map_err(|e| e.message)?;
    record.token_epoch += 1;
    store::put_user(&db, &record).map_err(|e| e.to_string())?;
    tracing::info!(target: "security", user, "password set on the host (tally admin reset-password)");
    Ok(())
}
