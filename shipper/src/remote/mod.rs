//! Shipping to a replica server over the network.
//!
//! [`RemoteSink`] turns transfers into chunks ([`wire::chunk`]), compresses and
//! uploads them, and commits; [`client`] speaks the HTTP API; [`relationship`] is the
//! primary's durable record of the relationship; [`throttle`] limits bandwidth.
//!
//! Resuming: `begin` offers the transfer and learns how many chunks the replica holds;
//! those chunks are encoded again (the records decide chunk boundaries) but neither
//! framed, compressed nor sent, so an interrupted transfer costs at most the chunk in
//! flight.

pub mod client;
pub mod relationship;
pub mod throttle;

use std::sync::Arc;

use hyper::body::Bytes;
use hyper::Method;
use replica::compare::Hash;
use tracker::Change;
use wire::api::{
    ByteRange, CommitRequest, EnableRequest, FailoverRequest, HashAnswer, HashRequest, ReplicaInfo,
    TransferAnswer, TransferKind, TransferOffer,
};
use wire::chunk::{ChunkEncoder, RawChunk};

pub use client::{
    ClientError, ClientSettings, Credentials, FailureClass, ReplicaClient, REQUEST_TIMEOUT,
};
pub use relationship::{CopyProgress, Relationship, RelationshipError};
pub use throttle::Throttle;

use crate::resync::Cursor;
use crate::sink::{ChunkFraming, CycleSink, Emit, Resume, SinkError};

/// How chunks are sent.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// DEFLATE level 0-9, or `None` to send chunks uncompressed.
    pub compression: Option<u32>,
    /// Bandwidth limits that apply (the group's, the daemon's).
    pub throttles: Vec<Arc<Throttle>>,
}

/// The transfer being sent.
#[derive(Debug)]
struct Sending {
    id: u64,
    encoder: ChunkEncoder,
    /// Chunks below this index are on the replica already.
    skip_below: u32,
}

/// Ships transfers to a replica server.
#[derive(Debug)]
pub struct RemoteSink {
    client: ReplicaClient,
    name: String,
    options: RemoteOptions,
    sending: Option<Sending>,
    frame: Vec<u8>,
    bytes_sent: u64,
}

impl RemoteSink {
    /// A sink for replica `name` (the group's name) through `client`.
    pub fn new(client: ReplicaClient, name: &str, options: RemoteOptions) -> Self {
        RemoteSink {
            client,
            name: name.to_string(),
            options,
            sending: None,
            frame: Vec::new(),
            bytes_sent: 0,
        }
    }

    fn remote(&self, source: ClientError) -> SinkError {
        SinkError::Remote {
            url: self.client.url().to_string(),
            source,
        }
    }

    /// Reads the replica's state.
    pub fn info(&mut self) -> Result<ReplicaInfo, SinkError> {
        let path = format!("/replicas/{}", self.name);
        self.client
            .control::<(), ReplicaInfo>(Method::GET, &path, None)
            .map_err(|error| self.remote(error))
    }

    fn send(&mut self, chunk: &RawChunk<'_>) -> Result<(), SinkError> {
        self.frame.clear();
        chunk.frame_into(self.options.compression, &mut self.frame);
        for throttle in &self.options.throttles {
            let wait = throttle.take(self.frame.len());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let frame = Bytes::copy_from_slice(&self.frame);
        let len = frame.len() as u64;
        self.client
            .put_chunk(&self.name, chunk.transfer, chunk.index, frame)
            .map_err(|error| self.remote(error))?;
        self.bytes_sent += len;
        Ok(())
    }
}

impl ChunkFraming for RemoteSink {
    fn encoder(&self) -> Option<&ChunkEncoder> {
        self.sending.as_ref().map(|sending| &sending.encoder)
    }

    /// Sends the chunks `step` emits from `skip_below` on.
    fn with_encoder(
        &mut self,
        step: impl FnOnce(&mut ChunkEncoder, &mut Emit<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let Some(mut sending) = self.sending.take() else {
            return Err(self.remote(ClientError::BadAnswer {
                what: "a transfer".into(),
                detail: "changes arrived before the transfer was offered".into(),
            }));
        };
        let skip_below = sending.skip_below;
        let result = step(&mut sending.encoder, &mut |chunk: RawChunk<'_>| {
            if chunk.index < skip_below {
                return Ok(());
            }
            self.send(&chunk)
        });
        self.sending = Some(sending);
        result
    }
}

impl CycleSink for RemoteSink {
    fn describe(&self) -> String {
        format!("replica {}", self.client.url())
    }

    fn enable(&mut self, request: &EnableRequest) -> Result<(), SinkError> {
        self.client
            .control::<_, ReplicaInfo>(Method::POST, "/replicas", Some(request))
            .map(drop)
            .map_err(|error| self.remote(error))
    }

    fn set_relationship(&mut self, id: u64, epoch: u64) {
        self.client.set_relationship(id, epoch);
    }

    fn begin(&mut self, id: u64, kind: TransferKind, bytes: u64) -> Result<Resume, SinkError> {
        let path = format!("/replicas/{}/transfers", self.name);
        let offer = TransferOffer { id, kind, bytes };
        let answer: TransferAnswer = self
            .client
            .control(Method::POST, &path, Some(&offer))
            .map_err(|error| self.remote(error))?;
        self.sending = Some(Sending {
            id,
            encoder: ChunkEncoder::new(id),
            skip_below: answer.have_chunks,
        });
        Ok(Resume {
            have_chunks: answer.have_chunks,
            committed: answer.committed,
            resume_from: answer.resume_from.map(|position| Cursor {
                disk: usize::try_from(position.disk).unwrap_or(usize::MAX),
                offset: position.offset,
            }),
        })
    }

    fn hashes(
        &mut self,
        disk: usize,
        ranges: &[ByteRange],
    ) -> Result<Option<Vec<Hash>>, SinkError> {
        let path = format!("/replicas/{}/hashes", self.name);
        let request = HashRequest {
            disk: u32::try_from(disk).unwrap_or(u32::MAX),
            ranges: ranges.to_vec(),
        };
        let answer: HashAnswer = self
            .client
            .control(Method::POST, &path, Some(&request))
            .map_err(|error| self.remote(error))?;
        let hashes: Option<Vec<Hash>> = answer
            .hashes
            .iter()
            .map(|text| replica::compare::from_hex(text))
            .collect();
        match hashes {
            Some(hashes) if hashes.len() == ranges.len() => Ok(Some(hashes)),
            _ => Err(self.remote(ClientError::BadAnswer {
                what: path,
                detail: format!(
                    "{} hashes for {} ranges, or not hex",
                    answer.hashes.len(),
                    ranges.len()
                ),
            })),
        }
    }

    fn fail_over(&mut self, cycle: u64) -> Result<(), SinkError> {
        let path = format!("/replicas/{}/failover", self.name);
        let request = FailoverRequest { cycle };
        self.client
            .control::<FailoverRequest, serde_json::Value>(Method::POST, &path, Some(&request))
            .map_err(|error| self.remote(error))?;
        Ok(())
    }

    fn resume_at(&mut self, index: u32) {
        if let Some(sending) = &mut self.sending {
            sending.encoder = ChunkEncoder::resume(sending.id, index);
        }
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        self.push_change(change)
    }

    fn room(&self) -> usize {
        self.room_left()
    }

    fn cut(&mut self) -> Result<bool, SinkError> {
        self.cut_chunk()
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        self.with_encoder(|encoder, emit| encoder.cut(&mut &mut *emit))?;
        let Some(sending) = self.sending.take() else {
            return Ok(());
        };
        let path = format!("/replicas/{}/transfers/{:x}/commit", self.name, sending.id);
        let request = CommitRequest {
            chunks: sending.encoder.chunks(),
        };
        self.client
            .control::<_, ReplicaInfo>(Method::POST, &path, Some(&request))
            .map(drop)
            .map_err(|error| self.remote(error))
    }

    fn idle(&mut self) {
        self.client.keep_alive();
    }

    fn remove(&mut self, name: &str) -> Result<(), SinkError> {
        let path = format!("/replicas/{name}");
        match self
            .client
            .control::<(), serde_json::Value>(Method::DELETE, &path, None)
        {
            Ok(_) => Ok(()),
            // Already gone is what was asked for.
            Err(ClientError::Refused { status: 404, .. }) => Ok(()),
            Err(error) => Err(self.remote(error)),
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
}
