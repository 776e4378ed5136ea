//! Pure encode/decode of the messages a physical replication client exchanges. No I/O here:
//! [`decode_frame`] takes bytes already read from the socket, the encoders append to a buffer.
//!
//! Frontend frames are built with `postgres_protocol::message::frontend`; backend frames are
//! decoded here because `postgres_protocol`'s parser has no CopyBothResponse (`W`) and consumes the
//! frame before failing on it. Layouts: `proto-notes/replication-protocol.md`.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wal::Lsn;

/// Largest backend frame accepted. Walsender messages are at most 128 KiB + 25 bytes; result rows
/// carrying history files and error texts are small. A larger length means a corrupt stream.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("server sent a {len}-byte message with tag {tag:?}, larger than the {MAX_FRAME}-byte limit (corrupt stream?)")]
    FrameTooLarge { tag: char, len: usize },
    #[error("malformed {what} message from the server: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("unexpected message tag {0:?} from the server")]
    UnknownTag(char),
}

fn malformed(what: &'static str, detail: impl Into<String>) -> CodecError {
    CodecError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// Authentication requests (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Kerberos, GSS, SSPI and others walagent does not speak.
    Unsupported(i32),
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNotice {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.severity, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        write!(f, " [SQLSTATE {}]", self.code)
    }
}

/// The backend messages walagent handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication(AuthRequest),
    ParameterStatus {
        name: String,
        value: String,
    },
    BackendKeyData {
        pid: i32,
        key: i32,
    },
    ReadyForQuery(u8),
    RowDescription(Vec<String>),
    DataRow(Vec<Option<Bytes>>),
    CommandComplete(String),
    EmptyQueryResponse,
    Error(ServerNotice),
    Notice(ServerNotice),
    CopyBothResponse,
    CopyOutResponse,
    CopyInResponse,
    CopyData(Bytes),
    CopyDone,
    /// NegotiateProtocolVersion, NotificationResponse and other messages that need no action.
    Ignored(u8),
}

/// Takes one whole frame off the front of `buf`, or returns `Ok(None)` when more bytes are needed.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<BackendMessage>, CodecError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(malformed("frame", format!("length {len} below 4")));
    }
    if len > MAX_FRAME {
        return Err(CodecError::FrameTooLarge {
            tag: tag as char,
            len,
        });
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    decode_body(tag, body).map(Some)
}

fn decode_body(tag: u8, mut body: Bytes) -> Result<BackendMessage, CodecError> {
    Ok(match tag {
        b'd' => BackendMessage::CopyData(body),
        b'c' => BackendMessage::CopyDone,
        b'R' => BackendMessage::Authentication(decode_auth(&mut body)?),
        b'S' => {
            let name = take_cstr(&mut body, "ParameterStatus")?;
            let value = take_cstr(&mut body, "ParameterStatus")?;
            BackendMessage::ParameterStatus { name, value }
        }
        b'K' => {
            need(&body, 8, "BackendKeyData")?;
            BackendMessage::BackendKeyData {
                pid: body.get_i32(),
                key: body.get_i32(),
            }
        }
        b'Z' => {
            need(&body, 1, "ReadyForQuery")?;
            BackendMessage::ReadyForQuery(body.get_u8())
        }
        b'T' => {
            need(&body, 2, "RowDescription")?;
            let n = body.get_u16();
            let mut names = Vec::with_capacity(n as usize);
            for _ in 0..n {
                names.push(take_cstr(&mut body, "RowDescription")?);
                // table oid, column number, type oid, type size, type modifier, format code
                need(&body, 18, "RowDescription")?;
                body.advance(18);
            }
            BackendMessage::RowDescription(names)
        }
        b'D' => {
            need(&body, 2, "DataRow")?;
            let n = body.get_u16();
            let mut cols = Vec::with_capacity(n as usize);
            for _ in 0..n {
                need(&body, 4, "DataRow")?;
                let len = body.get_i32();
                if len < 0 {
                    cols.push(None);
                } else {
                    need(&body, len as usize, "DataRow")?;
                    cols.push(Some(body.split_to(len as usize)));
                }
            }
            BackendMessage::DataRow(cols)
        }
        b'C' => BackendMessage::CommandComplete(take_cstr(&mut body, "CommandComplete")?),
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::Error(decode_notice(&mut body)?),
        b'N' => BackendMessage::Notice(decode_notice(&mut body)?),
        b'W' => BackendMessage::CopyBothResponse,
        b'H' => BackendMessage::CopyOutResponse,
        b'G' => BackendMessage::CopyInResponse,
        b'v' | b'A' | b'n' | b's' | b'1' | b'2' | b'3' | b't' => BackendMessage::Ignored(tag),
        other => return Err(CodecError::UnknownTag(other as char)),
    })
}

fn need(body: &Bytes, n: usize, what: &'static str) -> Result<(), CodecError> {
    if body.remaining() < n {
        Err(malformed(
            what,
            format!("needs {n} more bytes, has {}", body.remaining()),
        ))
    } else {
        Ok(())
    }
}

fn take_cstr(body: &mut Bytes, what: &'static str) -> Result<String, CodecError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed(what, "string without terminating NUL"))?;
    let s = String::from_utf8_lossy(&body[..end]).into_owned();
    body.advance(end + 1);
    Ok(s)
}

fn decode_auth(body: &mut Bytes) -> Result<AuthRequest, CodecError> {
    need(body, 4, "Authentication")?;
    Ok(match body.get_i32() {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            need(body, 4, "AuthenticationMD5Password")?;
            let mut salt = [0u8; 4];
            body.copy_to_slice(&mut salt);
            AuthRequest::Md5Password { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = take_cstr(body, "AuthenticationSASL")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(body.split_off(0)),
        12 => AuthRequest::SaslFinal(body.split_off(0)),
        other => AuthRequest::Unsupported(other),
    })
}

fn decode_notice(body: &mut Bytes) -> Result<ServerNotice, CodecError> {
    let mut n = ServerNotice::default();
    let mut localized_severity = String::new();
    loop {
        need(body, 1, "ErrorResponse")?;
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let value = take_cstr(body, "ErrorResponse")?;
        match field {
            b'V' => n.severity = value,
            b'S' => localized_severity = value,
            b'C' => n.code = value,
            b'M' => n.message = value,
            b'D' => n.detail = Some(value),
            b'H' => n.hint = Some(value),
            _ => {}
        }
    }
    if n.severity.is_empty() {
        n.severity = localized_severity;
    }
    Ok(n)
}

/// Messages inside CopyBoth from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: WAL bytes starting at `wal_start`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// `k`: keepalive; `reply_requested` asks for an immediate status update.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

impl ReplicationMessage {
    /// Decodes the payload of one CopyData message.
    pub fn decode(mut payload: Bytes) -> Result<ReplicationMessage, CodecError> {
        need(&payload, 1, "CopyData")?;
        match payload.get_u8() {
            b'w' => {
                need(&payload, 24, "XLogData")?;
                let wal_start = Lsn(payload.get_u64());
                let wal_end = Lsn(payload.get_u64());
                let send_time = payload.get_i64();
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: payload,
                })
            }
            b'k' => {
                need(&payload, 17, "PrimaryKeepalive")?;
                let wal_end = Lsn(payload.get_u64());
                let send_time = payload.get_i64();
                let reply_requested = payload.get_u8() != 0;
                Ok(ReplicationMessage::Keepalive {
                    wal_end,
                    send_time,
                    reply_requested,
                })
            }
            other => Err(malformed(
                "CopyData",
                format!("unknown replication message kind {:?}", other as char),
            )),
        }
    }
}

/// A standby status update (`r`). Positions are "last byte + 1", i.e. the end of what was
/// written/flushed; `Lsn(0)` means "not reported".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    pub send_time: i64,
    pub reply_requested: bool,
}

impl StatusUpdate {
    /// Appends the update as a complete CopyData frame.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(1 + 4 + 34);
        out.put_u8(b'd');
        out.put_u32(4 + 34);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.send_time);
        out.put_u8(u8::from(self.reply_requested));
    }
}

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp epoch.
pub fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_micros() as i64) - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

/// Appends a CopyDone frame.
pub fn encode_copy_done(out: &mut BytesMut) {
    out.put_u8(b'c');
    out.put_u32(4);
}

/// Quotes an identifier for a replication command (`"name"` with embedded quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = frame(b'Z', b"I");
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode_frame(&mut buf).unwrap(), None, "cut {cut}");
        }
        let mut buf = BytesMut::from(&whole[..]);
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(BackendMessage::ReadyForQuery(b'I'))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn copy_both_response_is_decoded() {
        // Seen on 15.18: 'W', length 7, format 0, zero columns.
        let mut buf = BytesMut::from(&[b'W', 0, 0, 0, 7, 0, 0, 0][..]);
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(BackendMessage::CopyBothResponse)
        );
    }

    #[test]
    fn rows_and_nulls() {
        // RowDescription (slot_type, restart_lsn) then DataRow ('physical', NULL)
        let mut body = vec![0, 2];
        for name in ["slot_type", "restart_lsn"] {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0; 18]);
        }
        let mut row = vec![0, 2, 0, 0, 0, 8];
        row.extend_from_slice(b"physical");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'T', &body));
        buf.extend_from_slice(&frame(b'D', &row));
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(BackendMessage::RowDescription(vec![
                "slot_type".into(),
                "restart_lsn".into()
            ]))
        );
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(BackendMessage::DataRow(vec![
                Some(Bytes::from_static(b"physical")),
                None
            ]))
        );
    }

    #[test]
    fn error_response_fields() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"x\"\0\0";
        let mut buf = BytesMut::from(&frame(b'E', body)[..]);
        let Some(BackendMessage::Error(n)) = decode_frame(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(n.code, "28P01");
        assert_eq!(n.severity, "FATAL");
        assert_eq!(
            n.to_string(),
            "FATAL: password authentication failed for user \"x\" [SQLSTATE 28P01]"
        );
    }

    #[test]
    fn sasl_mechanisms() {
        let body = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let mut buf = BytesMut::from(&frame(b'R', body)[..]);
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(BackendMessage::Authentication(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }))
        );
    }

    #[test]
    fn oversized_and_short_frames_are_errors() {
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(decode_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&frame(b'K', &[0, 0, 0])[..]);
        assert!(decode_frame(&mut buf).is_err());
    }

    #[test]
    fn xlogdata_and_keepalive() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x0100_0000u64.to_be_bytes());
        p.extend_from_slice(&0x0100_0040u64.to_be_bytes());
        p.extend_from_slice(&42i64.to_be_bytes());
        p.extend_from_slice(b"walbytes");
        let m = ReplicationMessage::decode(Bytes::from(p)).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x0100_0000),
                wal_end: Lsn(0x0100_0040),
                send_time: 42,
                data: Bytes::from_static(b"walbytes")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&9i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            ReplicationMessage::decode(Bytes::from(k)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(7),
                send_time: 9,
                reply_requested: true
            }
        );
        assert!(ReplicationMessage::decode(Bytes::from_static(b"w123")).is_err());
        assert!(ReplicationMessage::decode(Bytes::from_static(b"z")).is_err());
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        StatusUpdate {
            write: Lsn(1),
            flush: Lsn(2),
            apply: Lsn(0),
            send_time: 3,
            reply_requested: false,
        }
        .encode(&mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &1u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
        assert_eq!(&out[22..30], &0u64.to_be_bytes());
        assert_eq!(&out[30..38], &3i64.to_be_bytes());
        assert_eq!(out[38], 0);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("slot_1"), "\"slot_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    /// Random and truncated input must give errors or `None`, never a panic (a light stand-in
    /// for fuzzing: every tag, every length, many random bodies).
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let tag = if round % 2 == 0 {
                b"RSKZTDCIENWHGdcv"[(next() % 16) as usize]
            } else {
                next() as u8
            };
            let mut frame = vec![tag];
            frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            frame.append(&mut body);
            let mut buf = BytesMut::from(&frame[..]);
            let _ = decode_frame(&mut buf);
            let cut = (next() as usize) % (frame.len() + 1);
            let mut buf = BytesMut::from(&frame[..cut]);
            let _ = decode_frame(&mut buf);
            let _ = ReplicationMessage::decode(Bytes::copy_from_slice(&frame[5..]));
        }
    }
}
