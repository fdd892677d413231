//! Publisher confirms: confirm.select, exactly one basic.ack (possibly `multiple`) for every
//! publish (RabbitMQ may ack out of order; in-order acking also passes), and the basic.return of
//! an unroutable mandatory publish written before its ack.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic, confirm},
};
use lapin::{BasicProperties, Confirmation, options::BasicPublishOptions};
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, assert_amqp_error, assert_channel_closed_only, channel, close_conn,
    confirm_channel, declare, delete_quietly, drain_bodies, raw::RawClient, within,
};

fn select(nowait: bool) -> AMQPClass {
    AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait }))
}

/// The publishes of a confirm-mode channel still waiting for their ack. RabbitMQ may ack out
/// of order (an unroutable publish is acked before earlier routed ones) and a `multiple` ack
/// confirms every still-unconfirmed tag up to it; no tag may be confirmed twice or nacked.
#[derive(Default)]
struct Pending(std::collections::BTreeSet<u64>);

impl Pending {
    fn published(&mut self, tag: u64) {
        assert!(self.0.insert(tag));
    }

    /// Applies one basic.ack; returns the tags it confirmed.
    fn ack(&mut self, a: &basic::Ack) -> Vec<u64> {
        if a.multiple {
            let done: Vec<u64> = self.0.range(..=a.delivery_tag).copied().collect();
            assert!(!done.is_empty(), "multiple ack {a:?} confirms nothing new");
            for t in &done {
                self.0.remove(t);
            }
            done
        } else {
            assert!(
                self.0.remove(&a.delivery_tag),
                "ack of tag {} that is not pending (unknown or already confirmed)",
                a.delivery_tag
            );
            vec![a.delivery_tag]
        }
    }

    /// Reads basic.ack frames on channel 1 until nothing is pending.
    async fn drain(&mut self, c: &mut RawClient) {
        while !self.0.is_empty() {
            match c.recv_frame().await {
                AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
                    self.ack(&a);
                }
                other => panic!("expected basic.ack, pending {:?}, got {other:?}", self.0),
            }
        }
    }
}

#[tokio::test]
async fn confirm_select_then_every_publish_is_acked_exactly_once() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let ok = c.rpc(1, select(false)).await;
    assert_eq!(
        ok,
        AMQPFrame::Method(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {}))
        )
    );
    let q = broker.unique_name("confirms");
    c.declare_queue(1, &q).await;
    let mut pending = Pending::default();
    for i in 0..50u8 {
        c.publish(1, &q, &[i]).await;
        pending.published(u64::from(i) + 1);
    }
    pending.drain(&mut c).await;
    // Unroutable (not mandatory) publishes are acked too, and tags keep counting.
    c.publish(1, &broker.unique_name("nowhere"), b"dropped")
        .await;
    c.publish(1, &q, b"last").await;
    pending.published(51);
    pending.published(52);
    pending.drain(&mut c).await;
    assert_eq!(c.purge(1, &q).await, 51);
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn confirm_select_nowait_has_no_reply_but_takes_effect() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_method(1, select(true)).await;
    let q = broker.unique_name("confirms-nowait");
    // The next frame is declare-ok, not select-ok.
    c.declare_queue(1, &q).await;
    c.publish(1, &q, b"x").await;
    match c.recv_frame().await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
            assert_eq!(a.delivery_tag, 1)
        }
        other => panic!("expected basic.ack 1, got {other:?}"),
    }
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn basic_return_is_written_before_the_ack_of_an_unroutable_mandatory_publish() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.rpc(1, select(false)).await;
    let q = broker.unique_name("confirm-return");
    c.declare_queue(1, &q).await;
    let nowhere = broker.unique_name("no-route");
    c.publish_full(1, "", &q, true, b"routed", Default::default())
        .await;
    c.publish_full(1, "", &nowhere, true, b"returned", Default::default())
        .await;
    c.publish_full(1, "", &q, true, b"routed too", Default::default())
        .await;
    // The return comes before the ack that confirms publish 2.
    let mut pending = Pending::default();
    for t in 1..=3 {
        pending.published(t);
    }
    let mut returned = false;
    while !pending.0.is_empty() {
        match c.recv_frame().await {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
                assert_eq!((r.reply_code, r.reply_text.as_str()), (312, "NO_ROUTE"));
                assert_eq!(r.routing_key.as_str(), nowhere);
                assert!(
                    pending.0.contains(&2),
                    "the return must precede the ack of publish 2"
                );
                match c.recv_frame().await {
                    AMQPFrame::Header(1, h) => assert_eq!(h.body_size, 8),
                    other => panic!("expected the returned header, got {other:?}"),
                }
                assert_eq!(
                    c.recv_frame().await,
                    AMQPFrame::Body(1, b"returned".to_vec())
                );
                returned = true;
            }
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
                let confirmed = pending.ack(&a);
                if confirmed.contains(&2) {
                    assert!(returned, "publish 2 acked before its basic.return");
                }
            }
            other => panic!("expected basic.return or basic.ack, got {other:?}"),
        }
    }
    assert!(returned);
    assert_eq!(c.purge(1, &q).await, 2);
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn lapin_sees_acks_and_the_returned_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("lapin-confirms");
    declare(&ch, &q).await;
    let mut confirms = Vec::new();
    for i in 0..20u8 {
        confirms.push(
            within(
                "publish",
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &[i],
                    BasicProperties::default(),
                ),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        let confirmation = within("confirm", c).await.expect("confirm");
        assert_eq!(confirmation, Confirmation::Ack(None));
    }
    let nowhere = broker.unique_name("nowhere");
    let confirm = within(
        "publish",
        ch.basic_publish(
            "".into(),
            nowhere.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"bounce",
            BasicProperties::default().with_correlation_id("c-1".into()),
        ),
    )
    .await
    .expect("publish");
    match within("confirm", confirm).await.expect("confirm") {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.reply_code, 312);
            assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(returned.delivery.routing_key.as_str(), nowhere);
            assert_eq!(returned.delivery.data, b"bounce");
            assert_eq!(
                returned
                    .delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|s| s.as_str()),
                Some("c-1")
            );
        }
        other => panic!("expected an ack carrying the returned message, got {other:?}"),
    }
    assert_eq!(drain_bodies(&ch, &q).await.len(), 20);
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn publish_to_a_missing_exchange_in_confirm_mode_closes_the_channel_404() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    let x = broker.unique_name("no-exchange");
    let confirm = within(
        "publish",
        ch.basic_publish(
            x.as_str().into(),
            "rk".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish is written");
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        404,
        Some(&format!("NOT_FOUND - no exchange '{x}' in vhost '/'")),
    );
    // The pending confirm fails rather than hanging.
    assert!(within("confirm", confirm).await.is_err());
    assert_channel_closed_only(&conn, &ch).await;
    let _ = channel(&conn).await;
    close_conn(&conn).await;
}

/// Publishes read in the same write as connection.close are confirmed before close-ok.
/// Embedded only: RabbitMQ may drop confirms still pending when the connection closes.
#[tokio::test]
async fn publishes_sent_with_connection_close_are_confirmed_before_close_ok() {
    if warren_tests::external() {
        return;
    }
    use amq_protocol::protocol::connection;
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.rpc(1, select(false)).await;
    let q = broker.unique_name("confirm-close");
    c.declare_queue(1, &q).await;
    let mut batch = RawClient::publish_frames(1, "", &q, false, b"x", Default::default());
    batch.extend(RawClient::encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )));
    c.send_bytes(&batch).await;
    match c.recv_frame().await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
            assert_eq!(a.delivery_tag, 1)
        }
        other => panic!("expected basic.ack 1 before close-ok, got {other:?}"),
    }
    match c.recv_frame().await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    let admin = broker.connect().await;
    let ch = channel(&admin).await;
    delete_quietly(&ch, &q).await;
    close_conn(&admin).await;
}
