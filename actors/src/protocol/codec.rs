//! Frame decoding: bytes -> [`Inbound`], with an answerable error for bad frames.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    CacheRequest, PublishRequest, QueueRequest, RequestId, RpcError, RpcRequest, SubscribeRequest, UnsubscribeRequest,
};

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// `rpc`
    Rpc(RpcRequest),
    /// `pubsub-subscribe`
    Subscribe(SubscribeRequest),
    /// `pubsub-publish`
    Publish(PublishRequest),
    /// `pubsub-unsubscribe`
    Unsubscribe(UnsubscribeRequest),
    /// `server`, `fabric-gossip`, `fabric-message`: another node speaking. The frame's
    /// bytes go to the fabric's own decoder; the wire layer knows no peer frame.
    Peer,
    /// `cluster-status`: the node's view of the cluster (ours).
    ClusterStatus(ClusterStatusRequest),
    /// `queue`: one queue operation (ours; see [`QueueRequest`]).
    Queue(QueueRequest),
    /// `worker-*`: a worker process speaking. The frame's bytes go to the worker
    /// protocol's own decoder (`worker::wire`).
    Worker,
    /// `cache`: one cache operation (ours; see [`CacheRequest`]).
    Cache(CacheRequest),
}

/// `role: "cluster-status"` — answered with `{role: "cluster-status", u, topology, catalog}`;
/// with `brief: true`, with `{role, u, topology}` where each of `topology.nodes` has only
/// `node` and `state`, and `links` is left out (for polling every node of a large cluster).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatusRequest {
    /// Correlation id.
    pub u: RequestId,
    /// See above.
    #[serde(default)]
    pub brief: bool,
}

/// A frame that cannot be served, with what is needed to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundError {
    /// The frame's `u`, when it had a string one.
    pub u: Option<RequestId>,
    /// The role, when it had one (pub/sub errors are answered with an ack).
    pub role: Option<String>,
    /// The error to send back.
    pub error: RpcError,
}

/// Only what is needed to dispatch and to answer: `role` and a string `u`.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    role: Option<Value>,
    #[serde(default)]
    u: Option<Value>,
}

/// The value of the top-level `"role"` key, found without parsing the frame: a byte scan
/// that tracks nesting and strings. `None` when absent, escaped or not a plain string —
/// the caller then takes the general path.
pub(crate) fn sniff_role(bytes: &[u8]) -> Option<&[u8]> {
    sniff_str(bytes, b"role")
}

/// The value of the top-level string `"key"`, found by the same byte scan: `None` when
/// absent, escaped or not a plain string.
pub(crate) fn sniff_str<'a>(bytes: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let value = top_level_value(bytes, key)?;
    let value = value.strip_prefix(b"\"")?;
    let end = value.iter().position(|&b| b == b'"' || b == b'\\')?;
    (value[end] == b'"').then(|| &value[..end])
}

/// The whole text of the top-level value of `"key"` (string, number, literal, object or
/// array), found by the byte scan, for passing it on without parsing it. Meant for a frame
/// whose syntax a parse has already checked; `None` when absent.
pub(crate) fn top_level_raw<'a>(bytes: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let value = top_level_value(bytes, key)?;
    let (mut depth, mut i) = (0usize, 0usize);
    while i < value.len() {
        match value[i] {
            b'"' => {
                i = string_end(value, i + 1);
                if depth == 0 {
                    return value.get(..=i);
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth <= 1 => {
                // The end of this value (depth 1), or of the enclosing object after a
                // number or literal (depth 0).
                let end = if depth == 1 { i + 1 } else { i };
                return Some(value[..end].trim_ascii_end());
            }
            b'}' | b']' => depth -= 1,
            b',' if depth == 0 => return Some(value[..i].trim_ascii_end()),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the `"` closing the string whose text starts at `start` (escapes skipped),
/// or `bytes.len()` when it is not closed.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < bytes.len() && bytes[i] != b'"' {
        if bytes[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    i.min(bytes.len())
}

/// The top-level string `"u"` of a frame too large to parse, found by the same byte scan
/// as the role (escapes decoded), so even a refused frame is answered under its own `u`.
/// `None` when absent or not a string.
pub fn sniff_u(bytes: &[u8]) -> Option<String> {
    let value = top_level_value(bytes, b"u")?;
    if value.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < value.len() && value[i] != b'"' {
        i += if value[i] == b'\\' { 2 } else { 1 };
    }
    serde_json::from_slice(value.get(..=i)?).ok()
}

/// The bytes right after `"key":` at nesting depth 1 (leading whitespace skipped). A
/// string equal to `key` that is a value, not a key (no `:` after it), is passed over.
fn top_level_value<'a>(bytes: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let (mut depth, mut i) = (0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                i = string_end(bytes, start);
                let text = bytes.get(start..i)?;
                if depth == 1 && text == key {
                    let rest = bytes.get(i + 1..)?;
                    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
                    if rest[colon] == b':' {
                        let value = &rest[colon + 1..];
                        let open = value.iter().position(|b| !b.is_ascii_whitespace())?;
                        return Some(&value[open..]);
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The roles other nodes speak (`server`, `fabric-gossip`, `fabric-message`, `federation`).
pub fn is_peer_role(role: &str) -> bool {
    matches!(role, "server" | "fabric-gossip" | "fabric-message" | "federation")
}

/// Decodes one frame's bytes.
pub fn decode_inbound(bytes: &[u8]) -> Result<Inbound, InboundError> {
    // Hot path: an rpc frame is parsed once, straight into its type. Anything that does
    // not parse takes the general path below, which also builds the error reply.
    match sniff_role(bytes) {
        Some(b"rpc") => {
            if let Ok(request) = serde_json::from_slice::<RpcRequest>(bytes) {
                return exact_integers(bytes, request).map(Inbound::Rpc);
            }
        }
        // A worker's frames are parsed once, by the worker protocol (which judges them).
        Some(role) if role.starts_with(b"worker-") => return Ok(Inbound::Worker),
        // So are another node's, by the fabric (which answers a frame it cannot parse).
        Some(role) if std::str::from_utf8(role).is_ok_and(is_peer_role) => return Ok(Inbound::Peer),
        _ => {}
    }
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| InboundError {
        u: None,
        role: None,
        error: RpcError::invalid(format!("invalid JSON: {e}")),
    })?;
    let u = match envelope.u {
        Some(Value::String(u)) => Some(u),
        _ => None,
    };
    let role = match envelope.role {
        Some(Value::String(role)) => role,
        other => {
            let shown = other.map(|v| v.to_string());
            return Err(InboundError { u, role: None, error: RpcError::unknown_role(shown.as_deref()) });
        }
    };
    let fail = |e: serde_json::Error, u: Option<RequestId>, role: &str| InboundError {
        u,
        role: Some(role.to_owned()),
        error: RpcError::invalid(e.to_string()),
    };
    fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
    match role.as_str() {
        "rpc" => match parse(bytes) {
            Ok(request) => exact_integers(bytes, request).map(Inbound::Rpc),
            Err(e) => Err(fail(e, u, &role)),
        },
        "pubsub-subscribe" => parse(bytes).map(Inbound::Subscribe).map_err(|e| fail(e, u, &role)),
        "pubsub-publish" => parse(bytes).map(Inbound::Publish).map_err(|e| fail(e, u, &role)),
        "pubsub-unsubscribe" => parse(bytes).map(Inbound::Unsubscribe).map_err(|e| fail(e, u, &role)),
        "cluster-status" => parse(bytes).map(Inbound::ClusterStatus).map_err(|e| fail(e, u, &role)),
        "queue" => parse(bytes).map(Inbound::Queue).map_err(|e| fail(e, u, &role)),
        "cache" => parse(bytes).map(Inbound::Cache).map_err(|e| fail(e, u, &role)),
        role if is_peer_role(role) => Ok(Inbound::Peer),
        role if role.starts_with("worker-") => Ok(Inbound::Worker),
        _ => Err(InboundError { u, error: RpcError::unknown_role(Some(&role)), role: Some(role) }),
    }
}

/// Refuses (1002) a request with an integer literal no 64-bit integer holds.
///
/// Without serde_json's `arbitrary_precision` (which would slow every number down and
/// break integers inside the internally tagged peer frames), such a literal is read as
/// the nearest float and a function would return a different number than was sent. Only
/// a float of magnitude 2^63 or more can be such a literal, so the frame's bytes are
/// scanned only when the arguments hold one: the hot path pays one type check per number.
fn exact_integers(bytes: &[u8], request: RpcRequest) -> Result<RpcRequest, InboundError> {
    let suspect = request.cmds.iter().any(|cmd| cmd.args.iter().chain(cmd.kwargs.values()).any(holds_huge_float));
    match suspect.then(|| oversized_integer(bytes)).flatten() {
        None => Ok(request),
        Some(literal) => {
            let shown =
                if literal.len() > 48 { format!("{}...({} digits)", &literal[..40], literal.len()) } else { literal };
            Err(InboundError {
                u: Some(request.u),
                role: Some("rpc".to_owned()),
                error: RpcError::invalid(format!(
                    "integer {shown} does not fit in 64 bits and would be rounded; send it as a string"
                )),
            })
        }
    }
}

/// Whether `value` holds a float that may have been a rounded integer literal.
fn holds_huge_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_f64().is_some_and(|f| n.is_f64() && f.abs() >= 9_223_372_036_854_775_808.0),
        Value::Array(items) => items.iter().any(holds_huge_float),
        Value::Object(map) => map.values().any(holds_huge_float),
        _ => false,
    }
}

/// The first integer literal (outside strings) that neither `i64` nor `u64` holds.
fn oversized_integer(bytes: &[u8]) -> Option<String> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let token = &bytes[start..i];
                if !fits_64_bits(token) {
                    return Some(String::from_utf8_lossy(token).into_owned());
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Whether a number token is a float, or an integer `i64` or `u64` holds.
fn fits_64_bits(token: &[u8]) -> bool {
    if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return true;
    }
    let (negative, digits) = match token.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, token),
    };
    if digits.len() < 19 {
        return true;
    }
    if digits.len() > 20 {
        return false;
    }
    let value = digits.iter().fold(0u128, |acc, d| acc * 10 + u128::from(d.wrapping_sub(b'0')));
    if negative {
        value <= 1u128 << 63
    } else {
        value <= u128::from(u64::MAX)
    }
}

/// Encodes any wire type as compact JSON bytes.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising our own wire types cannot fail: they hold only JSON-representable data
    // (string keys, finite numbers come from parsed JSON or checked arithmetic).
    serde_json::to_vec(message).unwrap_or_else(|e| {
        serde_json::to_vec(&RpcError::invalid(format!("unencodable reply: {e}"))).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value but floats, with strings full of JSON's own punctuation.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\]:, ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z{}\"]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn not_json_is_invalid_without_u() {
        let err = decode_inbound(b"this is not json").unwrap_err();
        assert_eq!(err.u, None);
        assert_eq!(err.error.code, 1002);
        assert!(err.error.details_text().starts_with("invalid JSON"));
    }

    #[test]
    fn missing_role_names_null() {
        let err = decode_inbound(br#"{"u":"e7","cmds":[]}"#).unwrap_err();
        assert_eq!(err.u.as_deref(), Some("e7"));
        assert_eq!(err.error.code, 1004);
        assert_eq!(err.error.details_text(), "Unknown role: null");
    }

    #[test]
    fn numeric_u_counts_as_unknown() {
        let err = decode_inbound(br#"{"role":"rpc","u":123,"cmds":[]}"#).unwrap_err();
        assert_eq!(err.u, None);
        assert!(err.error.details_text().starts_with("invalid type"));
    }

    #[test]
    fn minimal_rpc_decodes_with_defaults() {
        let Ok(Inbound::Rpc(req)) = decode_inbound(br#"{"role":"rpc","u":"a","cmds":[{"name":"e","fun":"echo"}]}"#)
        else {
            panic!("expected rpc");
        };
        assert!(req.cmds[0].args.is_empty() && req.cmds[0].locs.is_empty());
    }

    #[test]
    fn cluster_status_is_full_unless_brief_is_asked() {
        let decode = |frame: &[u8]| match decode_inbound(frame) {
            Ok(Inbound::ClusterStatus(request)) => request.brief,
            other => panic!("expected cluster-status: {other:?}"),
        };
        assert!(!decode(br#"{"role":"cluster-status","u":"s"}"#));
        assert!(decode(br#"{"role":"cluster-status","u":"s","brief":true}"#));
        let err = decode_inbound(br#"{"role":"cluster-status","u":"s","brief":"yes"}"#).unwrap_err();
        assert_eq!((err.u.as_deref(), err.error.code), (Some("s"), 1002));
    }

    #[test]
    fn role_sniffing_reads_only_the_top_level_key() {
        assert_eq!(sniff_role(br#"{"u":"a","role":"rpc","cmds":[]}"#), Some(&b"rpc"[..]));
        assert_eq!(sniff_role(br#"{"role" : "pubsub-publish"}"#), Some(&b"pubsub-publish"[..]));
        assert_eq!(sniff_role(br#"{"x":{"role":"rpc"},"role":"bogus"}"#), Some(&b"bogus"[..]));
        assert_eq!(sniff_role(br#"{"x":"\"role\":\"rpc\""}"#), None);
        assert_eq!(sniff_role(br#"{"role":"r\u0070c"}"#), None);
        assert_eq!(sniff_role(b"not json"), None);
        // A value equal to the key is passed over, not taken for the key.
        assert_eq!(sniff_role(br#"{"u":"role","role":"rpc"}"#), Some(&b"rpc"[..]));
    }

    #[test]
    fn raw_values_are_cut_whole_at_the_top_level() {
        let frame = br#"{"id":"value","value": {"a":[1,{"b":"}]\""}],"c":null} ,"n":-1.5e3 ,"s":"x\"y","t":true}"#;
        let raw = |key: &[u8]| top_level_raw(frame, key).map(|v| std::str::from_utf8(v).unwrap());
        assert_eq!(raw(b"value"), Some(r#"{"a":[1,{"b":"}]\""}],"c":null}"#));
        assert_eq!(raw(b"n"), Some("-1.5e3"));
        assert_eq!(raw(b"s"), Some(r#""x\"y""#));
        assert_eq!(raw(b"t"), Some("true"));
        assert_eq!(raw(b"id"), Some(r#""value""#));
        assert_eq!(raw(b"a"), None, "not at the top level");
        assert_eq!(top_level_raw(br#"{"v":[1,2]}"#, b"v"), Some(&b"[1,2]"[..]));
        assert_eq!(top_level_raw(br#"{"v":"open"#, b"v"), None);
    }

    fn rpc_frame(number: &str) -> String {
        format!(r#"{{"role":"rpc","u":"n","cmds":[{{"name":"e","fun":"echo","args":[{number}]}}]}}"#)
    }

    /// Decodes a one-echo frame carrying `number`, and encodes the argument back as the
    /// reply would.
    fn echoed(number: &str) -> Result<String, InboundError> {
        match decode_inbound(rpc_frame(number).as_bytes())? {
            Inbound::Rpc(request) => Ok(String::from_utf8(encode(&request.cmds[0].args[0])).unwrap()),
            other => panic!("expected rpc, got {other:?}"),
        }
    }

    #[test]
    fn floats_come_back_exactly() {
        for text in ["0.9688648661221919", "0.1", "1.7976931348623157e308", "5e-324", "-0.0", "123.456"] {
            let back = echoed(text).unwrap();
            assert_eq!(back.parse::<f64>().unwrap().to_bits(), text.parse::<f64>().unwrap().to_bits(), "{text}");
        }
        assert_eq!(echoed("0.9688648661221919").unwrap(), "0.9688648661221919");
    }

    #[test]
    fn integers_beyond_64_bits_are_refused_with_their_u() {
        for text in ["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890"] {
            let err = echoed(text).unwrap_err();
            assert_eq!((err.u.as_deref(), err.error.code), (Some("n"), 1002), "{text}");
            assert!(err.error.details_text().contains("does not fit in 64 bits"), "{}", err.error);
        }
        for text in ["18446744073709551615", "-9223372036854775808", "1e19", "1.8446744073709552e19", "0"] {
            assert!(echoed(text).is_ok(), "{text}");
        }
        // Inside strings, digits are text.
        assert!(echoed(r#"["99999999999999999999999", 1e30]"#).is_ok());
        let nested = r#"{"deep": [1, {"x": 99999999999999999999999}]}"#;
        assert!(echoed(nested).is_err());
    }

    proptest! {
        /// Every finite float a client sends comes back bit for bit.
        #[test]
        fn random_floats_round_trip(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite());
            let text = serde_json::to_string(&f).unwrap();
            let back = echoed(&text).unwrap();
            prop_assert_eq!(back.parse::<f64>().unwrap().to_bits(), f.to_bits());
        }

        /// 64-bit integers come back as sent; wider ones are refused, never rounded.
        #[test]
        fn integers_are_kept_or_refused(n in any::<i128>(), wide in any::<bool>()) {
            let n = if wide { n } else { n % (1i128 << 64) };
            let text = n.to_string();
            let fits = i64::try_from(n).is_ok() || u64::try_from(n).is_ok();
            match echoed(&text) {
                Ok(back) => {
                    prop_assert!(fits, "{} was accepted", text);
                    prop_assert_eq!(back, text);
                }
                Err(e) => {
                    prop_assert!(!fits, "{} was refused", text);
                    prop_assert_eq!(e.error.code, 1002);
                }
            }
        }
    }

    #[test]
    fn u_is_sniffed_from_a_frame_without_parsing_it() {
        assert_eq!(sniff_u(br#"{"role":"rpc","cmds":[{"u":"inner"}],"u":"outer"}"#).as_deref(), Some("outer"));
        assert_eq!(sniff_u(br#"{"u" : "a\"b\u0041"}"#).as_deref(), Some("a\"bA"));
        assert_eq!(sniff_u(br#"{"x":"\"u\":\"no\""}"#), None);
        assert_eq!(sniff_u(br#"{"u":17}"#), None);
        assert_eq!(sniff_u(br#"{"u":"unterminated"#), None);
    }

    proptest! {
        /// The byte scan agrees with a real parse whenever it answers.
        #[test]
        fn role_sniffing_agrees_with_serde(
            role in "[a-z-]{0,8}",
            nested in "[a-z\"\\{}:,]{0,12}",
            before in proptest::bool::ANY,
        ) {
            let inner = serde_json::to_string(&nested).unwrap();
            let frame = if before {
                format!(r#"{{"role":{},"k":{{"role":"rpc","s":{inner}}}}}"#, serde_json::to_string(&role).unwrap())
            } else {
                format!(r#"{{"k":{{"role":"rpc","s":{inner}}},"role":{}}}"#, serde_json::to_string(&role).unwrap())
            };
            let parsed: Value = serde_json::from_str(&frame).unwrap();
            if let Some(found) = sniff_role(frame.as_bytes()) {
                prop_assert_eq!(Some(std::str::from_utf8(found).unwrap()), parsed["role"].as_str());
            }
        }

        #[test]
        fn sniffing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = sniff_role(&bytes);
            let _ = top_level_raw(&bytes, b"role");
        }

        /// A top-level value cut out of a frame is that value, whatever it holds.
        #[test]
        fn raw_values_agree_with_serde(value in any_json(), other in any_json(), first in proptest::bool::ANY) {
            let (v, o) = (serde_json::to_string(&value).unwrap(), serde_json::to_string(&other).unwrap());
            let frame = if first { format!(r#"{{"v" : {v} , "o":{o}}}"#) } else { format!(r#"{{"o":{o},"v":{v} }}"#) };
            let raw = top_level_raw(frame.as_bytes(), b"v").expect("found");
            prop_assert_eq!(serde_json::from_slice::<Value>(raw).unwrap(), value);
        }

        /// Whatever bytes arrive, decoding answers (never panics) and a request survives a
        /// round trip through the encoder.
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_inbound(&bytes);
        }

        #[test]
        fn rpc_round_trips(u in "[a-z0-9]{1,8}", name in "[a-z]{1,6}", n in any::<i64>()) {
            let req = RpcRequest {
                u,
                cmds: vec![super::super::RpcCommand::new(name, "echo", vec![Value::from(n)])],
                return_intermediate_results: false,
                intermediate_result_callback_topic: None,
                include_execution_summary: false,
                debug_mode: false,
                timeout: None,
            };
            let mut frame = serde_json::to_value(&req).unwrap();
            frame["role"] = Value::from("rpc");
            let decoded = decode_inbound(&encode(&frame)).unwrap();
            prop_assert_eq!(decoded, Inbound::Rpc(req));
        }
    }
}
