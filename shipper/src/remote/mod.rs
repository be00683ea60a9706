//! Shipping to a replica server over the network.
//!
//! [`RemoteSink`] turns transfers into chunks ([`wire::chunk`]), frames them and
//! streams them through the [`crate::pipeline`], and commits; [`client`] speaks the
//! HTTP API; [`relationship`] is the primary's durable record of the relationship;
//! [`throttle`] limits bandwidth, by time of day if [`bandwidth`] says so.
//!
//! Codecs: the replica's answer to each offer says which compressed chunk bodies it
//! decodes, and the transfer's chunks are compressed accordingly
//! ([`Framer::negotiate`]).
//!
//! Resuming: `begin` offers the transfer and learns how many chunks the replica holds;
//! those chunks are encoded again (the records decide chunk boundaries) but neither
//! framed, compressed nor sent, so an interrupted transfer costs at most the chunks in
//! flight.

pub mod bandwidth;
pub mod client;
pub mod relationship;
pub mod throttle;

use std::sync::Arc;

use hyper::Method;
use image_ops::hash::Hash;
use tracker::Change;
use wire::api::{
    ByteRange, CommitRequest, EnableRequest, FailoverRequest, HashAnswer, HashRequest, ReplicaInfo,
    TransferAnswer, TransferKind, TransferOffer,
};
use wire::chunk::{BodyCodec, ChunkEncoder, RawChunk};

use client::Upload;

pub use bandwidth::{BandwidthSchedule, Clock, LocalTime, SystemClock, TimeOfDay, Weekday, Window};
pub use client::{
    ClientError, ClientSettings, Credentials, FailureClass, ReplicaClient, REQUEST_TIMEOUT,
};
pub use relationship::{CopyProgress, Relationship, RelationshipError};
pub use throttle::Throttle;

use crate::pipeline::compress::{Compression, CompressionStatus, Framer};
use crate::pipeline::upload::{LinkMeter, UploadBody};
use crate::resync::Cursor;
use crate::sink::{ChunkFraming, CycleSink, Emit, Resume, SinkError};

/// How chunks are sent.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Whether chunks are compressed.
    pub compression: Compression,
    /// Bandwidth limits that apply (the group's, the daemon's).
    pub throttles: Vec<Arc<Throttle>>,
}

/// The transfer being sent.
#[derive(Debug)]
struct Sending {
    encoder: ChunkEncoder,
    /// Chunks below this index are on the replica already.
    skip_below: u32,
    outgoing: Outgoing,
}

/// Where the transfer's frames go.
#[derive(Debug)]
struct Outgoing {
    id: u64,
    /// The upload of the chunks from `skip_below` on, once the first is framed.
    upload: Option<Upload>,
}

/// Ships transfers to a replica server.
#[derive(Debug)]
pub struct RemoteSink {
    client: ReplicaClient,
    name: String,
    throttles: Vec<Arc<Throttle>>,
    framer: Framer,
    meter: Arc<LinkMeter>,
    sending: Option<Sending>,
}

impl RemoteSink {
    /// A sink for replica `name` (the group's name) through `client`.
    pub fn new(client: ReplicaClient, name: &str, options: RemoteOptions) -> Self {
        RemoteSink {
            client,
            name: name.to_string(),
            throttles: options.throttles,
            framer: Framer::new(options.compression),
            meter: Arc::default(),
            sending: None,
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

    /// Frames `chunk` and queues it on the transfer's upload, starting the upload at
    /// the transfer's first chunk to send.
    fn send(&mut self, outgoing: &mut Outgoing, chunk: RawChunk<'_>) -> Result<(), SinkError> {
        let mut upload = match outgoing.upload.take() {
            Some(upload) => upload,
            None => {
                let (throttles, meter) = (self.throttles.clone(), Arc::clone(&self.meter));
                self.client
                    .start_upload(&self.name, outgoing.id, chunk.index, |queue| {
                        UploadBody::new(queue, throttles, meter)
                    })
                    .map_err(|error| self.remote(error))?
            }
        };
        let slot = self.framer.frame(chunk.into_owned(), &self.meter);
        match self.client.push_frame(&mut upload, slot) {
            Ok(()) => {
                outgoing.upload = Some(upload);
                Ok(())
            }
            Err(error) => {
                // The exchange's own answer says best why it stopped.
                let error = self.client.finish_upload(upload).err().unwrap_or(error);
                Err(self.remote(error))
            }
        }
    }

    /// Ends the transfer's upload, if one started, and checks that the replica holds
    /// every chunk encoded.
    fn finish_upload(&mut self, sending: &mut Sending) -> Result<(), SinkError> {
        let Some(upload) = sending.outgoing.upload.take() else {
            return Ok(());
        };
        let have = self
            .client
            .finish_upload(upload)
            .map_err(|error| self.remote(error))?;
        let sent = sending.encoder.chunks();
        if have != sent {
            return Err(self.remote(ClientError::BadAnswer {
                what: format!("the upload of transfer {:#x}", sending.outgoing.id),
                detail: format!("the replica holds {have} chunks of the {sent} sent"),
            }));
        }
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
        let outgoing = &mut sending.outgoing;
        let result = step(&mut sending.encoder, &mut |chunk: RawChunk<'_>| {
            if chunk.index < skip_below {
                return Ok(());
            }
            self.send(outgoing, chunk)
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
        self.framer.negotiate(answer.decodes(BodyCodec::Zstd));
        self.sending = Some(Sending {
            encoder: ChunkEncoder::new(id),
            skip_below: answer.have_chunks,
            outgoing: Outgoing { id, upload: None },
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
            .map(|text| image_ops::hash::from_hex(text))
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
            sending.encoder = ChunkEncoder::resume(sending.outgoing.id, index);
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
        let Some(mut sending) = self.sending.take() else {
            return Ok(());
        };
        self.finish_upload(&mut sending)?;
        let path = format!(
            "/replicas/{}/transfers/{:x}/commit",
            self.name, sending.outgoing.id
        );
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
        self.meter.total_bytes()
    }

    fn sent_meter(&self) -> Option<Arc<LinkMeter>> {
        Some(Arc::clone(&self.meter))
    }

    fn compression(&self) -> Option<CompressionStatus> {
        Some(self.framer.status())
    }
}
