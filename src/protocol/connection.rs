//! Socket side of a replication connection: transport (TCP, TLS, unix socket), startup,
//! authentication, simple queries, and raw message I/O for CopyBoth. The pure encoding lives in
//! [`super::codec`]; typed replication commands in [`super::replication`].

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding as ScramBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::codec::{self, AuthRequest, BackendMessage};
use super::conninfo::{ChannelBinding, ConnInfo, Host, SslMode};
use super::error::ProtocolError;
use super::tls;

trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Read buffer growth step. XLogData frames are up to 128 KiB + headers; reading in large
/// steps keeps the number of syscalls per MiB low.
const READ_CHUNK: usize = 256 * 1024;

/// Default connect timeout when the conninfo gives none. libpq waits forever; an agent that
/// reconnects in a loop is better served by a bound.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One result set of a simple query.
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<Bytes>>>,
    pub tag: String,
}

impl QueryResult {
    /// Column `col` of row `row` as text; `None` for NULL or a missing cell.
    pub fn text(&self, row: usize, col: usize) -> Option<String> {
        let cell = self.rows.get(row)?.get(col)?.as_ref()?;
        Some(String::from_utf8_lossy(cell).into_owned())
    }
}

/// An authenticated physical-replication connection (`replication=true` walsender).
pub struct Connection {
    io: Box<dyn Transport>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    target: String,
    tls: bool,
    /// We sent CopyDone inside the current CopyBoth stream (see `replication.rs`).
    pub(crate) copy_done_sent: bool,
    /// The server's CopyDone was read and the result after it (a timeline switch's row, or
    /// nothing) is being collected: kept here, not in a local of `next_event`, so that a
    /// `next_event` cancelled by `select!` in that phase resumes where it was.
    pub(crate) stream_ending: Option<(QueryResult, Option<super::codec::ServerNotice>)>,
}

impl Connection {
    /// Connects to the first host of `info` that accepts, authenticates, and waits for
    /// ReadyForQuery. The error of the last host tried is returned.
    pub async fn connect(info: &ConnInfo) -> Result<Connection, ProtocolError> {
        let mut last = None;
        for (host, port) in &info.hosts {
            let target = match host {
                Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            };
            let timeout = info.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            let attempt =
                tokio::time::timeout(timeout, Self::connect_one(info, host, *port, &target)).await;
            match attempt {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => {
                    tracing::debug!(%target, error = %e, "connection attempt failed");
                    // An authentication or server error is final: other hosts would say the same.
                    let fatal = matches!(
                        e,
                        ProtocolError::Server(_)
                            | ProtocolError::Auth(_)
                            | ProtocolError::Tls(_)
                            | ProtocolError::TlsHandshake(_)
                    );
                    last = Some(e);
                    if fatal {
                        break;
                    }
                }
                Err(_) => last = Some(ProtocolError::ConnectTimeout { target }),
            }
        }
        Err(last.unwrap_or_else(|| ProtocolError::Unexpected("no host to connect to".into())))
    }

    async fn connect_one(
        info: &ConnInfo,
        host: &Host,
        port: u16,
        target: &str,
    ) -> Result<Connection, ProtocolError> {
        let connect_err = |source| ProtocolError::Connect {
            target: target.to_string(),
            source,
        };
        let (io, tls_cert): (Box<dyn Transport>, Option<Vec<u8>>) = match host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = UnixStream::connect(&path).await.map_err(connect_err)?;
                (Box::new(s), None)
            }
            Host::Tcp(h) => {
                let mut s = TcpStream::connect((h.as_str(), port))
                    .await
                    .map_err(connect_err)?;
                s.set_nodelay(true).ok();
                match info.sslmode {
                    SslMode::Disable | SslMode::Allow => (Box::new(s), None),
                    mode => {
                        let mut req = BytesMut::new();
                        frontend::ssl_request(&mut req);
                        s.write_all(&req).await.map_err(connect_err)?;
                        let mut answer = [0u8; 1];
                        s.read_exact(&mut answer).await.map_err(connect_err)?;
                        match answer[0] {
                            b'S' => {
                                let setup = tls::client_config(info, h)?;
                                let stream = setup.connector.connect(setup.server_name, s).await.map_err(|e| {
                                    ProtocolError::TlsHandshake(format!(
                                        "{target}: {e}; check sslmode and sslrootcert"
                                    ))
                                })?;
                                let cert = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| c.as_ref().to_vec());
                                (Box::new(stream), cert)
                            }
                            b'N' if mode == SslMode::Prefer => (Box::new(s), None),
                            b'N' => {
                                return Err(ProtocolError::TlsHandshake(format!(
                                    "{target} does not support SSL but sslmode={} requires it; enable ssl on the \
                                     server or lower sslmode",
                                    mode.as_str()
                                )))
                            }
                            other => {
                                return Err(ProtocolError::Unexpected(format!(
                                    "answer {other:#04x} to SSLRequest from {target}"
                                )))
                            }
                        }
                    }
                }
            }
        };
        let mut conn = Connection {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            target: target.to_string(),
            tls: tls_cert.is_some(),
            copy_done_sent: false,
            stream_ending: None,
        };
        conn.startup(info, host, port, tls_cert).await?;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        host: &Host,
        port: u16,
        tls_cert: Option<Vec<u8>>,
    ) -> Result<(), ProtocolError> {
        let dbname = info
            .dbname
            .clone()
            .unwrap_or_else(|| "replication".to_string());
        let mut params: Vec<(&str, &str)> = vec![
            ("user", info.user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "true"),
            ("application_name", info.application_name.as_str()),
        ];
        if let Some(o) = &info.options {
            params.push(("options", o.as_str()));
        }
        frontend::startup_message(params, &mut self.wbuf)
            .map_err(|e| self.io_err("encoding the startup packet", e))?;
        self.flush().await?;

        let password = || {
            info.password
                .clone()
                .or_else(|| info.password_for(host, port))
        };
        let no_password = || {
            ProtocolError::Auth(format!(
                "the server asks user {:?} for a password but none was given: set it in the connection string, \
                 PGPASSWORD or ~/.pgpass",
                info.user
            ))
        };
        let mut scram: Option<ScramSha256> = None;
        let mut used_channel_binding = false;
        loop {
            match self.read_message().await? {
                BackendMessage::Authentication(req) => match req {
                    AuthRequest::Ok => break,
                    AuthRequest::CleartextPassword => {
                        let pw = password().ok_or_else(no_password)?;
                        frontend::password_message(pw.as_bytes(), &mut self.wbuf)
                            .map_err(|e| self.io_err("encoding a password message", e))?;
                        self.flush().await?;
                    }
                    AuthRequest::Md5Password { salt } => {
                        let pw = password().ok_or_else(no_password)?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            info.user.as_bytes(),
                            pw.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                            .map_err(|e| self.io_err("encoding a password message", e))?;
                        self.flush().await?;
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        let pw = password().ok_or_else(no_password)?;
                        let plus_offered = mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS");
                        let (mechanism, binding) = match (&tls_cert, info.channel_binding) {
                            (Some(cert), ChannelBinding::Prefer | ChannelBinding::Require) if plus_offered => {
                                used_channel_binding = true;
                                ("SCRAM-SHA-256-PLUS", ScramBinding::tls_server_end_point(tls::tls_server_end_point(cert)?))
                            }
                            (_, ChannelBinding::Require) => {
                                return Err(ProtocolError::Auth(
                                    "channel_binding=require but the server did not offer SCRAM-SHA-256-PLUS over \
                                     TLS; use sslmode=require or higher and scram-sha-256, or lower channel_binding"
                                        .into(),
                                ))
                            }
                            (Some(_), ChannelBinding::Prefer) => ("SCRAM-SHA-256", ScramBinding::unrequested()),
                            _ => ("SCRAM-SHA-256", ScramBinding::unsupported()),
                        };
                        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") && mechanism == "SCRAM-SHA-256" {
                            return Err(ProtocolError::Auth(format!(
                                "server offers only the SASL mechanisms {mechanisms:?}, which walagent does not speak"
                            )));
                        }
                        let s = ScramSha256::new(pw.as_bytes(), binding);
                        frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)
                            .map_err(|e| self.io_err("encoding a SASL message", e))?;
                        self.flush().await?;
                        scram = Some(s);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| ProtocolError::Unexpected("SASLContinue before SASL start".into()))?;
                        s.update(&data).map_err(|e| ProtocolError::Auth(format!("SCRAM exchange failed: {e}")))?;
                        frontend::sasl_response(s.message(), &mut self.wbuf)
                            .map_err(|e| self.io_err("encoding a SASL message", e))?;
                        self.flush().await?;
                    }
                    AuthRequest::SaslFinal(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| ProtocolError::Unexpected("SASLFinal before SASL start".into()))?;
                        s.finish(&data).map_err(|e| {
                            ProtocolError::Auth(format!("the server's SCRAM signature did not verify: {e}"))
                        })?;
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(ProtocolError::Auth(format!(
                            "the server asks for authentication method {code} (GSSAPI/SSPI/Kerberos), which walagent \
                             does not support; use scram-sha-256, md5 or trust for this user in pg_hba.conf"
                        )))
                    }
                },
                BackendMessage::Error(n) => return Err(ProtocolError::Server(n)),
                other => return Err(ProtocolError::Unexpected(format!("{other:?} during authentication"))),
            }
        }
        if info.channel_binding == ChannelBinding::Require && !used_channel_binding {
            return Err(ProtocolError::Auth(
                "channel_binding=require but the server authenticated without channel binding; use scram-sha-256 \
                 over TLS, or lower channel_binding"
                    .into(),
            ));
        }
        loop {
            match self.read_message().await? {
                BackendMessage::ReadyForQuery(_) => return Ok(()),
                BackendMessage::BackendKeyData { .. } => {}
                BackendMessage::Error(n) => return Err(ProtocolError::Server(n)),
                other => {
                    return Err(ProtocolError::Unexpected(format!(
                        "{other:?} after authentication"
                    )))
                }
            }
        }
    }

    /// `host:port` (or socket path) of the server, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// A ParameterStatus value reported by the server, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    fn io_err(&self, context: &str, source: std::io::Error) -> ProtocolError {
        ProtocolError::Io {
            context: format!("{context} ({})", self.target),
            source,
        }
    }

    /// Writes out everything queued in the write buffer.
    /// Writes the buffered frames. Cancel-safe: bytes are dropped from the buffer only once
    /// written, so a flush cancelled by `select!` never sends a frame twice or half.
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        while !self.wbuf.is_empty() {
            match self.io.write(&self.wbuf).await {
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::WriteZero, "connection closed");
                    self.wbuf.clear();
                    return Err(self.io_err("writing to the server", e));
                }
                Ok(n) => bytes::Buf::advance(&mut self.wbuf, n),
                Err(e) => {
                    self.wbuf.clear();
                    return Err(self.io_err("writing to the server", e));
                }
            }
        }
        self.io
            .flush()
            .await
            .map_err(|e| self.io_err("writing to the server", e))
    }

    /// The write buffer, for encoders; call [`Connection::flush`] afterwards.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Reads the next message. ParameterStatus is recorded and notices are logged; both are
    /// skipped. Cancel-safe: a partially read frame stays buffered.
    pub async fn read_message(&mut self) -> Result<BackendMessage, ProtocolError> {
        loop {
            while let Some(msg) = codec::decode_frame(&mut self.rbuf)? {
                match msg {
                    BackendMessage::ParameterStatus { name, value } => {
                        self.params.insert(name, value);
                    }
                    BackendMessage::Notice(n) => tracing::info!(server = %self.target, "{n}"),
                    BackendMessage::Ignored(_) => {}
                    other => return Ok(other),
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io_err("reading from the server", e))?;
            if n == 0 {
                return Err(ProtocolError::Closed {
                    context: format!("({})", self.target),
                });
            }
        }
    }

    /// Runs a simple query and returns its last result set. A server error is returned after
    /// the connection is back at ReadyForQuery, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ProtocolError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| self.io_err("encoding a query", e))?;
        self.flush().await?;
        self.collect_results(QueryResult::default()).await
    }

    /// Reads result sets until ReadyForQuery, starting from `current`.
    pub(crate) async fn collect_results(
        &mut self,
        mut current: QueryResult,
    ) -> Result<QueryResult, ProtocolError> {
        let mut error = None;
        loop {
            match self.read_message().await? {
                BackendMessage::RowDescription(cols) => {
                    current = QueryResult {
                        columns: cols,
                        ..Default::default()
                    }
                }
                BackendMessage::DataRow(row) => current.rows.push(row),
                BackendMessage::CommandComplete(tag) => current.tag = tag,
                BackendMessage::EmptyQueryResponse => {}
                BackendMessage::Error(n) => error = Some(n),
                BackendMessage::ReadyForQuery(_) => {
                    return match error {
                        Some(n) => Err(ProtocolError::Server(n)),
                        None => Ok(current),
                    }
                }
                // COPY started by a command we did not expect to copy: leave it.
                BackendMessage::CopyOutResponse
                | BackendMessage::CopyInResponse
                | BackendMessage::CopyBothResponse => {
                    return Err(ProtocolError::Unexpected(format!(
                        "COPY started in reply to a query ({})",
                        self.target
                    )))
                }
                other => {
                    tracing::debug!(?other, "ignoring message while collecting results");
                }
            }
        }
    }

    /// Sends Terminate and closes the socket; errors are ignored (the connection is going away).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}
