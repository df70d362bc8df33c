//! Native TLS over real sockets against the real binary, with
//! certificates made for the test (rcgen): the Rust client and the CLI over
//! TLS, binary and text mode; an untrusted CA, a wrong host name and
//! plaintext on the TLS port are refused while the server keeps serving;
//! mutual TLS refuses a client without a certificate or with one from
//! another CA; the plaintext listener can be turned off.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pki::Pki;
use common::{code, create, Server, ADMIN_PASSWORD};
use serde_json::json;
use tally::client::Client;
use tally::tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct TlsServer {
    s: Server,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    fn start(mutual: bool) -> TlsServer {
        Self::start_with(mutual, &[])
    }

    fn start_with(mutual: bool, extra: &[(&str, &str)]) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::make(dir.path());
        let (cert, key, ca) =
            (pki.server_cert.display().to_string(), pki.server_key.display().to_string(), pki.ca.display().to_string());
        let mut env = vec![
            ("TALLY_TLS_LISTEN", "127.0.0.1:0"),
            ("TALLY_TLS_CERT", cert.as_str()),
            ("TALLY_TLS_KEY", key.as_str()),
        ];
        if mutual {
            env.push(("TALLY_TLS_CLIENT_CA", ca.as_str()));
        }
        env.extend_from_slice(extra);
        let s = Server::start_with(&env);
        TlsServer { s, pki, _dir: dir }
    }

    /// The TLS address by name (the certificate names localhost and 127.0.0.1).
    fn named(&self) -> String {
        format!("localhost:{}", self.s.tls_addr.unwrap().port())
    }

    fn trusting(&self) -> ClientTls {
        ClientTls { ca: Some(self.pki.ca.clone()), cert: None }
    }

    async fn client(&self) -> Client {
        Client::connect_tls(&self.named(), &self.trusting()).await.expect("TLS connect")
    }
}

#[tokio::test]
async fn the_rust_client_speaks_the_whole_protocol_over_tls() {
    let t = TlsServer::start(false);
    let admin = t.client().await;
    admin.login("admin", ADMIN_PASSWORD).await.unwrap();
    create(&admin, "alice", 1000).await;
    // Pipelined, as over plaintext.
    let admin = Arc::new(admin);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let a = admin.clone();
            tokio::spawn(
                async move { a.call("transfer", json!({"from": "alice", "to": "@treasury", "amount": 1})).await },
            )
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(admin.balance(Some("alice")).await.unwrap(), 800);
    // By IP address too: the certificate names 127.0.0.1.
    let by_ip = Client::connect_tls(&t.s.tls_addr.unwrap().to_string(), &t.trusting()).await.unwrap();
    assert_eq!(by_ip.call("ping", json!({})).await.unwrap(), "pong");
}

#[tokio::test]
async fn text_mode_works_inside_tls() {
    let t = TlsServer::start(false);
    let config = t.trusting().config().unwrap();
    let tcp = tokio::net::TcpStream::connect(t.s.tls_addr.unwrap()).await.unwrap();
    let name = tally::tls::server_name("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    tls.write_all(b"ping\nlogin user=admin password=wrong-password\n").await.unwrap();
    tls.flush().await.unwrap();
    let mut got = Vec::new();
    while got.iter().filter(|&&b| b == b'\n').count() < 2 {
        let mut buf = [0u8; 512];
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "{\"ok\":\"pong\"}\n{\"err\":{\"code\":\"unauthenticated\",\"message\":\"wrong user or password\"}}\n"
    );
}

#[tokio::test]
async fn untrusted_certificates_and_wrong_names_are_refused_and_the_server_keeps_serving() {
    let t = TlsServer::start(false);
    let other = ClientTls { ca: Some(t.pki.other_ca.clone()), cert: None };
    let e = Client::connect_tls(&t.named(), &other).await.err().expect("refused");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // A trusted CA, but the certificate does not name this host.
    let wrong = format!("tally.example.org:{}", t.s.tls_addr.unwrap().port());
    let config = t.trusting().config().unwrap();
    let tcp = tokio::net::TcpStream::connect(t.s.tls_addr.unwrap()).await.unwrap();
    let name = tally::tls::server_name(&wrong).unwrap();
    let e = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect_err("refused");
    assert!(e.to_string().contains("certificate not valid for name \"tally.example.org\""), "{e}");
    let c = t.client().await;
    assert_eq!(c.call("ping", json!({})).await.unwrap(), "pong");
}

#[tokio::test]
async fn plaintext_on_the_tls_port_gets_no_reply() {
    let t = TlsServer::start(false);
    let anon = t.client().await;
    for request in
        [common::frame(&rmp_serde::to_vec_named(&json!({"id": 1, "op": "ping"})).unwrap()), b"ping\n".to_vec()]
    {
        let mut raw = tokio::net::TcpStream::connect(t.s.tls_addr.unwrap()).await.unwrap();
        raw.write_all(&request).await.unwrap();
        let mut got = Vec::new();
        // The server closes the connection (at most a TLS alert first).
        tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got)).await.unwrap().unwrap_or(0);
        assert!(got.is_empty() || got[0] == 0x15, "a TLS alert at most, got {got:?}");
        assert!(!String::from_utf8_lossy(&got).contains("pong"));
    }
    // Connections already open, and new ones, are served.
    assert_eq!(anon.call("ping", json!({})).await.unwrap(), "pong");
    assert_eq!(t.client().await.call("ping", json!({})).await.unwrap(), "pong");
    assert_eq!(t.s.client().await.call("ping", json!({})).await.unwrap(), "pong");
}

/// A handshake is bounded in time, and TLS connections count against the
/// same `connections_max` as plaintext ones.
#[tokio::test]
async fn a_stalled_handshake_is_closed_and_tls_connections_count_against_the_limit() {
    let t = TlsServer::start_with(
        false,
        &[("TALLY_LIMITS_FRAME_TIMEOUT_MS", "300"), ("TALLY_LIMITS_CONNECTIONS_MAX", "2")],
    );
    // Connected, then silent: closed once the handshake time is up.
    let mut silent = tokio::net::TcpStream::connect(t.s.tls_addr.unwrap()).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut got)).await.unwrap().unwrap();
    assert!(got.is_empty(), "{got:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "closed before its time: {:?}", started.elapsed());
    // Two TLS connections fill the limit: a plaintext one is refused.
    let (a, _b) = (t.client().await, t.client().await);
    assert_eq!(a.call("ping", json!({})).await.unwrap(), "pong");
    let mut third = tokio::net::TcpStream::connect(t.s.addr).await.unwrap();
    let mut len = [0u8; 4];
    third.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    third.read_exact(&mut body).await.unwrap();
    let reply: serde_json::Value = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(reply["err"]["code"], "overloaded");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let t = TlsServer::start(true);
    // TLS 1.3 finishes the client's side of the handshake before the server
    // checks the client's certificate: the refusal shows at the first call.
    for tls in [
        t.trusting(),
        ClientTls {
            ca: Some(t.pki.ca.clone()),
            cert: Some((t.pki.other_client_cert.clone(), t.pki.other_client_key.clone())),
        },
    ] {
        let refused = match Client::connect_tls(&t.named(), &tls).await {
            Err(_) => true,
            Ok(c) => c.call("ping", json!({})).await.is_err(),
        };
        assert!(refused, "a client without a trusted certificate was served");
    }
    let with =
        ClientTls { ca: Some(t.pki.ca.clone()), cert: Some((t.pki.client_cert.clone(), t.pki.client_key.clone())) };
    let c = Client::connect_tls(&t.named(), &with).await.unwrap();
    assert_eq!(c.call("ping", json!({})).await.unwrap(), "pong");
    // The certificate gates the connection; the client still logs in.
    assert_eq!(code(c.call("stats", json!({})).await), "unauthenticated");
    c.login("admin", ADMIN_PASSWORD).await.unwrap();
    c.call("stats", json!({})).await.unwrap();
}

#[tokio::test]
async fn the_cli_calls_over_tls_with_a_key() {
    let t = TlsServer::start(false);
    let admin = t.client().await;
    admin.login("admin", ADMIN_PASSWORD).await.unwrap();
    let key = admin.call("create_key", json!({"name": "cli", "role": "auditor"})).await.unwrap();
    let cli = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["call", "--connect", &t.named()])
            .args(extra)
            .env("TALLY_KEY", key["secret"].as_str().unwrap())
            .env("TALLY_LOG", "warn")
            .output()
            .unwrap()
    };
    let ca = t.pki.ca.display().to_string();
    let out = cli(&["--tls", "--ca", &ca, "audit"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((audit["sum"].as_i64(), audit["chain_ok"].as_bool()), (Some(0), Some(true)));
    // Without the CA the system's roots do not trust the test CA.
    let out = cli(&["--tls", "ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key's role holds on the CLI as anywhere.
    let out = cli(&["--tls", "--ca", &ca, "mint", "to=x", "amount=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    // A key or password is not sent in clear to another host (nothing is
    // even connected to: the address is unroutable).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["call", "--connect", "192.0.2.1:7707", "--user", "admin", "--password", "x", "stats"])
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tally: refusing to send a password or key in clear to 192.0.2.1:7707: use --tls (or --allow-plaintext)\n"
    );
}

/// `listen = ""`: TLS only, and the server says so; a plaintext listener
/// on a non-loopback address is warned about.
#[tokio::test]
async fn the_plaintext_listener_can_be_turned_off_and_exposing_it_is_warned() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let spawn = |listen: &str, log: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--listen", listen, "--data"])
            .arg(dir.path().join(format!("data{}", listen.len())))
            .env("TALLY_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("TALLY_TLS_LISTEN", "127.0.0.1:0")
            .env("TALLY_TLS_CERT", &pki.server_cert)
            .env("TALLY_TLS_KEY", &pki.server_key)
            .env("TALLY_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let log = dir.path().join("only-tls.log");
    let mut only_tls = spawn("", &log);
    let mut line = String::new();
    std::io::BufReader::new(only_tls.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port =
        line.trim().strip_prefix("tally listening with tls on 127.0.0.1:").expect("the TLS line first").to_owned();
    let c = Client::connect_tls(&format!("localhost:{port}"), &ClientTls { ca: Some(pki.ca.clone()), cert: None })
        .await
        .unwrap();
    assert_eq!(c.call("ping", json!({})).await.unwrap(), "pong");
    only_tls.kill().unwrap();
    only_tls.wait().unwrap();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("plaintext listener"));

    let log = dir.path().join("exposed.log");
    let mut exposed = spawn("0.0.0.0:0", &log);
    let mut line = String::new();
    std::io::BufReader::new(exposed.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("tally listening on 0.0.0.0:"), "{line}");
    exposed.kill().unwrap();
    exposed.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("plaintext listener on a non-loopback address"), "{text}");
}
