//! The fuzz targets' property-test equivalent, run by every `cargo test` with a bounded number
//! of cases and of shrinking steps (see `fuzz/` for the cargo-fuzz targets).
//!
//! - The frame decoder (`warren_broker::fuzz::decode_frames`) on arbitrary bytes, and on
//!   sequences of valid frames with one mutation (wrong end octet, wrong size, unknown type,
//!   truncation, shuffled/duplicated/dropped frames), checked against what the mutation implies.
//! - A whole connection (`BrokerHandle::serve_stream` over `tokio::io::duplex`, embedded only)
//!   fed the same inputs after a valid handshake: it must end within a timeout once the client
//!   closes, write only well-formed frames, and a second client must then still open a channel.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, connection, queue, tx};
use amq_protocol::types::{FieldTable, LongString};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_broker::{Broker, BrokerConfig, BrokerHandle};
use warren_tests::external;

/// Cases per property, and most shrinking steps after a failure.
const CASES: u32 = 256;
const SHRINK: u32 = 256;
/// The longest one connection case may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The frame_max the connection negotiates (the broker's default).
const FRAME_MAX: u32 = 131_072;

fn config() -> Config {
    Config {
        cases: CASES,
        max_shrink_iters: SHRINK,
        failure_persistence: None,
        ..Config::default()
    }
}

fn encode(frames: &[AMQPFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out = gen_frame(f)(WriteContext::from(out))
            .expect("encode")
            .into_inner()
            .0;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Structured inputs: valid frames, then one mutation
// ---------------------------------------------------------------------------------------------

/// A valid frame, as generated.
fn arb_frame() -> impl Strategy<Value = AMQPFrame> {
    let ch = 0u16..4;
    let name = "[a-z]{0,8}";
    prop_oneof![
        (ch.clone(), 0u16..100, any::<bool>()).prop_map(|(c, n, global)| AMQPFrame::Method(
            c,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: n,
                global
            }))
        )),
        (ch.clone(), name, any::<bool>()).prop_map(|(c, q, exclusive)| AMQPFrame::Method(
            c,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: q.as_str().into(),
                passive: false,
                durable: false,
                exclusive,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            }))
        )),
        (ch.clone(), name, any::<bool>()).prop_map(|(c, rk, mandatory)| AMQPFrame::Method(
            c,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: rk.as_str().into(),
                mandatory,
                immediate: false,
            }))
        )),
        (ch.clone(), name).prop_map(|(c, q)| AMQPFrame::Method(
            c,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: q.as_str().into(),
                no_ack: false,
            }))
        )),
        (ch.clone(), 0u64..4, any::<bool>()).prop_map(|(c, tag, multiple)| AMQPFrame::Method(
            c,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple
            }))
        )),
        ch.clone().prop_map(|c| AMQPFrame::Method(
            c,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))
        )),
        ch.clone().prop_map(|c| AMQPFrame::Method(
            c,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "".into(),
                class_id: 0,
                method_id: 0,
            }))
        )),
        ch.clone().prop_map(|c| AMQPFrame::Method(
            c,
            AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {}))
        )),
        (ch.clone(), 0u64..20, proptest::option::of("[a-z/]{0,10}")).prop_map(
            |(c, size, content_type)| {
                let mut properties = BasicProperties::default();
                if let Some(ct) = content_type {
                    properties = properties.with_content_type(ct.as_str().into());
                }
                AMQPFrame::Header(
                    c,
                    AMQPContentHeader {
                        class_id: 60,
                        body_size: size,
                        properties,
                    },
                )
            }
        ),
        (ch, proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(c, b)| AMQPFrame::Body(c, b)),
        Just(AMQPFrame::Heartbeat),
    ]
}

/// A whole publish on channel 1 (method, header, body in 1-3 frames), as a client sends it.
fn arb_publish() -> impl Strategy<Value = Vec<AMQPFrame>> {
    (
        "[a-z]{0,6}",
        proptest::collection::vec(any::<u8>(), 0..30),
        1usize..4,
    )
        .prop_map(|(rk, data, pieces)| {
            let mut frames = vec![
                AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                        exchange: "".into(),
                        routing_key: rk.as_str().into(),
                        mandatory: false,
                        immediate: false,
                    })),
                ),
                AMQPFrame::Header(
                    1,
                    AMQPContentHeader {
                        class_id: 60,
                        body_size: data.len() as u64,
                        properties: BasicProperties::default(),
                    },
                ),
            ];
            let size = data.len().div_ceil(pieces).max(1);
            frames.extend(data.chunks(size).map(|c| AMQPFrame::Body(1, c.to_vec())));
            frames
        })
}

/// Frames: a mix of single frames and whole publishes.
fn arb_frames() -> impl Strategy<Value = Vec<AMQPFrame>> {
    proptest::collection::vec(
        prop_oneof![
            3 => arb_frame().prop_map(|f| vec![f]),
            1 => arb_publish(),
        ],
        0..12,
    )
    .prop_map(|groups| groups.into_iter().flatten().collect())
}

/// One change to a sequence of encoded frames (indexes are taken modulo the length).
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// The end octet of frame k becomes this (never 0xCE).
    WrongEnd(usize, u8),
    /// The type octet of frame k becomes an unknown type.
    UnknownType(usize, u8),
    /// The size field of frame k changes by this much.
    WrongSize(usize, i32),
    /// The bytes are cut at this position.
    Truncate(usize),
    /// Frames i and j swap places (content frames out of order).
    Swap(usize, usize),
    /// Frame k is sent twice.
    Duplicate(usize),
    /// Frame k is left out.
    Drop(usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let k = any::<usize>();
    prop_oneof![
        Just(Mutation::None),
        (
            k,
            any::<u8>().prop_filter("not the end octet", |b| *b != 0xCE)
        )
            .prop_map(|(k, b)| Mutation::WrongEnd(k, b)),
        (
            k,
            any::<u8>().prop_filter("unknown", |t| !matches!(t, 1 | 2 | 3 | 8))
        )
            .prop_map(|(k, t)| Mutation::UnknownType(k, t)),
        (k, -20i32..20).prop_map(|(k, d)| Mutation::WrongSize(k, d)),
        k.prop_map(Mutation::Truncate),
        (k, k).prop_map(|(i, j)| Mutation::Swap(i, j)),
        k.prop_map(Mutation::Duplicate),
        k.prop_map(Mutation::Drop),
    ]
}

/// What the decoder must report for mutated frames: exactly (frames, failed), or only that
/// it did not panic.
#[derive(Debug, PartialEq)]
enum Decoded {
    Exactly(usize, bool),
    Anything,
}

/// Applies `m` to the encoded frames; returns the bytes and what decoding them must give.
fn mutate(frames: &[AMQPFrame], m: &Mutation) -> (Vec<u8>, Decoded) {
    let mut encoded: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| encode(std::slice::from_ref(f)))
        .collect();
    let n = encoded.len();
    let join = |e: &[Vec<u8>]| e.concat();
    if n == 0 {
        return (Vec::new(), Decoded::Exactly(0, false));
    }
    match *m {
        Mutation::None => (join(&encoded), Decoded::Exactly(n, false)),
        Mutation::WrongEnd(k, b) => {
            let k = k % n;
            *encoded[k].last_mut().expect("end octet") = b;
            (join(&encoded), Decoded::Exactly(k, true))
        }
        Mutation::UnknownType(k, t) => {
            let k = k % n;
            encoded[k][0] = t;
            (join(&encoded), Decoded::Exactly(k, true))
        }
        Mutation::WrongSize(k, d) => {
            let k = k % n;
            let size = u32::from_be_bytes(encoded[k][3..7].try_into().expect("4"));
            let size = size.saturating_add_signed(d);
            encoded[k][3..7].copy_from_slice(&size.to_be_bytes());
            let expect = if d == 0 {
                Decoded::Exactly(n, false)
            } else {
                Decoded::Anything
            };
            (join(&encoded), expect)
        }
        Mutation::Truncate(at) => {
            let all = join(&encoded);
            let at = at % (all.len() + 1);
            let mut whole = 0;
            let mut end = 0;
            for f in &encoded {
                end += f.len();
                if end <= at {
                    whole += 1;
                }
            }
            (all[..at].to_vec(), Decoded::Exactly(whole, false))
        }
        Mutation::Swap(i, j) => {
            encoded.swap(i % n, j % n);
            (join(&encoded), Decoded::Exactly(n, false))
        }
        Mutation::Duplicate(k) => {
            let f = encoded[k % n].clone();
            encoded.insert(k % n, f);
            (join(&encoded), Decoded::Exactly(n + 1, false))
        }
        Mutation::Drop(k) => {
            encoded.remove(k % n);
            (join(&encoded), Decoded::Exactly(n - 1, false))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoder_takes_arbitrary_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        small in any::<bool>(),
    ) {
        let frame_max = if small { 4096 } else { FRAME_MAX };
        let (frames, _failed) = warren_broker::fuzz::decode_frames(&data, frame_max);
        prop_assert!(frames * 8 <= data.len());
    }

    #[test]
    fn decoder_takes_byte_soup_of_frame_headers(
        parts in proptest::collection::vec(
            (prop_oneof![Just(1u8), Just(2), Just(3), Just(8), any::<u8>()], 0u16..3, 0u32..40,
             proptest::collection::vec(any::<u8>(), 0..40), prop_oneof![Just(0xCEu8), any::<u8>()]),
            0..20),
    ) {
        // Frame-shaped pieces whose size fields may lie about their payloads.
        let mut data = Vec::new();
        for (kind, ch, size, payload, end) in parts {
            data.push(kind);
            data.extend_from_slice(&ch.to_be_bytes());
            data.extend_from_slice(&size.to_be_bytes());
            data.extend_from_slice(&payload);
            data.push(end);
        }
        let (frames, _failed) = warren_broker::fuzz::decode_frames(&data, 4096);
        prop_assert!(frames * 8 <= data.len());
    }

    #[test]
    fn decoder_reports_exactly_what_a_mutation_implies(
        frames in arb_frames(),
        mutation in arb_mutation(),
    ) {
        let (bytes, expected) = mutate(&frames, &mutation);
        let got = warren_broker::fuzz::decode_frames(&bytes, FRAME_MAX);
        if let Decoded::Exactly(n, failed) = expected {
            prop_assert_eq!(got, (n, failed), "{:?} of {:?}", mutation, frames);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A whole connection (embedded only)
// ---------------------------------------------------------------------------------------------

/// Protocol header, start-ok (PLAIN guest/guest), tune-ok (heartbeats off), connection.open.
fn handshake() -> Vec<u8> {
    let mut out = b"AMQP\x00\x00\x09\x01".to_vec();
    out.extend(encode(&[
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: "en_US".into(),
            })),
        ),
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 2047,
                frame_max: FRAME_MAX,
                heartbeat: 0,
            })),
        ),
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ),
    ]));
    out
}

fn channel_open_1() -> Vec<u8> {
    encode(&[AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )])
}

/// Whole frames at the front of `buf`, and whether all of them parse.
fn parse_all(mut buf: &[u8]) -> (Vec<AMQPFrame>, Result<(), String>) {
    let mut frames = Vec::new();
    while buf.len() >= 8 {
        let size = u32::from_be_bytes(buf[3..7].try_into().expect("4")) as usize;
        if buf.len() < size + 8 {
            break;
        }
        match parse_frame(&buf[..size + 8]) {
            Ok(([], f)) => frames.push(f),
            other => {
                return (
                    frames,
                    Err(format!("unparsable frame from the broker: {other:?}")),
                );
            }
        }
        buf = &buf[size + 8..];
    }
    if buf.is_empty() {
        (frames, Ok(()))
    } else {
        (
            frames,
            Err(format!("{} octets of a partial frame", buf.len())),
        )
    }
}

async fn read_until<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    pred: impl Fn(&AMQPFrame) -> bool,
) -> bool {
    let mut scratch = [0u8; 4096];
    loop {
        if parse_all(buf).0.iter().any(&pred) {
            return true;
        }
        match rd.read(&mut scratch).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
        }
    }
}

fn is_open_ok(f: &AMQPFrame) -> bool {
    matches!(
        f,
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))
    )
}

fn is_channel_open_ok(f: &AMQPFrame) -> bool {
    matches!(
        f,
        AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
    )
}

/// Handshake (waiting for open-ok: frames pipelined behind connection.open are a known broker
/// bug, see hostile.rs), channel.open on 1, the input, then the client closes its side. The
/// connection must end and everything the broker wrote must be whole frames.
async fn feed(broker: &BrokerHandle, input: &[u8]) -> Result<(), String> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    broker.serve_stream(server, "proptest");
    let (mut rd, mut wr) = tokio::io::split(client);
    wr.write_all(&handshake())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if !read_until(&mut rd, &mut out, is_open_ok).await {
        return Err("no connection.open-ok".into());
    }
    let writer = async move {
        if wr.write_all(&channel_open_1()).await.is_ok() && wr.write_all(input).await.is_ok() {
            let _ = wr.shutdown().await;
        }
        wr
    };
    let reader = async move {
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let (_wr, out) = tokio::join!(writer, reader);
    parse_all(&out).1
}

/// A fresh connection completes the handshake and opens channel 1.
async fn second_client(broker: &BrokerHandle) -> Result<(), String> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    broker.serve_stream(server, "second");
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut buf = Vec::new();
    wr.write_all(&handshake())
        .await
        .map_err(|e| e.to_string())?;
    if !read_until(&mut rd, &mut buf, is_open_ok).await {
        return Err("second client: no connection.open-ok".into());
    }
    wr.write_all(&channel_open_1())
        .await
        .map_err(|e| e.to_string())?;
    if !read_until(&mut rd, &mut buf, is_channel_open_ok).await {
        return Err("second client: no channel.open-ok".into());
    }
    Ok(())
}

/// Set by the panic hook: a panic inside a broker task is caught by tokio (the task just
/// ends, and the connection with it), so it is detected here rather than by the test harness.
static PANICKED: AtomicBool = AtomicBool::new(false);

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// One connection case on a fresh broker, within [`TIMEOUT`]; no task may panic.
fn connection_case(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<(), TestCaseError> {
    watch_panics();
    let result = connection_case_inner(rt, input);
    if PANICKED.swap(false, Ordering::SeqCst) {
        return Err(TestCaseError::fail(format!(
            "a task panicked (see the output above) on input {input:02x?}"
        )));
    }
    result
}

fn connection_case_inner(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<(), TestCaseError> {
    rt.block_on(async {
        let run = async {
            let broker = Broker::start(BrokerConfig::default())
                .await
                .map_err(|e| e.to_string())?;
            feed(&broker, input).await?;
            second_client(&broker).await?;
            broker.shutdown().await;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(TIMEOUT, run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TestCaseError::fail(e)),
            Err(_) => Err(TestCaseError::fail(format!(
                "no end within {TIMEOUT:?} (a hang) for input {input:02x?}"
            ))),
        }
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn connection_takes_arbitrary_bytes_embedded_only() {
    if external() {
        println!("skipped: embedded only");
        return;
    }
    let rt = runtime();
    proptest!(config(), |(data in proptest::collection::vec(any::<u8>(), 0..2048))| {
        connection_case(&rt, &data)?;
    });
}

#[test]
fn connection_takes_mutated_frame_sequences_embedded_only() {
    if external() {
        println!("skipped: embedded only");
        return;
    }
    let rt = runtime();
    proptest!(config(), |(frames in arb_frames(), mutation in arb_mutation())| {
        let (bytes, _) = mutate(&frames, &mutation);
        connection_case(&rt, &bytes)?;
    });
}
