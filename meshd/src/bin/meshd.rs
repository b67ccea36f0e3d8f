//! The meshd daemon.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// mimalloc rather than glibc's malloc: the L7 request path allocates per request, and
/// glibc's malloc and free took about 8% of its CPU (`cargo xtask bench l7`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults buy speed with memory, which a daemon on every node should not:
/// with them, a manager holding 10k services × 10 tasks sat at 169 MB RSS after its cold
/// read (`cargo xtask bench control`); glibc's malloc at 66 MB, but with a third more CPU
/// for the read. Built without transparent huge pages (`no_thp`: a 4 MiB segment otherwise
/// becomes resident whole) and returning freed pages at once (purge delay 0, rather than
/// 10 ms later, which let the cold read's garbage pile up): 77 MB, and the CPU stays
/// mimalloc's.
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys names only
    // some of the options).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
}

#[cfg(not(feature = "mimalloc"))]
fn tune_allocator() {}
use clap::{Args, Parser, Subcommand};
use meshd::datapath::ebpf::ingress::IngressSettings;
use meshd::{
    compile::compile,
    daemon::{self, Config, DnsConfig, UpstreamSource},
    datapath::ebpf,
    feed,
    model::{Change, ClusterState},
    source::{
        docker_api::{DockerApi, TlsFiles},
        managers::Managers,
        swarm::{read_once, SwarmConfig},
    },
};
use meshd_dns::upstream::MAX_UPSTREAMS;

#[derive(Parser)]
#[command(
    version = meshd::VERSION,
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
    /// Read the swarm once the way the daemon would (this node's engine, then the managers'
    /// meshd or --manager-api) and say what meshd would program; touches no kernel state.
    /// Exits non-zero when something cannot be read (address, TLS, certificates).
    Check {
        #[command(flatten)]
        docker: Box<DockerArgs>,
    },
    /// meshd's man page (roff, section 8), on stdout.
    Man,
    /// Internal: the L7 front end's socket helper (started by meshd itself).
    #[command(hide = true)]
    L7SocketMaker,
    /// Internal: gives containers back to dockerd's resolver if meshd dies (IPVS
    /// datapath; started by meshd itself).
    #[command(hide = true)]
    DnsHandBack {
        #[arg(long)]
        lock: PathBuf,
    },
}

/// Where Docker state comes from.
#[derive(Args)]
struct DockerArgs {
    /// This node's Docker Engine API: unix:///path (or tcp://host:port with TLS).
    #[arg(
        long,
        env = "MESHD_DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
    /// Where this node's dockerd makes container network namespaces (`<exec-root>/netns`);
    /// learned from its containers when not given, else /var/run/docker/netns.
    #[arg(long)]
    docker_netns_dir: Option<PathBuf>,
    /// Read the swarm from these managers' Docker APIs (tcp://host:port, comma-separated,
    /// in order of preference) instead of from the managers' meshd. For nodes whose
    /// managers do not run meshd; it needs a client certificate that is root on them.
    #[arg(long, value_delimiter = ',')]
    manager_api: Vec<String>,
    /// CA certificate that signed the managers' API certificate (--manager-api).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate for the managers' API (--manager-api).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Client key for the managers' API (--manager-api).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Accept tcp:// without TLS. The Docker API is root on the manager: only for a private
    /// network namespace, never across machines.
    #[arg(long)]
    insecure_plain_tcp: bool,
    /// The swarm's node certificates: the feed between meshd's is mutual TLS with them.
    #[arg(long, default_value = "/var/lib/docker/swarm/certificates")]
    swarm_certs: PathBuf,
    /// Where a manager's meshd serves the feed (its port is where the others look).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], feed::DEFAULT_PORT)))]
    feed_listen: SocketAddr,
    /// The managers' feed addresses (IP:PORT, comma-separated), instead of the managers
    /// this node's engine names.
    #[arg(long, value_delimiter = ',')]
    feed_hub: Vec<SocketAddr>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    docker: DockerArgs,
    /// The VIP datapath: eBPF socket load balancing, IPVS (kernels without the cgroup
    /// socket hooks), or `auto`: eBPF where it can run, else IPVS (the reason is logged and
    /// shown by `meshctl status`).
    #[arg(long, value_enum, default_value_t = meshd::datapath::choice::Asked::Auto)]
    datapath: meshd::datapath::choice::Asked,
    /// cgroup2 directory holding the containers; the programs are attached here.
    #[arg(long, default_value = "/sys/fs/cgroup/unified/docker")]
    cgroup: PathBuf,
    /// Where programs' links and maps are pinned (on bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/meshd")]
    pin_dir: PathBuf,
    /// meshctl's socket.
    #[arg(long, default_value = meshd::api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// How long one pass of the safety-net re-read of every service's tasks takes, on
    /// managers (seconds). Events and hints do the real work; this catches what they miss.
    #[arg(long, default_value_t = 600)]
    resync_s: u64,
    /// How often every applier re-checks everything it owns (seconds).
    #[arg(long, default_value_t = 600)]
    sweep_s: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (loopback only, e.g.
    /// 127.0.0.1:9478). Off by default.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    dns: DnsArgs,
    #[command(flatten)]
    ingress: IngressArgs,
    #[command(flatten)]
    l7: L7Args,
}

/// The L7 front end: HTTP routed by host name from `com.docker.lb.*` service labels.
#[derive(Args)]
struct L7Args {
    /// Serve L7 routes on this node (off by default).
    #[arg(long)]
    l7: bool,
    /// Where plain HTTP is served (with --l7).
    #[arg(long, default_value = "0.0.0.0:80")]
    l7_http: SocketAddr,
    /// Where HTTPS is served (with --l7; Interlock's default port).
    #[arg(long, default_value = "0.0.0.0:8443")]
    l7_https: SocketAddr,
    /// Serve no HTTPS.
    #[arg(long)]
    l7_no_https: bool,
    /// The directory of PEM files that com.docker.lb.ssl_cert and ssl_key name.
    #[arg(long, default_value = "/etc/meshd/certs")]
    l7_certs: PathBuf,
    /// Serve only services labelled com.docker.lb.service_cluster=NAME (Interlock's service
    /// clusters); without it, only services with no service cluster.
    #[arg(long)]
    service_cluster: Option<String>,
    /// Leave out the x-proxy-id and x-server-info response headers.
    #[arg(long)]
    l7_hide_info: bool,
    /// Upstream connect timeout (seconds).
    #[arg(long, default_value_t = 5)]
    l7_connect_timeout_s: u64,
    /// How long an idle upstream connection is kept for reuse (seconds).
    #[arg(long, default_value_t = 75)]
    l7_keepalive_s: u64,
    /// How long to wait for an upstream's response head (seconds).
    #[arg(long, default_value_t = 600)]
    l7_read_timeout_s: u64,
    /// Largest request body (bytes; Interlock's 32 MiB).
    #[arg(long, default_value_t = 32 << 20)]
    l7_max_body: u64,
    /// Largest request head (bytes).
    #[arg(long, default_value_t = 32 << 10)]
    l7_max_header_bytes: usize,
    /// Log one line per request (target meshd::l7::access).
    #[arg(long)]
    l7_access_log: bool,
    /// How long a stopping meshd lets requests in flight finish (seconds).
    #[arg(long, default_value_t = 10)]
    l7_grace_s: u64,
    /// The CA bundle (PEM) that com.docker.lb.ssl_backend_tls_verify=required checks
    /// upstream certificates against; read again when it changes.
    #[arg(long, default_value = meshd::l7::proxy::DEFAULT_BACKEND_CA)]
    l7_backend_ca: PathBuf,
}

impl L7Args {
    fn config(&self) -> Option<daemon::L7Config> {
        self.l7.then(|| daemon::L7Config {
            http: self.l7_http,
            https: (!self.l7_no_https).then_some(self.l7_https),
            certs: self.l7_certs.clone(),
            cluster: self.service_cluster.clone(),
            grace: Duration::from_secs(self.l7_grace_s),
            proxy: meshd::l7::proxy::ProxySettings {
                proxy_id: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                hide_info: self.l7_hide_info,
                connect_timeout: Duration::from_secs(self.l7_connect_timeout_s.max(1)),
                keepalive: Duration::from_secs(self.l7_keepalive_s),
                https_port: None,
                http_port: self.l7_http.port(),
                max_body: self.l7_max_body,
                read_timeout: Duration::from_secs(self.l7_read_timeout_s.max(1)),
                max_header_bytes: self.l7_max_header_bytes,
                access_log: self.l7_access_log,
                backend_ca: self.l7_backend_ca.clone(),
            },
        })
    }
}

/// The ingress routing mesh: ports published in ingress mode answer on every node.
#[derive(Args)]
struct IngressArgs {
    /// Leave published ports to Docker (its own ingress, where the kernel has IPVS).
    #[arg(long)]
    no_ingress: bool,
    /// Interfaces published ports answer on (comma-separated); default: every interface
    /// with an IPv4 address but loopback and Docker's bridges.
    #[arg(long, value_delimiter = ',')]
    ingress_interfaces: Vec<String>,
    /// UDP port of meshd's node-to-node tunnel (allow it between nodes, as 4789 for
    /// overlays).
    #[arg(long, default_value_t = meshd_common::INGRESS_TUNNEL_PORT)]
    ingress_tunnel_port: u16,
}

impl IngressArgs {
    fn settings(&self) -> Option<IngressSettings> {
        (!self.no_ingress).then(|| IngressSettings {
            interfaces: self.ingress_interfaces.clone(),
            tunnel_port: self.ingress_tunnel_port,
        })
    }
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

    /// This node's engine, and the managers' APIs when --manager-api is given (refusing an
    /// unauthenticated remote API).
    fn apis(&self) -> Result<(DockerApi, Option<Managers>)> {
        let local =
            DockerApi::new(&self.docker_host, &TlsFiles::default()).context("--docker-host")?;
        if self.manager_api.is_empty() {
            return Ok((local, None));
        }
        let tls = self.tls();
        let tls_given = tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
        let mut managers = Vec::new();
        for host in &self.manager_api {
            if host.starts_with("tcp://") && !tls_given && !self.insecure_plain_tcp {
                bail!(
                    "--manager-api {host} is plain TCP: anyone on that network could drive the \
                     manager. Give --tls-ca, --tls-cert and --tls-key (dockerd --tlsverify), or \
                     --insecure-plain-tcp inside a private network namespace"
                );
            }
            managers
                .push(DockerApi::new(host, &tls).with_context(|| format!("--manager-api {host}"))?);
        }
        Ok((local, Some(Managers::new(managers))))
    }
}

/// `meshd check`: one read, by the same path the daemon would take.
fn check(a: DockerArgs) -> Result<()> {
    let (local, managers) = a.apis()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let info = local
            .get_json("/info")
            .await
            .with_context(|| format!("cannot read this node's engine at {}", local.endpoint()))?;
        let s = |p: &str| {
            info.pointer(p)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let node_id = s("/Swarm/NodeID");
        let manager = info
            .pointer("/Swarm/ControlAvailable")
            .and_then(|v| v.as_bool())
            == Some(true);
        println!(
            "this node: {} ({}), engine {}",
            if node_id.is_empty() {
                "not in a swarm"
            } else {
                &node_id
            },
            if manager { "manager" } else { "worker" },
            local.endpoint()
        );
        let (changes, from): (Vec<Change>, String) = if let Some(m) = &managers {
            let mut last = None;
            let mut got = None;
            for _ in 0..m.len() {
                let (i, api) = m.pick();
                match read_once(api).await {
                    Ok(c) => {
                        got = Some((c, api.endpoint().to_string()));
                        break;
                    }
                    Err(e) => {
                        eprintln!("cannot read the swarm from {}: {e}", api.endpoint());
                        m.failed(i);
                        last = Some(e);
                    }
                }
            }
            match got {
                Some(g) => g,
                None => bail!(
                    "no manager could be read ({})",
                    last.map(|e| e.to_string()).unwrap_or_default()
                ),
            }
        } else if node_id.is_empty() {
            (Vec::new(), "nowhere (not in a swarm)".into())
        } else if manager {
            (
                read_once(&local)
                    .await
                    .context("read the swarm from this manager's engine")?,
                local.endpoint().to_string(),
            )
        } else {
            let certs = feed::certs::SwarmCerts::load(&a.swarm_certs)?;
            let hubs: Vec<SocketAddr> = if a.feed_hub.is_empty() {
                info.pointer("/Swarm/RemoteManagers")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.get("Addr")?.as_str()?.rsplit_once(':')?.0.parse().ok())
                    .map(|ip: std::net::IpAddr| SocketAddr::new(ip, a.feed_listen.port()))
                    .collect()
            } else {
                a.feed_hub.clone()
            };
            let mut got = None;
            for h in &hubs {
                match feed::client::snapshot_once(&certs, *h).await {
                    Ok(c) => {
                        got = Some((
                            c,
                            format!("the feed of {h} (mutual TLS, {})", certs.current().me),
                        ));
                        break;
                    }
                    Err(e) => eprintln!("cannot read the feed of {h}: {e}"),
                }
            }
            got.with_context(|| format!("no manager's meshd answered (tried {hubs:?})"))?
        };
        let state = ClusterState::from_changes(changes);
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
            "would program {} load balancers with {} backends",
            desired.lbs.len(),
            desired
                .lbs
                .values()
                .map(|l| l.backends.len())
                .sum::<usize>()
        );
        for r in &desired.rejected {
            println!("rejected {} {}: {}", r.kind, r.id, r.reason);
        }
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; no backtrace for an operator's mistake.
            let prio = if meshd::journal::under_journald() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{prio}meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates an arena of its own, and memory freed in one is
/// not reused by another: a handful of arenas keep the daemon's memory close to what it uses.
fn limit_malloc_arenas() {
    const M_ARENA_MAX: libc::c_int = -8;
    // SAFETY: mallopt only tunes the allocator; called before any thread is started.
    unsafe { libc::mallopt(M_ARENA_MAX, 2) };
}

fn real_main() -> Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    if let Some(Command::Man) = cli.command {
        let cmd = <Cli as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).section("8").render(&mut out)?;
        return std::io::Write::write_all(&mut std::io::stdout(), &out)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(e),
            })
            .context("write the man page");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.run.log_json {
        fmt.json().init();
    } else if meshd::journal::under_journald() {
        // The journal stamps and colours lines itself; it takes the priority from a prefix.
        fmt.with_ansi(false)
            .event_format(meshd::journal::SyslogPrefix(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .init();
    } else {
        // Colours only for a person at a terminal, not in a log file or a pipe.
        use std::io::IsTerminal;
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
    }
    if let Some(Command::L7SocketMaker) = cli.command {
        return meshd::l7::connector::helper_main();
    }
    if let Some(Command::DnsHandBack { lock }) = cli.command {
        return meshd::datapath::ipvs::dns_handback::helper_main(lock);
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
        return check(*docker);
    }
    let a = cli.run;
    let (docker, manager_api) = a.docker.apis()?;
    let cfg = Config {
        docker,
        docker_netns_dir: a.docker.docker_netns_dir.clone(),
        manager_api,
        swarm_certs: a.docker.swarm_certs.clone(),
        feed_listen: a.docker.feed_listen,
        feed_hubs: a.docker.feed_hub.clone(),
        datapath: a.datapath,
        pin_dir: a.pin_dir,
        cgroup: a.cgroup,
        api_socket: a.api_socket,
        swarm: SwarmConfig {
            resync: Duration::from_secs(a.resync_s.max(1)),
            ..SwarmConfig::default()
        },
        sweep_every: Duration::from_secs(a.sweep_s.max(1)),
        dns: a.dns.config()?,
        ingress: a.ingress.settings(),
        l7: a.l7.config(),
        metrics: a.metrics,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(cfg))
}
