//! The standalone binary's `--policy` and `--definitions`: a policy in the shape of RabbitMQ's
//! definitions export governs the queues it matches, and one `rabbitmqctl` would refuse stops
//! the binary with its reason (exit code 1); a definitions file declares its queues.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::{BasicProperties, Connection, types::FieldTable};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const TIMEOUT: Duration = Duration::from_secs(20);

fn broker(policy: &str) -> Command {
    broker_with(&["--policy", policy])
}

fn broker_with(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_warren-broker"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Starts the binary and returns it with the URL it printed.
async fn started(policy: &str) -> (Child, String) {
    started_with(broker(policy)).await
}

async fn started_with(mut command: Command) -> (Child, String) {
    let mut child = command.spawn().expect("spawn warren-broker");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::time::timeout(TIMEOUT, BufReader::new(stdout).lines().next_line())
        .await
        .expect("the broker printed its address in time")
        .expect("read stdout")
        .expect("a line");
    let url = line
        .strip_prefix("warren listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    (child, url)
}

#[tokio::test]
async fn a_policy_given_at_start_governs_the_queues_it_matches() {
    let (_child, url) = started(
        r#"{"name":"limit","pattern":"^jobs$","apply-to":"queues","definition":{"max-length":1}}"#,
    )
    .await;
    let conn = tokio::time::timeout(TIMEOUT, Connection::connect(&url, Default::default()))
        .await
        .expect("connect in time")
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for name in ["jobs", "other"] {
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
        for body in [b"1", b"2", b"3"] {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    name.into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
            tokio::time::timeout(TIMEOUT, confirm)
                .await
                .expect("confirm in time")
                .expect("confirm");
        }
    }
    let count = |name: &'static str| {
        let ch = &ch;
        async move {
            ch.queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
        }
    };
    assert_eq!(count("jobs").await, 1, "the policy's max-length");
    assert_eq!(count("other").await, 3, "not matched");
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn a_policy_rabbitmqctl_would_refuse_stops_the_binary_with_its_reason() {
    for (policy, reason) in [
        (
            r#"{"name":"p","pattern":".*","definition":{"expires":0}}"#,
            "0 is not a valid queue expiry",
        ),
        (
            r#"{"name":"p","pattern":".*","definition":{"bogus":1}}"#,
            "are not recognised policy settings",
        ),
        (
            r#"{"name":"p","pattern":"(","definition":{"max-length":1}}"#,
            "pattern should be regular expression",
        ),
    ] {
        let out = tokio::time::timeout(TIMEOUT, broker(policy).output())
            .await
            .expect("the broker exited in time")
            .expect("run warren-broker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{policy}: {stderr}");
        assert!(stderr.contains(reason), "{policy}: {stderr}");
    }
}

#[tokio::test]
async fn a_definitions_file_declares_its_queues_and_a_bad_one_stops_the_binary() {
    let dir = std::env::temp_dir();
    let good = dir.join(format!("warren-defs-{}.json", std::process::id()));
    std::fs::write(
        &good,
        r#"{"vhosts": [{"name": "/"}, {"name": "orders"}],
            "queues": [{"name": "jobs", "vhost": "orders", "durable": true, "auto_delete": false,
                        "arguments": {}}]}"#,
    )
    .expect("write definitions");
    let (_child, url) =
        started_with(broker_with(&["--definitions", &good.to_string_lossy()])).await;
    let orders = url.replace("/%2F", "/orders");
    let conn = tokio::time::timeout(TIMEOUT, Connection::connect(&orders, Default::default()))
        .await
        .expect("connect in time")
        .expect("connect to the vhost the definitions added");
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("jobs".into(), passive, FieldTable::default())
        .await
        .expect("the queue the definitions declared");
    let _ = conn.close(200, "bye".into()).await;

    let bad = dir.join(format!("warren-defs-bad-{}.json", std::process::id()));
    std::fs::write(&bad, r#"{"queues": [{"vhost": "/"}]}"#).expect("write definitions");
    let out = tokio::time::timeout(
        TIMEOUT,
        broker_with(&["--definitions", &bad.to_string_lossy()]).output(),
    )
    .await
    .expect("the broker exited in time")
    .expect("run warren-broker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no string 'name'"), "{stderr}");
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}
