//! Sender-selected distribution, as RabbitMQ 3.10 does it: a publish's `CC` and `BCC` headers
//! (arrays of strings) name routing keys it is routed with besides its own, through the same
//! exchange. `BCC` is removed from the message before it is routed, so no consumer sees it;
//! `CC` stays. A `CC` or `BCC` that is not an array refuses the publish (406); entries that
//! are not long strings are ignored.
//!
//! A dead letter is routed with its own key and its `CC` keys unless its queue sets
//! `x-dead-letter-routing-key`, which replaces them (and removes `CC`); `x-death` lists its
//! key and `CC` keys as `routing-keys` ([`cc_keys`]).

use crate::error::AmqpError;
use crate::methods::queue::type_name;
use amq_protocol::types::{AMQPValue, FieldTable};

/// The routing keys a publish's headers add, and its headers as routed (without `BCC`).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HeaderRoutes {
    /// `CC` keys, then `BCC` keys, as the headers list them.
    pub(crate) keys: Vec<String>,
    /// The headers without `BCC`, when they had one (the message's properties must change).
    pub(crate) without_bcc: Option<FieldTable>,
    /// How many of `keys`, at the end, came from `BCC`.
    pub(crate) bcc_count: usize,
}

/// Reads `CC` and `BCC` from a publish's headers; a value that is not an array is refused as
/// RabbitMQ refuses it (406 `invalid message: {unacceptable_type_in_header,"CC",longstr}`).
///
/// ```ignore
/// let routes = header_routes(Some(&headers))?; // headers: CC = ["b"], BCC = ["c"]
/// assert_eq!(routes.keys, ["b", "c"]);
/// ```
pub(crate) fn header_routes(headers: Option<&FieldTable>) -> Result<HeaderRoutes, AmqpError> {
    let Some(headers) = headers else {
        return Ok(HeaderRoutes::default());
    };
    let mut routes = HeaderRoutes::default();
    for name in ["CC", "BCC"] {
        match headers.inner().get(name) {
            None => {}
            Some(AMQPValue::FieldArray(entries)) => {
                let before = routes.keys.len();
                routes.keys.extend(strings(entries.as_slice()));
                if name == "BCC" {
                    routes.bcc_count = routes.keys.len() - before;
                }
            }
            Some(other) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                    type_name(other)
                )));
            }
        }
    }
    if headers.contains_key("BCC") {
        routes.without_bcc = Some(without(headers, "BCC"));
    }
    Ok(routes)
}

/// `headers` without the header `name`.
pub(crate) fn without(headers: &FieldTable, name: &str) -> FieldTable {
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != name)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.into()
}

/// The `CC` keys in headers already checked (a dead letter's): its long-string entries.
pub(crate) fn cc_keys(headers: Option<&FieldTable>) -> Vec<String> {
    match headers.and_then(|h| h.inner().get("CC")) {
        Some(AMQPValue::FieldArray(entries)) => strings(entries.as_slice()).collect(),
        _ => Vec::new(),
    }
}

/// The long-string entries of an array, as keys (other entries route nowhere in RabbitMQ).
fn strings(entries: &[AMQPValue]) -> impl Iterator<Item = String> + '_ {
    entries.iter().filter_map(|entry| match entry {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{FieldArray, LongString};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert((*k).into(), v.clone());
        }
        table
    }

    #[test]
    fn cc_and_bcc_keys_are_read_and_bcc_is_removed() {
        let cc = AMQPValue::FieldArray(FieldArray::from(vec![text("b"), AMQPValue::LongInt(1)]));
        let bcc = AMQPValue::FieldArray(FieldArray::from(vec![text("c")]));
        let h = headers(&[("CC", cc.clone()), ("BCC", bcc), ("other", text("x"))]);
        let routes = header_routes(Some(&h)).unwrap();
        assert_eq!(routes.keys, ["b", "c"]);
        assert_eq!(
            routes.without_bcc,
            Some(headers(&[("CC", cc), ("other", text("x"))]))
        );
        assert_eq!(cc_keys(Some(&h)), ["b"]);
    }

    #[test]
    fn headers_without_cc_or_bcc_change_nothing() {
        let h = headers(&[("other", text("x"))]);
        assert_eq!(header_routes(Some(&h)).unwrap(), HeaderRoutes::default());
        assert_eq!(header_routes(None).unwrap(), HeaderRoutes::default());
    }

    #[test]
    fn a_cc_that_is_not_an_array_is_refused_naming_its_type() {
        let h = headers(&[("BCC", AMQPValue::LongInt(5))]);
        let e = header_routes(Some(&h)).unwrap_err();
        assert_eq!(e.code, 406);
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,\"BCC\",signedint}"
        );
    }
}
