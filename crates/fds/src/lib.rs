//! Files a process was handed open, by the name it would have opened them by.
//!
//! A jailed VMM (`wv run --jail`) runs as an unprivileged user in a root that holds almost
//! nothing: before it drops its privileges it opens, as root, everything its configuration
//! names (`/dev/kvm`, kernel, initrd, disks, datastores, TAPs, sockets), and later the daemon
//! hands it more over its control socket (a migration's connection, a hot-plugged disk). They
//! wait here under the name the code that uses them would open: a path, or `tap:NAME`,
//! `tcp:ADDR`, `listen:PATH`; several may wait under one name (a datastore is opened once
//! per open file description its locks need). Each is taken once, by the first code that asks for it; the
//! places that open files ask here first and open by themselves only when nothing waits (as
//! in every unjailed process, where this table stays empty).
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Mutex;

/// The files waiting, by name, each with the token [`put`] gave it.
type Waiting = HashMap<String, Vec<(u64, OwnedFd)>>;

static TABLE: Mutex<Option<Waiting>> = Mutex::new(None);

/// The next token [`put`] gives.
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Most files that may wait at once (a client handing over more gets an error).
pub const MAX: usize = 256;

/// Leaves `fd` under `key`, after any already waiting there, for a [`take`]; its token, for
/// a [`take_exact`] (unique in the process, unlike a descriptor number, which is reused once
/// the file is closed).
pub fn put(key: &str, fd: OwnedFd) -> Result<u64, String> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let t = t.get_or_insert_with(HashMap::new);
    if t.values().map(Vec::len).sum::<usize>() >= MAX {
        return Err(format!("{MAX} handed-over files wait already"));
    }
    let token = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    t.entry(key.to_string()).or_default().push((token, fd));
    Ok(token)
}

/// The first file waiting under `key`, if any (then it is no longer there).
pub fn take(key: &str) -> Option<OwnedFd> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let t = t.as_mut()?;
    let v = t.get_mut(key)?;
    let (_, fd) = v.remove(0);
    if v.is_empty() {
        t.remove(key);
    }
    Some(fd)
}

/// The file left under the path `p` (its text as given, not canonicalized), as a `File`.
pub fn take_path(p: &Path) -> Option<std::fs::File> {
    take(p.to_str()?).map(std::fs::File::from)
}

/// The file [`put`] gave `token` if it still waits under `key` (then it is no longer there):
/// how a request takes back the files it brought and its command did not use.
pub fn take_exact(key: &str, token: u64) -> Option<OwnedFd> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let t = t.as_mut()?;
    let v = t.get_mut(key)?;
    let i = v.iter().position(|(k, _)| *k == token)?;
    let (_, fd) = v.remove(i);
    if v.is_empty() {
        t.remove(key);
    }
    Some(fd)
}

/// Whether anything was ever handed over (in a jailed VMM: the reason an open of something not
/// handed over fails, for error messages).
pub fn in_use() -> bool {
    TABLE.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// The keys waiting, sorted (diagnostics and tests).
pub fn keys() -> Vec<String> {
    let t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let mut k: Vec<String> = t.iter().flat_map(|m| m.keys().cloned()).collect();
    k.sort();
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is the process's: tests that look at all of it run one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn files_are_taken_once_each_in_the_order_they_were_put() {
        let _one = serial();
        let f = std::fs::File::open("/dev/zero").unwrap();
        put("/dev/x", f.into()).unwrap();
        let g = std::fs::File::open("/dev/null").unwrap();
        put("/dev/x", g.into()).unwrap();
        assert!(in_use());
        assert_eq!(keys(), vec!["/dev/x".to_string()]);
        // The first put comes first: /dev/zero reads zeros; then /dev/null, which reads nothing.
        let mut b = [1u8; 4];
        let mut first = take_path(Path::new("/dev/x")).expect("waiting");
        std::io::Read::read_exact(&mut first, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        let mut second = take_path(Path::new("/dev/x")).expect("waiting");
        assert_eq!(std::io::Read::read(&mut second, &mut b).unwrap(), 0);
        assert!(take("/dev/x").is_none());
        assert!(keys().is_empty());
    }

    #[test]
    fn a_file_is_taken_back_by_its_token_and_only_once() {
        let _one = serial();
        use std::os::fd::AsRawFd;
        let a: OwnedFd = std::fs::File::open("/dev/zero").unwrap().into();
        let b: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        let ta = put("/dev/y", a).unwrap();
        let tb = put("/dev/y", b).unwrap();
        assert_ne!(ta, tb);
        // The second one, though the first waits before it.
        assert_eq!(take_exact("/dev/y", tb).map(|f| f.as_raw_fd()), Some(rb));
        assert!(take_exact("/dev/y", tb).is_none());
        assert_eq!(take("/dev/y").map(|f| f.as_raw_fd()), Some(ra));
        assert!(take_exact("/dev/y", ta).is_none());
    }
}
