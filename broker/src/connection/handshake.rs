//! The opening handshake: protocol header, start/start-ok (authentication), tune/tune-ok,
//! open/open-ok. Runs before the connection task's main loop, under the handshake timeout.

use crate::codec::{self, Frame, PROTOCOL_HEADER};
use crate::error::{AmqpError, AmqpResult};
use crate::limits;
use crate::permissions::{Permissions, TagGrants, TopicPermissions};
use crate::server::BrokerShared;
use crate::vhost::Vhost;
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the handshake agreed on.
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    /// Largest frame, both ways (0: no limit).
    pub(crate) frame_max: u32,
    /// Highest channel number.
    pub(crate) channel_max: u16,
    /// Heartbeat interval in seconds (0: none).
    pub(crate) heartbeat: u16,
    /// Who logged in.
    pub(crate) user: String,
    /// What its tags granted at login.
    pub(crate) grants: TagGrants,
    /// The client's product name, for logs.
    pub(crate) client: String,
    /// The name the client gave its connection (client property `connection_name`), if any.
    pub(crate) name: Option<String>,
    /// The client takes server-sent basic.cancel (capability `consumer_cancel_notify`).
    pub(crate) cancel_notify: bool,
    /// The client takes connection.blocked and connection.unblocked (capability
    /// `connection.blocked`).
    pub(crate) blocked_notify: bool,
    /// The vhost it opened.
    pub(crate) vhost: Arc<Vhost>,
    /// The user's permissions there, as of [`Tuning::permissions_version`] (`None` once they
    /// are cleared: nothing is allowed).
    pub(crate) permissions: Option<Arc<Permissions>>,
    /// The user's topic permissions there (`None`: every routing key is allowed).
    pub(crate) topic_permissions: Option<Arc<TopicPermissions>>,
    /// The broker's permissions version when they were read.
    pub(crate) permissions_version: u64,
}

/// How a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The socket closed or failed; nothing to say to the peer.
    Io,
    /// Wrong protocol header: it was answered with ours, then the socket closed.
    BadHeader,
    /// Close the socket without a word (failed login from a client that cannot take a
    /// connection.close for it, as RabbitMQ does).
    Silent(AmqpError),
    /// A protocol error to report with connection.close.
    Protocol(AmqpError),
}

impl From<AmqpError> for HandshakeError {
    fn from(e: AmqpError) -> Self {
        HandshakeError::Protocol(e)
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(_: std::io::Error) -> Self {
        HandshakeError::Io
    }
}

/// The server properties of connection.start, with capabilities for exactly what works.
fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "per_consumer_qos",
        "authentication_failure_close",
        "direct_reply_to",
    ] {
        capabilities.insert(name.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    for (key, value) in [
        ("product", "Warren"),
        ("version", env!("CARGO_PKG_VERSION")),
        ("platform", "Rust"),
        ("copyright", "The Warren developers"),
        (
            "information",
            "An embedded AMQP 0-9-1 broker for tests, behaving like RabbitMQ",
        ),
        ("cluster_name", "warren"),
    ] {
        props.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    props
}

/// Reads one frame during the handshake.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<Frame<'static>, HandshakeError> {
    loop {
        if let Some(frame) = codec::decode(buf, frame_max)? {
            return Ok(frame);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Io);
        }
    }
}

/// Reads the next method, skipping heartbeats.
async fn read_method<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<AMQPClass, HandshakeError> {
    loop {
        match read_frame(rd, buf, frame_max).await? {
            Frame::Heartbeat => continue,
            Frame::Method(0, method) => return Ok(method),
            Frame::Method(..) => {
                return Err(AmqpError::command_invalid("channel is not open").into());
            }
            _ => {
                return Err(AmqpError::unexpected_frame(
                    "expected method frame, got non method frame instead",
                )
                .into());
            }
        }
    }
}

fn unexpected(expected: &str, got: &AMQPClass) -> HandshakeError {
    AmqpError::command_invalid(format!("expected '{expected}', got {}", method_name(got)))
        .during(got)
        .into()
}

/// `class.method` for messages.
pub(crate) fn method_name(method: &AMQPClass) -> String {
    format!(
        "method {}.{}",
        method.get_amqp_class_id(),
        method.get_amqp_method_id()
    )
}

/// Runs the handshake on a fresh socket.
pub(crate) async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    shared: &BrokerShared,
) -> Result<Tuning, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &shared.config;
    while buf.len() < 8 {
        if rd.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Io);
        }
        if !buf.starts_with(b"AMQP"[..buf.len().min(4)].as_ref()) {
            break;
        }
    }
    // RabbitMQ also takes the old-style 0-9-1 header (protocol id 1, version 0-9).
    const OLD_STYLE_HEADER: &[u8; 8] = b"AMQP\x01\x01\x00\x09";
    if buf.len() >= 8 && &buf[..8] == OLD_STYLE_HEADER {
        buf[..8].copy_from_slice(PROTOCOL_HEADER);
    }
    if &buf[..8.min(buf.len())] != PROTOCOL_HEADER {
        wr.write_all(PROTOCOL_HEADER).await?;
        let _ = wr.shutdown().await;
        return Err(HandshakeError::BadHeader);
    }
    let _ = buf.split_to(8);

    let mut out = Vec::new();
    codec::write_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    wr.write_all(&out).await?;
    out.clear();

    // Until tune-ok, frames are bounded by the spec's minimum frame size.
    let start_ok = match read_method(rd, buf, super::HANDSHAKE_FRAME_MAX).await? {
        AMQPClass::Connection(connection::AMQPMethod::StartOk(m)) => m,
        other => return Err(unexpected("connection.start_ok", &other)),
    };
    let client = client_product(&start_ok.client_properties);
    let name = match start_ok.client_properties.inner().get("connection_name") {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    };
    let cancel_notify = client_capability(&start_ok.client_properties, "consumer_cancel_notify");
    let blocked_notify = client_capability(&start_ok.client_properties, "connection.blocked");
    let failure_close =
        client_capability(&start_ok.client_properties, "authentication_failure_close");
    let (user, grants) = authenticate(shared, &start_ok).map_err(|e| {
        // An unknown mechanism is closed without a word whatever the client's capabilities,
        // as RabbitMQ does.
        if failure_close && e.code == 403 {
            HandshakeError::Protocol(e)
        } else {
            HandshakeError::Silent(e)
        }
    })?;

    codec::write_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: config.channel_max,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat.as_secs().min(u16::MAX as u64) as u16,
        })),
    );
    wr.write_all(&out).await?;
    out.clear();

    let tune_ok = match read_method(rd, buf, super::HANDSHAKE_FRAME_MAX).await? {
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(m)) => m,
        other => return Err(unexpected("connection.tune_ok", &other)),
    };
    // RabbitMQ closes the socket without a word when tune-ok breaks a limit.
    check_negotiated(
        "frame_max",
        4096,
        config.frame_max as u64,
        tune_ok.frame_max as u64,
    )
    .map_err(HandshakeError::Silent)?;
    check_negotiated(
        "channel_max",
        0,
        config.channel_max as u64,
        tune_ok.channel_max as u64,
    )
    .map_err(HandshakeError::Silent)?;
    let frame_max = if tune_ok.frame_max == 0 {
        config.frame_max
    } else {
        tune_ok.frame_max
    };
    let channel_max = if tune_ok.channel_max == 0 {
        config.channel_max
    } else {
        tune_ok.channel_max
    };

    let open = match read_method(rd, buf, frame_max).await? {
        AMQPClass::Connection(connection::AMQPMethod::Open(m)) => m,
        other => return Err(unexpected("connection.open", &other)),
    };
    let Some(vhost) = shared.vhost(open.virtual_host.as_str()) else {
        return Err(
            AmqpError::not_allowed(format!("vhost {} not found", open.virtual_host))
                .during_ids(10, 40)
                .into(),
        );
    };
    // RabbitMQ's order: the vhost's connection limit, the user's, then the permission. The
    // connections are counted only when there is a limit, and as registered now: two opens
    // at the same moment may both pass (RabbitMQ's own count lags too).
    let vhost_limit = vhost.lock().limits.max_connections;
    let user_limit = shared.user_limits(&user).max_connections;
    let (to_vhost, of_user) = if vhost_limit.is_some() || user_limit.is_some() {
        shared.connection_counts(&vhost, &user)
    } else {
        (0, 0)
    };
    let refused = if let Some(max) = vhost_limit
        && limits::reached(max, to_vhost)
    {
        Some(format!(
            "access to vhost '{}' refused for user '{user}': connection limit ({max}) is reached",
            vhost.name
        ))
    } else if let Some(max) = user_limit
        && limits::reached(max, of_user)
    {
        Some(format!(
            "connection refused for user '{user}': user connection limit ({max}) is reached"
        ))
    } else {
        None
    };
    if let Some(text) = refused {
        return Err(AmqpError::not_allowed(text).during_ids(10, 40).into());
    }
    let permissions_version = shared.permissions_version();
    let (permissions, topic_permissions) = shared.access(&user, &vhost.name);
    let Some(permissions) = permissions else {
        return Err(AmqpError::not_allowed(format!(
            "access to vhost '{}' refused for user '{user}'",
            vhost.name
        ))
        .during_ids(10, 40)
        .into());
    };
    codec::write_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    wr.write_all(&out).await?;
    Ok(Tuning {
        frame_max,
        channel_max,
        heartbeat: tune_ok.heartbeat,
        user,
        grants,
        client,
        name,
        cancel_notify,
        blocked_notify,
        vhost,
        topic_permissions,
        permissions: Some(permissions),
        permissions_version,
    })
}

/// RabbitMQ's rule for frame_max and channel_max in tune-ok: at least `min` (unless 0), and
/// not above the server's offer (0 counts as above a non-zero offer).
fn check_negotiated(field: &str, min: u64, server: u64, client: u64) -> AmqpResult {
    if client != 0 && client < min {
        return Err(AmqpError::not_allowed(format!(
            "failed to negotiate connection parameters: negotiated {field} = {client} is lower than the minimum allowed value ({min})"
        )));
    }
    if server != 0 && (client == 0 || client > server) {
        let no_limit = if client == 0 { " (no limit)" } else { "" };
        return Err(AmqpError::not_allowed(format!(
            "failed to negotiate connection parameters: negotiated {field} = {client}{no_limit} is higher than the maximum allowed value ({server})"
        )));
    }
    Ok(())
}

/// Checks the credentials of start-ok; returns the user name and what its tags grant.
fn authenticate(
    shared: &BrokerShared,
    start_ok: &connection::StartOk,
) -> AmqpResult<(String, TagGrants)> {
    let mechanism = start_ok.mechanism.as_str();
    let credentials = match mechanism {
        "PLAIN" => parse_plain(start_ok.response.as_bytes()),
        "AMQPLAIN" => parse_amqplain(start_ok.response.as_bytes()),
        other => {
            return Err(AmqpError::command_invalid(format!(
                "unknown authentication mechanism '{other}'"
            ))
            .during_ids(10, 11));
        }
    };
    let refused = || {
        AmqpError::login_refused(format!(
            "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
        ))
    };
    let (name, password) = credentials.ok_or_else(refused)?;
    match shared.authenticate(&name, &password) {
        Some(grants) => Ok((name, grants)),
        None => {
            tracing::warn!(user = %name, mechanism, "login refused: wrong user name or password");
            Err(refused())
        }
    }
}

/// PLAIN: `authzid \0 user \0 password`.
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let password = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(password.to_vec()).ok()?,
    ))
}

/// AMQPLAIN: a field table (without its length prefix) with LOGIN and PASSWORD.
fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let text = |key: &str| match table.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}

fn client_product(props: &FieldTable) -> String {
    match props.inner().get("product") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        _ => "unknown client".to_owned(),
    }
}

fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_credentials() {
        assert_eq!(
            parse_plain(b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        assert_eq!(parse_plain(b"guest"), None);
    }

    #[test]
    fn negotiation_follows_rabbitmq() {
        assert!(check_negotiated("frame_max", 4096, 131_072, 4096).is_ok());
        assert_eq!(
            check_negotiated("frame_max", 4096, 131_072, 4095)
                .unwrap_err()
                .code,
            530
        );
        assert_eq!(
            check_negotiated("frame_max", 4096, 131_072, 131_073)
                .unwrap_err()
                .code,
            530
        );
        assert_eq!(
            check_negotiated("frame_max", 4096, 131_072, 0)
                .unwrap_err()
                .code,
            530
        );
        assert!(check_negotiated("channel_max", 0, 2047, 1).is_ok());
    }
}
