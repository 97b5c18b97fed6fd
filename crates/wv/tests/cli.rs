//! The command line end to end: every command reads `--opt value` and `--opt=value` alike,
//! refuses what it does not use with one line (exit 200) before doing anything, answers
//! `--help` (clap's usage form, `<NAME>`, for every command but `wv run`, whose usage is its
//! own table's), and `wv vm create` sends the daemon what was asked, with absolute paths.
//! None of this starts a VM, so none of it needs KVM.

mod common;
use common::daemon::Daemon;
use common::*;
use std::process::Command;
use std::time::Duration;

fn assert_usage_error(r: &Run, needle: &str) {
    assert_eq!(r.status, Some(200), "{r}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{r}");
    assert!(lines[0].starts_with("wv: error: "), "{r}");
    assert!(lines[0].contains(needle), "expected '{needle}'\n{r}");
    assert!(r.stdout.is_empty(), "{r}");
}

fn spec(d: &Daemon, name: &str) -> serde_json::Value {
    d.json(&["vm", "info", name])["spec"].clone()
}

#[test]
fn vm_create_keeps_every_option_in_both_forms() {
    let dir = TempDir::new("cli-forms");
    let d = Daemon::start(&dir);
    // The report's command line: every option arrives.
    let r = d.wv(&[
        "vm",
        "create",
        "issue",
        "--memory=512M",
        "--disk=path=/x.img",
        "--net=tap=tap9",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let s = spec(&d, "issue");
    // Sent and kept typed: memory in bytes, devices as objects.
    assert_eq!(
        (&s["memory"], &s["disks"], &s["nets"]),
        (
            &(512u64 << 20).into(),
            &serde_json::json!([{"path": "/x.img", "readonly": false, "id": "disk0"}]),
            &serde_json::json!([{"tap": "tap9"}])
        ),
        "{s}"
    );
    // Every option, in each form.
    let r = d.wv(&[
        "vm",
        "create",
        "a",
        "--memory=512M",
        "--disk=path=/x.img",
        "--net=tap=tap9",
        "--vcpus=2",
        "--rng=off",
        "--cmdline=console=ttyS0 probe.tests=boot",
        "--shares=2000",
        "--reservation=0.5",
        "--limit=1.5",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&[
        "vm",
        "create",
        "b",
        "--memory",
        "512M",
        "--disk",
        "path=/x.img",
        "--net",
        "tap=tap9",
        "--vcpus",
        "2",
        "--rng",
        "off",
        "--cmdline",
        "console=ttyS0 probe.tests=boot",
        "--shares",
        "2000",
        "--reservation",
        "0.5",
        "--limit",
        "1.5",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let (a, mut b) = (spec(&d, "a"), spec(&d, "b"));
    assert_eq!(a["memory"], 512 << 20, "{a}");
    assert_eq!(a["vcpus"], 2, "{a}");
    assert_eq!(a["disks"][0]["path"], "/x.img", "{a}");
    assert_eq!(a["nets"][0]["tap"], "tap9", "{a}");
    assert_eq!(a["rng"], false, "{a}");
    assert_eq!(a["cmdline"], "console=ttyS0 probe.tests=boot", "{a}");
    assert_eq!(
        (&a["shares"], &a["reservation"], &a["limit"]),
        (&2000.into(), &0.5.into(), &1.5.into()),
        "{a}"
    );
    b["name"] = "a".into();
    assert_eq!(a, b, "both forms give the same definition");

    // `wv vm set` reads both forms too.
    let r = d.wv(&["vm", "set", "a", "--shares=3000", "--limit=none"]);
    assert_eq!(r.status, Some(0), "{r}");
    let a = spec(&d, "a");
    assert_eq!(
        (&a["shares"], &a["limit"]),
        (&3000.into(), &serde_json::Value::Null)
    );
    d.stop();
}

#[test]
fn relative_paths_are_made_absolute_by_the_client() {
    let dir = TempDir::new("cli-paths");
    let d = Daemon::start(&dir);
    let work = dir.path("work");
    std::fs::create_dir_all(work.join("sub")).unwrap();
    let mut c = Command::new(wv_bin());
    c.current_dir(&work).env("WV_SOCKET", &d.socket).args([
        "vm",
        "create",
        "rel",
        "--kernel",
        "bzImage",
        "--initrd=sub/initrd.img",
        "--disk",
        "path=disk.img,readonly=on",
        "--disk=vmkfs=sub/ds.img:web,id=root",
    ]);
    let r = run_cmd(c, Duration::from_secs(30));
    assert_eq!(r.status, Some(0), "{r}");
    let s = spec(&d, "rel");
    let w = work.to_str().unwrap();
    assert_eq!(s["kernel"]["path"], format!("{w}/bzImage"), "{s}");
    assert_eq!(s["initrd"], format!("{w}/sub/initrd.img"), "{s}");
    assert_eq!(
        s["disks"],
        serde_json::json!([
            {"path": format!("{w}/disk.img"), "readonly": true, "id": "disk0"},
            {"path": format!("{w}/sub/ds.img"), "vmkfs": "web", "readonly": false, "id": "root"},
        ]),
        "{s}"
    );

    // A definition file's relative paths are relative to the file, wherever the client runs.
    let file = dir.file(
        "work/sub/web.toml",
        b"name = \"web\"\nkernel = \"vmlinux\"\ndisks = [\"path=../web.img\"]\n",
    );
    let r = d.wv(&["vm", "create", "--file", file.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    let s = spec(&d, "web");
    assert_eq!(s["kernel"]["path"], format!("{w}/sub/vmlinux"), "{s}");
    assert_eq!(s["disks"][0]["path"], format!("{w}/sub/../web.img"), "{s}");
    d.stop();
}

#[test]
fn options_a_command_does_not_use_are_refused() {
    let dir = TempDir::new("cli-refused");
    let d = Daemon::start(&dir);
    for (args, needle) in [
        (&["vm", "create", "a", "--serial", "none"][..], "'--serial'"),
        (&["vm", "create", "a", "--serial=x.log"], "'--serial'"),
        (
            &["vm", "create", "a", "--console-socket", "/tmp/c.sock"],
            "'--console-socket'",
        ),
        (&["vm", "create", "a", "--stats"], "'--stats'"),
        (&["vm", "create", "a", "--stats=json"], "'--stats'"),
        (&["vm", "create", "a", "--bogus"], "'--bogus'"),
        (&["vm", "create", "a", "b"], "unexpected 'b'"),
        (&["vm", "create", "a", "--memory"], "needs a value"),
        (
            &["vm", "create", "a", "--memory=lots"],
            "invalid size 'lots'",
        ),
        (&["vm", "create", "a", "--disk=nopath"], "expected path=IMG"),
        (
            &["vm", "create", "a", "--state-dir", "/tmp"],
            "'--state-dir'",
        ),
        (&["vm", "list", "--once"], "'--once'"),
        (&["vm", "set", "a", "--vcpus", "2"], "'--vcpus'"),
        (&["vm", "info", "a", "--json=yes"], "takes no value"),
        (&["host", "status", "--listen", "127.0.0.1:1"], "'--listen'"),
        (&["run", "--shares", "100"], "'--shares'"),
        (&["run", "stray"], "unexpected 'stray'"),
        (&["vm", "create", "a", "--config=/x.json"], "'--config'"),
        (&["probe-image", "--format=pvh", "--bogus"], "'--bogus'"),
    ] {
        let r = d.wv(args);
        assert_usage_error(&r, needle);
    }
    assert_eq!(
        d.json(&["vm", "list"]),
        serde_json::json!([]),
        "nothing was created"
    );
    d.stop();

    // A daemon with an option it does not know is refused before it starts serving.
    let mut c = Command::new(wv_bin());
    c.args(["host", "--socket"])
        .arg(dir.path("x.sock"))
        .arg("--state-dir")
        .arg(dir.path("x-state"))
        .args(["--listen", "127.0.0.1:1", "--bogus"]);
    let r = run_cmd(c, Duration::from_secs(10));
    assert_usage_error(&r, "unknown option '--bogus' for 'wv host'");
    assert!(!dir.path("x.sock").exists(), "it never served");
}

/// `wv run --config FILE`: a file that cannot be read, is not a VM configuration or has a
/// field `wv run` does not know, and a mix with the VM options, are each one line (exit 200)
/// before KVM is touched.
#[test]
fn run_config_files_that_do_not_read_are_one_line_errors() {
    let dir = TempDir::new("cli-config");
    for (name, text, needle) in [
        (
            "unknown.json",
            r#"{"vcpus":2,"colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            "console.json",
            r#"{"serial":"none"}"#,
            "unknown field `serial`",
        ),
        ("type.json", r#"{"vcpus":"two"}"#, "invalid type"),
        ("size.json", r#"{"memory":"lots"}"#, "invalid size 'lots'"),
        (
            "disk.json",
            r#"{"disks":[{"path":"d","speed":9}]}"#,
            "unknown field `speed`",
        ),
        ("null.json", r#"{"kernel":null}"#, "invalid type: null"),
        ("array.json", "[]", "expected a JSON object"),
        ("cut.json", "{\n  \"vcpus\": 2,\n", "EOF"),
        ("bad.toml", "vcpus = \n", "bad.toml"),
    ] {
        let f = dir.file(name, text.as_bytes());
        let mut c = Command::new(wv_bin());
        // A KVM device that cannot be opened: the error must come first, from the file.
        c.args(["run", "--config", f.to_str().unwrap()])
            .env("WV_KVM_DEVICE", "/nonexistent/kvm");
        let r = run_cmd(c, Duration::from_secs(10));
        assert_usage_error(&r, needle);
        assert!(r.stderr.contains(name), "the file is named: {r}");
    }
    let ok = dir.file("ok.json", b"{}");
    let r = wv(&["run", "--config", ok.to_str().unwrap(), "--vcpus", "2"]);
    assert_usage_error(
        &r,
        "--config gives the whole VM: --vcpus cannot be added to it",
    );
    let r = wv(&["run", "--config", "/nonexistent/vm.json"]);
    assert_usage_error(&r, "cannot read /nonexistent/vm.json");
    // Values that read but cannot work are the VMM's usage errors too, in one line.
    let big = dir.file("big.json", br#"{"vcpus":99}"#);
    let r = wv(&["run", "--config", big.to_str().unwrap()]);
    assert_usage_error(&r, "out of range");
}

#[test]
fn every_command_answers_help() {
    // (command line, the start of its usage's first line)
    let lines: &[(&[&str], &str)] = &[
        (&["host", "--help"], "Usage: wv host [OPTIONS]"),
        (&["host", "-h"], "Usage: wv host [OPTIONS]"),
        (
            &["host", "--listen", "127.0.0.1:1", "-h"],
            "Usage: wv host [OPTIONS]",
        ),
        (&["host", "status", "--help"], "Usage: wv host status"),
        (&["host", "top", "-h"], "Usage: wv host top"),
        (&["host", "token", "-h"], "Usage: wv host token"),
        (&["host", "shutdown", "--help"], "Usage: wv host shutdown"),
        (&["host", "install", "--help"], "Usage: wv host install"),
        (&["host", "uninstall", "-h"], "Usage: wv host uninstall"),
        (&["--help"], "Worldvisor"),
        (&["-h"], "Worldvisor"),
        (&["help", "vm", "create"], "Usage: wv vm create"),
        (&["run", "--help"], "Usage: wv run"),
        (&["run", "-h"], "Usage: wv run"),
        (&["probe-image", "--help"], "Usage: wv probe-image"),
        (&["vm", "--help"], "Usage: wv vm [OPTIONS] <COMMAND>"),
        (
            &["vm", "create", "--help"],
            "Usage: wv vm create [OPTIONS] [NAME]",
        ),
        (
            &["vm", "create", "a", "--memory=1G", "-h"],
            "Usage: wv vm create",
        ),
        (
            &["vm", "set", "--help"],
            "Usage: wv vm set [OPTIONS] <NAME>",
        ),
        (&["vm", "list", "--help"], "Usage: wv vm list"),
        (&["vm", "info", "-h"], "Usage: wv vm info [OPTIONS] <NAME>"),
        (
            &["vm", "stats", "--help"],
            "Usage: wv vm stats [OPTIONS] <NAME>",
        ),
        (
            &["vm", "console", "--help"],
            "Usage: wv vm console [OPTIONS] <NAME>",
        ),
        (
            &["vm", "start", "--help"],
            "Usage: wv vm start [OPTIONS] <NAME>",
        ),
        (
            &["vm", "stop", "--help"],
            "Usage: wv vm stop [OPTIONS] <NAME>",
        ),
        (
            &["vm", "pause", "--help"],
            "Usage: wv vm pause [OPTIONS] <NAME>",
        ),
        (
            &["vm", "resume", "--help"],
            "Usage: wv vm resume [OPTIONS] <NAME>",
        ),
        (
            &["vm", "delete", "--help"],
            "Usage: wv vm delete [OPTIONS] <NAME>",
        ),
        (&["fs", "--help"], "Usage: wv fs [OPTIONS] <COMMAND>"),
        (
            &["fs", "mkfs", "--help"],
            "Usage: wv fs mkfs [OPTIONS] <DS>",
        ),
        (
            &["fs", "create", "-h"],
            "Usage: wv fs create [OPTIONS] <DS> <NAME>",
        ),
        (
            &["fs", "import", "--help"],
            "Usage: wv fs import [OPTIONS] <DS> <NAME> <SOURCE>",
        ),
        (
            &["fs", "check", "--help"],
            "Usage: wv fs check [OPTIONS] <DS>",
        ),
    ];
    for (args, first) in lines {
        // No daemon anywhere: help must not need one.
        let mut c = Command::new(wv_bin());
        c.args(*args).env("WV_SOCKET", "/nonexistent/wv.sock");
        let r = run_cmd(c, Duration::from_secs(10));
        assert_eq!(r.status, Some(0), "{args:?}\n{r}");
        assert!(
            r.stdout.starts_with(first),
            "{args:?}: expected {first:?}\n{r}"
        );
        assert!(r.stderr.is_empty(), "{args:?}\n{r}");
    }
    // A command's usage lists what it takes, and only that.
    let r = wv(&["vm", "create", "--help"]);
    for o in [
        "--memory <SIZE>",
        "--disk <SPEC>",
        "--net <SPEC>",
        "--shares <N>",
        "--file <SPEC>",
    ] {
        assert!(r.stdout.contains(o), "{o}\n{r}");
    }
    for o in ["--serial", "--console-socket", "--stats", "--config"] {
        assert!(!r.stdout.contains(o), "{o}\n{r}");
    }
    let r = wv(&["run", "--help"]);
    assert!(r.stdout.contains("--config FILE"), "{r}");
    let r = wv(&["host", "--help"]);
    assert!(r.stdout.contains("--listen <ADDR:PORT>"), "{r}");
}

#[test]
fn printing_to_a_closed_pipe_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    // `wv --help | head -1`, with the reader gone before wv writes: the end a shell shows for
    // any tool (SIGPIPE), never a panic.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    for args in [&["--help"][..], &["vm", "create", "--help"][..]] {
        let out = Command::new(wv_bin())
            .args(args)
            .stdout(write.try_clone().unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}");
    }
}

#[test]
fn completions_come_from_the_same_tables() {
    let script = wv(&["completions", "bash"]);
    assert_eq!(script.status, Some(0), "{script}");
    let dir = TempDir::new("cli-completions");
    let file = dir.file("wv.bash", script.stdout.as_bytes());
    let syntax = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(syntax.status.success(), "bash -n: {syntax:?}");
    // (words typed, the word being completed) -> what bash offers (sorted; clap_complete's
    // function, generated from the clap tree and `wv run`'s table, as bash calls it: with the
    // command, the word and the word before).
    let cases: &[(&str, &str)] = &[
        (
            "wv ''",
            "--help --version -V -h completions fs help host net node probe-image run storage vm vswitch",
        ),
        ("wv v", "vm vswitch"),
        ("wv vswitch --u", "--uplink"),
        ("wv vm cr", "create"),
        ("wv vm create --mem", "--memory --memory-shared"),
        ("wv vm create web --di", "--disk"),
        ("wv fs sn", "snapshot"),
        ("wv host --li", "--listen"),
        ("wv host s", "shutdown status storage"),
        ("wv host u", "uninstall"),
        ("wv host install --unit", "--unit-dir"),
        ("wv completions b", "bash"),
        ("wv run --rn", "--rng"),
        ("wv run --con", "--config --console-socket"),
        ("wv run --sha", ""), // --shares is vm create's, not run's
    ];
    let mut sh = format!("source {}\n", file.display());
    sh.push_str(
        "t() { COMP_WORDS=(\"$@\"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); \
         _wv wv \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"; \
         printf '%s\\n' \"${COMPREPLY[@]}\" | sort | tr '\\n' ' ' | sed 's/ *$//'; echo; }\n",
    );
    for (words, _) in cases {
        sh.push_str(&format!("t {words}\n"));
    }
    let out = Command::new("bash").arg("-c").arg(&sh).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = String::from_utf8(out.stdout).unwrap();
    for ((words, want), line) in cases.iter().zip(got.lines()) {
        assert_eq!(line, *want, "completing `{words}`");
    }
    assert_eq!(got.lines().count(), cases.len(), "{got}");
    // zsh gets its own script from the same tree; another shell is a usage error.
    let zsh = wv(&["completions", "zsh"]);
    assert_eq!(zsh.status, Some(0), "{zsh}");
    assert!(zsh.stdout.starts_with("#compdef wv"), "{zsh}");
    for w in ["'--memory-shared=", "'--uplink=", "(vm)", "(run)"] {
        assert!(zsh.stdout.contains(w), "{w}\n{zsh}");
    }
    assert_usage_error(&wv(&["completions", "fish"]), "bash or zsh");
}

/// The names of the functions in an ELF file's symbol table (its `STT_FUNC` entries), or None
/// if it has no symbol table.
fn function_names(elf: &[u8]) -> Option<Vec<&[u8]>> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at =
        |o: usize| usize::try_from(u64::from_le_bytes(elf[o..o + 8].try_into().unwrap())).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not a 64-bit ELF file");
    let (shoff, shentsize, shnum) = (
        u64_at(0x28),
        usize::from(u16_at(0x3a)),
        usize::from(u16_at(0x3c)),
    );
    let section = |i: usize| shoff + i * shentsize;
    // SHT_SYMTAB (2); its sh_link is its string table.
    let symtab = section((0..shnum).find(|&i| u32_at(section(i) + 4) == 2)?);
    let strtab = section(usize::try_from(u32_at(symtab + 40)).unwrap());
    let names = &elf[u64_at(strtab + 24)..][..u64_at(strtab + 32)];
    let (off, size) = (u64_at(symtab + 24), u64_at(symtab + 32));
    let mut out = Vec::new();
    // Elf64_Sym: st_name u32, st_info u8 (type in the low 4 bits; STT_FUNC = 2), ... 24 bytes.
    for sym in elf[off..off + size].chunks_exact(24) {
        if sym[4] & 0xf == 2 {
            let name = &names
                [usize::try_from(u32::from_le_bytes(sym[..4].try_into().unwrap())).unwrap()..];
            out.push(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]);
        }
    }
    Some(out)
}

#[test]
fn the_vmm_binary_runs_run_alone_and_hands_every_other_command_to_wv_admin() {
    let bin = wv_bin();
    let admin = bin.with_file_name("wv-admin");
    // What is linked into each: `wv` holds the VMM and run's scanner, not clap nor the daemon
    // (the linker keeps only what `wv run` reaches); `wv-admin` holds everything.
    // A crate's own functions: legacy-mangled paths that start with it (`_ZN7wv_host…`; a
    // generic of another crate over its types, such as a drop of a wv_host type inside the
    // parsed command, is not its code).
    let has = |names: &[&[u8]], krate: &str| {
        let prefix = format!("_ZN{}{krate}", krate.len());
        names.iter().any(|n| n.starts_with(prefix.as_bytes()))
    };
    let wv_elf = std::fs::read(&bin).unwrap();
    let admin_elf = std::fs::read(&admin).unwrap();
    let (Some(wv_syms), Some(admin_syms)) = (function_names(&wv_elf), function_names(&admin_elf))
    else {
        panic!("a binary has no symbol table (stripped?): the check cannot be made");
    };
    for krate in ["clap_builder", "wv_host", "wv_vswitch", "wv_storage"] {
        assert!(has(&admin_syms, krate), "wv-admin has no {krate}");
        assert!(!has(&wv_syms, krate), "wv links {krate}");
    }
    assert!(has(&wv_syms, "wv_vmm"), "wv has no VMM");
    // Through `wv`: the same answers as from wv-admin, `wv run`'s help from the scanner.
    for args in [
        &["--version"][..],
        &["vm", "--help"],
        &["run", "--help"],
        &["help", "run"],
    ] {
        let (a, b) = (wv(args), {
            let mut c = Command::new(&admin);
            c.args(args);
            run_cmd(c, Duration::from_secs(60))
        });
        assert_eq!(
            (a.status, &a.stdout),
            (Some(0), &b.stdout),
            "{args:?}\n{a}\n{b}"
        );
    }
    assert_usage_error(&wv(&["bogus"]), "unknown command 'bogus'");
    // A `wv` installed without its wv-admin still runs VMs, and says what is missing for the
    // rest, in one line.
    let dir = TempDir::new("cli-alone");
    let alone = dir.path("wv");
    std::fs::copy(&bin, &alone).unwrap();
    let mut c = Command::new(&alone);
    c.args(["run", "--help"]);
    let r = run_cmd(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.starts_with("Usage: wv run"), "{r}");
    let mut c = Command::new(&alone);
    c.args(["vm", "list"]);
    let r = run_cmd(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(206), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    assert!(
        r.stderr.starts_with(&format!(
            "wv: error: cannot run {}: ",
            dir.path("wv-admin").display()
        )),
        "{r}"
    );
}
