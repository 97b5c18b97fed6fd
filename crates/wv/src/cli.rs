//! The `wv` command line: the typed result every command runs from ([`Command`]), `wv run`'s
//! own small scanner and table of options, and the value parsers every command shares (sizes,
//! `--disk`/`--net` specs, definition files, paths made absolute).
//!
//! `wv run` is read here, by a hand-written, table-driven scanner; every other command is read
//! by clap (derive) in [`crate::commands`]. [`parse`] looks at the first word before any clap
//! type is built, so `wv run` never runs clap: it is the start-up path of every VM (the daemon
//! starts each VM's VMM as `wv run`), and clap parsing a command tree of `wv`'s size costs about
//! 0.15-0.2 ms per start (measured with `perf stat -r 300` on a release build; the `vmm` bench
//! before and after the change is in docs/PERFORMANCE.md), several percent of a few-millisecond
//! start. The other commands are not latency-critical.
//!
//! `wv run`'s rules are those of the clap commands: `--opt value` and `--opt=value`;
//! `-h`/`--help` prints its usage (generated from the same table the scanner reads, so the two
//! cannot disagree) to stdout; an option it does not take, a missing or unwanted value, or a
//! stray argument is a one-line [`Usage`] error (exit 200); `--` ends the options. The VM
//! options it shares with `wv vm create` are one struct, [`VmOpts`]: clap fills it for `wv vm
//! create`, the scanner for `wv run`, and both turn it into a [`VmConfig`] with the same code.

use crate::fs;
use std::path::{Path, PathBuf};
use wv_config::{parse_size, DiskConfig, KernelSource, NetConfig, SerialMode, VmConfig};
use wv_host::world::VmSpec;

/// A command line that cannot work: one line for the user, exit status 200.
#[derive(Debug, PartialEq)]
pub struct Usage(pub String);

/// What an option takes.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// Nothing: a flag.
    Flag,
    /// A value, as `--opt VALUE` or `--opt=VALUE` (the text is its name in the usage).
    Value(&'static str),
    /// An optional value, only as `--opt=VALUE` (`--stats[=table|json]`).
    Inline(&'static str),
}

/// One option of a command.
#[derive(Debug)]
pub struct Opt {
    /// `--name`.
    pub long: &'static str,
    /// A one-letter alias (`-o`), if any.
    pub short: Option<&'static str>,
    /// What it takes.
    pub arg: Arg,
    /// Its line(s) in the usage.
    pub help: &'static str,
}

const fn opt(long: &'static str, arg: Arg, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        arg,
        help,
    }
}

/// A command: its name, arguments, options and what it does; [`usage`] renders it.
#[derive(Debug)]
pub struct Spec {
    /// `wv vm create`.
    pub cmd: &'static str,
    /// Positional arguments, in order; `[NAME]` is optional.
    pub pos: &'static [&'static str],
    /// What it does (one paragraph).
    pub about: &'static str,
    /// Its options, in groups.
    pub opts: &'static [&'static [Opt]],
    /// Text after the options (exit statuses...).
    pub after: &'static str,
}

impl Spec {
    fn find(&self, name: &str) -> Option<&Opt> {
        self.opts
            .iter()
            .flat_map(|g| g.iter())
            .find(|o| o.long == name || o.short == Some(name))
    }
}

/// The options and arguments a command was given, checked against its [`Spec`].
#[derive(Debug, Default)]
pub struct Matches {
    given: Vec<(&'static str, Option<String>)>,
    /// Positional arguments.
    pub pos: Vec<String>,
}

impl Matches {
    /// Whether `--long` was given.
    pub fn has(&self, long: &str) -> bool {
        self.given.iter().any(|(n, _)| *n == long)
    }
    /// The last value of `--long`.
    pub fn value(&self, long: &str) -> Option<&str> {
        self.given
            .iter()
            .rev()
            .find(|(n, _)| *n == long)
            .and_then(|(_, v)| v.as_deref())
    }
    /// Every value of a repeatable `--long`, in order.
    pub fn values<'a>(&'a self, long: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.given
            .iter()
            .filter(move |(n, _)| *n == long)
            .filter_map(|(_, v)| v.as_deref())
    }
}

/// Reads `args` (what follows the command's name) by `spec`'s table; `None` when help was asked.
pub fn scan(spec: &Spec, args: &[String]) -> Result<Option<Matches>, Usage> {
    let mut m = Matches::default();
    let mut options_end = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        i += 1;
        if options_end || a == "-" || !a.starts_with('-') {
            m.pos.push(a.to_string());
            continue;
        }
        if a == "--" {
            options_end = true;
            continue;
        }
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (a, None),
        };
        let o = spec.find(name).ok_or_else(|| {
            Usage(format!(
                "unknown option '{name}' for '{}' (see {} --help)",
                spec.cmd, spec.cmd
            ))
        })?;
        let value = match (o.arg, inline) {
            (Arg::Flag, Some(_)) => {
                return Err(Usage(format!("option {} takes no value", o.long)));
            }
            (Arg::Flag | Arg::Inline(_), v) => v.map(str::to_string),
            (Arg::Value(_), Some(v)) => Some(v.to_string()),
            (Arg::Value(what), None) => {
                let v = args
                    .get(i)
                    .ok_or_else(|| Usage(format!("option {name} needs a value ({what})")))?;
                i += 1;
                Some(v.clone())
            }
        };
        m.given.push((o.long, value));
    }
    let required = spec.pos.iter().filter(|p| !p.starts_with('[')).count();
    if spec.pos.is_empty() && !m.pos.is_empty() {
        return Err(Usage(format!(
            "{} takes no arguments: unexpected '{}' (see {} --help)",
            spec.cmd, m.pos[0], spec.cmd
        )));
    }
    if m.pos.len() < required || m.pos.len() > spec.pos.len() {
        let n = spec.pos.len();
        let count = if required == n {
            format!("{n} argument{}", if n == 1 { "" } else { "s" })
        } else {
            format!("{required} to {n} arguments")
        };
        let detail = match m.pos.get(n) {
            Some(extra) => format!("unexpected '{extra}'"),
            None => format!("got {}", m.pos.len()),
        };
        return Err(Usage(format!(
            "{} takes {count} ({}): {detail} (see {} --help)",
            spec.cmd,
            spec.pos.join(" "),
            spec.cmd
        )));
    }
    Ok(Some(m))
}

/// `spec`'s usage text: synopsis, what it does, every option it takes.
pub fn usage(spec: &Spec) -> String {
    let mut s = format!("Usage: {}", spec.cmd);
    for p in spec.pos {
        s.push(' ');
        s.push_str(p);
    }
    if spec.opts.iter().any(|g| !g.is_empty()) {
        s.push_str(" [OPTIONS]");
    }
    s.push_str("\n\n");
    s.push_str(spec.about);
    s.push_str("\n\nOptions:\n");
    let line = |s: &mut String, left: String, help: &str| {
        if left.len() <= 20 {
            s.push_str(&format!("  {left:<21}"));
        } else {
            s.push_str(&format!("  {left}\n{:23}", ""));
        }
        s.push_str(&help.replace('\n', &format!("\n{:23}", "")));
        s.push('\n');
    };
    for o in spec.opts.iter().flat_map(|g| g.iter()) {
        let mut left = String::new();
        if let Some(sh) = o.short {
            left.push_str(sh);
            left.push_str(", ");
        }
        left.push_str(o.long);
        match o.arg {
            Arg::Flag => {}
            Arg::Value(v) => {
                left.push(' ');
                left.push_str(v);
            }
            Arg::Inline(v) => left.push_str(&format!("[={v}]")),
        }
        line(&mut s, left, o.help);
    }
    line(&mut s, "-h, --help".into(), "print this usage");
    if !spec.after.is_empty() {
        s.push('\n');
        s.push_str(spec.after);
    }
    s.trim_end().to_string()
}

// ---- The tables ----

const KERNEL: Opt = opt(
    "--kernel",
    Arg::Value("PATH"),
    "Linux bzImage (64-bit boot protocol) or ELF with a PVH note\n(default: the embedded probe guest)",
);
const INITRD: Opt = opt("--initrd", Arg::Value("PATH"), "initial ramdisk");
const CMDLINE: Opt = opt(
    "--cmdline",
    Arg::Value("STR"),
    "kernel command line (default for --kernel: \"console=ttyS0 reboot=k panic=1\";\nfor the probe guest: \"console=ttyS0 probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng\")",
);
const MEMORY: Opt = opt(
    "--memory",
    Arg::Value("SIZE"),
    "guest RAM, e.g. 256M, 2G (default 256M)",
);
const MEMORY_SHARED: Opt = opt(
    "--memory-shared",
    Arg::Value("on|off"),
    "back guest RAM with a memfd mapped shared, which a vhost-user backend can map\n(default off; always on with a --net or --disk vhost-user=)",
);
const VCPUS: Opt = opt("--vcpus", Arg::Value("N"), "vCPUs, 1 to 32 (default 1)");
const DISK: Opt = opt(
    "--disk",
    Arg::Value("SPEC"),
    "a virtio-blk disk (repeatable): path=IMG[,readonly=on][,id=NAME] (raw image or\nblock device; read-write disks are locked against a second writer),\nvmkfs=DATASTORE:NAME[,readonly=on][,id=NAME] (disk NAME of a VMKFS datastore), or\nvhost-user=SOCKET[,readonly=on][,id=NAME] (served by a vhost-user backend such as\nwv storage; docs/STORAGE.md); ,via=storage (wv vm create only): the image or VMKFS\ndisk is opened, held and served by the daemon's storage service instead of the VMM",
);
const NET: Opt = opt(
    "--net",
    Arg::Value("SPEC"),
    "tap=NAME[,mac=MAC][,id=ID]: a virtio-net device on TAP NAME (created and brought\nup if missing, which needs CAP_NET_ADMIN); vhost-user=SOCKET[,mac=MAC][,id=ID]:\none whose queues a vhost-user backend serves (wv vswitch; docs/NETWORK.md);\nnetwork=NETWORK[,mac=MAC][,id=ID] (wv vm create only): one on the daemon's\nnetwork NETWORK (wv net create), served by its switch;\nMAC generated if not given (repeatable)",
);
const RNG: Opt = opt(
    "--rng",
    Arg::Value("on|off"),
    "a virtio-rng device for guest entropy (default on)",
);
const BALLOON: Opt = opt(
    "--balloon",
    Arg::Value("on|off"),
    "a virtio-balloon device: memory the host can take back and lend (PUT /vm/balloon,\nwv vm set --memory-target), free page reporting, guest memory statistics\n(default off for wv run, on for wv vm create)",
);

/// What a VM is made of: the options `wv run` and `wv vm create` share ([`VmOpts`]).
pub const VM_OPTS: &[Opt] = &[
    KERNEL,
    INITRD,
    CMDLINE,
    MEMORY,
    MEMORY_SHARED,
    VCPUS,
    DISK,
    NET,
    RNG,
    BALLOON,
];

/// The VM options ([`VM_OPTS`]) as given, values unparsed: clap fills it for `wv vm create`
/// (the help texts are the table's), the scanner for `wv run`; [`vm_def`] reads both alike.
#[derive(clap::Args, Debug, Default, PartialEq, Eq)]
pub struct VmOpts {
    #[arg(long, value_name = "PATH", help = KERNEL.help)]
    kernel: Option<String>,
    #[arg(long, value_name = "PATH", help = INITRD.help)]
    initrd: Option<String>,
    #[arg(long, value_name = "STR", allow_hyphen_values = true, help = CMDLINE.help)]
    cmdline: Option<String>,
    #[arg(long, value_name = "SIZE", help = MEMORY.help)]
    memory: Option<String>,
    #[arg(long, value_name = "on|off", help = MEMORY_SHARED.help)]
    memory_shared: Option<String>,
    #[arg(long, value_name = "N", help = VCPUS.help)]
    vcpus: Option<String>,
    #[arg(long, value_name = "SPEC", help = DISK.help)]
    disk: Vec<String>,
    #[arg(long, value_name = "SPEC", help = NET.help)]
    net: Vec<String>,
    #[arg(long, value_name = "on|off", help = RNG.help)]
    rng: Option<String>,
    #[arg(long, value_name = "on|off", help = BALLOON.help)]
    balloon: Option<String>,
}

impl VmOpts {
    /// The VM options `m` (`wv run`'s scan) holds.
    fn from_matches(m: &Matches) -> Self {
        let one = |o: &Opt| m.value(o.long).map(str::to_string);
        VmOpts {
            kernel: one(&KERNEL),
            initrd: one(&INITRD),
            cmdline: one(&CMDLINE),
            memory: one(&MEMORY),
            memory_shared: one(&MEMORY_SHARED),
            vcpus: one(&VCPUS),
            disk: m.values(DISK.long).map(str::to_string).collect(),
            net: m.values(NET.long).map(str::to_string).collect(),
            rng: one(&RNG),
            balloon: one(&BALLOON),
        }
    }

    /// The first of the options that was given, as `--name` (in [`VM_OPTS`]' order).
    pub fn first_given(&self) -> Option<&'static str> {
        let given = [
            self.kernel.is_some(),
            self.initrd.is_some(),
            self.cmdline.is_some(),
            self.memory.is_some(),
            self.memory_shared.is_some(),
            self.vcpus.is_some(),
            !self.disk.is_empty(),
            !self.net.is_empty(),
            self.rng.is_some(),
            self.balloon.is_some(),
        ];
        VM_OPTS
            .iter()
            .zip(given)
            .find(|(_, g)| *g)
            .map(|(o, _)| o.long)
    }
}

/// `wv run --config`: the whole VM from a file, instead of [`VM_OPTS`].
const CONFIG: Opt = opt(
    "--config",
    Arg::Value("FILE"),
    "the whole VM from a JSON file (TOML if FILE ends in .toml) with the fields of\nPOST /v1/vms but name, shares, reservation and limit (docs/openapi.json,\nVmSpec); its relative paths are relative to the file. Not with the VM options\nbelow; --serial, --console-socket and --stats can be added",
);

/// `wv run --cluster`: the VM's memory over several node processes.
const CLUSTER: Opt = opt(
    "--cluster",
    Arg::Value("SPEC"),
    "run the VM as node 0 of a cluster (a TOML file: vcpus, memory, [[node]] listen and\nvcpus; docs/CLUSTER.md): every node not marked remote is started on this host\n(wv node), its guest RAM is kept coherent over TCP (docs/DSM.md). vCPUs may run\non any node (vCPU 0 on node 0; --irqchip user is then forced). Not with --vcpus,\n--memory, --config, --restore, --incoming or --jail",
);

/// `wv run --restore`: the VM of a snapshot, instead of [`VM_OPTS`].
const RESTORE: Opt = opt(
    "--restore",
    Arg::Value("DIR"),
    "bring back the VM of a snapshot directory (PUT /vm/snapshot on the control\nsocket; docs/SNAPSHOT.md): the VM comes from it, so not with the VM options\nor --config; --clone, --mac, --serial, --console-socket, --api-socket and\n--stats can be added",
);

/// `wv run --restore ... --clone`: a new identity for the restored VM.
const CLONE_OPTS: &[Opt] = &[
    opt(
        "--clone",
        Arg::Flag,
        "with --restore: start the VM as a clone, one of many from one snapshot: new\nrandom locally administered MACs for its network devices (the guest sees them\nwhen it next reads the device's configuration; every restore also gets a new\nVM generation id, docs/PVABI.md)",
    ),
    opt(
        "--mac",
        Arg::Value("INDEX=MAC"),
        "with --clone: network device INDEX (from 0, in the snapshot's order) gets MAC\ninstead of a random one (repeatable)",
    ),
    opt(
        "--net-socket",
        Arg::Value("INDEX=SOCKET"),
        "with --restore or --incoming: network device INDEX (served over vhost-user)\nconnects to SOCKET instead of the one the snapshot or the source names (repeatable)",
    ),
];

/// `wv run --incoming`: the VM of a live migration, instead of [`VM_OPTS`].
const INCOMING: Opt = opt(
    "--incoming",
    Arg::Value("HOST:PORT"),
    "listen on HOST:PORT (TCP) for one live migration (PUT /vm/migrate-send on the\nsource's control socket; docs/MIGRATION.md) and run the VM it brings: not with\nthe VM options, --config or --restore; --serial, --console-socket, --api-socket,\n--stats, --disk-dir and --datastore can be added",
);

/// `wv run --incoming`: where the disks a migration copies (`--copy-disks`) land.
const INCOMING_OPTS: &[Opt] = &[
    opt(
        "--disk-dir",
        Arg::Value("DIR"),
        "with --incoming: the raw disk images the source copies (--copy-disks) are created\nin DIR under their file names (never over an existing file), and the VM runs\non them there",
    ),
    opt(
        "--datastore",
        Arg::Value("PATH"),
        "with --incoming: the VMKFS disks the source copies are created in the datastore\nat PATH under their names (never over an existing one)",
    ),
];

/// What only a foreground `wv run` has (the daemon owns a VM's console).
const RUN_LOCAL_OPTS: &[Opt] = &[
    opt(
        "--serial",
        Arg::Value("MODE"),
        "stdio (default), none, or a file path to append console output to",
    ),
    opt(
        "--console-socket",
        Arg::Value("PATH"),
        "also serve the console on a Unix socket: one client at a time gets\nthe last 4 KiB of output, then output and input live",
    ),
    opt(
        "--api-socket",
        Arg::Value("PATH"),
        "serve the VMM's control API (state, counters, pause, resume) on a Unix socket\n(docs/vmm-openapi.json)",
    ),
    opt(
        "--stats",
        Arg::Inline("table|json"),
        "print exit accounting to stderr when the VM ends",
    ),
    opt(
        "--seccomp",
        Arg::Value("off|log|kill"),
        "what each VMM thread's system-call filter does with a call outside its list\n(crates/vmm/src/seccomp/): kill (default) reports it on stderr and ends wv with\nstatus 208; log reports it and lets it through; off installs no filter",
    ),
    opt(
        "--irqchip",
        Arg::Value("kernel|user"),
        "who emulates the interrupt controllers: kernel (default: KVM's in-kernel local\nAPICs, I/O APIC, PIC and PIT) or user (the VMM's own local APICs and I/O APIC,\nKVM without its irqchip, as a VM spread over several hosts needs; no PIC, no PIT,\nno x2APIC; not with --restore or --incoming, and the control API refuses pause,\nsnapshot and migration; docs/DEVICES.md)",
    ),    opt(
        "--jail",
        Arg::Value("uid=N[,gid=N][,dir=PATH][,net=new|host][,nofile=N][,config=FILE]"),
        "as root: open the VM's files, devices, TAPs and sockets, then run as user N (group\nN unless gid=) with no capabilities and no_new_privs, in new mount, PID, IPC and\n(net=new, the default) network namespaces, in a root holding only /dev/null, zero,\nrandom, urandom, /proc and the folder dir= (at its own path: where snapshots and\nmigrated disks go); open files at most nofile= (1024), address space guest RAM\n+ 4 GiB. config=: also open the files of this configuration (for --incoming).\nThe daemon jails every VMM this way (docs/SECURITY.md)",
    ),
];

const RUN_STATUS: &str = "Exit status: the guest's exit code (0-199) when it powers off; 200 bad arguments, 201 KVM
unavailable, 202 bad kernel, initrd or disk image, 203 guest reset, 204 triple fault, 205 KVM could not
run the guest, 206 VMM failure, 207 TAP unavailable, 208 a VMM thread made a system call outside its seccomp
list, 128+N stopped by signal N.

Environment: WV_KVM_DEVICE overrides the KVM device path (default /dev/kvm).";

/// `wv run`.
pub const RUN: Spec = Spec {
    cmd: "wv run",
    pos: &[],
    about:
        "Boots one VM and runs it until the guest powers off, resets or fails. Without --kernel it
boots the embedded probe guest, which runs its self-tests and powers off with 0 when all pass.",
    opts: &[
        &[CONFIG, RESTORE, INCOMING, CLUSTER],
        INCOMING_OPTS,
        CLONE_OPTS,
        VM_OPTS,
        RUN_LOCAL_OPTS,
    ],
    after: RUN_STATUS,
};

// ---- Typed results ----

/// `--stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsMode {
    /// No accounting printed.
    Off,
    /// A table on stderr.
    Table,
    /// One JSON line on stderr.
    Json,
}

/// How to reach the daemon, and how to print its answers.
#[derive(Debug, PartialEq)]
pub struct Client {
    /// Socket path, or `tcp:HOST:PORT`.
    pub socket: PathBuf,
    /// Machine-readable output.
    pub json: bool,
}

/// A scheduler change (`wv vm set`): what was given.
#[derive(Debug, Default, PartialEq)]
pub struct Sched {
    /// `--shares`.
    pub shares: Option<u32>,
    /// `--reservation`.
    pub reservation: Option<f64>,
    /// `--limit`: `Some(None)` is `--limit none`.
    pub limit: Option<Option<f64>>,
    /// `--net-shares`.
    pub net_shares: Option<u32>,
    /// `--net-reservation`, bits per second (0: none).
    pub net_reservation: Option<u64>,
    /// `--net-limit`, bits per second (0: none).
    pub net_limit: Option<u64>,
    /// `--disk-shares`.
    pub disk_shares: Option<u32>,
    /// `--disk-iops-reservation`, I/Os per second (0: none).
    pub disk_reservation_iops: Option<u64>,
    /// `--disk-iops-limit`, I/Os per second (0: none).
    pub disk_limit_iops: Option<u64>,
}

/// A `wv vm` command.
#[derive(Debug, PartialEq)]
pub enum VmCmd {
    /// Define a VM.
    Create(Box<VmSpec>),
    /// Change its scheduler settings and/or its memory target (bytes).
    Set(String, Sched, Option<u64>),
    /// List the VMs.
    List,
    /// `info`, `stats`, `console`, `start`, `stop`, `pause`, `resume` or `delete` of a VM.
    Named(&'static str, String),
    /// Save VM .0 as snapshot .1 (.2: raw disks allowed).
    Snapshot(String, String, bool),
    /// Start VM .0 from snapshot .1.
    Restore(String, String),
    /// Start .2 clones named from .1 of snapshot .0.
    Clone(String, String, u32),
    /// List the snapshots.
    Snapshots,
    /// Delete a snapshot.
    DeleteSnapshot(String),
    /// Move a running VM to another daemon.
    Migrate(Migrate),
    /// Hot-plug disk .1 into running VM .0.
    DeviceAdd(String, serde_json::Value),
    /// Unplug hot-plugged device .1 from running VM .0.
    DeviceRemove(String, String),
    /// Switch the data path of device .1 of VM .0 to .2 ("direct" or "interposed"), with a
    /// capture file .3 in the VM's folder.
    Device(String, String, String, Option<String>),
}

/// A `wv net` command.
#[derive(Debug, PartialEq, Eq)]
pub enum NetCmd {
    /// Make network .0 with uplink TAP .1 of rate .2 (bits per second).
    Create(String, Option<String>, Option<u64>),
    /// List the networks.
    List,
    /// Show one.
    Info(String),
    /// Delete one.
    Delete(String),
}

/// `wv vm migrate NAME --to HOST:PORT [--token T] [--downtime-ms N]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Migrate {
    /// The VM.
    pub name: String,
    /// The target daemon's API over TCP.
    pub to: String,
    /// The target daemon's token (`--token`, else `WV_TARGET_TOKEN`).
    pub token: String,
    /// `--downtime-ms`.
    pub downtime_ms: Option<u64>,
    /// `--copy-disks`.
    pub copy_disks: bool,
    /// `--datastore`: where copied VMKFS disks land on the target.
    pub datastore: Option<String>,
}

/// `wv run --restore DIR [--clone] [--mac I=MAC]...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// A clone or not, and its MACs.
    pub opts: wv_vmm::RestoreOptions,
}

/// Where `wv run` takes its VM from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunFrom {
    /// Its options (or `--config`).
    Options,
    /// `--restore DIR`: a snapshot (as a clone or not).
    Snapshot(Restore),
    /// `--incoming HOST:PORT`: a live migration, and where the disks it copies land.
    Incoming(String, wv_vmm::DiskPlaces, Vec<(usize, PathBuf)>),
    /// `--cluster SPEC`: the VM of the options, its memory spread over the spec's nodes.
    Cluster(Box<wv_vmm::cluster::ClusterSpec>),
}

/// A `wv` command line, parsed and checked.
#[derive(Debug)]
pub enum Command {
    /// Print this usage (or `--version`'s answer) to stdout, exit 0.
    Help(String),
    /// Boot a VM in the foreground (or bring one back from a snapshot or a migration).
    Run(Box<VmConfig>, StatsMode, RunFrom, Option<Box<Jail>>),
    /// `wv node --listen ADDR`: a cluster node waiting to be told its part.
    Node(String),
    /// Write an embedded image.
    ProbeImage {
        /// Its name.
        format: String,
        /// Where.
        output: PathBuf,
    },
    /// `wv vswitch`.
    Vswitch(wv_vswitch::Config),
    /// `wv storage`.
    Storage(wv_storage::Config),
    /// The daemon.
    HostServe {
        /// Its socket.
        socket: PathBuf,
        /// Its state directory.
        state_dir: PathBuf,
        /// A TCP address to serve on as well.
        listen: Option<String>,
        /// A TCP address to serve the web console on.
        web: Option<String>,
        /// The only directories VMs' kernels, initrds and disks may come from.
        images: Vec<PathBuf>,
        /// The users of jailed VMMs (first, last), None: unjailed (`--no-jail`).
        jail: Option<(u32, u32)>,
        /// The memory lending policy's settings.
        memory: wv_host::lending::Settings,
        /// Whether the daemon places worlds' vCPU threads on CPUs.
        placement: wv_host::place::Mode,
        /// Each datastore's I/Os per second in the storage service (0: none).
        storage_capacity_iops: u64,
        /// The datastores with a capacity of their own: (device, I/Os per second).
        storage_device_capacity: Vec<(String, u64)>,
    },
    /// `wv host status`.
    HostStatus(Client),
    /// `wv host memory`.
    HostMemory(Client),
    /// `wv host storage`: show, or set (the body of `PUT /v1/host/storage`).
    HostStorage(Client, Option<serde_json::Value>),
    /// `wv host token`: print the API token kept in this state directory.
    HostToken(PathBuf),
    /// `wv host top`.
    HostTop(Client, bool),
    /// `wv host shutdown`.
    HostShutdown(Client),
    /// `wv host uninstall`: the state directory, and whether `--yes` was given.
    HostUninstall(PathBuf, bool),
    /// `wv host install`: where the unit goes, the daemon's arguments (after `host`), and the
    /// socket `wv host shutdown` reaches it on (when not the default).
    HostInstall {
        /// `--unit-dir`.
        unit_dir: PathBuf,
        /// `wv host`'s options, paths absolute.
        args: Vec<String>,
        /// `--socket`, if given.
        socket: Option<PathBuf>,
    },
    /// `wv vm ...`.
    Vm(Client, VmCmd),
    /// `wv net ...`.
    Net(Client, NetCmd),
    /// `wv fs ...`.
    Fs(fs::Args),
    /// `wv completions bash|zsh`: the completion script to print.
    Completions(String),
}

/// Parses `wv`'s arguments (without the program name): `wv run` (and its help) by its own
/// scanner before anything of clap is built, every other command by clap.
pub fn parse(args: &[String]) -> Result<Command, Usage> {
    parse_vmm(args).unwrap_or_else(|| crate::commands::parse(args))
}

/// `wv run`'s command lines (`wv run …`, `wv help run`), read by the scanner alone; None for
/// every other command. The `wv` binary calls only this, so nothing of clap is linked into it.
pub fn parse_vmm(args: &[String]) -> Option<Result<Command, Usage>> {
    let first = |w: &str| args.first().is_some_and(|a| a == w);
    if first("run") {
        return Some(parse_run(&args[1..]));
    }
    // `wv help run`: run's usage is the scanner's.
    if (first("help") || first("-h") || first("--help"))
        && args.get(1).is_some_and(|a| a == "run")
        && args.len() == 2
    {
        return Some(Ok(Command::Help(usage(&RUN))));
    }
    None
}

/// Scans by `spec`, or answers its usage.
fn scan_or_help(spec: &Spec, args: &[String]) -> Result<Result<Matches, String>, Usage> {
    Ok(scan(spec, args)?.ok_or_else(|| usage(spec)))
}

macro_rules! matches_or_help {
    ($spec:expr, $args:expr) => {
        match scan_or_help($spec, $args)? {
            Ok(m) => m,
            Err(text) => return Ok(Command::Help(text)),
        }
    };
}

fn parse_run(args: &[String]) -> Result<Command, Usage> {
    let m = matches_or_help!(&RUN, args);
    let stats = match (m.has("--stats"), m.value("--stats")) {
        (false, _) => StatsMode::Off,
        (true, None | Some("table")) => StatsMode::Table,
        (true, Some("json")) => StatsMode::Json,
        (true, Some(o)) => return Err(Usage(format!("--stats takes table or json, not '{o}'"))),
    };
    let from = match (m.value("--restore"), m.value("--incoming")) {
        (Some(_), Some(_)) => {
            return Err(Usage(
                "--restore and --incoming cannot be given together".into(),
            ))
        }
        (Some(dir), None) => RunFrom::Snapshot(Restore {
            dir: PathBuf::from(dir),
            opts: wv_vmm::RestoreOptions::default(),
        }),
        (None, Some(addr)) => RunFrom::Incoming(
            addr.to_string(),
            wv_vmm::DiskPlaces {
                dir: m.value("--disk-dir").map(PathBuf::from),
                datastore: m.value("--datastore").map(PathBuf::from),
            },
            Vec::new(),
        ),
        (None, None) => RunFrom::Options,
    };
    let from = match m.value("--cluster") {
        None => from,
        Some(f) => {
            if let Some(o) = [
                "--restore",
                "--incoming",
                "--config",
                "--vcpus",
                "--memory",
                "--jail",
            ]
            .into_iter()
            .find(|o| m.has(o))
            {
                return Err(Usage(format!(
                    "--cluster: {o} cannot be added to it (the spec gives vcpus and memory)"
                )));
            }
            let spec =
                wv_vmm::cluster::ClusterSpec::from_file(Path::new(f)).map_err(|e| Usage(e.0))?;
            spec.check_runnable().map_err(|e| Usage(e.0))?;
            RunFrom::Cluster(Box::new(spec))
        }
    };
    let what = match &from {
        RunFrom::Options | RunFrom::Cluster(_) => None,
        RunFrom::Snapshot(_) => Some("--restore takes the VM from the snapshot"),
        RunFrom::Incoming(..) => Some("--incoming takes the VM from the migration"),
    };
    if !matches!(from, RunFrom::Incoming(..)) {
        if let Some(o) = INCOMING_OPTS.iter().find(|o| m.has(o.long)) {
            return Err(Usage(format!(
                "{} says where a migration's copied disks land: it needs --incoming",
                o.long
            )));
        }
    }
    if let Some(what) = what {
        if let Some(o) = VM_OPTS.iter().chain([&CONFIG]).find(|o| m.has(o.long)) {
            return Err(Usage(format!("{what}: {} cannot be added to it", o.long)));
        }
    } else if let Some(o) = CLONE_OPTS.iter().find(|o| m.has(o.long)) {
        return Err(Usage(format!(
            "{} makes a clone of a snapshot: it needs --restore DIR",
            o.long
        )));
    }
    let clone = m.has("--clone");
    if matches!(from, RunFrom::Incoming(..)) && (clone || m.has("--mac")) {
        return Err(Usage(
            "--incoming: a migrated VM keeps its identity (--clone and --mac are for --restore)"
                .into(),
        ));
    }
    if !clone && m.has("--mac") {
        return Err(Usage(
            "--mac gives a clone its MACs: it needs --clone (a restored VM keeps its own)".into(),
        ));
    }
    let macs = m
        .values("--mac")
        .map(|v| {
            let bad = || {
                Usage(format!(
                    "--mac '{v}': expected INDEX=MAC, e.g. 0=52:54:00:12:34:56 (a unicast MAC)"
                ))
            };
            let (i, mac) = v.split_once('=').ok_or_else(bad)?;
            let i: usize = i.parse().map_err(|_| bad())?;
            let mac = wv_config::parse_mac(mac)
                .filter(|m| m[0] & 1 == 0)
                .ok_or_else(bad)?;
            Ok((i, mac))
        })
        .collect::<Result<Vec<_>, Usage>>()?;
    let sockets = m
        .values("--net-socket")
        .map(|v| {
            let bad = || Usage(format!("--net-socket '{v}': expected INDEX=SOCKET"));
            let (i, p) = v.split_once('=').ok_or_else(bad)?;
            let i: usize = i.parse().map_err(|_| bad())?;
            if p.is_empty() {
                return Err(bad());
            }
            Ok((i, PathBuf::from(p)))
        })
        .collect::<Result<Vec<_>, Usage>>()?;
    let from = match from {
        RunFrom::Snapshot(r) => RunFrom::Snapshot(Restore {
            dir: r.dir,
            opts: wv_vmm::RestoreOptions {
                clone,
                macs,
                sockets,
            },
        }),
        RunFrom::Incoming(addr, places, _) => RunFrom::Incoming(addr, places, sockets),
        f => f,
    };
    let mut cfg = match m.value("--config") {
        Some(file) => {
            if let Some(o) = VM_OPTS.iter().find(|o| m.has(o.long)) {
                return Err(Usage(format!(
                    "--config gives the whole VM: {} cannot be added to it",
                    o.long
                )));
            }
            config_from_file(Path::new(file))?
        }
        None => vm_config(vm_def(&VmOpts::from_matches(&m), false)?),
    };
    if let RunFrom::Cluster(spec) = &from {
        cfg.vcpus = spec.vcpus;
        cfg.memory = spec.memory;
        if spec.spans() {
            // vCPUs on several nodes: the VMM's own interrupt controllers route between them.
            if m.value("--irqchip") == Some("kernel") {
                return Err(Usage(
                    "--cluster: this spec runs vCPUs on nodes other than 0, which needs \
                     --irqchip user (the default then): --irqchip kernel cannot be used"
                        .into(),
                ));
            }
            cfg.irqchip = wv_config::IrqChip::User;
        }
        wv_vmm::cluster::check_config(&cfg, spec).map_err(|e| Usage(e.0))?;
    }
    if let Some(v) = m.value("--serial") {
        cfg.serial = match v {
            "stdio" => SerialMode::Stdio,
            "none" => SerialMode::None,
            "" => return Err(Usage("--serial needs stdio, none or a file path".into())),
            p => SerialMode::File(PathBuf::from(p)),
        };
    }
    cfg.console_socket = m.value("--console-socket").map(PathBuf::from);
    cfg.api_socket = m.value("--api-socket").map(PathBuf::from);
    if let Some(v) = m.value("--seccomp") {
        cfg.seccomp = wv_config::SeccompMode::parse(v).map_err(|e| Usage(e.0))?;
    }
    if let Some(v) = m.value("--irqchip") {
        cfg.irqchip = wv_config::IrqChip::parse(v).map_err(|e| Usage(e.0))?;
        if cfg.irqchip == wv_config::IrqChip::User {
            if let Some(o) = ["--restore", "--incoming"].into_iter().find(|o| m.has(o)) {
                return Err(Usage(format!(
                    "--irqchip user cannot be used with {o}: the userspace interrupt controllers have no saved state to bring back"
                )));
            }
        }
    }
    let jail = match m.value("--jail") {
        Some(v) => {
            let spec = wv_config::JailConfig::parse(v).map_err(|e| Usage(e.0))?;
            let also = match &spec.config {
                Some(f) => Some(config_from_file(f)?),
                None => None,
            };
            Some(Box::new(Jail { spec, also }))
        }
        None => None,
    };
    Ok(Command::Run(Box::new(cfg), stats, from, jail))
}

/// The configuration the VM options describe, with the defaults that depend on the kernel.
pub(crate) fn vm_config(d: VmDef) -> VmConfig {
    let kernel = d
        .kernel
        .map_or_else(KernelSource::default, KernelSource::Path);
    let cmdline = d
        .cmdline
        .unwrap_or_else(|| kernel.default_cmdline().to_string());
    let mut cfg = VmConfig::new(kernel, cmdline);
    cfg.initrd = d.initrd;
    cfg.memory = d.memory;
    cfg.memory_shared = d.memory_shared;
    cfg.vcpus = d.vcpus;
    cfg.rng = d.rng;
    cfg.balloon = d.balloon;
    cfg.disks = d.disks;
    cfg.nets = d.nets;
    cfg
}

/// Reads a definition file: TOML when its name ends in `.toml`, else JSON; an error is one
/// line naming the file. Relative paths in it are made relative to the file's directory.
pub(crate) fn from_file<T: serde::de::DeserializeOwned>(
    file: &Path,
) -> Result<(T, PathBuf), Usage> {
    let f = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| Usage(format!("cannot read {f}: {e}")))?;
    let v: T = if file.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| Usage(format!("{f}: {}", one_line(&e.to_string()))))?
    } else {
        if !text.trim_start().starts_with('{') {
            return Err(Usage(format!("{f}: expected a JSON object")));
        }
        serde_json::from_str(&text).map_err(|e| Usage(format!("{f}: {e}")))?
    };
    let dir = std::path::absolute(file)
        .map_err(|e| Usage(format!("{f}: {e}")))?
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    Ok((v, dir))
}

/// `wv run --config FILE`.
fn config_from_file(file: &Path) -> Result<VmConfig, Usage> {
    let (mut c, dir) = from_file::<VmConfig>(file)?;
    absolute_paths(&mut c, &dir);
    Ok(c)
}

/// `wv run --jail`: the jail, and the configuration whose files it opens besides the VM's
/// (its `config=`).
#[derive(Debug)]
pub struct Jail {
    /// The jail.
    pub spec: wv_config::JailConfig,
    /// Its `config=` file, read.
    pub also: Option<VmConfig>,
}

/// The VM options [`VM_OPTS`], typed (before defaults that depend on the kernel).
pub(crate) struct VmDef {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: u64,
    memory_shared: bool,
    vcpus: u32,
    disks: Vec<DiskConfig>,
    nets: Vec<NetConfig>,
    rng: bool,
    balloon: bool,
}

/// The VM options `o` describe, checked; `balloon_default` is whether a VM without `--balloon`
/// has one (off for `wv run`, on for `wv vm create`).
pub(crate) fn vm_def(o: &VmOpts, balloon_default: bool) -> Result<VmDef, Usage> {
    let memory = match o.memory.as_deref() {
        Some(v) => parse_size(v).map_err(|e| Usage(format!("--memory: {e}")))?,
        None => wv_config::DEFAULT_MEMORY,
    };
    let vcpus = match o.vcpus.as_deref() {
        Some(v) => v.parse().map_err(|_| {
            Usage(format!(
                "--vcpus '{v}' is not a number from 1 to {}",
                wv_config::MAX_VCPUS
            ))
        })?,
        None => 1,
    };
    let rng = match o.rng.as_deref() {
        None | Some("on") => true,
        Some("off") => false,
        Some(o) => return Err(Usage(format!("--rng takes on or off, not '{o}'"))),
    };
    let balloon = match o.balloon.as_deref() {
        None => balloon_default,
        Some("on") => true,
        Some("off") => false,
        Some(o) => return Err(Usage(format!("--balloon takes on or off, not '{o}'"))),
    };
    let memory_shared = match o.memory_shared.as_deref() {
        None | Some("off") => false,
        Some("on") => true,
        Some(o) => return Err(Usage(format!("--memory-shared takes on or off, not '{o}'"))),
    };
    let disks = o
        .disk
        .iter()
        .enumerate()
        .map(|(i, v)| DiskConfig::parse(v, i).map_err(|e| Usage(e.to_string())))
        .collect::<Result<_, _>>()?;
    let nets = o
        .net
        .iter()
        .map(|v| NetConfig::parse(v).map_err(|e| Usage(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(VmDef {
        kernel: o.kernel.as_ref().map(PathBuf::from),
        initrd: o.initrd.as_ref().map(PathBuf::from),
        cmdline: o.cmdline.clone(),
        memory,
        memory_shared,
        vcpus,
        disks,
        nets,
        rng,
        balloon,
    })
}

/// The current directory, to make the client's relative paths absolute.
pub(crate) fn cwd() -> Result<PathBuf, Usage> {
    std::env::current_dir().map_err(|e| Usage(format!("cannot read the current directory: {e}")))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Makes the kernel, initrd and disk paths of `c` absolute against `base`.
pub(crate) fn absolute_paths(c: &mut VmConfig, base: &Path) {
    if let KernelSource::Path(p) = &mut c.kernel {
        *p = base.join(&*p);
    }
    if let Some(p) = &mut c.initrd {
        *p = base.join(&*p);
    }
    for d in &mut c.disks {
        d.path = base.join(&d.path);
    }
    for n in &mut c.nets {
        if let Some(p) = &mut n.vhost_user {
            *p = base.join(&*p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    fn vm(s: &[&str]) -> (Client, VmCmd) {
        match parse(&args(s)) {
            Ok(Command::Vm(c, v)) => (c, v),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn refused(s: &[&str]) -> String {
        match parse(&args(s)) {
            Err(Usage(m)) => m,
            other => panic!("{s:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn irqchip_option() {
        let Ok(Command::Run(run, ..)) = parse(&args(&["run"])) else {
            panic!()
        };
        assert_eq!(run.irqchip, wv_config::IrqChip::Kernel);
        let Ok(Command::Run(run, ..)) = parse(&args(&["run", "--irqchip=user", "--vcpus=2"]))
        else {
            panic!()
        };
        assert_eq!((run.irqchip, run.vcpus), (wv_config::IrqChip::User, 2));
        // Not part of the serialised VM: a configuration file neither carries nor needs it.
        let text = serde_json::to_string(&*run).unwrap();
        assert!(!text.contains("irqchip"), "{text}");
        assert!(refused(&["run", "--irqchip", "pic"]).contains("use kernel or user"));
        assert!(refused(&["run", "--irqchip", "user", "--restore", "/s"])
            .contains("--irqchip user cannot be used with --restore"));
        // Kernel mode goes with everything.
        assert!(parse(&args(&["run", "--irqchip", "kernel", "--restore", "/s"])).is_ok());
    }

    #[test]
    fn both_value_forms_give_the_same_definition() {
        let spaced = vm(&[
            "vm",
            "create",
            "a",
            "--memory",
            "512M",
            "--disk",
            "path=/x.img",
            "--net",
            "tap=tap9",
            "--vcpus",
            "2",
            "--shares",
            "2000",
            "--limit",
            "none",
        ]);
        let inline = vm(&[
            "vm",
            "create",
            "a",
            "--memory=512M",
            "--disk=path=/x.img",
            "--net=tap=tap9",
            "--vcpus=2",
            "--shares=2000",
            "--limit=none",
        ]);
        assert_eq!(spaced, inline);
        let VmCmd::Create(s) = inline.1 else { panic!() };
        assert_eq!(
            (s.config.memory, s.config.vcpus, s.shares, s.limit),
            (512 << 20, 2, 2000, None)
        );
        assert_eq!(
            s.config.disks,
            [DiskConfig::parse("path=/x.img", 0).unwrap()]
        );
        assert_eq!(s.config.nets, [NetConfig::parse("tap=tap9").unwrap()]);
        // What the daemon gets is what `wv run` would boot from the same options, but for the
        // balloon: on by default for the daemon's VMs, off for `wv run`.
        let Ok(Command::Run(mut run, _, _, _)) = parse(&args(&[
            "run",
            "--memory=512M",
            "--disk=path=/x.img",
            "--net=tap=tap9",
            "--vcpus=2",
        ])) else {
            panic!()
        };
        assert!(!run.balloon && s.config.balloon);
        run.balloon = true;
        assert_eq!(s.config, *run);
        let (_, VmCmd::Create(s)) = vm(&["vm", "create", "a", "--balloon=off"]) else {
            panic!()
        };
        assert!(!s.config.balloon);
        let Ok(Command::Run(run, _, _, _)) = parse(&args(&["run", "--balloon", "on"])) else {
            panic!()
        };
        assert!(run.balloon);
    }

    #[test]
    fn network_shares_are_a_count_and_rates() {
        let (_, v) = vm(&[
            "vm",
            "set",
            "a",
            "--net-shares",
            "4",
            "--net-reservation=30M",
            "--net-limit",
            "none",
        ]);
        let VmCmd::Set(_, s, None) = v else { panic!() };
        assert_eq!(
            (s.net_shares, s.net_reservation, s.net_limit, s.shares),
            (Some(4), Some(30_000_000), Some(0), None)
        );
        let (_, v) = vm(&["vm", "set", "a", "--net-limit=1G"]);
        let VmCmd::Set(_, s, None) = v else { panic!() };
        assert_eq!(s.net_limit, Some(1_000_000_000));
        for bad in ["fast", "1.5M", "-1", "20000000000G"] {
            assert!(
                refused(&["vm", "set", "a", "--net-limit", bad]).contains("bits per second"),
                "{bad}"
            );
        }
        assert!(refused(&["vm", "set", "a", "--net-shares", "x"]).contains("--net-shares"));
        assert!(refused(&["vm", "set", "a"]).contains("--net-shares N"));
    }

    #[test]
    fn an_uplink_rate_is_bits_per_second_with_an_uplink() {
        let Ok(Command::Net(_, n)) = parse(&args(&[
            "net",
            "create",
            "wan",
            "--uplink",
            "tap=tap-wan",
            "--uplink-rate=100M",
        ])) else {
            panic!()
        };
        assert_eq!(
            n,
            NetCmd::Create("wan".into(), Some("tap-wan".into()), Some(100_000_000))
        );
        let Ok(Command::Net(_, n)) = parse(&args(&["net", "create", "lan"])) else {
            panic!()
        };
        assert_eq!(n, NetCmd::Create("lan".into(), None, None));
        assert!(refused(&["net", "create", "lan", "--uplink-rate", "1G"])
            .contains("--uplink-rate needs --uplink tap=NAME"));
        assert!(
            refused(&["net", "create", "wan", "--uplink=tap=t", "--uplink-rate=0"])
                .contains("--uplink-rate 0")
        );
        assert!(refused(&[
            "net",
            "create",
            "wan",
            "--uplink=tap=t",
            "--uplink-rate=fast"
        ])
        .contains("bits per second"));
    }

    #[test]
    fn disk_shares_are_a_count_and_iops() {
        let (_, v) = vm(&[
            "vm",
            "set",
            "a",
            "--disk-shares",
            "4",
            "--disk-iops-reservation=300",
            "--disk-iops-limit",
            "none",
        ]);
        let VmCmd::Set(_, s, None) = v else { panic!() };
        assert_eq!(
            (
                s.disk_shares,
                s.disk_reservation_iops,
                s.disk_limit_iops,
                s.net_shares
            ),
            (Some(4), Some(300), Some(0), None)
        );
        let (_, v) = vm(&["vm", "set", "a", "--disk-iops-limit=500"]);
        let VmCmd::Set(_, s, None) = v else { panic!() };
        assert_eq!(s.disk_limit_iops, Some(500));
        for bad in ["fast", "1.5", "-1", "1K"] {
            assert!(
                refused(&["vm", "set", "a", "--disk-iops-limit", bad])
                    .contains("is not a whole number of I/Os per second"),
                "{bad}"
            );
        }
        for bad in ["0", "1000001", "x"] {
            assert!(
                refused(&["vm", "set", "a", "--disk-shares", bad])
                    .contains("is not a whole number from 1 to 1000000"),
                "{bad}"
            );
        }
        assert!(refused(&[
            "vm",
            "set",
            "a",
            "--disk-iops-reservation",
            "600",
            "--disk-iops-limit",
            "500"
        ])
        .contains("--disk-iops-reservation 600 is above --disk-iops-limit 500"));
        assert!(refused(&["vm", "set", "a"]).contains("--disk-shares N"));
    }

    #[test]
    fn a_memory_target_is_a_size() {
        let (_, v) = vm(&["vm", "set", "a", "--memory-target", "512M"]);
        assert_eq!(v, VmCmd::Set("a".into(), Sched::default(), Some(512 << 20)));
        let (_, v) = vm(&["vm", "set", "a", "--shares=5", "--memory-target=1G"]);
        let VmCmd::Set(_, s, t) = v else { panic!() };
        assert_eq!((s.shares, t), (Some(5), Some(1 << 30)));
        assert!(refused(&["vm", "set", "a", "--memory-target", "lots"]).contains("--memory-target"));
        assert!(refused(&["run", "--balloon", "maybe"]).contains("--balloon takes on or off"));
    }

    #[test]
    fn relative_paths_become_absolute() {
        let (_, VmCmd::Create(s)) = vm(&[
            "vm",
            "create",
            "a",
            "--kernel=k/bzImage",
            "--initrd",
            "i.img",
            "--disk",
            "path=d.img,readonly=on",
            "--disk=vmkfs=ds.img:web",
        ]) else {
            panic!()
        };
        let cwd = std::env::current_dir().unwrap();
        let c = &s.config;
        assert_eq!(c.kernel, KernelSource::Path(cwd.join("k/bzImage")));
        assert_eq!(c.initrd, Some(cwd.join("i.img")));
        let disks: Vec<_> = c.disks.iter().map(|d| (&d.path, d.readonly)).collect();
        assert_eq!(
            disks,
            [(&cwd.join("d.img"), true), (&cwd.join("ds.img"), false)]
        );
        assert_eq!(c.disks[1].vmkfs.as_deref(), Some("web"));
    }

    #[test]
    fn a_device_path_switch_is_parsed() {
        let (_, v) = vm(&[
            "vm",
            "device",
            "web",
            "net0",
            "--path",
            "interposed",
            "--capture=net0.pcap",
        ]);
        assert_eq!(
            v,
            VmCmd::Device(
                "web".into(),
                "net0".into(),
                "interposed".into(),
                Some("net0.pcap".into())
            )
        );
        let (_, v) = vm(&["vm", "device", "web", "disk0", "--path=direct"]);
        assert_eq!(
            v,
            VmCmd::Device("web".into(), "disk0".into(), "direct".into(), None)
        );
    }

    #[test]
    fn options_a_command_does_not_use_are_refused() {
        for (line, needle) in [
            (&["vm", "create", "a", "--serial", "none"][..], "'--serial'"),
            (&["vm", "create", "a", "--stats"], "'--stats'"),
            (
                &["vm", "create", "a", "--console-socket=/s"],
                "'--console-socket'",
            ),
            (&["vm", "create", "a", "--state-dir", "/s"], "'--state-dir'"),
            (&["vm", "list", "--shares", "3"], "'--shares'"),
            (&["vm", "info", "a", "b"], "unexpected 'b'"),
            (&["vm", "info"], "takes 1 argument"),
            (&["vm", "set", "a", "--memory", "1G"], "'--memory'"),
            (&["vm", "set", "a"], "needs --shares"),
            (
                &["vm", "create", "a", "--file", "x.toml", "--vcpus", "2"],
                "--vcpus cannot",
            ),
            (&["vm", "create", "--vcpus", "2"], "needs a VM name"),
            (&["vm", "frob"], "unknown 'wv vm' command 'frob'"),
            (&["vm", "device", "a", "net0"], "needs --path"),
            (
                &["vm", "device", "a", "net0", "--path", "x"],
                "'x' is not direct",
            ),
            (
                &[
                    "vm",
                    "device",
                    "a",
                    "net0",
                    "--path=direct",
                    "--capture=c.pcap",
                ],
                "--capture needs --path interposed",
            ),
            (&["host", "--listen", "127.0.0.1:1", "--bogus"], "'--bogus'"),
            (&["host", "--json"], "'--json'"),
            (&["host", "status", "--state-dir", "/x"], "'--state-dir'"),
            (&["host", "top", "--listen=1"], "'--listen'"),
            (&["host", "frob"], "unknown 'wv host' command"),
            (&["run", "--shares", "2"], "'--shares'"),
            (
                &["run", "--config", "vm.json", "--memory", "1G"],
                "--memory cannot be added",
            ),
            (
                &["run", "--config=vm.json", "--kernel=k"],
                "--kernel cannot",
            ),
            (&["run", "--config"], "needs a value"),
            (&["run", "extra"], "unexpected 'extra'"),
            (&["run", "--vcpus"], "needs a value"),
            (&["vm", "list", "--json=yes"], "takes no value"),
            (&["probe-image", "--format", "pvh"], "needs --format"),
        ] {
            let m = refused(line);
            assert!(m.contains(needle), "{line:?}: {m}");
            assert!(!m.contains('\n'), "{line:?}: one line: {m}");
        }
    }

    #[test]
    fn every_command_answers_help() {
        let lines: &[&[&str]] = &[
            &["--help"],
            &["run", "-h"],
            &["probe-image", "--help"],
            &["host", "--help"],
            &["host", "--listen", "x", "-h"],
            &["host", "status", "--help"],
            &["host", "top", "-h"],
            &["vm", "--help"],
            &["vm", "create", "--help"],
            &["vm", "set", "-h"],
            &["vm", "list", "--help"],
            &["vm", "delete", "--help"],
            &["fs", "--help"],
            &["fs", "create", "--help"],
        ];
        for line in lines {
            match parse(&args(line)) {
                Ok(Command::Help(text)) => assert!(text.contains("Usage"), "{line:?}: {text}"),
                other => panic!("{line:?}: {other:?}"),
            }
        }
        // A subcommand's usage lists exactly what it accepts.
        let Ok(Command::Help(t)) = parse(&args(&["vm", "create", "--help"])) else {
            panic!()
        };
        assert!(
            t.contains("--memory <SIZE>") && t.contains("--shares <N>") && !t.contains("--serial"),
            "{t}"
        );
    }

    #[test]
    fn options_may_come_before_the_subcommand() {
        let (c, v) = vm(&["vm", "--socket", "/s", "info", "a", "--json"]);
        assert_eq!(
            (c.socket, c.json, v),
            (PathBuf::from("/s"), true, VmCmd::Named("info", "a".into()))
        );
        let Ok(Command::HostServe { listen, .. }) =
            parse(&args(&["host", "--listen", "127.0.0.1:7"]))
        else {
            panic!()
        };
        assert_eq!(listen.as_deref(), Some("127.0.0.1:7"));
    }

    #[test]
    fn the_lending_options_are_sizes_and_a_percentage() {
        let Ok(Command::HostServe { memory, .. }) = parse(&args(&["host"])) else {
            panic!()
        };
        assert_eq!(memory, wv_host::lending::Settings::default());
        assert_eq!((memory.reserve, memory.tax_pct), (0, 75));
        let Ok(Command::HostServe { memory, .. }) = parse(&args(&[
            "host",
            "--host-memory-reserve",
            "1G",
            "--idle-memory-tax=50",
            "--host-memory",
            "8G",
        ])) else {
            panic!()
        };
        assert_eq!(
            (memory.reserve, memory.tax_pct, memory.host_memory),
            (1 << 30, 50, Some(8 << 30))
        );
        assert!(refused(&["host", "--idle-memory-tax", "100"]).contains("0 to 99"));
        assert!(refused(&["host", "--idle-memory-tax", "-1"]).contains("--idle-memory-tax"));
        assert!(
            refused(&["host", "--host-memory-reserve", "lots"]).contains("--host-memory-reserve")
        );
        assert!(refused(&["host", "--host-memory", "0"]).contains("above 0"));
        assert!(matches!(
            parse(&args(&["host", "memory", "--json"])),
            Ok(Command::HostMemory(Client { json: true, .. }))
        ));
    }

    #[test]
    fn double_dash_ends_the_options() {
        let (_, v) = vm(&["vm", "info", "--", "-odd"]);
        assert_eq!(v, VmCmd::Named("info", "-odd".into()));
        let (_, v) = vm(&["vm", "delete", "--", "--json"]);
        assert_eq!(v, VmCmd::Named("delete", "--json".into()));
        assert!(refused(&["vm", "info", "a", "--", "b"]).contains("unexpected 'b'"));
    }

    #[test]
    fn run_takes_the_whole_vm_from_a_config_file() {
        let dir = std::env::temp_dir().join(format!("wv-cli-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        };
        let vm = file(
            "vm.json",
            r#"{"kernel":"k/vmlinux","memory":"64M","vcpus":2,"disks":[{"path":"d.img","id":"root"}]}"#,
        );
        let Ok(Command::Run(c, stats, _, _)) = parse(&args(&[
            "run", "--config", &vm, "--serial", "none", "--stats",
        ])) else {
            panic!()
        };
        assert_eq!(c.kernel, KernelSource::Path(dir.join("k/vmlinux")));
        assert_eq!(c.cmdline, wv_config::KERNEL_CMDLINE);
        assert_eq!((c.memory, c.vcpus), (64 << 20, 2));
        assert_eq!(c.disks[0].path, dir.join("d.img"));
        assert_eq!(
            (c.serial.clone(), stats),
            (SerialMode::None, StatsMode::Table)
        );
        let toml = file("vm.toml", "vcpus = 3\n");
        let Ok(Command::Run(c, _, _, _)) = parse(&args(&["run", "--config", &toml])) else {
            panic!()
        };
        assert_eq!((c.vcpus, c.kernel.clone()), (3, KernelSource::default()));
        for (text, needle) in [
            (r#"{"vcpus":2,"colour":"red"}"#, "unknown field `colour`"),
            (r#"{"memory":"lots"}"#, "invalid size 'lots'"),
            ("[]", "expected a JSON object"),
            ("{\n\"vcpus\":", "EOF"),
        ] {
            let bad = file("bad.json", text);
            let e = refused(&["run", "--config", &bad]);
            assert!(e.contains("bad.json") && e.contains(needle), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let bad = file("bad.toml", "vcpus = \n");
        assert!(!refused(&["run", "--config", &bad]).contains('\n'));
        assert!(refused(&["run", "--config", "/nonexistent.json"]).contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clone_options_go_with_restore() {
        let Ok(Command::Run(_, _, RunFrom::Snapshot(r), _)) = parse(&args(&[
            "run",
            "--restore",
            "/snap",
            "--clone",
            "--mac",
            "1=52:54:00:00:00:01",
            "--mac=0=02:00:00:00:00:02",
        ])) else {
            panic!()
        };
        assert_eq!(r.dir, PathBuf::from("/snap"));
        assert_eq!(
            r.opts,
            wv_vmm::RestoreOptions {
                clone: true,
                macs: vec![(1, [0x52, 0x54, 0, 0, 0, 1]), (0, [2, 0, 0, 0, 0, 2])],
                sockets: Vec::new(),
            }
        );
        let Ok(Command::Run(_, _, RunFrom::Snapshot(r), _)) =
            parse(&args(&["run", "--restore", "/snap"]))
        else {
            panic!()
        };
        assert_eq!(r.opts, wv_vmm::RestoreOptions::default());
        assert!(refused(&["run", "--clone"]).contains("needs --restore"));
        assert!(refused(&["run", "--mac", "0=02:00:00:00:00:01"]).contains("needs --restore"));
        assert!(
            refused(&["run", "--restore", "/s", "--mac", "0=02:00:00:00:00:01"])
                .contains("needs --clone")
        );
        for bad in [
            "02:00:00:00:00:01",
            "x=02:00:00:00:00:01",
            "0=nope",
            "0=01:00:00:00:00:01",
        ] {
            let e = refused(&["run", "--restore", "/s", "--clone", "--mac", bad]);
            assert!(e.contains("expected INDEX=MAC"), "{bad}: {e}");
        }
    }

    #[test]
    fn run_reads_its_options() {
        let Ok(Command::Run(c, stats, _, _)) = parse(&args(&[
            "run",
            "--memory=64M",
            "--vcpus",
            "2",
            "--stats=json",
            "--serial=none",
            "--rng=off",
        ])) else {
            panic!()
        };
        assert_eq!(
            (c.memory, c.vcpus, stats, c.serial, c.rng),
            (64 << 20, 2, StatsMode::Json, SerialMode::None, false)
        );
        assert!(refused(&["run", "--stats=xml"]).contains("table or json"));
    }

    /// Every command and subcommand of the clap tree (and `wv run`) answers `-h` and `--help`
    /// with its own usage.
    #[test]
    fn every_command_of_the_tree_answers_help() {
        fn walk(c: &clap::Command, path: &mut Vec<String>, all: &mut Vec<Vec<String>>) {
            for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
                path.push(s.get_name().to_string());
                all.push(path.clone());
                walk(s, path, all);
                path.pop();
            }
        }
        let mut all = Vec::new();
        walk(&crate::commands::command_tree(), &mut Vec::new(), &mut all);
        assert!(all.len() > 50, "{all:?}");
        for path in &all {
            for h in ["-h", "--help"] {
                let mut line = path.clone();
                line.push(h.into());
                let want = format!("Usage: wv {}", path.join(" "));
                match parse(&line) {
                    Ok(Command::Help(t)) => assert!(t.starts_with(&want), "{line:?}: {t}"),
                    other => panic!("{line:?}: {other:?}"),
                }
            }
        }
        // `wv help ...` too, `wv run`'s from its own table.
        let Ok(Command::Help(t)) = parse(&args(&["help", "run"])) else {
            panic!()
        };
        assert_eq!(t, usage(&RUN));
        let Ok(Command::Help(t)) = parse(&args(&["help", "vm", "set"])) else {
            panic!()
        };
        assert!(t.starts_with("Usage: wv vm set"), "{t}");
    }

    /// `wv vm create` offers exactly `wv run`'s VM options: same names, values and help.
    #[test]
    fn vm_create_has_the_vm_options_of_run() {
        let got = crate::commands::vm_create_options();
        let want: Vec<(String, String, String)> = VM_OPTS
            .iter()
            .map(|o| {
                let Arg::Value(v) = o.arg else {
                    panic!("{o:?}")
                };
                (o.long.to_string(), v.to_string(), o.help.to_string())
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn usage_errors_are_one_line() {
        for (line, needle) in [
            (&["frob"][..], "unknown command 'frob' (see wv --help)"),
            (&["vm"], "wv vm needs a command: create, set"),
            (&["net"], "wv net needs a command: create, list"),
            (
                &["fs", "ls"],
                "wv fs ls takes 1 argument (DS): missing <DS>",
            ),
            (
                &["vm", "snapshot", "a"],
                "takes 2 arguments (NAME SNAPSHOT)",
            ),
            (
                &["vm", "list", "x"],
                "wv vm list takes no arguments: unexpected 'x'",
            ),
            (
                &["vm", "create", "a", "--memory"],
                "option --memory needs a value (SIZE)",
            ),
            (
                &["vm", "create", "a", "--memory=lots"],
                "--memory: invalid size 'lots'",
            ),
            (&["host", "--listen=x", "status"], "cannot be used with"),
            (&["completions", "fish"], "bash or zsh"),
            (&["node", "--listen"], "option --listen needs a value"),
        ] {
            let m = refused(line);
            assert!(m.contains(needle), "{line:?}: {m}");
            assert!(!m.contains('\n'), "{line:?}: one line: {m}");
        }
        // A value may start with '-', as in `wv run`: a bad value, not a missing one.
        assert!(
            refused(&["vm", "set", "a", "--shares", "-1"]).contains("'-1' is not a whole number")
        );
        // The last of an option given twice counts, as in `wv run`.
        let (_, v) = vm(&["vm", "clone", "s", "n", "--count=2", "--count", "3"]);
        assert_eq!(v, VmCmd::Clone("s".into(), "n".into(), 3));
        // `wv vm device add` is `wv vm device-add`.
        let (_, v) = vm(&["vm", "device", "remove", "a", "disk1"]);
        assert_eq!(v, VmCmd::DeviceRemove("a".into(), "disk1".into()));
        assert!(
            matches!(parse(&args(&["--version"])), Ok(Command::Help(v)) if v.starts_with("wv "))
        );
    }

    #[test]
    fn host_install_keeps_the_daemon_options() {
        let Ok(Command::HostInstall {
            unit_dir,
            args: a,
            socket,
        }) = parse(&args(&[
            "host",
            "install",
            "--unit-dir=/u",
            "--state-dir",
            "st",
            "--listen",
            "127.0.0.1:7",
            "--no-jail",
            "--images=/i",
            "--host-memory",
            "8G",
        ]))
        else {
            panic!()
        };
        let cwd = std::env::current_dir().unwrap();
        let st = cwd.join("st").display().to_string();
        assert_eq!((unit_dir, socket), (PathBuf::from("/u"), None::<PathBuf>));
        assert_eq!(
            a,
            [
                "--state-dir",
                &st,
                "--listen",
                "127.0.0.1:7",
                "--images",
                "/i",
                "--no-jail",
                "--host-memory",
                "8G"
            ]
        );
    }
}
