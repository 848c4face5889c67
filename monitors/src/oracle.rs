//! Oracle Net (TNS) listener probe, with no Oracle client library.
//!
//! Two forms:
//!
//! * `oracle://HOST[:PORT]` pings the listener the way `tnsping` does: a
//!   TNS CONNECT whose connect data is `(CONNECT_DATA=(COMMAND=ping))`. A
//!   live listener answers with a REFUSE packet whose text carries
//!   `(ERR=0)` (and its version as `VSNNUM`).
//! * `oracle://HOST[:PORT]/SERVICE_NAME` asks the listener for a service.
//!   ACCEPT or REDIRECT means the service is registered; a REFUSE carries
//!   the ORA error (12514: the listener does not know the service).
//!
//! No Oracle server can run on the machines this is built on: the packet
//! layout follows python-oracledb's thin driver
//! (`src/oracledb/impl/thin/{packet.pyx,messages/connect.pyx,constants.pxi}`)
//! and Wireshark's TNS dissector (`epan/dissectors/packet-tns.c`), and is
//! tested against a replaying peer, not a live database. See
//! docs/monitors-oracle-process.md.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess};

/// The listener's well-known port.
pub const DEFAULT_PORT: u16 = 1521;

/// TNS header size: length u16, packet checksum u16, type u8, flags u8,
/// header checksum u16 (Wireshark `TNS_HDR_LEN`, python-oracledb
/// `PACKET_HEADER_SIZE`).
pub const HEADER_LEN: usize = 8;

/// Longest connect data sent inside the CONNECT packet; longer data goes
/// in a DATA packet right after it (python-oracledb `TNS_MAX_CONNECT_DATA`;
/// Wireshark: "Long Connect Data is not in the Connect PDU but sent in an
/// immediately following Data PDU").
pub const MAX_CONNECT_DATA_INLINE: usize = 230;

/// Session data unit we offer; also the largest packet we accept before
/// the session is negotiated (python-oracledb's default `TNS_SDU`).
pub const SDU: u16 = 8192;

/// Offset of the connect data from the start of the CONNECT packet: the
/// 8-byte header plus the 66-byte body written by [`encode_connect`]
/// (python-oracledb `messages/connect.pyx` writes the literal 74).
pub const CONNECT_DATA_OFFSET: u16 = 74;

/// Protocol version we ask for (python-oracledb `TNS_VERSION_DESIRED`).
pub const VERSION_DESIRED: u16 = 319;

/// Oldest protocol version we accept (python-oracledb `TNS_VERSION_MINIMUM`).
pub const VERSION_MINIMUM: u16 = 300;

/// From this negotiated version on, packets after ACCEPT carry a 32-bit
/// length in place of length + packet checksum (python-oracledb
/// `TNS_VERSION_MIN_LARGE_SDU`; Wireshark: "Oracle 12c uses checksum bytes
/// as part of the packet length").
pub const VERSION_MIN_LARGE_SDU: u16 = 315;

/// Service options: "don't care" (python-oracledb `TNS_GSO_DONT_CARE`); we
/// do not offer out-of-band breaks, so not `TNS_GSO_CAN_RECV_ATTENTION`.
const SERVICE_OPTIONS: u16 = 0x0001;
/// NT protocol characteristics (python-oracledb `TNS_PROTOCOL_CHARACTERISTICS`).
const PROTOCOL_CHARACTERISTICS: u16 = 0x4f98;
/// NSI flags: supports security renegotiation (0x80) | native network
/// encryption disabled (0x04) (python-oracledb `TNS_NSI_*`).
const NSI_FLAGS: u8 = 0x80 | 0x04;
/// DATA packet flag that ends a session (python-oracledb `TNS_DATA_FLAGS_EOF`).
const DATA_FLAGS_EOF: u16 = 0x0040;
/// How often a RESEND is honoured before the probe gives up.
pub const DEFAULT_MAX_RESENDS: u32 = 3;
/// The tnsping connect data.
pub const PING_CONNECT_DATA: &str = "(CONNECT_DATA=(COMMAND=ping))";
/// ORA-12514: the listener does not know the requested service.
pub const ERR_UNKNOWN_SERVICE: u32 = 12514;
/// ORA-12505: the listener does not know the requested SID.
pub const ERR_UNKNOWN_SID: u32 = 12505;

/// TNS packet types (Wireshark `TNS_TYPE_*`, python-oracledb `TNS_PACKET_TYPE_*`).
pub mod packet_type {
    /// Client → listener: open a session.
    pub const CONNECT: u8 = 1;
    /// Listener → client: session accepted.
    pub const ACCEPT: u8 = 2;
    /// Listener → client: refused, with a text reason.
    pub const REFUSE: u8 = 4;
    /// Listener → client: go to another address.
    pub const REDIRECT: u8 = 5;
    /// Session data.
    pub const DATA: u8 = 6;
    /// Listener → client: send the CONNECT again.
    pub const RESEND: u8 = 11;
    /// Break/reset marker.
    pub const MARKER: u8 = 12;
    /// Control packet.
    pub const CONTROL: u8 = 14;

    /// A name for messages.
    pub fn name(t: u8) -> &'static str {
        match t {
            CONNECT => "CONNECT",
            ACCEPT => "ACCEPT",
            3 => "ACK",
            REFUSE => "REFUSE",
            REDIRECT => "REDIRECT",
            DATA => "DATA",
            7 => "NULL",
            9 => "ABORT",
            RESEND => "RESEND",
            MARKER => "MARKER",
            13 => "ATTENTION",
            CONTROL => "CONTROL",
            15 => "DATA DESCRIPTOR",
            _ => "unknown",
        }
    }
}

/// A TNS packet that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TnsError {
    /// Fewer than 8 bytes where a header was expected.
    #[error("TNS header truncated: {0} of 8 bytes")]
    ShortHeader(usize),
    /// The length field is smaller than the header itself.
    #[error("TNS length field says {0} bytes, less than the 8-byte header")]
    LengthTooSmall(usize),
    /// The length field exceeds what we accept before negotiation.
    #[error("TNS length field says {len} bytes, more than the {max}-byte limit")]
    Oversized {
        /// The length field.
        len: usize,
        /// Our limit (the SDU we offered).
        max: usize,
    },
    /// The buffer ends before the length the header announced.
    #[error("TNS packet truncated: header says {expected} bytes, only {got} present")]
    Truncated {
        /// Length from the header.
        expected: usize,
        /// Bytes available.
        got: usize,
    },
    /// A fixed part of a packet body is missing.
    #[error("{what} packet body too short: {got} bytes, at least {need} needed")]
    BodyTooShort {
        /// Packet type name.
        what: &'static str,
        /// Body bytes present.
        got: usize,
        /// Body bytes needed.
        need: usize,
    },
    /// A data length field points past the end of the packet.
    #[error("{what} data length field says {len} bytes, only {avail} left in the packet")]
    DataOverrun {
        /// Packet type name.
        what: &'static str,
        /// The data length field.
        len: usize,
        /// Bytes left.
        avail: usize,
    },
    /// Connect data too long for a 16-bit length (or not sendable).
    #[error("connect data of {0} bytes is too long for a TNS CONNECT")]
    ConnectDataTooLong(usize),
}

/// A decoded TNS header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Total packet length including the header.
    pub length: usize,
    /// Packet type ([`packet_type`]).
    pub packet_type: u8,
    /// Packet flags (Wireshark calls it the reserved byte).
    pub flags: u8,
}

/// Decodes a header as sent before a session is negotiated: the 16-bit
/// length form (python-oracledb reads every packet up to and including
/// ACCEPT this way; it switches to 32-bit lengths only after ACCEPT). The
/// checksums are ignored, as both references do.
pub fn parse_header(b: &[u8]) -> Result<Header, TnsError> {
    if b.len() < HEADER_LEN {
        return Err(TnsError::ShortHeader(b.len()));
    }
    let length = u16::from_be_bytes([b[0], b[1]]) as usize;
    if length < HEADER_LEN {
        return Err(TnsError::LengthTooSmall(length));
    }
    if length > SDU as usize {
        return Err(TnsError::Oversized { len: length, max: SDU as usize });
    }
    Ok(Header { length, packet_type: b[4], flags: b[5] })
}

/// One TNS packet: type, flags and the body after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Packet type ([`packet_type`]).
    pub packet_type: u8,
    /// Header flags.
    pub flags: u8,
    /// The bytes after the 8-byte header.
    pub body: Vec<u8>,
}

/// Decodes the first packet in `b`; returns it and the bytes it used.
pub fn parse_packet(b: &[u8]) -> Result<(Packet, usize), TnsError> {
    let h = parse_header(b)?;
    if b.len() < h.length {
        return Err(TnsError::Truncated { expected: h.length, got: b.len() });
    }
    Ok((Packet { packet_type: h.packet_type, flags: h.flags, body: b[HEADER_LEN..h.length].to_vec() }, h.length))
}

/// What the listener said in one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The session was accepted.
    Accept {
        /// Negotiated protocol version.
        version: u16,
        /// Service options.
        service_options: u16,
        /// SDU (16-bit field).
        sdu: u16,
    },
    /// Refused; `data` is the listener's text, e.g.
    /// `(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=0)(ALIAS=LISTENER))`.
    Refuse {
        /// User reason byte.
        user_reason: u8,
        /// System reason byte.
        system_reason: u8,
        /// The refuse text.
        data: String,
    },
    /// Go elsewhere. `data` is `None` when the text follows in a DATA
    /// packet (python-oracledb reads it from the next packet).
    Redirect {
        /// Announced redirect data length.
        len: usize,
        /// The redirect text, when it is inside this packet.
        data: Option<String>,
    },
    /// Send the CONNECT again.
    Resend,
    /// Session data (body after the 2-byte data flags).
    Data {
        /// Data flags.
        flags: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Any other type.
    Other(u8),
}

/// Decodes a listener packet's body.
pub fn decode_reply(p: &Packet) -> Result<Reply, TnsError> {
    let b = &p.body;
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    match p.packet_type {
        packet_type::ACCEPT => {
            // Wireshark dissect_tns_accept: version u16, service options u16,
            // SDU u16, TDU u16, value of one u16, data length u16, data
            // offset u16, connect flags u8 ×2 = 18 fixed bytes.
            const NEED: usize = 18;
            if b.len() < NEED {
                return Err(TnsError::BodyTooShort { what: "ACCEPT", got: b.len(), need: NEED });
            }
            Ok(Reply::Accept { version: u16_at(0), service_options: u16_at(2), sdu: u16_at(4) })
        }
        packet_type::REFUSE => {
            // Wireshark dissect_tns_refuse / python-oracledb _receive_packet:
            // user reason u8, system reason u8, data length u16, data.
            if b.len() < 4 {
                return Err(TnsError::BodyTooShort { what: "REFUSE", got: b.len(), need: 4 });
            }
            let len = u16_at(2) as usize;
            let avail = b.len() - 4;
            if len > avail {
                return Err(TnsError::DataOverrun { what: "REFUSE", len, avail });
            }
            Ok(Reply::Refuse {
                user_reason: b[0],
                system_reason: b[1],
                data: String::from_utf8_lossy(&b[4..4 + len]).into_owned(),
            })
        }
        packet_type::REDIRECT => {
            // Wireshark dissect_tns_redirect: data length u16, data. Modern
            // listeners send the data in a following DATA packet
            // (python-oracledb ConnectMessage.process waits for it).
            if b.len() < 2 {
                return Err(TnsError::BodyTooShort { what: "REDIRECT", got: b.len(), need: 2 });
            }
            let len = u16_at(0) as usize;
            let avail = b.len() - 2;
            let data = if avail == 0 {
                None
            } else if len > avail {
                return Err(TnsError::DataOverrun { what: "REDIRECT", len, avail });
            } else {
                Some(String::from_utf8_lossy(&b[2..2 + len]).into_owned())
            };
            Ok(Reply::Redirect { len, data })
        }
        packet_type::RESEND => Ok(Reply::Resend),
        packet_type::DATA => {
            if b.len() < 2 {
                return Err(TnsError::BodyTooShort { what: "DATA", got: b.len(), need: 2 });
            }
            Ok(Reply::Data { flags: u16_at(0), payload: b[2..].to_vec() })
        }
        t => Ok(Reply::Other(t)),
    }
}

fn header(buf: &mut Vec<u8>, len: usize, ptype: u8) {
    // 16-bit form: length, packet checksum 0, type, flags 0, header checksum 0.
    buf.extend_from_slice(&(len as u16).to_be_bytes());
    buf.extend_from_slice(&[0, 0, ptype, 0, 0, 0]);
}

/// Encodes the CONNECT for `connect_data`: one packet when the data fits
/// in [`MAX_CONNECT_DATA_INLINE`] bytes, else the CONNECT (announcing the
/// length, carrying no data) and a DATA packet with the data.
///
/// Field order follows python-oracledb `messages/connect.pyx`
/// (`ConnectMessage.send`) and Wireshark `dissect_tns_connect`.
pub fn encode_connect(connect_data: &[u8]) -> Result<Vec<Vec<u8>>, TnsError> {
    let n = connect_data.len();
    // The DATA follow-up must fit our own SDU too (header + data flags).
    if n > SDU as usize - HEADER_LEN - 2 {
        return Err(TnsError::ConnectDataTooLong(n));
    }
    let inline = n <= MAX_CONNECT_DATA_INLINE;
    let total = CONNECT_DATA_OFFSET as usize + if inline { n } else { 0 };
    let mut p = Vec::with_capacity(total);
    header(&mut p, total, packet_type::CONNECT);
    p.extend_from_slice(&VERSION_DESIRED.to_be_bytes()); // version
    p.extend_from_slice(&VERSION_MINIMUM.to_be_bytes()); // version (compatible)
    p.extend_from_slice(&SERVICE_OPTIONS.to_be_bytes()); // service options
    p.extend_from_slice(&SDU.to_be_bytes()); // session data unit size
    p.extend_from_slice(&SDU.to_be_bytes()); // maximum transmission data unit size (python-oracledb sends the SDU)
    p.extend_from_slice(&PROTOCOL_CHARACTERISTICS.to_be_bytes()); // NT protocol characteristics
    p.extend_from_slice(&0u16.to_be_bytes()); // line turnaround value
    p.extend_from_slice(&1u16.to_be_bytes()); // value of 1 in hardware (byte order probe)
    p.extend_from_slice(&(n as u16).to_be_bytes()); // length of connect data
    p.extend_from_slice(&CONNECT_DATA_OFFSET.to_be_bytes()); // offset to connect data
    p.extend_from_slice(&0u32.to_be_bytes()); // maximum receivable connect data
    p.push(NSI_FLAGS); // connect flags 0
    p.push(NSI_FLAGS); // connect flags 1
    p.extend_from_slice(&[0u8; 24]); // trace cross facility items 1 and 2, trace unique connection id (obsolete, zero)
    p.extend_from_slice(&(SDU as u32).to_be_bytes()); // SDU (32-bit)
    p.extend_from_slice(&(SDU as u32).to_be_bytes()); // TDU (32-bit)
    p.extend_from_slice(&0u32.to_be_bytes()); // connect flags 1 (32-bit)
    p.extend_from_slice(&0u32.to_be_bytes()); // connect flags 2 (32-bit; no out-of-band check)
    debug_assert_eq!(p.len(), CONNECT_DATA_OFFSET as usize);
    if inline {
        p.extend_from_slice(connect_data);
        return Ok(vec![p]);
    }
    let dlen = HEADER_LEN + 2 + n;
    let mut d = Vec::with_capacity(dlen);
    header(&mut d, dlen, packet_type::DATA);
    d.extend_from_slice(&0u16.to_be_bytes()); // data flags
    d.extend_from_slice(connect_data);
    Ok(vec![p, d])
}

/// The DATA packet with the EOF flag that ends an accepted session
/// politely (python-oracledb `_disconnect`), framed for the negotiated
/// `version`: 32-bit length from [`VERSION_MIN_LARGE_SDU`] on.
pub fn encode_eof(version: u16) -> Vec<u8> {
    let len = HEADER_LEN + 2;
    let mut p = Vec::with_capacity(len);
    if version >= VERSION_MIN_LARGE_SDU {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[packet_type::DATA, 0, 0, 0]);
    } else {
        header(&mut p, len, packet_type::DATA);
    }
    p.extend_from_slice(&DATA_FLAGS_EOF.to_be_bytes());
    p
}

/// The value of `(KEY=value)` in a listener's text, ASCII case-insensitive
/// on the key; `None` when the key is absent.
pub fn descriptor_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("({}=", key.to_ascii_uppercase());
    let upper = text.to_ascii_uppercase();
    let start = upper.find(&needle)? + needle.len();
    let end = text[start..].find(')')? + start;
    Some(&text[start..end])
}

/// The `ERR` code in a refuse text: `None` when absent, `Err` with the raw
/// value when it is not a number.
pub fn refuse_error_code(text: &str) -> Option<Result<u32, String>> {
    let v = descriptor_value(text, "ERR")?;
    Some(v.trim().parse::<u32>().map_err(|_| v.to_string()))
}

/// What the listener errors a probe meets mean (Oracle Database Error
/// Messages, TNS-12500…).
pub fn error_meaning(code: u32) -> Option<&'static str> {
    Some(match code {
        12500 => "listener failed to start a dedicated server process",
        12502 => "listener received no CONNECT_DATA from client",
        12504 => "listener was not given the SERVICE_NAME in CONNECT_DATA",
        12505 => "listener does not currently know of SID given in connect descriptor",
        12508 => "listener could not resolve the COMMAND given",
        12510 => "database temporarily lacks resources to handle the request",
        12511 => "service handler found but it is not accepting connections",
        12514 => "listener does not currently know of service requested in connect descriptor",
        12516 => "listener could not find available handler with matching protocol stack",
        12518 => "listener could not hand off client connection",
        12519 => "no appropriate service handler found",
        12520 => "listener could not find available handler for requested type of server",
        12521 => "listener does not currently know of instance requested in connect descriptor",
        12526 => "all appropriate instances are in restricted mode",
        12527 => "all instances are in restricted mode or blocking new connections",
        12528 => "all appropriate instances are blocking new connections",
        12529 => "connect request rejected based on current filtering rules",
        _ => return None,
    })
}

/// Oracle's packed version number (`VSNNUM`) as `a.b.c.d.e`: 8 bits
/// major, 4 maintenance, 8 application server, 4 component, 8 platform.
pub fn vsnnum_to_version(n: u32) -> String {
    format!("{}.{}.{}.{}.{}", n >> 24, (n >> 20) & 0xf, (n >> 12) & 0xff, (n >> 8) & 0xf, n & 0xff)
}

/// `oracle://HOST[:PORT][/SERVICE_NAME]`: a tnsping-style listener ping, or
/// a check that the listener knows the service.
#[derive(Debug, Clone)]
pub struct OracleProbe {
    host: String,
    port: u16,
    service: Option<String>,
    /// The path names an instance SID rather than a service name.
    sid: bool,
    max_resends: u32,
    connect_data: String,
}

impl OracleProbe {
    /// The connect data this probe sends.
    pub fn connect_data(&self) -> &str {
        &self.connect_data
    }
}

fn valid_service(s: &str) -> bool {
    // Oracle service names: letters, digits, and _ . # $ - (domain parts
    // joined by dots). Anything else could break out of the descriptor.
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.#$-".contains(&c))
}

fn cid_value(raw: &str) -> String {
    // Bounded so that a short service name on a plain address stays within
    // the inline CONNECT data limit; descriptor metacharacters dropped.
    let v: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(48).collect();
    if v.is_empty() { "unknown".into() } else { v }
}

fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn local_user_name() -> String {
    // From the environment rather than NSS: a name-service lookup could
    // block on LDAP, and this is only informational for the listener log.
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid().as_raw()))
}

/// Builds an [`OracleProbe`] from a spec. Options: `max_resends` (how many
/// RESEND answers are honoured, default 3) and `sid` (the path is an
/// instance SID, sent as `(SID=…)`, not a service name).
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let host = ctx.host()?;
    let port = ctx.port_or(DEFAULT_PORT);
    let url = ctx.url();
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SpecError::Target {
            target: crate::spec::redact_url(url),
            why: "the Oracle probe only talks to the listener and never logs in; remove the user from the URL".into(),
        });
    }
    if host.bytes().any(|c| b"()=".contains(&c)) {
        return Err(SpecError::Target {
            target: url.to_string(),
            why: "the host name contains ( ) or =, which would break the connect descriptor".into(),
        });
    }
    let path = url.path().trim_start_matches('/');
    let service = if path.is_empty() {
        None
    } else if !valid_service(path) {
        return Err(SpecError::Target {
            target: url.to_string(),
            why: format!(
                "{path:?} is not an Oracle service name (1-255 of A-Z a-z 0-9 _ . # $ -); \
                 use oracle://HOST[:PORT]/SERVICE_NAME, or oracle://HOST[:PORT] to ping the listener"
            ),
        });
    } else {
        Some(path.to_string())
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Err(SpecError::Target {
            target: url.to_string(),
            why: "oracle:// takes no query or fragment; pass options separately".into(),
        });
    }
    let max_resends = ctx.opt_parse::<u32>("max_resends")?.unwrap_or(DEFAULT_MAX_RESENDS);
    if max_resends > 20 {
        return Err(SpecError::BadOption {
            key: "max_resends".into(),
            value: max_resends.to_string(),
            why: "expected 0..=20".into(),
        });
    }
    let sid = ctx.opt_bool("sid", false)?;
    if sid && service.is_none() {
        return Err(SpecError::BadOption {
            key: "sid".into(),
            value: "true".into(),
            why: "give the SID in the URL path: oracle://HOST[:PORT]/SID".into(),
        });
    }
    let key = if sid { "SID" } else { "SERVICE_NAME" };
    let connect_data = match &service {
        None => PING_CONNECT_DATA.to_string(),
        Some(svc) => format!(
            "(DESCRIPTION=(CONNECT_DATA=({key}={svc})(CID=(PROGRAM=tandem)(HOST={})(USER={})))\
             (ADDRESS=(PROTOCOL=TCP)(HOST={host})(PORT={port})))",
            cid_value(&local_host_name()),
            cid_value(&local_user_name()),
        ),
    };
    Ok(Box::new(OracleProbe { host, port, service, sid, max_resends, connect_data }))
}

fn protocol(e: TnsError) -> ProbeFailure {
    ProbeFailure::critical(FailureClass::Protocol, format!("listener broke the TNS protocol: {e}"))
}

fn excerpt(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Reads exactly `buf.len()` bytes; EOF is a protocol failure.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    deadline: Deadline,
    stage: &str,
    already: usize,
    total: usize,
) -> Result<(), ProbeFailure> {
    let mut got = 0;
    while got < buf.len() {
        let n = deadline.run(stage, r.read(&mut buf[got..])).await?.map_err(|e| crate::line::io_failure(e, stage))?;
        if n == 0 {
            let have = already + got;
            return Err(ProbeFailure::critical(
                FailureClass::Protocol,
                if have == 0 {
                    format!("listener closed the connection without answering ({stage})")
                } else {
                    format!("listener closed the connection after {have} of {total} bytes of a TNS packet ({stage})")
                },
            ));
        }
        got += n;
    }
    Ok(())
}

/// Reads one packet (16-bit length framing, bounded by [`SDU`]).
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R, deadline: Deadline, stage: &str) -> Result<Packet, ProbeFailure> {
    let mut hdr = [0u8; HEADER_LEN];
    read_full(r, &mut hdr, deadline, stage, 0, HEADER_LEN).await?;
    let h = parse_header(&hdr).map_err(protocol)?;
    let mut body = vec![0u8; h.length - HEADER_LEN];
    read_full(r, &mut body, deadline, stage, HEADER_LEN, h.length).await?;
    Ok(Packet { packet_type: h.packet_type, flags: h.flags, body })
}

async fn send_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    packets: &[Vec<u8>],
    deadline: Deadline,
) -> Result<(), ProbeFailure> {
    for p in packets {
        deadline
            .run("sending the TNS CONNECT", w.write_all(p))
            .await?
            .map_err(|e| crate::line::io_failure(e, "sending the TNS CONNECT"))?;
    }
    Ok(())
}

impl OracleProbe {
    /// "service X" or "SID X", for messages.
    fn subject(&self, name: &str) -> String {
        format!("{} {name}", if self.sid { "SID" } else { "service" })
    }

    fn refused(&self, code: u32) -> ProbeFailure {
        let meaning = error_meaning(code).unwrap_or("unknown listener error");
        let msg = match (&self.service, code) {
            (Some(svc), ERR_UNKNOWN_SERVICE | ERR_UNKNOWN_SID) => {
                format!("{} not registered (ORA-{code}: {meaning})", self.subject(svc))
            }
            (Some(svc), _) => format!("listener refused {}: ORA-{code}: {meaning}", self.subject(svc)),
            (None, _) => format!("listener answered the ping with ORA-{code}: {meaning}"),
        };
        ProbeFailure::critical(FailureClass::UnexpectedAnswer, msg)
    }

    async fn run(&self, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let mut s = crate::tcp::connect(&self.host, self.port, deadline).await?;
        let packets = encode_connect(self.connect_data.as_bytes()).map_err(protocol)?;
        let stage = "waiting for the listener's answer to CONNECT";
        let mut resends = 0;
        let reply = loop {
            send_all(&mut s, &packets, deadline).await?;
            let p = read_packet(&mut s, deadline, stage).await?;
            match decode_reply(&p).map_err(protocol)? {
                Reply::Resend if resends < self.max_resends => resends += 1,
                Reply::Resend => {
                    return Err(ProbeFailure::critical(
                        FailureClass::Protocol,
                        format!("listener asked to resend the CONNECT more than {} times", self.max_resends),
                    ));
                }
                r => break r,
            }
        };
        match (&self.service, reply) {
            (None, Reply::Refuse { data, .. }) => match refuse_error_code(&data) {
                Some(Ok(0)) => {
                    let alias = descriptor_value(&data, "ALIAS").filter(|a| !a.is_empty()).unwrap_or("listener");
                    let version = descriptor_value(&data, "VSNNUM")
                        .and_then(|v| v.trim().parse::<u32>().ok())
                        .map(|v| format!(", version {}", vsnnum_to_version(v)))
                        .unwrap_or_default();
                    Ok(ProbeSuccess::new(format!(
                        "TNS listener {} on {}:{} answered ping (ERR=0{version})",
                        excerpt(alias),
                        self.host,
                        self.port
                    )))
                }
                Some(Ok(code)) => Err(self.refused(code)),
                Some(Err(raw)) => Err(ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("listener's ping answer has a non-numeric ERR={:?}", excerpt(&raw)),
                )),
                None => Err(ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("listener's ping answer has no ERR code: {:?}", excerpt(&data)),
                )),
            },
            (Some(svc), Reply::Accept { version, .. }) => {
                // Close politely: a DATA packet with the EOF flag, bounded
                // so a stuck peer cannot spend the probe's deadline.
                let close = async {
                    let _ = s.write_all(&encode_eof(version)).await;
                    let _ = s.shutdown().await;
                };
                let _ = tokio::time::timeout(deadline.remaining().min(Duration::from_millis(500)), close).await;
                Ok(ProbeSuccess::new(format!(
                    "{} registered (ACCEPT, TNS protocol version {version})",
                    self.subject(svc)
                )))
            }
            (Some(svc), Reply::Redirect { len, data }) => {
                let text = match data {
                    Some(t) => t,
                    None => {
                        let p = read_packet(&mut s, deadline, "waiting for the REDIRECT data").await?;
                        match decode_reply(&p).map_err(protocol)? {
                            Reply::Data { payload, .. } if payload.len() >= len => {
                                String::from_utf8_lossy(&payload[..len]).into_owned()
                            }
                            Reply::Data { payload, .. } => {
                                return Err(ProbeFailure::critical(
                                    FailureClass::Protocol,
                                    format!(
                                        "REDIRECT announced {len} bytes of data, the DATA packet carries {}",
                                        payload.len()
                                    ),
                                ));
                            }
                            other => {
                                return Err(ProbeFailure::critical(
                                    FailureClass::Protocol,
                                    format!(
                                        "expected the REDIRECT data in a DATA packet, got {}",
                                        packet_type::name(reply_type(&other))
                                    ),
                                ));
                            }
                        }
                    }
                };
                // Redirect data is "ADDRESS\0CONNECT_DATA" (python-oracledb
                // _connect_phase_one); report only the address.
                let address = text.split('\0').next().unwrap_or_default();
                Ok(ProbeSuccess::new(format!(
                    "{} registered (listener redirects to {})",
                    self.subject(svc),
                    excerpt(address)
                )))
            }
            (Some(svc), Reply::Refuse { data, .. }) => match refuse_error_code(&data) {
                Some(Ok(0)) => Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    format!("listener refused {} without an error code (ERR=0)", self.subject(svc)),
                )),
                Some(Ok(code)) => Err(self.refused(code)),
                Some(Err(raw)) => Err(ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("listener's REFUSE has a non-numeric ERR={:?}", excerpt(&raw)),
                )),
                None => Err(ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("listener's REFUSE has no ERR code: {:?}", excerpt(&data)),
                )),
            },
            (_, other) => Err(ProbeFailure::critical(
                FailureClass::Protocol,
                format!(
                    "unexpected {} packet (type {}) in answer to {}",
                    packet_type::name(reply_type(&other)),
                    reply_type(&other),
                    if self.service.is_some() { "CONNECT" } else { "a ping" }
                ),
            )),
        }
    }
}

fn reply_type(r: &Reply) -> u8 {
    match r {
        Reply::Accept { .. } => packet_type::ACCEPT,
        Reply::Refuse { .. } => packet_type::REFUSE,
        Reply::Redirect { .. } => packet_type::REDIRECT,
        Reply::Resend => packet_type::RESEND,
        Reply::Data { .. } => packet_type::DATA,
        Reply::Other(t) => *t,
    }
}

impl Probe for OracleProbe {
    fn kind(&self) -> &'static str {
        "oracle"
    }

    fn target(&self) -> String {
        match &self.service {
            Some(s) if self.sid => format!("oracle://{}:{}/{s} (SID)", self.host, self.port),
            Some(s) => format!("oracle://{}:{}/{s}", self.host, self.port),
            None => format!("oracle://{}:{}", self.host, self.port),
        }
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(self.run(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_body_is_66_bytes_and_offset_points_at_data() {
        let ps = encode_connect(PING_CONNECT_DATA.as_bytes()).unwrap();
        assert_eq!(ps.len(), 1);
        let p = &ps[0];
        assert_eq!(p.len(), 74 + PING_CONNECT_DATA.len());
        assert_eq!(u16::from_be_bytes([p[0], p[1]]) as usize, p.len());
        assert_eq!(&p[74..], PING_CONNECT_DATA.as_bytes());
    }

    #[test]
    fn long_connect_data_goes_to_a_data_packet() {
        assert_eq!(encode_connect(&[b'x'; 230]).unwrap().len(), 1, "230 bytes still fit inline");
        let data = vec![b'x'; 231];
        let ps = encode_connect(&data).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].len(), 74);
        assert_eq!(u16::from_be_bytes([ps[0][24], ps[0][25]]), 231);
        assert_eq!(ps[1][4], packet_type::DATA);
        assert_eq!(&ps[1][10..], &data[..]);
        assert!(encode_connect(&vec![b'x'; 9000]).is_err());
    }

    #[test]
    fn vsnnum_decoding() {
        assert_eq!(vsnnum_to_version(318767104), "19.0.0.0.0");
        assert_eq!(vsnnum_to_version(186647040), "11.2.0.2.0");
    }

    #[test]
    fn err_code_extraction() {
        let t = "(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=0)(ALIAS=LISTENER))";
        assert_eq!(refuse_error_code(t), Some(Ok(0)));
        assert_eq!(descriptor_value(t, "alias"), Some("LISTENER"));
        assert_eq!(refuse_error_code("(ERR=x1)"), Some(Err("x1".into())));
        assert_eq!(refuse_error_code("(DESCRIPTION=)"), None);
        assert_eq!(refuse_error_code("(ERR=12"), None);
    }
}
