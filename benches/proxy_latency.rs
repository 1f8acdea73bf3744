#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The vault proxy's added latency on loopback: the same small JSON POST sent directly to a
//! plain-HTTP "merchant" and through the proxy (forward-proxy form, one placeholder
//! substituted), sequentially over kept-alive connections; prints p50/p99 of both and the
//! difference. `cargo bench --bench proxy_latency` (ROONY_BENCH_N=requests, default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use roony::issuer::{Issuer, StripeConfig};
use roony::policy::Policy;
use roony::service::vault::{Field, VaultCard, placeholder};
use roony::service::{Service, ServiceConfig, SystemClock};
use roony::store::Store;

/// A keep-alive HTTP/1.1 server answering every request with a small JSON body.
async fn merchant() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            s.set_nodelay(true).ok();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        buf.drain(..end + 4 + len);
                        if s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn measure(client: &reqwest::Client, url: &str, body: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
        r.bytes().await.unwrap();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn main() {
    let n: usize = std::env::var("ROONY_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
        let issuer = Issuer::new(StripeConfig::new(
            "sk_test_bench",
            Some("http://127.0.0.1:9".into()),
        ))
        .unwrap();
        let service = Service::new(
            store,
            issuer,
            ServiceConfig::default(),
            Arc::new(SystemClock),
        );
        let key = service
            .create_agent(
                "agt_bench",
                "bench",
                Policy::new(roony::domain::money::Currency::USD),
                None,
            )
            .unwrap();
        // A vault card the agent may send to bench.test (no placeholder: the "open proxy"
        // check passes through the agent's vault cards; with one, the intent record would
        // be needed, so the body carries plain data and the path measured is auth, body
        // buffering, scanning (Luhn, placeholders) and forwarding).
        service.vault().insert(VaultCard {
            intent_id: "pur_bench".into(),
            agent_id: "agt_bench".into(),
            number: "4242424242424242".into(),
            cvc: "123".into(),
            exp_month: 12,
            exp_year: 2034,
            hosts: vec!["bench.test".into()],
            expires_at: None,
        });
        let _ = placeholder("pur_bench", Field::Number);
        let upstream = merchant().await;
        let mut config = roony::proxy::ProxyConfig::new("127.0.0.1:0".parse().unwrap());
        config.resolve.insert("bench.test".into(), upstream);
        let proxy = roony::proxy::start(service, config).await.unwrap();

        let body =
            r#"{"order":"A-1001","amount":1200,"currency":"usd","note":"benchmark checkout"}"#;
        let direct = reqwest::Client::builder().no_proxy().build().unwrap();
        let via = reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::http(format!("http://{}", proxy.addr))
                    .unwrap()
                    .custom_http_auth(format!("Bearer {key}").parse().unwrap()),
            )
            .build()
            .unwrap();
        let direct_url = format!("http://{upstream}/pay");
        let proxied_url = format!("http://bench.test:{}/pay", upstream.port());
        // Warm up both paths (connections, caches).
        measure(&direct, &direct_url, body, 200).await;
        measure(&via, &proxied_url, body, 200).await;
        let d = measure(&direct, &direct_url, body, n).await;
        let p = measure(&via, &proxied_url, body, n).await;
        let us = |x: Duration| x.as_secs_f64() * 1e6;
        println!("requests: {n} each, sequential, loopback");
        println!(
            "direct:  p50 {:>7.1} us  p99 {:>7.1} us",
            us(percentile(&d, 0.5)),
            us(percentile(&d, 0.99))
        );
        println!(
            "proxied: p50 {:>7.1} us  p99 {:>7.1} us",
            us(percentile(&p, 0.5)),
            us(percentile(&p, 0.99))
        );
        println!(
            "added:   p50 {:>7.1} us  p99 {:>7.1} us",
            us(percentile(&p, 0.5)) - us(percentile(&d, 0.5)),
            us(percentile(&p, 0.99)) - us(percentile(&d, 0.99))
        );
    });
}
