//! A live migration source's helper thread in post-copy (`migrate-back`): reads the target's
//! page requests from the TCP connection and hands them to the control thread, which runs the
//! rest of a migration send (`control.rs`) and started this thread (so its list covers this).

use super::List;

/// The helper's list.
pub(super) fn back_list() -> List {
    super::common::list()
        // The target's requests (std's TcpStream reads; no deadline).
        .allow(libc::SYS_read)
        .allow(libc::SYS_recvfrom)
        .allow_arg(libc::SYS_setsockopt, 1, libc::SOL_SOCKET as u64)
}
