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
//! The codec is the group's (zstd unless configured otherwise) when the replica
//! announced it decodes it in its answer to the transfer's offer
//! ([`Framer::negotiate`]); otherwise DEFLATE, which every replica decodes, at the
//! configured level within DEFLATE's 1-9. `auto` measures whichever is in use.
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
use wire::chunk::{BodyCodec, Codec, OwnedChunk};

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
    /// Always, with this codec, except chunks whose probes do not compress.
    On(Codec),
    /// When the link is slower than the compressor, with this codec.
    Auto(Codec),
}

impl Compression {
    /// The configured codec, when compression may be used.
    pub fn codec(self) -> Option<Codec> {
        match self {
            Compression::Off => None,
            Compression::On(codec) | Compression::Auto(codec) => Some(codec),
        }
    }

    /// The codec, when compression may be used, for a replica that decodes zstd or
    /// not: DEFLATE in place of zstd for one that does not, at the level nearest
    /// the configured one.
    pub fn codec_for(self, replica_decodes_zstd: bool) -> Option<Codec> {
        match self.codec()? {
            Codec::Zstd { level } if !replica_decodes_zstd => Some(Codec::Deflate {
                level: level.clamp(1, 9).unsigned_abs(),
            }),
            codec => Some(codec),
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
    /// The codec chunks are compressed with (absent from older daemons, which knew
    /// only DEFLATE).
    pub codec: Option<BodyCodec>,
    /// Its level.
    pub level: Option<i32>,
    /// The group is configured for zstd, but the replica did not announce it decodes
    /// it: DEFLATE is used instead.
    pub zstd_not_decoded: bool,
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
    codec: Codec,
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
    /// Whether the replica decodes zstd, as it said in its answer to the latest
    /// offer; `None` before the first.
    replica_decodes_zstd: Option<bool>,
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
            replica_decodes_zstd: None,
            figures: Arc::default(),
            workers: None,
            worker_count: cores.clamp(1, MAX_WORKERS),
            since_probe: 0,
            decision: AutoDecision::default(),
        }
    }

    /// The mode, the codec in use, and what it decided last with its figures.
    pub fn status(&self) -> CompressionStatus {
        // Before any answer, the configured codec: nothing was refused yet.
        let codec = self
            .mode
            .codec_for(self.replica_decodes_zstd.unwrap_or(true));
        CompressionStatus {
            mode: match self.mode {
                Compression::Off => CompressionMode::Off,
                Compression::On(_) => CompressionMode::On,
                Compression::Auto(_) => CompressionMode::Auto,
            },
            codec: codec.map(Codec::body),
            level: codec.map(Codec::level),
            zstd_not_decoded: codec != self.mode.codec(),
            decision: self.decision,
        }
    }

    /// Takes note of what the replica decodes, from its answer to a transfer's offer.
    /// A change of codec forgets the figures of the other one.
    pub fn negotiate(&mut self, replica_decodes_zstd: bool) {
        let before = self.codec_in_use();
        self.replica_decodes_zstd = Some(replica_decodes_zstd);
        if self.mode.codec_for(replica_decodes_zstd) != before {
            *self.figures.lock().unwrap_or_else(PoisonError::into_inner) = CodecFigures::default();
        }
    }

    /// The codec chunks are compressed with now: zstd only once the replica said it
    /// decodes it.
    fn codec_in_use(&self) -> Option<Codec> {
        self.mode
            .codec_for(self.replica_decodes_zstd.unwrap_or(false))
    }

    /// Frames `chunk`: sealed here, or compressed by a worker. The slot yields the
    /// frame.
    pub fn frame(&mut self, chunk: OwnedChunk, link: &LinkMeter) -> FrameSlot {
        match self.codec_for(link) {
            None => ready_slot(Bytes::from(chunk.into_frame(None))),
            Some(codec) => self.compress(chunk, codec),
        }
    }

    /// The codec to compress the next chunk with, or `None` to store it.
    fn codec_for(&mut self, link: &LinkMeter) -> Option<Codec> {
        let codec = self.codec_in_use()?;
        if let Compression::On(_) = self.mode {
            self.decision.compressing = true;
            return Some(codec);
        }
        let measured = self
            .figures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rate_and_ratio();
        let link = link.bytes_per_sec();
        let compressing = match (measured, link) {
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
            codec_bytes_per_sec: measured.map(|(rate, _)| to_u64(rate)),
            ratio_per_mille: measured.map(|(_, ratio)| to_u64(ratio * 1000.0)),
        };
        // The link is measured whichever road is taken; the codec only when used.
        self.since_probe += 1;
        let probe = !compressing && self.since_probe >= PROBE_EVERY;
        if probe || compressing {
            self.since_probe = 0;
        }
        (compressing || probe).then_some(codec)
    }

    fn compress(&mut self, chunk: OwnedChunk, codec: Codec) -> FrameSlot {
        let (sender, slot) = oneshot::channel();
        let job = Job {
            chunk,
            codec,
            frame: sender,
        };
        let job = match self.workers().and_then(|jobs| jobs.send(job).err()) {
            None => return slot,
            Some(refused) => refused.into_inner(),
        };
        // No worker could be started: compress here.
        let Job { chunk, codec, .. } = job;
        ready_slot(Bytes::from(compress_measured(&self.figures, chunk, codec)))
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
                        base::priority::enter_background();
                        for job in queue {
                            let frame = compress_measured(&figures, job.chunk, job.codec);
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

/// Frames `chunk` compressed with `codec` and adds what it took to `figures`.
fn compress_measured(figures: &Mutex<CodecFigures>, chunk: OwnedChunk, codec: Codec) -> Vec<u8> {
    let raw = chunk.records().len() as u64;
    let started = Instant::now();
    let frame = chunk.into_frame(Some(codec));
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

    const DEFLATE_1: Codec = Codec::Deflate { level: 1 };
    const ZSTD_1: Codec = Codec::Zstd { level: 1 };

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
            .filter(|_| framer.codec_for(meter).is_some())
            .count()
            .try_into()
            .expect("count")
    }

    #[test]
    fn auto_compresses_a_slow_link_and_not_a_fast_one() {
        // 1 Gb/s-ish link, DEFLATE at 200 MiB/s halving the data: compress.
        let (mut framer, meter) = measured(Compression::Auto(DEFLATE_1), 200, 0.5, 100);
        assert_eq!(compressed_of(&mut framer, &meter, 64), 64);
        assert!(framer.status().decision.compressing);
        // A link faster than the codec: send raw, but keep probing the codec.
        let (mut framer, meter) = measured(Compression::Auto(DEFLATE_1), 200, 0.5, 800);
        assert_eq!(compressed_of(&mut framer, &meter, 64), 64 / PROBE_EVERY);
        assert!(!framer.status().decision.compressing);
        // Data that does not compress is not worth it on any link.
        let (mut framer, meter) = measured(Compression::Auto(DEFLATE_1), 200, 0.99, 20);
        assert_eq!(compressed_of(&mut framer, &meter, 32), 1);
    }

    #[test]
    fn auto_learns_the_codec_first_then_the_link() {
        let mut framer = Framer::new(Compression::Auto(DEFLATE_1));
        let meter = LinkMeter::default();
        // Nothing known: compress to learn what the codec does.
        assert_eq!(framer.codec_for(&meter), Some(DEFLATE_1));
        framer
            .figures
            .lock()
            .expect("figures")
            .add(1 << 20, 1 << 19, 5_000);
        // The codec known, the link not: send raw to learn it.
        assert_eq!(framer.codec_for(&meter), None);
    }

    #[test]
    fn on_and_off_do_what_they_say() {
        let (mut on, meter) = measured(
            Compression::On(Codec::Deflate { level: 6 }),
            10,
            0.99,
            10_000,
        );
        assert_eq!(compressed_of(&mut on, &meter, 10), 10);
        let (mut off, meter) = measured(Compression::Off, 1_000, 0.1, 1);
        assert_eq!(compressed_of(&mut off, &meter, 10), 0);
    }

    /// Frames 3 MiB of compressible data in two chunks through `framer`'s workers
    /// and returns each frame's body codec, checking the frames.
    fn frame_through(framer: &mut Framer) -> Vec<BodyCodec> {
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
        let mut scratch = Vec::new();
        let mut codecs = Vec::new();
        for (index, slot) in slots.into_iter().enumerate() {
            let frame = slot.blocking_recv().expect("framed");
            let checked = wire::chunk::CheckedFrame::check(&frame).expect("valid");
            checked
                .header
                .expect(5, u32::try_from(index).expect("index"))
                .expect("in order");
            let records = checked.records(&mut scratch).expect("decodes");
            let written: u64 = records.map(|record| record.expect("a record").length).sum();
            assert!(written > 0);
            codecs.push(checked.header.codec);
        }
        codecs
    }

    #[test]
    fn workers_frame_chunks_into_valid_frames_with_the_negotiated_codec() {
        // Until a replica announced zstd, its chunks go as DEFLATE; status shows the
        // configured codec until the replica answers.
        let mut framer = Framer::new(Compression::On(ZSTD_1));
        assert_eq!(framer.status().codec, Some(BodyCodec::Zstd));
        assert_eq!(frame_through(&mut framer), [BodyCodec::Deflate; 2]);
        framer.negotiate(false);
        let status = framer.status();
        assert_eq!(status.codec, Some(BodyCodec::Deflate));
        assert!(status.zstd_not_decoded, "{status:?}");
        framer.negotiate(true);
        assert_eq!(frame_through(&mut framer), [BodyCodec::Zstd; 2]);
        let status = framer.status();
        assert_eq!(
            (status.codec, status.level),
            (Some(BodyCodec::Zstd), Some(1))
        );
        assert!(!status.zstd_not_decoded, "{status:?}");
        // A replica that stops announcing it (an older one in its place) gets DEFLATE.
        framer.negotiate(false);
        assert_eq!(frame_through(&mut framer), [BodyCodec::Deflate; 2]);
        // Configured for DEFLATE, DEFLATE it is either way.
        let mut framer = Framer::new(Compression::On(DEFLATE_1));
        framer.negotiate(true);
        assert_eq!(frame_through(&mut framer), [BodyCodec::Deflate; 2]);
        assert!(!framer.status().zstd_not_decoded);
    }

    #[test]
    fn a_zstd_level_falls_back_to_the_nearest_deflate_level() {
        let fallback = |level| Compression::Auto(Codec::Zstd { level }).codec_for(false);
        assert_eq!(fallback(3), Some(Codec::Deflate { level: 3 }));
        assert_eq!(fallback(19), Some(Codec::Deflate { level: 9 }));
        assert_eq!(fallback(-5), Some(DEFLATE_1));
        assert_eq!(Compression::Off.codec_for(true), None);
    }

    #[test]
    fn a_change_of_codec_forgets_the_old_codec_s_figures() {
        // Figures of DEFLATE (in use until the replica announces zstd) that say: send raw.
        let (mut framer, meter) = measured(Compression::Auto(ZSTD_1), 200, 0.5, 800);
        assert_eq!(framer.codec_for(&meter), None);
        framer.negotiate(true);
        // zstd's figures are unknown: it is measured first.
        assert_eq!(framer.codec_for(&meter), Some(ZSTD_1));
        assert_eq!(framer.status().decision.codec_bytes_per_sec, None);
    }
}
