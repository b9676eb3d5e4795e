//! `server`: load the configuration (defaults < server.toml < environment < flags), install logging
//! and the shutdown signal, run. See the library for the rest.

use std::process::ExitCode;

use server::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(config) = cli::load_or_exit::<Config>("server") else {
        return ExitCode::SUCCESS; // --print-config
    };
    // Logs go through a writer a closed stderr cannot break (see `cli::logging`).
    cli::logging::init("info");

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    match server::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
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
