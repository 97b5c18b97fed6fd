//! Every `wv` command but `wv run`, read by clap (derive): the command tree (its help, its
//! errors, `wv completions`), and the conversion of what clap read into the typed
//! [`Command`] the rest of `wv` runs from. `wv run` keeps its own scanner ([`crate::cli`]):
//! it is every VM's start-up path, where clap's cost is measurable.
//!
//! Conventions, clap's, with `wv`'s statuses: `--opt value` and `--opt=value`; `-h`/`--help`
//! on every command and subcommand (and `wv help COMMAND...`); `--` ends the options; a usage
//! error is ONE line on stderr, `wv: error: ...`, exit status 200 (clap's own several-line
//! errors are rewritten to one line here); an option given twice: the last one counts. Option
//! values are taken as text and checked by the same functions `wv run` uses, so a bad size or
//! disk spec reads the same everywhere.

use crate::cli::{
    absolute_paths, cwd, from_file, vm_config, vm_def, Client, Command, Migrate, NetCmd, Sched,
    Usage, VmCmd, VmOpts, RUN,
};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::{Path, PathBuf};
use wv_config::{parse_size, KernelSource, NetConfig};
use wv_host::world::VmSpec;

const CLIENT_STATUS: &str =
    "Exit status: 0 done, 1 the daemon refused (its error is printed), 2 no daemon at the
socket, 200 bad arguments.";

/// `wv`.
#[derive(Parser, Debug)]
#[command(
    name = "wv",
    version,
    about = "Worldvisor: a hypervisor on Linux KVM",
    subcommand_required = true,
    after_help = "Every command answers --help (e.g. wv run --help, wv vm create --help, or wv help vm create)
and takes --opt value or --opt=value. Usage errors: one line on stderr, exit status 200."
)]
struct Wv {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// Run a cluster node that waits for node 0 (wv run --cluster) to give its part
    #[command(
        long_about = "Runs a cluster node in the foreground: listens on ADDR, prints 'wv node: listening on
ADDR' (the port bound), takes its part from node 0 (wv run --cluster) on the first
connection, then serves its share of the guest's memory (and runs the vCPUs it is
given, if any) until node 0 stops it. Exits non-zero when node 0 or another node is
lost. docs/CLUSTER.md.",
        after_help = "Exit status: 0 stopped by node 0, 1 the node failed or lost its cluster, 200 bad arguments."
    )]
    Node {
        /// HOST:PORT to listen on (port 0: any free port) (required)
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Run the host daemon that owns this host's VMs, or ask it (status, memory, top, token,
    /// shutdown), or install it
    Host(HostArgs),
    /// Manage VMs through the daemon
    Vm(VmArgs),
    /// Networks of the daemon's virtual switch (--net network=NAME)
    Net(NetArgs),
    /// VMKFS datastores for virtual disks
    Fs(FsArgs),
    /// Write an embedded guest image to FILE
    #[command(long_about = "Writes an embedded guest image to FILE (for QEMU or other loaders).")]
    ProbeImage {
        /// which image (required)
        #[arg(long, value_name = "pvh|bzimage|exitbench")]
        format: Option<String>,
        /// where to write it (required)
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<String>,
    },
    /// Run the virtual switch: vhost-user net ports (--net vhost-user=)
    Vswitch(VswitchArgs),
    /// Run the storage service: vhost-user-blk disks (--disk vhost-user=)
    Storage(StorageArgs),
    /// Print a shell completion script: source <(wv completions bash)
    #[command(
        long_about = "Prints a completion script for the shell, generated from the same command tree the parser
reads (and wv run's table):
  source <(wv completions bash)       # or in ~/.bashrc
  source <(wv completions zsh)        # or as _wv in a directory of $fpath"
    )]
    Completions {
        /// the shell
        #[arg(value_name = "bash|zsh", value_parser = ["bash", "zsh"])]
        shell: String,
    },
}

// ---- wv host ----

/// `wv host [OPTIONS]` (the daemon), or `wv host COMMAND`.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    long_about = "Runs the host daemon that owns this host's VMs, serving the REST API on a Unix socket.
SIGTERM or SIGINT ends it, leaving its VMs running (a daemon started again takes them back);
wv host shutdown stops them too. Either way it removes what it made outside its state directory.
The other commands ask the daemon, or install or uninstall it."
)]
struct HostArgs {
    #[command(flatten)]
    daemon: DaemonOpts,
    #[command(subcommand)]
    sub: Option<HostSub>,
}

/// The daemon's options (`wv host`, and `wv host install`, which writes them into a unit).
#[derive(Args, Debug, Default)]
struct DaemonOpts {
    /// the Unix socket to serve on
    /// (default: $WV_SOCKET, else /run/worldvisor/wv.sock)
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    socket: Option<String>,
    /// where definitions and state persist (default /var/lib/worldvisor)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
    /// also serve the API on TCP, to clients with the token (wv host token)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// serve the web console on TCP (log in with the token; also at / on the socket)
    #[arg(long, value_name = "ADDR:PORT")]
    web: Option<String>,
    /// VMs' kernels, initrds and disks must be under DIR (repeatable;
    /// without it, any file the daemon can read)
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    images: Vec<String>,
    /// run world N's VMM jailed as user and group FIRST+N (wv run --jail: no
    /// capabilities, its own namespaces and root; default 3000000000-3000999999)
    #[arg(long, value_name = "FIRST-LAST", verbatim_doc_comment)]
    jail_uids: Option<String>,
    /// run VMMs as the daemon's user, unjailed (debugging only)
    #[arg(long)]
    no_jail: bool,
    /// auto (default): pin busy worlds' vCPU threads to CPUs by their entitlements
    /// (exact shares); off: leave placement to the kernel
    #[arg(long, value_name = "auto|off", verbatim_doc_comment)]
    placement: Option<String>,
    /// lend memory between running VMs: while the host has less than SIZE free,
    /// balloon memory back from the VMs with the fewest shares per active page, and
    /// give it back when there is enough again or a VM needs it (default off)
    #[arg(long, value_name = "SIZE", verbatim_doc_comment)]
    host_memory_reserve: Option<String>,
    /// the policy's tax on idle memory: an idle page costs 1/(1-PCT/100) active
    /// ones (0-99, default 75)
    #[arg(long, value_name = "PCT", verbatim_doc_comment)]
    idle_memory_tax: Option<String>,
    /// the memory the daemon's VMs may use in total (a host that keeps the rest for
    /// other work): free memory is then SIZE less their resident memory, if less
    /// than MemAvailable
    #[arg(long, value_name = "SIZE", verbatim_doc_comment)]
    host_memory: Option<String>,
    /// the I/Os per second of each datastore (and of the raw images together) that
    /// the disks the storage service serves share by their VMs' --disk-shares,
    /// reservations and limits (a request costs 1 + bytes/32KiB; default: none, each
    /// as fast as it goes, shared only when it is the bottleneck); DEV=N gives one
    /// device its own: DEV a datastore's absolute path, or raw (repeatable)
    #[arg(long, value_name = "[DEV=]N", verbatim_doc_comment)]
    storage_capacity_iops: Vec<String>,
}

/// How to reach the daemon, and how to print its answers.
#[derive(Args, Debug, Default)]
struct ClientOpts {
    /// the daemon's socket: a path or tcp:HOST:PORT
    /// (default: $WV_SOCKET, else /run/worldvisor/wv.sock)
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    socket: Option<String>,
    /// machine-readable output
    #[arg(long)]
    json: bool,
}

/// [`ClientOpts`] given to a family (`wv vm`, `wv net`): they may come before or after its
/// command word.
#[derive(Args, Debug, Default)]
struct GlobalClientOpts {
    /// the daemon's socket: a path or tcp:HOST:PORT
    /// (default: $WV_SOCKET, else /run/worldvisor/wv.sock)
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        display_order = 1000,
        verbatim_doc_comment
    )]
    socket: Option<String>,
    /// machine-readable output
    #[arg(long, global = true, display_order = 1000)]
    json: bool,
}

/// `--state-dir` of the commands that read the state directory without a daemon.
#[derive(Args, Debug, Default)]
struct StateDir {
    /// the daemon's state directory (default /var/lib/worldvisor)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
}

#[derive(Subcommand, Debug)]
enum HostSub {
    /// Ask the daemon how the host is doing
    #[command(
        long_about = "Asks the daemon how the host is doing: CPUs, scheduler, worlds.",
        after_help = CLIENT_STATUS
    )]
    Status(ClientOpts),
    /// The memory lending policy and every VM's memory
    #[command(
        long_about = "Shows the memory lending policy (wv host --host-memory-reserve): its reserve, the host's free
memory, its last action, and for every running VM its shares, active fraction, memory target,
current memory, what it lent and what it holds above its fair share (docs/DEVICES.md).",
        after_help = CLIENT_STATUS
    )]
    Memory(ClientOpts),
    /// The storage service's capacities per datastore, or set one
    #[command(
        long_about = "Shows the I/Os per second each device (a VMKFS datastore; the raw images together) has for
the disks the storage service serves on it, shared by their VMs' disk shares, reservations and
limits: every device's default, the devices given their own, and the running service's devices
with their disks (docs/STORAGE.md). With --capacity-iops, sets the default, or with --device one
device's own (default: back to the default), while the daemon runs; wv host
--storage-capacity-iops [DEV=]N is the lasting form.",
        after_help = CLIENT_STATUS
    )]
    Storage {
        /// I/Os per second (0: none), or default (with --device)
        #[arg(long, value_name = "N")]
        capacity_iops: Option<String>,
        /// the device: a datastore's absolute path, or raw
        #[arg(long, value_name = "DEV", requires = "capacity_iops")]
        device: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// CPU, ready and throttled time of every world, each second
    #[command(
        long_about = "Shows the CPU, ready and throttled time of every world, each second.",
        after_help = CLIENT_STATUS
    )]
    Top {
        /// one sample (over one second), then exit
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print the token clients over TCP send (WV_TOKEN)
    #[command(
        long_about = "Prints the token a client must send to reach the API over TCP (--listen): the daemon
makes it at first start, readable by its owner only, in the state directory. Clients over TCP
read it from WV_TOKEN:
  export WV_SOCKET=tcp:127.0.0.1:7070 WV_TOKEN=$(wv host token)",
        after_help = "Exit status: 0 printed, 1 no token (the daemon never ran with this state directory), 200 bad arguments."
    )]
    Token(StateDir),
    /// Stop every VM, then the daemon
    #[command(
        long_about = "Stops every VM of the daemon (each through its VMM's control socket, then SIGTERM, then
SIGKILL, 5 s apart), then the daemon itself, which removes what it made outside its state
directory (its cgroups, its socket and the folders it created for it) and ends.",
        after_help = CLIENT_STATUS
    )]
    Shutdown(ClientOpts),
    /// Write a systemd unit that runs wv host with the options given
    #[command(
        long_about = "Writes a systemd unit, worldvisor.service, that runs this wv as `wv host` with the options
given (paths made absolute), and does nothing else: enable it with
  systemctl daemon-reload && systemctl enable --now worldvisor
Stopping the unit runs wv host shutdown (every VM stops, then the daemon); restarting the
daemon alone, its VMs left running: systemctl kill -s TERM worldvisor.",
        after_help = "Exit status: 0 written, 1 could not write it, 200 bad arguments."
    )]
    Install {
        /// where to write worldvisor.service (default /etc/systemd/system)
        #[arg(long, value_name = "DIR")]
        unit_dir: Option<String>,
        #[command(flatten)]
        daemon: Box<DaemonOpts>,
    },
    /// Remove the state directory and what a dead daemon left
    #[command(
        long_about = "Removes the daemon's state directory (VM definitions, logs, snapshots, the token) and
whatever a daemon of it that was killed left outside it (its socket, the folders it made for
it, its cgroups). Refused while a daemon runs on that state directory or a VMM of it still
runs (stop them first: wv host shutdown). Asks first, unless --yes; without --yes and with no
terminal to ask on, it refuses. Disk images and datastores outside the state directory stay.",
        after_help = "Exit status: 0 removed (or nothing there), 1 refused or failed, 200 bad arguments."
    )]
    Uninstall {
        #[command(flatten)]
        state: StateDir,
        /// do not ask
        #[arg(long)]
        yes: bool,
    },
}

// ---- wv vm ----

/// `wv vm COMMAND`.
#[derive(Args, Debug)]
#[command(
    subcommand_required = true,
    long_about = "Manages VMs through the daemon (--socket PATH|tcp:HOST:PORT or WV_SOCKET; --json for
machine-readable output)."
)]
struct VmArgs {
    #[command(flatten)]
    client: GlobalClientOpts,
    #[command(subcommand)]
    sub: VmSub,
}

/// A VM's name, the only argument of several `wv vm` commands.
#[derive(Args, Debug)]
struct Name {
    /// the VM
    #[arg(value_name = "NAME")]
    name: String,
}

/// The scheduler options of `wv vm create` and `wv vm set`.
#[derive(Args, Debug, Default)]
struct SchedOpts {
    /// proportional CPU shares, 1 to 10000 (default 1000)
    #[arg(long, value_name = "N")]
    shares: Option<String>,
    /// CPUs guaranteed while it runs (0 to one per vCPU)
    #[arg(long, value_name = "CPUS")]
    reservation: Option<String>,
    /// CPUs it may use at most (none: no limit)
    #[arg(long, value_name = "CPUS|none")]
    limit: Option<String>,
}

/// `wv vm set --net-*`.
#[derive(Args, Debug, Default)]
struct NetSharesOpts {
    /// network shares of each of its ports on the daemon's networks, 1 to 1000000
    /// (default 1000): what it gets of a contended destination (a VM's port, an uplink)
    /// against the other ports sending there (docs/NETWORK.md)
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    net_shares: Option<String>,
    /// bits per second each of its ports gets whenever it sends that much, e.g. 100M
    /// (K, M, G: thousands; 0: none)
    #[arg(long, value_name = "BPS", verbatim_doc_comment)]
    net_reservation: Option<String>,
    /// bits per second each of its ports never exceeds, e.g. 1G (none or 0: no limit)
    #[arg(long, value_name = "BPS|none")]
    net_limit: Option<String>,
}

/// `wv vm set --disk-*`.
#[derive(Args, Debug, Default)]
struct DiskSharesOpts {
    /// storage shares of each of its disks the storage service serves (via=storage),
    /// 1 to 1000000 (default 1000): what it gets of its datastore's I/Os against the
    /// other served disks on it (docs/STORAGE.md); disks its VMM serves are not scheduled
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    disk_shares: Option<String>,
    /// I/Os per second each of its served disks gets whenever it asks for that many
    /// (a request costs 1 + bytes/32KiB; 0: none)
    #[arg(long, value_name = "IOPS", verbatim_doc_comment)]
    disk_iops_reservation: Option<String>,
    /// I/Os per second each of its served disks never exceeds (none or 0: no limit)
    #[arg(long, value_name = "IOPS|none")]
    disk_iops_limit: Option<String>,
}

#[derive(Subcommand, Debug)]
enum VmSub {
    /// Define a VM (the VM options of wv run)
    #[command(
        long_about = "Defines a VM NAME on the daemon (start it with wv vm start NAME). The VM options are those
of wv run; its console belongs to the daemon (wv vm console). Relative paths are made
absolute against the current directory before they are sent.",
        after_help = CLIENT_STATUS
    )]
    Create {
        /// the VM's name (with --file: overrides the file's)
        #[arg(value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        vm: VmOpts,
        #[command(flatten)]
        sched: SchedOpts,
        /// the whole definition from a .toml or .json file with the fields of POST /v1/vms
        /// (relative paths in it are relative to the file); NAME overrides its name
        #[arg(long, value_name = "SPEC", verbatim_doc_comment)]
        file: Option<String>,
    },
    /// Change a VM's scheduler settings, network or disk shares, or memory target
    #[command(
        long_about = "Changes a VM's scheduler settings, network shares and disk shares (live when it runs) or,
while it runs, its memory target.",
        after_help = CLIENT_STATUS
    )]
    Set {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        sched: SchedOpts,
        #[command(flatten)]
        net: NetSharesOpts,
        #[command(flatten)]
        disk: DiskSharesOpts,
        /// the memory a running VM with a balloon (--balloon on) is to keep, e.g. 512M: its
        /// balloon inflates to take the rest back for the host, or deflates to give it back
        /// (live only; at most its --memory)
        #[arg(long, value_name = "SIZE", verbatim_doc_comment)]
        memory_target: Option<String>,
    },
    /// List the daemon's VMs
    #[command(after_help = CLIENT_STATUS)]
    List,
    /// Show a VM: definition, state, process
    #[command(after_help = CLIENT_STATUS)]
    Info(Name),
    /// Show a VM's CPU, ready and throttled time, per thread
    #[command(after_help = CLIENT_STATUS)]
    Stats(Name),
    /// Attach the terminal to a running VM's serial console; Ctrl-] detaches
    #[command(after_help = CLIENT_STATUS)]
    Console(Name),
    /// Start a VM in its own VMM process, supervised by the daemon
    #[command(after_help = CLIENT_STATUS)]
    Start(Name),
    /// Stop a running VM
    #[command(after_help = CLIENT_STATUS)]
    Stop(Name),
    /// Pause a running VM
    #[command(after_help = CLIENT_STATUS)]
    Pause(Name),
    /// Resume a paused VM
    #[command(after_help = CLIENT_STATUS)]
    Resume(Name),
    /// Delete a VM's definition and state
    #[command(after_help = CLIENT_STATUS)]
    Delete(Name),
    /// Save a running VM as a snapshot; the VM runs on
    #[command(
        long_about = "Saves a running VM (state, devices and memory) as the daemon's snapshot SNAPSHOT;
the VM runs on (docs/SNAPSHOT.md).",
        after_help = CLIENT_STATUS
    )]
    Snapshot {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// the snapshot
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
        /// snapshot a VM with disks: you keep the disk images consistent with it
        #[arg(long)]
        allow_raw_disk: bool,
    },
    /// Start a stopped VM from a snapshot
    #[command(
        long_about = "Starts the stopped VM NAME from snapshot SNAPSHOT instead of booting it; the
snapshot's configuration becomes the VM's.",
        after_help = CLIENT_STATUS
    )]
    Restore {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// the snapshot
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
    },
    /// Start new VMs from a snapshot
    #[command(
        long_about = "Starts new VMs from snapshot SNAPSHOT: NAME, or NAME-1..NAME-N with --count N;
each gets new MACs and a new generation id, and they share the snapshot's memory
until they write it.",
        after_help = CLIENT_STATUS
    )]
    Clone {
        /// the snapshot
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// how many clones (1 to 64, default 1)
        #[arg(long, value_name = "N")]
        count: Option<String>,
    },
    /// List the daemon's snapshots
    #[command(after_help = CLIENT_STATUS)]
    Snapshots,
    /// Delete a snapshot (VMs restored from it run on)
    #[command(after_help = CLIENT_STATUS)]
    DeleteSnapshot {
        /// the snapshot
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
    },
    /// Move a running VM to another daemon while it runs
    #[command(
        long_about = "Moves a running VM to the daemon at HOST:PORT (its API over TCP: wv host --listen)
while it runs; the VM keeps its name there, and here it is stopped, \"migrated to
HOST:PORT\". On failure it runs on here (docs/MIGRATION.md).",
        after_help = CLIENT_STATUS
    )]
    Migrate {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// the target daemon's API over TCP (required)
        #[arg(long, value_name = "HOST:PORT")]
        to: Option<String>,
        /// the target daemon's token (wv host token there; default: $WV_TARGET_TOKEN)
        #[arg(long, value_name = "T")]
        token: Option<String>,
        /// the pause the VM may take at the switch-over (default 300)
        #[arg(long, value_name = "N")]
        downtime_ms: Option<String>,
        /// copy the VM's writable disks too (no shared storage): raw images land in the
        /// VM's folder on the target, VMKFS disks in the target's datastore --datastore
        #[arg(long, verbatim_doc_comment)]
        copy_disks: bool,
        /// with --copy-disks: the VMKFS datastore on the target host that the VM's
        /// VMKFS disks are copied into (needed when it has any)
        #[arg(long, value_name = "PATH", verbatim_doc_comment)]
        datastore: Option<String>,
    },
    /// Hot-plug a disk or a net into a running VM (also: wv vm device add)
    #[command(
        long_about = "Hot-plugs a disk or a net into the running VM NAME (ACPI PCI hot-plug;
docs/DEVICES.md): for a raw image the daemon opens it (under its --images directories), a
VMKFS disk the storage world serves, for a net it adds a port to its network's switch;
it hands the VMM the file or connection. A served disk or a net needs the VM's memory
shared (it was started with a net on a network, or --memory-shared on).
Once the VMM has taken it, the device is part of the VM's definition: its next start boots
with it. Also spelt `wv vm device add NAME ...`.",
        after_help = CLIENT_STATUS
    )]
    DeviceAdd {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// a disk: a raw image, or a VMKFS disk (served by the storage world), and the
        /// id to remove it by
        #[arg(
            long,
            value_name = "path=IMG|vmkfs=DS:NAME,id=ID[,readonly=on][,via=storage]",
            verbatim_doc_comment
        )]
        disk: Option<String>,
        /// a net on one of the daemon's networks, and the id to remove it by
        #[arg(long, value_name = "network=NAME,id=ID[,mac=MAC]")]
        net: Option<String>,
    },
    /// Unplug a hot-plugged device from a running VM, or take a device out of a stopped
    /// VM's definition (also: wv vm device remove)
    #[command(
        long_about = "Unplugs hot-plugged device ID from the running VM NAME, answering once the guest has
ejected it; it then leaves the VM's definition. Of a VM that does not run, takes device ID
out of its definition (its next start boots without it). Also spelt `wv vm device remove
NAME ID`.",
        after_help = CLIENT_STATUS
    )]
    DeviceRemove {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// the device's id=
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Switch a vhost-user device's data path: direct or interposed
    #[command(
        long_about = "Switches the data path of the running VM's vhost-user net or disk DEV (its id=):
direct (the switch or storage service reads the guest's rings) or interposed (the
VMM in between), while the guest runs (docs/DEVICES.md, Interposition).",
        after_help = CLIENT_STATUS
    )]
    Device {
        /// the VM
        #[arg(value_name = "NAME")]
        name: String,
        /// the device's id= (net0, disk1...)
        #[arg(value_name = "DEV")]
        dev: String,
        /// the data path (required)
        #[arg(long, value_name = "direct|interposed")]
        path: Option<String>,
        /// with interposed: write a net's frames (FILE.pcap) or a disk's requests
        /// (FILE.trace) to FILE in the VM's folder
        #[arg(long, value_name = "FILE", verbatim_doc_comment)]
        capture: Option<String>,
    },
}

// ---- wv net ----

/// `wv net COMMAND`.
#[derive(Args, Debug)]
#[command(
    subcommand_required = true,
    long_about = "Manages the daemon's networks (--socket PATH|tcp:HOST:PORT or WV_SOCKET; --json for
machine-readable output). docs/NETWORK.md."
)]
struct NetArgs {
    #[command(flatten)]
    client: GlobalClientOpts,
    #[command(subcommand)]
    sub: NetSub,
}

/// A network's name.
#[derive(Args, Debug)]
struct NetName {
    /// the network
    #[arg(value_name = "NAME")]
    name: String,
}

#[derive(Subcommand, Debug)]
enum NetSub {
    /// Make a network on the daemon's virtual switch
    #[command(
        long_about = "Makes network NAME on the daemon's virtual switch (a world of its own, restarted when it
dies); VMs join it with wv vm create --net network=NAME[,mac=MAC][,id=ID]. Networks
are isolated from one another; an uplink connects one to the host (docs/NETWORK.md).",
        after_help = CLIENT_STATUS
    )]
    Create {
        /// the network
        #[arg(value_name = "NAME")]
        name: String,
        /// a TAP connecting the network to the host (created if missing), or none
        /// (the default)
        #[arg(long, value_name = "tap=NAME|none", verbatim_doc_comment)]
        uplink: Option<String>,
        /// the uplink's link speed in bits per second, e.g. 1G (K, M, G: thousands;
        /// needs --uplink): frames to the uplink are then scheduled by the sending
        /// VMs' --net-shares, reservations and limits (default: not scheduled)
        #[arg(long, value_name = "BPS", verbatim_doc_comment)]
        uplink_rate: Option<String>,
    },
    /// List the daemon's networks
    #[command(after_help = CLIENT_STATUS)]
    List,
    /// Show a network: its VMs, and its ports with the switch's counters
    #[command(
        long_about = "Shows a network: the VMs defined on it, and its ports (the VM of each) with the
switch's counters: frames, bytes, copies and drops.",
        after_help = CLIENT_STATUS
    )]
    Info(NetName),
    /// Delete a network no VM definition uses
    #[command(after_help = CLIENT_STATUS)]
    Delete(NetName),
}

// ---- wv vswitch, wv storage ----

#[derive(Args, Debug)]
#[command(
    long_about = "Runs the virtual switch in the foreground: an L2 learning switch per network whose ports
are vhost-user net backends, one socket each at DIR/NETWORK/PORT.sock, for VMs started with
--net vhost-user=DIR/NETWORK/PORT.sock. Networks are isolated from one another; an uplink
connects a network to the host through a TAP. On DIR/control.sock, one request a line, one
JSON line back: 'stats' (counters per port), 'nets', 'net add NAME [uplink=TAP]', 'net del NAME',
'port add NETWORK/PORT', 'port del NETWORK/PORT' (networks and ports change at run time).
docs/NETWORK.md.",
    after_help = "Exit status: 200 bad arguments, 1 the switch could not start."
)]
struct VswitchArgs {
    /// where the sockets are made (required)
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<String>,
    /// a VM port on network NETWORK (repeatable; the network is made with its first port)
    #[arg(long, value_name = "NETWORK/PORT")]
    port: Vec<String>,
    /// a network without VM ports yet (repeatable)
    #[arg(long, value_name = "NAME")]
    network: Vec<String>,
    /// connect NETWORK to the host through TAP (created and brought up if missing,
    /// which needs CAP_NET_ADMIN; repeatable, one per network)
    #[arg(long, value_name = "NETWORK=TAP", verbatim_doc_comment)]
    uplink: Vec<String>,
}

#[derive(Args, Debug)]
#[command(
    long_about = "Runs the storage service in the foreground: it holds disks (raw images, VMKFS disks) and
serves each over vhost-user-blk on DIR/NAME.sock, for VMs started with
--disk vhost-user=DIR/NAME.sock. It holds each disk's exclusive open while it serves it.
Control: send 'stats', 'disk add NAME=SPEC' or 'disk del NAME' on DIR/control.sock (one JSON
line back each). docs/STORAGE.md.",
    after_help = "Exit status: 200 bad arguments, 1 the service could not start."
)]
struct StorageArgs {
    /// where the sockets are made (required)
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<String>,
    /// serve a disk as NAME (repeatable; none: disks come with 'disk add'):
    /// NAME=path=IMG or NAME=vmkfs=DATASTORE:DISK, then [,readonly=on]
    #[arg(long, value_name = "NAME=SPEC", verbatim_doc_comment)]
    disk: Vec<String>,
    /// break a VMKFS disk's stale lock record (its writer, such as a storage service
    /// that was killed, is gone) and take the disk
    #[arg(long, verbatim_doc_comment)]
    take_stale_locks: bool,
    /// the device's capacity in I/Os per second (a request costs 1 + bytes/32KiB),
    /// shared by the disks by their shares, reservations and limits ('disk set NAME
    /// shares=N reservation_iops=R limit_iops=L' on the control socket; default: none)
    #[arg(long, value_name = "N", verbatim_doc_comment)]
    capacity_iops: Option<String>,
}

// ---- wv fs ----

const FS_STATUS: &str = "Exit status: 0 done, 1 the operation failed, 200 bad usage.";

/// `wv fs COMMAND`.
#[derive(Args, Debug)]
#[command(
    subcommand_required = true,
    long_about = "VMKFS datastores for virtual disks: a block device or a file standing in for a partition
(DS below)."
)]
struct FsArgs {
    /// machine-readable output
    #[arg(long, global = true, display_order = 1000)]
    json: bool,
    #[command(subcommand)]
    sub: FsSub,
}

/// `wv fs` commands that take a datastore and a disk name.
#[derive(Args, Debug)]
struct DsName {
    /// the datastore: a block device or a file
    #[arg(value_name = "DS")]
    ds: String,
    /// the disk
    #[arg(value_name = "NAME")]
    name: String,
}

/// `wv fs` commands that take a datastore.
#[derive(Args, Debug)]
struct Ds {
    /// the datastore: a block device or a file
    #[arg(value_name = "DS")]
    ds: String,
}

#[derive(Subcommand, Debug)]
enum FsSub {
    /// Make a datastore (--size creates the file DS first)
    #[command(after_help = FS_STATUS)]
    Mkfs {
        /// the datastore: a block device or a file
        #[arg(value_name = "DS")]
        ds: String,
        /// create DS as a file of SIZE
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        /// 64K to 256M (default 1M)
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        /// file slots
        #[arg(long, value_name = "N")]
        max_files: Option<String>,
        /// a label
        #[arg(long, value_name = "L")]
        label: Option<String>,
        /// replace an existing datastore
        #[arg(long)]
        force: bool,
    },
    /// Show the datastore: block size, space, files, metadata
    #[command(after_help = FS_STATUS)]
    Info(Ds),
    /// List its files (frozen NAME@N are the parents of redo logs)
    #[command(after_help = FS_STATUS)]
    Ls(Ds),
    /// Make a virtual disk, preallocated and zeroed unless --thin
    #[command(after_help = FS_STATUS)]
    Create {
        #[command(flatten)]
        at: DsName,
        /// size, e.g. 20G (required)
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        /// allocate on first write instead of preallocating and zeroing
        #[arg(long)]
        thin: bool,
    },
    /// Remove a disk (with the frozen parents of its redo logs)
    #[command(after_help = FS_STATUS)]
    Rm(DsName),
    /// Grow a disk
    #[command(after_help = FS_STATUS)]
    Resize {
        #[command(flatten)]
        at: DsName,
        /// size, e.g. 20G (required)
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
    },
    /// Start a redo log: NAME's current contents freeze as NAME@N
    #[command(after_help = FS_STATUS)]
    Snapshot(DsName),
    /// Merge NAME's redo log into its parent
    #[command(after_help = FS_STATUS)]
    Commit(DsName),
    /// Drop NAME's redo log: back to the contents at the snapshot
    #[command(after_help = FS_STATUS)]
    Revert(DsName),
    /// Start a new redo log NEW on the frozen file FROZEN (NAME@N), beside any others
    #[command(
        long_about = "Starts a new redo log NEW on the frozen file FROZEN (NAME@N), beside any others: it reads
FROZEN's contents until written.",
        after_help = FS_STATUS
    )]
    Branch {
        /// the datastore: a block device or a file
        #[arg(value_name = "DS")]
        ds: String,
        /// a frozen file, NAME@N
        #[arg(value_name = "FROZEN")]
        frozen: String,
        /// the new disk
        #[arg(value_name = "NEW")]
        new: String,
    },
    /// Make a new disk from an image (raw, qcow2 or any format qemu-img reads)
    #[command(after_help = FS_STATUS)]
    Import {
        #[command(flatten)]
        at: DsName,
        /// the image to import
        #[arg(value_name = "SOURCE")]
        source: String,
        /// allocate on first write instead of preallocating and zeroing
        #[arg(long)]
        thin: bool,
    },
    /// Write a disk to a raw image (sparse)
    #[command(after_help = FS_STATUS)]
    Export {
        #[command(flatten)]
        at: DsName,
        /// the raw image to write
        #[arg(value_name = "DEST")]
        dest: String,
    },
    /// Check the metadata (exit 1 if problems remain)
    #[command(after_help = FS_STATUS)]
    Check {
        /// the datastore: a block device or a file
        #[arg(value_name = "DS")]
        ds: String,
        /// fix what it finds
        #[arg(long)]
        repair: bool,
    },
    /// Break a lock record a crashed writer left
    #[command(after_help = FS_STATUS)]
    Unlock(DsName),
}

// ---- The tree, parsing, errors ----

/// `wv run`'s options as a clap command, made from its table ([`RUN`]): only for `wv --help`'s
/// list and for completion; `wv run` itself is never parsed by clap.
fn run_mirror() -> clap::Command {
    let mut c = clap::Command::new("run")
        .about("Boot one VM in the foreground until the guest powers off (see wv run --help)")
        .display_order(0);
    for o in RUN.opts.iter().flat_map(|g| g.iter()) {
        let id = o.long.trim_start_matches('-');
        let a = clap::Arg::new(id).long(id).help(o.help);
        let a = match o.arg {
            crate::cli::Arg::Flag => a.action(clap::ArgAction::SetTrue),
            crate::cli::Arg::Value(v) => a.value_name(v).action(clap::ArgAction::Append),
            crate::cli::Arg::Inline(v) => a
                .value_name(v)
                .num_args(0..=1)
                .require_equals(true)
                .action(clap::ArgAction::Set),
        };
        c = c.arg(a);
    }
    c
}

/// Sets what every command of the tree shares: its help starts with its usage, an option
/// given twice counts once (the last), an option's value may start with '-' (as `wv run`'s
/// scanner reads it: `--limit -1` is a bad limit, not a missing value), and a family without
/// its command word is a usage error (derive's default prints the help, to stderr).
fn finish(c: clap::Command) -> clap::Command {
    c.help_template("{usage-heading} {usage}\n\n{about-with-newline}\n{all-args}{after-help}")
        .args_override_self(true)
        .arg_required_else_help(false)
        .mut_args(|a| {
            if !a.is_positional() && a.get_action().takes_values() {
                a.allow_hyphen_values(true)
            } else {
                a
            }
        })
        .mut_subcommands(finish)
}

/// The whole tree: every command of [`Wv`], and `wv run`'s mirror.
fn tree() -> clap::Command {
    Wv::command()
        .args_override_self(true)
        .arg_required_else_help(false)
        .mut_subcommands(finish)
        .subcommand(finish(run_mirror()))
}

/// Parses a command line other than `wv run` (without the program name).
pub fn parse(args: &[String]) -> Result<Command, Usage> {
    // `wv vm device add|remove ...` is `wv vm device-add|device-remove ...`.
    let mut argv: Vec<String> = Vec::with_capacity(args.len() + 1);
    argv.push("wv".into());
    argv.extend_from_slice(args);
    if argv.get(1).is_some_and(|a| a == "vm") {
        if let Some(i) = argv.iter().position(|a| a == "device") {
            if matches!(argv.get(i + 1).map(String::as_str), Some("add" | "remove")) {
                let word = argv.remove(i + 1);
                argv[i] = format!("device-{word}");
            }
        }
    }
    let mut tree = tree();
    if args.is_empty() {
        return Ok(Command::Help(
            tree.render_help().to_string().trim_end().into(),
        ));
    }
    let matches = match tree.try_get_matches_from_mut(&argv) {
        Ok(m) => m,
        // `--help` and `--version` come from clap as errors: they are answers, for stdout.
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Ok(Command::Help(e.render().to_string().trim_end().into()));
        }
        Err(e) => return Err(error(&e, &tree)),
    };
    let wv = Wv::from_arg_matches(&matches).map_err(|e| error(&e, &tree))?;
    convert(wv.cmd)
}

/// The command an error is about (`wv vm create`), from the usage clap put in it.
fn command_path(e: &clap::Error) -> String {
    let usage = match e.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(s)) => s.to_string(),
        _ => String::new(),
    };
    let words: Vec<&str> = usage
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("Usage:")
        .split_whitespace()
        .take_while(|w| !w.starts_with(['[', '<', '-']))
        .collect();
    if words.is_empty() {
        "wv".into()
    } else {
        words.join(" ")
    }
}

fn context_strings(e: &clap::Error, kind: ContextKind) -> Vec<String> {
    match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        Some(ContextValue::StyledStr(s)) => vec![s.to_string()],
        Some(ContextValue::StyledStrs(v)) => v.iter().map(ToString::to_string).collect(),
        Some(ContextValue::Number(n)) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

/// The positional arguments of the command at `path` in `tree`, by their value names.
fn positionals(tree: &clap::Command, path: &str) -> Vec<String> {
    let mut c = tree;
    for w in path.split_whitespace().skip(1) {
        match c.find_subcommand(w) {
            Some(s) => c = s,
            None => return Vec::new(),
        }
    }
    c.get_positionals()
        .map(|a| {
            let name = a
                .get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| a.get_id().to_string(), ToString::to_string);
            if a.is_required_set() {
                name
            } else {
                format!("[{name}]")
            }
        })
        .collect()
}

/// "takes 2 arguments (NAME SNAPSHOT)", "takes no arguments".
fn takes(pos: &[String]) -> String {
    match pos.len() {
        0 => "takes no arguments".into(),
        1 => format!("takes 1 argument ({})", pos[0]),
        n => format!("takes {n} arguments ({})", pos.join(" ")),
    }
}

/// A clap error as `wv`'s one-line usage error.
fn error(e: &clap::Error, tree: &clap::Command) -> Usage {
    let path = command_path(e);
    let see = format!("(see {path} --help)");
    let arg = context_strings(e, ContextKind::InvalidArg);
    let first = arg.first().cloned().unwrap_or_default();
    // "--memory <SIZE>" -> "--memory"; "--json=yes" -> "--json".
    let opt = first
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .to_string();
    let m = match e.kind() {
        ErrorKind::InvalidSubcommand => {
            let sub = context_strings(e, ContextKind::InvalidSubcommand);
            let sub = sub.first().map_or("", String::as_str);
            if path == "wv" {
                format!("unknown command '{sub}' {see}")
            } else {
                format!("unknown '{path}' command '{sub}' {see}")
            }
        }
        ErrorKind::MissingSubcommand => {
            let valid = context_strings(e, ContextKind::ValidSubcommand);
            let valid: Vec<&str> = valid
                .iter()
                .map(String::as_str)
                .filter(|s| *s != "help")
                .collect();
            format!("{path} needs a command: {} {see}", valid.join(", "))
        }
        ErrorKind::UnknownArgument if first.starts_with('-') && first != "-" => {
            format!("unknown option '{opt}' for '{path}' {see}")
        }
        ErrorKind::UnknownArgument => format!(
            "{path} {}: unexpected '{first}' {see}",
            takes(&positionals(tree, &path))
        ),
        ErrorKind::MissingRequiredArgument => format!(
            "{path} {}: missing {} {see}",
            takes(&positionals(tree, &path)),
            arg.join(" ")
        ),
        ErrorKind::InvalidValue | ErrorKind::NoEquals | ErrorKind::TooFewValues
            if context_strings(e, ContextKind::InvalidValue)
                .first()
                .is_none_or(String::is_empty) =>
        {
            let what = first.split_once(' ').map_or("", |(_, v)| v);
            format!(
                "option {opt} needs a value ({})",
                what.trim_matches(['<', '>'])
            )
        }
        ErrorKind::InvalidValue => {
            let bad = context_strings(e, ContextKind::InvalidValue);
            let valid = context_strings(e, ContextKind::ValidValue);
            format!(
                "'{}' is not {} ({first}) {see}",
                bad.first().map_or("", String::as_str),
                valid.join(" or ")
            )
        }
        ErrorKind::TooManyValues if first.split_once(' ').is_none() => {
            format!("option {opt} takes no value")
        }
        ErrorKind::ArgumentConflict => {
            let prior = context_strings(e, ContextKind::PriorArg);
            let prior = prior.first().map_or("", String::as_str);
            let prior = prior.split(' ').next().unwrap_or_default();
            match context_strings(e, ContextKind::InvalidSubcommand).first() {
                // `wv host --listen X status`: the daemon's options are not its commands'.
                Some(sub) if first.is_empty() => format!(
                    "'{path} {sub}' cannot be used with {prior}, an option of '{path}' itself \
                     (options go after the command: see {path} {sub} --help)"
                ),
                _ => format!("{opt} cannot be used with {prior} {see}"),
            }
        }
        _ => {
            // Anything else: clap's own first line, without its "error: ".
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("bad arguments");
            format!("{} {see}", line.trim_start_matches("error: "))
        }
    };
    Usage(m)
}

// ---- What clap read, as the typed commands ----

fn client(socket: Option<String>, json: bool) -> Client {
    Client {
        socket: socket.map_or_else(
            || {
                std::env::var_os("WV_SOCKET")
                    .map_or_else(|| PathBuf::from(wv_host::DEFAULT_SOCKET), PathBuf::from)
            },
            PathBuf::from,
        ),
        json,
    }
}

fn state_dir(s: Option<String>) -> PathBuf {
    PathBuf::from(s.as_deref().unwrap_or(wv_host::DEFAULT_STATE_DIR))
}

fn convert(top: Top) -> Result<Command, Usage> {
    match top {
        Top::Node { listen } => {
            let listen = listen
                .ok_or_else(|| Usage("wv node needs --listen ADDR (e.g. 0.0.0.0:7000)".into()))?;
            Ok(Command::Node(listen))
        }
        Top::ProbeImage { format, output } => match (format, output) {
            (Some(format), Some(o)) => Ok(Command::ProbeImage {
                format,
                output: PathBuf::from(o),
            }),
            _ => Err(Usage(
                "wv probe-image needs --format pvh|bzimage|exitbench and --output FILE".into(),
            )),
        },
        Top::Vswitch(a) => vswitch(a),
        Top::Storage(a) => storage(a),
        Top::Host(a) => host(a),
        Top::Vm(a) => vm(a),
        Top::Net(a) => net(a),
        Top::Fs(a) => fs(a),
        Top::Completions { shell } => Ok(Command::Completions(completion_script(&shell))),
    }
}

fn vswitch(a: VswitchArgs) -> Result<Command, Usage> {
    let dir = a
        .socket_dir
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
    for n in &a.network {
        network(&mut cfg, n)?;
    }
    for p in &a.port {
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
    for u in &a.uplink {
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

fn storage(a: StorageArgs) -> Result<Command, Usage> {
    let dir = a
        .socket_dir
        .ok_or_else(|| Usage("wv storage needs --socket-dir DIR".into()))?;
    let mut cfg = wv_storage::Config {
        socket_dir: PathBuf::from(dir),
        disks: Vec::new(),
        take_stale_locks: a.take_stale_locks,
        capacity_iops: match &a.capacity_iops {
            Some(v) => v.parse().map_err(|_| {
                Usage(format!(
                    "--capacity-iops '{}': expected a number of I/Os per second",
                    v.escape_debug()
                ))
            })?,
            None => 0,
        },
    };
    for d in &a.disk {
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

fn host(a: HostArgs) -> Result<Command, Usage> {
    let Some(sub) = a.sub else {
        let d = a.daemon;
        let memory = lending_settings(&d)?;
        let (mut storage_default, mut storage_devices) = (0, Vec::<(String, u64)>::new());
        for v in &d.storage_capacity_iops {
            const O: &str = "--storage-capacity-iops";
            match v.rsplit_once('=') {
                Some((dev, n)) => {
                    let n = iops(O, n)?;
                    wv_host::storage::check_device(dev).map_err(|e| Usage(format!("{O}: {e}")))?;
                    storage_devices.retain(|(d, _)| d != dev);
                    storage_devices.push((dev.to_string(), n));
                }
                None => storage_default = iops(O, v)?,
            }
        }
        let placement = d
            .placement
            .as_deref()
            .map_or(Ok(wv_host::place::Mode::Auto), str::parse)
            .map_err(|e| Usage(format!("--placement: {e}")))?;
        return Ok(Command::HostServe {
            socket: client(d.socket, false).socket,
            state_dir: state_dir(d.state_dir),
            listen: d.listen,
            web: d.web,
            images: d.images.into_iter().map(PathBuf::from).collect(),
            jail: match (d.no_jail, d.jail_uids) {
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
            memory,
            placement,
            storage_capacity_iops: storage_default,
            storage_device_capacity: storage_devices,
        });
    };
    Ok(match sub {
        HostSub::Status(c) => Command::HostStatus(client(c.socket, c.json)),
        HostSub::Memory(c) => Command::HostMemory(client(c.socket, c.json)),
        HostSub::Storage {
            capacity_iops,
            device,
            client: c,
        } => {
            let set = match capacity_iops.as_deref() {
                None => None,
                Some("default") if device.is_some() => Some(serde_json::Value::Null),
                Some(v) => Some(iops("--capacity-iops", v)?.into()),
            };
            let body = set.map(|n| {
                let mut b = serde_json::json!({ "capacity_iops": n });
                if let Some(d) = &device {
                    b["device"] = d.as_str().into();
                }
                b
            });
            Command::HostStorage(client(c.socket, c.json), body)
        }
        HostSub::Top { once, client: c } => Command::HostTop(client(c.socket, c.json), once),
        HostSub::Token(s) => Command::HostToken(state_dir(s.state_dir)),
        HostSub::Shutdown(c) => Command::HostShutdown(client(c.socket, c.json)),
        HostSub::Uninstall { state, yes } => {
            Command::HostUninstall(state_dir(state.state_dir), yes)
        }
        HostSub::Install { unit_dir, daemon } => {
            let cwd = cwd()?;
            let abs = |p: &str| cwd.join(p).display().to_string();
            let mut args = Vec::new();
            let mut push = |o: &str, v: String| args.extend([o.to_string(), v]);
            let d = &daemon;
            let paths = [("--socket", &d.socket), ("--state-dir", &d.state_dir)];
            for (o, v) in paths {
                if let Some(v) = v {
                    push(o, abs(v));
                }
            }
            for (o, v) in [
                ("--listen", &d.listen),
                ("--web", &d.web),
                ("--placement", &d.placement),
            ] {
                if let Some(v) = v {
                    push(o, v.clone());
                }
            }
            for v in &d.images {
                push("--images", abs(v));
            }
            if let Some(v) = &d.jail_uids {
                push("--jail-uids", v.clone());
            }
            if d.no_jail {
                args.push("--no-jail".into());
            }
            let sizes = [
                ("--host-memory-reserve", &d.host_memory_reserve),
                ("--idle-memory-tax", &d.idle_memory_tax),
                ("--host-memory", &d.host_memory),
            ];
            for (o, v) in sizes {
                if let Some(v) = v {
                    args.extend([o.to_string(), v.clone()]);
                }
            }
            for v in &d.storage_capacity_iops {
                args.extend(["--storage-capacity-iops".to_string(), v.clone()]);
            }
            Command::HostInstall {
                unit_dir: PathBuf::from(unit_dir.as_deref().unwrap_or("/etc/systemd/system")),
                args,
                socket: d.socket.as_ref().map(|s| cwd.join(s)),
            }
        }
    })
}

/// The lending policy's settings from `wv host`'s options.
fn lending_settings(d: &DaemonOpts) -> Result<wv_host::lending::Settings, Usage> {
    let size = |o: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| parse_size(v).map_err(|e| Usage(format!("{o}: {e}"))))
            .transpose()
    };
    let mut s = wv_host::lending::Settings {
        reserve: size("--host-memory-reserve", &d.host_memory_reserve)?.unwrap_or(0),
        host_memory: size("--host-memory", &d.host_memory)?,
        ..Default::default()
    };
    if let Some(t) = &d.idle_memory_tax {
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

fn net(a: NetArgs) -> Result<Command, Usage> {
    let c = client(a.client.socket, a.client.json);
    let cmd = match a.sub {
        NetSub::Create {
            name,
            uplink,
            uplink_rate,
        } => {
            let uplink = match uplink.as_deref() {
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
            let rate = uplink_rate
                .as_deref()
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
            NetCmd::Create(name, uplink, rate)
        }
        NetSub::List => NetCmd::List,
        NetSub::Info(n) => NetCmd::Info(n.name),
        NetSub::Delete(n) => NetCmd::Delete(n.name),
    };
    Ok(Command::Net(c, cmd))
}

fn vm(a: VmArgs) -> Result<Command, Usage> {
    let c = client(a.client.socket, a.client.json);
    let cmd = match a.sub {
        VmSub::Create {
            name,
            vm,
            sched: so,
            file,
        } => VmCmd::Create(Box::new(create_spec(name, &vm, &so, file.as_deref())?)),
        VmSub::Set {
            name,
            sched: so,
            net,
            disk,
            memory_target,
        } => {
            let s = sched(&so, &net, &disk)?;
            let target = memory_target
                .map(|v| parse_size(&v).map_err(|e| Usage(format!("--memory-target: {e}"))))
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
            VmCmd::Set(name, s, target)
        }
        VmSub::List => VmCmd::List,
        VmSub::Info(n) => VmCmd::Named("info", n.name),
        VmSub::Stats(n) => VmCmd::Named("stats", n.name),
        VmSub::Console(n) => VmCmd::Named("console", n.name),
        VmSub::Start(n) => VmCmd::Named("start", n.name),
        VmSub::Stop(n) => VmCmd::Named("stop", n.name),
        VmSub::Pause(n) => VmCmd::Named("pause", n.name),
        VmSub::Resume(n) => VmCmd::Named("resume", n.name),
        VmSub::Delete(n) => VmCmd::Named("delete", n.name),
        VmSub::Snapshots => VmCmd::Snapshots,
        VmSub::Snapshot {
            name,
            snapshot,
            allow_raw_disk,
        } => VmCmd::Snapshot(name, snapshot, allow_raw_disk),
        VmSub::Restore { name, snapshot } => VmCmd::Restore(name, snapshot),
        VmSub::DeviceAdd { name, disk, net } => {
            let (opt, spec) = match (disk.as_deref(), net.as_deref()) {
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
            VmCmd::DeviceAdd(name, device)
        }
        VmSub::DeviceRemove { name, id } => VmCmd::DeviceRemove(name, id),
        VmSub::Device {
            name,
            dev,
            path,
            capture,
        } => {
            let path = match path.as_deref() {
                Some(p @ ("direct" | "interposed")) => p.to_string(),
                Some(p) => return Err(Usage(format!("--path: '{p}' is not direct or interposed"))),
                None => {
                    return Err(Usage(
                        "wv vm device NAME DEV needs --path direct|interposed".into(),
                    ))
                }
            };
            if capture.is_some() && path == "direct" {
                return Err(Usage("--capture needs --path interposed".into()));
            }
            VmCmd::Device(name, dev, path, capture)
        }
        VmSub::Clone {
            snapshot,
            name,
            count,
        } => {
            let count = match count {
                None => 1,
                Some(v) => v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| Usage(format!("--count: '{v}' is not 1 to 64")))?,
            };
            VmCmd::Clone(snapshot, name, count)
        }
        VmSub::DeleteSnapshot { snapshot } => VmCmd::DeleteSnapshot(snapshot),
        VmSub::Migrate {
            name,
            to,
            token,
            downtime_ms,
            copy_disks,
            datastore,
        } => {
            let to = to.ok_or_else(|| Usage("wv vm migrate NAME needs --to HOST:PORT".into()))?;
            let token = token
                .or_else(|| std::env::var("WV_TARGET_TOKEN").ok())
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    Usage(
                        "wv vm migrate needs the target daemon's token: --token T or WV_TARGET_TOKEN (wv host token there shows it)"
                            .into(),
                    )
                })?;
            let downtime_ms = downtime_ms
                .map(|v| {
                    v.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        Usage(format!(
                            "--downtime-ms: '{v}' is not a number of milliseconds (1 or more)"
                        ))
                    })
                })
                .transpose()?;
            if datastore.is_some() && !copy_disks {
                return Err(Usage(
                    "--datastore says where copied VMKFS disks land: it needs --copy-disks".into(),
                ));
            }
            VmCmd::Migrate(Migrate {
                name,
                to,
                token,
                downtime_ms,
                copy_disks,
                datastore,
            })
        }
    };
    Ok(Command::Vm(c, cmd))
}

fn sched(s: &SchedOpts, n: &NetSharesOpts, d: &DiskSharesOpts) -> Result<Sched, Usage> {
    let cpus = |o: &str, v: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Usage(format!("{o}: '{v}' is not a number of CPUs")))
    };
    let whole = |o: &str, v: &str| {
        v.parse::<u32>()
            .map_err(|_| Usage(format!("{o}: '{v}' is not a whole number")))
    };
    Ok(Sched {
        shares: s
            .shares
            .as_deref()
            .map(|v| whole("--shares", v))
            .transpose()?,
        reservation: s
            .reservation
            .as_deref()
            .map(|v| cpus("--reservation", v))
            .transpose()?,
        limit: s
            .limit
            .as_deref()
            .map(|v| match v {
                "none" => Ok(None),
                v => cpus("--limit", v).map(Some),
            })
            .transpose()?,
        net_shares: n
            .net_shares
            .as_deref()
            .map(|v| whole("--net-shares", v))
            .transpose()?,
        net_reservation: n
            .net_reservation
            .as_deref()
            .map(|v| bits_per_second("--net-reservation", v))
            .transpose()?,
        net_limit: n
            .net_limit
            .as_deref()
            .map(|v| match v {
                "none" => Ok(0),
                v => bits_per_second("--net-limit", v),
            })
            .transpose()?,
        disk_shares: d
            .disk_shares
            .as_deref()
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
        disk_reservation_iops: d
            .disk_iops_reservation
            .as_deref()
            .map(|v| iops("--disk-iops-reservation", v))
            .transpose()?,
        disk_limit_iops: d
            .disk_iops_limit
            .as_deref()
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

/// `wv vm create`: the definition from the options or from `--file`, with absolute paths.
fn create_spec(
    name: Option<String>,
    vm: &VmOpts,
    so: &SchedOpts,
    file: Option<&str>,
) -> Result<VmSpec, Usage> {
    let mut spec = if let Some(file) = file {
        let sched_given = [
            ("--shares", so.shares.is_some()),
            ("--reservation", so.reservation.is_some()),
            ("--limit", so.limit.is_some()),
        ];
        let given = vm
            .first_given()
            .or_else(|| sched_given.iter().find(|(_, g)| *g).map(|(o, _)| *o));
        if let Some(o) = given {
            return Err(Usage(format!(
                "--file gives the whole definition: {o} cannot be added to it"
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
        let mut s = VmSpec::new(name);
        s.config = vm_config(vm_def(vm, true)?);
        let sc = sched(so, &NetSharesOpts::default(), &DiskSharesOpts::default())?;
        if let Some(x) = sc.shares {
            s.shares = x;
        }
        if let Some(x) = sc.reservation {
            s.reservation = x;
        }
        if let Some(x) = sc.limit {
            s.limit = x;
        }
        s
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

fn fs(a: FsArgs) -> Result<Command, Usage> {
    let size = |o: &str, v: Option<String>| {
        v.map(|v| parse_size(&v).map_err(|e| Usage(format!("{o}: {e}"))))
            .transpose()
    };
    let mut args = crate::fs::Args {
        json: a.json,
        ..Default::default()
    };
    let (cmd, pos): (&str, Vec<String>) = match a.sub {
        FsSub::Mkfs {
            ds,
            size: sz,
            block_size,
            max_files,
            label,
            force,
        } => {
            args.size = size("--size", sz)?;
            args.block_size = size("--block-size", block_size)?;
            args.max_files = max_files
                .map(|v| {
                    v.parse()
                        .map_err(|_| Usage(format!("--max-files: '{v}' is not a number")))
                })
                .transpose()?;
            args.label = label;
            args.force = force;
            ("mkfs", vec![ds])
        }
        FsSub::Info(d) => ("info", vec![d.ds]),
        FsSub::Ls(d) => ("ls", vec![d.ds]),
        FsSub::Create { at, size: sz, thin } => {
            args.size =
                Some(size("--size", sz)?.ok_or_else(|| Usage("wv fs create needs --size".into()))?);
            args.thin = thin;
            ("create", vec![at.ds, at.name])
        }
        FsSub::Rm(d) => ("rm", vec![d.ds, d.name]),
        FsSub::Resize { at, size: sz } => {
            args.size =
                Some(size("--size", sz)?.ok_or_else(|| Usage("wv fs resize needs --size".into()))?);
            ("resize", vec![at.ds, at.name])
        }
        FsSub::Snapshot(d) => ("snapshot", vec![d.ds, d.name]),
        FsSub::Commit(d) => ("commit", vec![d.ds, d.name]),
        FsSub::Revert(d) => ("revert", vec![d.ds, d.name]),
        FsSub::Branch { ds, frozen, new } => ("branch", vec![ds, frozen, new]),
        FsSub::Import { at, source, thin } => {
            args.thin = thin;
            ("import", vec![at.ds, at.name, source])
        }
        FsSub::Export { at, dest } => ("export", vec![at.ds, at.name, dest]),
        FsSub::Check { ds, repair } => {
            args.repair = repair;
            ("check", vec![ds])
        }
        FsSub::Unlock(d) => ("unlock", vec![d.ds, d.name]),
    };
    args.cmd = cmd.to_string();
    args.pos = pos;
    Ok(Command::Fs(args))
}

// ---- Completions ----

/// The completion script for `shell` (bash or zsh), generated by clap_complete from the whole
/// tree, `wv run`'s options included (from its table, [`run_mirror`]).
pub fn completion_script(shell: &str) -> String {
    let mut tree = tree();
    let mut out = Vec::new();
    if shell == "zsh" {
        clap_complete::generate(clap_complete::Shell::Zsh, &mut tree, "wv", &mut out);
    } else {
        clap_complete::generate(clap_complete::Shell::Bash, &mut tree, "wv", &mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The whole tree, for tests: every command and its options.
#[cfg(test)]
pub fn command_tree() -> clap::Command {
    let mut t = tree();
    t.build();
    t
}

/// `wv vm create`'s VM options are `wv run`'s: the same names, values and help.
#[cfg(test)]
pub fn vm_create_options() -> Vec<(String, String, String)> {
    let t = command_tree();
    let create = t
        .find_subcommand("vm")
        .and_then(|v| v.find_subcommand("create"))
        .expect("wv vm create");
    crate::cli::VM_OPTS
        .iter()
        .filter_map(|o| {
            let a = create
                .get_arguments()
                .find(|a| a.get_long() == Some(o.long.trim_start_matches('-')))?;
            Some((
                format!("--{}", a.get_long()?),
                a.get_value_names()?.first()?.to_string(),
                a.get_help()?.to_string(),
            ))
        })
        .collect()
}
