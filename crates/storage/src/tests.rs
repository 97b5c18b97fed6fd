//! Unit tests of the service on raw rings: a guest is memfd-backed memory (as a VMM shares it)
//! with hand-written descriptor tables, and some of what it posts is hostile.

use super::*;
use std::os::fd::FromRawFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, Bytes, GuestAddress};
use wv_virtio::block::{req, MemDisk, S_IOERR, S_OK};

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x4000;
const STATUS: u64 = 0x8000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM: usize = 1 << 20;

fn memfd(len: u64) -> std::fs::File {
    // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is new.
    let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nothing else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// Guest memory of `len` bytes mapping `file` shared, as vhost-user-backend maps a table.
fn shared(file: &std::fs::File, len: usize) -> vm_memory::GuestMemoryMmap {
    let m = MmapRegionBuilder::new(len)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .build()
        .unwrap();
    vm_memory::GuestMemoryMmap::from_regions(
        vec![GuestRegionMmap::new(m, GuestAddress(0)).unwrap()],
    )
    .unwrap()
}

/// A guest connected to a disk's backend: its memory, its queue, and the backend.
struct Guest {
    mem: vm_memory::GuestMemoryMmap,
    vring: VringRwLock<Mem>,
    backend: BlkBackend,
    avail: u16,
}

impl Guest {
    fn new(disk: Box<dyn Disk>, name: &str) -> Guest {
        let f = memfd(MEM as u64);
        let mem = shared(&f, MEM);
        let served = Served::new(
            DiskSpec {
                name: name.into(),
                source: Source::Raw("/nonexistent".into()),
                readonly: disk.readonly(),
            },
            disk,
        );
        let backend = BlkBackend::new(served);
        backend
            .update_memory(GuestMemoryAtomic::new(mem.clone()))
            .unwrap();
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest {
            mem,
            vring,
            backend,
            avail: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Posts a request of type `ty` at `sector` whose data descriptor (if `len` > 0) has
    /// `len` bytes, served by a kick; returns (used length, status byte).
    fn request(&mut self, ty: u32, sector: u64, len: u32) -> (u32, u8) {
        self.mem.write_obj(ty, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        self.desc(0, HDR, 16, NEXT, 1);
        if len > 0 {
            let w = if ty == req::IN || ty == req::GET_ID {
                WRITE
            } else {
                0
            };
            self.desc(1, DATA, len, NEXT | w, 2);
            self.desc(2, STATUS, 1, WRITE, 0);
        } else {
            self.desc(1, STATUS, 1, WRITE, 0);
        }
        self.kick()
    }

    /// Makes chain 0 available and lets the backend serve it.
    fn kick(&mut self) -> (u32, u8) {
        let slot = u64::from(self.avail % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, self.avail, "every request completed");
        let at = GuestAddress(USED + 4 + 8 * u64::from((used - 1) % QSIZE));
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn stats(&self) -> DiskStats {
        self.backend.served.stats()
    }
}

fn mem_disk(sectors: usize, ro: bool) -> Box<dyn Disk> {
    Box::new(MemDisk {
        data: (0..sectors * 512).map(|i| (i / 512) as u8 + 1).collect(),
        ro,
        flushed: false,
    })
}

#[test]
fn requests_on_the_ring_are_served_and_counted() {
    let mut g = Guest::new(mem_disk(8, false), "d0");
    assert_eq!(g.request(req::IN, 2, 1024), (1025, S_OK));
    let mut buf = [0u8; 1024];
    g.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
    g.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(g.request(req::OUT, 5, 512), (1, S_OK));
    assert_eq!(g.request(req::IN, 5, 512), (513, S_OK));
    g.mem
        .read_slice(&mut buf[..512], GuestAddress(DATA))
        .unwrap();
    assert!(
        buf[..512].iter().all(|&b| b == 0x77),
        "the write is on the disk"
    );
    assert_eq!(g.request(req::FLUSH, 0, 0), (1, S_OK));
    assert_eq!(g.request(req::GET_ID, 0, 20), (21, S_OK));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..3], b"d0\0", "GET_ID answers the disk's name");
    let s = g.stats();
    assert_eq!(
        (s.requests, s.served, s.errors, s.dropped),
        (5, 5, 0, 0),
        "{s:?}"
    );
    assert_eq!((s.read_bytes, s.written_bytes, s.flushes), (1536, 512, 1));
    assert_eq!((s.reads, s.writes), (2, 1), "operations, by direction");
    assert!(s.connected);
}

#[test]
fn bad_requests_get_errors_and_the_service_goes_on() {
    let mut g = Guest::new(mem_disk(8, false), "d0");
    let mut ro = Guest::new(mem_disk(8, true), "ro");
    // Past the end, not whole sectors, an unknown type, a write to a read-only disk.
    assert_eq!(g.request(req::IN, 8, 512).1, S_IOERR);
    assert_eq!(g.request(req::OUT, 0, 100).1, S_IOERR);
    assert_eq!(g.request(99, 0, 0).1, wv_virtio::block::S_UNSUPP);
    assert_eq!(ro.request(req::OUT, 0, 512).1, S_IOERR);
    // Chains too broken to answer: writable before readable; a buffer outside guest memory;
    // a loop. Completed with length 0, status untouched.
    g.desc(0, STATUS, 1, WRITE | NEXT, 1);
    g.desc(1, HDR, 16, 0, 0);
    g.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(g.kick(), (0, 0xee));
    g.desc(0, HDR, 16, NEXT, 1);
    g.desc(1, MEM as u64 - 256, 512, NEXT, 2);
    g.desc(2, STATUS, 1, WRITE, 0);
    assert_eq!(g.kick().0, 0);
    g.desc(0, HDR, 16, NEXT, 1);
    g.desc(1, DATA, 512, NEXT, 0);
    assert_eq!(g.kick().0, 0);
    let s = g.stats();
    assert_eq!((s.requests, s.errors, s.dropped), (6, 3, 3), "{s:?}");
    // The same disk, and the other one, still serve.
    assert_eq!(g.request(req::IN, 0, 512), (513, S_OK));
    assert_eq!(ro.request(req::IN, 0, 512), (513, S_OK));
}

#[test]
fn a_memory_table_beyond_its_file_is_refused() {
    let f = memfd(4096);
    let b = BlkBackend::new(Served::new(
        DiskSpec::parse("d=path=/x").unwrap(),
        mem_disk(8, false),
    ));
    // A region of 1 MiB over a 4 KiB file: touching its end would raise SIGBUS.
    let e = b
        .update_memory(GuestMemoryAtomic::new(shared(&f, MEM)))
        .unwrap_err();
    assert!(e.to_string().contains("4096-byte file"), "{e}");
    // Anonymous memory (not shareable) is refused too.
    let anon = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
    assert!(b.update_memory(GuestMemoryAtomic::new(anon)).is_err());
    // Nothing to serve from: a kick does nothing.
    assert!(lock(&b.served.mem).is_none());
}

#[test]
fn the_configuration_space_is_the_disks() {
    let b = BlkBackend::new(Served::new(
        DiskSpec::parse("d=path=/x,readonly=on").unwrap(),
        mem_disk(8, true),
    ));
    let c = b.get_config(0, wv_virtio::block::CONFIG_SIZE as u32);
    assert_eq!(c, block::config_space(8));
    assert_eq!(b.get_config(0, 8), 8u64.to_le_bytes());
    assert_ne!(b.features() & block::F_RO, 0);
    assert_eq!(b.features() & block::F_DISCARD, 0);
}

#[test]
fn disk_specs_parse_and_bad_ones_are_refused() {
    assert_eq!(
        DiskSpec::parse("root=path=/a.img").unwrap(),
        DiskSpec {
            name: "root".into(),
            source: Source::Raw("/a.img".into()),
            readonly: false
        }
    );
    let v = DiskSpec::parse("web=vmkfs=/srv/ds:web-1,readonly=on").unwrap();
    assert_eq!(
        v.source,
        Source::Vmkfs {
            datastore: "/srv/ds".into(),
            disk: "web-1".into()
        }
    );
    assert!(v.readonly);
    for bad in [
        "",
        "root",
        "=path=/a",
        ".x=path=/a",
        "a/b=path=/a",
        "r=path=",
        "r=path=/a,vmkfs=/d:x",
        "r=vmkfs=/d",
        "r=vmkfs=:x",
        "r=path=/a,readonly=yes",
        "r=readonly=on",
    ] {
        let e = DiskSpec::parse(bad).unwrap_err();
        assert!(e.starts_with("--disk '"), "{bad}: {e}");
    }
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("wv-storage-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn the_service_holds_each_disk_and_adds_and_removes_disks_at_runtime() {
    let dir = tmp("svc");
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    let svc = Service::new(&dir.join("s"), false).unwrap();
    let r = svc.control(&format!("disk add a=path={}", img.display()));
    assert_eq!(r, serde_json::json!({"ok": true}));
    assert!(disk_socket(&dir.join("s"), "a").exists());
    // The service holds the image: nobody else may open it, even read-only.
    assert!(wv_virtio::block::RawDisk::open(&img, true).is_err());
    let r = svc.control(&format!("disk add a=path={}", img.display()));
    assert!(
        r["error"].as_str().unwrap().contains("already served"),
        "{r}"
    );
    let r = svc.control(&format!("disk add b=path={}", img.display()));
    assert!(r["error"].as_str().unwrap().contains("in use"), "{r}");
    let st = svc.control("stats");
    let disks = st["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0]["name"], "a");
    assert_eq!(disks[0]["size"], 8192);
    assert_eq!(disks[0]["connected"], false);
    assert_eq!(svc.control("disk del a"), serde_json::json!({"ok": true}));
    assert!(!disk_socket(&dir.join("s"), "a").exists());
    // Released: another user may take it.
    drop(wv_virtio::block::RawDisk::open(&img, false).unwrap());
    assert!(svc.control("disk del a")["error"].is_string());
    assert!(svc.control("bogus")["error"]
        .as_str()
        .unwrap()
        .starts_with("unknown request"));
    assert!(svc.stats().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn requests_wait_for_the_devices_capacity() {
    let mut g = Guest::new(mem_disk(8, false), "cap");
    g.backend.served.gate.set_capacity(1000);
    let t = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(g.request(req::IN, 0, 512), (513, 0));
    }
    // 50 I/Os of 1 + 512/32Ki at 1000 per second, less the burst: 40 ms at least.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(40),
        "{:?}",
        t.elapsed()
    );
    let s = g.stats();
    assert_eq!(s.sched.requests, 50);
    assert!(s.sched.delayed > 0);
}

/// A disk whose reads wait until the test opens it, telling the test when one has started.
struct HeldDisk {
    inner: MemDisk,
    entered: std::sync::mpsc::Sender<()>,
    open: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Disk for HeldDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn readonly(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let _ = self.entered.send(());
        let (m, cv) = &*self.open;
        let mut open = m.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.discard(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l)
    }
}

/// GET_VRING_BASE (the ring marked stopped, then `stop_vring`) while a request is being done:
/// the answer waits for it, so the position it gives counts the request as completed; the
/// frontend that takes the ring over (a VMM interposing) neither loses it nor has it served
/// twice.
#[test]
fn stopping_the_ring_waits_for_the_request_in_hand() {
    let (entered, started) = std::sync::mpsc::channel();
    let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let disk = HeldDisk {
        inner: MemDisk {
            data: vec![7; 8 * 512],
            ro: false,
            flushed: false,
        },
        entered,
        open: open.clone(),
    };
    let g = Guest::new(Box::new(disk), "held");
    g.mem.write_obj(req::IN, GuestAddress(HDR)).unwrap();
    g.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    g.mem.write_obj(3u64, GuestAddress(HDR + 8)).unwrap();
    g.desc(0, HDR, 16, NEXT, 1);
    g.desc(1, DATA, 512, NEXT | WRITE, 2);
    g.desc(2, STATUS, 1, WRITE, 0);
    g.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    g.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let (backend, vring) = (g.backend.clone(), g.vring.clone());
    let server = std::thread::spawn(move || {
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
    });
    started
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    // The frontend's GET_VRING_BASE, as vhost-user-backend does it.
    let (backend, vring) = (g.backend.clone(), g.vring.clone());
    let (tx, stopped) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        vring.set_queue_ready(false);
        backend.stop_vring(0).unwrap();
        let _ = tx.send(vring.queue_next_avail());
    });
    // Not answered while the read is held.
    assert!(stopped
        .recv_timeout(std::time::Duration::from_millis(200))
        .is_err());
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    let base = stopped
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    server.join().unwrap();
    stopper.join().unwrap();
    let used: u16 = g.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(
        (base, used),
        (1, 1),
        "taken and completed before the answer"
    );
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(g.stats().served, 1);
}

#[test]
fn each_datastore_has_its_own_dispatcher_and_capacity() {
    let ds = |p: &str| Source::Vmkfs {
        datastore: PathBuf::from(p),
        disk: "web".into(),
    };
    assert_eq!(device_of(&Source::Raw("/a.img".into())), RAW_DEVICE);
    assert_eq!(device_of(&Source::Raw("/b.img".into())), RAW_DEVICE);
    assert_eq!(device_of(&ds("/nonexistent/ds1")), "/nonexistent/ds1");
    assert_ne!(
        device_of(&ds("/nonexistent/ds1")),
        device_of(&ds("/nonexistent/ds2"))
    );

    let dir = tmp("devices");
    let svc = Service::new(&dir.join("s"), false).unwrap();
    svc.set_capacity(700);
    for n in ["a", "b"] {
        let img = dir.join(format!("{n}.img"));
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let r = svc.control(&format!("disk add {n}=path={}", img.display()));
        assert_eq!(r, serde_json::json!({"ok": true}));
    }
    let st = svc.control("stats");
    assert_eq!(st["capacity_iops"], 700);
    assert_eq!(
        st["devices"],
        serde_json::json!([{"device": "raw", "capacity_iops": 700, "disks": ["a", "b"]}]),
        "the raw images share one dispatcher"
    );
    assert_eq!(st["disks"][0]["device"], "raw");
    // One device's own capacity, kept when every device's changes, and given back.
    assert_eq!(
        svc.control("set capacity_iops=300 device=raw"),
        serde_json::json!({"ok": true})
    );
    assert_eq!(svc.control("set capacity_iops=900")["ok"], true);
    assert_eq!(svc.control("stats")["devices"][0]["capacity_iops"], 300);
    assert_eq!(
        svc.control("set capacity_iops=default device=raw")["ok"],
        true
    );
    assert_eq!(svc.control("stats")["devices"][0]["capacity_iops"], 900);
    for bad in [
        "set",
        "set capacity_iops=x",
        "set capacity_iops=5 device=",
        "set capacity_iops=default",
        "set device=raw",
        "set capacity_iops=1 capacity_iops=2",
    ] {
        let r = svc.control(bad);
        assert!(
            r["error"].as_str().unwrap().contains("capacity_iops=N"),
            "{bad}: {r}"
        );
    }
    for n in ["a", "b"] {
        assert_eq!(svc.control(&format!("disk del {n}"))["ok"], true);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
