//! Method handlers, one file per AMQP class; this file routes a channel's frames to them and
//! assembles content (method, header, bodies).

mod basic;
mod channel;
pub(crate) mod exchange;
pub(crate) mod queue;

use crate::channel::{Assembly, Channel, ChannelState, Publication};
use crate::connection::{Connection, method_name};
use crate::error::{AmqpError, AmqpResult};
use crate::exchange::ExchangeKind;
use crate::limits;
use crate::message::MessageBuilder;
use crate::methods::basic::check_publish_exchange;
use crate::permissions::Access;
use amq_protocol::protocol::{AMQPClass, BasicProperties, channel as channel_class};
use bytes::Bytes;
use std::borrow::Cow;

/// RabbitMQ's text for a content frame where a method was due.
const EXPECTED_METHOD: &str = "expected method frame, got non method frame instead";

/// A handler's failure with the channel it concerns.
pub(crate) type Failed = (u16, AmqpError);

/// The kind of resource an access check is about, as RabbitMQ's refusals name it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Resource {
    Queue,
    Exchange,
}

impl Connection {
    /// 403 ACCESS_REFUSED unless the user's permissions in this vhost allow `access` to the
    /// queue or exchange `name` (the default exchange is `amq.default`). Permissions changed
    /// since the connection last read them are read again first.
    pub(crate) fn check_access(
        &mut self,
        access: Access,
        resource: Resource,
        name: &str,
    ) -> AmqpResult {
        self.reread_permissions();
        let (kind, name) = match resource {
            Resource::Queue => ("queue", name),
            Resource::Exchange if name.is_empty() => ("exchange", "amq.default"),
            Resource::Exchange => ("exchange", name),
        };
        let permissions = self.tuning.permissions.as_ref();
        if permissions.is_some_and(|p| p.allows(access, name)) {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            self.vhost.name, self.tuning.user
        )))
    }

    /// Rereads the user's permissions and topic permissions if they changed since the
    /// connection last read them.
    fn reread_permissions(&mut self) {
        let version = self.shared.permissions_version();
        if version != self.tuning.permissions_version {
            let (permissions, topics) = self.shared.access(&self.tuning.user, &self.vhost.name);
            self.tuning.permissions = permissions;
            self.tuning.topic_permissions = topics;
            self.tuning.permissions_version = version;
        }
    }

    /// 403 ACCESS_REFUSED unless the user's topic permissions allow publishing (`Write`) or
    /// binding (`Read`) with routing key `key` on `exchange`, if it is a topic exchange (and,
    /// for a publish, not an internal one: that publish is refused as such). Called right
    /// after [`Connection::check_access`], which has reread the permissions. Only a user
    /// with topic permissions on that exchange takes the vhost lock here.
    pub(crate) fn check_topic_access(
        &self,
        access: Access,
        exchange: &str,
        key: &str,
    ) -> AmqpResult {
        let Some(permission) = self
            .tuning
            .topic_permissions
            .as_ref()
            .and_then(|topics| topics.get(exchange))
        else {
            return Ok(());
        };
        let checked = self.vhost.lock().exchanges.get(exchange).is_some_and(|x| {
            x.kind == ExchangeKind::Topic && !(access == Access::Write && x.internal)
        });
        if !checked || permission.allows(access, key) {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to topic '{key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
            self.vhost.name, self.tuning.user
        )))
    }

    /// A method on a non-zero channel.
    pub(crate) fn channel_method(&mut self, ch: u16, method: AMQPClass) -> Result<(), Failed> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        let state = self.channels.get(&ch).map(|c| c.state);
        match state {
            None => match method {
                AMQPClass::Channel(channel_class::AMQPMethod::Open(_)) => self.channel_open(ch),
                other => Err((
                    ch,
                    AmqpError::channel_error("expected 'channel.open'").during(&other),
                )),
            },
            Some(ChannelState::Closing) => {
                match method {
                    AMQPClass::Channel(channel_class::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&ch);
                    }
                    AMQPClass::Channel(channel_class::AMQPMethod::Close(_)) => {
                        self.send(
                            ch,
                            AMQPClass::Channel(channel_class::AMQPMethod::CloseOk(
                                channel_class::CloseOk {},
                            )),
                        );
                    }
                    _ => {}
                }
                Ok(())
            }
            Some(ChannelState::Open) => {
                let channel = self.channels.get(&ch).expect("open");
                let expected = match channel.assembly {
                    Assembly::Idle => None,
                    Assembly::Header(_) => Some(
                        "expected content header for class 60, got non content header frame instead",
                    ),
                    Assembly::Body(_) => {
                        Some("expected content body, got non content body frame instead")
                    }
                };
                if let Some(expected) = expected {
                    return Err((ch, AmqpError::unexpected_frame(expected).during_ids(60, 40)));
                }
                let result = match method {
                    AMQPClass::Channel(m) => self.channel_class(ch, m),
                    AMQPClass::Queue(m) => self.queue_class(ch, m),
                    AMQPClass::Basic(m) => self.basic_class(ch, m),
                    AMQPClass::Exchange(m) => self.exchange_class(ch, m),
                    AMQPClass::Tx(m) => self.tx_class(ch, m),
                    // The deprecated access class: RabbitMQ grants every request.
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::Request(_)) => {
                        self.send(
                            ch,
                            AMQPClass::Access(
                                amq_protocol::protocol::access::AMQPMethod::RequestOk(
                                    amq_protocol::protocol::access::RequestOk {},
                                ),
                            ),
                        );
                        Ok(())
                    }
                    AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::Select(m)) => {
                        self.confirm_select(ch, m.nowait)
                    }
                    AMQPClass::Connection(_)
                    | AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::SelectOk(
                        _,
                    )) => Err(AmqpError::server_method()),
                    other => Err(AmqpError::not_implemented(format!(
                        "{} is not implemented by Warren",
                        method_name(&other)
                    ))),
                };
                result.map_err(|e| (ch, e.during_ids(class_id, method_id)))
            }
        }
    }

    fn channel_open(&mut self, ch: u16) -> Result<(), Failed> {
        // RabbitMQ counts open channels; it does not check channel numbers.
        let max = self.tuning.channel_max as usize;
        if max != 0 && self.channels.len() >= max {
            return Err((
                0,
                AmqpError::not_allowed(format!(
                    "number of channels opened ({}) has reached the negotiated channel_max ({max})",
                    self.channels.len()
                )),
            ));
        }
        if let Some(max) = self.shared.user_limits(&self.tuning.user).max_channels {
            let open = self.channels.len() + self.shared.user_channels(&self.tuning.user, self.id);
            if limits::reached(max, open) {
                return Err((
                    0,
                    AmqpError::not_allowed(format!(
                        "number of channels opened for user '{}' has reached the maximum \
                         allowed user limit of ({max})",
                        self.tuning.user
                    )),
                ));
            }
        }
        self.channels.insert(ch, Channel::new());
        self.send(
            ch,
            AMQPClass::Channel(channel_class::AMQPMethod::OpenOk(channel_class::OpenOk {})),
        );
        Ok(())
    }

    /// A content header: must follow basic.publish on its channel.
    pub(crate) fn content_header(
        &mut self,
        ch: u16,
        class_id: u16,
        body_size: u64,
        properties: Box<BasicProperties>,
        raw_properties: Cow<'_, [u8]>,
    ) -> Result<(), Failed> {
        let max_size = self.shared.config.max_message_size;
        let Some(channel) = self.content_channel(ch)? else {
            return Ok(());
        };
        let publish = match std::mem::take(&mut channel.assembly) {
            Assembly::Header(publish) => publish,
            _ => {
                return Err((ch, AmqpError::unexpected_frame(EXPECTED_METHOD)));
            }
        };
        if class_id != 60 {
            return Err((
                ch,
                AmqpError::unexpected_frame(format!(
                    "expected content header for class 60, got one for class {class_id} instead"
                ))
                .during_ids(60, 40),
            ));
        }
        if body_size > max_size {
            return Err((
                ch,
                AmqpError::precondition_failed(format!(
                    "message size {body_size} is larger than configured max size {max_size}"
                ))
                .during_ids(60, 40),
            ));
        }
        // RabbitMQ checks the size first, then write permission, then the properties.
        self.check_access(Access::Write, Resource::Exchange, publish.exchange.as_str())
            .and_then(|()| {
                self.check_topic_access(
                    Access::Write,
                    publish.exchange.as_str(),
                    publish.routing_key.as_str(),
                )
            })
            .map_err(|e| (ch, e.during_ids(60, 40)))?;
        let (publication, raw_properties) = self
            .prepare_content(ch, &properties, raw_properties)
            .map_err(|e| {
            // RabbitMQ refuses a missing or internal exchange before the properties
            // (this lookup is only made on that error's path).
            let vhost = self.vhost.clone();
            let refused =
                check_publish_exchange(&vhost.lock(), &vhost.name, publish.exchange.as_str());
            (ch, refused.err().unwrap_or(e).during_ids(60, 40))
        })?;
        let mut builder = MessageBuilder::new(
            publish.exchange.as_str(),
            publish.routing_key.as_str(),
            &raw_properties,
            body_size,
        );
        if publication.bcc_count > 0 {
            builder.with_bcc(publication.bcc_keys());
        }
        let publication = Publication {
            mandatory: publish.mandatory,
            ..publication
        };
        if body_size == 0 {
            self.publish(ch, publication, builder.finish())
                .map_err(|e| (ch, e.during_ids(60, 40)))
        } else {
            self.channel_mut(ch).assembly = Assembly::Body(Box::new((publication, builder)));
            Ok(())
        }
    }

    /// A content body frame: part of the body announced by the header. `shared` is the same
    /// payload as a slice of the read buffer, when one was split off: a large body that comes
    /// whole in this frame is kept as that slice rather than copied.
    pub(crate) fn content_body(
        &mut self,
        ch: u16,
        chunk: &[u8],
        shared: Option<&Bytes>,
    ) -> Result<(), Failed> {
        let Some(channel) = self.content_channel(ch)? else {
            return Ok(());
        };
        if !matches!(channel.assembly, Assembly::Body(_)) {
            let expected = match channel.assembly {
                Assembly::Header(_) => {
                    "expected content header for class 60, got non content header frame instead"
                }
                _ => EXPECTED_METHOD,
            };
            let ids = if matches!(channel.assembly, Assembly::Header(_)) {
                (60, 40)
            } else {
                (0, 0)
            };
            channel.assembly = Assembly::Idle;
            return Err((
                ch,
                AmqpError::unexpected_frame(expected).during_ids(ids.0, ids.1),
            ));
        }
        let Assembly::Body(pending) = &mut channel.assembly else {
            unreachable!("checked above")
        };
        let remaining = pending.1.remaining();
        if chunk.len() as u64 > remaining {
            // As RabbitMQ: a body longer than its header said is not an error at once; the
            // message never completes, and the next method gets 505 (expected content body).
            pending.1.overflow();
            return Ok(());
        }
        match shared {
            Some(body) if pending.1.wants_shared(body.len()) => pending.1.push_shared(body.clone()),
            _ => pending.1.push(chunk),
        }
        if (chunk.len() as u64) < remaining || pending.1.overflowed() {
            return Ok(());
        }
        let Assembly::Body(pending) = std::mem::take(&mut channel.assembly) else {
            unreachable!("checked above")
        };
        let (publication, builder) = *pending;
        self.publish(ch, publication, builder.finish())
            .map_err(|e| (ch, e.during_ids(60, 40)))
    }

    /// The channel a content frame belongs to: 505 if it is not open (RabbitMQ's answer), `None`
    /// if it is closing (the frame is dropped).
    fn content_channel(&mut self, ch: u16) -> Result<Option<&mut Channel>, Failed> {
        match self.channels.get_mut(&ch) {
            None => Err((ch, AmqpError::unexpected_frame(EXPECTED_METHOD))),
            Some(c) if c.state == ChannelState::Closing => Ok(None),
            Some(c) => Ok(Some(c)),
        }
    }

    /// The channel, which the caller knows is open.
    pub(crate) fn channel_mut(&mut self, ch: u16) -> &mut Channel {
        self.channels.get_mut(&ch).expect("channel is open")
    }
}
