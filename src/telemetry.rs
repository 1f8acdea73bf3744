//! Logging through `tracing` to stderr. `RUST_LOG` filters (default `info`).
//! Nothing logs card numbers or CVCs: the types that hold them redact their `Debug`.

use tracing_subscriber::EnvFilter;

/// Targets whose verbose levels log whole protocol messages — which can hold a card number
/// in a tool result — are capped, whatever `RUST_LOG` asks for.
const CAPS: &[&str] = &["rmcp=info"];

pub fn init() {
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn,hyper=warn"));
    for cap in CAPS {
        if let Ok(directive) = cap.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
