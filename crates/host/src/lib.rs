//! The host kernel of seed 000 as a daemon (`wv host`): it owns the worlds of one host. Each
//! VM world runs in its own VMM process (`wv run`), started and supervised here, so one VM's
//! failure never takes down another or the daemon; the world table and the VM definitions
//! persist in the state directory; clients talk REST over a Unix socket ([`api`]); the
//! proportional-share scheduler ([`sched`]) divides the CPUs among the worlds.

pub mod api;
pub mod cgroup;
pub mod helper;
pub mod history;
pub mod lending;
pub use wv_http as http;
pub mod metrics;
pub mod network;
pub mod place;
pub mod sched;
pub mod service;
pub mod shutdown;
pub mod storage;
pub mod store;
pub mod supervisor;
pub mod world;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/worldvisor/wv.sock";
/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/worldvisor";
