//! `server`: load the configuration (defaults < server.toml < environment < flags), install logging
//! and the shutdown signal, run. See the library for the rest.

use std::{
    process::ExitCode,
    sync::{Arc, OnceLock},
};

use server::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(config) = cli::load_or_exit::<Config>("server") else {
        return ExitCode::SUCCESS; // --print-config
    };
    // Logs go through a writer a closed stderr cannot break (see `cli::logging`).
    let _logs = cli::logging::init("info");

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    // Alongside the start, not before it: a cluster that is merely down is waited for once, by
    // `run`; only what waiting cannot fix stops the server early.
    let unusable = Arc::new(OnceLock::new());
    let preflight = tokio::spawn(preflight(
        config.clone(),
        shutdown.clone(),
        unusable.clone(),
    ));
    let ran = server::run(config, shutdown).await;
    preflight.abort();
    match (ran, unusable.get()) {
        (_, Some(e)) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        (Ok(()), None) => ExitCode::SUCCESS,
        (Err(e), None) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Asks etcd once for the service's prefix (see `cli::preflight`); on an answer that waiting
/// cannot change, records it in `unusable` and shuts the server down.
async fn preflight(
    config: Config,
    shutdown: CancellationToken,
    unusable: Arc<OnceLock<anyhow::Error>>,
) {
    let checked = async {
        let registry = config.etcd.registry_config(config.ttl)?;
        let etcd = registry
            .connect()
            .await
            .map_err(|e| match cli::settings_to_check(&e) {
                Some(settings) => anyhow::Error::from(e).context(settings),
                None => e.into(),
            })?;
        let prefix = registry::key::service_prefix(&config.etcd.namespace, &config.etcd.service)?;
        cli::preflight::check(&etcd, &prefix, config.etcd.etcd_timeout).await?;
        anyhow::Ok(())
    };
    if let Err(e) = checked.await {
        // Recorded before the cancellation, so `main` finds it once `run` returns.
        let _ = unusable.set(e);
        shutdown.cancel();
    }
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the server");
                std::future::pending::<()>().await;
            }
        }
    };
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate => "SIGTERM",
    };
    // Act first, then say so: nothing that can go wrong while logging may stand between the
    // signal and the deregistration.
    shutdown.cancel();
    tracing::info!("{signal} received");
}
