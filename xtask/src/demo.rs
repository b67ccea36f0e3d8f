//! `cargo xtask demo`: a real one-node swarm with meshd, a 3-replica web service on a VIP and a
//! client container; shows what meshctl sees and the VIP answering, then waits for Ctrl-C and
//! removes everything. (The multi-node lab is `cargo xtask lab`, issue 3.)
use std::process::Command;

use anyhow::{ensure, Result};
use meshd_tests::{bin, require_root, OneNodeSwarm, WEB_CMD};

pub fn demo(wait: bool) -> Result<()> {
    ensure!(require_root("demo"), "the demo needs root");
    let lab = OneNodeSwarm::start("d1", "192.168.79.1")?;
    let (node, meshd) = (&lab.node, &lab.meshd);
    node.create_service("web", "front", 3, "1s", &["sh", "-c", WEB_CMD])?;
    node.run_idle_container("client", "front")?;
    node.wait_running("web", 3)?;
    meshd.wait_backends("web", 3)?;
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
