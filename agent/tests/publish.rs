//! The published ports of runc containers (`runtime::oci::publish`) against
//! the real packet filter: a network namespace with a veth pair stands for a
//! sandbox, a server in it answers, and the node reaches it through the
//! agent's DNAT rule on a loopback port. Needs root, `iptables` and `ip`
//! (`bash .ci/setup all` installs them) and `python3` for the server.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use novacron_agent::runtime::netfilter::Dnat;
use novacron_agent::runtime::oci::publish::{self, Publisher};

/// The namespace, its veth pair and its server; removed on drop.
struct Sandbox {
    ns: String,
    host_if: String,
    server: Option<Child>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) must be installed: bash .ci/setup all");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nat_listing() -> String {
    let out = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("iptables must be installed: bash .ci/setup all");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ask(port: u16) -> std::io::Result<String> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hi\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[tokio::test]
async fn a_published_port_reaches_the_sandbox_from_loopback_and_goes_with_its_rule() {
    let tag = std::process::id() % 10_000;
    let sub = 100 + (std::process::id() % 100) as u8;
    let (host_addr, sandbox_addr) = (
        Ipv4Addr::new(10, 231, sub, 1),
        Ipv4Addr::new(10, 231, sub, 2),
    );
    let mut sandbox = Sandbox {
        ns: format!("ncpub{tag}"),
        host_if: format!("ncpubh{tag}"),
        server: None,
    };
    let ns_if = format!("ncpubn{tag}");
    ip(&["netns", "add", &sandbox.ns]);
    ip(&[
        "link",
        "add",
        &sandbox.host_if,
        "type",
        "veth",
        "peer",
        "name",
        &ns_if,
    ]);
    ip(&["link", "set", &ns_if, "netns", &sandbox.ns]);
    ip(&[
        "addr",
        "add",
        &format!("{host_addr}/30"),
        "dev",
        &sandbox.host_if,
    ]);
    ip(&["link", "set", &sandbox.host_if, "up"]);
    let in_ns = |args: &[&str]| {
        let mut all = vec!["netns", "exec", sandbox.ns.as_str(), "ip"];
        all.extend_from_slice(args);
        ip(&all);
    };
    in_ns(&["addr", "add", &format!("{sandbox_addr}/30"), "dev", &ns_if]);
    in_ns(&["link", "set", &ns_if, "up"]);
    in_ns(&["link", "set", "lo", "up"]);
    in_ns(&["route", "add", "default", "via", &host_addr.to_string()]);
    // Answers each connection with the address it came from.
    let server = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{sandbox_addr}', 8080)); s.listen(8)\n\
         while True:\n\
         \x20   c, a = s.accept(); c.recv(16); c.sendall(('from ' + a[0]).encode()); c.close()\n"
    );
    sandbox.server = Some(
        Command::new("ip")
            .args(["netns", "exec", &sandbox.ns, "python3", "-c", &server])
            .spawn()
            .expect("python3 must be installed"),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let publisher = Publisher::new(dir.path());
    publisher
        .setup()
        .await
        .expect("iptables must work here (root, bash .ci/setup all)");
    let host_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let rule = Dnat {
        owner: "oci-test".into(),
        publish: Ipv4Addr::LOCALHOST,
        host_port,
        to: sandbox_addr,
        to_port: 8080,
        udp: false,
    };
    publisher
        .set(std::slice::from_ref(&rule))
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match ask(host_port) {
            Ok(a) if !a.is_empty() => break a,
            other if Instant::now() >= deadline => {
                panic!("127.0.0.1:{host_port} never reached the sandbox: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(
        answer,
        format!("from {host_addr}"),
        "loopback-sourced traffic is masqueraded to the node's address on the link"
    );

    publisher.set(&[]).await.expect("withdraw");
    assert!(
        ask(host_port).is_err(),
        "with its rule gone, the port leads nowhere"
    );

    // The agent goes and its directory with it: the next agent's start
    // removes its chains and fixed rules.
    let (chain, masq) = (publisher.chain(), publisher.masquerade_chain());
    let gone = format!("{}:{}", publish::COMMENT, dir.path().display());
    assert!(nat_listing().contains(&format!("-N {chain}")));
    drop(dir);
    publish::sweep().await;
    let listing = nat_listing();
    assert!(!listing.contains(&chain), "{listing}");
    assert!(!listing.contains(&masq), "{listing}");
    let (left, _) = publish::stale(&listing, |d: &Path| d.exists());
    assert!(left.is_empty(), "rules of agents that are gone: {left:?}");
    let filter = Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .expect("iptables");
    let forward = String::from_utf8_lossy(&filter.stdout);
    assert!(!forward.contains(&gone), "{forward}");
}
