//! CPU priority of background work.
//!
//! Shipping, receiving and applying replication data is bulk work with a whole
//! interval to finish in; a guest's write waits on its NBD connection thread. On a
//! kernel that does not preempt system calls (`PREEMPT_NONE`, the default of many
//! server kernels), a busy replication thread kept a woken connection thread off the
//! CPU for 3-5 ms at every cycle (`perf sched timehist`, benches/RESULTS.md, session
//! 19), which was the whole of the write tail under steady replication.
//!
//! So a daemon sets [`set_background_nice`] once at start, and every thread that does
//! background work calls [`enter_background`] when it starts: it then runs that many
//! nice steps below the daemon (threads it spawns inherit it). The weight is lower, not
//! zero: an idle core still goes to background work, and under full load it keeps a
//! share (nice 10 is about a tenth of nice 0's).
//!
//! Threads that answer a guest's I/O call [`enter_foreground`]: they ask the
//! scheduler for a short slice (`sched_setattr` with `sched_runtime`, which since Linux
//! 6.12 lets a woken thread preempt one that runs a longer slice; older kernels ignore
//! it for normal threads). Their share of the CPU stays what it was.
//!
//! Without [`set_background_nice`] (libraries, tests), or with 0 steps, neither
//! changes anything.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// The default number of nice steps background threads run below the daemon.
pub const DEFAULT_BACKGROUND_NICE: u8 = 10;

/// The largest nice value Linux has, so the most steps that can mean anything.
pub const MAX_BACKGROUND_NICE: u8 = 19;
const NICE_MAX: i32 = MAX_BACKGROUND_NICE as i32;

/// The nice value background threads take; [`UNSET`] until a daemon sets it.
static BACKGROUND: AtomicI32 = AtomicI32::new(UNSET);
const UNSET: i32 = i32::MIN;

/// Background threads started from now on run `steps` nice steps below the calling
/// thread (at most nice 19); 0 keeps them at the daemon's priority.
pub fn set_background_nice(steps: u8) -> io::Result<()> {
    let current = this_thread_nice()?;
    let target = current.saturating_add(i32::from(steps)).min(NICE_MAX);
    BACKGROUND.store(if steps == 0 { UNSET } else { target }, Ordering::Relaxed);
    Ok(())
}

/// Lowers the calling thread to the background priority, if a daemon set one. A
/// failure is logged by the caller's choice: the thread runs on at its priority.
pub fn enter_background() {
    let target = BACKGROUND.load(Ordering::Relaxed);
    if target == UNSET {
        return;
    }
    if let Err(error) = set_this_thread_nice(target) {
        tracing::debug!(%error, "Cannot lower this thread's CPU priority");
    }
}

/// The slice a foreground thread asks for: a guest's 64 KiB write takes about this
/// long to receive, log and write.
const FOREGROUND_SLICE_NS: u64 = 100_000;

/// Asks the scheduler for a short slice for the calling thread, if a daemon set a
/// background priority. A refusal is only logged: the thread runs on as before.
pub fn enter_foreground() {
    if BACKGROUND.load(Ordering::Relaxed) == UNSET {
        return;
    }
    let result = this_thread_nice().and_then(|nice| {
        let attributes = SchedAttr {
            size: u32::try_from(size_of::<SchedAttr>()).unwrap_or(u32::MAX),
            policy: 0, // SCHED_OTHER
            flags: 0,
            nice,
            priority: 0,
            runtime: FOREGROUND_SLICE_NS,
            deadline: 0,
            period: 0,
        };
        // SAFETY: sched_setattr reads `size` bytes of `attributes`, a live `repr(C)`
        // struct laid out as the kernel's `struct sched_attr` (its first version);
        // pid 0 is the calling thread.
        let done = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0,
                std::ptr::from_ref(&attributes),
                0,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    });
    if let Err(error) = result {
        tracing::debug!(%error, "Cannot shorten this thread's scheduler slice");
    }
}

/// `struct sched_attr` of `sched_setattr(2)`, its first version (48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The calling thread's nice value (Linux keeps one per thread).
pub fn this_thread_nice() -> io::Result<i32> {
    // getpriority may return -1 as a value, so errno tells an error apart.
    // SAFETY: __errno_location points to this thread's errno, always valid.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain system call; PRIO_PROCESS with who = 0 is the calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(0) {
            return Err(error);
        }
    }
    Ok(nice)
}

fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: plain system call; PRIO_PROCESS with who = 0 is the calling thread only
    // (Linux threads each have their own nice value).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The nice value of a new thread once it ran `enter`.
    fn nice_after(enter: fn()) -> i32 {
        std::thread::spawn(move || {
            enter();
            this_thread_nice().unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn background_threads_run_below_the_daemon_and_others_do_not() {
        let daemon = this_thread_nice().unwrap();
        // Before a daemon sets it, nothing changes.
        assert_eq!(nice_after(enter_background), daemon);
        set_background_nice(5).unwrap();
        let expected = (daemon + 5).min(NICE_MAX);
        assert_eq!(nice_after(enter_background), expected);
        // Idempotent: a thread that enters twice (or inherits it) stays there.
        let inherited = std::thread::spawn(|| {
            enter_background();
            enter_background();
            nice_after(|| {})
        });
        assert_eq!(inherited.join().unwrap(), expected);
        // The thread that set it keeps its own priority, and a foreground thread its
        // nice value.
        assert_eq!(this_thread_nice().unwrap(), daemon);
        assert_eq!(nice_after(enter_foreground), daemon);
        set_background_nice(0).unwrap();
        assert_eq!(nice_after(enter_background), daemon);
    }
}
