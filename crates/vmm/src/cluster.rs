//! Cluster mode (issue 14): one VM whose guest RAM is kept coherent by DSM nodes (crate
//! `wv-dsm`) in several processes. This module owns the typed cluster spec (the TOML file of
//! `wv run --cluster`, shared by the command line and the VMM), the set-up step by which node 0
//! hands every other node its part, the memory node (`wv node`), and node 0's side: the hook
//! through which the VMM's one build path hands its RAM to a DSM node before anything is
//! written to it, and the supervisor that stops the VM when a node is lost. docs/CLUSTER.md.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use wv_machine::GuestRam;

use crate::config::{format_size, parse_size, ConfigError, MAX_VCPUS, MIN_MEMORY};
use crate::error::{VmmError, STATUS_INTERNAL};

/// Most nodes a cluster may have (the DSM protocol's limit).
pub const MAX_NODES: usize = 64;
/// The largest guest memory of a cluster for now: the DSM keeps one contiguous range, and RAM
/// above this would be split around the PCI hole.
pub const MAX_CLUSTER_MEMORY: u64 = wv_machine::layout::MMIO_HOLE_START;
/// The set-up step's version (the first field of [`Setup`]).
pub const SETUP_VERSION: u32 = 2;
/// The longest line either side of the set-up connection sends.
const MAX_LINE: u64 = 64 * 1024;
/// How long node 0 waits for a node's answer during set-up and at the end.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster as its spec file describes it, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The VM's vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Every page held on two nodes (issue 14 item 5; not available yet).
    pub mirror: bool,
    /// The nodes, node 0 first (node 0 is the `wv run` process and boots the guest).
    pub nodes: Vec<NodeSpec>,
}

/// One `[[node]]` of a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Where the node listens (port 0: any free port, for a node `wv run` starts).
    pub listen: SocketAddr,
    /// The vCPUs it runs (none: a memory node).
    pub vcpus: Vec<u32>,
    /// Started elsewhere with `wv node --listen ADDR` (not by `wv run`), reached at `listen`.
    pub remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    vcpus: u32,
    memory: RawSize,
    #[serde(default)]
    mirror: bool,
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    listen: String,
    #[serde(default)]
    vcpus: Vec<u32>,
    #[serde(default)]
    remote: bool,
}

fn err(m: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("cluster: {m}"))
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    s.to_socket_addrs().ok()?.next()
}

impl ClusterSpec {
    /// Parses and checks a spec (TOML).
    pub fn parse(text: &str) -> Result<ClusterSpec, ConfigError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            err(e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "))
        })?;
        if raw.vcpus == 0 || raw.vcpus > MAX_VCPUS {
            return Err(err(format!(
                "vcpus = {} is out of range: 1 to {MAX_VCPUS}",
                raw.vcpus
            )));
        }
        let memory = match raw.memory {
            RawSize::Bytes(b) => b,
            RawSize::Text(t) => parse_size(&t).map_err(|e| err(format!("memory: {}", e.0)))?,
        };
        if memory < MIN_MEMORY || !memory.is_multiple_of(4096) {
            return Err(err(format!(
                "memory = {memory} bytes: it must be at least {} and a multiple of 4K",
                format_size(MIN_MEMORY)
            )));
        }
        if memory > MAX_CLUSTER_MEMORY {
            return Err(err(format!(
                "memory = {}: a cluster's memory is at most {} for now (one range below the PCI hole)",
                format_size(memory),
                format_size(MAX_CLUSTER_MEMORY)
            )));
        }
        if raw.node.is_empty() {
            return Err(err("no [[node]]: a cluster needs at least one node"));
        }
        if raw.node.len() > MAX_NODES {
            return Err(err(format!(
                "{} nodes: at most {MAX_NODES}",
                raw.node.len()
            )));
        }
        let mut on: Vec<Option<usize>> = vec![None; raw.vcpus as usize];
        let mut nodes = Vec::with_capacity(raw.node.len());
        for (i, n) in raw.node.into_iter().enumerate() {
            let listen = parse_addr(&n.listen).ok_or_else(|| {
                err(format!(
                    "node {i}: listen = '{}' is not an address (HOST:PORT, e.g. 127.0.0.1:0)",
                    n.listen.escape_debug()
                ))
            })?;
            if n.remote && i == 0 {
                return Err(err(
                    "node 0 is the wv run process itself: it cannot be remote",
                ));
            }
            if n.remote && listen.port() == 0 {
                return Err(err(format!(
                    "node {i}: a remote node's address needs its port (start it there with \
                     wv node --listen ADDR and name that address)"
                )));
            }
            for &v in &n.vcpus {
                let Some(slot) = on.get_mut(v as usize) else {
                    return Err(err(format!(
                        "node {i}: vCPU {v} is not one of the VM's {} vCPUs (0 to {})",
                        raw.vcpus,
                        raw.vcpus - 1
                    )));
                };
                if let Some(j) = slot {
                    return Err(err(format!(
                        "vCPU {v} is on node {j} and on node {i}: every vCPU runs on exactly one node"
                    )));
                }
                *slot = Some(i);
            }
            nodes.push(NodeSpec {
                listen,
                vcpus: n.vcpus,
                remote: n.remote,
            });
        }
        if let Some(v) = on.iter().position(Option::is_none) {
            return Err(err(format!(
                "vCPU {v} is on no node: every vCPU runs on exactly one node"
            )));
        }
        Ok(ClusterSpec {
            vcpus: raw.vcpus,
            memory,
            mirror: raw.mirror,
            nodes,
        })
    }

    /// Reads and parses a spec file.
    pub fn from_file(path: &Path) -> Result<ClusterSpec, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        ClusterSpec::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Refuses what a valid spec may ask for but this build cannot run yet.
    pub fn check_runnable(&self) -> Result<(), ConfigError> {
        if self.mirror && self.nodes.len() < 2 {
            return Err(err(
                "mirror = true needs at least two nodes (the copies are on another node)",
            ));
        }
        if let Some(i) = (1..self.nodes.len()).find(|&i| self.nodes[i].vcpus.contains(&0)) {
            return Err(err(format!(
                "vCPU 0 is on node {i}: the boot vCPU runs on node 0, which boots the guest"
            )));
        }
        Ok(())
    }

    /// Whether a node other than 0 runs vCPUs (the VM then needs `--irqchip user`).
    pub fn spans(&self) -> bool {
        self.nodes.iter().skip(1).any(|n| !n.vcpus.is_empty())
    }

    /// The node of each vCPU (= APIC ID).
    pub fn owners(&self) -> Vec<u32> {
        let mut o = vec![0u32; self.vcpus as usize];
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.vcpus {
                if let Some(x) = o.get_mut(v as usize) {
                    *x = u32::try_from(i).unwrap_or(0);
                }
            }
        }
        o
    }
}

/// Refuses a VM configuration that cluster mode cannot keep coherent: vCPUs and memory other
/// than the spec's; a balloon (it drops guest pages behind the DSM's back, and the engine would
/// then fault on its own region); shared RAM (`--memory-shared`, vhost-user devices: another
/// process would read and write the memfd without going through the protocol).
pub fn check_config(cfg: &crate::VmConfig, spec: &ClusterSpec) -> Result<(), ConfigError> {
    if cfg.vcpus != spec.vcpus || cfg.memory != spec.memory {
        return Err(err(format!(
            "the VM has {} vCPUs and {} of memory, its spec {} and {}",
            cfg.vcpus,
            format_size(cfg.memory),
            spec.vcpus,
            format_size(spec.memory)
        )));
    }
    if spec.spans() && cfg.irqchip == crate::config::IrqChip::Kernel {
        return Err(err(
            "vCPUs on nodes other than 0 need the userspace interrupt controllers: \
             --irqchip kernel cannot be used with this spec (wv run --cluster picks user)",
        ));
    }
    if cfg.balloon {
        return Err(err(
            "a balloon is not available in a cluster yet (it drops guest pages behind the DSM)",
        ));
    }
    if cfg.memory_is_shared() {
        return Err(err(
            "shared guest memory (--memory-shared, vhost-user devices) is not available in a \
             cluster yet (another process would bypass the DSM)",
        ));
    }
    Ok(())
}

/// What node 0 tells a node in the set-up step (one JSON line on the set-up connection).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// [`SETUP_VERSION`].
    pub version: u32,
    /// The node's id.
    pub node: u32,
    /// Every node's DSM address, by id (the node's own included).
    pub peers: Vec<SocketAddr>,
    /// The vCPUs it runs (APIC IDs; empty: a memory node).
    pub vcpus: Vec<u32>,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The VM's vCPUs (all nodes'). Defaulted so that a line of another version is refused
    /// for its version, not for a field.
    #[serde(default)]
    pub cpus: u32,
    /// Node 0's link address (`crate::split`), where a node with vCPUs connects once joined.
    #[serde(default)]
    pub link: Option<SocketAddr>,
    /// Node 0's host TSC at set-up: every node's vCPUs start their TSC at the host's minus this
    /// (one TSC for the guest when the nodes share a host; across hosts, not synchronised).
    #[serde(default)]
    pub tsc_base: u64,
    /// Mirroring (the spec's `mirror`): every node's DSM must agree.
    #[serde(default)]
    pub mirror: bool,
}

impl Setup {
    fn check(&self) -> Result<(), String> {
        if self.version != SETUP_VERSION {
            return Err(format!(
                "set-up version {} (this node speaks {SETUP_VERSION})",
                self.version
            ));
        }
        if self.peers.len() < 2 || self.peers.len() > MAX_NODES {
            return Err(format!(
                "a cluster of {} nodes (2 to {MAX_NODES})",
                self.peers.len()
            ));
        }
        if self.node == 0 || self.node as usize >= self.peers.len() {
            return Err(format!(
                "node id {} (1 to {} in this cluster)",
                self.node,
                self.peers.len() - 1
            ));
        }
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(format!("a VM of {} vCPUs (1 to {MAX_VCPUS})", self.cpus));
        }
        let mut seen = vec![false; self.cpus as usize];
        for &v in &self.vcpus {
            match seen.get_mut(v as usize) {
                Some(_) if v == 0 => return Err("vCPU 0 (it runs on node 0)".into()),
                Some(s) if !*s => *s = true,
                Some(_) => return Err(format!("vCPU {v} twice")),
                None => return Err(format!("vCPU {v} of a VM of {} vCPUs", self.cpus)),
            }
        }
        if !self.vcpus.is_empty() && self.link.is_none() {
            return Err("vCPUs but no link address".into());
        }
        if self.memory < MIN_MEMORY
            || !self.memory.is_multiple_of(4096)
            || self.memory > MAX_CLUSTER_MEMORY
        {
            return Err(format!("guest memory of {} bytes", self.memory));
        }
        Ok(())
    }
}

/// The DSM region of guest RAM: its one mapping.
fn dsm_region(mem: &GuestRam) -> Result<wv_dsm::Region, String> {
    let mut it = mem.iter();
    let (Some(r), None) = (it.next(), it.next()) else {
        return Err("guest RAM of a cluster must be one range".into());
    };
    let len = usize::try_from(r.len()).map_err(|e| e.to_string())?;
    let backing = if wv_machine::is_shared(mem) {
        wv_dsm::Backing::Shared
    } else {
        wv_dsm::Backing::Anonymous
    };
    // SAFETY: the region is guest RAM's whole mapping (read-write, page-aligned, of that
    // backing); every caller keeps the RAM mapped until the node is dropped (node 0: the
    // supervisor holds a reference to the RAM and drops it after the node; a memory node:
    // `MemoryNode` drops the node before the RAM), and nothing remaps it meanwhile.
    Ok(unsafe { wv_dsm::Region::from_raw(r.as_ptr(), len, backing) })
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut s = String::new();
    let n = r.take(MAX_LINE).read_line(&mut s)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if !s.ends_with('\n') {
        return Err(io::Error::other("line too long or cut"));
    }
    Ok(s.trim_end().to_string())
}

fn stats_json(s: &wv_dsm::StatsSnapshot) -> String {
    serde_json::json!({
        "read_faults": s.read_faults,
        "write_faults": s.write_faults,
        "pages_sent": s.pages_sent,
        "pages_received": s.pages_received,
        "unchanged_sent": s.unchanged_sent,
        "unchanged_received": s.unchanged_received,
        "invalidations": s.invalidations,
        "messages_sent": s.messages_sent,
        "messages_received": s.messages_received,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "failed_faults": s.failed_faults,
        "peers_lost": s.peers_lost,
        "mirror_sent": s.mirror_sent,
        "mirror_received": s.mirror_received,
        "mirror_pushes": s.mirror_pushes,
        "pages_rehomed": s.pages_rehomed,
        "recoveries": s.recoveries,
    })
    .to_string()
}

fn stats_words(json: &str) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
        Ok(m) => m
            .iter()
            .map(|(k, v)| format!("{}={v}", k.escape_debug()))
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => format!("unreadable counters {:?}", json.escape_debug().to_string()),
    }
}

// ---- A memory node (`wv node`) ----

/// A memory node's VM: its KVM VM with guest RAM registered, kept coherent by its DSM node.
struct MemoryNode {
    node: Option<Arc<wv_dsm::Node>>,
    _vm: kvm_ioctls::VmFd,
    _mem: GuestRam,
}

impl Drop for MemoryNode {
    fn drop(&mut self) {
        // The DSM node (its engine) goes before the RAM it works on.
        drop(self.node.take());
    }
}

/// `wv node --listen ADDR`: binds `listen`, prints `wv node: listening on ADDR` on stdout
/// (the address bound, port 0 resolved), takes its part from node 0 on the first connection
/// (the set-up step, docs/CLUSTER.md), joins the DSM as a memory node and serves until node
/// 0 says stop (`Ok`) or the cluster is lost (an error naming the node lost).
pub fn serve_node(listen: &str) -> Result<(), String> {
    let l = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let me = l.local_addr().map_err(|e| e.to_string())?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "wv node: listening on {me}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }
    let (ctl, from) = l.accept().map_err(|e| format!("accept: {e}"))?;
    ctl.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut w = ctl.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(ctl);
    let setup = read_line(&mut r)
        .map_err(|e| format!("set-up from {from}: {e}"))
        .and_then(|line| {
            serde_json::from_str::<Setup>(&line)
                .map_err(|e| format!("set-up from {from}: not a set-up line: {e}"))
        })
        .and_then(|s| {
            s.check()
                .map(|()| s)
                .map_err(|e| format!("set-up from {from}: {e}"))
        });
    let setup = match setup {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(w, "error: {e}");
            return Err(e);
        }
    };
    let id = setup.node;
    #[allow(clippy::type_complexity)]
    let built =
        (|| -> Result<(kvm_ioctls::Kvm, kvm_ioctls::VmFd, GuestRam, wv_dsm::Region), String> {
            let kvm = wv_hypervisor::open().map_err(|e| e.to_string())?;
            let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
            let mem = wv_machine::create_ram(setup.memory).map_err(|e| e.to_string())?;
            let region = dsm_region(&mem)?;
            Ok((kvm, vm, mem, region))
        })();
    let (kvm, vm, mem, region) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(w, "error: {e}");
            return Err(e);
        }
    };
    writeln!(w, "ok").map_err(|e| format!("set-up connection: {e}"))?;
    let peers = setup.peers.clone();
    let joined = wv_dsm::Node::join(
        wv_dsm::Listener::from(l),
        wv_dsm::Config::new(id, peers.clone()).with_mirror(setup.mirror),
        region,
    )
    .map_err(|e| format!("node {id}: joining the cluster: {e}"))
    .and_then(|n| {
        crate::register_memory(&vm, &mem)
            .map(|()| n)
            .map_err(|e| format!("node {id}: {e}"))
    });
    let node = match joined {
        Ok(n) => Arc::new(n),
        Err(e) => {
            let _ = writeln!(w, "error: {e}");
            return Err(e);
        }
    };
    let cpus = if setup.vcpus.is_empty() {
        None
    } else {
        match crate::split::start_node_cpus(&setup, &kvm, &vm, &mem) {
            Ok(c) => Some(c),
            Err(e) => {
                let e = format!("node {id}: {e}");
                let _ = writeln!(w, "error: {e}");
                return Err(e);
            }
        }
    };
    let held = MemoryNode {
        node: Some(node.clone()),
        _vm: vm,
        _mem: mem,
    };
    writeln!(w, "joined").map_err(|e| format!("set-up connection: {e}"))?;
    let joined = match &cpus {
        None => format!(
            "wv node {id}: joined a cluster of {} nodes as a memory node ({} of guest RAM)\n",
            peers.len(),
            format_size(setup.memory)
        ),
        Some(_) => format!(
            "wv node {id}: joined a cluster of {} nodes running vCPUs {:?} ({} of guest RAM)\n",
            peers.len(),
            setup.vcpus,
            format_size(setup.memory)
        ),
    };
    // One write: the nodes of one host share node 0's stderr, and a line written in pieces
    // would interleave with theirs.
    let _ = io::stderr().write_all(joined.as_bytes());
    let stopping = Arc::new(AtomicBool::new(false));
    let mirror = setup.mirror;
    let watch = {
        let (node, stopping, peers) = (node.clone(), stopping.clone(), peers.clone());
        std::thread::Builder::new()
            .name("wv-node-watch".into())
            .spawn(move || {
                let mut seen = 0;
                loop {
                    let new = node.wait_errors(seen, Duration::from_millis(100));
                    seen += new.len();
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    for e in new {
                        let addr = peers.get(e.peer as usize);
                        let at = addr.map_or_else(String::new, |a| format!(" at {a}"));
                        let why = reason(&e, addr);
                        if e.peer == 0 || e.peer == id || (mirror && node.failed().is_some()) {
                            let why = match node.failed() {
                                Some(f) if mirror => f.to_string(),
                                _ => why.to_string(),
                            };
                            eprintln!(
                                "wv: error: node {id}: lost node {}{at}: {why}; exiting",
                                e.peer
                            );
                            // SAFETY: ends the process at once; nothing needs unwinding.
                            unsafe { libc::_exit(1) };
                        }
                        if mirror {
                            // Its pages are re-homed from their mirrors; if it ran vCPUs,
                            // node 0 stops the VM (this node's set-up connection then closes).
                            eprintln!(
                                "wv: node {id}: lost node {}{at}: {why}; recovering its pages from their mirrors",
                                e.peer
                            );
                            continue;
                        }
                        // Another memory node: node 0 sees it too and stops the VM, which
                        // ends this node (its set-up connection closes); staying until then
                        // lets node 0 name the node that was lost rather than this one.
                        eprintln!(
                            "wv: node {id}: lost node {}{at}: {why}; waiting for node 0 to stop the VM",
                            e.peer
                        );
                        return;
                    }
                    if mirror {
                        if let Some(f) = node.failed() {
                            eprintln!("wv: error: node {id}: {f}; exiting");
                            // SAFETY: ends the process at once; nothing needs unwinding.
                            unsafe { libc::_exit(1) };
                        }
                    }
                }
            })
            .map_err(|e| format!("starting the watch thread: {e}"))?
    };
    drop(node);
    let _ = r.get_ref().set_read_timeout(None);
    let res = loop {
        let cmd = match read_line(&mut r) {
            Ok(c) => c,
            Err(_) if stopping.load(Ordering::Acquire) => break Ok(()),
            Err(e) => {
                break Err(format!(
                    "node {id}: node 0 is gone (set-up connection: {e})"
                ))
            }
        };
        let answer = match cmd.as_str() {
            "stats" => held
                .node
                .as_ref()
                .map_or_else(|| "{}".into(), |n| stats_json(&n.stats())),
            "stop" => {
                stopping.store(true, Ordering::Release);
                if let Some(c) = &cpus {
                    c.stop();
                }
                "bye".into()
            }
            other => format!("error: unknown command '{}'", other.escape_debug()),
        };
        if let Err(e) = writeln!(w, "{answer}") {
            if stopping.load(Ordering::Acquire) {
                break Ok(());
            }
            break Err(format!(
                "node {id}: node 0 is gone (set-up connection: {e})"
            ));
        }
    };
    if res.is_ok() {
        let _ = watch.join();
    }
    if let Some(c) = cpus {
        c.stop();
        c.join();
    }
    drop(held);
    res
}

// ---- Node 0 (`wv run --cluster`) ----

/// A node's set-up connection, as node 0 holds it.
struct Peer {
    id: u32,
    addr: SocketAddr,
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Peer {
    fn ask(&mut self, what: &str) -> Result<String, String> {
        writeln!(self.w, "{what}")
            .and_then(|()| read_line(&mut self.r))
            .map_err(|e| format!("node {} at {}: {e}", self.id, self.addr))
    }
}

/// Node 0's listener, the set-up connections and the nodes started, until RAM is handed over.
type Pending = (wv_dsm::Listener, Vec<Peer>, Vec<Child>);

/// What the supervisor owns once the cluster is up.
struct Running {
    node: wv_dsm::Node,
    /// Guest RAM, held so that it stays mapped until the node (its engine) is dropped, however
    /// the VM's build or run ends.
    ram: GuestRam,
    peers: Vec<Peer>,
    children: Vec<Child>,
    hub: Option<Arc<crate::split::Hub>>,
}

/// Node 0 of a cluster: the nodes started and told their part; then (through
/// [`Cluster::ram_hook`]) guest RAM kept coherent with them, a supervisor that stops the VM
/// when a node is lost, and at the end ([`Cluster::finish`]) every node's counters and stop.
pub struct Cluster {
    spec: ClusterSpec,
    addrs: Vec<SocketAddr>,
    /// The process of each node started here, by id (node 0: this one; remote ones: none).
    pids: Vec<Option<u32>>,
    pending: Mutex<Option<Pending>>,
    end: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    /// Where nodes with vCPUs connect their link (`crate::split`), until they have.
    link: Mutex<Option<TcpListener>>,
    /// Node 0's side of the links, once every node with vCPUs connected.
    hub: std::sync::OnceLock<Arc<crate::split::Hub>>,
    /// The host TSC every node's vCPUs count their TSC from (see [`Setup::tsc_base`]).
    tsc_base: u64,
}

fn cluster_err(m: impl std::fmt::Display) -> VmmError {
    VmmError::Internal(format!("cluster: {m}"))
}

/// Ends the node processes started here (by their handles) and reaps them.
fn kill_all(children: &mut Vec<Child>) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

/// Time a node started here has to say which address it bound.
const NODE_START: Duration = Duration::from_secs(10);

/// Starts `wv node --listen ADDR` (`wv` is this program) and reads the address it bound,
/// waiting `within` at most.
fn start_node(
    wv: &Path,
    id: usize,
    listen: SocketAddr,
    within: Duration,
) -> Result<(Child, SocketAddr), VmmError> {
    let mut c = Command::new(wv);
    c.arg("node")
        .arg("--listen")
        .arg(listen.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            // The node goes when this thread (node 0's main thread) goes, however it ends.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = c
        .spawn()
        .map_err(|e| cluster_err(format!("starting node {id} ({}): {e}", wv.display())))?;
    // Its first line, read on a thread of its own so that a node that never prints (stuck
    // before binding, or a `wv` that is not one) costs NODE_START at most: killing it then
    // closes the pipe and ends the read.
    let (tx, rx) = std::sync::mpsc::channel();
    match child.stdout.take() {
        Some(o) => {
            std::thread::spawn(move || {
                let _ = tx.send(read_line(&mut BufReader::new(o)));
            });
        }
        None => {
            let _ = tx.send(Err(io::Error::other("no stdout")));
        }
    }
    let line = rx.recv_timeout(within).unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing within {within:?}"),
        ))
    });
    let addr = line.as_ref().ok().and_then(|l| {
        l.strip_prefix("wv node: listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
    });
    match addr {
        Some(a) => Ok((child, a)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(cluster_err(format!(
                "node {id} (wv node --listen {listen}) did not report its address ({}); a node \
                 on another host is started there and marked remote = true",
                match line {
                    Ok(l) => format!("it said {:?}", l),
                    Err(e) => e.to_string(),
                }
            )))
        }
    }
}

impl Cluster {
    /// Binds node 0's DSM address, starts every node that is not remote on this host (as
    /// `wv` = this program's path, `wv node`), and hands each node its part. The VM then
    /// runs with [`Cluster::ram_hook`] (`crate::run_clustered`).
    pub fn start(spec: &ClusterSpec, wv: &Path) -> Result<Cluster, VmmError> {
        spec.check_runnable().map_err(VmmError::Config)?;
        let listener = TcpListener::bind(spec.nodes[0].listen).map_err(|e| {
            cluster_err(format!(
                "node 0 cannot listen on {}: {e}",
                spec.nodes[0].listen
            ))
        })?;
        let mut addrs = vec![listener.local_addr().map_err(cluster_err)?];
        let link =
            if spec.spans() {
                let at = SocketAddr::new(addrs[0].ip(), 0);
                Some(TcpListener::bind(at).map_err(|e| {
                    cluster_err(format!("node 0 cannot listen for links on {at}: {e}"))
                })?)
            } else {
                None
            };
        let link_addr = match &link {
            Some(l) => Some(l.local_addr().map_err(cluster_err)?),
            None => None,
        };
        let mut children = Vec::new();
        let mut pids = vec![Some(std::process::id())];
        let tsc_base = crate::split::host_tsc();
        let fail = |children: &mut Vec<Child>, e: VmmError| {
            kill_all(children);
            e
        };
        for (i, n) in spec.nodes.iter().enumerate().skip(1) {
            if n.remote {
                addrs.push(n.listen);
                pids.push(None);
                continue;
            }
            match start_node(wv, i, n.listen, NODE_START) {
                Ok((c, a)) => {
                    pids.push(Some(c.id()));
                    children.push(c);
                    addrs.push(a);
                }
                Err(e) => return Err(fail(&mut children, e)),
            }
        }
        // Set-up in node order: a node's set-up connection is accepted before any higher node,
        // told its part after it, connects to it for the DSM.
        let mut peers = Vec::new();
        for (i, &addr) in addrs.iter().enumerate().skip(1) {
            let id = u32::try_from(i).map_err(cluster_err)?;
            let setup = Setup {
                version: SETUP_VERSION,
                node: id,
                peers: addrs.clone(),
                vcpus: spec.nodes[i].vcpus.clone(),
                memory: spec.memory,
                cpus: spec.vcpus,
                link: link_addr,
                tsc_base,
                mirror: spec.mirror,
            };
            let connected = (|| -> Result<Peer, String> {
                let s = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT)
                    .map_err(|e| format!("cannot reach node {i} at {addr}: {e}"))?;
                s.set_read_timeout(Some(ANSWER_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                let mut p = Peer { id, addr, w: s, r };
                let json = serde_json::to_string(&setup).map_err(|e| e.to_string())?;
                match p.ask(&json)?.as_str() {
                    "ok" => Ok(p),
                    a => Err(format!(
                        "node {i} at {addr} refused its part: {}",
                        a.strip_prefix("error: ").unwrap_or(a).escape_debug()
                    )),
                }
            })();
            match connected {
                Ok(p) => peers.push(p),
                Err(e) => return Err(fail(&mut children, cluster_err(e))),
            }
        }
        Ok(Cluster {
            spec: spec.clone(),
            addrs,
            pids,
            pending: Mutex::new(Some((wv_dsm::Listener::from(listener), peers, children))),
            end: Mutex::new(None),
            link: Mutex::new(link),
            hub: std::sync::OnceLock::new(),
            tsc_base,
        })
    }

    /// The spec this cluster runs.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Every node's DSM address, by id.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Node 0's side of the links to the nodes with vCPUs (none: every vCPU is on node 0).
    pub fn hub(&self) -> Option<&Arc<crate::split::Hub>> {
        self.hub.get()
    }

    /// Node 0's new vCPU `fd`: with vCPUs on other nodes, its TSC counts from the cluster's
    /// base, as theirs do.
    pub(crate) fn configure_vcpu(&self, fd: &kvm_ioctls::VcpuFd) -> Result<(), VmmError> {
        if self.hub.get().is_some() {
            crate::split::sync_tsc(fd, self.tsc_base).map_err(cluster_err)?;
        }
        Ok(())
    }

    /// Starts serving the other nodes' interrupts and device accesses against the VM built.
    pub(crate) fn serve(&self, shared: &Arc<crate::VmShared>) -> Result<(), VmmError> {
        match self.hub.get() {
            Some(h) => h.serve(shared).map_err(cluster_err),
            None => Ok(()),
        }
    }

    /// The VMM's hook (`crate::run_clustered`): joins the DSM with guest RAM before anything
    /// is written to it (joining drops every page; the kernel and boot data are loaded after,
    /// through the protocol), waits until every node has joined, and starts the supervisor.
    pub fn ram_hook(&self, mem: &GuestRam) -> Result<(), VmmError> {
        // The threads started from here (the DSM engine, the supervisor, the links) must not
        // take SIGINT, SIGTERM or SIGHUP: the VMM's control thread reads them to stop the VM in
        // order, and a thread that took one would end the process at once.
        crate::block_signals(&crate::STOP_SIGNALS);
        let (listener, mut peers, mut children) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| cluster_err("guest RAM handed over twice"))?;
        let joined = (|| {
            let region = dsm_region(mem).map_err(cluster_err)?;
            let node = wv_dsm::Node::join(
                listener,
                wv_dsm::Config::new(0, self.addrs.clone()).with_mirror(self.spec.mirror),
                region,
            )
            .map_err(|e| cluster_err(format!("node 0 joining the cluster: {e}")))?;
            for p in &mut peers {
                match read_line(&mut p.r) {
                    Ok(l) if l == "joined" => {}
                    Ok(l) => {
                        return Err(cluster_err(format!(
                            "node {} at {}: {}",
                            p.id,
                            p.addr,
                            l.strip_prefix("error: ").unwrap_or(&l).escape_debug()
                        )))
                    }
                    Err(e) => return Err(cluster_err(format!("node {} at {}: {e}", p.id, p.addr))),
                }
            }
            if let Some(l) = self.link.lock().unwrap_or_else(|p| p.into_inner()).take() {
                // Every node with vCPUs connected its link before it answered `joined`.
                let nodes: Vec<u32> = (1..self.spec.nodes.len())
                    .filter(|&i| !self.spec.nodes[i].vcpus.is_empty())
                    .filter_map(|i| u32::try_from(i).ok())
                    .collect();
                let hub = crate::split::Hub::accept(
                    &l,
                    self.spec.owners(),
                    &nodes,
                    self.spec.nodes.len(),
                )
                .map_err(cluster_err)?;
                let _ = self.hub.set(Arc::new(hub));
            }
            Ok(node)
        })();
        let node = match joined {
            Ok(n) => n,
            Err(e) => {
                kill_all(&mut children);
                return Err(e);
            }
        };
        let role = |i: usize| match self.spec.nodes.get(i).map(|n| n.vcpus.as_slice()) {
            Some([]) | None => "memory node".to_string(),
            Some(v) => format!("vCPUs {v:?}"),
        };
        let mut line = format!(
            "wv: cluster of {} nodes: node 0 at {} (pid {}) runs {}",
            self.addrs.len(),
            self.addrs[0],
            std::process::id(),
            if self.spec.spans() {
                role(0)
            } else {
                "the vCPUs".into()
            }
        );
        for (i, a) in self.addrs.iter().enumerate().skip(1) {
            match self.pids.get(i).copied().flatten() {
                Some(pid) => line.push_str(&format!("; node {i} at {a} ({}, pid {pid})", role(i))),
                None => line.push_str(&format!("; node {i} at {a} ({}, remote)", role(i))),
            }
        }
        line.push('\n');
        // One write (the nodes started here write to the same stderr).
        let _ = io::stderr().write_all(line.as_bytes());
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let running = Running {
            node,
            ram: mem.clone(),
            peers,
            children,
            hub: self.hub.get().cloned(),
        };
        let addrs = self.addrs.clone();
        // With mirroring, the nodes whose loss the VM survives: memory nodes.
        let recoverable: Vec<bool> = self
            .spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| self.spec.mirror && i != 0 && n.vcpus.is_empty())
            .collect();
        std::thread::Builder::new()
            .name("wv-cluster".into())
            .spawn(move || supervise(running, &addrs, &recoverable, &end_rx, &done_tx))
            .map_err(|e| cluster_err(format!("starting the supervisor: {e}")))?;
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = Some((end_tx, done_rx));
        Ok(())
    }

    /// After the VM ended (its vCPUs stopped): prints every node's DSM counters on stderr,
    /// stops the other nodes and node 0's DSM engine. Call before the VM's resources go.
    pub fn finish(&self) {
        if let Some((tx, rx)) = self.end.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if tx.send(()).is_ok() {
                let _ = rx.recv_timeout(ANSWER_TIMEOUT * 2);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.finish();
        // Nodes started but never handed over (the VM was not built): stop them.
        if let Some((_, _, mut children)) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            kill_all(&mut children);
        }
    }
}

/// What went wrong with the peer of `e`, without the address its message starts with when it
/// is `addr` (the messages here name the node and its address already).
fn reason<'a>(e: &'a wv_dsm::PeerError, addr: Option<&SocketAddr>) -> &'a str {
    addr.and_then(|a| e.message.strip_prefix(&format!("{a}: ")))
        .unwrap_or(&e.message)
}

/// Node 0's supervisor thread: until the VM ends, a lost node (a DSM connection closed)
/// ends the process within 100 ms with an error naming the node, unless mirroring recovers
/// from it (a memory node: `recoverable`, by node id); at the end, the counters and the stop.
fn supervise(
    mut run: Running,
    addrs: &[SocketAddr],
    recoverable: &[bool],
    end: &mpsc::Receiver<()>,
    done: &mpsc::Sender<()>,
) {
    let mut seen = 0;
    'watch: loop {
        let new = run.node.wait_errors(seen, Duration::from_millis(50));
        seen += new.len();
        // With mirroring, the loss of a memory node is recovered from (its pages re-homed
        // from their mirrors) unless the DSM could not (then it failed, with why).
        let fatal = run.node.failed();
        let stop = new
            .iter()
            .find(|e| !recoverable.get(e.peer as usize).copied().unwrap_or(false));
        for e in new
            .iter()
            .filter(|e| recoverable.get(e.peer as usize).copied().unwrap_or(false))
        {
            let addr = addrs.get(e.peer as usize);
            let at = addr.map_or_else(String::new, |a| format!(" at {a}"));
            eprintln!(
                "wv: cluster memory node {}{at} was lost ({}); its pages are recovered from their mirrors and the VM continues",
                e.peer,
                reason(e, addr)
            );
        }
        let stop = match (stop, &fatal) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(f)) if !new.is_empty() || recoverable.iter().any(|&r| r) => Some(f.clone()),
            _ => None,
        };
        if let Some(e) = stop {
            if end.try_recv().is_err() {
                let addr = addrs.get(e.peer as usize);
                let at = addr.map_or_else(String::new, |a| format!(" at {a}"));
                let why = match &fatal {
                    Some(f) if f.peer == e.peer && f.message != e.message => {
                        format!("{}; {}", reason(&e, addr), reason(f, addr))
                    }
                    _ => reason(&e, addr).to_string(),
                };
                eprintln!(
                    "wv: error: cluster node {}{at} was lost ({why}); the VM is stopped",
                    e.peer
                );
                // What must be released however the VMM ends (VMKFS disks' owner records), on
                // a thread of its own and for a bounded time: a device may hold a disk while
                // it waits for a page the lost node had.
                let (tx, rx) = mpsc::channel();
                if std::thread::Builder::new()
                    .name("wv-exit-hooks".into())
                    .spawn(move || {
                        crate::run_exit_hooks();
                        let _ = tx.send(());
                    })
                    .is_ok()
                {
                    let _ = rx.recv_timeout(Duration::from_millis(300));
                }
                // SAFETY: ends the process at once: vCPUs may be waiting for pages only the
                // lost node could give, so there is no orderly way out of the guest.
                unsafe { libc::_exit(i32::from(STATUS_INTERNAL)) };
            }
            break 'watch;
        }
        match end.try_recv() {
            Ok(()) | Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {}
        }
    }
    if let Some(h) = &run.hub {
        h.stop_all();
        let (sent, received) = h.irq_messages();
        eprintln!(
            "wv: cluster: {} interrupt messages between nodes (node 0 sent {sent}, received \
             {received}); {} device accesses forwarded to node 0",
            sent + received,
            h.forwarded_exits()
        );
    }
    eprintln!(
        "wv: cluster node 0 at {}: {}",
        addrs[0],
        stats_words(&stats_json(&run.node.stats()))
    );
    for p in &mut run.peers {
        match p.ask("stats") {
            Ok(s) => eprintln!(
                "wv: cluster node {} at {}: {}",
                p.id,
                p.addr,
                stats_words(&s)
            ),
            Err(e) => eprintln!("wv: cluster: no counters from {e}"),
        }
    }
    for p in &mut run.peers {
        if let Err(e) = p.ask("stop") {
            eprintln!("wv: cluster: stopping {e}");
        }
    }
    drop(std::mem::take(&mut run.peers));
    drop(run.node);
    drop(run.ram);
    let deadline = Instant::now() + Duration::from_secs(5);
    for c in &mut run.children {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    let _ = done.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"vcpus = 4
memory = "256M"
[[node]]
listen = "127.0.0.1:0"
vcpus = [0, 1]
[[node]]
listen = "127.0.0.1:0"
vcpus = [2, 3]
"#;

    #[test]
    fn the_issue_example_parses_and_runs_with_vcpus_on_both_nodes() {
        let s = ClusterSpec::parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(s.vcpus, 4);
        assert_eq!(s.memory, 256 << 20);
        assert!(!s.mirror);
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[1].vcpus, vec![2, 3]);
        assert_eq!(s.nodes[0].listen, "127.0.0.1:0".parse().unwrap());
        s.check_runnable().unwrap();
        assert!(s.spans());
        assert_eq!(s.owners(), vec![0, 0, 1, 1]);
        // vCPU 0 (the boot vCPU) stays on node 0.
        let moved = ClusterSpec::parse(
            &ISSUE_EXAMPLE
                .replace("[0, 1]", "[1]")
                .replace("[2, 3]", "[0, 2, 3]"),
        )
        .unwrap();
        let e = moved.check_runnable().unwrap_err().0;
        assert!(e.contains("vCPU 0 is on node 1"), "{e}");
        // The kernel's irqchip cannot deliver to other nodes.
        let mut cfg = crate::VmConfig {
            vcpus: 4,
            memory: 256 << 20,
            ..Default::default()
        };
        cfg.irqchip = crate::config::IrqChip::Kernel;
        let e = check_config(&cfg, &s).unwrap_err().0;
        assert!(e.contains("--irqchip kernel cannot be used"), "{e}");
        cfg.irqchip = crate::config::IrqChip::User;
        check_config(&cfg, &s).unwrap();
    }

    #[test]
    fn memory_nodes_run_and_mirror_parses() {
        let s = ClusterSpec::parse(
            "vcpus = 2\nmemory = 134217728\nmirror = true\n[[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = [0, 1]\n\
             [[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = []\n[[node]]\nlisten = \"10.0.0.2:7000\"\nremote = true\n",
        )
        .unwrap();
        assert_eq!(s.memory, 128 << 20);
        assert!(s.mirror && s.nodes[2].remote && s.nodes[2].vcpus.is_empty());
        s.check_runnable().unwrap();
        let s = ClusterSpec { mirror: false, ..s };
        s.check_runnable().unwrap();
        let one = ClusterSpec::parse(
            "vcpus = 1
memory = \"64M\"\nmirror = true\n[[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = [0]\n",
        )
        .unwrap();
        assert!(one
            .check_runnable()
            .unwrap_err()
            .0
            .contains("at least two nodes"));
    }

    #[test]
    fn bad_specs_are_refused_with_one_clear_line() {
        let node = |l: &str, v: &str| format!("[[node]]\nlisten = \"{l}\"\nvcpus = {v}\n");
        let cases: Vec<(String, &str)> = vec![
            ("vcpus = 2\nmemory = \"256M\"\n".into(), "at least one node"),
            (
                format!("vcpus = 2\nmemory = \"256M\"\n{}", node("127.0.0.1:0", "[0]")),
                "vCPU 1 is on no node",
            ),
            (
                format!(
                    "vcpus = 2\nmemory = \"256M\"\n{}{}",
                    node("127.0.0.1:0", "[0, 1]"),
                    node("127.0.0.1:0", "[1]")
                ),
                "vCPU 1 is on node 0 and on node 1",
            ),
            (
                format!("vcpus = 2\nmemory = \"256M\"\n{}", node("127.0.0.1:0", "[0, 2]")),
                "vCPU 2 is not one of the VM's 2 vCPUs",
            ),
            (
                format!("vcpus = 1\nmemory = \"lots\"\n{}", node("127.0.0.1:0", "[0]")),
                "memory: invalid size 'lots'",
            ),
            (
                format!("vcpus = 1\nmemory = \"8G\"\n{}", node("127.0.0.1:0", "[0]")),
                "at most 3G",
            ),
            (
                format!("vcpus = 1\nmemory = \"256M\"\n{}", node("nowhere", "[0]")),
                "listen = 'nowhere' is not an address",
            ),
            (
                format!("vcpus = 0\nmemory = \"256M\"\n{}", node("127.0.0.1:0", "[]")),
                "vcpus = 0 is out of range",
            ),
            (
                format!(
                    "vcpus = 1\nmemory = \"256M\"\n{}[[node]]\nlisten = \"127.0.0.1:0\"\nremote = true\n",
                    node("127.0.0.1:0", "[0]")
                ),
                "needs its port",
            ),
            (
                "vcpus = 1\nmemory = \"256M\"\ncolour = 3\n".into(),
                "unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            let e = ClusterSpec::parse(&text).unwrap_err().0;
            assert!(e.contains(want), "{text}\n=> {e}\n(wanted {want})");
            assert!(e.starts_with("cluster: ") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn setup_lines_are_checked() {
        let ok = Setup {
            version: SETUP_VERSION,
            node: 1,
            peers: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            vcpus: vec![],
            memory: 128 << 20,
            cpus: 2,
            link: None,
            tsc_base: 0,
            mirror: false,
        };
        ok.check().unwrap();
        let cpus = Setup {
            vcpus: vec![1],
            link: Some("127.0.0.1:3".parse().unwrap()),
            ..ok.clone()
        };
        cpus.check().unwrap();
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<Setup>(&line).unwrap(), ok);
        for bad in [
            Setup {
                node: 0,
                ..ok.clone()
            },
            Setup {
                node: 2,
                ..ok.clone()
            },
            Setup {
                version: 9,
                ..ok.clone()
            },
            Setup {
                memory: 4095,
                ..ok.clone()
            },
            Setup {
                memory: 8 << 30,
                ..ok.clone()
            },
            Setup {
                vcpus: vec![1],
                ..ok.clone()
            },
            Setup {
                vcpus: vec![0],
                ..cpus.clone()
            },
            Setup {
                vcpus: vec![2],
                ..cpus.clone()
            },
            Setup {
                vcpus: vec![1, 1],
                ..cpus.clone()
            },
            Setup {
                cpus: 0,
                ..ok.clone()
            },
            Setup {
                peers: vec![ok.peers[0]],
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Setup>("{\"version\":1}").is_err());
    }

    #[test]
    fn a_node_that_never_says_its_address_is_given_up_on_and_killed() {
        let dir = std::env::temp_dir().join(format!("wv-node-silent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("wv");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let t = Instant::now();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let e = start_node(&fake, 1, listen, Duration::from_millis(300))
            .expect_err("a silent node is an error");
        let e = e.to_string();
        assert!(
            e.contains("did not report its address") && e.contains("nothing within"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
