//! Worldvisor's distributed shared memory: a region of memory kept coherent page by page
//! across the nodes of a cluster (single writer or many readers per page, write-invalidate,
//! a fixed distributed manager with versioned pages), over TCP, with userfaultfd doing the
//! access detection. The protocol and why it is correct: docs/DSM.md.
//!
//! A VMM hands its guest RAM mapping over with [`Region::from_raw`]; KVM's and the device
//! threads' accesses then fault into the node like any other access. A node that loses a
//! peer (dead, stalled, or breaking the protocol) reports it ([`Node::wait_error`],
//! [`Node::failed`]) within [`Config::peer_timeout`] and stops serving faults; the VMM then
//! stops the VM (docs/DSM.md, "Peer loss"). With mirroring ([`Config::mirror`]) every page's
//! latest contents are also on a second node, and the survivors of a loss recover its pages
//! and directory and go on (docs/DSM.md, "Mirroring").
//!
//! ```no_run
//! use wv_dsm::{Backing, Config, Listener, Node, Region};
//! let l = Listener::bind("127.0.0.1:0")?;
//! // ... exchange every node's l.local_addr() ...
//! # let peers = vec![l.local_addr()?];
//! let node = Node::join(l, Config::new(0, peers), Region::map(1 << 20, Backing::Anonymous)?)?;
//! let p = node.region().as_ptr(); // reads and writes through p are coherent
//! # let _ = p; Ok::<(), std::io::Error>(())
//! ```

pub mod coherence;
pub mod node;
pub mod proto;
pub mod uffd;
pub mod uffd_abi;

pub use coherence::{Engine, PageOps, PageState, Stats, StatsSnapshot, RECOVERY_TIMEOUT};
pub use node::{Config, Listener, Node, PeerError, DEFAULT_MIRROR_INTERVAL, DEFAULT_PEER_TIMEOUT};
pub use proto::{Access, Claim, Geometry, MirrorData, Msg, ProtoError};
pub use uffd::{Backing, Region};
