//! The userspace interrupt controllers' relay thread (`--irqchip user`, uapic.rs): waits on
//! the devices' interrupt eventfds, reads them, and delivers the messages (kicking a vCPU
//! thread is a tgkill, in the common list).

use super::List;

/// The relay's list.
pub(super) fn list() -> List {
    super::common::list()
        .allow(libc::SYS_poll)
        .allow(libc::SYS_ppoll)
        .allow(libc::SYS_read)
}
