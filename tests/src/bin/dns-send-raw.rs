//! Sends raw DNS packets (files) to an address over UDP, one by one, and prints for each
//! whether a reply came and its rcode. For hostile-packet tests against a live server: run
//! inside a container so the packets take the container's path to 127.0.0.11:53.
use std::{net::UdpSocket, time::Duration};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: dns-send-raw ADDR FILE...");
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    for file in args {
        let packet = std::fs::read(&file)?;
        sock.send_to(&packet, &addr)?;
        let mut buf = [0u8; 4096];
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n >= 4 => println!("{file}: rcode {}", buf[3] & 0x0f),
            Ok((n, _)) => println!("{file}: short reply of {n} bytes"),
            Err(_) => println!("{file}: no reply"),
        }
    }
    Ok(())
}
