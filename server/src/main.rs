//! `server`: load the configuration (defaults < server.toml < environment < flags), install logging
//! and the shutdown signal, run. See the library for the rest.

use std::{io::IsTerminal, process::ExitCode};

use clap::{CommandFactory, error::ErrorKind};
use server::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(config) = cli::load_or_exit::<Config>("server") else {
        return ExitCode::SUCCESS; // --print-config
    };
    if let Err(e) = config.validate() {
        // Exit code 2 and clap's formatting, like any other bad flag.
        Config::command()
            .error(ErrorKind::ValueValidation, format!("{e:#}"))
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

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
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}
