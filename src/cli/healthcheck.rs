//! `idsync healthcheck`: asks the admin port for readiness (or liveness), for exec probes in images
//! without a shell or curl. Exit 0 when healthy.

use clap::Args;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The admin address idsync listens on (0.0.0.0 and [::] are asked on loopback).
    #[arg(long, env = "IDSYNC_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Check liveness (/livez) instead of readiness (/readyz).
    #[arg(long)]
    pub live: bool,
}

pub async fn run(args: HealthcheckArgs) -> ExitCode {
    let mut addr: std::net::SocketAddr = match args.admin_listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!(
                "idsync healthcheck: `{}` is not HOST:PORT",
                args.admin_listen
            );
            return ExitCode::from(2);
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let path = if args.live { "livez" } else { "readyz" };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build();
    let result = match client {
        Ok(c) => c.get(format!("http://{addr}/{path}")).send().await,
        Err(e) => {
            eprintln!("idsync healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            let status = r.status();
            eprintln!(
                "idsync healthcheck: /{path} answered {status}: {}",
                r.text().await.unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("idsync healthcheck: cannot reach http://{addr}/{path}: {e}");
            ExitCode::FAILURE
        }
    }
}
