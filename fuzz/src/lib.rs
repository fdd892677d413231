//! Shared code of Warren's fuzz targets: the client handshake bytes, the whole-connection case,
//! and an optional big-stack worker thread.
//!
//! Every target runs with libfuzzer-sys's panic hook, which aborts the process on any panic in
//! any thread: a panic inside a broker task (which tokio would otherwise turn into a
//! `JoinError`) is a crash the fuzzer records.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{FieldTable, LongString};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_broker::{Broker, BrokerConfig, BrokerHandle};

/// How long (in the paused runtime's virtual time) a connection may take to end once the
/// client has sent everything and closed its side. The broker's own timers (close-ok wait 3 s,
/// linger 1 s) fit well inside; a connection still running after this hangs.
pub const VIRTUAL_DEADLINE: Duration = Duration::from_secs(120);

/// Most bytes of broker output kept for the well-formedness check (the rest is only counted).
const KEEP_OUTPUT: usize = 8 << 20;

fn encode(frames: &[AMQPFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        out = gen_frame(frame)(WriteContext::from(out))
            .expect("encoding into a Vec cannot fail")
            .into_inner()
            .0;
    }
    out
}

/// A valid client opening: protocol header, start-ok (PLAIN guest/guest), tune-ok (the
/// broker's limits, heartbeats off) and connection.open `/`, as one write.
pub fn handshake_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
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
                    frame_max: 131_072,
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
    })
}

/// channel.open on channel 1. The fuzzed connection sends it in the same write as the
/// handshake (frames pipelined behind connection.open were once left unprocessed); the second
/// client sends it after open-ok.
pub fn channel_open_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        encode(&[AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )])
    })
}

/// Reads from `rd` into `buf` until the whole frames in it include one matching `pred`.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    pred: impl Fn(&AMQPFrame) -> bool,
) -> bool {
    let mut scratch = [0u8; 4096];
    loop {
        if server_frames_prefix(buf).iter().any(&pred) {
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

/// Parses everything the broker wrote: it must be whole, well-formed frames (the last one may
/// be cut only if the output was truncated to [`KEEP_OUTPUT`]). Returns the frames.
fn server_frames(mut out: &[u8], truncated: bool) -> Vec<AMQPFrame> {
    let mut frames = Vec::new();
    while !out.is_empty() {
        if out.len() < 8 {
            assert!(
                truncated,
                "broker output ends in a partial frame: {out:02x?}"
            );
            break;
        }
        let size = u32::from_be_bytes([out[3], out[4], out[5], out[6]]) as usize;
        if out.len() < size + 8 {
            assert!(truncated, "broker output ends in a partial frame");
            break;
        }
        match parse_frame(&out[..size + 8]) {
            Ok(([], frame)) => frames.push(frame),
            other => panic!(
                "broker wrote a frame amq-protocol cannot parse ({other:?}): {:02x?}",
                &out[..(size + 8).min(64)]
            ),
        }
        out = &out[size + 8..];
    }
    frames
}

/// Sends `input` (after the handshake) over a `tokio::io::duplex` pipe, closes the client's
/// side and reads until the broker ends the connection. Returns the frames the broker wrote.
///
/// # Panics
/// When the connection is still going after [`VIRTUAL_DEADLINE`], or the broker writes
/// something that is not a sequence of frames.
pub async fn feed_connection(broker: &BrokerHandle, input: &[u8]) -> Vec<AMQPFrame> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    broker.serve_stream(server, "fuzz");
    let (mut rd, mut wr) = tokio::io::split(client);
    let session = async move {
        let mut opening = handshake_bytes().to_vec();
        opening.extend_from_slice(channel_open_bytes());
        wr.write_all(&opening).await.expect("handshake write");
        let mut kept = Vec::new();
        assert!(
            read_until(&mut rd, &mut kept, is_channel_open_ok).await,
            "the pipelined handshake did not end with channel.open-ok"
        );
        let writer = async move {
            // The broker may stop reading (connection closed): a failed write is fine.
            if wr.write_all(input).await.is_ok() {
                let _ = wr.shutdown().await;
            }
            wr
        };
        let reader = async move {
            let mut truncated = false;
            let mut scratch = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if kept.len() + n <= KEEP_OUTPUT {
                            kept.extend_from_slice(&scratch[..n]);
                        } else {
                            truncated = true;
                        }
                    }
                }
            }
            (kept, truncated)
        };
        let (_wr, out) = tokio::join!(writer, reader);
        out
    };
    let Ok((out, truncated)) = tokio::time::timeout(VIRTUAL_DEADLINE, session).await else {
        panic!(
            "connection still open {VIRTUAL_DEADLINE:?} after the client sent {} bytes and closed",
            input.len()
        )
    };
    server_frames(&out, truncated)
}

/// Sends `input` as the whole client side of a connection (protocol header and handshake
/// included, or not), closes the client's side and reads until the broker ends the
/// connection. What the broker wrote must be AMQP's protocol header alone (its answer to a
/// wrong header) or whole frames.
///
/// # Panics
/// When the connection is still going after [`VIRTUAL_DEADLINE`], or the output is malformed.
pub async fn feed_raw(broker: &BrokerHandle, input: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    broker.serve_stream(server, "fuzz-raw");
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = async move {
        if wr.write_all(input).await.is_ok() {
            let _ = wr.shutdown().await;
        }
        wr
    };
    let reader = async move {
        let mut out = Vec::new();
        let mut scratch = vec![0u8; 64 * 1024];
        let mut truncated = false;
        loop {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) if out.len() + n <= KEEP_OUTPUT => out.extend_from_slice(&scratch[..n]),
                Ok(_) => truncated = true,
            }
        }
        (out, truncated)
    };
    let Ok((_wr, (out, truncated))) =
        tokio::time::timeout(VIRTUAL_DEADLINE, async { tokio::join!(writer, reader) }).await
    else {
        panic!(
            "connection still open {VIRTUAL_DEADLINE:?} after the client sent {} bytes and closed",
            input.len()
        )
    };
    if out.starts_with(b"AMQP") {
        assert_eq!(
            &out[..],
            b"AMQP\x00\x00\x09\x01",
            "a protocol header and nothing else"
        );
    } else {
        server_frames(&out, truncated);
    }
}

/// One handshake case: a fresh broker, `input` as the whole client stream, then a second
/// client that must still get in, then a clean shutdown.
pub fn handshake_case(rt: &tokio::runtime::Runtime, input: &[u8]) {
    rt.block_on(async {
        let broker = Broker::start(BrokerConfig::default())
            .await
            .expect("broker starts");
        feed_raw(&broker, input).await;
        second_client_works(&broker).await;
        if tokio::time::timeout(VIRTUAL_DEADLINE, broker.shutdown())
            .await
            .is_err()
        {
            panic!("broker shutdown did not finish");
        }
    });
}

/// A fresh connection through `serve_stream` completes the handshake and opens a channel.
///
/// # Panics
/// When it does not within [`VIRTUAL_DEADLINE`].
pub async fn second_client_works(broker: &BrokerHandle) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    broker.serve_stream(server, "second");
    let (mut rd, mut wr) = tokio::io::split(client);
    let check = async {
        let mut buf = Vec::new();
        wr.write_all(handshake_bytes())
            .await
            .expect("second client write");
        assert!(
            read_until(&mut rd, &mut buf, is_open_ok).await,
            "the second client's handshake failed"
        );
        wr.write_all(channel_open_bytes())
            .await
            .expect("second client write");
        assert!(
            read_until(&mut rd, &mut buf, is_channel_open_ok).await,
            "the second client's channel.open failed"
        );
    };
    if tokio::time::timeout(VIRTUAL_DEADLINE, check).await.is_err() {
        panic!("a second client could not open a channel after the fuzzed connection");
    }
}

/// The whole frames at the start of `buf`.
fn server_frames_prefix(mut buf: &[u8]) -> Vec<AMQPFrame> {
    let mut frames = Vec::new();
    while buf.len() >= 8 {
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        if buf.len() < size + 8 {
            break;
        }
        if let Ok((_, f)) = parse_frame(&buf[..size + 8]) {
            frames.push(f);
        }
        buf = &buf[size + 8..];
    }
    frames
}

/// One whole-connection case: a fresh broker on a paused-clock runtime, the fuzzed
/// connection, then a second client that must still get in, then a clean shutdown.
pub fn connection_case(rt: &tokio::runtime::Runtime, input: &[u8]) {
    rt.block_on(async {
        let broker = Broker::start(BrokerConfig::default())
            .await
            .expect("broker starts");
        feed_connection(&broker, input).await;
        second_client_works(&broker).await;
        if tokio::time::timeout(VIRTUAL_DEADLINE, broker.shutdown())
            .await
            .is_err()
        {
            panic!("broker shutdown did not finish");
        }
    });
}

/// A current-thread runtime with a paused clock: timers fire as soon as every task is idle, so
/// the broker's close-ok wait and linger cost no real time, and a hang shows up as virtual
/// time passing [`VIRTUAL_DEADLINE`].
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

type Job = Box<dyn FnOnce() + Send>;
/// A job and where to say it is done.
type Request = (Job, mpsc::SyncSender<()>);

/// Runs `job` on the fuzzer's own thread, or, when `WARREN_FUZZ_STACK_MB` is set, on a
/// long-lived worker thread with that much stack: a way to fuzz past a stack overflow (as
/// the once unbounded field-table recursion was) while it is being fixed; runs that look for
/// one leave the variable unset.
pub fn run(job: impl FnOnce() + Send + 'static) {
    static WORKER: OnceLock<Option<mpsc::SyncSender<Request>>> = OnceLock::new();
    let worker = WORKER.get_or_init(|| {
        let mb: usize = std::env::var("WARREN_FUZZ_STACK_MB").ok()?.parse().ok()?;
        let (tx, rx) = mpsc::sync_channel::<Request>(0);
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(mb << 20)
            .spawn(move || {
                while let Ok((job, done)) = rx.recv() {
                    job();
                    let _ = done.send(());
                }
            })
            .expect("spawn worker");
        Some(tx)
    });
    match worker {
        None => job(),
        Some(tx) => {
            let (done_tx, done_rx) = mpsc::sync_channel(1);
            tx.send((Box::new(job), done_tx)).expect("worker alive");
            done_rx.recv().expect("worker finished the job");
        }
    }
}
