//! `client`: load the configuration (defaults < client.toml < environment < flags), install logging
//! and Ctrl-C handling, run, print the table.

use std::process::ExitCode;

use client::{Config, out};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(config) = cli::load_or_exit::<Config>("client") else {
        return ExitCode::SUCCESS; // --print-config
    };
    // Logs go through a writer a closed stderr cannot break (see `cli::logging`).
    let _logs = cli::logging::init("warn");

    let shutdown = CancellationToken::new();
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    match client::run(config, shutdown).await {
        Ok(report) => {
            // With stdout closed (`client | head`) the table goes nowhere; that is no failure.
            out::line(&report.table());
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            cli::logging::eprint(&format!("error: {e:#}\n"));
            ExitCode::FAILURE
        }
    }
}
