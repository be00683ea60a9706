//! The framing stage: seals chunks, and compresses them when that pays.
//!
//! Compression is worth its CPU only when the link is slower than the compressor.
//! In [`Compression::Auto`] mode (the default) the [`Framer`] measures three things
//! and decides per chunk:
//! - the link: wire bytes per second the upload's connection takes
//!   ([`LinkMeter`]);
//! - the codec: bytes per second one compression worker turns out;
//! - the ratio: compressed bytes over record bytes.
//!
//! It compresses while `min(codec, link ÷ ratio)` (the rate of record bytes with
//! compression) beats the link by [`AUTO_MARGIN`]. The codec counts as one worker,
//! however many run: they share the host's cores with its VMs, and where the "link"
//! is really the CPU (a replica on the same host, a saturated machine), compressing
//! would only take more of it. The link is measured either
//! way; while it does not compress, one chunk in [`PROBE_EVERY`] is compressed all
//! the same, so the codec's figures stay fresh.
//!
//! Compression runs on worker threads, so a group's encoder goes on encoding while
//! earlier chunks compress; stored chunks are sealed on the encoder's thread, which
//! only computes their CRC. Workers start on first use and stop when the framer is
//! dropped.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{unbounded, Sender};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::warn;
use wire::chunk::OwnedChunk;

use super::upload::{as_f64, ready_slot, FrameSlot, LinkMeter};

/// Compression must make a transfer this much faster (as a factor) to be used.
pub const AUTO_MARGIN: f64 = 1.1;
/// Every this many chunks, `auto` tries the road it is not taking.
pub const PROBE_EVERY: u32 = 32;
/// Most compression workers per group.
const MAX_WORKERS: usize = 2;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Never.
    Off,
    /// Always, with DEFLATE at this level (1-9), except chunks whose probes do not
    /// compress.
    On(u32),
    /// When the link is slower than the compressor, at this level.
    Auto(u32),
}

impl Compression {
    /// The DEFLATE level, when compression may be used.
    pub fn level(self) -> Option<u32> {
        match self {
            Compression::Off => None,
            Compression::On(level) | Compression::Auto(level) => Some(level),
        }
    }
}

/// What the codec did lately.
#[derive(Debug, Default, Clone, Copy)]
struct CodecFigures {
    /// Record bytes compressed, and the frame bytes they became.
    raw: u64,
    framed: u64,
    /// Microseconds the workers spent on them.
    micros: u64,
}

impl CodecFigures {
    fn add(&mut self, raw: u64, framed: u64, micros: u64) {
        self.raw = self.raw.saturating_add(raw);
        self.framed = self.framed.saturating_add(framed);
        self.micros = self.micros.saturating_add(micros);
        // Follow data that changes: forget half of the past now and then.
        if self.raw > 256 << 20 {
            *self = CodecFigures {
                raw: self.raw / 2,
                framed: self.framed / 2,
                micros: self.micros / 2,
            };
        }
    }

    /// Record bytes per second of one worker, and the ratio framed / record bytes.
    fn rate_and_ratio(&self) -> Option<(f64, f64)> {
        (self.raw > 0).then(|| {
            (
                as_f64(self.raw) * 1e6 / as_f64(self.micros.max(1)),
                as_f64(self.framed) / as_f64(self.raw),
            )
        })
    }
}

/// The compression setting, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionMode {
    /// Chunks are sent raw.
    Off,
    /// Every chunk is compressed.
    On,
    /// Chunks are compressed while the link is slower than the codec.
    #[default]
    Auto,
}

impl fmt::Display for CompressionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Auto => "auto",
        })
    }
}

/// How a group's chunks are compressed, for status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompressionStatus {
    /// `off`, `on` or `auto`.
    pub mode: CompressionMode,
    /// The DEFLATE level.
    pub level: Option<u32>,
    /// What compression decided last, with its figures.
    #[serde(flatten)]
    pub decision: AutoDecision,
}

/// What `auto` decided last, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoDecision {
    /// Whether chunks are being compressed.
    pub compressing: bool,
    /// Link: wire bytes per second, when measured.
    pub link_bytes_per_sec: Option<u64>,
    /// One worker's record bytes per second, when measured.
    pub codec_bytes_per_sec: Option<u64>,
    /// Compressed bytes over record bytes, in thousandths, when measured.
    pub ratio_per_mille: Option<u64>,
}

struct Job {
    chunk: OwnedChunk,
    level: u32,
    frame: oneshot::Sender<Bytes>,
}

/// Compression worker threads.
struct Workers {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the queue ends each worker after its job.
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Frames the chunks of one group's transfers.
pub struct Framer {
    mode: Compression,
    figures: Arc<Mutex<CodecFigures>>,
    workers: Option<Workers>,
    worker_count: usize,
    since_probe: u32,
    decision: AutoDecision,
}

impl fmt::Debug for Framer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Framer")
            .field("mode", &self.mode)
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

impl Framer {
    /// A framer compressing as `mode` says.
    pub fn new(mode: Compression) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Framer {
            mode,
            figures: Arc::default(),
            workers: None,
            worker_count: cores.clamp(1, MAX_WORKERS),
            since_probe: 0,
            decision: AutoDecision::default(),
        }
    }

    /// The mode, and what it decided last with its figures.
    pub fn status(&self) -> CompressionStatus {
        CompressionStatus {
            mode: match self.mode {
                Compression::Off => CompressionMode::Off,
                Compression::On(_) => CompressionMode::On,
                Compression::Auto(_) => CompressionMode::Auto,
            },
            level: self.mode.level(),
            decision: self.decision,
        }
    }

    /// Frames `chunk`: sealed here, or compressed by a worker. The slot yields the
    /// frame.
    pub fn frame(&mut self, chunk: OwnedChunk, link: &LinkMeter) -> FrameSlot {
        match self.level_for(link) {
            None => ready_slot(Bytes::from(chunk.into_frame(None))),
            Some(level) => self.compress(chunk, level),
        }
    }

    /// The level to compress the next chunk at, or `None` to store it.
    fn level_for(&mut self, link: &LinkMeter) -> Option<u32> {
        let level = match self.mode {
            Compression::Off => return None,
            Compression::On(level) => {
                self.decision.compressing = true;
                return Some(level);
            }
            Compression::Auto(level) => level,
        };
        let codec = self
            .figures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rate_and_ratio();
        let link = link.bytes_per_sec();
        let compressing = match (codec, link) {
            // Learn what the codec does first, then what the link does without it.
            (None, _) => true,
            (Some(_), None) => false,
            (Some((rate, ratio)), Some(link)) => {
                let with = rate.min(link / ratio.max(0.01));
                with > link * AUTO_MARGIN
            }
        };
        self.decision = AutoDecision {
            compressing,
            link_bytes_per_sec: link.map(to_u64),
            codec_bytes_per_sec: codec.map(|(rate, _)| to_u64(rate)),
            ratio_per_mille: codec.map(|(_, ratio)| to_u64(ratio * 1000.0)),
        };
        // The link is measured whichever road is taken; the codec only when used.
        self.since_probe += 1;
        let probe = !compressing && self.since_probe >= PROBE_EVERY;
        if probe || compressing {
            self.since_probe = 0;
        }
        (compressing || probe).then_some(level)
    }

    fn compress(&mut self, chunk: OwnedChunk, level: u32) -> FrameSlot {
        let (sender, slot) = oneshot::channel();
        let job = Job {
            chunk,
            level,
            frame: sender,
        };
        let job = match self.workers().and_then(|jobs| jobs.send(job).err()) {
            None => return slot,
            Some(refused) => refused.into_inner(),
        };
        // No worker could be started: compress here.
        let Job { chunk, level, .. } = job;
        ready_slot(Bytes::from(compress_measured(&self.figures, chunk, level)))
    }

    /// The workers' queue, starting them on first use; `None` if no thread starts.
    fn workers(&mut self) -> Option<&Sender<Job>> {
        if self.workers.is_none() {
            let (jobs, queue) = unbounded::<Job>();
            let mut threads = Vec::new();
            for index in 0..self.worker_count {
                let queue = queue.clone();
                let figures = Arc::clone(&self.figures);
                let started = std::thread::Builder::new()
                    .name(format!("compress-{index}"))
                    .spawn(move || {
                        for job in queue {
                            let frame = compress_measured(&figures, job.chunk, job.level);
                            // The upload gave up on this chunk: nothing to do.
                            let _ = job.frame.send(Bytes::from(frame));
                        }
                    });
                match started {
                    Ok(thread) => threads.push(thread),
                    Err(error) => warn!(%error, "Cannot start a compression worker"),
                }
            }
            if threads.is_empty() {
                return None;
            }
            self.workers = Some(Workers {
                jobs: Some(jobs),
                threads,
            });
        }
        self.workers
            .as_ref()
            .and_then(|workers| workers.jobs.as_ref())
    }
}

/// Frames `chunk` compressed at `level` and adds what it took to `figures`.
fn compress_measured(figures: &Mutex<CodecFigures>, chunk: OwnedChunk, level: u32) -> Vec<u8> {
    let raw = chunk.records().len() as u64;
    let started = Instant::now();
    let frame = chunk.into_frame(Some(level));
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    figures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .add(raw, frame.len() as u64, micros);
    frame
}

/// A non-negative rate as an integer, for status.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn to_u64(value: f64) -> u64 {
    value.max(0.0).min(u64::MAX as f64) as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A framer whose codec did `rate` MiB/s at `ratio`, and a link that took
    /// `link` MiB/s.
    fn measured(mode: Compression, rate: u64, ratio: f64, link: u64) -> (Framer, LinkMeter) {
        let framer = Framer::new(mode);
        let raw = 64u64 << 20;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let framed = (as_f64(raw) * ratio) as u64;
        framer
            .figures
            .lock()
            .expect("figures")
            .add(raw, framed, 64 * 1_000_000 / rate);
        let meter = LinkMeter::default();
        meter.record(link << 20, Duration::from_secs(1));
        (framer, meter)
    }

    fn compressed_of(framer: &mut Framer, meter: &LinkMeter, chunks: u32) -> u32 {
        (0..chunks)
            .filter(|_| framer.level_for(meter).is_some())
            .count()
            .try_into()
            .expect("count")
    }

    #[test]
    fn auto_compresses_a_slow_link_and_not_a_fast_one() {
        // 1 Gb/s-ish link, DEFLATE at 200 MiB/s halving the data: compress.
        let (mut framer, meter) = measured(Compression::Auto(1), 200, 0.5, 100);
        assert_eq!(compressed_of(&mut framer, &meter, 64), 64);
        assert!(framer.status().decision.compressing);
        // A link faster than the codec: send raw, but keep probing the codec.
        let (mut framer, meter) = measured(Compression::Auto(1), 200, 0.5, 800);
        assert_eq!(compressed_of(&mut framer, &meter, 64), 64 / PROBE_EVERY);
        assert!(!framer.status().decision.compressing);
        // Data that does not compress is not worth it on any link.
        let (mut framer, meter) = measured(Compression::Auto(1), 200, 0.99, 20);
        assert_eq!(compressed_of(&mut framer, &meter, 32), 1);
    }

    #[test]
    fn auto_learns_the_codec_first_then_the_link() {
        let mut framer = Framer::new(Compression::Auto(1));
        let meter = LinkMeter::default();
        // Nothing known: compress to learn what the codec does.
        assert_eq!(framer.level_for(&meter), Some(1));
        framer
            .figures
            .lock()
            .expect("figures")
            .add(1 << 20, 1 << 19, 5_000);
        // The codec known, the link not: send raw to learn it.
        assert_eq!(framer.level_for(&meter), None);
    }

    #[test]
    fn on_and_off_do_what_they_say() {
        let (mut on, meter) = measured(Compression::On(6), 10, 0.99, 10_000);
        assert_eq!(compressed_of(&mut on, &meter, 10), 10);
        let (mut off, meter) = measured(Compression::Off, 1_000, 0.1, 1);
        assert_eq!(compressed_of(&mut off, &meter, 10), 0);
    }

    #[test]
    fn workers_frame_chunks_into_valid_frames() {
        let mut framer = Framer::new(Compression::On(1));
        let meter = LinkMeter::default();
        let mut encoder = wire::chunk::ChunkEncoder::new(5);
        let mut slots = Vec::new();
        let data = vec![b'x'; 3 << 20];
        let change = tracker::Change {
            disk: 0,
            offset: 0,
            length: data.len() as u64,
            data: tracker::ChangeData::Write(&data),
        };
        let mut emit = |raw: wire::chunk::RawChunk<'_>| -> Result<(), ()> {
            slots.push(framer.frame(raw.into_owned(), &meter));
            Ok(())
        };
        encoder.push(&change, &mut emit).expect("push");
        encoder.finish(&mut emit).expect("finish");
        assert_eq!(slots.len(), 2);
        for (index, slot) in slots.into_iter().enumerate() {
            let frame = slot.blocking_recv().expect("framed");
            let checked = wire::chunk::CheckedFrame::check(&frame).expect("valid");
            checked
                .header
                .expect(5, u32::try_from(index).expect("index"))
                .expect("in order");
            assert!(checked.header.deflate, "repeated bytes compress");
        }
    }
}
