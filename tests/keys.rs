//! Service keys, roles and several sessions, over real TCP against the
//! real binary: an application bound with a key outlives every admin
//! login and logout, and stops at its next request once the key is
//! revoked; each role gets exactly its ops; a key limited to accounts
//! moves money out of those only; records name who acted; with several
//! sessions a login revokes nothing and `logout all=true` ends them all.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{code, create, wait_past, Server, ADMIN_PASSWORD};
use serde_json::{json, Value};
use tally::client::Client;

const PW: &str = "correct horse battery";

async fn make_key(admin: &Client, name: &str, role: &str, extra: Value) -> (String, String) {
    let mut args = json!({"name": name, "role": role});
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    let k = admin.call("create_key", args).await.expect("create_key");
    (k["key_id"].as_str().unwrap().to_owned(), k["secret"].as_str().unwrap().to_owned())
}

/// A user made by an admin with `create_user`: `{user}@example.org`, password [`PW`].
async fn make_user(admin: &Client, user: &str, role: &str) -> Value {
    let name = format!("{}{}", user[..1].to_uppercase(), &user[1..]);
    let args =
        json!({"user": user, "role": role, "name": name, "email": format!("{user}@example.org"), "password": PW});
    admin.call("create_user", args).await.expect("create_user")
}

async fn bound(s: &Server, secret: &str) -> Client {
    let c = s.client().await;
    c.call("auth", json!({ "key": secret })).await.expect("auth with the key");
    c
}

fn from(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// The operator story: an application holds an admin-role connection with
/// pipelined transfers while people log in, out and in again (also in
/// single-session mode, where each login revokes the admin's older
/// tokens): the key is never revoked by any of it.
#[tokio::test]
async fn a_key_outlives_every_admin_login_and_logout() {
    let s = Server::start_with(&[("TALLY_AUTH_SESSIONS", "single")]);
    let admin = s.admin().await;
    create(&admin, "shop", 1_000_000).await;
    create(&admin, "bank", 0).await;
    let (_, secret) = make_key(&admin, "shop app", "admin", json!({})).await;
    let app = std::sync::Arc::new(bound(&s, &secret).await);
    for round in 0..3 {
        // In flight (spawned, so sent) while the logins below happen.
        let calls: Vec<_> = (0..160)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(
                    async move { app.call("transfer", json!({"from": "shop", "to": "bank", "amount": 1})).await },
                )
            })
            .collect();
        // Meanwhile an operator logs in (revoking the admin's older tokens),
        // logs out, and logs in again from another address.
        let operator = Client::connect_from(from(2 + round), s.addr).await.unwrap();
        operator.login("admin", ADMIN_PASSWORD).await.unwrap();
        operator.call("stats", json!({})).await.unwrap();
        operator.call("logout", json!({"all": true})).await.unwrap();
        Client::connect_from(from(5 + round), s.addr).await.unwrap().login("admin", ADMIN_PASSWORD).await.unwrap();
        for c in calls {
            c.await.unwrap().expect("every transfer of the application succeeds");
        }
    }
    let bank = app.call("balance", json!({"account": "bank"})).await.unwrap();
    assert_eq!(bank["balance"], 480);
}

#[tokio::test]
async fn revoking_a_key_cuts_its_connections_off_at_the_next_request() {
    let s = Server::start();
    let admin = s.admin().await;
    create(&admin, "shop", 100).await;
    let (key_id, secret) = make_key(&admin, "shop app", "operator", json!({})).await;
    let app = bound(&s, &secret).await;
    let other = bound(&s, &secret).await;
    assert_eq!(app.balance(Some("shop")).await.unwrap(), 100);
    let revoked = admin.call("revoke_key", json!({ "key_id": key_id })).await.unwrap();
    assert_eq!(revoked["revoked_by"], "admin");
    assert!(revoked["revoked_at"].as_u64().unwrap() > 0);
    assert!(revoked.get("secret").is_none() && revoked.get("hash").is_none());
    for c in [&app, &other] {
        let e = c.balance(Some("shop")).await.unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            (Some("unauthenticated"), "unauthenticated: the key was revoked")
        );
        // Unbound from then on.
        let e = c.balance(Some("shop")).await.unwrap_err();
        assert_eq!(e.to_string(), "unauthenticated: log in first (login or auth)");
    }
    let e = s.client().await.call("auth", json!({ "key": secret })).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: invalid key");
    // Revoked keys stay on record, with who revoked them.
    let keys = admin.call("list_keys", json!({})).await.unwrap();
    assert_eq!(keys["keys"][0]["key_id"], key_id.as_str());
    assert_eq!(keys["keys"][0]["revoked_by"], "admin");
}

#[tokio::test]
async fn an_auditor_reads_and_changes_nothing() {
    let s = Server::start();
    let admin = s.admin().await;
    create(&admin, "shop", 100).await;
    let (_, secret) = make_key(&admin, "books", "auditor", json!({})).await;
    let auditor = bound(&s, &secret).await;
    let audit = auditor.call("audit", json!({})).await.unwrap();
    assert_eq!((audit["sum"].as_i64(), audit["chain_ok"].as_bool()), (Some(0), Some(true)));
    let h = auditor.call("history", json!({"account": "shop"})).await.unwrap();
    assert_eq!(h["transfers"][0]["to"], "shop");
    assert_eq!(auditor.balance(Some("shop")).await.unwrap(), 100);
    for (op, args) in [
        ("transfer", json!({"from": "shop", "to": "@treasury", "amount": 1})),
        ("mint", json!({"to": "shop", "amount": 1})),
        ("create_key", json!({"name": "x", "role": "admin"})),
        ("create_account", json!({"account": "x"})),
        ("hold", json!({"from": "shop", "to": "@treasury", "amount": 1})),
        ("backup", json!({"out": "b.redb"})),
        ("redeem", json!({"item": "mug", "amount": 1})),
    ] {
        let e = auditor.call(op, args).await.unwrap_err();
        assert_eq!(e.to_string(), format!("forbidden: the role auditor may not call {op}"), "{op}");
    }
    assert_eq!(auditor.balance(Some("shop")).await.unwrap(), 100);
    let audit = admin.call("audit", json!({})).await.unwrap();
    assert_eq!(audit["transfers"], 1, "only the create's funding");
}

#[tokio::test]
async fn an_operator_moves_money_but_makes_no_users_or_keys() {
    let s = Server::start();
    let admin = s.admin().await;
    let (key_id, secret) = make_key(&admin, "ops", "operator", json!({})).await;
    let op = bound(&s, &secret).await;
    create(&op, "shop", 50).await;
    let t = op.call("mint", json!({"to": "shop", "amount": 7})).await.unwrap();
    let actor = format!("key:{key_id}");
    assert_eq!(t["by"], actor.as_str());
    let t = op.call("transfer", json!({"from": "shop", "to": "@treasury", "amount": 2})).await.unwrap();
    assert_eq!((t["from_balance"].as_i64(), t["by"].as_str()), (Some(55), Some(actor.as_str())));
    // Records keep who made them.
    let stored = admin.call("get_transfer", json!({"id": t["id"]})).await.unwrap();
    assert_eq!(stored["by"], actor.as_str());
    let user = json!({"user": "ann", "role": "admin", "name": "Ann", "email": "ann@example.org", "password": PW});
    for (o, args) in [
        ("create_user", user),
        ("create_key", json!({"name": "x", "role": "auditor"})),
        ("list_keys", json!({})),
        ("revoke_key", json!({ "key_id": key_id })),
        ("backup", json!({"out": "b.redb"})),
    ] {
        assert_eq!(code(op.call(o, args).await), "forbidden", "{o}");
    }
    assert_eq!(op.call("whoami", json!({})).await.unwrap()["role"], "operator");
    assert_eq!(code(op.call("change_password", json!({"old_password": PW, "new_password": PW})).await), "forbidden");
}

#[tokio::test]
async fn a_key_limited_to_accounts_moves_money_out_of_those_only() {
    let s = Server::start();
    let admin = s.admin().await;
    for a in ["till", "float", "vault"] {
        create(&admin, a, 100).await;
    }
    admin.call("tag", json!({"account": "vault", "add": ["all"]})).await.unwrap();
    let (_, secret) = make_key(&admin, "till app", "operator", json!({"accounts": ["till", "float"]})).await;
    let k = bound(&s, &secret).await;
    k.call("transfer", json!({"from": "till", "to": "vault", "amount": 10})).await.unwrap();
    k.call("transfer", json!({"from": "float", "to": "till", "amount": 5})).await.unwrap();
    let refused = [
        ("transfer", json!({"from": "vault", "to": "till", "amount": 1})),
        ("hold", json!({"from": "vault", "to": "till", "amount": 1})),
        ("add", json!({"account": "vault", "delta": -1})),
        ("mint", json!({"to": "till", "amount": 1})),
        ("create_account", json!({"account": "new", "initial": 5})),
        ("bulk_add", json!({"tag": "all", "delta": 1})),
        ("reap", json!({"reason": "sweep"})),
        ("delete_account", json!({"account": "vault", "reason": "x"})),
    ];
    for (op, args) in refused {
        assert_eq!(code(k.call(op, args).await), "forbidden", "{op}");
    }
    // A hold from another account, made by the admin, cannot be posted by the key.
    let h = admin.call("hold", json!({"from": "vault", "to": "till", "amount": 3})).await.unwrap();
    assert_eq!(code(k.call("post", json!({"hold": h["hold"]})).await), "forbidden");
    // Crediting its accounts from @mint is a debit of @mint: refused too;
    // reading the others is its role's right.
    assert_eq!(code(k.call("add", json!({"account": "till", "delta": 1})).await), "forbidden");
    assert_eq!(k.balance(Some("vault")).await.unwrap(), 110);
    for (a, b) in [("till", 95), ("float", 95), ("vault", 110)] {
        assert_eq!(admin.balance(Some(a)).await.unwrap(), b, "{a}");
    }
    // Creating an account with nothing in it moves no money.
    k.call("create_account", json!({"account": "new"})).await.unwrap();
}

#[tokio::test]
async fn admins_make_users_of_every_role_and_records_name_them() {
    let mut m = common::MailServer::start(&[("TALLY_AUTH_SIGNUP", "false")]);
    let admin = m.s.admin().await;
    let made = make_user(&admin, "olga", "operator").await;
    assert_eq!(
        made,
        json!({"user": "olga", "name": "Olga", "email": "olga@example.org", "role": "operator", "group": null, "events": 0})
    );
    make_user(&admin, "ada", "admin").await;
    // A user, made while signup is closed, gets an account as at signup.
    make_user(&admin, "ben", "user").await;
    assert_eq!(admin.call("account", json!({"account": "ben"})).await.unwrap()["owner"], "ben");
    assert_eq!(code(admin.call("account", json!({"account": "olga"})).await), "not_found", "staff own no account");
    let bad = |user: &str, role: &str| json!({"user": user, "role": role, "name": "X", "email": "x@example.org", "password": PW});
    assert_eq!(code(admin.call("create_user", bad("olga", "user")).await), "exists");
    assert_eq!(code(admin.call("create_user", bad("zed", "root")).await), "bad_request");
    assert_eq!(code(admin.call("create_user", bad("key:0123456789ab", "user")).await), "forbidden");

    let olga = m.s.client().await;
    assert_eq!(olga.login("olga", PW).await.unwrap()["role"], "operator");
    let t = olga.call("mint", json!({"to": "ben", "amount": 9})).await.unwrap();
    assert_eq!(t["by"], "olga");
    assert_eq!(code(olga.call("create_user", bad("zed", "user")).await), "forbidden");
    let ada = m.s.client().await;
    ada.login("ada", PW).await.unwrap();
    let (key_id, _) = make_key(&ada, "ada's", "auditor", json!({})).await;
    let keys = admin.call("list_keys", json!({})).await.unwrap();
    assert_eq!(keys["keys"][0]["key_id"], key_id.as_str());
    assert_eq!(keys["keys"][0]["created_by"], "ada");
    // An operator decides a redeem request: the decision names her.
    let ben = m.s.client().await;
    ben.login("ben", PW).await.unwrap();
    let pending = ben.call("redeem", json!({"item": "mug", "amount": 4})).await.unwrap();
    let (_, otp, _) = m.mail.next();
    let request = ben.call("confirm", json!({"pending": pending["pending"], "otp": otp})).await.unwrap();
    // A key limited to other accounts may not decide it (accepting moves
    // money out of ben's account).
    let (_, limited_secret) = make_key(&admin, "till", "operator", json!({"accounts": ["till"]})).await;
    let decide = json!({"request": request["request"], "accept": true});
    let till = bound(&m.s, &limited_secret).await;
    assert_eq!(code(till.call("decide_redeem", decide.clone()).await), "forbidden");
    let decided = olga.call("decide_redeem", decide).await.unwrap();
    assert_eq!((decided["decided_by"].as_str(), decided["status"].as_str()), (Some("olga"), Some("accepted")));
    // Users see who made a transfer only when it was themselves; staff see all.
    let mine = ben.call("history", json!({})).await.unwrap();
    let kinds: Vec<(&str, &serde_json::Value)> =
        mine["transfers"].as_array().unwrap().iter().map(|t| (t["kind"].as_str().unwrap(), &t["by"])).collect();
    assert_eq!(kinds, [("post", &Value::Null), ("hold", &json!("ben")), ("mint", &Value::Null)]);
    let seen = admin.call("history", json!({"account": "ben"})).await.unwrap();
    assert_eq!(seen["transfers"][0]["by"], "olga");
    assert_eq!(seen["transfers"][2]["by"], "olga");
    let mint_id = seen["transfers"][2]["id"].clone();
    assert_eq!(ben.call("get_transfer", json!({"id": mint_id})).await.unwrap()["by"], Value::Null);
}

#[tokio::test]
async fn with_several_sessions_a_login_revokes_nothing_and_logout_all_ends_them_all() {
    let s = Server::start();
    let admin = s.admin().await;
    make_user(&admin, "ann", "user").await;
    let (phone, laptop, tablet) = (s.client().await, s.client().await, s.client().await);
    phone.login("ann", PW).await.unwrap();
    let laptop_token = laptop.login("ann", PW).await.unwrap()["token"].as_str().unwrap().to_owned();
    tablet.login("ann", PW).await.unwrap();
    for c in [&phone, &laptop, &tablet] {
        assert_eq!(c.balance(None).await.unwrap(), 0);
    }
    // `logout` ends the caller's token only: on its connection, and anywhere else.
    laptop.call("logout", json!({})).await.unwrap();
    assert_eq!(code(laptop.balance(None).await), "unauthenticated");
    let again = s.client().await;
    let e = again.call("auth", json!({ "token": laptop_token })).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: the token was revoked");
    for c in [&phone, &tablet] {
        assert_eq!(c.balance(None).await.unwrap(), 0);
    }
    // `logout all=true` ends every token of the user.
    phone.call("logout", json!({"all": true})).await.unwrap();
    let e = tablet.balance(None).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: the token was revoked; log in again");
    assert_eq!(code(phone.balance(None).await), "unauthenticated");
    // A login after that works again.
    phone.login("ann", PW).await.unwrap();
    assert_eq!(phone.balance(None).await.unwrap(), 0);
}

#[tokio::test]
async fn with_one_session_a_login_revokes_the_older_tokens() {
    let s = Server::start_with(&[("TALLY_AUTH_SESSIONS", "single")]);
    let admin = s.admin().await;
    make_user(&admin, "ann", "user").await;
    let (first, second) = (s.client().await, s.client().await);
    first.login("ann", PW).await.unwrap();
    second.login("ann", PW).await.unwrap();
    assert_eq!(code(first.balance(None).await), "unauthenticated");
    assert_eq!(second.balance(None).await.unwrap(), 0);
}

#[tokio::test]
async fn keys_are_checked_shown_once_and_guessing_them_is_throttled() {
    let s = Server::start();
    let admin = s.admin().await;
    for (args, want) in [
        (json!({"name": "x", "role": "user"}), "bad_request"),
        (json!({"name": "x", "role": "root"}), "bad_request"),
        (json!({"name": "", "role": "auditor"}), "bad_request"),
        (json!({"name": "x", "role": "auditor", "accounts": []}), "bad_request"),
        (json!({"name": "x", "role": "auditor", "accounts": ["bad id"]}), "bad_request"),
        (json!({"name": "x", "role": "auditor", "expires_s": 0}), "bad_request"),
        (json!({"name": "x", "role": "auditor", "secret": "mine"}), "bad_request"),
        // An admin key could make itself an unlimited one.
        (json!({"name": "x", "role": "admin", "accounts": ["a"]}), "bad_request"),
    ] {
        assert_eq!(code(admin.call("create_key", args.clone()).await), want, "{args}");
    }
    let made = admin.call("create_key", json!({"name": "reports", "role": "auditor"})).await.unwrap();
    let (key_id, secret) = (made["key_id"].as_str().unwrap(), made["secret"].as_str().unwrap());
    assert_eq!(key_id.len(), 12);
    assert_eq!(secret.len(), "tally_".len() + 12 + 1 + 43);
    let k = bound(&s, secret).await;
    let me = k.call("whoami", json!({})).await.unwrap();
    assert_eq!(
        (me["key_id"].as_str(), me["name"].as_str(), me["role"].as_str()),
        (Some(key_id), Some("reports"), Some("auditor"))
    );
    assert!(me.get("secret").is_none() && me.get("hash").is_none());
    let listed = admin.call("list_keys", json!({})).await.unwrap();
    assert!(!listed.to_string().contains(&secret[18..]), "the secret is never shown again");
    // The secret is nowhere in the data folder either.
    for f in std::fs::read_dir(&s.data).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{}", p.display());
        }
    }
    // Wrong secrets for a real key id cost failed logins: five, then a wait.
    let guesser = Client::connect_from(from(9), s.addr).await.unwrap();
    let wrong = format!("{}{}", &secret[..secret.len() - 1], if secret.ends_with('A') { 'B' } else { 'A' });
    for _ in 0..5 {
        let e = guesser.call("auth", json!({ "key": wrong })).await.unwrap_err();
        assert_eq!(e.to_string(), "unauthenticated: invalid key");
    }
    assert_eq!(code(guesser.call("auth", json!({ "key": secret })).await), "rate_limited");
    // Others are not held up; a malformed key is refused alike.
    assert_eq!(code(s.client().await.call("auth", json!({"key": "tally_nope"})).await), "unauthenticated");
    bound(&s, secret).await;
    assert_eq!(code(s.client().await.call("auth", json!({"key": secret, "token": "x"})).await), "bad_request");
}

#[tokio::test]
async fn a_key_dies_at_its_expiry_on_connections_already_bound() {
    let s = Server::start();
    let admin = s.admin().await;
    let made = admin.call("create_key", json!({"name": "short", "role": "auditor", "expires_s": 1})).await.unwrap();
    let k = bound(&s, made["secret"].as_str().unwrap()).await;
    k.call("stats", json!({})).await.unwrap();
    wait_past(made["expires_at"].as_u64().unwrap()).await;
    let e = k.call("stats", json!({})).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: the key expired");
    let e = s.client().await.call("auth", json!({"key": made["secret"]})).await.unwrap_err();
    assert_eq!(e.to_string(), "unauthenticated: invalid key");
}

#[tokio::test]
async fn list_keys_pages_by_key_id() {
    let s = Server::start();
    let admin = s.admin().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(make_key(&admin, &format!("k{i}"), "auditor", json!({})).await.0);
    }
    ids.sort();
    let first = admin.call("list_keys", json!({"limit": 3})).await.unwrap();
    let got: Vec<&str> = first["keys"].as_array().unwrap().iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(got, ids[..3]);
    assert_eq!(first["next"], ids[2].as_str());
    let rest = admin.call("list_keys", json!({"limit": 3, "after": first["next"]})).await.unwrap();
    let got: Vec<&str> = rest["keys"].as_array().unwrap().iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(got, ids[3..]);
    assert_eq!(rest["next"], Value::Null);
}

/// `tally admin create-key` on the host: refused while the server runs
/// (the database has one opener), then works on the stopped data folder,
/// and the server loads the key at its next start.
#[tokio::test]
async fn a_key_made_on_the_host_works_after_a_restart() {
    let mut s = Server::start();
    let run = |s: &Server| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["admin", "create-key", "--name", "deploy", "--role", "operator", "--accounts", "a,b", "--data"])
            .arg(&s.data)
            .env("TALLY_LOG", "warn")
            .output()
            .unwrap()
    };
    let busy = run(&s);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is in use: stop the server first"));
    s.sigterm();
    let out = run(&s);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let key_id = lines.next().unwrap().strip_prefix("key_id ").unwrap().to_owned();
    let secret = lines.next().unwrap().strip_prefix("secret ").unwrap().to_owned();
    s.start_again();
    let k = bound(&s, &secret).await;
    let me = k.call("whoami", json!({})).await.unwrap();
    assert_eq!(
        (me["key_id"].as_str(), me["role"].as_str(), me["created_by"].as_str(), me["accounts"].clone()),
        (Some(key_id.as_str()), Some("operator"), Some("host"), json!(["a", "b"]))
    );
}

/// A fresh data folder can start with a key and no admin password at all.
#[tokio::test]
async fn a_deployment_bootstraps_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["admin", "create-key", "--name", "boot", "--role", "admin", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let secret = text.lines().nth(1).unwrap().strip_prefix("secret ").unwrap().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("tally.redb")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut s = Server::start_with(&[("TALLY_AUTH_ADMIN_PASSWORD", common::UNSET)]);
    s.kill9();
    std::fs::remove_dir_all(&s.data).unwrap();
    std::fs::rename(&data, &s.data).unwrap();
    s.start_again();
    let k = bound(&s, &secret).await;
    create(&k, "first", 10).await;
    assert_eq!(k.call("audit", json!({})).await.unwrap()["sum"], 0);
}

/// At most 1000 unrevoked keys: the next is refused, and revoking one
/// makes room again. Keys made at once are counted exactly.
#[tokio::test]
async fn live_keys_are_bounded_and_revoking_makes_room() {
    let s = Server::start();
    let admin = std::sync::Arc::new(s.admin().await);
    let made: Vec<_> = (0..1001)
        .map(|i| {
            let admin = admin.clone();
            tokio::spawn(
                async move { admin.call("create_key", json!({"name": format!("k{i}"), "role": "auditor"})).await },
            )
        })
        .collect();
    let (mut ok, mut refused, mut first) = (0, 0, None);
    for m in made {
        match m.await.unwrap() {
            Ok(k) => {
                ok += 1;
                first.get_or_insert(k["key_id"].as_str().unwrap().to_owned());
            }
            Err(e) => {
                assert_eq!(e.to_string(), "bad_request: at most 1000 unrevoked keys: revoke one first");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (1000, 1));
    admin.call("revoke_key", json!({ "key_id": first })).await.unwrap();
    admin.call("create_key", json!({"name": "again", "role": "auditor"})).await.unwrap();
    assert_eq!(code(admin.call("create_key", json!({"name": "more", "role": "auditor"})).await), "bad_request");
}
