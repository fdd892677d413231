//! The exchange class: declare, delete, and exchange-to-exchange bind and unbind.

use super::Resource;
use crate::connection::Connection;
use crate::error::{AmqpError, AmqpResult};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, is_default};
use crate::methods::queue::check_arg_equivalence;
use crate::permissions::Access;
use crate::vhost::VhostState;
use amq_protocol::protocol::{AMQPClass, exchange};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

/// `exchange 'name' in vhost '/'`, as RabbitMQ names an exchange in reply texts.
pub(crate) fn exchange_resource(name: &str, vhost: &str) -> String {
    format!("exchange '{name}' in vhost '{vhost}'")
}

/// RabbitMQ's 403 for touching the default exchange.
pub(crate) fn default_exchange_refused() -> AmqpError {
    AmqpError::access_refused("operation not permitted on the default exchange")
}

fn send_exchange(conn: &mut Connection, ch: u16, method: exchange::AMQPMethod) {
    conn.send(ch, AMQPClass::Exchange(method));
}

impl Connection {
    pub(crate) fn exchange_class(&mut self, ch: u16, method: exchange::AMQPMethod) -> AmqpResult {
        match method {
            exchange::AMQPMethod::Declare(m) => self.exchange_declare(ch, m),
            exchange::AMQPMethod::Delete(m) => self.exchange_delete(ch, m),
            exchange::AMQPMethod::Bind(m) => {
                self.exchange_binding(&m.destination, &m.source, m.routing_key, m.arguments, true)?;
                if !m.nowait {
                    send_exchange(self, ch, exchange::AMQPMethod::BindOk(exchange::BindOk {}));
                }
                Ok(())
            }
            exchange::AMQPMethod::Unbind(m) => {
                self.exchange_binding(
                    &m.destination,
                    &m.source,
                    m.routing_key,
                    m.arguments,
                    false,
                )?;
                if !m.nowait {
                    send_exchange(
                        self,
                        ch,
                        exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {}),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::server_method()),
        }
    }

    fn exchange_declare(&mut self, ch: u16, m: exchange::Declare) -> AmqpResult {
        let vhost = self.vhost.clone();
        let name = m.exchange.as_str();
        // RabbitMQ checks the type first, before the name and the permissions; a passive
        // declare has none to check.
        let kind = if m.passive {
            None
        } else {
            Some(ExchangeKind::parse(m.kind.as_str())?)
        };
        if is_default(name) {
            return Err(default_exchange_refused());
        }
        // A new exchange with an alternate exchange (a long string: another type is refused
        // as such later) needs read on itself and write on that one, after the check of its
        // name's prefix. Checked here and answered only if the exchange is created, under the
        // same lock as its creation.
        let mut alternate_access = Ok(());
        if !m.passive {
            self.check_access(Access::Configure, Resource::Exchange, name)?;
            if let Some(AMQPValue::LongString(alternate)) =
                m.arguments.inner().get("alternate-exchange")
                && !name.starts_with("amq.")
            {
                let alternate = alternate.to_string();
                alternate_access = self
                    .check_access(Access::Read, Resource::Exchange, name)
                    .and_then(|()| {
                        self.check_access(Access::Write, Resource::Exchange, &alternate)
                    });
            }
        }
        let mut state = vhost.lock();
        match (state.exchanges.get(name), kind) {
            (None, None) => {
                return Err(AmqpError::not_found(format!(
                    "no {}",
                    exchange_resource(name, &vhost.name)
                )));
            }
            (None, Some(kind)) => {
                alternate_access?;
                create_exchange(
                    &mut state,
                    &vhost.name,
                    name,
                    kind,
                    ExchangeFlags {
                        durable: m.durable,
                        auto_delete: m.auto_delete,
                        internal: m.internal,
                    },
                    m.arguments,
                )?
            }
            (Some(_), None) => {}
            (Some(existing), Some(kind)) => {
                let resource = exchange_resource(name, &vhost.name);
                if existing.kind != kind {
                    return Err(AmqpError::precondition_failed(format!(
                        "inequivalent arg 'type' for {resource}: received '{}' but current is '{}'",
                        m.kind,
                        existing.kind.name()
                    )));
                }
                for (field, current, received) in [
                    ("durable", existing.durable, m.durable),
                    ("auto_delete", existing.auto_delete, m.auto_delete),
                    ("internal", existing.internal, m.internal),
                ] {
                    if current != received {
                        return Err(AmqpError::precondition_failed(format!(
                            "inequivalent arg '{field}' for {resource}: received '{received}' but current is '{current}'"
                        )));
                    }
                }
                // Then the arguments, of which RabbitMQ compares only this one.
                const ALTERNATE: &str = "alternate-exchange";
                check_arg_equivalence(
                    ALTERNATE,
                    m.arguments.inner().get(ALTERNATE),
                    existing.arguments.inner().get(ALTERNATE),
                    &resource,
                )?;
            }
        }
        drop(state);
        if !m.nowait {
            send_exchange(
                self,
                ch,
                exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}),
            );
        }
        Ok(())
    }

    /// exchange.bind (`bind`) or exchange.unbind: a binding from `source` to the exchange
    /// `destination`. As RabbitMQ: write permission on the destination, then read on the
    /// source; both must exist to bind (404 naming the missing one); an unbind of what is not
    /// there succeeds; the default exchange is refused either way (403).
    fn exchange_binding(
        &mut self,
        destination: &ShortString,
        source: &ShortString,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> AmqpResult {
        self.check_access(Access::Write, Resource::Exchange, destination.as_str())?;
        if is_default(destination.as_str()) || is_default(source.as_str()) {
            return Err(default_exchange_refused());
        }
        self.check_access(Access::Read, Resource::Exchange, source.as_str())?;
        self.check_topic_access(Access::Read, source.as_str(), routing_key.as_str())?;
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        let missing = |name: &str| {
            AmqpError::not_found(format!("no {}", exchange_resource(name, &vhost.name)))
        };
        let binding = Binding {
            destination: Destination::Exchange(destination.as_str().into()),
            routing_key: routing_key.to_string(),
            arguments,
        };
        if bind {
            // The source is named first when both are missing, as RabbitMQ does.
            if !state.exchanges.contains_key(source.as_str()) {
                return Err(missing(source.as_str()));
            }
            if !state.exchanges.contains_key(destination.as_str()) {
                return Err(missing(destination.as_str()));
            }
            if let Some(exchange) = state.exchanges.get_mut(source.as_str()) {
                exchange.bind(binding);
            }
        } else if let Some(exchange) = state.exchanges.get_mut(source.as_str())
            && exchange.unbind(&binding)
            && exchange.auto_delete
            && exchange.bindings.is_empty()
        {
            state.delete_exchange(source.as_str());
        }
        Ok(())
    }

    fn exchange_delete(&mut self, ch: u16, m: exchange::Delete) -> AmqpResult {
        let vhost = self.vhost.clone();
        let name = m.exchange.as_str();
        if is_default(name) {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system {} not allowed",
                exchange_resource(name, &vhost.name)
            )));
        }
        self.check_access(Access::Configure, Resource::Exchange, name)?;
        let mut state = vhost.lock();
        match state.exchanges.get(name) {
            // Deleting an exchange that does not exist succeeds, as in RabbitMQ.
            None => {}
            Some(e) if m.if_unused && !e.bindings.is_empty() => {
                return Err(AmqpError::precondition_failed(format!(
                    "{} in use",
                    exchange_resource(name, &vhost.name)
                )));
            }
            Some(_) => state.delete_exchange(name),
        }
        drop(state);
        if !m.nowait {
            send_exchange(
                self,
                ch,
                exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}),
            );
        }
        Ok(())
    }
}

/// How an exchange was declared, besides its type and arguments.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ExchangeFlags {
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
}

/// Creates exchange `name` of type `kind` in vhost `vhost` (which has none of that name),
/// refused as RabbitMQ refuses it, with the policy that applies to it.
pub(crate) fn create_exchange(
    state: &mut VhostState,
    vhost: &str,
    name: &str,
    kind: ExchangeKind,
    flags: ExchangeFlags,
    arguments: FieldTable,
) -> AmqpResult {
    if name.starts_with("amq.") {
        return Err(AmqpError::access_refused(format!(
            "exchange name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    if let Some(alternate) = arguments.inner().get("alternate-exchange")
        && !matches!(alternate, AMQPValue::LongString(_))
    {
        return Err(AmqpError::precondition_failed(format!(
            "invalid type '{}' for arg 'alternate-exchange' in {}",
            crate::methods::queue::type_name(alternate),
            exchange_resource(name, vhost)
        )));
    }
    let mut exchange = Exchange::declared(
        kind,
        flags.durable,
        flags.auto_delete,
        flags.internal,
        arguments,
    );
    exchange.policy_alternate = state
        .policies
        .for_exchange(name)
        .and_then(|p| p.definition.alternate_exchange.clone());
    state.exchanges.insert(name.to_owned(), exchange);
    Ok(())
}
