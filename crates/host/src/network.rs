//! The daemon's networks and the switch world that serves them: one `wv vswitch` process
//! (crates/vswitch), started when the first network exists (or at the daemon's start if any
//! do), supervised as a system world ([`crate::service`]: its own cgroup, restarted with a
//! back-off when it dies, with every network and port on its command line), its sockets under
//! `STATE_DIR/sw` (mode 0700). The daemon tells it its networks and ports over its control
//! socket. VMMs reconnect to their ports by themselves, so a fault in the switch takes down
//! neither a VM nor the daemon. A VM's network shares, reservation and limit ([`NetShares`],
//! `wv vm set --net-shares/--net-reservation/--net-limit`) are set on each of its ports when
//! the port is added, live when they change, and again on a restarted switch.

use crate::service::{self, Service};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// World id of the switch in the daemon's statistics (system worlds are 0 and 1, VMs count
/// up from 2 and never get this far).
pub const SWITCH_ID: u64 = u32::MAX as u64;
/// Shares of the switch world: a CPU's worth when contended, as the management world.
pub const SWITCH_SHARES: u32 = 1000;
/// The folder, in the state directory, of the switch's sockets and log.
pub const SWITCH_DIR: &str = "sw";
/// Most networks one daemon holds.
pub const MAX_NETWORKS: usize = 64;
/// Longest path of a Unix socket (the kernel's `sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A network as the daemon keeps it (`POST /v1/networks`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// 1-64 of `[A-Za-z0-9_.-]`, not starting with `.`.
    pub name: String,
    /// A TAP connecting the network to the host (created if missing).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::world::no_null"
    )]
    pub uplink: Option<String>,
    /// The uplink's link speed in bits per second (absent: none): the switch then schedules
    /// the frames the network's ports send to the uplink by their network shares,
    /// reservations and limits (`port set NET/uplink:TAP rate=BPS`). Only with an uplink.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::world::no_null"
    )]
    pub uplink_rate: Option<u64>,
}

impl NetworkSpec {
    /// Checks the name and the uplink, and that every port's socket path under `dir` fits.
    pub fn validate(&self, dir: &Path) -> Result<(), String> {
        if !wv_config::valid_network_name(&self.name) {
            return Err(format!(
                "invalid network name '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                self.name.escape_debug()
            ));
        }
        if let Some(t) = &self.uplink {
            if !wv_config::valid_tap_name(t) {
                return Err(format!(
                    "uplink '{}': a TAP name takes 1-{} characters, without '/', ':', spaces or NUL",
                    t.escape_debug(),
                    wv_config::MAX_TAP_NAME
                ));
            }
        }
        match (self.uplink_rate, &self.uplink) {
            (Some(0), _) => return Err("uplink_rate 0: leave it out for none".into()),
            (Some(_), None) => {
                return Err(format!(
                    "network '{}': an uplink_rate needs an uplink",
                    self.name
                ))
            }
            (Some(r), Some(_)) if r < 8 => {
                return Err(format!(
                    "uplink_rate {r}: at least 8 bits per second (the switch counts bytes)"
                ))
            }
            _ => {}
        }
        let longest = port_socket(dir, &self.name, &port_name(u64::from(u32::MAX), 15));
        let n = longest.as_os_str().len();
        if n > MAX_SOCKET_PATH {
            return Err(format!(
                "network name '{}' is too long for the switch's sockets under {} ({n} bytes, at most {MAX_SOCKET_PATH}): use a shorter one",
                self.name,
                dir.display()
            ));
        }
        Ok(())
    }
}

impl NetworkSpec {
    /// The switch's request that sets the uplink's rate, if the network has one.
    pub fn rate_request(&self) -> Option<String> {
        Some(format!(
            "port set {}/uplink:{} rate={}",
            self.name,
            self.uplink.as_ref()?,
            self.uplink_rate?
        ))
    }
}

/// A VM's egress settings in the switch, for each of its ports: shares against the other
/// ports sending to the same destination, a reservation and a limit in bits per second
/// (absent: the switch's default of 1000 shares, no reservation, no limit). See
/// docs/NETWORK.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetShares {
    /// 1 to [`wv_shares::MAX_SHARES`].
    pub shares: Option<u32>,
    /// Bits per second it gets whenever it sends that much.
    pub reservation: Option<u64>,
    /// Bits per second it never exceeds.
    pub limit: Option<u64>,
}

impl NetShares {
    /// Whether anything is set.
    pub fn any(&self) -> bool {
        *self != NetShares::default()
    }

    /// Checks the shares' range and that a reservation is within the limit.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.shares {
            if !(1..=wv_shares::MAX_SHARES).contains(&s) {
                return Err(format!("net_shares {s}: use 1-{}", wv_shares::MAX_SHARES));
            }
        }
        if let (Some(r), Some(l)) = (self.reservation, self.limit) {
            if r > l {
                return Err(format!(
                    "net_reservation {r} b/s is above the net_limit {l} b/s"
                ));
            }
        }
        Ok(())
    }

    /// The switch's request that sets them on port `network/port` (every field, so that one
    /// removed goes back to the default).
    pub fn request(&self, network: &str, port: &str) -> String {
        format!(
            "port set {network}/{port} shares={} reservation={} limit={}",
            self.shares.unwrap_or(wv_shares::DEFAULT_SHARES),
            self.reservation.unwrap_or(0),
            self.limit.unwrap_or(0)
        )
    }
}

/// The switch port of net `index` of VM world `id`.
pub fn port_name(id: u64, index: usize) -> String {
    format!("{id}-net{index}")
}

/// How many nets may be hot-plugged into one run of a VM (its PCI bus has 32 slots).
pub const MAX_HOT_PORTS: usize = 32;

/// The switch port of hot-plugged net `k` (below [`MAX_HOT_PORTS`]) of VM world `id`; no
/// longer than [`port_name`]'s longest, which network names are checked against.
pub fn hot_port_name(id: u64, k: usize) -> String {
    format!("{id}-hot{k}")
}

/// The socket of port `port` of `network` under the switch's folder `dir`.
pub fn port_socket(dir: &Path, network: &str, port: &str) -> PathBuf {
    dir.join(network).join(format!("{port}.sock"))
}

/// What the switch should serve.
#[derive(Default)]
pub struct Wanted {
    /// The networks the switch should have.
    networks: Vec<NetworkSpec>,
    /// The ports it should have: (network, port).
    ports: Vec<(String, String)>,
    /// The settings of the ports that have some: (network, port, settings).
    shares: Vec<(String, String, NetShares)>,
}

impl service::Wants for Wanted {
    const KIND: service::Kind = service::Kind {
        name: "switch",
        folder: SWITCH_DIR,
        command: "vswitch",
        fixed_args: &[],
    };

    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for n in &self.networks {
            args.extend(["--network".into(), n.name.clone()]);
            if let Some(t) = &n.uplink {
                args.extend(["--uplink".into(), format!("{}={t}", n.name)]);
            }
        }
        for (n, p) in &self.ports {
            args.extend(["--port".into(), format!("{n}/{p}")]);
        }
        args
    }

    /// The uplinks' rates, then the ports' settings.
    fn replay(&self) -> Vec<String> {
        self.networks
            .iter()
            .filter_map(NetworkSpec::rate_request)
            .chain(
                self.shares
                    .iter()
                    .filter(|(n, p, _)| self.ports.iter().any(|(wn, wp)| wn == n && wp == p))
                    .map(|(n, p, s)| s.request(n, p)),
            )
            .collect()
    }

    fn any(&self) -> bool {
        !self.networks.is_empty()
    }
}

/// The switch world's supervisor (a handle: clones share it).
pub type Supervisor = Service<Wanted>;

/// What only the switch does.
impl Service<Wanted> {
    /// Sets what the switch serves at the daemon's start (the stored networks, the ports of
    /// the VMs still running and their settings) and starts it if there is any network.
    pub fn restore(
        &self,
        networks: Vec<NetworkSpec>,
        ports: Vec<(String, String)>,
        shares: Vec<(String, String, NetShares)>,
    ) {
        self.restore_wanted(Wanted {
            networks,
            ports,
            shares,
        });
    }

    /// Adds network `n` to the switch (starting the switch if it is the first).
    pub fn add_network(&self, n: &NetworkSpec) -> Result<(), String> {
        let mut st = self.state();
        if st.closed() {
            return Err("the daemon is stopping".into());
        }
        st.want.networks.push(n.clone());
        let r = if st.running() {
            let line = match &n.uplink {
                Some(t) => format!("net add {} uplink={t}", n.name),
                None => format!("net add {}", n.name),
            };
            self.request(&line).map(|_| ()).and_then(|()| {
                let Some(rate) = n.rate_request() else {
                    return Ok(());
                };
                self.request(&rate).map(|_| ()).inspect_err(|_| {
                    let _ = self.request(&format!("net del {}", n.name));
                })
            })
        } else {
            // Started with the network on its command line.
            self.ensure(&mut st)
        };
        if r.is_err() {
            st.want.networks.retain(|x| x.name != n.name);
        }
        r
    }

    /// Deletes network `name` from the switch.
    pub fn del_network(&self, name: &str) -> Result<(), String> {
        let mut st = self.state();
        st.want.networks.retain(|x| x.name != name);
        st.want.ports.retain(|(n, _)| n != name);
        st.want.shares.retain(|(n, _, _)| n != name);
        if !st.running() {
            return Ok(());
        }
        self.request(&format!("net del {name}")).map(|_| ())
    }

    /// Adds port `port` to network `network`; its socket, bound when this returns.
    pub fn add_port(&self, network: &str, port: &str) -> Result<PathBuf, String> {
        let sock = port_socket(self.dir(), network, port);
        let mut st = self.state();
        if !st.want.networks.iter().any(|n| n.name == network) {
            return Err(format!("no network named '{network}'"));
        }
        if st.want.ports.iter().any(|(n, p)| n == network && p == port) {
            // Left by a run whose end was not seen yet: the switch has it.
            if st.running() {
                return Ok(sock);
            }
        } else {
            st.want.ports.push((network.into(), port.into()));
        }
        if !st.running() {
            // Started with the port on its command line.
            return self.ensure(&mut st).map(|()| sock);
        }
        match self.request(&format!("port add {network}/{port}")) {
            Ok(_) => Ok(sock),
            Err(e) if e.contains("exists already") => Ok(sock),
            Err(e) => {
                st.want.ports.retain(|(n, p)| !(n == network && p == port));
                Err(e)
            }
        }
    }

    /// Deletes port `port` of `network` (a VM's run ended).
    pub fn del_port(&self, network: &str, port: &str) {
        let mut st = self.state();
        let before = st.want.ports.len();
        st.want.ports.retain(|(n, p)| !(n == network && p == port));
        st.want
            .shares
            .retain(|(n, p, _)| !(n == network && p == port));
        if st.want.ports.len() == before || !st.running() {
            return;
        }
        if let Err(e) = self.request(&format!("port del {network}/{port}")) {
            eprintln!("wv host: removing switch port {network}/{port}: {e}");
        }
    }

    /// Sets port `port` of `network`'s shares, reservation and limit (kept for a restarted
    /// switch; sent at once while it runs).
    pub fn set_shares(&self, network: &str, port: &str, s: &NetShares) -> Result<(), String> {
        let mut st = self.state();
        st.want
            .shares
            .retain(|(n, p, _)| !(n == network && p == port));
        if s.any() {
            st.want.shares.push((network.into(), port.into(), *s));
        }
        if !st.running() {
            // Replayed once it runs.
            return Ok(());
        }
        self.request(&s.request(network, port)).map(|_| ())
    }

    /// The switch's counters for every port (`[]` when it does not run).
    pub fn ports(&self) -> Result<Vec<serde_json::Value>, String> {
        self.stats("ports")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_socket_lengths() {
        let dir = Path::new("/var/lib/worldvisor/sw");
        let ok = |n: &str, up: Option<&str>| {
            NetworkSpec {
                name: n.into(),
                uplink: up.map(str::to_string),
                uplink_rate: None,
            }
            .validate(dir)
        };
        assert_eq!(ok("lan", None), Ok(()));
        assert_eq!(ok("lan", Some("tap-lan")), Ok(()));
        for bad in ["", ".x", "a/b", "a b"] {
            assert!(ok(bad, None).unwrap_err().contains("invalid network name"));
        }
        assert!(ok("lan", Some("")).unwrap_err().contains("TAP name"));
        assert!(ok("lan", Some("a/b")).is_err());
        assert!(ok(&"x".repeat(64), None).unwrap_err().contains("too long"));
        assert_eq!(port_name(7, 1), "7-net1");
        assert!(
            hot_port_name(u64::from(u32::MAX), MAX_HOT_PORTS - 1).len()
                <= port_name(u64::from(u32::MAX), 15).len()
        );
        assert_eq!(
            port_socket(dir, "lan", "7-net1"),
            Path::new("/var/lib/worldvisor/sw/lan/7-net1.sock")
        );
        let spec: NetworkSpec = serde_json::from_str(r#"{"name":"lan"}"#).unwrap();
        assert_eq!(spec.uplink, None);
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"name":"lan","uplink":null}"#).is_err());
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"name":"lan","x":1}"#).is_err());
    }

    #[test]
    fn an_uplink_rate_is_checked_kept_and_replayed_before_the_ports_settings() {
        let dir = Path::new("/var/lib/worldvisor/sw");
        let lan: NetworkSpec =
            serde_json::from_str(r#"{"name":"lan","uplink":"tap0","uplink_rate":100000000}"#)
                .unwrap();
        assert_eq!(lan.validate(dir), Ok(()));
        assert_eq!(
            serde_json::to_value(&lan).unwrap(),
            serde_json::json!({"name": "lan", "uplink": "tap0", "uplink_rate": 100_000_000}),
            "kept with the network (worlds.json)"
        );
        assert_eq!(
            lan.rate_request().unwrap(),
            "port set lan/uplink:tap0 rate=100000000"
        );
        let plain: NetworkSpec = serde_json::from_str(r#"{"name":"lan","uplink":"tap0"}"#).unwrap();
        assert_eq!(plain.uplink_rate, None);
        assert_eq!(plain.rate_request(), None);
        assert!(!serde_json::to_string(&plain).unwrap().contains("rate"));
        for (bad, why) in [
            (
                r#"{"name":"lan","uplink_rate":1000}"#,
                "an uplink_rate needs an uplink",
            ),
            (
                r#"{"name":"lan","uplink":"tap0","uplink_rate":0}"#,
                "uplink_rate 0",
            ),
            (
                r#"{"name":"lan","uplink":"tap0","uplink_rate":7}"#,
                "at least 8",
            ),
        ] {
            let n: NetworkSpec = serde_json::from_str(bad).unwrap();
            assert!(n.validate(dir).unwrap_err().contains(why), "{bad}");
        }
        assert!(
            serde_json::from_str::<NetworkSpec>(r#"{"name":"lan","uplink_rate":null}"#).is_err()
        );
        use service::Wants;
        let s = NetShares {
            shares: Some(4),
            ..NetShares::default()
        };
        let w = Wanted {
            networks: vec![lan.clone(), plain],
            ports: vec![("lan".into(), "7-net0".into())],
            shares: vec![("lan".into(), "7-net0".into(), s)],
        };
        assert_eq!(
            w.replay(),
            [
                "port set lan/uplink:tap0 rate=100000000".to_string(),
                s.request("lan", "7-net0")
            ],
            "a restarted switch gets the uplink's rate back"
        );
    }

    #[test]
    fn net_shares_are_checked_sent_whole_and_replayed_for_wanted_ports() {
        let s = NetShares {
            shares: Some(4),
            reservation: None,
            limit: Some(15_000_000),
        };
        assert_eq!(s.validate(), Ok(()));
        assert!(s.any() && !NetShares::default().any());
        assert_eq!(
            s.request("lan", "7-net0"),
            "port set lan/7-net0 shares=4 reservation=0 limit=15000000"
        );
        assert_eq!(
            NetShares::default().request("lan", "7-net0"),
            "port set lan/7-net0 shares=1000 reservation=0 limit=0",
            "back to the defaults"
        );
        let bad = NetShares {
            shares: Some(0),
            ..s
        };
        assert!(bad.validate().unwrap_err().contains("net_shares 0"));
        let bad = NetShares {
            reservation: Some(20_000_000),
            ..s
        };
        assert!(bad.validate().unwrap_err().contains("above the net_limit"));
        use service::Wants;
        let w = Wanted {
            networks: Vec::new(),
            ports: vec![("lan".into(), "7-net0".into())],
            shares: vec![
                ("lan".into(), "7-net0".into(), s),
                ("lan".into(), "8-net0".into(), s),
            ],
        };
        assert_eq!(w.replay(), [s.request("lan", "7-net0")]);
    }
}
