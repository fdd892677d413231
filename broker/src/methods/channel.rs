//! The channel class: open (handled before a channel exists), flow, close.

use crate::connection::Connection;
use crate::error::{AmqpError, AmqpResult};
use amq_protocol::protocol::{AMQPClass, channel};

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
            channel::AMQPMethod::FlowOk(_) => Ok(()),
            channel::AMQPMethod::Close(_) => {
                self.release_channel(ch);
                self.channels.remove(&ch);
                self.send(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            channel::AMQPMethod::CloseOk(_) => Ok(()),
            channel::AMQPMethod::OpenOk(_) => Err(AmqpError::command_invalid(
                "channel.open_ok is a server method",
            )),
        }
    }

    pub(crate) fn confirm_select(&mut self, ch: u16, nowait: bool) -> AmqpResult {
        let channel = self.channel_mut(ch);
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
