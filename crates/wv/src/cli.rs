//! The `wv` command line: a table of options for every command, ONE scanner that reads every
//! command's arguments by the same rules, and the typed result each command runs from.
//!
//! The rules, the same for every command and subcommand: `--opt value` and `--opt=value`;
//! `-h`/`--help` prints the command's usage (generated from the same table the scanner reads,
//! so the two cannot disagree) to stdout; an option the command does not use, a missing or
//! unwanted value, or a stray argument is a one-line [`Usage`] error (exit 200); `--` ends the
//! options. Paths that go to the daemon are made absolute here, against the client's working
//! directory (a definition file's paths: against the file's directory).
//!
//! Hand-written rather than clap: measured with `perf stat -r 300` on a release build, clap
//! (derive) parsing a command tree of `wv`'s size costs about 0.15-0.2 ms more per start than
//! this scanner, several percent of `wv run`'s few-millisecond start.

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
    /// The `i`th positional argument.
    pub fn arg(&self, i: usize) -> Option<&str> {
        self.pos.get(i).map(String::as_str)
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

/// The index of the first positional argument in `args` (a family's subcommand word), skipping
/// the options of `specs` and their values.
fn subcommand_at(args: &[String], specs: &[&Spec]) -> Option<usize> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            return (i + 1 < args.len()).then_some(i + 1);
        }
        if a == "-" || !a.starts_with('-') {
            return Some(i);
        }
        let takes_value = !a.contains('=')
            && specs
                .iter()
                .find_map(|s| s.find(a))
                .is_some_and(|o| matches!(o.arg, Arg::Value(_)));
        i += if takes_value { 2 } else { 1 };
    }
    None
}

/// Splits `args` into a family's subcommand word and the rest (options may come before it).
pub fn split_subcommand(args: &[String], specs: &[&Spec]) -> (Option<String>, Vec<String>) {
    match subcommand_at(args, specs) {
        Some(i) => {
            let mut rest = args.to_vec();
            let sub = rest.remove(i);
            (Some(sub), rest)
        }
        None => (None, args.to_vec()),
    }
}

fn wants_help(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
}

// ---- The tables ----

const MEMORY: Opt = opt(
    "--memory",
    Arg::Value("SIZE"),
    "guest RAM, e.g. 256M, 2G (default 256M)",
);
const VCPUS: Opt = opt("--vcpus", Arg::Value("N"), "vCPUs, 1 to 32 (default 1)");

/// What a VM is made of: the options `wv run` and `wv vm create` share.
const VM_OPTS: &[Opt] = &[
    opt(
        "--kernel",
        Arg::Value("PATH"),
        "Linux bzImage (64-bit boot protocol) or ELF with a PVH note\n(default: the embedded probe guest)",
    ),
    opt("--initrd", Arg::Value("PATH"), "initial ramdisk"),
    opt(
        "--cmdline",
        Arg::Value("STR"),
        "kernel command line (default for --kernel: \"console=ttyS0 reboot=k panic=1\";\nfor the probe guest: \"console=ttyS0 probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng\")",
    ),
    MEMORY,
    opt(
        "--memory-shared",
        Arg::Value("on|off"),
        "back guest RAM with a memfd mapped shared, which a vhost-user backend can map\n(default off; always on with a --net or --disk vhost-user=)",
    ),
    VCPUS,
    opt(
        "--disk",
        Arg::Value("SPEC"),
        "a virtio-blk disk (repeatable): path=IMG[,readonly=on][,id=NAME] (raw image or\nblock device; read-write disks are locked against a second writer),\nvmkfs=DATASTORE:NAME[,readonly=on][,id=NAME] (disk NAME of a VMKFS datastore), or\nvhost-user=SOCKET[,readonly=on][,id=NAME] (served by a vhost-user backend such as\nwv storage; docs/STORAGE.md); ,via=storage (wv vm create only): the image or VMKFS\ndisk is opened, held and served by the daemon's storage service instead of the VMM",
    ),
    opt(
        "--net",
        Arg::Value("SPEC"),
        "tap=NAME[,mac=MAC][,id=ID]: a virtio-net device on TAP NAME (created and brought\nup if missing, which needs CAP_NET_ADMIN); vhost-user=SOCKET[,mac=MAC][,id=ID]:\none whose queues a vhost-user backend serves (wv vswitch; docs/NETWORK.md);\nnetwork=NETWORK[,mac=MAC][,id=ID] (wv vm create only): one on the daemon's\nnetwork NETWORK (wv net create), served by its switch;\nMAC generated if not given (repeatable)",
    ),
    opt(
        "--rng",
        Arg::Value("on|off"),
        "a virtio-rng device for guest entropy (default on)",
    ),
    opt(
        "--balloon",
        Arg::Value("on|off"),
        "a virtio-balloon device: memory the host can take back and lend (PUT /vm/balloon,\nwv vm set --memory-target), free page reporting, guest memory statistics\n(default off for wv run, on for wv vm create)",
    ),
];

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

/// `wv node`: a cluster node.
const NODE: Spec = Spec {
    cmd: "wv node",
    pos: &[],
    about: "Runs a cluster node in the foreground: listens on ADDR, prints 'wv node: listening on\nADDR' (the port bound), takes its part from node 0 (wv run --cluster) on the first\nconnection, then serves its share of the guest's memory (and runs the vCPUs it is\ngiven, if any) until node 0 stops it. Exits non-zero when node 0 or another node is\nlost. docs/CLUSTER.md.",
    opts: &[&[opt(
        "--listen",
        Arg::Value("ADDR"),
        "HOST:PORT to listen on (port 0: any free port) (required)",
    )]],
    after: "Exit status: 0 stopped by node 0, 1 the node failed or lost its cluster, 200 bad arguments.",
};

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

const SCHED_OPTS: &[Opt] = &[
    opt(
        "--shares",
        Arg::Value("N"),
        "proportional CPU shares, 1 to 10000 (default 1000)",
    ),
    opt(
        "--reservation",
        Arg::Value("CPUS"),
        "CPUs guaranteed while it runs (0 to one per vCPU)",
    ),
    opt(
        "--limit",
        Arg::Value("CPUS|none"),
        "CPUs it may use at most (none: no limit)",
    ),
];

const SOCKET: Opt = opt(
    "--socket",
    Arg::Value("PATH"),
    "the daemon's socket: a path or tcp:HOST:PORT\n(default: $WV_SOCKET, else /run/worldvisor/wv.sock)",
);
const JSON: Opt = opt("--json", Arg::Flag, "machine-readable output");
const CLIENT_OPTS: &[Opt] = &[SOCKET, JSON];
const FILE: &[Opt] = &[opt(
    "--file",
    Arg::Value("SPEC"),
    "the whole definition from a .toml or .json file with the fields of POST /v1/vms\n(relative paths in it are relative to the file); NAME overrides its name",
)];

const CLIENT_STATUS: &str =
    "Exit status: 0 done, 1 the daemon refused (its error is printed), 2 no daemon at the
socket, 200 bad arguments.";

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

const VSWITCH: Spec = Spec {
    cmd: "wv vswitch",
    pos: &[],
    about: "Runs the virtual switch in the foreground: an L2 learning switch per network whose ports
are vhost-user net backends, one socket each at DIR/NETWORK/PORT.sock, for VMs started with
--net vhost-user=DIR/NETWORK/PORT.sock. Networks are isolated from one another; an uplink
connects a network to the host through a TAP. On DIR/control.sock, one request a line, one
JSON line back: 'stats' (counters per port), 'nets', 'net add NAME [uplink=TAP]', 'net del NAME',
'port add NETWORK/PORT', 'port del NETWORK/PORT' (networks and ports change at run time).
docs/NETWORK.md.",
    opts: &[&[
        opt(
            "--socket-dir",
            Arg::Value("DIR"),
            "where the sockets are made (required)",
        ),
        opt(
            "--port",
            Arg::Value("NETWORK/PORT"),
            "a VM port on network NETWORK (repeatable; the network is made with its first port)",
        ),
        opt(
            "--network",
            Arg::Value("NAME"),
            "a network without VM ports yet (repeatable)",
        ),
        opt(
            "--uplink",
            Arg::Value("NETWORK=TAP"),
            "connect NETWORK to the host through TAP (created and brought up if missing,\nwhich needs CAP_NET_ADMIN; repeatable, one per network)",
        ),
    ]],
    after: "Exit status: 200 bad arguments, 1 the switch could not start.",
};

const STORAGE: Spec = Spec {
    cmd: "wv storage",
    pos: &[],
    about: "Runs the storage service in the foreground: it holds disks (raw images, VMKFS disks) and
serves each over vhost-user-blk on DIR/NAME.sock, for VMs started with
--disk vhost-user=DIR/NAME.sock. It holds each disk's exclusive open while it serves it.
Control: send 'stats', 'disk add NAME=SPEC' or 'disk del NAME' on DIR/control.sock (one JSON
line back each). docs/STORAGE.md.",
    opts: &[&[
        opt(
            "--socket-dir",
            Arg::Value("DIR"),
            "where the sockets are made (required)",
        ),
        opt(
            "--disk",
            Arg::Value("NAME=SPEC"),
            "serve a disk as NAME (repeatable; none: disks come with 'disk add'):\nNAME=path=IMG or NAME=vmkfs=DATASTORE:DISK, then [,readonly=on]",
        ),
        opt(
            "--take-stale-locks",
            Arg::Flag,
            "break a VMKFS disk's stale lock record (its writer, such as a storage service\nthat was killed, is gone) and take the disk",
        ),
        opt(
            "--capacity-iops",
            Arg::Value("N"),
            "each device's capacity in I/Os per second (a request costs 1 + bytes/32KiB;\na device: a VMKFS datastore, or all raw images together), shared by its disks\nby their shares, reservations and limits ('disk set NAME shares=N\nreservation_iops=R limit_iops=L', 'set capacity_iops=N [device=DEV]' on the\ncontrol socket; default: none)",
        ),
    ]],
    after: "Exit status: 200 bad arguments, 1 the service could not start.",
};

const PROBE_IMAGE: Spec = Spec {
    cmd: "wv probe-image",
    pos: &[],
    about: "Writes an embedded guest image to FILE (for QEMU or other loaders).",
    opts: &[&[
        opt(
            "--format",
            Arg::Value("pvh|bzimage|exitbench"),
            "which image (required)",
        ),
        Opt {
            long: "--output",
            short: Some("-o"),
            arg: Arg::Value("FILE"),
            help: "where to write it (required)",
        },
    ]],
    after: "",
};

/// The daemon's options (`wv host`, and `wv host install`, which writes them into a unit).
const DAEMON_OPTS: &[Opt] = &[
        opt(
            "--socket",
            Arg::Value("PATH"),
            "the Unix socket to serve on\n(default: $WV_SOCKET, else /run/worldvisor/wv.sock)",
        ),
        opt(
            "--state-dir",
            Arg::Value("DIR"),
            "where definitions and state persist (default /var/lib/worldvisor)",
        ),
        opt(
            "--listen",
            Arg::Value("ADDR:PORT"),
            "also serve the API on TCP, to clients with the token (wv host token)",
        ),
        opt(
            "--web",
            Arg::Value("ADDR:PORT"),
            "serve the web console on TCP (log in with the token; also at / on the socket)",
        ),
        opt(
            "--images",
            Arg::Value("DIR"),
            "VMs' kernels, initrds and disks must be under DIR (repeatable;\nwithout it, any file the daemon can read)",
        ),        opt(
            "--jail-uids",
            Arg::Value("FIRST-LAST"),
            "run world N's VMM jailed as user and group FIRST+N (wv run --jail: no\ncapabilities, its own namespaces and root; default 3000000000-3000999999)",
        ),
        opt(
            "--no-jail",
            Arg::Flag,
            "run VMMs as the daemon's user, unjailed (debugging only)",
        ),
        opt(
            "--host-memory-reserve",
            Arg::Value("SIZE"),
            "lend memory between running VMs: while the host has less than SIZE free,\nballoon memory back from the VMs with the fewest shares per active page, and\ngive it back when there is enough again or a VM needs it (default off)",
        ),
        opt(
            "--idle-memory-tax",
            Arg::Value("PCT"),
            "the policy's tax on idle memory: an idle page costs 1/(1-PCT/100) active\nones (0-99, default 75)",
        ),
        opt(
            "--host-memory",
            Arg::Value("SIZE"),
            "the memory the daemon's VMs may use in total (a host that keeps the rest for\nother work): free memory is then SIZE less their resident memory, if less\nthan MemAvailable",
        ),
        opt(
            "--storage-capacity-iops",
            Arg::Value("N"),
            "the I/Os per second of each datastore (and of the raw images together) that\nthe disks the storage service serves share by their VMs' --disk-shares,\nreservations and limits (a request costs 1 + bytes/32KiB; default: none, each\nas fast as it goes, shared only when it is the bottleneck)",
        ),
];

const HOST: Spec = Spec {
    cmd: "wv host",
    pos: &[],
    about: "Runs the host daemon that owns this host's VMs, serving the REST API on a Unix socket.
SIGTERM or SIGINT ends it, leaving its VMs running (a daemon started again takes them back);
wv host shutdown stops them too. Either way it removes what it made outside its state directory.

Other commands:
  wv host status [--json]         ask the daemon how the host is doing
  wv host memory [--json]         the memory lending policy and every VM's memory
  wv host top [--once] [--json]   CPU, ready and throttled time of every world, each second
  wv host token                   the token for clients over TCP
  wv host shutdown                stop every VM, then the daemon
  wv host install [OPTIONS]       write a systemd unit that runs wv host with OPTIONS
  wv host uninstall [--yes]       remove the state directory and what a dead daemon left",
    opts: &[DAEMON_OPTS],
    after: "",
};

const HOST_SHUTDOWN: Spec = Spec {
    cmd: "wv host shutdown",
    pos: &[],
    about: "Stops every VM of the daemon (each through its VMM's control socket, then SIGTERM, then
SIGKILL, 5 s apart), then the daemon itself, which removes what it made outside its state
directory (its cgroups, its socket and the folders it created for it) and ends.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const HOST_UNINSTALL: Spec = Spec {
    cmd: "wv host uninstall",
    pos: &[],
    about: "Removes the daemon's state directory (VM definitions, logs, snapshots, the token) and
whatever a daemon of it that was killed left outside it (its socket, the folders it made for
it, its cgroups). Refused while a daemon runs on that state directory or a VMM of it still
runs (stop them first: wv host shutdown). Asks first, unless --yes; without --yes and with no
terminal to ask on, it refuses. Disk images and datastores outside the state directory stay.",
    opts: &[&[
        opt(
            "--state-dir",
            Arg::Value("DIR"),
            "the daemon's state directory (default /var/lib/worldvisor)",
        ),
        opt("--yes", Arg::Flag, "do not ask"),
    ]],
    after: "Exit status: 0 removed (or nothing there), 1 refused or failed, 200 bad arguments.",
};

const HOST_INSTALL: Spec = Spec {
    cmd: "wv host install",
    pos: &[],
    about:
        "Writes a systemd unit, worldvisor.service, that runs this wv as `wv host` with the options
given (paths made absolute), and does nothing else: enable it with
  systemctl daemon-reload && systemctl enable --now worldvisor
Stopping the unit runs wv host shutdown (every VM stops, then the daemon); restarting the
daemon alone, its VMs left running: systemctl kill -s TERM worldvisor.",
    opts: &[
        &[opt(
            "--unit-dir",
            Arg::Value("DIR"),
            "where to write worldvisor.service (default /etc/systemd/system)",
        )],
        DAEMON_OPTS,
    ],
    after: "Exit status: 0 written, 1 could not write it, 200 bad arguments.",
};

const HOST_STATUS: Spec = Spec {
    cmd: "wv host status",
    pos: &[],
    about: "Asks the daemon how the host is doing: CPUs, scheduler, worlds.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const HOST_MEMORY: Spec = Spec {
    cmd: "wv host memory",
    pos: &[],
    about: "Shows the memory lending policy (wv host --host-memory-reserve): its reserve, the host's free
memory, its last action, and for every running VM its shares, active fraction, memory target,
current memory, what it lent and what it holds above its fair share (docs/DEVICES.md).",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const HOST_TOKEN: Spec = Spec {
    cmd: "wv host token",
    pos: &[],
    about: "Prints the token a client must send to reach the API over TCP (--listen): the daemon
makes it at first start, readable by its owner only, in the state directory. Clients over TCP
read it from WV_TOKEN:
  export WV_SOCKET=tcp:127.0.0.1:7070 WV_TOKEN=$(wv host token)",
    opts: &[&[opt(
        "--state-dir",
        Arg::Value("DIR"),
        "the daemon's state directory (default /var/lib/worldvisor)",
    )]],
    after: "Exit status: 0 printed, 1 no token (the daemon never ran with this state directory).",
};

const HOST_TOP: Spec = Spec {
    cmd: "wv host top",
    pos: &[],
    about: "Shows the CPU, ready and throttled time of every world, each second.",
    opts: &[
        &[opt(
            "--once",
            Arg::Flag,
            "one sample (over one second), then exit",
        )],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_CREATE: Spec = Spec {
    cmd: "wv vm create",
    pos: &["[NAME]"],
    about:
        "Defines a VM NAME on the daemon (start it with wv vm start NAME). The VM options are those
of wv run; its console belongs to the daemon (wv vm console). Relative paths are made
absolute against the current directory before they are sent.",
    opts: &[VM_OPTS, SCHED_OPTS, FILE, CLIENT_OPTS],
    after: CLIENT_STATUS,
};

/// `wv vm set --memory-target`.
const MEMORY_TARGET_OPTS: &[Opt] = &[opt(
    "--memory-target",
    Arg::Value("SIZE"),
    "the memory a running VM with a balloon (--balloon on) is to keep, e.g. 512M: its\nballoon inflates to take the rest back for the host, or deflates to give it back\n(live only; at most its --memory)",
)];

/// `wv vm set --net-*`.
const NET_SHARES_OPTS: &[Opt] = &[
    opt(
        "--net-shares",
        Arg::Value("N"),
        "network shares of each of its ports on the daemon's networks, 1 to 1000000\n(default 1000): what it gets of a contended destination (a VM's port, an uplink)\nagainst the other ports sending there (docs/NETWORK.md)",
    ),
    opt(
        "--net-reservation",
        Arg::Value("BPS"),
        "bits per second each of its ports gets whenever it sends that much, e.g. 100M\n(K, M, G: thousands; 0: none)",
    ),
    opt(
        "--net-limit",
        Arg::Value("BPS|none"),
        "bits per second each of its ports never exceeds, e.g. 1G (none or 0: no limit)",
    ),
];

/// `wv vm set --disk-*`.
const DISK_SHARES_OPTS: &[Opt] = &[
    opt(
        "--disk-shares",
        Arg::Value("N"),
        "storage shares of each of its disks the storage service serves (via=storage),\n1 to 1000000 (default 1000): what it gets of its datastore's I/Os against the\nother served disks on it (docs/STORAGE.md); disks its VMM serves are not scheduled",
    ),
    opt(
        "--disk-iops-reservation",
        Arg::Value("IOPS"),
        "I/Os per second each of its served disks gets whenever it asks for that many\n(a request costs 1 + bytes/32KiB; 0: none)",
    ),
    opt(
        "--disk-iops-limit",
        Arg::Value("IOPS|none"),
        "I/Os per second each of its served disks never exceeds (none or 0: no limit)",
    ),
];

const VM_SET: Spec = Spec {
    cmd: "wv vm set",
    pos: &["NAME"],
    about: "Changes a VM's scheduler settings, network shares and disk shares (live when it runs) or, while it runs, its memory target.",
    opts: &[
        SCHED_OPTS,
        NET_SHARES_OPTS,
        DISK_SHARES_OPTS,
        MEMORY_TARGET_OPTS,
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_LIST: Spec = Spec {
    cmd: "wv vm list",
    pos: &[],
    about: "Lists the daemon's VMs.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

macro_rules! vm_named {
    ($id:ident, $cmd:literal, $about:literal) => {
        const $id: Spec = Spec {
            cmd: $cmd,
            pos: &["NAME"],
            about: $about,
            opts: &[CLIENT_OPTS],
            after: CLIENT_STATUS,
        };
    };
}
vm_named!(
    VM_INFO,
    "wv vm info",
    "Shows a VM: definition, state, process."
);
vm_named!(
    VM_STATS,
    "wv vm stats",
    "Shows a VM's CPU, ready and throttled time, per thread."
);
vm_named!(
    VM_CONSOLE,
    "wv vm console",
    "Attaches the terminal to a running VM's serial console; Ctrl-] detaches."
);
vm_named!(
    VM_START,
    "wv vm start",
    "Starts a VM in its own VMM process, supervised by the daemon."
);
vm_named!(VM_STOP, "wv vm stop", "Stops a running VM.");
vm_named!(VM_PAUSE, "wv vm pause", "Pauses a running VM.");
vm_named!(VM_RESUME, "wv vm resume", "Resumes a paused VM.");
vm_named!(
    VM_DELETE,
    "wv vm delete",
    "Deletes a VM's definition and state."
);

const VM_SNAPSHOT: Spec = Spec {
    cmd: "wv vm snapshot",
    pos: &["NAME", "SNAPSHOT"],
    about: "Saves a running VM (state, devices and memory) as the daemon's snapshot SNAPSHOT;\nthe VM runs on (docs/SNAPSHOT.md).",
    opts: &[
        &[opt(
            "--allow-raw-disk",
            Arg::Flag,
            "snapshot a VM with disks: you keep the disk images consistent with it",
        )],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_DEVICE_ADD: Spec = Spec {
    cmd: "wv vm device-add",
    pos: &["NAME"],
    about: "Hot-plugs a disk or a net into the running VM NAME (ACPI PCI hot-plug;\ndocs/DEVICES.md): for a raw image the daemon opens it (under its --images directories), a\nVMKFS disk the storage world serves, for a net it adds a port to its network's switch;\nit hands the VMM the file or connection. A served disk or a net needs the VM's memory\nshared (it was started with a net on a network, or --memory-shared on).\nLive only: the VM's definition does not change. Also spelt `wv vm device add NAME ...`.",
    opts: &[
        &[
            opt(
                "--disk",
                Arg::Value("path=IMG|vmkfs=DS:NAME,id=ID[,readonly=on][,via=storage]"),
                "a disk: a raw image, or a VMKFS disk (served by the storage world), and the\nid to remove it by",
            ),
            opt(
                "--net",
                Arg::Value("network=NAME,id=ID[,mac=MAC]"),
                "a net on one of the daemon's networks, and the id to remove it by",
            ),
        ],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_DEVICE: Spec = Spec {
    cmd: "wv vm device",
    pos: &["NAME", "DEV"],
    about: "Switches the data path of the running VM's vhost-user net or disk DEV (its id=):\n\
            direct (the switch or storage service reads the guest's rings) or interposed (the\n\
            VMM in between), while the guest runs (docs/DEVICES.md, Interposition).",
    opts: &[
        &[
            opt(
                "--path",
                Arg::Value("direct|interposed"),
                "the data path (required)",
            ),
            opt(
                "--capture",
                Arg::Value("FILE"),
                "with interposed: write a net's frames (FILE.pcap) or a disk's requests \
                 (FILE.trace) to FILE in the VM's folder",
            ),
        ],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_DEVICE_REMOVE: Spec = Spec {
    cmd: "wv vm device-remove",
    pos: &["NAME", "ID"],
    about: "Unplugs hot-plugged device ID from the running VM NAME, answering once the guest has\nejected it. Also spelt `wv vm device remove NAME ID`.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const VM_RESTORE: Spec = Spec {
    cmd: "wv vm restore",
    pos: &["NAME", "SNAPSHOT"],
    about: "Starts the stopped VM NAME from snapshot SNAPSHOT instead of booting it; the\nsnapshot's configuration becomes the VM's.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const VM_CLONE: Spec = Spec {
    cmd: "wv vm clone",
    pos: &["SNAPSHOT", "NAME"],
    about: "Starts new VMs from snapshot SNAPSHOT: NAME, or NAME-1..NAME-N with --count N;\neach gets new MACs and a new generation id, and they share the snapshot's memory\nuntil they write it.",
    opts: &[
        &[opt(
            "--count",
            Arg::Value("N"),
            "how many clones (1 to 64, default 1)",
        )],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_MIGRATE: Spec = Spec {
    cmd: "wv vm migrate",
    pos: &["NAME"],
    about: "Moves a running VM to the daemon at HOST:PORT (its API over TCP: wv host --listen)\nwhile it runs; the VM keeps its name there, and here it is stopped, \"migrated to\nHOST:PORT\". On failure it runs on here (docs/MIGRATION.md).",
    opts: &[
        &[
            opt(
                "--to",
                Arg::Value("HOST:PORT"),
                "the target daemon's API over TCP (required)",
            ),
            opt(
                "--token",
                Arg::Value("T"),
                "the target daemon's token (wv host token there; default: $WV_TARGET_TOKEN)",
            ),
            opt(
                "--downtime-ms",
                Arg::Value("N"),
                "the pause the VM may take at the switch-over (default 300)",
            ),
            opt(
                "--copy-disks",
                Arg::Flag,
                "copy the VM's writable disks too (no shared storage): raw images land in the\nVM's folder on the target, VMKFS disks in the target's datastore --datastore",
            ),
            opt(
                "--datastore",
                Arg::Value("PATH"),
                "with --copy-disks: the VMKFS datastore on the target host that the VM's\nVMKFS disks are copied into (needed when it has any)",
            ),
        ],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const VM_SNAPSHOTS: Spec = Spec {
    cmd: "wv vm snapshots",
    pos: &[],
    about: "Lists the daemon's snapshots.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const VM_FORGET: Spec = Spec {
    cmd: "wv vm delete-snapshot",
    pos: &["SNAPSHOT"],
    about: "Deletes a snapshot (VMs restored from it run on).",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const NET_CREATE: Spec = Spec {
    cmd: "wv net create",
    pos: &["NAME"],
    about: "Makes network NAME on the daemon's virtual switch (a world of its own, restarted when it\ndies); VMs join it with wv vm create --net network=NAME[,mac=MAC][,id=ID]. Networks\nare isolated from one another; an uplink connects one to the host (docs/NETWORK.md).",
    opts: &[
        &[
            opt(
                "--uplink",
                Arg::Value("tap=NAME|none"),
                "a TAP connecting the network to the host (created if missing), or none\n(the default)",
            ),
            opt(
                "--uplink-rate",
                Arg::Value("BPS"),
                "the uplink's link speed in bits per second, e.g. 1G (K, M, G: thousands;\nneeds --uplink): frames to the uplink are then scheduled by the sending\nVMs' --net-shares, reservations and limits (default: not scheduled)",
            ),
        ],
        CLIENT_OPTS,
    ],
    after: CLIENT_STATUS,
};

const NET_LIST: Spec = Spec {
    cmd: "wv net list",
    pos: &[],
    about: "Lists the daemon's networks.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const NET_INFO: Spec = Spec {
    cmd: "wv net info",
    pos: &["NAME"],
    about: "Shows a network: the VMs defined on it, and its ports (the VM of each) with the\nswitch's counters: frames, bytes, copies and drops.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const NET_DELETE: Spec = Spec {
    cmd: "wv net delete",
    pos: &["NAME"],
    about: "Deletes a network no VM definition uses.",
    opts: &[CLIENT_OPTS],
    after: CLIENT_STATUS,
};

const NET_SPECS: &[&Spec] = &[&NET_CREATE, &NET_LIST, &NET_INFO, &NET_DELETE];

const NET_USAGE: &str = "\
Usage: wv net COMMAND [ARGS] [OPTIONS]

Manages the daemon's networks (--socket PATH|tcp:HOST:PORT or WV_SOCKET; --json for
machine-readable output). docs/NETWORK.md.

Commands:
  create NAME [--uplink tap=NAME|none] [--uplink-rate BPS]
  list
  info NAME
  delete NAME

Run wv net COMMAND --help for a command's options.";

const VM_SPECS: &[&Spec] = &[
    &VM_CREATE,
    &VM_SET,
    &VM_LIST,
    &VM_INFO,
    &VM_STATS,
    &VM_CONSOLE,
    &VM_START,
    &VM_STOP,
    &VM_PAUSE,
    &VM_RESUME,
    &VM_DELETE,
    &VM_SNAPSHOT,
    &VM_RESTORE,
    &VM_CLONE,
    &VM_SNAPSHOTS,
    &VM_FORGET,
    &VM_MIGRATE,
    &VM_DEVICE_ADD,
    &VM_DEVICE_REMOVE,
    &VM_DEVICE,
];

/// `wv` and its commands, for `wv --help`.
pub const USAGE: &str = "\
Worldvisor: a hypervisor on Linux KVM

Usage:
  wv run [OPTIONS]          Boot one VM in the foreground until the guest powers off
  wv run --config VM.json   The same, the VM's whole definition from a file
  wv run --cluster C.toml   The same, the VM's memory kept coherent over several node processes
  wv node --listen ADDR     Run a cluster node that waits for node 0 (wv run --cluster) to give its part
  wv host [--socket PATH] [--state-dir DIR] [--listen ADDR:PORT]
                            Run the host daemon that owns this host's VMs (--listen: also
                            serve the API on TCP, to clients with its token)
  wv host token [--state-dir DIR]
                            Print the token clients over TCP send (WV_TOKEN)
  wv host status [--json]   Ask the daemon how the host is doing
  wv host top [--once] [--json]
                            CPU, ready and throttled time of every world, each second
  wv host shutdown          Stop every VM, then the daemon
  wv host install [--unit-dir DIR] [DAEMON OPTIONS]
                            Write a systemd unit for wv host
  wv host uninstall [--state-dir DIR] [--yes]
                            Remove the state directory and a dead daemon's leftovers
  wv net create NAME [--uplink tap=NAME|none] [--uplink-rate BPS] | list | info NAME | delete NAME
                            Networks of the daemon's virtual switch (--net network=NAME)
  wv vm create NAME [VM OPTIONS] [--shares N] [--reservation CPUS] [--limit CPUS|none]
  wv vm create [NAME] --file SPEC.toml|SPEC.json
  wv vm set NAME [--shares N] [--reservation CPUS] [--limit CPUS|none]
             [--net-shares N] [--net-reservation BPS] [--net-limit BPS|none]
             [--disk-shares N] [--disk-iops-reservation IOPS] [--disk-iops-limit IOPS|none]
  wv vm list | info NAME | stats NAME | console NAME | start|stop|pause|resume NAME | delete NAME
  wv vm snapshot NAME SNAP | restore NAME SNAP | clone SNAP NAME [--count N] | snapshots
  wv vm migrate NAME --to HOST:PORT [--token T] [--downtime-ms N] [--copy-disks [--datastore P]]
                            Manage VMs through the daemon (--socket or WV_SOCKET: a path,
                            or tcp:HOST:PORT; --json for machine-readable output)
  wv fs mkfs|info|ls|create|rm|resize|snapshot|commit|revert|branch|import|export|check|unlock ...
                            VMKFS datastores for virtual disks
  wv probe-image --format pvh|bzimage|exitbench --output FILE
                            Write an embedded guest image to FILE
  wv vswitch --socket-dir DIR [--port NETWORK/PORT ...] [--uplink NETWORK=TAP ...]
                            Run the virtual switch: vhost-user net ports (--net vhost-user=)
  wv storage --socket-dir DIR [--disk NAME=path=IMG|vmkfs=DS:DISK ...] [--take-stale-locks]
                            Run the storage service: vhost-user-blk disks (--disk vhost-user=)
  wv completions bash|zsh   Print a shell completion script
  wv --version | --help

Every command answers --help (e.g. wv run --help, wv vm create --help) and takes
--opt value or --opt=value.";

const VM_USAGE: &str = "\
Usage: wv vm COMMAND [ARGS] [OPTIONS]

Manages VMs through the daemon (--socket PATH|tcp:HOST:PORT or WV_SOCKET; --json for
machine-readable output).

Commands:
  create NAME [VM OPTIONS] [--shares N] [--reservation CPUS] [--limit CPUS|none]
  create [NAME] --file SPEC.toml|SPEC.json
  set NAME [--shares N] [--reservation CPUS] [--limit CPUS|none]
      [--net-shares N] [--net-reservation BPS] [--net-limit BPS|none]
      [--disk-shares N] [--disk-iops-reservation IOPS] [--disk-iops-limit IOPS|none]
      [--memory-target SIZE]
  list
  info | stats | console | start | stop | pause | resume | delete NAME
  snapshot NAME SNAPSHOT [--allow-raw-disk]
  restore NAME SNAPSHOT
  clone SNAPSHOT NAME [--count N]
  snapshots
  delete-snapshot SNAPSHOT
  migrate NAME --to HOST:PORT [--token T | $WV_TARGET_TOKEN] [--downtime-ms N]
          [--copy-disks [--datastore PATH]]
  device add NAME --disk path=IMG|vmkfs=DS:NAME,id=ID[,...] | --net network=NAME,id=ID[,...]
  device remove NAME ID
  device NAME DEV --path direct|interposed [--capture FILE]

Run wv vm COMMAND --help for a command's options.";

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
    /// Print this usage to stdout, exit 0.
    Help(String),
    /// `--version`.
    Version,
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
        /// Each datastore's I/Os per second in the storage service (0: none).
        storage_capacity_iops: u64,
    },
    /// `wv host status`.
    HostStatus(Client),
    /// `wv host memory`.
    HostMemory(Client),
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

/// Parses `wv`'s arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Command, Usage> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("run") => parse_run(rest),
        Some("probe-image") => parse_probe_image(rest),
        Some("node") => parse_node(rest),
        Some("vswitch") => parse_vswitch(rest),
        Some("storage") => parse_storage(rest),
        Some("host") => parse_host(rest),
        Some("vm") => parse_vm(rest),
        Some("net") => parse_net(rest),
        Some("fs") => fs::parse(rest).map(|a| a.map_or_else(Command::Help, Command::Fs)),
        Some("completions") => parse_completions(rest),
        Some("-V" | "--version") if rest.is_empty() => Ok(Command::Version),
        None => Ok(Command::Help(USAGE.to_string())),
        Some("-h" | "--help" | "help") if rest.is_empty() => Ok(Command::Help(USAGE.to_string())),
        // `wv help vm create`: that command's usage.
        Some("-h" | "--help" | "help") if !rest[0].starts_with('-') => {
            let mut a = rest.to_vec();
            a.push("--help".into());
            parse(&a)
        }
        Some(other @ ("-V" | "--version" | "-h" | "--help" | "help")) => Err(Usage(format!(
            "'wv {other}' takes nothing more, not '{}'",
            rest[0]
        ))),
        Some(other) => Err(Usage(format!("unknown command '{other}' (see wv --help)"))),
    }
}

const COMPLETIONS: Spec = Spec {
    cmd: "wv completions",
    pos: &["bash|zsh"],
    about: "Prints a completion script for the shell, made from the same tables the parser reads:
  source <(wv completions bash)       # or in ~/.bashrc; zsh: source <(wv completions zsh)",
    opts: &[],
    after: "",
};

fn parse_completions(args: &[String]) -> Result<Command, Usage> {
    let m = match scan_or_help(&COMPLETIONS, args)? {
        Ok(m) => m,
        Err(help) => return Ok(Command::Help(help)),
    };
    match (m.arg(0), m.pos.len()) {
        (Some(shell @ ("bash" | "zsh")), 1) => Ok(Command::Completions(completion_script(shell))),
        _ => Err(Usage(
            "wv completions takes one shell: bash or zsh".to_string(),
        )),
    }
}

/// Every command's table: what completion offers.
fn all_specs() -> Vec<&'static Spec> {
    let mut v: Vec<&'static Spec> = vec![
        &RUN,
        &NODE,
        &PROBE_IMAGE,
        &VSWITCH,
        &STORAGE,
        &HOST,
        &HOST_STATUS,
        &HOST_MEMORY,
        &HOST_TOP,
        &HOST_TOKEN,
        &HOST_SHUTDOWN,
        &HOST_INSTALL,
        &HOST_UNINSTALL,
    ];
    v.extend(VM_SPECS.iter().copied());
    v.extend(NET_SPECS.iter().copied());
    v.extend(crate::fs::SPECS.iter());
    v.push(&COMPLETIONS);
    v
}

/// A bash completion function for `wv` (zsh runs it through bashcompinit): the command words
/// typed so far pick the longest matching command; a word starting with `-` completes that
/// command's options, another word the next command word, and an option's value a file name.
pub fn completion_script(shell: &str) -> String {
    let mut table = String::new();
    for spec in all_specs() {
        let words = spec.cmd.strip_prefix("wv").unwrap_or(spec.cmd).trim();
        let opts: Vec<&str> = spec
            .opts
            .iter()
            .flat_map(|g| g.iter())
            .map(|o| o.long)
            .chain(["--help"])
            .collect();
        // A positional argument written as alternatives (`bash|zsh`) completes to them.
        let choices: Vec<&str> = spec
            .pos
            .iter()
            .filter(|p| p.contains('|') && !p.contains('.'))
            .flat_map(|p| p.split('|'))
            .collect();
        table.push_str(&format!(
            "        '{words}|{}|{}'\n",
            opts.join(" "),
            choices.join(" ")
        ));
    }
    let mut s = String::new();
    if shell == "zsh" {
        s.push_str("autoload -U +X bashcompinit && bashcompinit\n");
    }
    s.push_str(&format!(
        r#"# wv completion ({shell}), generated by `wv completions {shell}`.
_wv() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local specs=(
{table}    )
    local typed="" w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ $w == -* ]] && continue
        [[ -n $typed ]] && typed="$typed $w" || typed="$w"
    done
    # The longest command the typed words start with, and its options.
    local best="" opts="" choices="" entry name rest
    for entry in "${{specs[@]}}"; do
        name="${{entry%%|*}}"
        if [[ "$typed" == "$name" || "$typed" == "$name "* ]] && (( ${{#name}} >= ${{#best}} )); then
            best="$name"; rest="${{entry#*|}}"; opts="${{rest%%|*}}"; choices="${{rest#*|}}"
        fi
    done
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    if [[ $prev == --* && -n $best ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    # The next command word after what was typed.
    local next=""
    for entry in "${{specs[@]}}"; do
        name="${{entry%%|*}}"
        if [[ -z $typed ]]; then
            next="$next ${{name%% *}}"
        elif [[ "$name" == "$typed "* ]]; then
            w="${{name#"$typed "}}"
            next="$next ${{w%% *}}"
        fi
    done
    if [[ -n $next ]]; then
        COMPREPLY=($(compgen -W "$(printf '%s\n' $next | sort -u)" -- "$cur"))
    elif [[ -n $choices && $typed == "$best" ]]; then
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _wv wv
"#
    ));
    s
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
        None => vm_config(vm_def(&m, false)?),
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
fn vm_config(d: VmDef) -> VmConfig {
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
fn from_file<T: serde::de::DeserializeOwned>(file: &Path) -> Result<(T, PathBuf), Usage> {
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
struct VmDef {
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

/// The VM options of `m`; `balloon_default` is whether a VM without `--balloon` has one (off
/// for `wv run`, on for `wv vm create`).
fn vm_def(m: &Matches, balloon_default: bool) -> Result<VmDef, Usage> {
    let memory = match m.value("--memory") {
        Some(v) => parse_size(v).map_err(|e| Usage(format!("--memory: {e}")))?,
        None => wv_config::DEFAULT_MEMORY,
    };
    let vcpus = match m.value("--vcpus") {
        Some(v) => v.parse().map_err(|_| {
            Usage(format!(
                "--vcpus '{v}' is not a number from 1 to {}",
                wv_config::MAX_VCPUS
            ))
        })?,
        None => 1,
    };
    let rng = match m.value("--rng") {
        None | Some("on") => true,
        Some("off") => false,
        Some(o) => return Err(Usage(format!("--rng takes on or off, not '{o}'"))),
    };
    let balloon = match m.value("--balloon") {
        None => balloon_default,
        Some("on") => true,
        Some("off") => false,
        Some(o) => return Err(Usage(format!("--balloon takes on or off, not '{o}'"))),
    };
    let memory_shared = match m.value("--memory-shared") {
        None | Some("off") => false,
        Some("on") => true,
        Some(o) => return Err(Usage(format!("--memory-shared takes on or off, not '{o}'"))),
    };
    let disks = m
        .values("--disk")
        .enumerate()
        .map(|(i, v)| DiskConfig::parse(v, i).map_err(|e| Usage(e.to_string())))
        .collect::<Result<_, _>>()?;
    let nets = m
        .values("--net")
        .map(|v| NetConfig::parse(v).map_err(|e| Usage(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(VmDef {
        kernel: m.value("--kernel").map(PathBuf::from),
        initrd: m.value("--initrd").map(PathBuf::from),
        cmdline: m.value("--cmdline").map(str::to_string),
        memory,
        memory_shared,
        vcpus,
        disks,
        nets,
        rng,
        balloon,
    })
}

fn parse_node(args: &[String]) -> Result<Command, Usage> {
    let m = matches_or_help!(&NODE, args);
    let listen = m
        .value("--listen")
        .ok_or_else(|| Usage("wv node needs --listen ADDR (e.g. 0.0.0.0:7000)".into()))?;
    Ok(Command::Node(listen.to_string()))
}

fn parse_vswitch(args: &[String]) -> Result<Command, Usage> {
    let m = matches_or_help!(&VSWITCH, args);
    let dir = m
        .value("--socket-dir")
        .ok_or_else(|| Usage("wv vswitch needs --socket-dir DIR".into()))?;
    let mut cfg = wv_vswitch::Config {
        socket_dir: PathBuf::from(dir),
        networks: Vec::new(),
    };
    fn network<'a>(
        cfg: &'a mut wv_vswitch::Config,
        name: &str,
    ) -> Result<&'a mut wv_vswitch::NetworkConfig, Usage> {
        if !wv_vswitch::valid_name(name) {
            return Err(Usage(format!(
                "wv vswitch: network '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                name.escape_debug()
            )));
        }
        let i = match cfg.networks.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                cfg.networks.push(wv_vswitch::NetworkConfig {
                    name: name.to_string(),
                    ..Default::default()
                });
                cfg.networks.len() - 1
            }
        };
        Ok(&mut cfg.networks[i])
    }
    for n in m.values("--network") {
        network(&mut cfg, n)?;
    }
    for p in m.values("--port") {
        let Some((net, port)) = p.split_once('/') else {
            return Err(Usage(format!("--port '{p}': expected NETWORK/PORT")));
        };
        if !wv_vswitch::valid_name(port) {
            return Err(Usage(format!(
                "--port '{p}': use 1-64 of A-Z a-z 0-9 _ . - for the port"
            )));
        }
        let n = network(&mut cfg, net)?;
        if n.ports.iter().any(|x| x == port) {
            return Err(Usage(format!("--port '{p}' is given twice")));
        }
        n.ports.push(port.to_string());
    }
    for u in m.values("--uplink") {
        let Some((net, tap)) = u.split_once('=') else {
            return Err(Usage(format!("--uplink '{u}': expected NETWORK=TAP")));
        };
        let tap = tap.strip_prefix("tap:").unwrap_or(tap);
        if tap.is_empty() || tap.len() > wv_config::MAX_TAP_NAME {
            return Err(Usage(format!(
                "--uplink '{u}': the TAP name takes 1-{} characters",
                wv_config::MAX_TAP_NAME
            )));
        }
        let n = network(&mut cfg, net)?;
        if n.uplink.replace(tap.to_string()).is_some() {
            return Err(Usage(format!("--uplink: network {net} has two uplinks")));
        }
    }
    Ok(Command::Vswitch(cfg))
}

fn parse_storage(args: &[String]) -> Result<Command, Usage> {
    let m = matches_or_help!(&STORAGE, args);
    let dir = m
        .value("--socket-dir")
        .ok_or_else(|| Usage("wv storage needs --socket-dir DIR".into()))?;
    let mut cfg = wv_storage::Config {
        socket_dir: PathBuf::from(dir),
        disks: Vec::new(),
        take_stale_locks: m.has("--take-stale-locks"),
        capacity_iops: match m.value("--capacity-iops") {
            Some(v) => v.parse().map_err(|_| {
                Usage(format!(
                    "--capacity-iops '{}': expected a number of I/Os per second",
                    v.escape_debug()
                ))
            })?,
            None => 0,
        },
    };
    for d in m.values("--disk") {
        let spec = wv_storage::DiskSpec::parse(d).map_err(Usage)?;
        if cfg.disks.iter().any(|o| o.name == spec.name) {
            return Err(Usage(format!(
                "--disk: the name {} is given twice",
                spec.name
            )));
        }
        cfg.disks.push(spec);
    }
    // None is fine: disks are added at run time (`disk add` on its control socket), as the
    // daemon does when a VM that has one starts.
    Ok(Command::Storage(cfg))
}

fn parse_probe_image(args: &[String]) -> Result<Command, Usage> {
    let m = matches_or_help!(&PROBE_IMAGE, args);
    match (m.value("--format"), m.value("--output")) {
        (Some(f), Some(o)) => Ok(Command::ProbeImage {
            format: f.to_string(),
            output: PathBuf::from(o),
        }),
        _ => Err(Usage(
            "wv probe-image needs --format pvh|bzimage|exitbench and --output FILE".into(),
        )),
    }
}

fn client(m: &Matches) -> Client {
    Client {
        socket: m.value("--socket").map_or_else(
            || {
                std::env::var_os("WV_SOCKET")
                    .map_or_else(|| PathBuf::from(wv_host::DEFAULT_SOCKET), PathBuf::from)
            },
            PathBuf::from,
        ),
        json: m.has("--json"),
    }
}

fn parse_host(args: &[String]) -> Result<Command, Usage> {
    let (sub, rest) = split_subcommand(
        args,
        &[
            &HOST,
            &HOST_STATUS,
            &HOST_MEMORY,
            &HOST_TOP,
            &HOST_TOKEN,
            &HOST_SHUTDOWN,
            &HOST_INSTALL,
            &HOST_UNINSTALL,
        ],
    );
    match sub.as_deref() {
        None => {
            let m = matches_or_help!(&HOST, &rest);
            Ok(Command::HostServe {
                socket: client(&m).socket,
                state_dir: PathBuf::from(
                    m.value("--state-dir").unwrap_or(wv_host::DEFAULT_STATE_DIR),
                ),
                listen: m.value("--listen").map(str::to_string),
                web: m.value("--web").map(str::to_string),
                images: m.values("--images").map(PathBuf::from).collect(),
                jail: match (m.has("--no-jail"), m.value("--jail-uids")) {
                    (true, Some(_)) => {
                        return Err(Usage(
                            "--no-jail and --jail-uids cannot be given together".into(),
                        ))
                    }
                    (true, None) => None,
                    (false, None) => Some(wv_host::api::DEFAULT_JAIL_UIDS),
                    (false, Some(r)) => Some(
                        r.split_once('-')
                            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                            .filter(|(a, b): &(u32, u32)| *a > 0 && a <= b && *b < u32::MAX)
                            .ok_or_else(|| {
                                Usage(format!(
                                    "--jail-uids '{r}': give FIRST-LAST, unprivileged ids (1 to {})",
                                    u32::MAX - 1
                                ))
                            })?,
                    ),
                },
                memory: lending_settings(&m)?,
                storage_capacity_iops: m
                    .value("--storage-capacity-iops")
                    .map(|v| iops("--storage-capacity-iops", v))
                    .transpose()?
                    .unwrap_or(0),
            })
        }
        Some("status") => {
            let m = matches_or_help!(&HOST_STATUS, &rest);
            Ok(Command::HostStatus(client(&m)))
        }
        Some("memory") => {
            let m = matches_or_help!(&HOST_MEMORY, &rest);
            Ok(Command::HostMemory(client(&m)))
        }
        Some("top") => {
            let m = matches_or_help!(&HOST_TOP, &rest);
            Ok(Command::HostTop(client(&m), m.has("--once")))
        }
        Some("token") => {
            let m = matches_or_help!(&HOST_TOKEN, &rest);
            Ok(Command::HostToken(PathBuf::from(
                m.value("--state-dir").unwrap_or(wv_host::DEFAULT_STATE_DIR),
            )))
        }
        Some("shutdown") => {
            let m = matches_or_help!(&HOST_SHUTDOWN, &rest);
            Ok(Command::HostShutdown(client(&m)))
        }
        Some("uninstall") => {
            let m = matches_or_help!(&HOST_UNINSTALL, &rest);
            Ok(Command::HostUninstall(
                PathBuf::from(m.value("--state-dir").unwrap_or(wv_host::DEFAULT_STATE_DIR)),
                m.has("--yes"),
            ))
        }
        Some("install") => {
            let m = matches_or_help!(&HOST_INSTALL, &rest);
            let cwd = std::env::current_dir()
                .map_err(|e| Usage(format!("cannot read the current directory: {e}")))?;
            let abs = |p: &str| cwd.join(p).display().to_string();
            let mut args = Vec::new();
            for o in DAEMON_OPTS {
                for v in m.values(o.long) {
                    let v = match o.long {
                        "--listen"
                        | "--web"
                        | "--host-memory-reserve"
                        | "--idle-memory-tax"
                        | "--host-memory"
                        | "--storage-capacity-iops" => v.to_string(),
                        _ => abs(v),
                    };
                    args.extend([o.long.to_string(), v]);
                }
            }
            Ok(Command::HostInstall {
                unit_dir: PathBuf::from(m.value("--unit-dir").unwrap_or("/etc/systemd/system")),
                args,
                socket: m.value("--socket").map(|s| cwd.join(s)),
            })
        }
        Some(other) => Err(Usage(format!(
            "unknown 'wv host' command '{other}' (see wv host --help)"
        ))),
    }
}

/// The lending policy's settings from `wv host`'s options.
fn lending_settings(m: &Matches) -> Result<wv_host::lending::Settings, Usage> {
    let size = |o: &str| {
        m.value(o)
            .map(|v| parse_size(v).map_err(|e| Usage(format!("{o}: {e}"))))
            .transpose()
    };
    let mut s = wv_host::lending::Settings {
        reserve: size("--host-memory-reserve")?.unwrap_or(0),
        host_memory: size("--host-memory")?,
        ..Default::default()
    };
    if let Some(t) = m.value("--idle-memory-tax") {
        s.tax_pct = t
            .parse()
            .ok()
            .filter(|p| *p <= wv_host::lending::MAX_TAX_PCT)
            .ok_or_else(|| {
                Usage(format!(
                    "--idle-memory-tax '{t}': give a percentage from 0 to {}",
                    wv_host::lending::MAX_TAX_PCT
                ))
            })?;
    }
    if s.host_memory == Some(0) {
        return Err(Usage("--host-memory: give a size above 0".into()));
    }
    Ok(s)
}

fn parse_net(args: &[String]) -> Result<Command, Usage> {
    let (sub, rest) = split_subcommand(args, NET_SPECS);
    let Some(sub) = sub else {
        if wants_help(&rest) {
            return Ok(Command::Help(NET_USAGE.to_string()));
        }
        return Err(Usage(
            "wv net needs a command: create, list, info, delete (see wv net --help)".into(),
        ));
    };
    let spec = NET_SPECS
        .iter()
        .find(|s| s.cmd.rsplit(' ').next() == Some(sub.as_str()))
        .ok_or_else(|| {
            Usage(format!(
                "unknown 'wv net' command '{sub}' (see wv net --help)"
            ))
        })?;
    let m = matches_or_help!(spec, &rest);
    let c = client(&m);
    let cmd = match spec.cmd {
        "wv net create" => {
            let uplink = match m.value("--uplink") {
                None | Some("none") => None,
                Some(u) => match u.strip_prefix("tap=") {
                    Some(t) if wv_config::valid_tap_name(t) => Some(t.to_string()),
                    _ => {
                        return Err(Usage(format!(
                            "--uplink '{u}': expected tap=NAME (1-{} characters) or none",
                            wv_config::MAX_TAP_NAME
                        )))
                    }
                },
            };
            let rate = m
                .value("--uplink-rate")
                .map(|v| bits_per_second("--uplink-rate", v))
                .transpose()?;
            match rate {
                Some(0) => {
                    return Err(Usage(
                        "--uplink-rate 0: leave it out for an uplink that is not scheduled".into(),
                    ))
                }
                Some(_) if uplink.is_none() => {
                    return Err(Usage("--uplink-rate needs --uplink tap=NAME".into()))
                }
                _ => {}
            }
            NetCmd::Create(m.pos[0].clone(), uplink, rate)
        }
        "wv net list" => NetCmd::List,
        "wv net info" => NetCmd::Info(m.pos[0].clone()),
        _ => NetCmd::Delete(m.pos[0].clone()),
    };
    Ok(Command::Net(c, cmd))
}

fn parse_vm(args: &[String]) -> Result<Command, Usage> {
    // `wv vm device add|remove ...` is `wv vm device-add|device-remove ...`.
    let joined;
    let args = match args.iter().position(|a| a == "device") {
        Some(i) if matches!(args.get(i + 1).map(String::as_str), Some("add" | "remove")) => {
            let mut a = args.to_vec();
            let word = a.remove(i + 1);
            a[i] = format!("device-{word}");
            joined = a;
            &joined[..]
        }
        _ => args,
    };
    let (sub, rest) = split_subcommand(args, VM_SPECS);
    let Some(sub) = sub else {
        if wants_help(&rest) {
            return Ok(Command::Help(VM_USAGE.to_string()));
        }
        return Err(Usage(
            "wv vm needs a command: create, list, info, set, stats, console, start, stop, pause, resume, delete, snapshot, restore, clone, snapshots, delete-snapshot, migrate, device add, device remove, device NAME DEV (see wv vm --help)".into(),
        ));
    };
    let spec = VM_SPECS
        .iter()
        .find(|s| s.cmd.rsplit(' ').next() == Some(sub.as_str()))
        .ok_or_else(|| {
            Usage(format!(
                "unknown 'wv vm' command '{sub}' (see wv vm --help)"
            ))
        })?;
    let m = matches_or_help!(spec, &rest);
    let c = client(&m);
    let cmd = match spec.cmd {
        "wv vm create" => VmCmd::Create(Box::new(create_spec(&m)?)),
        "wv vm set" => {
            let s = sched(&m)?;
            let target = m
                .value("--memory-target")
                .map(|v| parse_size(v).map_err(|e| Usage(format!("--memory-target: {e}"))))
                .transpose()?;
            if s == Sched::default() && target.is_none() {
                return Err(Usage(
                    "wv vm set NAME needs --shares N, --reservation CPUS, --limit CPUS|none, \
                     --net-shares N, --net-reservation BPS, --net-limit BPS|none, \
                     --disk-shares N, --disk-iops-reservation IOPS, --disk-iops-limit IOPS|none \
                     or --memory-target SIZE"
                        .into(),
                ));
            }
            VmCmd::Set(m.pos[0].clone(), s, target)
        }
        "wv vm list" => VmCmd::List,
        "wv vm snapshots" => VmCmd::Snapshots,
        "wv vm snapshot" => VmCmd::Snapshot(
            m.pos[0].clone(),
            m.pos[1].clone(),
            m.has("--allow-raw-disk"),
        ),
        "wv vm restore" => VmCmd::Restore(m.pos[0].clone(), m.pos[1].clone()),
        "wv vm device-add" => {
            let (opt, spec) = match (m.value("--disk"), m.value("--net")) {
                (Some(d), None) => ("--disk", d),
                (None, Some(n)) => ("--net", n),
                _ => {
                    return Err(Usage(
                        "wv vm device-add NAME needs one of --disk path=IMG,id=ID and --net network=NAME,id=ID"
                            .into(),
                    ))
                }
            };
            if !spec.split(',').any(|p| p.starts_with("id=")) {
                return Err(Usage(format!(
                    "{opt} '{spec}': give the device an id= to remove it by"
                )));
            }
            let device = if opt == "--disk" {
                let disk = wv_config::DiskConfig::parse(spec, 0).map_err(|e| Usage(e.0))?;
                serde_json::json!({ "disk": disk })
            } else {
                let net = NetConfig::parse(spec).map_err(|e| Usage(e.0))?;
                if net.network.is_none() {
                    return Err(Usage(format!(
                        "--net '{spec}': a hot-plugged net is on one of the daemon's networks (network=NAME)"
                    )));
                }
                serde_json::json!({ "net": net })
            };
            VmCmd::DeviceAdd(m.pos[0].clone(), device)
        }
        "wv vm device-remove" => VmCmd::DeviceRemove(m.pos[0].clone(), m.pos[1].clone()),
        "wv vm device" => {
            let path = match m.value("--path") {
                Some(p @ ("direct" | "interposed")) => p.to_string(),
                Some(p) => return Err(Usage(format!("--path: '{p}' is not direct or interposed"))),
                None => {
                    return Err(Usage(
                        "wv vm device NAME DEV needs --path direct|interposed".into(),
                    ))
                }
            };
            let capture = m.value("--capture").map(str::to_string);
            if capture.is_some() && path == "direct" {
                return Err(Usage("--capture needs --path interposed".into()));
            }
            VmCmd::Device(m.pos[0].clone(), m.pos[1].clone(), path, capture)
        }
        "wv vm clone" => {
            let count = match m.value("--count") {
                None => 1,
                Some(v) => v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| Usage(format!("--count: '{v}' is not 1 to 64")))?,
            };
            VmCmd::Clone(m.pos[0].clone(), m.pos[1].clone(), count)
        }
        "wv vm delete-snapshot" => VmCmd::DeleteSnapshot(m.pos[0].clone()),
        "wv vm migrate" => {
            let to = m
                .value("--to")
                .ok_or_else(|| Usage("wv vm migrate NAME needs --to HOST:PORT".into()))?
                .to_string();
            let token = m
                .value("--token")
                .map(str::to_string)
                .or_else(|| std::env::var("WV_TARGET_TOKEN").ok())
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    Usage(
                        "wv vm migrate needs the target daemon's token: --token T or WV_TARGET_TOKEN (wv host token there shows it)"
                            .into(),
                    )
                })?;
            let downtime_ms = m
                .value("--downtime-ms")
                .map(|v| {
                    v.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        Usage(format!(
                            "--downtime-ms: '{v}' is not a number of milliseconds (1 or more)"
                        ))
                    })
                })
                .transpose()?;
            let copy_disks = m.has("--copy-disks");
            let datastore = m.value("--datastore").map(str::to_string);
            if datastore.is_some() && !copy_disks {
                return Err(Usage(
                    "--datastore says where copied VMKFS disks land: it needs --copy-disks".into(),
                ));
            }
            VmCmd::Migrate(Migrate {
                name: m.pos[0].clone(),
                to,
                token,
                downtime_ms,
                copy_disks,
                datastore,
            })
        }
        cmd => VmCmd::Named(cmd.rsplit(' ').next().unwrap_or_default(), m.pos[0].clone()),
    };
    Ok(Command::Vm(c, cmd))
}

fn sched(m: &Matches) -> Result<Sched, Usage> {
    let cpus = |o: &str, v: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Usage(format!("{o}: '{v}' is not a number of CPUs")))
    };
    Ok(Sched {
        shares: m
            .value("--shares")
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| Usage(format!("--shares: '{v}' is not a whole number")))
            })
            .transpose()?,
        reservation: m
            .value("--reservation")
            .map(|v| cpus("--reservation", v))
            .transpose()?,
        limit: m
            .value("--limit")
            .map(|v| match v {
                "none" => Ok(None),
                v => cpus("--limit", v).map(Some),
            })
            .transpose()?,
        net_shares: m
            .value("--net-shares")
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| Usage(format!("--net-shares: '{v}' is not a whole number")))
            })
            .transpose()?,
        net_reservation: m
            .value("--net-reservation")
            .map(|v| bits_per_second("--net-reservation", v))
            .transpose()?,
        net_limit: m
            .value("--net-limit")
            .map(|v| match v {
                "none" => Ok(0),
                v => bits_per_second("--net-limit", v),
            })
            .transpose()?,
        disk_shares: m
            .value("--disk-shares")
            .map(|v| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=wv_shares::MAX_SHARES).contains(n))
                    .ok_or_else(|| {
                        Usage(format!(
                            "--disk-shares: '{}' is not a whole number from 1 to {}",
                            v.escape_debug(),
                            wv_shares::MAX_SHARES
                        ))
                    })
            })
            .transpose()?,
        disk_reservation_iops: m
            .value("--disk-iops-reservation")
            .map(|v| iops("--disk-iops-reservation", v))
            .transpose()?,
        disk_limit_iops: m
            .value("--disk-iops-limit")
            .map(|v| match v {
                "none" => Ok(0),
                v => iops("--disk-iops-limit", v),
            })
            .transpose()?,
    })
    .and_then(|s| match (s.disk_reservation_iops, s.disk_limit_iops) {
        (Some(r), Some(l)) if l != 0 && r > l => Err(Usage(format!(
            "--disk-iops-reservation {r} is above --disk-iops-limit {l}"
        ))),
        _ => Ok(s),
    })
}

/// A rate in I/Os per second: a whole number.
fn iops(o: &str, v: &str) -> Result<u64, Usage> {
    v.parse::<u64>().map_err(|_| {
        Usage(format!(
            "{o}: '{}' is not a whole number of I/Os per second",
            v.escape_debug()
        ))
    })
}

/// A rate in bits per second: a whole number, with K, M or G for thousands (`100M`).
fn bits_per_second(o: &str, v: &str) -> Result<u64, Usage> {
    let (digits, scale) = match v.char_indices().last() {
        Some((i, 'k' | 'K')) => (&v[..i], 1_000),
        Some((i, 'M')) => (&v[..i], 1_000_000),
        Some((i, 'G')) => (&v[..i], 1_000_000_000),
        _ => (v, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            Usage(format!(
                "{o}: '{v}' is not bits per second (a whole number, K, M or G for thousands)"
            ))
        })
}

const VM_DEF_OPTS: &[&[Opt]] = &[VM_OPTS, SCHED_OPTS];

/// `wv vm create`: the definition from the options or from `--file`, with absolute paths.
fn create_spec(m: &Matches) -> Result<VmSpec, Usage> {
    let name = m.arg(0).map(str::to_string);
    let mut spec = if let Some(file) = m.value("--file") {
        if let Some(o) = VM_DEF_OPTS
            .iter()
            .flat_map(|g| g.iter())
            .find(|o| m.has(o.long))
        {
            return Err(Usage(format!(
                "--file gives the whole definition: {} cannot be added to it",
                o.long
            )));
        }
        let (mut s, dir) = from_file::<VmSpec>(Path::new(file))?;
        absolute_paths(&mut s.config, &dir);
        if let Some(n) = name {
            s.name = n;
        }
        s
    } else {
        let name = name.ok_or_else(|| Usage("wv vm create needs a VM name (or --file)".into()))?;
        spec_from_options(name, m)?
    };
    absolute_paths(&mut spec.config, &cwd()?);
    // The daemon reads JSON: every path must be UTF-8.
    let c = &spec.config;
    let kernel = match &c.kernel {
        KernelSource::Path(p) => Some(("--kernel", p)),
        KernelSource::Embedded(_) => None,
    };
    let paths = kernel
        .into_iter()
        .chain(c.initrd.iter().map(|p| ("--initrd", p)))
        .chain(c.disks.iter().map(|d| ("--disk", &d.path)));
    for (o, p) in paths {
        if p.to_str().is_none() {
            return Err(Usage(format!("{o}: the path {p:?} is not UTF-8")));
        }
    }
    Ok(spec)
}

fn cwd() -> Result<PathBuf, Usage> {
    std::env::current_dir().map_err(|e| Usage(format!("cannot read the current directory: {e}")))
}

fn spec_from_options(name: String, m: &Matches) -> Result<VmSpec, Usage> {
    let mut s = VmSpec::new(name);
    s.config = vm_config(vm_def(m, true)?);
    let sc = sched(m)?;
    if let Some(x) = sc.shares {
        s.shares = x;
    }
    if let Some(x) = sc.reservation {
        s.reservation = x;
    }
    if let Some(x) = sc.limit {
        s.limit = x;
    }
    Ok(s)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Makes the kernel, initrd and disk paths of `c` absolute against `base`.
fn absolute_paths(c: &mut VmConfig, base: &Path) {
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
            (&["--version", "x"], "takes nothing more"),
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
        assert!(t.contains("--memory SIZE") && t.contains("--shares N") && !t.contains("--serial"));
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
        let (_, v) = vm(&["vm", "--", "delete", "--json"]);
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
}
