//! The node's VM bridge: guests on the `bridge` network
//! ([`VmNetwork::Bridge`](novacron_common::wire::VmNetwork)) get a tap device
//! on it and an address of its range, as containers get one on Docker's
//! bridge.
//!
//! - **The bridge** (`ncvm` and a hash of its range) holds the range's first
//!   address as the node's own, so the node (health checks, the service
//!   catalog's clients here) reaches every guest on every port, and guests
//!   reach each other.
//! - **Addresses** come from the range by a hash of the VM's name, the next
//!   free one on a clash ([`Bridge::allocate`]): with the same range on two
//!   nodes (the default), a guest that moves keeps its address unless the
//!   target has given it to another. The guest learns it from the kernel's
//!   `ip=` argument (initramfs-tools' and the test guest's format) and, with
//!   user data, from cloud-init's `network-config`.
//! - **Published ports** are DNAT rules in a chain of the bridge's own in the
//!   `nat` table, replaced whole with `iptables-restore` whenever a guest
//!   comes or goes ([`Bridge::set_forwards`]), jumped to for traffic to the
//!   node's own addresses (from outside and from the node itself, loopback
//!   included: the bridge has `route_localnet`). They live in the kernel, so
//!   they keep forwarding while the agent restarts.
//! - **Traffic out** of the range is masqueraded, and the bridge's traffic is
//!   accepted in `FORWARD` ahead of Docker's rules.
//!
//! One agent holds a bridge ([`Bridge::setup`] locks it): a second agent on
//! the same host needs another range (`--vm-bridge`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::runtime::netfilter::{self, Dnat};

/// The range every node's bridge takes unless told otherwise: the bridge
/// holds `10.215.0.1`, guests get the rest of `10.215.0.0/16`.
pub const DEFAULT: &str = "10.215.0.1/16";

/// The comment on the bridge's fixed rules.
const COMMENT: &str = "novacron-vm-bridge";

/// A node's VM bridge: its own address and the range's prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// The interface's name.
    pub name: String,
    /// The node's address on it, the guests' gateway.
    pub gateway: Ipv4Addr,
    /// The range's prefix length (16 to 28).
    pub prefix: u8,
}

fn fnv(text: &str) -> u32 {
    // FNV-1a: stable across releases and platforms (names and addresses are
    // persisted or compared across nodes).
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Bridge {
    /// The bridge of `A.B.C.D/P`: the node's address on the bridge and the
    /// range's prefix length (16 to 28). Pure.
    pub fn parse(text: &str) -> Result<Bridge, String> {
        let expected = "an address of this node on the bridge with the range's prefix length, \
                        such as 10.215.0.1/16";
        let (addr, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected {expected}"))?;
        let gateway: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?}: expected {expected}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (16..=28).contains(p))
            .ok_or_else(|| format!("{text:?}: the prefix length must be 16 to 28"))?;
        let bridge = Bridge {
            name: String::new(),
            gateway,
            prefix,
        };
        let host = u32::from(gateway) & !bridge.mask();
        if host == 0 || host == !bridge.mask() {
            return Err(format!(
                "{text:?}: the node's address is the range's network or broadcast address; expected {expected}"
            ));
        }
        if gateway.is_loopback() || gateway.is_multicast() || gateway.is_unspecified() {
            return Err(format!("{text:?}: expected {expected}"));
        }
        Ok(Bridge {
            name: format!("ncvm{:08x}", fnv(&bridge.range())),
            ..bridge
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The range, `10.215.0.0/16`.
    pub fn range(&self) -> String {
        format!(
            "{}/{}",
            Ipv4Addr::from(u32::from(self.gateway) & self.mask()),
            self.prefix
        )
    }

    /// The range's netmask, `255.255.0.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.gateway) & self.mask()
    }

    /// Whether the network of `cidr` (`A.B.C.D/P`, as `ip addr` lists an
    /// interface's) and the range share an address. Pure.
    pub fn overlaps(&self, cidr: &str) -> bool {
        let Some((addr, prefix)) = cidr.split_once('/') else {
            return false;
        };
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
            return false;
        };
        let shorter = prefix.min(self.prefix);
        if shorter > 32 {
            return false;
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(shorter)).unwrap_or(0);
        u32::from(addr) & mask == u32::from(self.gateway) & mask
    }

    /// The chain of the bridge's published ports in the `nat` table.
    pub fn chain(&self) -> String {
        format!("NOVACRON-{}", self.name.to_uppercase())
    }

    /// The address of the guest named `key`: the range's address its hash
    /// points at, or the next one neither `taken` nor the bridge's own, nor the
    /// network's or broadcast address. `None` when the range is full. Pure.
    pub fn allocate(&self, key: &str, taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        let size = !self.mask() + 1;
        let base = u32::from(self.gateway) & self.mask();
        let start = fnv(key) % size;
        (0..size)
            .map(|i| Ipv4Addr::from(base + (start.wrapping_add(i) % size)))
            .find(|a| {
                let host = u32::from(*a) - base;
                host != 0 && host != size - 1 && *a != self.gateway && !taken.contains(a)
            })
    }

    /// The kernel's `ip=` argument that gives a guest `addr` on `eth0`, the
    /// bridge its gateway.
    pub fn kernel_arg(&self, addr: Ipv4Addr) -> String {
        format!("ip={addr}::{}:{}::eth0:off", self.gateway, self.netmask())
    }

    /// Cloud-init's `network-config` (version 2) for a guest with `mac` and
    /// `addr`.
    pub fn network_config(&self, mac: &str, addr: Ipv4Addr) -> String {
        format!(
            "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    \
             set-name: eth0\n    addresses: [\"{addr}/{}\"]\n    routes:\n      - to: 0.0.0.0/0\n        \
             via: {}\n",
            self.prefix, self.gateway
        )
    }

    /// The rules the bridge needs, each `(table, chain, rule)`, that
    /// [`Bridge::setup`] adds where missing. Pure.
    pub fn base_rules(&self) -> Vec<(&'static str, &'static str, Vec<String>)> {
        let tagged = |rule: String| netfilter::tagged(&rule, COMMENT);
        let (name, range, chain) = (&self.name, self.range(), self.chain());
        let mut rules = netfilter::local_jumps(&chain, COMMENT).to_vec();
        rules.extend([
            (
                "nat",
                "POSTROUTING",
                tagged(format!("-s {range} ! -o {name} -j MASQUERADE")),
            ),
            (
                "nat",
                "POSTROUTING",
                tagged(format!("-s 127.0.0.0/8 -o {name} -j MASQUERADE")),
            ),
            ("filter", "FORWARD", tagged(format!("-i {name} -j ACCEPT"))),
            ("filter", "FORWARD", tagged(format!("-o {name} -j ACCEPT"))),
        ]);
        rules
    }

    /// The `iptables-restore` input that makes the bridge's chain hold exactly
    /// `forwards`. Pure.
    pub fn forwards_table(&self, forwards: &[Dnat]) -> String {
        format!(
            "*nat\n{}COMMIT\n",
            netfilter::dnat_chain(&self.chain(), forwards)
        )
    }

    /// Makes the bridge, its address, its sysctls and its rules, each where
    /// missing; holds `lock` (a file the agent keeps open for as long as it
    /// runs) so that no other agent of this host takes the same bridge. `Err`
    /// says why guests cannot be bridged here.
    pub async fn setup(&self, lock_dir: &Path) -> Result<std::fs::File, String> {
        let lock = self.lock(lock_dir)?;
        // A range some other interface already has would route half of it away.
        let addrs = ip(&["-o", "-4", "addr", "show"]).await?;
        for line in addrs.lines() {
            let mut words = line.split_whitespace();
            let (Some(_), Some(dev), Some("inet"), Some(cidr)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            if dev != self.name && self.overlaps(cidr) {
                return Err(format!(
                    "the range {} overlaps {cidr} of {dev}; give this agent another with --vm-bridge",
                    self.range()
                ));
            }
        }
        if !Path::new("/sys/class/net").join(&self.name).exists() {
            ip(&["link", "add", &self.name, "type", "bridge"]).await?;
        }
        let own = format!("{}/{}", self.gateway, self.prefix);
        ip(&["addr", "replace", &own, "dev", &self.name]).await?;
        ip(&["link", "set", &self.name, "up"]).await?;
        for (path, what) in [
            (PathBuf::from("/proc/sys/net/ipv4/ip_forward"), "forwarding"),
            (
                PathBuf::from(format!(
                    "/proc/sys/net/ipv4/conf/{}/route_localnet",
                    self.name
                )),
                "loopback-published ports",
            ),
        ] {
            if !std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                std::fs::write(&path, "1")
                    .map_err(|e| format!("cannot turn on {what} ({}): {e}", path.display()))?;
            }
        }
        netfilter::ensure(&[("nat", self.chain())], self.base_rules()).await?;
        info!(bridge = %self.name, range = %self.range(), "virtual machines on the bridge network use this bridge");
        Ok(lock)
    }

    /// Whether a device (a guest's tap) is attached to the bridge.
    pub fn in_use(&self) -> bool {
        std::fs::read_dir(Path::new("/sys/class/net").join(&self.name).join("brif"))
            .is_ok_and(|mut d| d.next().is_some())
    }

    /// Undoes [`Bridge::setup`]: the rules, the published ports' chain and the
    /// interface go. For a bridge no guest uses (see [`Bridge::in_use`]).
    pub async fn teardown(&self) -> Result<(), String> {
        let rules = netfilter::remove(&[("nat", self.chain())], self.base_rules()).await;
        let link = if Path::new("/sys/class/net").join(&self.name).exists() {
            ip(&["link", "del", &self.name]).await.map(|_| ())
        } else {
            Ok(())
        };
        rules.and(link)
    }

    /// Takes the bridge's lock file, or says which agent holds it.
    fn lock(&self, dir: &Path) -> Result<std::fs::File, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.lock", self.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let _ = std::fs::write(&path, std::process::id().to_string());
                Ok(file)
            }
            Err(_) => Err(format!(
                "the bridge {} (range {}) belongs to another agent of this host (pid {}); give this agent another range with --vm-bridge",
                self.name,
                self.range(),
                std::fs::read_to_string(&path).unwrap_or_default().trim()
            )),
        }
    }

    /// Makes the guest's tap device `tap` (again after a reboot) on the bridge.
    pub async fn ensure_tap(&self, tap: &str) -> Result<(), String> {
        if !Path::new("/sys/class/net").join(tap).exists() {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
        }
        ip(&["link", "set", tap, "master", &self.name]).await?;
        ip(&["link", "set", tap, "up"]).await?;
        Ok(())
    }

    /// Replaces the bridge's published ports with `forwards`, at once.
    pub async fn set_forwards(&self, forwards: &[Dnat]) -> Result<(), String> {
        netfilter::restore(&self.forwards_table(forwards)).await
    }
}

/// Removes tap device `tap`, when it exists, and its limit's IFB device.
pub async fn remove_tap(tap: &str) -> Result<(), String> {
    if Path::new("/sys/class/net").join(tap).exists() {
        ip(&["link", "del", tap]).await?;
    }
    remove_ifb(&ifb_name(tap)).await
}

/// How the names of the IFB devices that limit guests' outgoing traffic begin.
pub const IFB_PREFIX: &str = "nci";

/// The IFB device of tap `tap` (the same length).
pub fn ifb_name(tap: &str) -> String {
    format!(
        "{IFB_PREFIX}{}",
        tap.strip_prefix(TAP_PREFIX).unwrap_or(tap)
    )
}

async fn remove_ifb(ifb: &str) -> Result<(), String> {
    if Path::new("/sys/class/net").join(ifb).exists() {
        ip(&["link", "del", ifb]).await?;
    }
    Ok(())
}

/// The token bucket of a limit of `bytes_per_sec`: `tc`'s `tbf` arguments.
/// The bucket holds a fiftieth of a second at the rate (at least 32 KiB, so
/// that full-sized frames pass at any rate above the kernel's tick), and a
/// packet waits at most 50 ms for it before it is dropped. Pure.
pub fn tbf_args(bytes_per_sec: u64) -> Vec<String> {
    let burst = (bytes_per_sec / 50).max(32 << 10);
    [
        "tbf".to_owned(),
        "rate".to_owned(),
        format!("{}bit", bytes_per_sec.saturating_mul(8)),
        "burst".to_owned(),
        burst.to_string(),
        "latency".to_owned(),
        "50ms".to_owned(),
    ]
    .to_vec()
}

/// Limits the guest's network on tap `tap` to `bytes_per_sec` each way (0:
/// removes any limit). Traffic to the guest leaves the host through the tap:
/// a token bucket (`tbf`) is its root queue. Traffic from the guest arrives on
/// the tap, where the kernel cannot queue it: the tap's ingress redirects it
/// (`u32` match-all, `mirred`) to an IFB device of its own, whose root queue
/// is the same bucket (policing would drop instead of queueing, and these
/// kernels lack `act_police` anyway). Idempotent; a start applies it again.
pub async fn limit_tap(tap: &str, bytes_per_sec: u64) -> Result<(), String> {
    let ifb = ifb_name(tap);
    if bytes_per_sec == 0 {
        // A limit leaves its IFB device: without one there is nothing to undo
        // (and no `tc` to run at each start of an unlimited guest).
        if !Path::new("/sys/class/net").join(&ifb).exists() {
            return Ok(());
        }
        let _ = tc(&["qdisc", "del", "dev", tap, "root"]).await;
        let _ = tc(&["qdisc", "del", "dev", tap, "ingress"]).await;
        return remove_ifb(&ifb).await;
    }
    let bucket = tbf_args(bytes_per_sec);
    let bucket: Vec<&str> = bucket.iter().map(String::as_str).collect();
    if !Path::new("/sys/class/net").join(&ifb).exists() {
        ip(&["link", "add", &ifb, "type", "ifb"]).await?;
    }
    ip(&["link", "set", &ifb, "up"]).await?;
    tc(&[&["qdisc", "replace", "dev", tap, "root"], bucket.as_slice()].concat()).await?;
    tc(&[
        &["qdisc", "replace", "dev", &ifb, "root"],
        bucket.as_slice(),
    ]
    .concat())
    .await?;
    tc(&["qdisc", "replace", "dev", tap, "ingress"]).await?;
    tc(&[
        "filter", "replace", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
        "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &ifb,
    ])
    .await?;
    Ok(())
}

/// Runs iproute2's `tc` (for at most [`netfilter::CALL_TIMEOUT`]).
async fn tc(items: &[&str]) -> Result<String, String> {
    netfilter::output("tc", &args(items)).await
}

/// How the names of guests' tap devices begin.
pub const TAP_PREFIX: &str = "nct";

/// The tap device of VM `id` (at most 15 bytes, the kernel's limit).
pub fn tap_name(id: &str) -> String {
    let tail: String = id
        .chars()
        .rev()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{TAP_PREFIX}{tail}")
}

/// The guest's MAC address (QEMU's locally administered prefix, then a hash
/// of its id): the same on every node, so that a guest that moves keeps it.
pub fn mac(id: &str) -> String {
    let h = fnv(id).to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[1], h[2], h[3])
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs iproute2's `ip` (for at most [`netfilter::CALL_TIMEOUT`]).
async fn ip(items: &[&str]) -> Result<String, String> {
    netfilter::output("ip", &args(items)).await
}

/// The packaged drop-in that lets the agent's unit make the bridge.
pub const DROPIN: &str = "/usr/share/novacron-agent/systemd/vm-bridge.conf";

/// `why` the bridge could not be made, with how to allow it under the
/// packaged unit when a permission was refused.
pub fn with_unit_hint(why: String) -> String {
    let refused = [
        "not permitted",
        "Permission denied",
        "Read-only file system",
    ]
    .iter()
    .any(|w| why.contains(w));
    if refused {
        format!(
            "{why} (the agent lacks the rights for the bridge; under the packaged unit, run install-agent.sh --vm-bridge CIDR, or link {DROPIN} into /etc/systemd/system/novacron-agent.service.d/)"
        )
    } else {
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridge_is_its_node_s_address_and_range() {
        let b = Bridge::parse("10.215.0.1/16").expect("test input");
        assert_eq!(b.range(), "10.215.0.0/16");
        assert_eq!(b.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert!(b.name.starts_with("ncvm") && b.name.len() <= 15);
        assert_eq!(
            Bridge::parse(" 10.215.0.1/16 ").expect("test input"),
            b,
            "stable"
        );
        assert_ne!(
            Bridge::parse("10.216.3.1/24").expect("test input").name,
            b.name
        );
        assert!(b.chain().len() <= 28, "iptables' limit on chain names");
        for bad in [
            "10.215.0.0/16",
            "10.215.255.255/16",
            "10.215.0.1",
            "10.215.0.1/8",
            "10.215.0.1/30",
            "127.0.0.1/16",
            "nope/16",
        ] {
            assert!(Bridge::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_range_overlaps_the_networks_it_shares_an_address_with() {
        let b = Bridge::parse("10.215.0.1/16").expect("test input");
        assert!(b.overlaps("10.0.0.5/8"), "a larger network around it");
        assert!(b.overlaps("10.215.7.1/24"), "a smaller one inside it");
        assert!(b.overlaps("10.215.3.4/32"));
        assert!(!b.overlaps("10.216.0.1/16"));
        assert!(!b.overlaps("172.17.0.1/16"));
        assert!(b.overlaps("0.0.0.0/0"));
        assert!(!b.overlaps("garbage"));
    }

    #[test]
    fn addresses_come_from_the_name_s_hash_and_skip_what_is_taken() {
        let b = Bridge::parse("10.216.3.1/28").expect("test input");
        let first = b.allocate("vm-a", &[]).expect("test input");
        assert!(b.contains(first));
        assert_eq!(
            b.allocate("vm-a", &[]),
            Some(first),
            "the same on every node"
        );
        let mut taken = vec![first];
        // A /28: .0 and .15 are the network and broadcast, .1 the bridge's.
        while let Some(a) = b.allocate("vm-a", &taken) {
            assert!(!taken.contains(&a));
            taken.push(a);
        }
        taken.sort();
        assert_eq!(
            taken,
            (2..=14)
                .map(|h| Ipv4Addr::new(10, 216, 3, h))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_guest_learns_its_address_from_the_kernel_and_cloud_init() {
        let b = Bridge::parse("10.216.3.1/24").expect("test input");
        let a = Ipv4Addr::new(10, 216, 3, 9);
        assert_eq!(
            b.kernel_arg(a),
            "ip=10.216.3.9::10.216.3.1:255.255.255.0::eth0:off"
        );
        let config = b.network_config("52:54:00:01:02:03", a);
        assert!(
            config.contains("addresses: [\"10.216.3.9/24\"]"),
            "{config}"
        );
        assert!(config.contains("via: 10.216.3.1"), "{config}");
    }

    #[test]
    fn published_ports_replace_the_bridge_s_chain_whole() {
        let b = Bridge::parse("10.216.3.1/24").expect("test input");
        let chain = b.chain();
        let table = b.forwards_table(&[
            Dnat {
                owner: "vm-1".into(),
                publish: Ipv4Addr::LOCALHOST,
                host_port: 20000,
                to: Ipv4Addr::new(10, 216, 3, 9),
                to_port: 8080,
                udp: false,
            },
            Dnat {
                owner: "vm-2".into(),
                publish: Ipv4Addr::UNSPECIFIED,
                host_port: 5353,
                to: Ipv4Addr::new(10, 216, 3, 10),
                to_port: 53,
                udp: true,
            },
        ]);
        assert_eq!(
            table,
            format!(
                "*nat\n:{chain} - [0:0]\n\
                 -A {chain} -d 127.0.0.1/32 -p tcp -m tcp --dport 20000 -m comment --comment \"vm-1\" -j DNAT --to-destination 10.216.3.9:8080\n\
                 -A {chain} -p udp -m udp --dport 5353 -m comment --comment \"vm-2\" -j DNAT --to-destination 10.216.3.10:53\n\
                 COMMIT\n"
            )
        );
        assert_eq!(
            b.forwards_table(&[]),
            format!("*nat\n:{chain} - [0:0]\nCOMMIT\n"),
            "no guests: an empty chain"
        );
    }

    #[test]
    fn the_fixed_rules_are_tagged_and_name_the_bridge() {
        let b = Bridge::parse("10.216.3.1/24").expect("test input");
        let rules = b.base_rules();
        assert_eq!(rules.len(), 6);
        for (_, _, rule) in &rules {
            let text = rule.join(" ");
            assert!(text.contains(&format!("--comment {COMMENT} -j")), "{text}");
        }
        assert_eq!(
            rules[2].2.join(" "),
            format!(
                "-s 10.216.3.0/24 ! -o {} -m comment --comment {COMMENT} -j MASQUERADE",
                b.name
            )
        );
    }

    #[test]
    fn a_limit_is_a_token_bucket_of_a_fiftieth_of_a_second() {
        assert_eq!(
            tbf_args(10 << 20).join(" "),
            "tbf rate 83886080bit burst 209715 latency 50ms"
        );
        // Never below 32 KiB: a full frame must fit.
        assert_eq!(
            tbf_args(64 << 10).join(" "),
            "tbf rate 524288bit burst 32768 latency 50ms"
        );
        assert_eq!(ifb_name("nct456789abcdef"), "nci456789abcdef");
    }

    #[test]
    fn tap_names_fit_the_kernel_s_limit() {
        let t = tap_name("vm-0123456789abcdef");
        assert_eq!(t, "nct456789abcdef");
        assert!(t.len() <= 15);
        assert_eq!(mac("vm-0123456789abcdef"), mac("vm-0123456789abcdef"));
        assert!(mac("vm-x").starts_with("52:54:00:"));
    }

    /// The real bridge in the kernel: made with its rules, then removed with
    /// them when no guest uses it (as the agent's clean stop does).
    #[tokio::test]
    async fn an_unused_bridge_is_torn_down_with_its_rules() {
        assert!(
            rustix::process::geteuid().is_root(),
            "bridges and iptables need root: run the agent's tests as root (as .ci/run does)"
        );
        let b = Bridge::parse("10.219.77.1/28").expect("test input");
        let locks = tempfile::tempdir().expect("tempdir");
        let nat = || async {
            netfilter::run("iptables", &args(&["-t", "nat", "-S"]))
                .await
                .expect("iptables -t nat -S")
        };
        let lock = b.setup(locks.path()).await.expect("setup");
        assert!(Path::new("/sys/class/net").join(&b.name).exists());
        assert!(!b.in_use());
        let made = nat().await;
        assert!(made.contains(&format!("-N {}", b.chain())), "{made}");
        assert!(made.contains("10.219.77.0/28"), "{made}");
        b.teardown().await.expect("teardown");
        drop(lock);
        assert!(!Path::new("/sys/class/net").join(&b.name).exists());
        let left = nat().await;
        assert!(
            !left.contains(&b.chain()) && !left.contains("10.219.77.0/28"),
            "{left}"
        );
        let filter = netfilter::run("iptables", &args(&["-S", "FORWARD"]))
            .await
            .expect("iptables -S FORWARD");
        assert!(!filter.contains(&b.name), "{filter}");
        // Nothing left to remove is no error.
        b.teardown().await.expect("a second teardown");
    }

    #[test]
    fn a_refused_permission_names_the_drop_in() {
        let why = with_unit_hint(
            "ip link add novacron-vm0 type bridge: RTNETLINK answers: Operation not permitted"
                .to_owned(),
        );
        assert!(why.contains("install-agent.sh --vm-bridge"), "{why}");
        assert!(why.contains(DROPIN), "{why}");
        let other = "the range 10.215.0.0/16 overlaps 10.215.0.1/16 of eth1".to_owned();
        assert_eq!(with_unit_hint(other.clone()), other);
    }
}
