//! The meshd daemon.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use meshd::{
    compile::compile,
    daemon::{self, Config, DnsConfig, UpstreamSource},
    datapath::ebpf,
    source::docker_api::{DockerApi, TlsFiles},
    source::{docker::DockerSource, managers::Managers},
};
use meshd_dns::upstream::MAX_UPSTREAMS;

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
    /// Read Docker once with these settings and say what meshd would program; touches no
    /// kernel state. Exits non-zero when Docker cannot be read (TLS, address, permissions).
    Check {
        #[command(flatten)]
        docker: DockerArgs,
    },
}

/// Where Docker state comes from.
#[derive(Args)]
struct DockerArgs {
    /// Docker Engine API of a swarm manager: unix:///path or tcp://host:port. Several,
    /// comma-separated, in order of preference: meshd moves on when one stops answering.
    #[arg(
        long,
        env = "MESHD_DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock",
        value_delimiter = ','
    )]
    docker_host: Vec<String>,
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
    /// Accept tcp:// without TLS. The Docker API is root on the manager: only for a private
    /// network namespace, never across machines.
    #[arg(long)]
    insecure_plain_tcp: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    docker: DockerArgs,
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
    #[command(flatten)]
    dns: DnsArgs,
}

/// The embedded DNS on 127.0.0.11.
#[derive(Args)]
struct DnsArgs {
    /// Leave DNS to dockerd's embedded resolver.
    #[arg(long)]
    no_dns: bool,
    /// Where the upstream resolvers for names that are not ours come from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Upstream resolvers (IP or IP:port, comma-separated, at most 3), instead of
    /// --resolv-conf.
    #[arg(long, value_delimiter = ',')]
    dns_upstream: Vec<String>,
    /// How long to wait for one upstream before trying the next (milliseconds).
    #[arg(long, default_value_t = 1500)]
    dns_upstream_timeout_ms: u64,
}

impl DnsArgs {
    fn config(&self) -> Result<Option<DnsConfig>> {
        if self.no_dns {
            return Ok(None);
        }
        let timeout = Duration::from_millis(self.dns_upstream_timeout_ms);
        if !self.dns_upstream.is_empty() {
            if self.dns_upstream.len() > MAX_UPSTREAMS {
                bail!("--dns-upstream: at most {MAX_UPSTREAMS} servers");
            }
            let upstreams = self
                .dns_upstream
                .iter()
                .map(|u| {
                    u.parse::<SocketAddr>()
                        .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .with_context(|| format!("--dns-upstream {u}: not IP or IP:port"))
                })
                .collect::<Result<_>>()?;
            return Ok(Some(DnsConfig {
                upstreams: UpstreamSource::Fixed(upstreams),
                timeout,
            }));
        }
        // Read by the daemon, and again whenever it changes. A host without resolv.conf
        // still serves swarm names; it only cannot forward.
        Ok(Some(DnsConfig {
            upstreams: UpstreamSource::ResolvConf(self.resolv_conf.clone()),
            timeout,
        }))
    }
}

impl DockerArgs {
    fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// The managers' and this node's Docker APIs, refusing an unauthenticated remote API.
fn apis(a: &DockerArgs) -> Result<(Managers, DockerApi)> {
    let tls = a.tls();
    let tls_given = tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
    let mut managers = Vec::new();
    for host in &a.docker_host {
        if host.starts_with("tcp://") && !tls_given && !a.insecure_plain_tcp {
            bail!(
                "--docker-host {host} is plain TCP: anyone on that network could drive the \
                 manager. Give --tls-ca, --tls-cert and --tls-key (dockerd --tlsverify), or \
                 --insecure-plain-tcp inside a private network namespace"
            );
        }
        managers.push(DockerApi::new(host, &tls).with_context(|| format!("--docker-host {host}"))?);
    }
    if managers.is_empty() {
        bail!("--docker-host: give at least one manager");
    }
    let local = match &a.local_docker_host {
        Some(h) => DockerApi::new(h, &TlsFiles::default()).context("--local-docker-host")?,
        None => managers[0].clone(),
    };
    Ok((Managers::new(managers), local))
}

fn check(a: DockerArgs) -> Result<()> {
    let (manager, local) = apis(&a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut source = DockerSource::new(manager.clone(), local.clone());
        let mut state = None;
        for _ in 0..manager.len() {
            let from = source.managers.pick().1.endpoint().to_string();
            match source.fetch().await {
                Ok(s) => {
                    state = Some((s, from));
                    break;
                }
                Err(e) => eprintln!("cannot read Docker state from {from}: {e}"),
            }
        }
        let (state, from) = state.context("no manager could be read")?;
        let node_id = source.node_id().await.unwrap_or_default();
        let desired = compile(&state);
        println!(
            "read {} services, {} tasks, {} networks, {} nodes from {}",
            state.services.len(),
            state.tasks.len(),
            state.networks.len(),
            state.nodes.len(),
            from
        );
        println!(
            "this node {}: {} local containers from {}",
            if node_id.is_empty() {
                "(not in a swarm)"
            } else {
                &node_id
            },
            state.sandboxes.len(),
            local.endpoint()
        );
        println!(
            "would program {} load balancers and {} VIP entries",
            desired.lbs.len(),
            desired.vips.len()
        );
        for r in &state.rejected {
            println!("rejected {} {}: {}", r.kind, r.id, r.reason);
        }
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; no backtrace for an operator's mistake.
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
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
    if let Some(Command::Check { docker }) = cli.command {
        return check(docker);
    }
    let a = cli.run;
    let (managers, local) = apis(&a.docker)?;
    let cfg = Config {
        managers,
        local,
        pin_dir: a.pin_dir,
        cgroup: a.cgroup,
        api_socket: a.api_socket,
        poll_interval: Duration::from_millis(a.poll_ms),
        fast_poll_interval: Duration::from_millis(a.fast_poll_ms),
        fast_window: Duration::from_millis(a.fast_window_ms),
        dns: a.dns.config()?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(cfg))
}
