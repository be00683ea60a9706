//! The upload stage: a transfer's frames, in chunk order, as one streamed HTTP request
//! body.
//!
//! [`UploadBody`] is the request body. It takes [`FrameSlot`]s from a bounded queue in
//! the order the encoder queued them and yields each slot's frame once it is framed,
//! so compression workers may finish in any order. It paces itself by the bandwidth
//! limits ([`Throttle`]) and measures the link on the way ([`LinkMeter`]).
//!
//! The body ends when the queue's sender is dropped (the encoder has no more chunks,
//! or gave up: the replica keeps what arrived whole). A slot whose frame never comes
//! (its worker died) fails the body, which aborts the request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

use crate::remote::Throttle;

/// Frames queued for the upload (beyond the one being written): enough to keep the
/// link busy while the encoder or a worker catches up, few enough to bound memory.
pub const QUEUE_FRAMES: usize = 4;
/// Wire bytes after which the link measurement forgets half of what it knew, so it
/// follows a link that changes.
const METER_WINDOW: u64 = 256 << 20;
/// Wire bytes the link measurement needs before it is trusted: more than socket
/// buffers absorb without the link being involved.
const METER_MIN_BYTES: u64 = 16 << 20;

/// Where a chunk's frame will be: filled by whoever frames it.
pub type FrameSlot = oneshot::Receiver<Bytes>;

/// A slot that holds `frame` already.
pub fn ready_slot(frame: Bytes) -> FrameSlot {
    let (sender, slot) = oneshot::channel();
    // The receiver is right here: the send cannot fail.
    let _ = sender.send(frame);
    slot
}

/// What the link takes: wire bytes over the time the socket needed to accept them.
/// Time the upload waited for a frame is not counted, so the figure is the link's
/// (with TLS and the replica's storing), not the encoder's.
#[derive(Debug, Default)]
pub struct LinkMeter {
    /// Bytes and microseconds of the current window.
    window: std::sync::Mutex<(u64, u64)>,
    /// Every wire byte handed to the connection.
    total: AtomicU64,
}

impl LinkMeter {
    pub(crate) fn record(&self, bytes: u64, took: Duration) {
        self.count(bytes);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        window.0 = window.0.saturating_add(bytes);
        window.1 = window.1.saturating_add(micros);
        if window.0 > METER_WINDOW {
            *window = (window.0 / 2, window.1 / 2);
        }
    }

    /// Counts `bytes` handed to the connection without timing them: a frame the
    /// connection was still writing when the upload ended.
    fn count(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes per second the link took lately; `None` until enough went through.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let (bytes, micros) = *self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if bytes < METER_MIN_BYTES {
            return None;
        }
        Some(as_f64(bytes) * 1e6 / as_f64(micros.max(1)))
    }

    /// Every wire byte handed to the connection so far.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// A byte count as a float, for rates (exact up to 2^53).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn as_f64(value: u64) -> f64 {
    value as f64
}

/// Why the body stopped early.
#[derive(Debug, thiserror::Error)]
#[error("A chunk was lost before it was framed")]
pub struct LostFrame;

/// The request body of an upload.
#[derive(Debug)]
pub struct UploadBody {
    slots: mpsc::Receiver<FrameSlot>,
    current: Option<FrameSlot>,
    /// A frame waiting out a bandwidth limit.
    held: Option<(Bytes, Pin<Box<tokio::time::Sleep>>)>,
    throttles: Vec<Arc<Throttle>>,
    meter: Arc<LinkMeter>,
    /// The frame yielded last: its size and when it was handed over.
    yielded: Option<(u64, Instant)>,
}

impl UploadBody {
    /// A body of the frames queued on `slots`.
    pub fn new(
        slots: mpsc::Receiver<FrameSlot>,
        throttles: Vec<Arc<Throttle>>,
        meter: Arc<LinkMeter>,
    ) -> Self {
        UploadBody {
            slots,
            current: None,
            held: None,
            throttles,
            meter,
            yielded: None,
        }
    }
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = LostFrame;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LostFrame>>> {
        let this = &mut *self;
        // Asked for more: the connection took the frame yielded last.
        if let Some((bytes, at)) = this.yielded.take() {
            this.meter.record(bytes, at.elapsed());
        }
        loop {
            if let Some((_, pause)) = &mut this.held {
                ready!(pause.as_mut().poll(cx));
                let Some((frame, _)) = this.held.take() else {
                    continue;
                };
                return Poll::Ready(Some(Ok(this.hand_over(frame))));
            }
            if let Some(slot) = &mut this.current {
                let framed = ready!(Pin::new(slot).poll(cx));
                this.current = None;
                let Ok(frame) = framed else {
                    return Poll::Ready(Some(Err(LostFrame)));
                };
                let wait = this
                    .throttles
                    .iter()
                    .map(|throttle| throttle.take(frame.len()))
                    .max()
                    .unwrap_or_default();
                if wait.is_zero() {
                    return Poll::Ready(Some(Ok(this.hand_over(frame))));
                }
                this.held = Some((frame, Box::pin(tokio::time::sleep(wait))));
                continue;
            }
            match ready!(this.slots.poll_recv(cx)) {
                Some(slot) => this.current = Some(slot),
                None => return Poll::Ready(None),
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown: the body is sent chunked.
        SizeHint::default()
    }
}

impl UploadBody {
    fn hand_over(&mut self, frame: Bytes) -> Frame<Bytes> {
        self.yielded = Some((frame.len() as u64, Instant::now()));
        Frame::data(frame)
    }
}

impl Drop for UploadBody {
    /// A request cut off mid-frame (the replica died, the link broke) never asks
    /// for the next frame; the one it was writing still went, at least in part, onto
    /// the network, and the byte count says so.
    fn drop(&mut self) {
        if let Some((bytes, _)) = self.yielded.take() {
            self.meter.count(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn frames_leave_in_queue_order_whenever_they_are_framed() {
        let runtime = runtime();
        let (queue, slots) = mpsc::channel(QUEUE_FRAMES);
        let meter = Arc::new(LinkMeter::default());
        let body = UploadBody::new(slots, Vec::new(), Arc::clone(&meter));
        let (first, first_slot) = oneshot::channel();
        let (second, second_slot) = oneshot::channel();
        runtime.block_on(async {
            queue.send(first_slot).await.expect("queued");
            queue.send(second_slot).await.expect("queued");
            queue
                .send(ready_slot(Bytes::from_static(b"c")))
                .await
                .expect("queued");
            drop(queue);
            // The second chunk is framed before the first.
            second.send(Bytes::from_static(b"b")).expect("sent");
            first.send(Bytes::from_static(b"a")).expect("sent");
            let collected = body.collect().await.expect("body").to_bytes();
            assert_eq!(&collected[..], b"abc");
        });
        assert_eq!(meter.total_bytes(), 3);
    }

    #[test]
    fn a_frame_that_never_comes_fails_the_body() {
        let runtime = runtime();
        let (queue, slots) = mpsc::channel(QUEUE_FRAMES);
        let body = UploadBody::new(slots, Vec::new(), Arc::default());
        let (worker, slot) = oneshot::channel::<Bytes>();
        runtime.block_on(async {
            queue.send(slot).await.expect("queued");
            drop(worker);
            assert!(body.collect().await.is_err());
        });
    }

    #[test]
    fn a_frame_cut_off_mid_write_is_counted_as_sent() {
        let runtime = runtime();
        let (queue, slots) = mpsc::channel(QUEUE_FRAMES);
        let meter = Arc::new(LinkMeter::default());
        let mut body = UploadBody::new(slots, Vec::new(), Arc::clone(&meter));
        runtime.block_on(async {
            queue
                .send(ready_slot(Bytes::from_static(b"abcd")))
                .await
                .expect("queued");
            // The connection takes one frame, then dies before asking for more.
            let frame = body.frame().await.expect("a frame").expect("no error");
            assert_eq!(frame.into_data().expect("data").len(), 4);
        });
        assert_eq!(
            meter.total_bytes(),
            0,
            "not counted before the connection moves on"
        );
        drop(body);
        assert_eq!(meter.total_bytes(), 4);
    }

    #[test]
    fn a_bandwidth_limit_spaces_the_frames() {
        let runtime = runtime();
        let (queue, slots) = mpsc::channel(QUEUE_FRAMES);
        // 1 MB/s: the second 200 kB frame waits for the first one's debt.
        let throttle = Arc::new(Throttle::new(1_000_000));
        let body = UploadBody::new(slots, vec![throttle], Arc::default());
        let started = Instant::now();
        runtime.block_on(async {
            for _ in 0..3 {
                queue
                    .send(ready_slot(Bytes::from(vec![7u8; 200_000])))
                    .await
                    .expect("queued");
            }
            drop(queue);
            let collected = body.collect().await.expect("body").to_bytes();
            assert_eq!(collected.len(), 600_000);
        });
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_link_is_measured_only_once_enough_went_through() {
        let meter = LinkMeter::default();
        meter.record(1 << 20, Duration::from_millis(10));
        assert_eq!(meter.bytes_per_sec(), None);
        meter.record(METER_MIN_BYTES, Duration::from_millis(160));
        let rate = meter.bytes_per_sec().expect("measured");
        // 17 MiB in 170 ms: 100 MiB/s give or take rounding.
        assert!((rate / f64::from(1 << 20) - 100.0).abs() < 1.0, "{rate}");
    }
}
