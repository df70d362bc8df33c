//! Proves users and sessions over real TCP: signup rules, every row of the
//! authorization matrix, every way a token stops working (expiry, forgery,
//! `alg: none`, garbage, revocation by a new login, logout or password
//! change, also on connections already bound), login throttling, and that
//! passwords never reach the data folder or the log in clear.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{balance, code, create, Server, ADMIN_PASSWORD};
use serde_json::{json, Value};
use tally::client::Client;

const PW: &str = "correct horse battery";

async fn signup(s: &Server, user: &str, group: &str) -> Value {
    let c = s.client().await;
    c.call("signup", json!({"user": user, "name": format!("User {user}"), "email": format!("{user}@campus.example"), "password": PW, "group": group}))
        .await
        .expect("signup")
}

async fn login(s: &Server, user: &str) -> (Client, String) {
    let c = s.client().await;
    let r = c.login(user, PW).await.expect("login");
    let token = r["token"].as_str().unwrap().to_owned();
    (c, token)
}

#[tokio::test]
async fn signup_creates_a_user_and_an_owned_account() {
    let s = Server::start();
    let u = signup(&s, "alice", "Y19").await;
    assert_eq!(
        u,
        json!({"user": "alice", "name": "User alice", "email": "alice@campus.example", "role": "user", "group": "Y19", "events": 0})
    );
    let (c, _) = login(&s, "alice").await;
    let who = c.call("whoami", json!({})).await.unwrap();
    assert_eq!(who["user"], "alice");
    assert!(who.get("password_hash").is_none());
    let acct = c.call("account", json!({})).await.unwrap();
    assert_eq!(
        (acct["account"].as_str(), acct["owner"].as_str(), acct["balance"].as_i64()),
        (Some("alice"), Some("alice"), Some(0))
    );

    let anon = s.client().await;
    let base = json!({"user": "bob", "name": "Bob", "email": "bob@campus.example", "password": PW});
    let with = |k: &str, v: Value| {
        let mut a = base.clone();
        a[k] = v;
        a
    };
    assert_eq!(code(anon.call("signup", with("user", json!("alice"))).await), "exists");
    assert_eq!(code(anon.call("signup", with("email", json!("not-an-email"))).await), "bad_request");
    assert_eq!(code(anon.call("signup", with("email", json!("a@b"))).await), "bad_request");
    assert_eq!(code(anon.call("signup", with("password", json!("short"))).await), "bad_request");
    assert_eq!(code(anon.call("signup", with("user", json!("@mint"))).await), "forbidden");
    assert_eq!(code(anon.call("signup", with("user", json!("b o b"))).await), "bad_request");
    assert_eq!(code(anon.call("signup", with("name", json!(""))).await), "bad_request");
    // An account id an admin already used cannot become a user.
    let admin = s.admin().await;
    create(&admin, "shop", 0).await;
    assert_eq!(code(anon.call("signup", with("user", json!("shop"))).await), "exists");
    anon.call("signup", base).await.unwrap();
}

#[tokio::test]
async fn signup_can_be_turned_off() {
    let s = Server::start_with(&[("TALLY_AUTH_SIGNUP", "false")]);
    let anon = s.client().await;
    let r = anon.call("signup", json!({"user": "eve", "name": "Eve", "email": "eve@x.example", "password": PW})).await;
    assert_eq!(code(r), "forbidden");
}

#[tokio::test]
async fn authorization_matrix() {
    let s = Server::start();
    signup(&s, "alice", "Y19").await;
    signup(&s, "bob", "Y19").await;
    let admin = s.admin().await;
    admin.call("mint", json!({"to": "alice", "amount": 100})).await.unwrap();
    create(&admin, "house", 50).await;
    let bob_pays = admin.call("transfer", json!({"from": "house", "to": "bob", "amount": 5})).await.unwrap();

    // Anonymous: only hello, ping, help, signup, login, auth.
    let anon = s.client().await;
    for op in ["hello", "ping", "help"] {
        anon.call(op, json!({})).await.unwrap();
    }
    for (op, args) in [
        ("whoami", json!({})),
        ("logout", json!({})),
        ("change_password", json!({"old_password": PW, "new_password": "another password"})),
        ("balance", json!({"account": "alice"})),
        ("account", json!({"account": "alice"})),
        ("transfer", json!({"from": "alice", "to": "bob", "amount": 1})),
        ("history", json!({"account": "alice"})),
        ("get_transfer", json!({"id": 1})),
        ("mint", json!({"to": "alice", "amount": 1})),
        ("create_account", json!({"account": "x"})),
        ("audit", json!({})),
        ("stats", json!({})),
    ] {
        assert_eq!(code(anon.call(op, args).await), "unauthenticated", "anonymous {op}");
    }

    // A user: own accounts only; admin ops are forbidden.
    let (alice, _) = login(&s, "alice").await;
    assert_eq!(alice.balance(None).await.unwrap(), 100);
    let t = alice.call("transfer", json!({"to": "bob", "amount": 10})).await.unwrap();
    assert_eq!(
        (t["from"].as_str(), t["from_balance"].as_i64(), t["to_balance"].as_i64()),
        (Some("alice"), Some(90), Some(15))
    );
    alice.call("history", json!({})).await.unwrap();
    alice.call("get_transfer", json!({"id": t["id"]})).await.unwrap();
    for (op, args) in [
        ("balance", json!({"account": "bob"})),
        ("account", json!({"account": "house"})),
        ("transfer", json!({"from": "bob", "to": "alice", "amount": 1})),
        ("transfer", json!({"from": "@treasury", "to": "alice", "amount": 1})),
        ("history", json!({"account": "bob"})),
        ("get_transfer", json!({"id": bob_pays["id"]})),
        ("mint", json!({"to": "alice", "amount": 1})),
        ("create_account", json!({"account": "mine"})),
        ("audit", json!({})),
        ("stats", json!({})),
    ] {
        assert_eq!(code(alice.call(op, args.clone()).await), "forbidden", "user {op} {args}");
    }
    assert_eq!(code(alice.call("balance", json!({"account": "nobody"})).await), "not_found");

    // The admin: everything.
    assert_eq!(balance(&admin, "bob").await, 15);
    admin.call("history", json!({"account": "alice"})).await.unwrap();
    admin.call("get_transfer", json!({"id": t["id"]})).await.unwrap();
    admin.call("stats", json!({})).await.unwrap();
    let audit = admin.call("audit", json!({})).await.unwrap();
    assert_eq!((audit["sum"].as_i64(), audit["chain_ok"].as_bool()), (Some(0), Some(true)));
    assert_eq!(balance(&admin, "alice").await, 90);
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let s = Server::start();
    signup(&s, "alice", "Y19").await;
    let (_, token) = login(&s, "alice").await;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("admin");
    claims["role"] = json!("admin");
    let forged = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims));
    let other_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not the server's secret"),
    )
    .unwrap();
    for bad in [forged.as_str(), none.as_str(), other_key.as_str(), "garbage", "", "a.b.c"] {
        let c = s.client().await;
        assert_eq!(code(c.call("auth", json!({ "token": bad })).await), "unauthenticated", "{bad}");
        assert_eq!(code(c.call("audit", json!({})).await), "unauthenticated");
    }
    let c = s.client().await;
    assert_eq!(c.call("auth", json!({ "token": token })).await.unwrap()["user"], "alice");
}

#[tokio::test]
async fn tokens_expire_also_on_bound_connections() {
    let s = Server::start_with(&[("TALLY_AUTH_TOKEN_TTL_S", "1")]);
    signup(&s, "alice", "Y19").await;
    let bound = s.client().await;
    let r = bound.login("alice", PW).await.unwrap();
    let (token, expires_at) = (r["token"].as_str().unwrap().to_owned(), r["expires_at"].as_u64().unwrap());
    bound.balance(None).await.unwrap();
    common::wait_past(expires_at).await;
    let e = bound.balance(None).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: the token expired; log in again");
    let c = s.client().await;
    assert_eq!(code(c.call("auth", json!({ "token": token })).await), "unauthenticated");
}

#[tokio::test]
async fn with_one_session_a_login_logout_and_password_change_revoke_older_tokens() {
    let s = Server::start_with(&[("TALLY_AUTH_SESSIONS", "single")]);
    signup(&s, "alice", "Y19").await;

    // A second login revokes the first token, also on its open connection.
    let (first, first_token) = login(&s, "alice").await;
    let (second, second_token) = login(&s, "alice").await;
    assert_eq!(code(first.balance(None).await), "unauthenticated");
    assert_eq!(second.balance(None).await.unwrap(), 0);
    let c = s.client().await;
    assert_eq!(code(c.call("auth", json!({ "token": first_token })).await), "unauthenticated");

    // Logout revokes every token: on another bound connection too.
    let other = s.client().await;
    other.call("auth", json!({ "token": second_token })).await.unwrap();
    second.call("logout", json!({})).await.unwrap();
    assert_eq!(code(second.balance(None).await), "unauthenticated");
    assert_eq!(code(other.balance(None).await), "unauthenticated");

    // A password change needs the old password, revokes older tokens, and
    // keeps the changing connection bound with a new token.
    let (a, token) = login(&s, "alice").await;
    let watcher = s.client().await;
    watcher.call("auth", json!({ "token": token })).await.unwrap();
    let bad =
        a.call("change_password", json!({"old_password": "wrong password", "new_password": "brand new secret"})).await;
    assert_eq!(code(bad), "forbidden");
    let short = a.call("change_password", json!({"old_password": PW, "new_password": "short"})).await;
    assert_eq!(code(short), "bad_request");
    let changed =
        a.call("change_password", json!({"old_password": PW, "new_password": "brand new secret"})).await.unwrap();
    assert!(changed["token"].is_string());
    assert_eq!(a.balance(None).await.unwrap(), 0);
    assert_eq!(code(watcher.balance(None).await), "unauthenticated");
    let old = s.client().await;
    assert_eq!(code(old.login("alice", PW).await), "unauthenticated");
    let new = s.client().await;
    new.login("alice", "brand new secret").await.unwrap();

    // Revocations are durable: they survive a restart.
    let mut s = s;
    let new_token = new.call("login", json!({"user": "alice", "password": "brand new secret"})).await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    s.restart();
    let c = s.client().await;
    assert_eq!(code(c.call("auth", json!({ "token": first_token })).await), "unauthenticated");
    assert_eq!(c.call("auth", json!({ "token": new_token })).await.unwrap()["user"], "alice");
}

/// Failed logins are counted per user and source address: the guesser's
/// address is slowed, the user's right password from elsewhere is not.
#[tokio::test]
async fn repeated_login_failures_are_rate_limited_per_address() {
    let s = Server::start();
    signup(&s, "alice", "Y19").await;
    let from = |n: u8| std::net::IpAddr::from([127, 0, 0, n]);
    // Five wrong passwords from 127.0.0.2, then that address waits: even the
    // right password from there is not checked.
    for _ in 0..5 {
        let c = Client::connect_from(from(2), s.addr).await.unwrap();
        assert_eq!(code(c.login("alice", "wrong password").await), "unauthenticated");
    }
    let c = Client::connect_from(from(2), s.addr).await.unwrap();
    let e = c.login("alice", PW).await.unwrap_err();
    assert_eq!(e.code(), Some("rate_limited"));
    assert!(e.to_string().contains("too many failed logins; try again in"), "{e}");
    // Alice from another address is not locked out, nor is anyone else.
    Client::connect_from(from(3), s.addr).await.unwrap().login("alice", PW).await.unwrap();
    Client::connect_from(from(2), s.addr).await.unwrap().login("admin", ADMIN_PASSWORD).await.unwrap();
}

#[tokio::test]
async fn passwords_never_reach_the_data_folder_or_the_log() {
    let s = Server::start_with(&[("TALLY_LOG", "debug")]);
    signup(&s, "alice", "Y19").await;
    let (c, _) = login(&s, "alice").await;
    c.call("change_password", json!({"old_password": PW, "new_password": "second secret phrase"})).await.unwrap();
    let failed = s.client().await;
    let _ = failed.login("alice", "a guessed password").await;
    drop(c);
    let secrets = [PW, "second secret phrase", "a guessed password", ADMIN_PASSWORD];
    let mut files = vec![common::log_path(&s)];
    // Every file under the data folder (it also holds the dev mail folder).
    let mut dirs = vec![s.data.clone()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for secret in secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret:?} found in {}", f.display());
        }
    }
    let log = std::fs::read_to_string(common::log_path(&s)).unwrap();
    assert!(!log.is_empty(), "the debug log should not be empty");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.data.join("jwt.secret")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
