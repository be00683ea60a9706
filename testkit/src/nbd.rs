//! A deliberately small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one
//! request in flight) for test writers that must know exactly which requests were
//! acknowledged, and for raw protocol probes no stock client can send.
//!
//! Errors: `Error::Server(errno)` is an error reply (the connection is still usable);
//! `Error::Io` means the connection is gone or broken.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The greeting's magic, "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// The newstyle magic, "IHAVEOPT", in the greeting and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag (and client flag): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag (and client flag): no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;

/// NBD_OPT_EXPORT_NAME.
pub const OPT_EXPORT_NAME: u32 = 1;
/// NBD_OPT_ABORT.
pub const OPT_ABORT: u32 = 2;
/// NBD_OPT_GO.
pub const OPT_GO: u32 = 7;
/// NBD_REP_ACK.
pub const REP_ACK: u32 = 1;
/// NBD_REP_INFO.
pub const REP_INFO: u32 = 3;
/// NBD_INFO_EXPORT.
pub const INFO_EXPORT: u16 = 0;
/// NBD_INFO_BLOCK_SIZE.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// NBD_CMD_READ.
pub const CMD_READ: u16 = 0;
/// NBD_CMD_WRITE.
pub const CMD_WRITE: u16 = 1;
/// NBD_CMD_DISC.
pub const CMD_DISC: u16 = 2;
/// NBD_CMD_FLUSH.
pub const CMD_FLUSH: u16 = 3;
/// NBD_CMD_TRIM.
pub const CMD_TRIM: u16 = 4;
/// NBD_CMD_WRITE_ZEROES.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// NBD_CMD_FLAG_FUA.
pub const CMD_FLAG_FUA: u16 = 1;
/// NBD_CMD_FLAG_NO_HOLE.
pub const CMD_FLAG_NO_HOLE: u16 = 2;

/// Transmission flag NBD_FLAG_READ_ONLY.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag NBD_FLAG_SEND_FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag NBD_FLAG_SEND_FUA.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag NBD_FLAG_SEND_TRIM.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag NBD_FLAG_SEND_WRITE_ZEROES.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag NBD_FLAG_CAN_MULTI_CONN.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// NBD errno EPERM.
pub const EPERM: u32 = 1;
/// NBD errno EIO.
pub const EIO: u32 = 5;
/// NBD errno EINVAL.
pub const EINVAL: u32 = 22;
/// NBD errno ENOSPC.
pub const ENOSPC: u32 = 28;
/// NBD errno EOVERFLOW.
pub const EOVERFLOW: u32 = 75;

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// The server answered with this NBD errno; the connection stays usable.
    Server(u32),
    /// Transport or protocol failure; the connection is unusable.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Server(e) => write!(f, "server replied with NBD error {e}"),
            Error::Io(e) => write!(f, "connection error: {e}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// The result of a request.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn proto_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One NBD connection in the transmission phase.
#[derive(Debug)]
pub struct Conn {
    s: Stream,
    /// The export's name.
    pub export: String,
    /// The export's size in bytes.
    pub size: u64,
    /// The transmission flags the server sent.
    pub tflags: u16,
    /// NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum) if the server sent it.
    pub block_size: Option<(u32, u32, u32)>,
    cookie: u64,
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);

impl Conn {
    /// Enters transmission on `export` over the unix socket `path` with NBD_OPT_GO.
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<Conn> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Conn::handshake(Stream::Unix(s), export)
    }

    /// Enters transmission with the old NBD_OPT_EXPORT_NAME option (as nbd-client
    /// and old clients do), with or without NBD_FLAG_C_NO_ZEROES.
    pub fn connect_unix_export_name(
        path: &Path,
        export: &str,
        no_zeroes: bool,
    ) -> io::Result<Conn> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut b = [0u8; 18];
        s.read_exact(&mut b)?;
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("server does not offer fixed newstyle".into()));
        }
        let nz = no_zeroes && hflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | if nz { FLAG_NO_ZEROES } else { 0 });
        s.write_all(&cflags.to_be_bytes())?;
        let name = export.as_bytes();
        let mut req = Vec::new();
        req.extend_from_slice(&IHAVEOPT.to_be_bytes());
        req.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        req.extend_from_slice(&u32::try_from(name.len()).expect("len").to_be_bytes());
        req.extend_from_slice(name);
        s.write_all(&req)?;
        let mut r = vec![0u8; if nz { 10 } else { 134 }];
        s.read_exact(&mut r)?;
        if !nz && r[10..].iter().any(|&z| z != 0) {
            return Err(proto_err(
                "NBD_OPT_EXPORT_NAME reply padding is not 124 zero bytes".into(),
            ));
        }
        let size = u64::from_be_bytes(r[0..8].try_into().expect("8"));
        let tflags = u16::from_be_bytes([r[8], r[9]]);
        Ok(Conn {
            s: Stream::Unix(s),
            export: export.to_string(),
            size,
            tflags,
            block_size: None,
            cookie: 0,
        })
    }

    /// Enters transmission on `export` over TCP to `addr` with NBD_OPT_GO.
    pub fn connect_tcp(addr: &str, export: &str) -> io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Conn::handshake(Stream::Tcp(s), export)
    }

    fn handshake(mut s: Stream, export: &str) -> io::Result<Conn> {
        let mut b = [0u8; 18];
        s.read_exact(&mut b)?;
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8"));
        let opt = u64::from_be_bytes(b[8..16].try_into().expect("8"));
        let hflags = u16::from_be_bytes(b[16..18].try_into().expect("2"));
        if magic != NBD_MAGIC || opt != IHAVEOPT {
            return Err(proto_err(format!("bad greeting magic {magic:#x} {opt:#x}")));
        }
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("server does not offer fixed newstyle".into()));
        }
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
        s.write_all(&cflags.to_be_bytes())?;

        let name = export.as_bytes();
        // Ask for NBD_INFO_BLOCK_SIZE: we honour the block size constraints (all our
        // requests are 4 KiB aligned) and exports opened with O_DIRECT require it.
        let mut req = Vec::with_capacity(16 + 8 + name.len());
        req.extend_from_slice(&IHAVEOPT.to_be_bytes());
        req.extend_from_slice(&OPT_GO.to_be_bytes());
        req.extend_from_slice(
            &u32::try_from(4 + name.len() + 4)
                .expect("len")
                .to_be_bytes(),
        );
        req.extend_from_slice(&u32::try_from(name.len()).expect("len").to_be_bytes());
        req.extend_from_slice(name);
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        s.write_all(&req)?;

        let mut export_info: Option<(u64, u16)> = None;
        let mut block_size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
            let ropt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
            let rtype = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            if magic != REPLY_MAGIC || ropt != OPT_GO {
                return Err(proto_err(format!(
                    "bad option reply header magic {magic:#x} opt {ropt}"
                )));
            }
            if len > 1 << 20 {
                return Err(proto_err(format!("option reply too long ({len})")));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            if rtype & 0x8000_0000 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "NBD_OPT_GO for export {export:?} refused (reply type {rtype:#x}): {}",
                        String::from_utf8_lossy(&data)
                    ),
                ));
            }
            match rtype {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                        if data.len() != 12 {
                            return Err(proto_err(format!(
                                "NBD_INFO_EXPORT of length {}",
                                data.len()
                            )));
                        }
                        let size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                        let tf = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, tf));
                    } else if data.len() == 14
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_BLOCK_SIZE
                    {
                        let w =
                            |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().expect("4"));
                        block_size = Some((w(2), w(6), w(10)));
                    }
                }
                other => return Err(proto_err(format!("unexpected option reply type {other}"))),
            }
        }
        let (size, tflags) = export_info
            .ok_or_else(|| proto_err("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()))?;
        Ok(Conn {
            s,
            export: export.to_string(),
            size,
            tflags,
            block_size,
            cookie: 0,
        })
    }

    fn send(
        &mut self,
        flags: u16,
        typ: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&typ.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.s.write_all(&req)?;
        Ok(self.cookie)
    }

    /// Reads a simple reply header for `cookie`; returns the errno.
    fn reply(&mut self, cookie: u64) -> io::Result<u32> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        let err = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let c = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!("bad reply magic {magic:#x}")));
        }
        if c != cookie {
            return Err(proto_err(format!(
                "reply for cookie {c}, expected {cookie}"
            )));
        }
        Ok(err)
    }

    /// Sends any request and waits for its simple reply. A READ's payload is read
    /// (and returned) only when the reply has no error.
    pub fn raw(
        &mut self,
        flags: u16,
        typ: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        let c = self.send(flags, typ, offset, len, payload)?;
        let err = self.reply(c)?;
        if err != 0 {
            return Err(Error::Server(err));
        }
        let mut data = Vec::new();
        if typ == CMD_READ {
            data.resize(len as usize, 0);
            self.s.read_exact(&mut data)?;
        }
        Ok(data)
    }

    /// NBD_CMD_READ of `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.raw(0, CMD_READ, offset, len, &[])
    }

    /// NBD_CMD_WRITE of `data` at `offset`, with FUA if asked.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).expect("write length fits u32");
        self.raw(flags, CMD_WRITE, offset, len, data).map(|_| ())
    }

    /// NBD_CMD_WRITE_ZEROES (NO_HOLE unless `may_trim`, FUA if asked).
    pub fn write_zeroes(&mut self, offset: u64, len: u32, may_trim: bool, fua: bool) -> Result<()> {
        let mut flags = if fua { CMD_FLAG_FUA } else { 0 };
        if !may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        self.raw(flags, CMD_WRITE_ZEROES, offset, len, &[])
            .map(|_| ())
    }

    /// NBD_CMD_TRIM.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        self.raw(0, CMD_TRIM, offset, len, &[]).map(|_| ())
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> Result<()> {
        self.raw(0, CMD_FLUSH, 0, 0, &[]).map(|_| ())
    }

    /// Reads the whole export in 1 MiB requests.
    pub fn read_all(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(usize::try_from(self.size).expect("size"));
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(1 << 20);
            v.extend_from_slice(&self.read(off, u32::try_from(n).expect("n"))?);
            off += n;
        }
        Ok(v)
    }

    /// NBD_CMD_DISC and close (errors ignored).
    pub fn disconnect(mut self) {
        let _ = self.send(0, CMD_DISC, 0, 0, &[]);
    }
}
