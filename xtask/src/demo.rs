//! `cargo xtask demo`: a real one-node swarm with meshd, a 3-replica web service on a VIP and a
//! client container; shows what meshctl sees and the VIP answering, then waits for Ctrl-C and
//! removes everything. (The multi-node lab is `cargo xtask lab`, issue 3.)
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Result};
use meshd_tests::{bin, require_root, run_tag, wait_for, Meshd, Node, PinGuard, IMAGE};

pub fn demo(wait: bool) -> Result<()> {
    ensure!(require_root("demo"), "the demo needs root");
    let tag = run_tag();
    let node = Node::start(&format!("{tag}d1"), "192.168.79.1")?;
    let pins = PinGuard(PathBuf::from(format!("/sys/fs/bpf/{tag}d1")));
    node.swarm_init()?;
    node.import_image()?;
    let meshd = Meshd::start(&node, &pins.0)?;
    node.docker(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--attachable",
        "front",
    ])?;
    node.docker(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        "web",
        "--network",
        "front",
        "--replicas",
        "3",
        "--stop-grace-period",
        "1s",
        IMAGE,
        "sh",
        "-c",
        "hostname > /www/index.html; exec httpd -f -p 80 -h /www",
    ])?;
    node.docker(&[
        "run",
        "-d",
        "--name",
        "client",
        "--network",
        "front",
        IMAGE,
        "sleep",
        "1d",
    ])?;
    node.wait_running("web", 3)?;
    wait_for("meshd to program web", Duration::from_secs(10), || {
        let s = meshd.ctl(&["service", "web"]).ok()?;
        (s["vips"][0]["backends"].as_array()?.len() == 3).then_some(())
    })?;
    let answers = node.exec(
        "client",
        "for i in $(seq 30); do wget -qO- http://web/; done | sort | uniq -c",
    )?;
    println!("30 requests to http://web/ from a client container, answered by task:\n{answers}");
    let ctl = |args: &[&str]| {
        let _ = Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(&meshd.socket)
            .args(args)
            .status();
    };
    println!("$ meshctl service web");
    ctl(&["service", "web"]);
    println!("\n$ meshctl status");
    ctl(&["status"]);
    if wait {
        println!(
            "\nTry: docker -H {} service scale web=5\n     docker -H {} exec client wget -qO- http://web/\n     meshctl --socket {} service web\nCtrl-C removes everything.",
            node.host(),
            node.host(),
            meshd.socket.display()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })?;
        let _ = rx.recv();
        println!("removing the demo swarm...");
    }
    Ok(())
}
