//! The control socket's threads: the listener (`api`) and one thread per connection
//! (`api-conn`), which reads the request (with a deadline), hands it to the control thread and
//! writes the answer.

use super::List;

/// The listener's list (it creates the connection threads, which inherit it).
pub(super) fn list() -> List {
    conn_list()
        .with(super::common::creates_threads())
        // Taking a connection.
        .allow(libc::SYS_accept4)
}

/// A connection thread's list.
pub(super) fn conn_list() -> List {
    super::common::list()
        // The request (recvmsg, which takes the files a client passes with it) and the answer
        // (std's UnixStream: sendto), and its deadline (SO_RCVTIMEO / SO_SNDTIMEO).
        .allow(libc::SYS_read)
        .allow(libc::SYS_recvfrom)
        .allow(libc::SYS_recvmsg)
        .allow(libc::SYS_sendto)
        .allow_arg(libc::SYS_setsockopt, 1, libc::SOL_SOCKET as u64)
        .allow(libc::SYS_poll)
        // The control thread's inbox: its eventfd written (write, common).
        .allow(libc::SYS_shutdown)
}
