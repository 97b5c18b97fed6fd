//! Installing and removing the daemon on a host: `wv host install` (a systemd unit, and
//! nothing else), `wv host uninstall` (the state directory, after a confirmation) and `wv
//! host shutdown` (every VM, then the daemon).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// The unit's file name.
pub const UNIT: &str = "worldvisor.service";

/// One word of a command line as systemd reads `ExecStart=` (`systemd.service(5)`, "Command
/// lines"): double-quoted with `\` and `"` escaped when it holds anything but plain
/// characters; `%` doubled (a specifier otherwise) and `$` doubled (a variable otherwise).
pub fn systemd_word(w: &str) -> String {
    let w = w.replace('%', "%%").replace('$', "$$");
    let plain = !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.:,=+@%$".contains(&b));
    if plain {
        return w;
    }
    let mut q = String::from("\"");
    for c in w.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The unit that runs `wv host ARGS` with the `wv` at `exe`; stopping it runs `wv host
/// shutdown` (on `socket` when not the default).
pub fn unit_text(exe: &Path, args: &[String], socket: Option<&Path>) -> String {
    let exe = exe.display().to_string();
    let line = |words: Vec<String>| {
        words
            .iter()
            .map(|w| systemd_word(w))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut start = vec![exe.clone(), "host".to_string()];
    start.extend(args.iter().cloned());
    let mut stop = vec![exe, "host".to_string(), "shutdown".to_string()];
    if let Some(s) = socket {
        stop.extend(["--socket".to_string(), s.display().to_string()]);
    }
    format!(
        "# Written by `wv host install`.
[Unit]
Description=Worldvisor host daemon (wv host)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={}
# Stopping the unit stops every VM, then the daemon, which removes what it made outside its
# state directory. The VMMs are not in this unit's cgroup once started, and are not killed
# by systemd: `systemctl kill -s TERM worldvisor` restarts the daemon alone, keeping them.
ExecStop=-{}
KillMode=process
TimeoutStopSec=60
Restart=on-failure

[Install]
WantedBy=multi-user.target
",
        line(start),
        line(stop)
    )
}

/// `wv host install`: writes the unit into `dir` (a temporary file renamed over the old
/// one); its path.
pub fn install(dir: &Path, args: &[String], socket: Option<&Path>) -> Result<PathBuf, String> {
    // `wv` (which hands `host` to `wv-admin`): the unit names the command operators type.
    let exe = std::fs::canonicalize(crate::sibling(crate::VMM_BIN))
        .map_err(|e| format!("cannot find this wv's path: {e}"))?;
    let text = unit_text(&exe, args, socket);
    let path = dir.join(UNIT);
    let tmp = dir.join(format!(".{UNIT}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })?;
    Ok(path)
}

/// Whether the user agrees to remove `state_dir`: `yes`, or asked on the terminal; without a
/// terminal, an error.
pub fn confirm_uninstall(state_dir: &Path, yes: bool) -> Result<bool, String> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "wv host uninstall removes {} and everything in it: add --yes (there is no terminal to ask on)",
            state_dir.display()
        ));
    }
    eprint!(
        "Remove {} and everything in it (VM definitions, logs, snapshots, the token)? [y/N] ",
        state_dir.display()
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_as_systemd_reads_them() {
        assert_eq!(systemd_word("/usr/bin/wv"), "/usr/bin/wv");
        assert_eq!(systemd_word("127.0.0.1:7070"), "127.0.0.1:7070");
        assert_eq!(systemd_word("/a b/c"), "\"/a b/c\"");
        assert_eq!(systemd_word("x\"y\\z"), "\"x\\\"y\\\\z\"");
        assert_eq!(systemd_word("50%"), "50%%");
        assert_eq!(systemd_word("$HOME"), "$$HOME");
        assert_eq!(systemd_word(""), "\"\"");
        assert_eq!(systemd_word("a;b"), "\"a;b\"");
    }

    #[test]
    fn the_unit_runs_the_daemon_and_stops_through_shutdown() {
        let args: Vec<String> = ["--state-dir", "/srv/wv state", "--listen", "127.0.0.1:7070"]
            .map(String::from)
            .to_vec();
        let u = unit_text(
            Path::new("/opt/wv"),
            &args,
            Some(Path::new("/run/w/wv.sock")),
        );
        assert!(u.contains(
            "\nExecStart=/opt/wv host --state-dir \"/srv/wv state\" --listen 127.0.0.1:7070\n"
        ));
        assert!(u.contains("\nExecStop=-/opt/wv host shutdown --socket /run/w/wv.sock\n"));
        assert!(u.contains("\nKillMode=process\n"));
    }
}
