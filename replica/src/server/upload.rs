//! Chunk uploads: the frames of a transfer, streamed in one request body.
//!
//! `PUT .../transfers/{id}/chunks/{index}` carries the frames of chunks `index`,
//! `index + 1`, ... back to back, as many as the primary streams. [`FrameReader`] cuts
//! the body into frames as it arrives: each header is checked before its body is read,
//! so a frame takes at most [`CHUNK_HEADER_LEN`] + [`MAX_CHUNK_BODY`] bytes of memory,
//! and a body that stalls for the connection's body timeout is refused. Each frame is
//! stored ([`Replica::put_chunk`]: checked whole, written, not synced) while the next
//! one is read, so receiving and storing overlap.
//!
//! Buffer ownership: a frame's buffer goes to the task that stores it, which hands it
//! back to the reader's [`FramePool`] once the frame is written; the next frames are
//! read into it. A fresh 2 MiB allocation per frame would cost page faults and
//! zeroing of new memory for every chunk.
//!
//! The answer, once the body ended, is how many chunks of the transfer the replica
//! holds. Stored is not durable: the commit syncs the transfer before it answers, and
//! after a crash the replica keeps the chunks that survived whole and says so in its
//! answer to the next offer. The first refused frame ends the request with its
//! refusal; the frames before it stay stored.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use wire::api::ErrorCode;
use wire::chunk::{ChunkHeader, CHUNK_HEADER_LEN, MAX_CHUNK_BODY};

use super::api::{refuse, Refusal};
use super::http::{body_extensions, store_refusal, UnreadBody};
use super::lock;
use crate::store::{Claim, Replica, StoreError};

/// Frame buffers stored and handed back, to be read into again.
#[derive(Debug, Clone, Default)]
pub(super) struct FramePool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Buffers a pool keeps: one being read into, one being stored, and spares.
const POOLED_FRAMES: usize = 4;

impl FramePool {
    /// An empty buffer with room for a whole frame.
    fn take(&self) -> Vec<u8> {
        let pooled = lock(&self.0).pop();
        pooled.unwrap_or_else(|| Vec::with_capacity(CHUNK_HEADER_LEN + MAX_CHUNK_BODY as usize))
    }

    /// Hands `buffer` back for later frames.
    fn give(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        let mut pool = lock(&self.0);
        if pool.len() < POOLED_FRAMES {
            pool.push(buffer);
        }
    }
}

/// Cuts a request body into chunk frames.
#[derive(Debug)]
pub(super) struct FrameReader {
    body: Incoming,
    idle: Duration,
    /// Bytes received and not yet handed out as a frame.
    pending: Vec<u8>,
    ended: bool,
    pool: FramePool,
}

impl FrameReader {
    /// A reader of `request`'s body.
    pub(super) fn new(request: Request<Incoming>) -> (Self, Option<UnreadBody>) {
        let (unread, idle) = body_extensions(&request);
        let pool = FramePool::default();
        let reader = FrameReader {
            body: request.into_body(),
            idle,
            pending: pool.take(),
            ended: false,
            pool,
        };
        (reader, unread)
    }

    /// The next whole frame; `None` at the end of the body.
    pub(super) async fn next(&mut self) -> Result<Option<Vec<u8>>, Refusal> {
        if !self.fill(CHUNK_HEADER_LEN).await? {
            return if self.pending.is_empty() {
                Ok(None)
            } else {
                Err(truncated(self.pending.len(), CHUNK_HEADER_LEN))
            };
        }
        // Checked before its body is read: the length is bounded by MAX_CHUNK_BODY.
        let header = ChunkHeader::parse(&self.pending)
            .map_err(|error| store_refusal(&StoreError::Chunk(error)))?;
        let need = header.frame_len();
        if !self.fill(need).await? {
            return Err(truncated(self.pending.len(), need));
        }
        // What came after the frame starts the next buffer.
        let mut next = self.pool.take();
        next.extend_from_slice(&self.pending[need..]);
        self.pending.truncate(need);
        Ok(Some(std::mem::replace(&mut self.pending, next)))
    }

    /// The pool to hand stored frames' buffers back to.
    pub(super) fn pool(&self) -> FramePool {
        self.pool.clone()
    }

    /// Reads until `need` bytes are pending; `false` if the body ends first.
    async fn fill(&mut self, need: usize) -> Result<bool, Refusal> {
        debug_assert!(need <= CHUNK_HEADER_LEN + MAX_CHUNK_BODY as usize);
        while self.pending.len() < need {
            if self.ended {
                return Ok(false);
            }
            let frame = tokio::time::timeout(self.idle, self.body.frame())
                .await
                .map_err(|_| {
                    refuse(
                        ErrorCode::BadRequest,
                        format!("The body stalled: no byte for {:?}", self.idle),
                    )
                })?;
            let Some(frame) = frame else {
                self.ended = true;
                continue;
            };
            let frame = frame.map_err(|error| {
                refuse(
                    ErrorCode::BadRequest,
                    format!("Cannot read the body: {error}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if self.pending.capacity() < need {
                    self.pending.reserve_exact(need - self.pending.len());
                }
                self.pending.extend_from_slice(&data);
            }
        }
        Ok(true)
    }
}

fn truncated(have: usize, need: usize) -> Refusal {
    refuse(
        ErrorCode::BadRequest,
        format!("The body ends inside a chunk frame: {have} of {need} bytes"),
    )
}

/// Stores the frames of `request`'s body as chunks `first`, `first + 1`, ... of
/// transfer `id`; returns how many chunks of the transfer the replica holds.
pub(super) async fn receive(
    replica: &Arc<Mutex<Replica>>,
    claim: Claim,
    id: u64,
    first: u32,
    request: Request<Incoming>,
) -> Result<u32, Refusal> {
    let (mut reader, unread) = FrameReader::new(request);
    let mut index = first;
    let mut storing: Option<tokio::task::JoinHandle<Result<u32, Refusal>>> = None;
    let mut have = None;
    loop {
        // The next frame arrives while the one before is stored.
        let next = reader.next().await;
        if let Some(stored) = storing.take() {
            have = Some(joined(stored.await)?);
        }
        let Some(frame) = next? else { break };
        let (replica, pool) = (Arc::clone(replica), reader.pool());
        let at = index;
        storing = Some(tokio::task::spawn_blocking(move || {
            let stored = lock(&replica)
                .put_chunk(claim, id, at, &frame)
                .map_err(|error| store_refusal(&error));
            pool.give(frame);
            stored
        }));
        index = index
            .checked_add(1)
            .ok_or_else(|| refuse(ErrorCode::BadRequest, "Chunk index beyond 2^32 - 1"))?;
    }
    if let Some(UnreadBody(unread)) = unread {
        unread.store(false, Ordering::Relaxed);
    }
    have.ok_or_else(|| refuse(ErrorCode::BadRequest, "The upload holds no chunk"))
}

fn joined(outcome: Result<Result<u32, Refusal>, tokio::task::JoinError>) -> Result<u32, Refusal> {
    outcome.unwrap_or_else(|error| {
        Err(refuse(
            ErrorCode::Internal,
            format!("Storing a chunk failed: {error}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_hands_back_empty_whole_frame_buffers_and_keeps_a_few() {
        let pool = FramePool::default();
        let mut first = pool.take();
        assert!(first.capacity() >= CHUNK_HEADER_LEN + MAX_CHUNK_BODY as usize);
        first.extend_from_slice(b"frame bytes");
        let address = first.as_ptr();
        pool.give(first);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), address, "the same allocation, reused");
        for _ in 0..POOLED_FRAMES + 3 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(lock(&pool.0).len(), POOLED_FRAMES);
    }
}
