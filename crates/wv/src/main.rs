//! `wv`: the VMM's binary. `wv run` (and its help) runs here; every other command line is handed
//! to `wv-admin`, installed beside it, by `exec` with the same arguments, so the process, its
//! `argv` (as `/proc/PID/cmdline` shows it) and its exit status are the command's own.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    let arg0 = argv.next().unwrap_or_else(|| OsString::from(wv::VMM_BIN));
    let rest: Vec<OsString> = argv.collect();
    // A line that is not all text is `wv-admin`'s to refuse.
    let text: Option<Vec<String>> = rest.iter().map(|a| a.to_str().map(str::to_owned)).collect();
    if let Some(status) = text.as_deref().and_then(wv::main_vmm) {
        return status;
    }
    let admin = std::env::current_exe()
        .map(|me| me.with_file_name(wv::ADMIN_BIN))
        .unwrap_or_else(|_| wv::ADMIN_BIN.into());
    let e = std::process::Command::new(&admin)
        .arg0(arg0)
        .args(rest)
        .exec();
    let _ = writeln!(
        std::io::stderr(),
        "wv: error: cannot run {}: {e} (every command but `wv run` is in {}, installed beside wv; `cargo build` builds both)",
        admin.display(),
        wv::ADMIN_BIN
    );
    ExitCode::from(wv_vmm::error::STATUS_INTERNAL)
}
