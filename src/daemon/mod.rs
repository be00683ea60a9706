//! What every blkrep daemon does around its own work, written once for the primary
//! and the replica daemon: process settings ([`process`]), the stop signals
//! ([`StopSignals`]), the control socket ([`control_socket`]) and systemd's
//! notifications ([`notify`]).

pub mod control_socket;
pub mod notify;
pub mod process;

use nix::sys::signal::{SigSet, Signal};

/// The signals that stop a daemon (SIGTERM and SIGINT). Blocked in every thread
/// (set before any is spawned) and taken synchronously by the main thread, so no
/// thread is interrupted mid-write and shutdown runs in one known place.
#[derive(Debug)]
pub struct StopSignals(SigSet);

impl StopSignals {
    /// Blocks the stop signals in the calling thread and every thread it spawns from
    /// now on.
    pub fn block() -> std::io::Result<Self> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block()?;
        Ok(Self(set))
    }

    /// Waits for one of them; returns which.
    pub fn wait(&self) -> std::io::Result<Signal> {
        Ok(self.0.wait()?)
    }
}
