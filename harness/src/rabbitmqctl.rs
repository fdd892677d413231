//! Policies, vhosts, users, permissions and connections on an external RabbitMQ, through
//! `rabbitmqctl`
//! (the management plugin may be off; `rabbitmqctl` is always there beside the node). `WARREN_RABBITMQCTL` replaces the command,
//! e.g. `docker exec rabbit rabbitmqctl`.

use std::time::Duration;
use warren_broker::{PolicyDefinition, PolicyError, ResourceAlarm};

/// The variable that replaces the `rabbitmqctl` command (split at whitespace).
const COMMAND_ENV: &str = "WARREN_RABBITMQCTL";
/// How long one `rabbitmqctl` may take (it starts an Erlang VM: about half a second).
const TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`run_quietly`] looks whether its `rabbitmqctl` has exited.
const CHILD_POLL: Duration = Duration::from_millis(20);

/// The command and its leading arguments.
fn command() -> Vec<String> {
    let configured = std::env::var(COMMAND_ENV).unwrap_or_default();
    let words: Vec<String> = configured.split_whitespace().map(str::to_owned).collect();
    if words.is_empty() {
        vec!["rabbitmqctl".to_owned()]
    } else {
        words
    }
}

/// Runs `rabbitmqctl` with `args`; its refusal becomes the [`PolicyError`] it stands for.
///
/// # Panics
/// When the command cannot be run or takes longer than [`TIMEOUT`].
pub(crate) async fn run(args: &[&str]) -> Result<(), PolicyError> {
    output(args).await.map(drop)
}

/// Runs `rabbitmqctl` with `args` and returns what it printed; its refusal becomes the
/// [`PolicyError`] it stands for.
///
/// # Panics
/// As [`run`].
async fn output(args: &[&str]) -> Result<String, PolicyError> {
    let command = command();
    let run = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(TIMEOUT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {command:?} (set {COMMAND_ENV} to reach RabbitMQ's): {e}"),
        Err(_) => panic!("{command:?} {args:?} took over {TIMEOUT:?}"),
    };
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(if text.contains("Parameter does not exist") {
        PolicyError::NotFound
    } else if let Some(vhost) = text
        .split_once("Virtual host '")
        .and_then(|(_, rest)| rest.split_once("' does not exist"))
    {
        PolicyError::NoVhost(vhost.0.to_owned())
    } else if text.contains("pattern should be regular expression") {
        PolicyError::InvalidPattern(text)
    } else {
        PolicyError::InvalidDefinition(text)
    })
}

/// The pid (as `close_connection` takes it) of the connection whose client property
/// `connection_name` is `name`, if RabbitMQ lists one.
///
/// # Panics
/// As [`run`], and when `rabbitmqctl list_connections` is refused.
pub(crate) async fn connection_pid(name: &str) -> Option<String> {
    let listing = output(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])
    .await
    .unwrap_or_else(|e| panic!("rabbitmqctl list_connections: {e}"));
    // Each line: `<rabbit@host.1.2.0>\t[{"product","lapin"},...,{"connection_name","NAME"}]`,
    // strings as Erlang prints them.
    let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
    let property = format!("{{\"connection_name\",\"{escaped}\"}}");
    listing.lines().find_map(|line| {
        let (pid, properties) = line.split_once('\t')?;
        properties.contains(&property).then(|| pid.to_owned())
    })
}

/// How `rabbitmqctl` reads, sets and repairs the threshold behind an alarm.
struct Threshold {
    /// RabbitMQ's name of the resource, as `rabbit_alarm` lists it.
    resource: &'static str,
    /// The Erlang expression that reads the threshold: memory `0.4` or
    /// `{absolute,1073741824}`, disk `50000000`.
    read: &'static str,
    /// The `rabbitmqctl` command that sets it.
    set: &'static str,
    /// Its arguments for a threshold out of reach (memory: a high watermark of 1 byte; disk:
    /// a free-space limit of 1 EB), which raises the alarm.
    out_of_reach: &'static [&'static str],
    /// Its argument for RabbitMQ's default, for a person to repair by hand.
    default: &'static str,
}

/// `alarm`'s threshold.
fn threshold(alarm: ResourceAlarm) -> Threshold {
    match alarm {
        ResourceAlarm::Memory => Threshold {
            resource: "memory",
            read: "vm_memory_monitor:get_vm_memory_high_watermark().",
            set: "set_vm_memory_high_watermark",
            out_of_reach: &["absolute", "1"],
            default: "0.4",
        },
        ResourceAlarm::Disk => Threshold {
            resource: "disk",
            read: "rabbit_disk_monitor:get_disk_free_limit().",
            set: "set_disk_free_limit",
            out_of_reach: &["1000000000000000000"],
            default: "50MB",
        },
    }
}

impl Threshold {
    /// The command that puts RabbitMQ's default back, for a person to run.
    fn repair_command(&self) -> String {
        format!("rabbitmqctl {} {}", self.set, self.default)
    }

    /// The arguments that set the threshold to `value`, as [`Threshold::read`] printed it.
    fn set_args(&self, value: &str) -> Option<Vec<String>> {
        let value = match value.strip_prefix("{absolute,") {
            Some(rest) => {
                let bytes: u64 = rest.strip_suffix('}')?.trim().parse().ok()?;
                vec!["absolute".to_owned(), bytes.to_string()]
            }
            None if self.resource == "memory" => vec![value.parse::<f64>().ok()?.to_string()],
            None => vec![value.parse::<u64>().ok()?.to_string()],
        };
        Some(std::iter::once(self.set.to_owned()).chain(value).collect())
    }
}

/// The `rabbitmqctl` arguments that put `alarm`'s threshold back as it is now, read before
/// [`raise_alarm`] changes it.
///
/// # Panics
/// As [`run`]; and when the alarm is raised already or its threshold is already out of
/// reach (a test killed before it could put it back), naming the command that repairs it.
pub(crate) async fn alarm_restore_args(alarm: ResourceAlarm) -> Vec<String> {
    let threshold = threshold(alarm);
    let before = eval(threshold.read).await;
    let before = before.trim();
    let restore = threshold
        .set_args(before)
        .unwrap_or_else(|| panic!("unexpected {alarm:?} threshold from rabbitmqctl: {before}"));
    if restore[1..] == *threshold.out_of_reach || alarm_listed(&threshold).await {
        panic!(
            "RabbitMQ's {alarm:?} alarm is raised already (threshold {before}): another test \
             holds it, or one was killed before it could put it back (`{}`)",
            threshold.repair_command()
        );
    }
    restore
}

/// Raises `alarm` on RabbitMQ by setting its threshold out of reach, and waits until the node
/// lists the alarm. Read [`alarm_restore_args`] first.
///
/// # Panics
/// As [`run`], when the command is refused, or when the alarm does not show within
/// `timeout`.
pub(crate) async fn raise_alarm(alarm: ResourceAlarm, timeout: Duration) {
    let threshold = threshold(alarm);
    let raise: Vec<&str> = std::iter::once(threshold.set)
        .chain(threshold.out_of_reach.iter().copied())
        .collect();
    run(&raise)
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl {raise:?}: {e}"));
    await_alarm(&threshold, true, timeout).await;
}

/// Puts an alarm's threshold back (the arguments [`alarm_restore_args`] returned) and waits
/// until the node no longer lists the alarm.
///
/// # Panics
/// As [`raise_alarm`].
pub(crate) async fn clear_alarm(alarm: ResourceAlarm, restore: &[String], timeout: Duration) {
    let args: Vec<&str> = restore.iter().map(String::as_str).collect();
    run(&args)
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}"));
    await_alarm(&threshold(alarm), false, timeout).await;
}

/// Puts an alarm's threshold back at the end of a test, saying on stderr how to repair it
/// by hand when that fails.
pub(crate) fn restore_quietly(alarm: ResourceAlarm, restore: &[String]) {
    let args: Vec<&str> = restore.iter().map(String::as_str).collect();
    if !run_quietly(&args) {
        eprintln!(
            "warren-harness: could not put RabbitMQ's {alarm:?} threshold back ({args:?}); \
             its alarm may still block every publisher: run `{}`",
            threshold(alarm).repair_command()
        );
    }
}

/// Waits until the node lists the alarm of `threshold` (`raised`) or no longer does.
async fn await_alarm(threshold: &Threshold, raised: bool, timeout: Duration) {
    let state = if raised { "raised" } else { "cleared" };
    let what = format!("RabbitMQ's {} alarm is {state}", threshold.resource);
    crate::wait_until(&what, timeout, || async {
        if alarm_listed(threshold).await == raised {
            Ok(())
        } else {
            Err(format!(
                "not yet (by hand: `{}`)",
                threshold.repair_command()
            ))
        }
    })
    .await;
}

/// Whether the node lists the alarm of `threshold` among its alarms.
async fn alarm_listed(threshold: &Threshold) -> bool {
    // e.g. [{{resource_limit,memory,rabbit@host},[]}]
    eval("rabbit_alarm:get_alarms().")
        .await
        .contains(&format!("{{resource_limit,{},", threshold.resource))
}

/// Sets the `rabbit` application's environment `key` to `value` (an Erlang term) on the node,
/// as `application:set_env` does, and returns the expression that puts its value back.
///
/// # Panics
/// As [`run`], and when it is refused.
pub(crate) async fn set_rabbit_env(key: &str, value: &str) -> String {
    // `{ok,1800000}`, or `undefined`.
    let before = eval(&format!("application:get_env(rabbit, {key}).")).await;
    let restore = match before
        .trim()
        .strip_prefix("{ok,")
        .and_then(|v| v.strip_suffix('}'))
    {
        Some(old) => format!("application:set_env(rabbit, {key}, {old})."),
        None => format!("application:unset_env(rabbit, {key})."),
    };
    eval(&format!("application:set_env(rabbit, {key}, {value}).")).await;
    restore
}

/// Evaluates `expression` on the node, ignoring any failure (cleanup at the end of a test).
pub(crate) fn eval_quietly(expression: &str) {
    run_quietly(&["eval", expression]);
}

/// What `rabbitmqctl eval EXPRESSION` printed.
///
/// # Panics
/// As [`run`], and when it is refused.
async fn eval(expression: &str) -> String {
    output(&["eval", expression])
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl eval {expression}: {e}"))
}

/// Clears a policy, ignoring any failure (cleanup at the end of a test).
pub(crate) fn clear_quietly(vhost: &str, name: &str) {
    run_quietly(&["clear_policy", "--vhost", vhost, name]);
}

/// Deletes a vhost, ignoring any failure (cleanup at the end of a test).
pub(crate) fn delete_vhost_quietly(vhost: &str) {
    run_quietly(&["delete_vhost", vhost]);
}

/// Deletes a user, ignoring any failure (cleanup at the end of a test).
pub(crate) fn delete_user_quietly(user: &str) {
    run_quietly(&["delete_user", user]);
}

/// Runs `rabbitmqctl` with `args`, its output dropped, killing it after [`TIMEOUT`];
/// whether it succeeded.
fn run_quietly(args: &[&str]) -> bool {
    let command = command();
    let Ok(mut child) = std::process::Command::new(&command[0])
        .args(&command[1..])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(CHILD_POLL),
            Ok(Some(status)) => return status.success(),
            Err(_) => return false,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The JSON definition `rabbitmqctl set_policy` takes.
pub(crate) fn definition_json(definition: &PolicyDefinition) -> String {
    let PolicyDefinition {
        message_ttl,
        expires,
        max_length,
        max_length_bytes,
        overflow,
        dead_letter_exchange,
        dead_letter_routing_key,
        delivery_limit,
        alternate_exchange,
        inert,
    } = definition;
    let mut json = serde_json::Map::new();
    let mut put = |key: &str, value: Option<serde_json::Value>| {
        if let Some(value) = value {
            json.insert(key.to_owned(), value);
        }
    };
    put("message-ttl", message_ttl.map(Into::into));
    put("expires", expires.map(Into::into));
    put("max-length", max_length.map(Into::into));
    put("max-length-bytes", max_length_bytes.map(Into::into));
    put("overflow", overflow.map(|o| o.as_str().into()));
    put(
        "dead-letter-exchange",
        dead_letter_exchange.clone().map(Into::into),
    );
    put(
        "dead-letter-routing-key",
        dead_letter_routing_key.clone().map(Into::into),
    );
    put("delivery-limit", delivery_limit.map(Into::into));
    put(
        "alternate-exchange",
        alternate_exchange.clone().map(Into::into),
    );
    json.extend(inert.iter().map(|(k, v)| (k.clone(), v.clone())));
    serde_json::Value::Object(json).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_broker::{Overflow, Policy};

    #[test]
    fn a_definition_is_rabbitmqctl_json() {
        let policy = Policy::new("p", ".*")
            .max_length(2)
            .overflow(Overflow::RejectPublishDlx)
            .dead_letter_exchange("dl\"x");
        assert_eq!(
            definition_json(&policy.definition),
            r#"{"dead-letter-exchange":"dl\"x","max-length":2,"overflow":"reject-publish-dlx"}"#
        );
    }
}
