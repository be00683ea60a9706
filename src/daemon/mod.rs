//! What every blkrep daemon does around its own work, written once for the primary
//! and the replica daemon: process settings ([`process`]), the stop signals
//! ([`StopSignals`]), the control socket ([`control_socket`]) and systemd's
//! notifications ([`notify`]).

pub mod activation;
pub mod control_socket;
pub mod notify;
pub mod process;

use nix::sys::signal::{SigSet, Signal};

/// The signals that stop a daemon (SIGTERM and SIGINT), and for a daemon that reloads,
/// SIGHUP. Blocked in every thread (set before any is spawned) and taken
/// synchronously by the main thread, so no thread is interrupted mid-write and
/// shutdown and reloads run in one known place.
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

    /// Like [`StopSignals::block`], with SIGHUP too, which [`StopSignals::wait`] then
    /// returns like the others (see [`StopSignals::is_reload`]).
    pub fn block_with_reload() -> std::io::Result<Self> {
        let mut signals = Self::block()?;
        let mut hangup = SigSet::empty();
        hangup.add(Signal::SIGHUP);
        hangup.thread_block()?;
        signals.0.add(Signal::SIGHUP);
        Ok(signals)
    }

    /// Whether `signal` asks for a reload rather than a stop.
    pub fn is_reload(signal: Signal) -> bool {
        signal == Signal::SIGHUP
    }

    /// Waits for one of them; returns which.
    pub fn wait(&self) -> std::io::Result<Signal> {
        Ok(self.0.wait()?)
    }
}
