//! The channel class: open (handled before a channel exists), flow, close.

use crate::channel::TxBuffer;
use crate::connection::Connection;
use crate::error::{AmqpError, AmqpResult};
use amq_protocol::protocol::{AMQPClass, channel, tx};

impl Connection {
    pub(crate) fn channel_class(&mut self, ch: u16, method: channel::AMQPMethod) -> AmqpResult {
        match method {
            channel::AMQPMethod::Open(_) => {
                Err(AmqpError::channel_error("second 'channel.open' seen"))
            }
            channel::AMQPMethod::Flow(flow) if flow.active => {
                self.send(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(())
            }
            // RabbitMQ 3.10 refuses to stop a channel's deliveries this way.
            channel::AMQPMethod::Flow(_) => Err(AmqpError::not_implemented("active=false")),
            channel::AMQPMethod::FlowOk(_) => Err(AmqpError::server_method()),
            channel::AMQPMethod::Close(_) => {
                self.flush_confirms_of(ch);
                self.release_channel(ch);
                self.channels.remove(&ch);
                self.send(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            channel::AMQPMethod::CloseOk(_) => Ok(()),
            channel::AMQPMethod::OpenOk(_) => Err(AmqpError::server_method()),
        }
    }

    pub(crate) fn confirm_select(&mut self, ch: u16, nowait: bool) -> AmqpResult {
        let channel = self.channel_mut(ch);
        if channel.tx.is_some() {
            return Err(AmqpError::precondition_failed(
                "cannot switch from tx to confirm mode",
            ));
        }
        if channel.next_confirm.is_none() {
            channel.next_confirm = Some(1);
        }
        if !nowait {
            self.send(
                ch,
                AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::SelectOk(
                    amq_protocol::protocol::confirm::SelectOk {},
                )),
            );
        }
        Ok(())
    }
}

impl Connection {
    /// The tx class: select, commit, rollback.
    pub(crate) fn tx_class(&mut self, ch: u16, method: tx::AMQPMethod) -> AmqpResult {
        let clock = self.clock;
        let channel = self.channel_mut(ch);
        let reply = match method {
            tx::AMQPMethod::Select(_) => {
                if channel.next_confirm.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                channel.tx.get_or_insert_with(TxBuffer::default);
                tx::AMQPMethod::SelectOk(tx::SelectOk {})
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(buffer) = channel.tx.replace(TxBuffer::default()) else {
                    return Err(not_transactional());
                };
                for (settled, how) in buffer.settles {
                    self.apply_settle(ch, settled, how);
                }
                for (publication, message) in buffer.publishes {
                    self.route(ch, publication, message)?;
                }
                tx::AMQPMethod::CommitOk(tx::CommitOk {})
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(buffer) = channel.tx.replace(TxBuffer::default()) else {
                    return Err(not_transactional());
                };
                // Acks taken back: the deliveries are unacknowledged again (in one merge).
                channel.unacked.put_back(
                    buffer.settles.into_iter().flat_map(|(settled, _)| settled),
                    clock,
                );
                tx::AMQPMethod::RollbackOk(tx::RollbackOk {})
            }
            _ => {
                return Err(AmqpError::server_method());
            }
        };
        self.send(ch, AMQPClass::Tx(reply));
        Ok(())
    }
}

fn not_transactional() -> AmqpError {
    AmqpError::precondition_failed("channel is not transactional")
}
