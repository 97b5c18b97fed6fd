//! The control thread: the control loop (stop signals through a signalfd, console input from
//! stdin and the console socket, the control API's commands: pause, resume, counters,
//! snapshot, migration send, shutdown, device add and remove). It also starts a post-copy source's `migrate-back`
//! thread (`migration.rs`), which inherits this list.

use super::ioctls::*;
use super::List;

/// The control thread's list.
pub(super) fn list() -> List {
    super::common::list()
        .with(super::common::creates_threads())
        .with(super::migration::back_list())
        // The loop: poll on the end eventfd, the signalfd, the API inbox, stdin, the console
        // socket and its client; read them; accept a console client.
        .allow(libc::SYS_poll)
        .allow(libc::SYS_ppoll)
        .allow(libc::SYS_read)
        .allow(libc::SYS_accept4)
        .allow(libc::SYS_recvfrom)
        .allow(libc::SYS_sendto)
        .fcntl(libc::F_SETFD)
        .fcntl(libc::F_GETFL)
        .fcntl(libc::F_SETFL)
        .fcntl(libc::F_DUPFD_CLOEXEC)
        // The sockets' files removed when the VM ends.
        .allow(libc::SYS_unlink)
        // Pause and resume: the kvmclock saved and set back; a vCPU kicked (tgkill, common).
        .ioctl(KVM_GET_CLOCK)
        .ioctl(KVM_SET_CLOCK)
        // GET /vm/counters: KVM's statistics of each vCPU.
        .ioctl(KVM_GET_STATS_FD)
        .allow(libc::SYS_pread64)
        // A snapshot: its directory and files written and synced (snapshot.rs), the VM's
        // interrupt controllers and PIT (the vCPUs' state is read on their own threads), VMKFS
        // disks frozen and branched (vmkfs_disk.rs: files created, locks, owner records).
        .ioctl(KVM_GET_IRQCHIP)
        .ioctl(KVM_GET_PIT2)
        .allow(libc::SYS_mkdir)
        .allow(libc::SYS_mkdirat)
        .allow(libc::SYS_openat)
        .allow(libc::SYS_newfstatat)
        .allow(libc::SYS_statx)
        .allow(libc::SYS_fstat)
        .allow(libc::SYS_getdents64)
        .allow(libc::SYS_lseek)
        .allow(libc::SYS_pwrite64)
        .allow(libc::SYS_ftruncate)
        .allow(libc::SYS_fallocate)
        .allow(libc::SYS_fsync)
        .allow(libc::SYS_fdatasync)
        .allow(libc::SYS_rename)
        .allow(libc::SYS_renameat)
        .allow(libc::SYS_renameat2)
        .allow(libc::SYS_unlinkat)
        .allow(libc::SYS_rmdir)
        .allow(libc::SYS_link)
        .allow(libc::SYS_linkat)
        .fcntl(libc::F_OFD_SETLK)
        .fcntl(libc::F_OFD_SETLKW)
        .fcntl(libc::F_OFD_GETLK)
        // A migration send (migrate.rs): a TCP connection to the target (IPv4 or IPv6; the
        // name resolved without DNS), KVM's dirty log turned on and read.
        .socket(libc::AF_INET)
        .socket(libc::AF_INET6)
        .allow(libc::SYS_connect)
        // connect with a deadline: non-blocking for the connection, then blocking again.
        .ioctl(FIONBIO)
        .allow(libc::SYS_setsockopt)
        .allow(libc::SYS_getsockopt)
        .allow(libc::SYS_getsockname)
        .allow(libc::SYS_getpeername)
        .allow(libc::SYS_shutdown)
        .allow(libc::SYS_writev)
        .ioctl(KVM_SET_USER_MEMORY_REGION)
        .ioctl(KVM_GET_DIRTY_LOG)
        .ioctl(KVM_CLEAR_DIRTY_LOG)
        .ioctl(KVM_CHECK_EXTENSION)
        // Hot-plug (hotplug.rs, pci.rs): a device built as at start (a disk image opened and
        // locked, a TAP opened and set up, a vhost-user backend connected), its eventfds made
        // and registered with KVM; an ejected device's notifications unregistered, its worker
        // stopped (futex, common) and its descriptors closed.
        // The configuration with the device validated as a whole (host RAM read, sysinfo).
        .allow(libc::SYS_sysinfo)
        .allow(libc::SYS_eventfd2)
        // A hot-plugged vhost-user device's shadow rings (wv_virtio::shadow): a memfd, sized
        // (ftruncate, above) and mapped shared.
        .allow(libc::SYS_memfd_create)
        .ioctl(KVM_IOEVENTFD)
        .ioctl(KVM_IRQFD)
        .allow(libc::SYS_flock)
        .ioctl(TUNSETIFF)
        .ioctl(TUNSETVNETHDRSZ)
        .ioctl(TUNSETOFFLOAD)
        .socket(libc::AF_UNIX)
        .allow(libc::SYS_sendmsg)
        .allow(libc::SYS_recvmsg)
}
