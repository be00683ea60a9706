//! The shipping pipeline: how a transfer's changes become chunk frames on the wire,
//! with every stage working at once.
//!
//! Stages, each on its own thread, joined by bounded queues:
//! 1. **Encode** (the group's shipper thread): changes are read from the ring and
//!    packed into chunk buffers ([`wire::chunk::ChunkEncoder`]). This is the one copy
//!    of the data the primary makes.
//! 2. **Frame** ([`compress`]): a chunk is sealed (header and CRC) in its own buffer,
//!    or compressed (zstd or DEFLATE) into a new one by a compression worker. Whether to
//!    compress is decided per chunk by [`compress::Compression`]; in `auto` mode by
//!    measuring whether it makes the transfer faster.
//! 3. **Upload** ([`upload`]): the frames of a transfer go to the replica in chunk
//!    order as one streamed HTTP request body, on the client's runtime thread; TLS
//!    encrypts them straight from the frame buffers.
//!
//! Buffer ownership: a chunk's buffer moves from stage to stage and is never shared;
//! the upload drops it once written to the socket.
//!
//! Ordering: frames leave in chunk order whatever order the workers finish in: the
//! encoder queues one [`upload::FrameSlot`] per chunk, in order, and the upload takes
//! them in that order, waiting on each until its frame is there.
//!
//! Bounds: the upload queue holds at most [`upload::QUEUE_FRAMES`] slots; when it is
//! full the encoder waits. A group's frames in flight (queued, being compressed, being
//! written) take a few chunk buffers of 2 MiB.
//!
//! Durability is not decided here: the replica stores frames as they arrive and makes
//! the transfer durable when it is committed, after the upload ended.

pub mod compress;
pub mod upload;
