//! `powerloss-fs BACKING MOUNTPOINT`: mounts the power-loss filesystem (see the
//! library's docs) in the foreground. SIGUSR1 cuts the power (prints what was dropped
//! and exits); SIGTERM or SIGINT syncs everything and unmounts.

use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use powerloss_fs::Mounted;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: powerloss-fs BACKING MOUNTPOINT  (SIGUSR1: power cut; SIGTERM: sync and unmount)");
        return ExitCode::from(2);
    };
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(signal);
    }
    // Blocked before the session threads start, so they inherit the mask and only
    // the wait below takes these signals.
    if let Err(e) = signals.thread_block() {
        eprintln!("powerloss-fs: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let mounted = match Mounted::mount(backing, mountpoint) {
        Ok(mounted) => mounted,
        Err(e) => {
            eprintln!("powerloss-fs: {e}: {}", source_of(&e));
            return ExitCode::FAILURE;
        }
    };
    println!("mounted {} on {}", backing.display(), mountpoint.display());
    match signals.wait() {
        Ok(Signal::SIGUSR1) => {
            let dropped = mounted.power_cut();
            println!(
                "power cut: dropped {} bytes in {} files",
                dropped.bytes, dropped.files
            );
            ExitCode::SUCCESS
        }
        Ok(_) => match mounted.unmount() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("powerloss-fs: {e}: {}", source_of(&e));
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("powerloss-fs: waiting for signals: {e}");
            ExitCode::FAILURE
        }
    }
}

fn source_of(e: &dyn std::error::Error) -> String {
    e.source().map_or_else(String::new, ToString::to_string)
}
