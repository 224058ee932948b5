//! `mpreg server start` and `start-config`.

use std::io::Write;
use std::path::Path;

use mpreg_actors::supervisor::NodeExit;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use mpreg_actors::persistence::OpenFailure;

use super::{StartArgs, EXIT_DATA_CORRUPT, EXIT_DATA_IO, EXIT_DATA_LOCKED, EXIT_DATA_UNWRITABLE, EXIT_ESCALATED};
use crate::config::{LogFormat, Settings};
use crate::node::{Node, NodeBuilder, NodeError};

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), stderr, text or JSON.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub fn start(args: StartArgs) -> anyhow::Result<i32> {
    let StartArgs {
        config,
        host,
        port,
        name,
        cluster_id,
        resources,
        functions,
        monitoring_port,
        data_dir,
        log_format,
        request_timeout,
        fault_injection,
        peers,
        advertise_url,
        federation_peers,
        credentials,
        insecure,
    } = args;
    let mut settings = match &config {
        Some(file) => Settings::from_toml_file(file)?,
        None => Settings::default(),
    };
    settings.host = host.unwrap_or(settings.host);
    settings.port = port.unwrap_or(settings.port);
    settings.name = name.unwrap_or(settings.name);
    settings.cluster_id = cluster_id.unwrap_or(settings.cluster_id);
    settings.resources.extend(resources);
    settings.functions.extend(functions);
    settings.monitoring_port = monitoring_port.unwrap_or(settings.monitoring_port);
    settings.data_dir = data_dir.or(settings.data_dir);
    settings.log_format = log_format.unwrap_or(settings.log_format);
    settings.request_timeout_s = request_timeout.unwrap_or(settings.request_timeout_s);
    settings.fault_injection |= fault_injection;
    settings.peers.extend(peers);
    settings.federation.peers.extend(federation_peers);
    settings.advertise_url = advertise_url.or(settings.advertise_url);
    settings.credentials = credentials.or(settings.credentials);
    settings.insecure |= insecure;
    serve(settings, config.as_deref())
}

pub fn start_config(file: &Path, log_format: Option<LogFormat>) -> anyhow::Result<i32> {
    let mut settings = Settings::from_toml_file(file)?;
    settings.log_format = log_format.unwrap_or(settings.log_format);
    serve(settings, Some(file))
}

/// The exit code of a data dir that stopped the node at start (see `config/node.toml`).
fn data_dir_exit_code(e: &NodeError) -> Option<i32> {
    match e {
        NodeError::Storage(open) => Some(match open.failure {
            OpenFailure::Locked => EXIT_DATA_LOCKED,
            OpenFailure::Corrupt => EXIT_DATA_CORRUPT,
            OpenFailure::Unwritable => EXIT_DATA_UNWRITABLE,
            OpenFailure::Io => EXIT_DATA_IO,
        }),
        NodeError::DataDir { .. } => Some(EXIT_DATA_IO),
        _ => None,
    }
}

/// Re-reads `file` and applies its federation policies (SIGHUP); a file that no longer
/// parses changes nothing.
fn reload(node: &Node, file: Option<&Path>) {
    let Some(file) = file else { return warn!("SIGHUP: no settings file to reload") };
    match Settings::from_toml_file(file).map_err(|e| e.to_string()).and_then(|s| node.reload_federation_policies(&s)) {
        Ok(true) => info!(file = %file.display(), "SIGHUP: federation policies reloaded"),
        Ok(false) => warn!("SIGHUP: this node has no federation bridges; nothing to reload"),
        Err(e) => warn!(cause = %e, "SIGHUP: settings not reloaded"),
    }
}

fn serve(settings: Settings, file: Option<&Path>) -> anyhow::Result<i32> {
    init_logging(settings.log_format);
    actix_rt::System::new().block_on(async move {
        let node = match NodeBuilder::new(settings).start().await {
            Ok(node) => node,
            Err(e) => match data_dir_exit_code(&e) {
                Some(code) => {
                    error!(cause = %e, code, "node failed to start: data_dir unusable");
                    eprintln!("error: node failed to start: {e}");
                    return Ok(code);
                }
                None => return Err(anyhow::Error::new(e).context("node failed to start")),
            },
        };
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        {
            let mut out = std::io::stdout().lock();
            // The monitoring URL first: readers that stop at `MPREG_URL=` (the ready line)
            // have both.
            if let Some(monitoring) = node.monitoring_url() {
                writeln!(out, "MPREG_MONITORING_URL={monitoring}")?;
            }
            writeln!(out, "MPREG_URL={}", node.url())?;
            out.flush()?;
        }
        info!(node = node.name(), url = node.url(), "node ready");
        let code = loop {
            tokio::select! {
                _ = hangup.recv() => reload(&node, file),
                _ = interrupt.recv() => { info!("interrupt: shutting down"); node.shutdown().await; break 0 }
                _ = terminate.recv() => { info!("SIGTERM: shutting down"); node.shutdown().await; break 0 }
                exit = node.wait() => break match exit {
                    NodeExit::Escalated { actor } => {
                        error!(actor = %actor, "supervisor escalated: node stopping");
                        node.stop_listener().await;
                        EXIT_ESCALATED
                    }
                    _ => 0,
                }
            }
        };
        info!(node = node.name(), code, "node stopped");
        Ok(code)
    })
}
