use super::*;

#[test]
fn sizes() {
    assert_eq!(parse_size("256M"), Ok(256 << 20));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("2g"), Ok(2 << 30));
    assert_eq!(parse_size("512KiB"), Ok(512 << 10));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    for bad in [
        "",
        "M",
        "-1M",
        "1.5G",
        "12Q",
        "99999999999999999999G",
        "0x10M",
        " G",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn sizes_round_trip() {
    for (b, t) in [
        (256 << 20, "256M"),
        (2 << 30, "2G"),
        (4100 << 10, "4100K"),
        (4097, "4097"),
        (0, "0"),
        (1 << 40, "1T"),
    ] {
        assert_eq!(format_size(b), t);
        assert_eq!(parse_size(t), Ok(b));
    }
}

fn cfg() -> VmConfig {
    VmConfig::default()
}

#[test]
fn net_specs() {
    assert_eq!(
        NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap(),
        NetConfig::tap("tap0", Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
    );
    assert_eq!(NetConfig::parse("tap=t").unwrap().mac, None);
    let v = NetConfig::parse("vhost-user=/run/sw/a.sock,id=eth0").unwrap();
    assert_eq!(
        v.vhost_user.as_deref(),
        Some(std::path::Path::new("/run/sw/a.sock"))
    );
    assert_eq!((v.tap.as_str(), v.name().as_str()), ("", "eth0"));
    assert_eq!(
        NetConfig::parse("vhost-user=/x/p.sock").unwrap().name(),
        "p.sock"
    );
    let mut c = cfg();
    assert!(!c.memory_is_shared());
    c.nets = vec![v];
    assert!(c.memory_is_shared(), "a vhost-user net shares guest memory");
    for bad in [
        "",
        "tap=",
        "mac=52:54:00:12:34:56",
        "tap=t,mac=01:00:00:00:00:01",
        "tap=t,mac=52:54:00:12:34",
        "tap=t,mac=52:54:00:12:34:56:78",
        "tap=t,mac=zz:54:00:12:34:56",
        "tap=waytoolonginterfacename",
        "vhost-user=",
        "tap=t,vhost-user=/s",
        "vhost-user=/s,tap=t",
        "vhost-user=/s,id=",
    ] {
        assert!(NetConfig::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn disk_specs() {
    let d = DiskConfig::parse("vmkfs=/dev/sdb:1:web,id=root", 0).unwrap();
    assert_eq!(
        (d.path.to_str(), d.vmkfs.as_deref(), d.id.as_str()),
        (Some("/dev/sdb:1"), Some("web"), "root")
    );
    for bad in [
        "vmkfs=ds",
        "vmkfs=:x",
        "vmkfs=ds:",
        "path=a,vmkfs=ds:x",
        "vmkfs=ds:x,path=a",
    ] {
        assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
    }
    let d = DiskConfig::parse("path=a.img,readonly=on,id=root", 0).unwrap();
    assert_eq!(
        d,
        DiskConfig {
            path: "a.img".into(),
            vmkfs: None,
            readonly: true,
            id: "root".into(),
            vhost_user: false,
            via: Default::default(),
        }
    );
    let v = DiskConfig::parse("vhost-user=/run/st/d.sock,id=d,readonly=on", 0).unwrap();
    assert_eq!(
        (
            v.path.to_str(),
            v.vhost_user,
            v.readonly,
            v.vmkfs.as_deref()
        ),
        (Some("/run/st/d.sock"), true, true, None)
    );
    let mut c = VmConfig::default();
    c.disks.push(v);
    assert!(
        c.memory_is_shared(),
        "a vhost-user disk shares guest memory"
    );
    for bad in [
        "vhost-user=",
        "vhost-user=/s,path=a",
        "path=a,vhost-user=/s",
        "vmkfs=ds:x,vhost-user=/s",
    ] {
        assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
    }
    assert_eq!(DiskConfig::parse("path=b.img", 3).unwrap().id, "disk3");
    for bad in [
        "",
        "a.img",
        "path=",
        "path=a,readonly=yes",
        "path=a,id=",
        "path=a,id=this-id-is-far-too-long-to-fit",
        "path=a,speed=9",
    ] {
        assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
    }
    let mut c = cfg();
    c.disks = vec![
        DiskConfig::parse("path=a,id=x", 0).unwrap(),
        DiskConfig::parse("path=b,id=x", 1).unwrap(),
    ];
    assert!(c.validate(8 << 30).unwrap_err().0.contains("two disks"));
}

#[test]
fn validation() {
    let host = 8u64 << 30;
    assert!(cfg().validate(host).is_ok());
    let mut c = cfg();
    c.vcpus = 0;
    assert!(c.validate(host).unwrap_err().0.contains("1 to 32"));
    c.vcpus = 33;
    assert!(c.validate(host).is_err());
    c.vcpus = 32;
    assert!(c.validate(host).is_ok());
    c.memory = 1 << 20;
    assert!(c.validate(host).unwrap_err().0.contains("too small"));
    c.memory = (64 << 20) + 1;
    assert!(c.validate(host).unwrap_err().0.contains("4 KiB"));
    c.memory = 16 << 30;
    assert!(c.validate(host).unwrap_err().0.contains("exceeds"));
}

/// What a typed value can hold that no parser would make is still refused: every source
/// (options, a file, the API) meets the same checks.
#[test]
fn validation_of_typed_values() {
    let host = 8u64 << 30;
    let refused = |f: &dyn Fn(&mut VmConfig), needle: &str| {
        let mut c = cfg();
        f(&mut c);
        let e = c.validate(host).unwrap_err().0;
        assert!(e.contains(needle), "{e} (wanted {needle})");
        assert!(!e.contains('\n'), "{e}");
    };
    refused(
        &|c| c.kernel = KernelSource::Embedded("nope".into()),
        "nope",
    );
    refused(&|c| c.kernel = KernelSource::Path("".into()), "empty path");
    refused(&|c| c.kernel = KernelSource::Path("/k\0".into()), "NUL");
    refused(&|c| c.initrd = Some("/i\0x".into()), "initrd");
    refused(&|c| c.cmdline = "a\0b".into(), "cmdline");
    let disk = |id: &str, path: &str, vmkfs: Option<&str>| DiskConfig {
        path: path.into(),
        vmkfs: vmkfs.map(str::to_string),
        readonly: false,
        id: id.into(),
        vhost_user: false,
        via: Default::default(),
    };
    refused(&|c| c.disks = vec![disk("", "/d", None)], "disk id");
    refused(&|c| c.disks = vec![disk("a b", "/d", None)], "disk id");
    refused(
        &|c| c.disks = vec![disk(&"x".repeat(21), "/d", None)],
        "disk id",
    );
    refused(&|c| c.disks = vec![disk("d", "/x\0.img", None)], "NUL");
    refused(&|c| c.disks = vec![disk("d", "", None)], "empty path");
    refused(&|c| c.disks = vec![disk("d", "/ds", Some(""))], "VMKFS");
    let net = |tap: &str, mac: Option<[u8; 6]>| NetConfig::tap(tap, mac);
    for tap in [
        "",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "t\x000",
        "sixteen-chars-xx",
    ] {
        refused(&|c| c.nets = vec![net(tap, None)], "net tap");
    }
    refused(
        &|c| c.nets = vec![net("t0", Some([1, 0, 0, 0, 0, 1]))],
        "unicast",
    );
    let mut ok = cfg();
    ok.disks = vec![disk("root", "/ds", Some("web"))];
    ok.nets = vec![net("tap-0.x", Some([0x52, 0x54, 0, 1, 2, 3]))];
    for name in EMBEDDED_KERNELS {
        ok.kernel = KernelSource::Embedded(name.to_string());
        assert_eq!(ok.validate(host), Ok(()));
    }
}

fn json(t: &str) -> Result<VmConfig, String> {
    serde_json::from_str(t).map_err(|e| e.to_string())
}

/// Every field set, then through JSON and back: the same configuration.
#[test]
fn a_config_round_trips_through_json() {
    let mut c = VmConfig::new(
        KernelSource::Path("/boot/vmlinuz".into()),
        "console=ttyS0 quiet".into(),
    );
    c.initrd = Some("/boot/initrd.img".into());
    c.memory = 3 << 30;
    c.vcpus = 4;
    c.rng = false;
    c.disks = vec![
        DiskConfig::parse("path=/srv/a b.img,readonly=on", 0).unwrap(),
        DiskConfig::parse("vmkfs=/dev/sdb:1:web,id=root", 1).unwrap(),
    ];
    c.nets = vec![
        NetConfig::parse("tap=tap0,mac=52:54:00:ab:cd:ef").unwrap(),
        NetConfig::parse("tap=tap1").unwrap(),
    ];
    let text = serde_json::to_string(&c).unwrap();
    assert_eq!(json(&text), Ok(c.clone()), "{text}");
    // The typed form, field by field.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "kernel": {"path": "/boot/vmlinuz"},
            "initrd": "/boot/initrd.img",
            "cmdline": "console=ttyS0 quiet",
            "memory": 3u64 << 30,
            "vcpus": 4,
            "rng": false,
            "disks": [
                {"path": "/srv/a b.img", "readonly": true, "id": "disk0"},
                {"path": "/dev/sdb:1", "vmkfs": "web", "readonly": false, "id": "root"},
            ],
            "nets": [{"tap": "tap0", "mac": "52:54:00:ab:cd:ef"}, {"tap": "tap1"}],
        })
    );
    // The embedded kernel goes by name; the defaults round-trip too.
    let d = VmConfig::default();
    let text = serde_json::to_string(&d).unwrap();
    assert!(text.contains(r#""kernel":{"embedded":"pvh"}"#), "{text}");
    assert_eq!(json(&text), Ok(d));
}

/// Where the console goes belongs to the VMM process: it is neither written nor read.
#[test]
fn the_console_is_not_part_of_the_config() {
    let mut c = cfg();
    c.serial = SerialMode::File("/x.log".into());
    c.console_socket = Some("/x.sock".into());
    let text = serde_json::to_string(&c).unwrap();
    assert!(
        !text.contains("x.log") && !text.contains("x.sock"),
        "{text}"
    );
    assert_eq!(json(&text).unwrap().serial, SerialMode::Stdio);
    for field in [r#"{"serial":"none"}"#, r#"{"console_socket":"/s"}"#] {
        assert!(
            json(field).unwrap_err().contains("unknown field"),
            "{field}"
        );
    }
}

#[test]
fn defaults_and_short_forms() {
    assert_eq!(json("{}"), Ok(VmConfig::default()));
    let d = json("{}").unwrap();
    assert_eq!(
        (&d.kernel, d.cmdline.as_str(), d.memory, d.vcpus, d.rng),
        (
            &KernelSource::Embedded("pvh".into()),
            PROBE_CMDLINE,
            DEFAULT_MEMORY,
            1,
            true
        )
    );
    // A kernel from a file has its own default command line.
    let k = json(r#"{"kernel":"/k"}"#).unwrap();
    assert_eq!(
        (k.kernel, k.cmdline.as_str()),
        (KernelSource::Path("/k".into()), KERNEL_CMDLINE)
    );
    let s = json(
        r#"{"kernel":{"embedded":"bzimage"},"memory":"512M","disks":["path=a,id=x",{"path":"b"},{"path":"/ds","vmkfs":"web","readonly":true,"id":"root"}],"nets":["tap=t0",{"tap":"t1","mac":"52:54:00:00:00:01"}]}"#,
    )
    .unwrap();
    assert_eq!(s.kernel, KernelSource::Embedded("bzimage".into()));
    assert_eq!(s.memory, 512 << 20);
    let ids: Vec<&str> = s.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["x", "disk1", "root"], "a default id is its place");
    assert_eq!(s.disks[2].vmkfs.as_deref(), Some("web"));
    assert_eq!(s.nets[1].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
    assert_eq!(json(r#"{"memory":1073741824}"#).unwrap().memory, 1 << 30);
}

#[test]
fn malformed_configs_are_one_line_errors() {
    for (bad, needle) in [
        (r#"{"colour":"red"}"#, "unknown field `colour`"),
        (r#"{"vcpus":"two"}"#, "invalid type"),
        (r#"{"vcpus":-1}"#, "invalid value"),
        (r#"{"memory":"lots"}"#, "invalid size 'lots'"),
        (r#"{"memory":-4096}"#, "negative"),
        (r#"{"memory":true}"#, "a number of bytes or a size"),
        (r#"{"kernel":7}"#, "a kernel path"),
        (r#"{"kernel":{"url":"x"}}"#, "unknown field `url`"),
        (r#"{"kernel":{"path":"/a","embedded":"pvh"}}"#, "not both"),
        (r#"{"kernel":{}}"#, "invalid length"),
        (r#"{"disks":["nopath"]}"#, "'nopath' is not understood"),
        (
            r#"{"disks":[{"path":"a","speed":9}]}"#,
            "unknown field `speed`",
        ),
        (r#"{"disks":[{"readonly":true}]}"#, "missing field `path`"),
        (r#"{"disks":[7]}"#, "a disk"),
        (r#"{"nets":["tap="]}"#, "tap="),
        (
            r#"{"nets":[{"tap":"t","mac":"nope"}]}"#,
            "not a MAC address",
        ),
        (r#"{"nets":"tap=t"}"#, "invalid type"),
        (r#"[]"#, "invalid type"),
        (r#"{"memory":"#, "EOF"),
    ] {
        let e = json(bad).unwrap_err();
        assert!(e.contains(needle), "{bad}: {e} (wanted {needle})");
        assert!(!e.contains('\n'), "{bad}: {e}");
    }
    // null is not a value: a field is given or left out.
    for bad in [
        r#"{"kernel":null}"#,
        r#"{"initrd":null}"#,
        r#"{"cmdline":null}"#,
        r#"{"memory":null}"#,
        r#"{"vcpus":null}"#,
        r#"{"rng":null}"#,
        r#"{"disks":null}"#,
        r#"{"disks":[{"path":"a","id":null}]}"#,
        r#"{"nets":[{"tap":"t","mac":null}]}"#,
    ] {
        assert!(json(bad).is_err(), "{bad}");
    }
}

#[test]
fn toml_reads_the_same() {
    let t: VmConfig = toml::from_str(
        "kernel = { path = \"/k\" }\nmemory = \"64M\"\nvcpus = 2\ndisks = [\"path=/d\", { path = \"/e\", readonly = true }]\nnets = [{ tap = \"t0\" }]\n",
    )
    .unwrap();
    let j = json(
        r#"{"kernel":"/k","memory":67108864,"vcpus":2,"disks":[{"path":"/d","id":"disk0"},"path=/e,readonly=on"],"nets":["tap=t0"]}"#,
    )
    .unwrap();
    assert_eq!(t, j);
    let n: Result<VmConfig, _> = toml::from_str("memory = 4096\n");
    assert_eq!(n.unwrap().memory, 4096);
}

/// A larger definition that flattens a VmConfig in (the daemon's) gets every field of it, and
/// still refuses what belongs to neither.
#[test]
fn a_flattened_config_takes_every_field() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(flatten)]
        vm: VmConfig,
    }
    let all = r#"{"name":"a","kernel":"/k","initrd":"/i","cmdline":"c","memory":"8M","vcpus":2,"rng":false,"disks":["path=/d"],"nets":["tap=t"]}"#;
    let o: Outer = serde_json::from_str(all).unwrap();
    let mut inner: serde_json::Value = serde_json::from_str(all).unwrap();
    inner.as_object_mut().unwrap().remove("name");
    assert_eq!(o.name, "a");
    assert_eq!(o.vm, json(&inner.to_string()).unwrap());
    let e = serde_json::from_str::<Outer>(r#"{"name":"a","colour":"red"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
}

#[test]
fn copied_disks_land_in_the_directory_and_datastore_given() {
    let mut cfg = VmConfig {
        disks: vec![
            DiskConfig::parse("path=/src/a/root.img", 0).unwrap(),
            DiskConfig::parse("vmkfs=/src/ds:data", 1).unwrap(),
            DiskConfig::parse("path=/shared/base.img,readonly=on", 2).unwrap(),
        ],
        ..VmConfig::default()
    };
    let dir = std::path::Path::new("/dst/vm");
    let ds = std::path::Path::new("/dst/ds");
    let out = copied_disk_places(&cfg, Some(dir), Some(ds)).unwrap();
    assert_eq!(out.disks[0].path, PathBuf::from("/dst/vm/root.img"));
    assert_eq!(
        (out.disks[1].path.as_path(), out.disks[1].vmkfs.as_deref()),
        (ds, Some("data"))
    );
    assert_eq!(out.disks[2], cfg.disks[2], "read-only disks stay");
    let e = |c: &VmConfig, d, s| copied_disk_places(c, d, s).unwrap_err().0;
    assert!(e(&cfg, None, Some(ds)).contains("--disk-dir"));
    assert!(e(&cfg, Some(dir), None).contains("--datastore"));
    cfg.disks[1] = DiskConfig::parse("path=/other/root.img", 1).unwrap();
    assert!(e(&cfg, Some(dir), Some(ds)).contains("file names must differ"));
    cfg.disks[1] = DiskConfig::parse("path=/", 1).unwrap();
    assert!(e(&cfg, Some(dir), Some(ds)).contains("no file name"));
}

#[test]
fn a_net_on_a_daemon_network() {
    let n = NetConfig::parse("network=lan,mac=52:54:00:00:00:01,id=eth0").unwrap();
    assert_eq!(n.network.as_deref(), Some("lan"));
    assert_eq!((n.tap.as_str(), n.vhost_user.as_deref()), ("", None));
    assert_eq!(NetConfig::parse("network=lan").unwrap().name(), "lan");
    for bad in [
        "network=",
        "network=.x",
        "network=a/b",
        "network=a,tap=t",
        "tap=t,network=a",
        "vhost-user=/s,network=a",
    ] {
        assert!(NetConfig::parse(bad).is_err(), "{bad}");
    }
    let mut c = cfg();
    c.nets = vec![n];
    assert_eq!(c.validate(1 << 40), Ok(()));
    assert!(
        !c.memory_is_shared(),
        "shared once the daemon gives the socket"
    );
    c.nets[0].tap = "t".into();
    assert!(c.validate(1 << 40).is_err());
    // What the daemon hands its VMM: the network with the port's socket.
    c.nets[0].tap.clear();
    c.nets[0].vhost_user = Some("/var/lib/worldvisor/sw/lan/2-net0.sock".into());
    assert_eq!(c.validate(1 << 40), Ok(()));
    assert!(c.memory_is_shared());
    let back: NetConfig =
        serde_json::from_value(serde_json::to_value(&c.nets[0]).unwrap()).unwrap();
    assert_eq!(back, c.nets[0]);
}
