//! `wv-admin`: every `wv` command (the daemon and its client, the switch and storage services,
//! datastores, completions, and `wv run` too), parsed by clap. Operators type `wv`, which hands
//! all but `wv run` to this binary (`src/main.rs`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    match args {
        Ok(args) => wv::main_admin(&args),
        Err(bad) => {
            eprintln!(
                "wv: error: an argument is not valid UTF-8: {}",
                bad.to_string_lossy()
            );
            ExitCode::from(wv_vmm::error::STATUS_USAGE)
        }
    }
}
