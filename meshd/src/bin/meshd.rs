//! The meshd daemon.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use meshd::{
    daemon::{self, Config},
    datapath::ebpf,
    source::docker_api::{DockerApi, TlsFiles},
};

#[derive(Parser)]
#[command(
    version,
    about = "Service networking for Docker Swarm on a kernel datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Detach meshd's programs and delete its pinned maps (uninstall, or start afresh).
    Reset {
        #[arg(long, default_value = "/sys/fs/bpf/meshd")]
        pin_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Docker Engine API of a swarm manager: unix:///path or tcp://host:port.
    #[arg(
        long,
        env = "MESHD_DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
    /// This node's engine, for its containers; defaults to --docker-host.
    #[arg(long, env = "MESHD_LOCAL_DOCKER_HOST")]
    local_docker_host: Option<String>,
    /// CA certificate that signed the manager's TLS certificate (tcp:// only).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate for the manager (tcp:// only).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Client key for the manager (tcp:// only).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// cgroup2 directory holding the containers; the programs are attached here.
    #[arg(long, default_value = "/sys/fs/cgroup/unified/docker")]
    cgroup: PathBuf,
    /// Where programs' links and maps are pinned (on bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/meshd")]
    pin_dir: PathBuf,
    /// meshctl's socket.
    #[arg(long, default_value = meshd::api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Full re-read of Docker state, for what no event announces (milliseconds).
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Re-read interval right after an event (milliseconds).
    #[arg(long, default_value_t = 25)]
    fast_poll_ms: u64,
    /// How long fast re-reads go on after an event (milliseconds).
    #[arg(long, default_value_t = 3000)]
    fast_window_ms: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.run.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    if let Some(Command::Reset { pin_dir }) = cli.command {
        ebpf::reset(&pin_dir)?;
        println!(
            "removed meshd's pinned programs and maps from {}",
            pin_dir.display()
        );
        return Ok(());
    }
    let a = cli.run;
    let tls = TlsFiles {
        ca: a.tls_ca,
        cert: a.tls_cert,
        key: a.tls_key,
    };
    let manager = DockerApi::new(&a.docker_host, &tls).context("--docker-host")?;
    let local = match &a.local_docker_host {
        Some(h) => DockerApi::new(h, &TlsFiles::default()).context("--local-docker-host")?,
        None => manager.clone(),
    };
    let cfg = Config {
        manager,
        local,
        pin_dir: a.pin_dir,
        cgroup: a.cgroup,
        api_socket: a.api_socket,
        poll_interval: Duration::from_millis(a.poll_ms),
        fast_poll_interval: Duration::from_millis(a.fast_poll_ms),
        fast_window: Duration::from_millis(a.fast_window_ms),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(cfg))
}
