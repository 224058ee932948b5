//! What one request may build: bounds on the values substituted into arguments, on the
//! reply (intermediate results included) and on the nesting of results.
//!
//! A request of a few bytes can ask for exponential work: `c_i = echos(c_{i-1}, c_{i-1})`
//! doubles a value per command. Sizes are therefore counted as the work happens, before
//! each copy is made, so a request that would exceed a bound fails with 1002 after work
//! proportional to the bound, not to the amplification it asked for.
//!
//! Sizes are estimates of the compact JSON encoding ([`footprint`]): computed once per
//! result, when it arrives, and added on every use, never by re-serialising. Strings count
//! their UTF-8 length plus quotes (escapes are not counted), floats count 18 bytes (a
//! typical shortest round-trip form), and every value counts at least [`MIN_VALUE_BYTES`]:
//! in memory a `Value` takes 32 bytes before its contents, so without a floor an array of
//! one-character strings would hold some 25 bytes of memory per byte counted. With it,
//! memory stays within about 10 times the bytes counted.

use serde_json::Value;

use crate::protocol::RpcError;

/// Bounds of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Estimated JSON bytes of the reply: sink results plus every intermediate report.
    pub max_reply_bytes: u64,
    /// Estimated JSON bytes copied into arguments by references, summed over the request.
    pub max_substitution_bytes: u64,
    /// Nesting depth of a result (`1` is `[1]`; serde_json parses at most 128).
    pub max_value_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_reply_bytes: 16 << 20, max_substitution_bytes: 16 << 20, max_value_depth: 128 }
    }
}

/// A value's estimated compact-JSON size and its nesting depth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Estimated bytes.
    pub bytes: u64,
    /// Containers nested in each other (a scalar is 0).
    pub depth: usize,
}

/// Bytes assumed for a float: `0.9688648661221919` is 18.
const FLOAT_BYTES: u64 = 18;

/// The least any value counts, however short its JSON (see the module doc).
pub const MIN_VALUE_BYTES: u64 = 8;

/// How deep [`footprint`] recurses before it continues with a heap stack.
const RECURSION_LIMIT: usize = 64;

/// Measures `value`. Shallow values (nearly all) are walked recursively, allocating
/// nothing; below 64 levels (`RECURSION_LIMIT`) the walk continues with a heap stack, since
/// a result may be nested deeper than the thread's stack allows (it is refused afterwards,
/// but must be measurable first).
pub fn footprint(value: &Value) -> Footprint {
    let mut total = Footprint::default();
    measure(value, 0, &mut total);
    total
}

/// The bytes of `value` itself: a scalar's JSON, a container's brackets, commas and keys.
fn own_bytes(value: &Value) -> u64 {
    MIN_VALUE_BYTES.max(match value {
        Value::Null => 4,
        Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => digits(u),
            (None, Some(i)) => 1 + digits(i.unsigned_abs()),
            _ => FLOAT_BYTES,
        },
        Value::String(s) => s.len() as u64 + 2,
        Value::Array(items) => 2 + items.len().saturating_sub(1) as u64,
        Value::Object(map) => {
            2 + map.keys().map(|k| k.len() as u64 + 3).sum::<u64>() + map.len().saturating_sub(1) as u64
        }
    })
}

fn measure(value: &Value, depth: usize, total: &mut Footprint) {
    total.bytes += own_bytes(value);
    let children: &mut dyn Iterator<Item = &Value> = match value {
        Value::Array(items) => &mut items.iter(),
        Value::Object(map) => &mut map.values(),
        _ => return,
    };
    total.depth = total.depth.max(depth + 1);
    if depth + 1 < RECURSION_LIMIT {
        children.for_each(|child| measure(child, depth + 1, total));
        return;
    }
    let mut stack: Vec<(&Value, usize)> = children.map(|child| (child, depth + 1)).collect();
    while let Some((value, depth)) = stack.pop() {
        total.bytes += own_bytes(value);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            _ => continue,
        }
        total.depth = total.depth.max(depth + 1);
    }
}

fn digits(mut n: u64) -> u64 {
    let mut count = 1;
    while n >= 10 {
        n /= 10;
        count += 1;
    }
    count
}

/// The running totals of one request against its [`Limits`].
#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    substituted: u64,
    reply: u64,
}

/// Which bound a request ran into: the setting's name, for the error and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_reply_bytes`
    ReplyBytes,
    /// `max_substitution_bytes`
    SubstitutionBytes,
    /// `max_value_depth`
    ValueDepth,
}

impl Limit {
    /// The setting's name.
    pub fn setting(self) -> &'static str {
        match self {
            Limit::ReplyBytes => "max_reply_bytes",
            Limit::SubstitutionBytes => "max_substitution_bytes",
            Limit::ValueDepth => "max_value_depth",
        }
    }
}

/// A request stopped by a bound.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitExceeded {
    /// The bound.
    pub limit: Limit,
    /// The 1002 sent back, naming the bound and the command.
    pub error: RpcError,
}

impl Budget {
    /// Nothing spent yet.
    pub fn new(limits: Limits) -> Self {
        Budget { limits, substituted: 0, reply: 0 }
    }

    /// The bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes built so far (substituted plus reply): what running in place has cost.
    pub fn work(&self) -> u64 {
        self.substituted.saturating_add(self.reply)
    }

    /// Counts `bytes` about to be copied into `command`'s arguments.
    pub fn substitute(&mut self, bytes: u64, command: &str) -> Result<(), LimitExceeded> {
        let total = self.substituted.saturating_add(bytes);
        let max = self.limits.max_substitution_bytes;
        if total > max {
            return Err(exceeded(
                Limit::SubstitutionBytes,
                format!(
                    "request exceeds max_substitution_bytes ({max}): the arguments of command {command} would bring \
                     the values substituted by references to {total} bytes"
                ),
            ));
        }
        self.substituted = total;
        Ok(())
    }

    /// Whether `bytes` more could be substituted.
    pub fn substitution_fits(&self, bytes: u64) -> bool {
        self.substituted.saturating_add(bytes) <= self.limits.max_substitution_bytes
    }

    /// Counts `bytes` about to be added to the reply (`what` says which part; it is only
    /// written out for the error).
    pub fn reply(&mut self, bytes: u64, what: impl FnOnce() -> String) -> Result<(), LimitExceeded> {
        let total = self.reply.saturating_add(bytes);
        let max = self.limits.max_reply_bytes;
        if total > max {
            return Err(exceeded(
                Limit::ReplyBytes,
                format!("reply exceeds max_reply_bytes ({max}): {} would bring it to {total} bytes", what()),
            ));
        }
        self.reply = total;
        Ok(())
    }

    /// Checks the nesting of `command`'s result.
    pub fn depth(&self, footprint: Footprint, command: &str) -> Result<(), LimitExceeded> {
        let max = self.limits.max_value_depth;
        if footprint.depth > max {
            return Err(exceeded(
                Limit::ValueDepth,
                format!("result of command {command} is nested {} deep, over max_value_depth ({max})", footprint.depth),
            ));
        }
        Ok(())
    }
}

fn exceeded(limit: Limit, details: String) -> LimitExceeded {
    LimitExceeded { limit, error: RpcError::invalid(details) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-z]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn real_depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(real_depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(real_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn count_floats(value: &Value) -> u64 {
        match value {
            Value::Number(n) if n.is_f64() => 1,
            Value::Array(items) => items.iter().map(count_floats).sum(),
            Value::Object(map) => map.values().map(count_floats).sum(),
            _ => 0,
        }
    }

    /// The estimate, recomputed the slow way: each value's own JSON (its brackets, commas
    /// and keys for a container), at least [`MIN_VALUE_BYTES`], floats excepted.
    fn expected_bytes(value: &Value) -> u64 {
        let own = match value {
            Value::Array(items) => {
                return MIN_VALUE_BYTES.max(2 + items.len().saturating_sub(1) as u64)
                    + items.iter().map(expected_bytes).sum::<u64>()
            }
            Value::Object(map) => {
                let keys: u64 = map.keys().map(|k| k.len() as u64 + 3).sum();
                return MIN_VALUE_BYTES.max(2 + keys + map.len().saturating_sub(1) as u64)
                    + map.values().map(expected_bytes).sum::<u64>();
            }
            Value::Number(n) if n.is_f64() => FLOAT_BYTES,
            scalar => scalar.to_string().len() as u64,
        };
        MIN_VALUE_BYTES.max(own)
    }

    #[test]
    fn footprints_count_json_bytes_with_a_floor() {
        for value in [json!(-1234567890), json!(u64::MAX), json!("a longer héllo")] {
            assert_eq!(footprint(&value).bytes, value.to_string().len() as u64, "{value}");
        }
        for value in [json!(null), json!(false), json!(0), json!("x"), json!([])] {
            assert_eq!(footprint(&value).bytes, MIN_VALUE_BYTES, "{value}");
        }
        let nested = json!({"a": [1, [2, {"b": "c"}]], "d": {}});
        assert_eq!(footprint(&nested), Footprint { bytes: expected_bytes(&nested), depth: 4 });
    }

    #[test]
    fn very_deep_values_are_measured_without_recursion() {
        let mut value = json!(1);
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(footprint(&value), Footprint { bytes: 800_008, depth: 100_000 });
        // Dropping it recursively would overflow the stack: unwrap it level by level.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or_default();
        }
    }

    #[test]
    fn each_bound_names_its_setting() {
        let mut budget = Budget::new(Limits { max_reply_bytes: 10, max_substitution_bytes: 20, max_value_depth: 2 });
        budget.substitute(20, "a").unwrap();
        let e = budget.substitute(1, "b").unwrap_err();
        assert_eq!(e.limit, Limit::SubstitutionBytes);
        assert!(e.error.details_text().contains("max_substitution_bytes (20)") && e.error.code == 1002);
        budget.reply(10, || "r".into()).unwrap();
        assert_eq!(budget.reply(1, || "r".into()).unwrap_err().limit, Limit::ReplyBytes);
        assert_eq!(budget.work(), 30);
        assert!(budget.depth(Footprint { bytes: 0, depth: 2 }, "x").is_ok());
        let e = budget.depth(Footprint { bytes: 0, depth: 3 }, "x").unwrap_err();
        assert!(e.error.details_text().contains("max_value_depth (2)"), "{}", e.error);
    }

    proptest! {
        /// The estimate is what the module doc says; it never undercounts the encoding
        /// but for floats (18 bytes each, at most 24 written); the depth is exact.
        #[test]
        fn footprint_tracks_the_encoding(value in arb_value()) {
            let found = footprint(&value);
            prop_assert_eq!(found.bytes, expected_bytes(&value));
            let encoded = value.to_string().len() as u64;
            prop_assert!(found.bytes + count_floats(&value) * 6 >= encoded, "{} vs {}", found.bytes, encoded);
            prop_assert_eq!(found.depth, real_depth(&value));
        }
    }
}
