//! meshctl: what meshd sees and what it programmed.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use meshd::{
    api::{call, Request, ServiceSummary, ServiceView},
    datapath::ebpf::ingress::IngressView,
};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "meshctl",
    version = meshd::VERSION,
    about = "Inspect meshd: services, VIPs, backends, counters"
)]
struct Cli {
    /// meshd's API socket.
    #[arg(long, global = true, env = "MESHCTL_SOCKET", default_value = meshd::api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Docker connection, datapath, counts, rejected objects, event-to-map latency.
    Status,
    /// Every service with its VIPs, live backends and connection count.
    Services,
    /// One service: VIP per network, backends with task, node, state, counters.
    Service { name: String },
    /// The kernel maps as read back from the kernel.
    Maps,
    /// The ingress mesh: each published port, its tasks and how this node reaches them,
    /// new flows per port, the flow tables' fill and the drop counters.
    Ingress,
    /// The L7 front end: each host and path, its service, how it is reached, its backends,
    /// TLS, service cluster and counters; and every service whose labels were rejected.
    Routes,
    /// What a local container gets when it resolves NAME through 127.0.0.11, and why:
    /// the network that answered, the kind of name, the TTL, or the upstream it went to.
    Dns {
        /// A name, or an IPv4 address for its PTR.
        name: String,
        /// The asking container: name or id prefix.
        #[arg(long)]
        from: String,
        /// Record type.
        #[arg(long = "type", default_value = "A")]
        qtype: String,
    },
    /// meshctl's version and git revision, and the running meshd's.
    Version,
    /// Shell completions for meshctl, on stdout (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// meshctl's man page (roff), on stdout.
    Man,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn write_out(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn run(cli: &Cli) -> Result<()> {
    let req = match &cli.command {
        Command::Version => {
            println!("meshctl {}", meshd::VERSION);
            match call(&cli.socket, &Request::Status) {
                Ok(st) => println!(
                    "meshd   {}",
                    st["version"]
                        .as_str()
                        .unwrap_or("(older than 0.1: no version)")
                ),
                Err(e) => println!("meshd   not reachable: {e:#}"),
            }
            return Ok(());
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: clap_complete panics on a closed stdout (`| head`).
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "meshctl", &mut out);
            return write_out(&out);
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            return write_out(&out);
        }
        Command::Status => Request::Status,
        Command::Services => Request::Services,
        Command::Service { name } => Request::Service { name: name.clone() },
        Command::Maps => Request::Maps,
        Command::Ingress => Request::Ingress,
        Command::Routes => Request::Routes,
        Command::Dns { name, from, qtype } => Request::Dns {
            name: name.clone(),
            from: from.clone(),
            qtype: qtype.clone(),
        },
    };
    let data = call(&cli.socket, &req)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    match cli.command {
        Command::Status => print_status(&data),
        Command::Services => {
            let list: Vec<ServiceSummary> = serde_json::from_value(data)?;
            println!(
                "{:<24} {:<6} {:>8} {:>12}  VIPS",
                "NAME", "MODE", "BACKENDS", "CONNECTIONS"
            );
            for s in list {
                let vips: Vec<String> = s.vips.iter().map(|(n, ip)| format!("{n}={ip}")).collect();
                println!(
                    "{:<24} {:<6} {:>8} {:>12}  {}",
                    s.name,
                    format!("{:?}", s.mode).to_lowercase(),
                    s.backends,
                    s.connections,
                    vips.join(" ")
                );
            }
        }
        Command::Service { .. } => {
            let s: ServiceView = serde_json::from_value(data)?;
            println!("service {} ({}) mode {:?}", s.name, s.id, s.mode);
            for v in &s.vips {
                println!(
                    "  network {} VIP {}  backends {}  connections {}  {}",
                    v.network,
                    v.vip,
                    v.backends.len(),
                    v.connections,
                    if v.programmed {
                        format!("seen by {} local container(s)", v.sandboxes.len())
                    } else {
                        "not programmed here: no local container on that network".to_string()
                    }
                );
                println!(
                    "    {:<16} {:<26} {:<12} {:>5} {:<8} {:>12}",
                    "BACKEND", "TASK", "NODE", "SLOT", "STATE", "CONNECTIONS"
                );
                for b in &v.backends {
                    println!(
                        "    {:<16} {:<26} {:<12} {:>5} {:<8} {:>12}",
                        b.ip,
                        b.task_id,
                        b.node,
                        b.slot.map(|s| s.to_string()).unwrap_or_default(),
                        b.state,
                        b.connections
                    );
                }
                for x in &v.ipvs {
                    print_ipvs(x);
                }
            }
            for t in &s.not_serving {
                println!(
                    "  not serving: task {} on {}: {}",
                    t["task_id"].as_str().unwrap_or(""),
                    t["node"].as_str().unwrap_or(""),
                    t["why"].as_str().unwrap_or("")
                );
            }
        }
        Command::Maps => print_maps(&data),
        Command::Ingress => print_ingress(serde_json::from_value(data)?),
        Command::Routes => print_routes(serde_json::from_value(data)?),
        Command::Dns { .. } => print_dns(&data),
        Command::Version | Command::Completions { .. } | Command::Man => {
            unreachable!("answered without meshd")
        }
    }
    Ok(())
}

/// Docker's short form of an id.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// What the kernel maps hold, as tables: load balancers, VIP entries, sandboxes.
fn print_maps(d: &Value) {
    let list = |k: &str| d[k].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let (lbs, vips, sandboxes) = (list("lbs"), list("vips"), list("sandboxes"));
    println!(
        "{} load balancers, {} VIP entries, {} sandboxes, {} networks; {} backend slots, {} reverse-NAT entries",
        lbs.len(),
        vips.len(),
        sandboxes.len(),
        list("networks").len(),
        d["backend_slots"],
        d["revnat_entries"]
    );
    println!(
        "\n{:>5}  {:<15} {:<12} {:<12}  BACKENDS",
        "LB", "VIP", "NETWORK", "SERVICE"
    );
    for lb in &lbs {
        let backends: Vec<String> = lb["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        println!(
            "{:>5}  {:<15} {:<12} {:<12}  {}",
            lb["lb_id"].to_string(),
            text(&lb["vip"]),
            short(&text(&lb["network_id"])),
            short(&text(&lb["service_id"])),
            if backends.is_empty() {
                "(none)".to_string()
            } else {
                backends.join(" ")
            }
        );
    }
    println!("\n{:<12} {:<15} {:>5}", "NETWORK", "VIP", "LB");
    for v in &vips {
        println!(
            "{:<12} {:<15} {:>5}",
            short(&text(&v["network_id"])),
            text(&v["vip"]),
            v["lb_id"].to_string()
        );
    }
    println!("\n{:<20}  NETWORKS (lookup order)", "NETNS COOKIE");
    for sb in &sandboxes {
        let nets: Vec<String> = sb["networks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| short(&text(n)).to_string())
            .collect();
        println!("{:<20}  {}", sb["netns_cookie"].to_string(), nets.join(" "));
    }
}

fn print_ingress(v: IngressView) {
    let st = &v.status;
    println!(
        "ingress on {} (tunnel udp/{} from {}); flows {} of {}, replies {} of {}",
        st.interfaces.join(", "),
        st.tunnel_port,
        st.node_addr.map_or("?".into(), |a| a.to_string()),
        v.flows,
        v.flow_capacity,
        v.replies,
        v.flow_capacity
    );
    if let Some(e) = &st.last_error {
        println!("FAILING: {e}");
    }
    println!(
        "{:<10} {:<20} {:>6} {:<9} {:>5} {:>6} {:>10}",
        "PORT", "SERVICE", "TARGET", "CLIENT", "TASKS", "SLOTS", "NEW FLOWS"
    );
    for p in &v.ports {
        println!(
            "{:<10} {:<20} {:>6} {:<9} {:>5} {:>6} {:>10}{}",
            format!("{}/{}", p.port, p.protocol),
            p.service,
            p.target,
            format!("{:?}", p.client_address).to_lowercase(),
            p.tasks,
            p.slots,
            p.new_flows,
            if p.programmed {
                ""
            } else {
                "  (not programmed)"
            }
        );
        for b in &p.backends {
            println!("    {:<16} {:>5} slots  {}", b.addr, b.slots, b.via);
        }
    }
    let k = &st.counters;
    let c = |n: &str| k.get(n).copied().unwrap_or(0);
    println!(
        "dropped: {} no task, {} fragments, {} no SNAT port, {} too big for the tunnel; \
         {} passed to the stack (no route); {} ICMP errors passed on",
        c("dropped_no_task"),
        c("dropped_fragments"),
        c("dropped_no_snat_port"),
        c("dropped_too_big"),
        c("passed_no_route"),
        c("icmp_errors")
    );
}

fn print_routes(v: meshd::l7::RoutesView) {
    match (&v.http, v.enabled) {
        (Some(http), true) => println!(
            "L7 front end on http://{http}{}{}",
            v.https
                .as_ref()
                .map_or(String::new(), |a| format!(" and https://{a}")),
            v.cluster
                .as_ref()
                .map_or(String::new(), |c| format!(", service cluster {c}"))
        ),
        _ => println!(
            "this node serves no L7 routes (start meshd with --l7); the routes it would serve:"
        ),
    }
    println!(
        "{:<28} {:<12} {:<16} {:<5} {:<12} {:<8} {:>8} {:>7} {:>8}  BACKENDS",
        "HOST", "PATH", "SERVICE", "MODE", "NETWORK", "TLS", "REQUESTS", "ERRORS", "MEAN MS"
    );
    for r in &v.routes {
        let host = if r.host.is_empty() {
            "(default backend)"
        } else {
            &r.host
        };
        let mut backends = if r.backends.is_empty() {
            "none serving".to_string()
        } else {
            r.backends.join(" ")
        };
        if !r.served_here {
            backends.push_str(&format!(
                "  (service cluster {}: not served here)",
                r.cluster.as_deref().unwrap_or("none")
            ));
        }
        println!(
            "{:<28} {:<12} {:<16} {:<5} {:<12} {:<8} {:>8} {:>7} {:>8.2}  {backends}",
            host,
            r.path,
            r.service,
            r.mode,
            r.network.as_deref().unwrap_or("-"),
            r.tls.split(' ').next().unwrap_or("none"),
            r.requests,
            r.errors,
            r.mean_ms,
        );
    }
    for r in v.routes.iter().filter(|r| r.tls.contains(':')) {
        println!("TLS of {}{}: {}", r.host, r.path, r.tls);
    }
    if !v.rejected.is_empty() {
        println!("rejected ({}):", v.rejected.len());
        for r in &v.rejected {
            println!("  {}", r.reason);
        }
    }
}

fn print_dns(d: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let nets: Vec<String> = d["networks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    println!(
        "from      {} ({}), on {}",
        s(&d["container"]),
        &s(&d["container_id"]).chars().take(12).collect::<String>(),
        nets.join(", ")
    );
    println!("query     {} {}", s(&d["query"]), s(&d["type"]));
    let why = &d["why"];
    println!("outcome   {}", s(&why["outcome"]));
    if let Some(n) = why["network"].as_str() {
        println!("network   {n}");
    }
    if let Some(a) = why["about"].as_str() {
        println!("name of   {a}");
    }
    if let Some(t) = why["ttl"].as_u64() {
        println!("ttl       {t} s");
    }
    if let Some(u) = d["upstream"].as_str() {
        println!("upstream  {u}");
    }
    if let Some(e) = d["upstream_error"].as_str() {
        println!("upstream  FAILED: {e}");
    }
    println!("rcode     {}", s(&d["rcode"]));
    for a in d["answers"].as_array().into_iter().flatten() {
        println!("  {}", s(a));
    }
}

fn print_status(d: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!(
        "node            {} ({}){}",
        d["node_id"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or("not in a swarm"),
        s(&d["mode"]).replace('_', " "),
        if d["ready"] == true {
            ""
        } else {
            ", NOT READY: still reading"
        }
    );
    let src = |name: &str, v: &Value| {
        if v.is_null() {
            return;
        }
        println!(
            "{name:<16}{} ({}), {} events, {} reads, {} full reads",
            s(&v["endpoint"]),
            if v["connected"] == true {
                "following"
            } else {
                "NOT connected"
            },
            v["events"],
            v["reads"],
            v["resyncs"]
        );
        if let Some(e) = v["last_error"].as_str() {
            println!("  last error    {e}");
        }
        if let Some(since) = v["down_since_unix_ms"].as_u64() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            println!(
                "  failing for   {} s, {} failures; the datapath keeps what it has",
                now.saturating_sub(since) / 1000,
                v["outage_failures"]
            );
        }
    };
    src("local engine", &d["local"]);
    if let Some(n) = d["local"]["overlays_followed"].as_u64().filter(|n| *n > 0) {
        // Remote tasks get connections here once this node's overlay can reach them.
        println!("  overlay peers followed on {n} network(s)");
    }
    src("swarm from", &d["swarm"]);
    let feed = &d["feed"];
    if let Some(c) = feed.get("client") {
        println!(
            "feed            {} ({}), seq {}, {} snapshots, {} batches, {} failovers",
            c["hub"].as_str().unwrap_or("no manager"),
            if c["connected"] == true {
                "subscribed"
            } else {
                "NOT subscribed"
            },
            c["seq"],
            c["snapshots"],
            c["batches"],
            c["failovers"]
        );
        if let Some(e) = c["last_error"].as_str() {
            println!("  last error    {e}");
        }
    }
    if let Some(h) = feed.get("hub") {
        let peers = h["peers"].as_object().map_or(0, |p| p.len());
        println!(
            "feed served     on {}, {} nodes connected, seq {}, {} refused",
            s(&h["listen"]),
            peers,
            h["seq"],
            h["refused"]
        );
        if let Some(e) = h["last_refusal"].as_str() {
            println!("  last refusal  {e}");
        }
    }
    for (hub, u) in feed
        .get("client")
        .unwrap_or(feed)
        .get("uploads")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        println!(
            "  reports to    {hub} ({}), {} reports, {} hints",
            if u["connected"] == true { "up" } else { "DOWN" },
            u["reports"],
            u["hints"]
        );
    }
    let dp = &d["datapath"];
    if dp["kind"] == "ipvs" {
        let i = &dp["ipvs"];
        println!(
            "datapath        ipvs: {} services, {} real servers in {} sandboxes; TCP idle timeout {} s",
            i["services"], i["real_servers"], i["sandboxes"], i["tcp_idle_timeout_s"]
        );
    } else {
        println!(
            "datapath        ebpf, cgroup {}, pins {}, {} map entries",
            s(&dp["cgroup"]),
            s(&dp["pin_dir"]),
            dp["map_entries"]
        );
    }
    println!("  chosen        {}", s(&dp["reason"]));
    let a = &dp["adopted_at_start"];
    if !a.is_null() {
        println!(
            "adopted         {} load balancers, {} sandboxes, {} backend slots (read in {:.1} ms; opened in {:.0} ms)",
            a["load_balancers"],
            a["sandboxes"],
            a["backend_slots"],
            a["read_ms"].as_f64().unwrap_or(0.0),
            a["open_ms"].as_f64().unwrap_or(0.0)
        );
    }
    for ap in dp["appliers"].as_array().into_iter().flatten() {
        println!(
            "  applier {:<6}{} applies, {} writes, {} deletes{}",
            s(&ap["name"]),
            ap["applies"],
            ap["totals"]["writes"],
            ap["totals"]["deletes"],
            match ap["last_error"].as_str() {
                Some(e) => format!(", FAILING: {e}"),
                None => String::new(),
            }
        );
    }
    let ig = &dp["ingress"];
    if ig.is_null() && dp["kind"] == "ipvs" {
        println!(
            "ingress         Docker's (IPVS datapath): published ports are its ingress_sbox's{}",
            match dp["ipvs"]["ingress_sbox"].as_str() {
                Some(_) => ", with meshd's idle timeout",
                None => "",
            }
        );
    } else if ig.is_null() {
        println!("ingress         off (--no-ingress): published ports are Docker's");
    } else {
        let names: Vec<&str> = ig["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let k = &ig["counters"];
        println!(
            "ingress         {} published ports on {}; local tasks via {}; tunnel {} from {}",
            ig["ports"],
            names.join(", "),
            ig["bridge"].as_str().unwrap_or("no bridge yet"),
            ig["tunnel_port"],
            ig["node_addr"].as_str().unwrap_or("?")
        );
        if let Some(e) = ig["last_error"].as_str() {
            println!("  FAILING       {e}");
        }
        println!(
            "  packets       {} in, {} new flows, {} to local tasks, {} tunnelled, {} replies",
            k["packets_in"], k["new_flows"], k["to_local_tasks"], k["tunnelled"], k["replies"]
        );
        println!(
            "  dropped       {} no task, {} fragments, {} no SNAT port, {} too big; {} passed (no route)",
            k["dropped_no_task"],
            k["dropped_fragments"],
            k["dropped_no_snat_port"],
            k["dropped_too_big"],
            k["passed_no_route"]
        );
    }
    let c = &d["counts"];
    println!(
        "swarm           {} services, {} tasks, {} networks, {} nodes; {} load balancers, {} backends",
        c["services"], c["tasks"], c["networks"], c["nodes"], c["load_balancers"], c["backends"]
    );
    println!(
        "this node       {} containers scoped, {} other nodes report containers",
        c["scoped_sandboxes"], c["reports"]
    );
    let l = &d["event_to_map"];
    println!(
        "event→map       {} samples, p50 {:.2} ms, p99 {:.2} ms",
        l["samples"],
        l["p50_ms"].as_f64().unwrap_or(0.0),
        l["p99_ms"].as_f64().unwrap_or(0.0)
    );
    let dns = &d["dns"];
    if dns["enabled"] == true {
        let ups: Vec<&str> = dns["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "dns             {} containers, {} names, upstreams {} (from {}, changed {} times)",
            dns["sandboxes"].as_array().map_or(0, Vec::len),
            dns["names"],
            if ups.is_empty() {
                "NONE: names that are not ours fail".to_string()
            } else {
                ups.join(", ")
            },
            dns["upstreams_from"].as_str().unwrap_or(""),
            dns["upstream_changes"]
        );
        let q = &dns["stats"];
        println!(
            "dns queries     {} answered, {} forwarded ({} failed), {} refused, {} malformed",
            q["answered"], q["forwarded"], q["forward_failed"], q["refused"], q["formerr"]
        );
        for e in dns["config_errors"].as_array().into_iter().flatten() {
            println!("  upstream config: {}", e.as_str().unwrap_or(""));
        }
        for f in dns["open_failures"].as_array().into_iter().flatten() {
            println!(
                "  no DNS sockets in {}: {}",
                f["name"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or("")
            );
        }
    } else {
        println!("dns             off (--no-dns): containers use dockerd's resolver");
    }
    let rejected = d["rejected"].as_array().cloned().unwrap_or_default();
    println!("rejected        {}", rejected.len());
    for r in rejected {
        println!(
            "  {} {}: {}",
            r["kind"].as_str().unwrap_or(""),
            r["id"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
}

/// One sandbox's IPVS service for a VIP, as the kernel reports it.
fn print_ipvs(x: &meshd::datapath::ipvs::applier::SandboxIpvs) {
    if let Some(e) = &x.error {
        println!("    IPVS in {}: cannot read: {e}", x.sandbox);
        return;
    }
    println!(
        "    IPVS in {}: fwmark {:#010x}, scheduler {}",
        x.sandbox, x.fwmark, x.scheduler
    );
    println!(
        "      {:<16} {:>6} {:>7} {:>9}",
        "REAL SERVER", "WEIGHT", "ACTIVE", "INACTIVE"
    );
    for r in &x.real_servers {
        println!(
            "      {:<16} {:>6} {:>7} {:>9}",
            r.addr, r.weight, r.active_conns, r.inactive_conns
        );
    }
}
