//! virtio-net over real TAP devices inside network namespaces these tests create: the probe
//! guest ARPs for and pings the namespace's kernel, on wv and on QEMU. Needs root (for
//! namespaces and TAPs); without it the tests fail and say so.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

struct NetNs {
    name: String,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2) is needed");
    assert!(st.success(), "ip {args:?} failed");
}

impl NetNs {
    /// A namespace with TAP `tap0` holding `host_ip`/24, up.
    fn new(tag: &str, host_ip: &str) -> NetNs {
        NetNs::with_owner(tag, host_ip, None)
    }

    /// The same with the TAP owned by user `owner`.
    fn with_owner(tag: &str, host_ip: &str, owner: Option<&str>) -> NetNs {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("the network tests need root to create namespaces and TAP devices");
        }
        let name = format!("wvt-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        let mut add = vec![
            "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ];
        if let Some(u) = owner {
            add.extend(["user", u]);
        }
        ip(&add);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "tap0",
        ]);
        ip(&["-n", &ns.name, "link", "set", "tap0", "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn guest_arps_and_pings_the_host_through_virtio_net() {
    need_kvm();
    let ns = NetNs::new("ping", "10.77.1.1");
    let mut c = ns.exec(&wv_bin());
    c.args([
        "run",
        "--net",
        "tap=tap0,mac=52:54:00:ab:cd:01",
        "--stats=json",
    ])
    .args(["--cmdline", "probe.tests=net probe.net=10.77.1.2,10.77.1.1"]);
    let r = run_cmd(c, Duration::from_secs(120));
    assert_eq!(r.status, Some(0), "{r}");
    assert!(
        r.assert_pass("net")
            .contains("mac=52:54:00:ab:cd:01 arp=ok icmp=ok"),
        "{r}"
    );
    assert!(cause_count(&r.stats(), "mmio:virtio-net:tap0") > 0, "{r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_missing_tap_is_created_and_goes_away_with_the_vm() {
    need_kvm();
    let ns = NetNs::new("create", "10.77.2.1");
    let mut c = ns.exec(&wv_bin());
    c.args(["run", "--net", "tap=wvnew0", "--cmdline", "probe.tests=pci"]);
    let r = run_cmd(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.assert_pass("pci").contains("1af4/0x1041"), "{r}");
    let out = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "wvnew0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the TAP wv created outlived it");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn tap_without_permission_is_a_clear_error() {
    need_kvm();
    // A TAP that belongs to another user, and root without CAP_NET_ADMIN: /dev/kvm still
    // opens, attaching to the TAP does not.
    let ns = NetNs::with_owner("perm", "10.77.3.1", Some("12345"));
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &ns.name,
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
        "--",
    ])
    .arg(wv_bin())
    .args(["run", "--net", "tap=tap0"]);
    let r = run_cmd(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(207), "{r}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{r}");
    assert!(
        lines[0].starts_with("wv: error: cannot attach to TAP tap0")
            && lines[0].contains("CAP_NET_ADMIN"),
        "{r}"
    );
}

#[test]
fn bad_net_options() {
    for (spec, needle) in [
        ("tap0", "expected tap=NAME"),
        ("tap=t,mac=01:00:00:00:00:00", "not a unicast MAC"),
        ("tap=", "expected tap=NAME"),
    ] {
        let r = wv(&["run", "--net", spec]);
        assert_eq!(r.status, Some(200), "{r}");
        assert!(r.stderr.contains(needle), "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn guest_passes_the_same_network_test_on_qemu() {
    need_kvm();
    let dir = TempDir::new("qemu-net");
    let img = image(&dir, "pvh");
    let ns = NetNs::new("qemu", "10.77.4.1");
    let mut c = ns.exec(std::path::Path::new("qemu-system-x86_64"));
    c.args([
        "-accel",
        "kvm",
        "-M",
        "pc",
        "-m",
        "128M",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-serial", "stdio", "-monitor", "none", "-nodefaults"])
    .args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(&img)
    .args(["-append", "probe.tests=net probe.net=10.77.4.2,10.77.4.1"])
    .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
    .args([
        "-device",
        "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:ab:cd:04",
    ]);
    let r = run_cmd(c, Duration::from_secs(300));
    assert_eq!(r.status, Some(1), "{r}");
    assert!(
        r.assert_pass("net")
            .contains("mac=52:54:00:ab:cd:04 arp=ok icmp=ok"),
        "{r}"
    );
}
