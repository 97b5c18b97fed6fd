//! `wv fs`: the VMKFS datastore tool (crates/vmkfs). A datastore is a block device or a plain
//! file standing in for a partition. Exit status: 0 done, 1 the operation failed (one line on
//! stderr saying why), 200 bad usage; `check` exits 1 when problems remain.

use crate::fail;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wv_vmkfs::{Datastore, Dev, FileDev, MkfsOptions};

/// A `wv fs` command line, parsed (by clap, crate::commands).
#[derive(Debug, Default)]
pub struct Args {
    /// The command: mkfs, info, ls...
    pub cmd: String,
    /// Its arguments: the datastore first.
    pub pos: Vec<String>,
    /// `--json`.
    pub json: bool,
    /// `--size`.
    pub size: Option<u64>,
    /// `--block-size`.
    pub block_size: Option<u64>,
    /// `--max-files`.
    pub max_files: Option<u32>,
    /// `--label`.
    pub label: Option<String>,
    /// `--thin`.
    pub thin: bool,
    /// `--force`.
    pub force: bool,
    /// `--repair`.
    pub repair: bool,
}

/// Runs a parsed `wv fs` command.
pub fn cmd_fs(a: &Args) -> ExitCode {
    match run(a) {
        Ok(code) => code,
        Err(m) => fail(1, &m),
    }
}

fn open_dev(path: &str, read_only: bool) -> Result<Arc<dyn Dev>, String> {
    FileDev::open(Path::new(path), read_only)
        .map(|d| Arc::new(d) as Arc<dyn Dev>)
        .map_err(|e| format!("cannot open datastore {path}: {e}"))
}

fn open(path: &str) -> Result<Datastore, String> {
    let mut ds = Datastore::open(open_dev(path, false)?).map_err(|e| format!("{path}: {e}"))?;
    // Zeroing a large preallocated disk is quick where the device or file system zeroes
    // (unwritten extents, WRITE ZEROES) and long where zeros must be written: shown if long.
    let mut p: Option<Progress> = None;
    ds.set_progress(Some(Box::new(move |what, done, total| {
        let p = p.get_or_insert_with(|| Progress::quiet(what.to_string(), total));
        p.at(done);
        if done == total {
            p.finish();
        }
    })));
    Ok(ds)
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
    } else if b < 1 << 20 && b.is_multiple_of(1024) && b > 0 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    );
}

fn run(a: &Args) -> Result<ExitCode, String> {
    let ds_path = a.pos[0].as_str();
    let name = a.pos.get(1).map(String::as_str).unwrap_or("");
    let e = |e: wv_vmkfs::Error| e.to_string();
    // `{"removed": NAME}` or "removed NAME".
    let did = |verb: &str, name: &str| {
        if a.json {
            print_json(&serde_json::json!({ verb: name }));
        } else {
            println!("{verb} {name}");
        }
        ExitCode::SUCCESS
    };
    let file_result = |info: wv_vmkfs::FileInfo, verb: &str| {
        if a.json {
            print_json(&info);
        } else {
            println!("{verb} {} ({}, {})", info.name, mib(info.size), info.kind);
        }
        Ok(ExitCode::SUCCESS)
    };
    match a.cmd.as_str() {
        "mkfs" => mkfs(a),
        "info" => {
            let info = open(ds_path)?.info().map_err(e)?;
            if a.json {
                print_json(&info);
            } else {
                println!(
                    "datastore {ds_path}: VMKFS version {}, uuid {}, label '{}'",
                    info.version, info.uuid, info.label
                );
                println!("block size   {}", mib(info.block_size));
                println!(
                    "size         {} ({} data blocks, {} free: {})",
                    mib(info.size),
                    info.data_blocks,
                    info.free_blocks,
                    mib(info.free_blocks * info.block_size)
                );
                println!("files        {} of {}", info.files, info.max_files);
                println!("largest file {}", mib(info.max_file_size));
                println!(
                    "metadata     {} on disk (journal included), {} cached in memory",
                    mib(info.metadata_bytes),
                    mib(info.cached_metadata_bytes)
                );
                println!("transaction  {}", info.transaction);
            }
            Ok(ExitCode::SUCCESS)
        }
        "ls" => {
            let files = open(ds_path)?.list().map_err(e)?;
            if a.json {
                print_json(&files);
            } else {
                println!(
                    "{:<24} {:>12} {:>12} {:<22} PARENT / OWNER",
                    "NAME", "SIZE", "ALLOCATED", "KIND"
                );
                for f in files {
                    let kind = if f.frozen {
                        format!("{} (frozen)", f.kind)
                    } else {
                        f.kind.clone()
                    };
                    let extra = [
                        f.parent.clone().map(|p| format!("parent {p}")),
                        f.owner.clone().map(|o| format!("open by {o}")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ");
                    println!(
                        "{:<24} {:>12} {:>12} {:<22} {extra}",
                        f.name,
                        mib(f.size),
                        mib(f.allocated),
                        kind
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        "create" => {
            let size = a.size.unwrap_or(0);
            let info = open(ds_path)?.create(name, size, a.thin).map_err(e)?;
            file_result(info, "created")
        }
        "rm" => {
            open(ds_path)?.remove(name).map_err(e)?;
            Ok(did("removed", name))
        }
        "resize" => {
            let info = open(ds_path)?
                .resize(name, a.size.unwrap_or(0))
                .map_err(e)?;
            file_result(info, "resized")
        }
        "snapshot" => {
            let t = Instant::now();
            let info = open(ds_path)?.snapshot(name).map_err(e)?;
            if !a.json {
                println!(
                    "{name}: redo log started ({} frozen as {}) in {:.1} ms",
                    mib(info.size),
                    info.parent.clone().unwrap_or_default(),
                    t.elapsed().as_secs_f64() * 1000.0
                );
                return Ok(ExitCode::SUCCESS);
            }
            file_result(info, "snapshot")
        }
        "commit" => file_result(
            open(ds_path)?.commit_redo(name).map_err(e)?,
            "committed into",
        ),
        "revert" => file_result(open(ds_path)?.revert(name).map_err(e)?, "reverted"),
        "branch" => {
            let new = a.pos.get(2).map(String::as_str);
            file_result(open(ds_path)?.branch(name, new).map_err(e)?, "branched")
        }
        "unlock" => {
            open(ds_path)?.unlock(name).map_err(e)?;
            Ok(did("unlocked", name))
        }
        "check" => {
            let r = Datastore::check(open_dev(ds_path, !a.repair)?, a.repair)
                .map_err(|x| format!("{ds_path}: {x}"))?;
            let clean = r.problems.is_empty() || r.repaired;
            if a.json {
                print_json(&r);
            } else {
                for n in &r.notes {
                    println!("note: {n}");
                }
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{ds_path}: {}",
                    match (r.problems.len(), r.repaired) {
                        (0, _) => "consistent".to_string(),
                        (n, true) => format!("{n} problems repaired"),
                        (n, false) => format!("{n} problems (wv fs check --repair fixes them)"),
                    }
                );
            }
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        "import" => import(a),
        "export" => export(a),
        _ => unreachable!("parse() checked the command"),
    }
}

fn mkfs(a: &Args) -> Result<ExitCode, String> {
    let path = Path::new(&a.pos[0]);
    if let Some(size) = a.size {
        if path.exists() {
            return Err(format!(
                "{} exists: --size creates a new file (leave it out to use the existing one)",
                path.display()
            ));
        }
        let f = std::fs::File::create_new(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
    }
    let dev = open_dev(&a.pos[0], false)?;
    if !a.force && Datastore::open(dev.clone()).is_ok() {
        return Err(format!(
            "{} already holds a VMKFS datastore: --force replaces it and everything on it",
            path.display()
        ));
    }
    let opts = MkfsOptions {
        block_size: a.block_size.unwrap_or(wv_vmkfs::format::DEFAULT_BLOCK),
        max_files: a.max_files.unwrap_or(wv_vmkfs::format::DEFAULT_FILES),
        label: a.label.clone().unwrap_or_default(),
    };
    let mut ds = Datastore::mkfs(dev, &opts).map_err(|e| format!("{}: {e}", path.display()))?;
    let info = ds.info().map_err(|e| e.to_string())?;
    if a.json {
        print_json(&info);
    } else {
        println!(
            "made VMKFS datastore {} ({}, {} blocks of {}, {} files, uuid {})",
            path.display(),
            mib(info.size),
            info.data_blocks,
            mib(info.block_size),
            info.max_files,
            info.uuid
        );
    }
    if info.max_file_size < info.data_blocks * info.block_size {
        // The descriptor maps 448 x 1020 blocks: larger blocks, larger files (seed 000 [0097]).
        let mut bigger = info.block_size;
        while bigger < wv_vmkfs::format::MAX_BLOCK
            && (info.max_file_size / info.block_size) * bigger < info.data_blocks * info.block_size
        {
            bigger *= 2;
        }
        eprintln!(
            "note: with {} blocks a disk can be at most {}; --block-size {}M allows one disk to fill the datastore",
            mib(info.block_size),
            mib(info.max_file_size),
            bigger >> 20
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress of a long copy on stderr, at most once a second, and a last line.
struct Progress {
    what: String,
    total: u64,
    last: Instant,
    start: Instant,
    /// Print nothing for operations that end within a second.
    quiet: bool,
}

impl Progress {
    fn new(what: String, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            last: now - Duration::from_secs(2),
            start: now,
            quiet: false,
        }
    }
    fn quiet(what: String, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            last: now,
            start: now,
            quiet: true,
        }
    }
    /// The last line, unless quiet and quick.
    fn finish(&self) {
        if !self.quiet || self.start.elapsed() >= Duration::from_secs(1) {
            self.done();
        }
    }
    fn at(&mut self, done: u64) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            eprintln!(
                "{}: {:3}% ({} of {})",
                self.what,
                done * 100 / self.total.max(1),
                mib(done),
                mib(self.total)
            );
        }
    }
    fn done(&self) {
        let s = self.start.elapsed().as_secs_f64();
        eprintln!(
            "{}: 100% ({} in {s:.1} s, {:.0} MiB/s)",
            self.what,
            mib(self.total),
            self.total as f64 / f64::from(1u32 << 20) / s.max(1e-9)
        );
    }
}

/// The format and virtual size of an image, from `qemu-img info`.
fn image_info(src: &Path) -> Result<(String, u64), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run qemu-img (Debian package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img cannot read {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info: unexpected output: {e}"))?;
    Ok((
        v["format"].as_str().unwrap_or("raw").to_string(),
        v["virtual-size"].as_u64().unwrap_or(0),
    ))
}

fn import(a: &Args) -> Result<ExitCode, String> {
    let (name, src) = (a.pos[1].as_str(), PathBuf::from(&a.pos[2]));
    let meta = std::fs::metadata(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let (format, _) = if meta.is_file() {
        image_info(&src)?
    } else {
        ("raw".into(), 0)
    };
    // Other formats go through a sparse raw copy made by qemu-img (only their data takes
    // room); it is removed afterwards.
    let mut temp = None;
    let raw = if format == "raw" {
        src.clone()
    } else {
        let t = std::env::temp_dir().join(format!("wv-import-{}.raw", std::process::id()));
        eprintln!("converting {} from {format} with qemu-img", src.display());
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&src)
            .arg(&t)
            .status()
            .map_err(|e| format!("cannot run qemu-img: {e}"))?;
        if !st.success() {
            let _ = std::fs::remove_file(&t);
            return Err(format!("qemu-img could not convert {}", src.display()));
        }
        temp = Some(t.clone());
        t
    };
    let r = copy_in(a, name, &raw);
    if let Some(t) = temp {
        let _ = std::fs::remove_file(t);
    }
    r
}

fn copy_in(a: &Args, name: &str, raw: &Path) -> Result<ExitCode, String> {
    let mut f = std::fs::File::open(raw).map_err(|e| format!("{}: {e}", raw.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let size = len.div_ceil(512) * 512;
    if size == 0 {
        return Err(format!("{}: the image is empty", raw.display()));
    }
    let mut ds = open(&a.pos[0])?;
    ds.create(name, size, a.thin).map_err(|e| e.to_string())?;
    // Zero pieces are skipped at block granularity (so a thin disk allocates no block for
    // them); new disks read as zeros.
    let piece = usize::try_from(ds.geometry().block_size.min(1 << 20)).unwrap_or(1 << 20);
    let result = (|| -> Result<(), String> {
        let mut disk = ds.open_disk(name, true).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut p = Progress::new(format!("importing {name}"), size);
        let mut off = 0u64;
        while off < len {
            let n = usize::try_from(len - off).map_or(buf.len(), |r| r.min(buf.len()));
            f.read_exact(&mut buf[..n])
                .map_err(|e| format!("reading {}: {e}", raw.display()))?;
            for (i, chunk) in buf[..n].chunks(piece).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    disk.write_at(chunk, off + (i * piece) as u64)
                        .map_err(|e| e.to_string())?;
                }
            }
            off += n as u64;
            p.at(off);
        }
        disk.flush().map_err(|e| e.to_string())?;
        p.done();
        Ok(())
    })();
    if let Err(e) = result {
        // No half-imported disk is left behind.
        let _ = ds.remove(name);
        return Err(e);
    }
    let info = ds.stat(name).map_err(|e| e.to_string())?;
    if a.json {
        print_json(&info);
    } else {
        println!(
            "imported {name} ({}, {}, {} allocated)",
            mib(info.size),
            info.kind,
            mib(info.allocated)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export(a: &Args) -> Result<ExitCode, String> {
    let (name, dest) = (a.pos[1].as_str(), Path::new(&a.pos[2]));
    let ds = open(&a.pos[0])?;
    let disk = ds.open_disk(name, false).map_err(|e| e.to_string())?;
    let len = disk.len();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let result = (|| -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 20];
        let mut p = Progress::new(format!("exporting {name}"), len);
        let mut off = 0u64;
        while off < len {
            let n = usize::try_from(len - off).map_or(buf.len(), |r| r.min(buf.len()));
            disk.read_at(&mut buf[..n], off)
                .map_err(|e| e.to_string())?;
            if buf[..n].iter().any(|&b| b != 0) {
                std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(off))
                    .and_then(|_| out.write_all(&buf[..n]))
                    .map_err(|e| format!("writing {}: {e}", dest.display()))?;
            }
            off += n as u64;
            p.at(off);
        }
        out.set_len(len)
            .and_then(|()| out.sync_all())
            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
        p.done();
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(dest);
        return Err(e);
    }
    if a.json {
        print_json(&serde_json::json!({ "exported": name, "to": dest, "size": len }));
    } else {
        println!("exported {name} to {} ({})", dest.display(), mib(len));
    }
    Ok(ExitCode::SUCCESS)
}
