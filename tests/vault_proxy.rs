#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The card-vault egress proxy against a local HTTPS "merchant" (test CA from rcgen):
//! vault placeholders are filled in for the merchant only; everything else is refused.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use roony::policy::CardDeliveryRule;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the merchant received: the raw request text.
type Seen = Arc<Mutex<Vec<String>>>;

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, seen: Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
            }
            break;
        }
    }
    seen.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&buf).into_owned());
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\nconnection: close\r\n\r\n{\"paid\":\"done\"}\n")
        .await;
    let _ = s.shutdown().await;
}

/// A merchant on 127.0.0.1: HTTPS with a certificate for `names` signed by a fresh test CA
/// (whose PEM is returned), or plain HTTP.
async fn merchant(tls: bool, names: &[&str]) -> (SocketAddr, Seen, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "roony test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let acceptor = if tls {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                    leaf_key.serialize_der().into(),
                ),
            )
            .unwrap();
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    } else {
        None
    };
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = s2.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(stream).await {
                            serve_one(s, seen).await
                        }
                    }
                    None => serve_one(stream, seen).await,
                }
            });
        }
    });
    (addr, seen, ca.pem())
}

fn vault_purchase(domain: &str) -> Value {
    json!({
        "amount": 1200,
        "currency": "usd",
        "merchant": {"name": "Test Shop", "url": format!("https://{domain}/checkout"), "country": "US"},
        "description": "a checkout through the vault proxy",
        "card_delivery": "vault"
    })
}

struct Setup {
    proxy: String,
    http: reqwest::Client,
}

impl Setup {
    /// An explicit-upstream request (`X-Roony-Upstream`) with the agent key `key`.
    async fn explicit(
        &self,
        key: Option<&str>,
        upstream: &str,
        headers: &[(&str, &str)],
        body: (&str, String),
    ) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}/checkout", self.proxy))
            .header("x-roony-upstream", upstream)
            .header("content-type", body.0)
            .body(body.1);
        if let Some(k) = key {
            r = r.header("proxy-authorization", format!("Bearer {k}"));
        }
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vault_cards_reach_only_their_merchant() {
    let dir = tempfile::tempdir().unwrap();
    // Trace logging into the data dir: scanned for the PAN at the end.
    let log = std::fs::File::create(dir.path().join("trace.log")).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(Mutex::new(log))
        .with_ansi(false)
        .try_init();

    let emu = start_emulator().await;
    let clock = TestClock::new();
    let mut policy = demo_policy();
    policy.card_delivery = CardDeliveryRule::VaultOnly;
    let sc = start_sidecar(dir.path(), &emu, clock.clone(), policy.clone()).await;
    // The proxy records what it forwards and refuses in the sidecar's audit chain.
    roony::audit::http::register_data_dir(dir.path());
    let other_key = sc
        .service
        .create_agent("agt_other", "other agent", policy, None)
        .unwrap();

    let (shop, seen, ca_pem) = merchant(true, &["shop.test"]).await;
    let (evil, evil_seen, evil_ca) = merchant(true, &["evil.test"]).await;
    let (plain, plain_seen, _) = merchant(false, &[]).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, format!("{ca_pem}{evil_ca}")).unwrap();

    let mut config = roony::proxy::ProxyConfig::new("127.0.0.1:0".parse().unwrap());
    config.extra_ca = Some(ca);
    config.resolve.insert("shop.test".into(), shop);
    config.resolve.insert("evil.test".into(), evil);
    config.resolve.insert("plain.test".into(), plain);
    let running = roony::sidecar::start_proxy(sc.service.clone(), config)
        .await
        .unwrap();
    let s = Setup {
        proxy: format!("http://{}", running.addr),
        http: reqwest::Client::new(),
    };

    // vault_only refuses raw delivery with a stable code.
    let mut raw = vault_purchase("shop.test");
    raw["card_delivery"] = json!("raw");
    let (status, body) = sc.post("/api/v1/purchase_intent", raw).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(code(&body), "card_delivery_not_allowed", "{body}");

    // A vault purchase returns placeholders, never the number.
    let (status, intent) = sc
        .post("/api/v1/purchase_intent", vault_purchase("shop.test"))
        .await;
    assert_eq!(status, 201, "{intent}");
    let id = intent["id"].as_str().unwrap().to_string();
    let ph = &intent["card"]["placeholders"];
    assert_eq!(ph["number"], format!("{{{{roony:card:{id}:number}}}}"));
    assert_eq!(intent["card"]["number"], ph["number"]);
    let pan = sc.service.vault().get(&id).unwrap().number.clone();
    assert!(luhn(&pan));
    assert!(!intent.to_string().contains(&pan));
    let n = ph["number"].as_str().unwrap().to_string();
    let cvc = ph["cvc"].as_str().unwrap().to_string();
    let exp_m = ph["exp_month"].as_str().unwrap().to_string();
    let json_body = json!({"card": n, "cvc": cvc, "exp_month": exp_m}).to_string();
    let key = sc.key.clone();

    // 1. Success, explicit-upstream HTTPS form: JSON body and a header.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://shop.test",
            &[("x-card-number", &n)],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paid"], "done");
    {
        let got = seen.lock().unwrap();
        let req = got.last().unwrap();
        assert!(req.contains(&format!("\"card\":\"{pan}\"")), "{req}");
        assert!(
            req.to_ascii_lowercase()
                .contains(&format!("x-card-number: {pan}")),
            "{req}"
        );
        assert!(!req.contains("roony:card"), "{req}");
        assert!(
            !req.to_ascii_lowercase().contains("proxy-authorization"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase().contains("host: shop.test"),
            "{req}"
        );
    }
    // Form-encoded, placeholders percent-encoded as browsers and HTTP clients send them.
    let form = format!(
        "number={}&cvc={}",
        n.replace('{', "%7B")
            .replace('}', "%7D")
            .replace(':', "%3A"),
        cvc
    );
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://shop.test",
            &[],
            ("application/x-www-form-urlencoded", form),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        seen.lock()
            .unwrap()
            .last()
            .unwrap()
            .contains(&format!("number={pan}&cvc="))
    );

    // 2. Plain-HTTP forward-proxy form (a merchant on plain.test allowed by a second intent).
    let (status, intent2) = sc
        .post("/api/v1/purchase_intent", {
            let mut p = vault_purchase("plain.test");
            p["description"] = json!("second checkout");
            p
        })
        .await;
    assert_eq!(status, 201, "{intent2}");
    let n2 = intent2["card"]["placeholders"]["number"]
        .as_str()
        .unwrap()
        .to_string();
    let fwd = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(&s.proxy)
                .unwrap()
                .custom_http_auth(format!("Bearer {key}").parse().unwrap()),
        )
        .build()
        .unwrap();
    let resp = fwd
        .post("http://plain.test/pay")
        .header("content-type", "application/json")
        .body(json!({"card": n2}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    let pan2 = sc
        .service
        .vault()
        .get(intent2["id"].as_str().unwrap())
        .unwrap()
        .number
        .clone();
    assert!(plain_seen.lock().unwrap().last().unwrap().contains(&pan2));

    // 3. Refusals, none of which reaches any merchant.
    let before = (seen.lock().unwrap().len(), evil_seen.lock().unwrap().len());
    // Unauthenticated.
    let (status, body) = s
        .explicit(
            None,
            "https://shop.test",
            &[],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (407, "proxy_authentication_required"),
        "{body}"
    );
    let (status, body) = s
        .explicit(
            Some("rk_wrong"),
            "https://shop.test",
            &[],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (407, "proxy_authentication_required"),
        "{body}"
    );
    // The same checkout to another host.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://evil.test",
            &[],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "destination_not_allowed"),
        "{body}"
    );
    // A placeholder in a header to another host.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://evil.test",
            &[("x-card", &n)],
            ("text/plain", String::new()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "destination_not_allowed"),
        "{body}"
    );
    // Not an open proxy: no placeholders, not a merchant of an active intent.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://evil.test",
            &[],
            ("text/plain", "hello".into()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "destination_not_allowed"),
        "{body}"
    );
    let resp = fwd.get("http://example.com/").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // A raw card's number (delivered to an agent whose policy allows raw cards) is blocked
    // too, even to its own merchant: the sidecar knows every card it issued.
    let raw_key = sc
        .service
        .create_agent("agt_raw", "raw agent", demo_policy(), None)
        .unwrap();
    let mut raw_buy = vault_purchase("shop.test");
    raw_buy["card_delivery"] = json!("raw");
    let r = s
        .http
        .post(format!("{}/api/v1/purchase_intent", sc.url))
        .bearer_auth(&raw_key)
        .json(&raw_buy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let raw_card: Value = r.json().await.unwrap();
    let raw_pan = raw_card["card"]["number"].as_str().unwrap().to_string();
    assert!(!raw_pan.contains("roony"), "a raw card: {raw_card}");
    let (status, body) = s
        .explicit(
            Some(&raw_key),
            "https://shop.test",
            &[],
            (
                "application/json",
                json!({"card": {"number": raw_pan}}).to_string(),
            ),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "raw_card_number_blocked"),
        "{body}"
    );
    // Another agent's placeholders.
    let (status, body) = s
        .explicit(
            Some(&other_key),
            "https://shop.test",
            &[],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "placeholder_not_yours"),
        "{body}"
    );
    // An unknown intent.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://shop.test",
            &[],
            (
                "application/json",
                json!({"card": "{{roony:card:pur_nope:number}}"}).to_string(),
            ),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "intent_not_active"), "{body}");
    // The raw number of an issued card, to any host (the merchant's included).
    for host in ["https://evil.test", "https://shop.test"] {
        let (status, body) = s
            .explicit(
                Some(&key),
                host,
                &[],
                ("application/json", json!({"card": pan.clone()}).to_string()),
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (403, "raw_card_number_blocked"),
            "{body}"
        );
    }
    let spaced = format!(
        "{} {} {} {}",
        &pan[..4],
        &pan[4..8],
        &pan[8..12],
        &pan[12..]
    );
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://evil.test",
            &[("x-pan", &spaced)],
            ("text/plain", String::new()),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "raw_card_number_blocked"),
        "{body}"
    );
    // Too large a body.
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://shop.test",
            &[],
            ("text/plain", "x".repeat(70_000)),
        )
        .await;
    assert_eq!((status, code(&body)), (413, "body_too_large"), "{body}");
    assert_eq!(
        before,
        (seen.lock().unwrap().len(), evil_seen.lock().unwrap().len()),
        "a refused request reached a merchant"
    );

    // 4. A canceled intent, then an expired one.
    let id2 = intent2["id"].as_str().unwrap();
    let (status, _) = sc
        .post(&format!("/api/v1/purchase_intents/{id2}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert!(sc.service.vault().get(id2).is_none());
    let resp = fwd
        .post("http://plain.test/pay")
        .body(json!({"card": n2}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(
        code(&resp.json::<Value>().await.unwrap()),
        "intent_not_active"
    );

    clock.advance(3 * 3600);
    let (status, body) = s
        .explicit(
            Some(&key),
            "https://shop.test",
            &[],
            ("application/json", json_body.clone()),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "intent_not_active"), "{body}");

    // 5. Every refusal and forward is in the hash-chained audit log, which verifies.
    let audit = roony::audit::http::process_log().unwrap();
    audit.close().await.unwrap();
    let events = roony::audit::log::read_all(audit.path()).unwrap();
    let refused: Vec<&str> = events
        .iter()
        .filter(|e| e.action == "egress.refused")
        .filter_map(|e| e.details["code"].as_str())
        .collect();
    for code in [
        "proxy_authentication_required",
        "destination_not_allowed",
        "placeholder_not_yours",
        "intent_not_active",
        "raw_card_number_blocked",
    ] {
        assert!(
            refused.contains(&code),
            "no audit event for {code}: {refused:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "egress.forwarded" && e.target_id == "shop.test")
    );
    assert!(matches!(
        roony::audit::log::verify_file(audit.path()).unwrap(),
        Ok(report) if report.count == events.len() as u64
    ));

    // 6. The PAN never reached the data dir (database, logs, audit).
    drop(running);
    if std::env::var("DUMP_LOG").is_ok() {
        let l = std::fs::read_to_string(dir.path().join("trace.log")).unwrap();
        for line in l.lines().filter(|l| l.contains(pan.as_str())) {
            eprintln!("PANLINE {}", &line[..line.len().min(400)]);
        }
    }
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for p in [&pan, &pan2] {
            assert!(
                !bytes.windows(p.len()).any(|w| w == p.as_bytes()),
                "{} contains a card number",
                path.display()
            );
        }
    }
    let logged = std::fs::read_to_string(dir.path().join("trace.log")).unwrap();
    assert!(logged.contains("egress proxy refused a request"));
}
