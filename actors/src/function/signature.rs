//! Parameter names, and binding a call's positional and keyword arguments to them as
//! Python does.
//!
//! A Rust closure has no parameter names at run time, so a function that wants keyword
//! arguments declares them: `.params(["x", "factor"])` for plain parameters, or a
//! signature in Python's syntax, `.signature("a, b=0, *, c=None")`, for defaults,
//! keyword-only parameters, `*args` and `**kwargs`. Defaults are JSON values (`None`,
//! `True` and `False` are accepted as Python spells them).
//!
//! [`Signature::bind`] follows CPython's rules and words its errors the same way: positional
//! arguments fill the positional parameters in order and the rest go to `*args` (too many
//! without it); each keyword names a positional or keyword-only parameter (given twice:
//! "got multiple values"), or goes to `**kwargs` (unknown without it); parameters left
//! unfilled take their default, and those without one are listed as missing. The result
//! is one value per parameter, in declaration order: `*args` as a list, `**kwargs` as an
//! object.

use std::fmt;

use serde_json::{json, Map, Value};

use super::{CallArgs, FunctionError};

/// How a parameter takes its value (Python's `inspect.Parameter.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// By position or by name (`a`).
    PositionalOrKeyword,
    /// The positional arguments left over (`*args`), as a list.
    VarPositional,
    /// Only by name (after `*` or `*args`).
    KeywordOnly,
    /// The keyword arguments left over (`**kwargs`), as an object.
    VarKeyword,
}

impl ParamKind {
    /// The name the reference's `rpc_describe` gives this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::PositionalOrKeyword => "positional_or_keyword",
            ParamKind::VarPositional => "var_positional",
            ParamKind::KeywordOnly => "keyword_only",
            ParamKind::VarKeyword => "var_keyword",
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// How it takes its value.
    pub kind: ParamKind,
    /// The value it takes when the call gives none (`None`: required).
    pub default: Option<Value>,
}

impl Param {
    /// Whether a call must give it a value.
    pub fn required(&self) -> bool {
        self.default.is_none() && matches!(self.kind, ParamKind::PositionalOrKeyword | ParamKind::KeywordOnly)
    }
}

/// A function's parameters, in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    params: Vec<Param>,
}

impl Signature {
    /// Plain parameters, each by position or by name, none with a default.
    pub fn named<I, S>(names: I) -> Result<Signature, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let params = names
            .into_iter()
            .map(|name| Param { name: name.into(), kind: ParamKind::PositionalOrKeyword, default: None })
            .collect();
        Signature::checked(params)
    }

    /// A signature in Python's syntax: `"x, factor"`, `"a, b=0, *, c=None"`,
    /// `"*args, **kwargs"`.
    pub fn parse(text: &str) -> Result<Signature, String> {
        let mut params = Vec::new();
        let mut rest = text.trim_start();
        let mut keyword_only = false;
        while !rest.is_empty() {
            let (stars, after) = match rest {
                r if r.starts_with("**") => (2, &r[2..]),
                r if r.starts_with('*') => (1, &r[1..]),
                r => (0, r),
            };
            let after = after.trim_start();
            let name_len = after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len());
            let (name, after) = after.split_at(name_len);
            let mut after = after.trim_start();
            let mut default = None;
            if let Some(value_text) = after.strip_prefix('=') {
                if stars > 0 {
                    return Err(format!("*{name} cannot have a default"));
                }
                let (value, used) = parse_default(value_text.trim_start())?;
                default = Some(value);
                after = value_text.trim_start()[used..].trim_start();
            }
            match (stars, name.is_empty()) {
                (1, true) => {
                    if keyword_only {
                        return Err("* given twice".to_owned());
                    }
                    keyword_only = true;
                    params.push(Param { name: String::new(), kind: ParamKind::VarPositional, default: None });
                }
                (_, true) => return Err(format!("a parameter name is expected at `{rest}`")),
                (1, false) => {
                    if keyword_only {
                        return Err("* given twice".to_owned());
                    }
                    keyword_only = true;
                    params.push(Param { name: name.to_owned(), kind: ParamKind::VarPositional, default: None });
                }
                (2, false) => params.push(Param { name: name.to_owned(), kind: ParamKind::VarKeyword, default: None }),
                _ => {
                    let kind = if keyword_only { ParamKind::KeywordOnly } else { ParamKind::PositionalOrKeyword };
                    params.push(Param { name: name.to_owned(), kind, default });
                }
            }
            rest = match after.strip_prefix(',') {
                Some(next) => next.trim_start(),
                None if after.is_empty() => after,
                None => return Err(format!("`,` expected at `{after}`")),
            };
        }
        // A bare `*` only marks where keyword-only parameters start.
        if let Some(at) = params.iter().position(|p| p.kind == ParamKind::VarPositional && p.name.is_empty()) {
            if params.get(at + 1).is_none_or(|p| p.kind != ParamKind::KeywordOnly) {
                return Err("named arguments must follow bare *".to_owned());
            }
            params.remove(at);
        }
        Signature::checked(params)
    }

    fn checked(params: Vec<Param>) -> Result<Signature, String> {
        let mut seen_default = false;
        for (i, param) in params.iter().enumerate() {
            if param.name.is_empty() || param.name.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!("`{}` is not a parameter name", param.name));
            }
            if params[..i].iter().any(|p| p.name == param.name) {
                return Err(format!("duplicate parameter '{}'", param.name));
            }
            if param.kind == ParamKind::PositionalOrKeyword {
                if param.default.is_none() && seen_default {
                    return Err(format!("parameter '{}' without a default follows one with a default", param.name));
                }
                seen_default |= param.default.is_some();
            }
            let rank = |kind| match kind {
                ParamKind::PositionalOrKeyword => 0,
                ParamKind::VarPositional => 1,
                ParamKind::KeywordOnly => 2,
                ParamKind::VarKeyword => 3,
            };
            if params[..i].iter().any(|p| rank(p.kind) > rank(param.kind) || p.kind == ParamKind::VarKeyword) {
                return Err(format!("parameter '{}' is out of order", param.name));
            }
        }
        Ok(Signature { params })
    }

    /// The parameters, in declaration order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Binds a call to the parameters: one value per parameter, in declaration order.
    pub fn bind(&self, fname: &str, call: CallArgs) -> Result<Vec<Value>, FunctionError> {
        let CallArgs { args, kwargs, .. } = call;
        // The common call, every plain parameter by position: nothing to rearrange (the
        // request path of `echo`, `add`... stays free of allocations).
        if kwargs.is_empty()
            && args.len() == self.params.len()
            && self.params.iter().all(|p| p.kind == ParamKind::PositionalOrKeyword)
        {
            return Ok(args);
        }
        let mut slots: Vec<Option<Value>> = vec![None; self.params.len()];
        let positional: Vec<usize> = self.kinds(ParamKind::PositionalOrKeyword).collect();
        let var_positional = self.kinds(ParamKind::VarPositional).next();
        let var_keyword = self.kinds(ParamKind::VarKeyword).next();

        let given = args.len();
        let mut args = args.into_iter();
        for (&slot, value) in positional.iter().zip(args.by_ref()) {
            slots[slot] = Some(value);
        }
        let extra: Vec<Value> = args.collect();
        match var_positional {
            Some(slot) => slots[slot] = Some(Value::Array(extra)),
            None if !extra.is_empty() => return Err(self.too_many_positional(fname, given)),
            None => {}
        }

        let mut extra_kwargs = Map::new();
        let mut unexpected = Vec::new();
        for (key, value) in kwargs {
            let named = self.params.iter().position(|p| {
                p.name == key && matches!(p.kind, ParamKind::PositionalOrKeyword | ParamKind::KeywordOnly)
            });
            match (named, var_keyword) {
                (Some(slot), _) if slots[slot].is_some() => {
                    return Err(FunctionError::type_error(format!(
                        "{fname}() got multiple values for argument '{key}'"
                    )))
                }
                (Some(slot), _) => slots[slot] = Some(value),
                (None, Some(_)) => {
                    extra_kwargs.insert(key, value);
                }
                (None, None) => unexpected.push(key),
            }
        }
        match unexpected.as_slice() {
            [] => {}
            [one] => {
                return Err(FunctionError::type_error(format!("{fname}() got an unexpected keyword argument '{one}'")))
            }
            many => {
                return Err(FunctionError::type_error(format!(
                    "{fname}() got unexpected keyword arguments {}",
                    quoted_list(many)
                )))
            }
        }
        if let Some(slot) = var_keyword {
            slots[slot] = Some(Value::Object(extra_kwargs));
        }

        let mut missing_positional = Vec::new();
        let mut missing_keyword = Vec::new();
        for (param, slot) in self.params.iter().zip(slots.iter_mut()) {
            if slot.is_none() {
                match (&param.default, param.kind) {
                    (Some(default), _) => *slot = Some(default.clone()),
                    (None, ParamKind::KeywordOnly) => missing_keyword.push(param.name.clone()),
                    (None, _) => missing_positional.push(param.name.clone()),
                }
            }
        }
        for (missing, what) in [(missing_positional, "positional"), (missing_keyword, "keyword-only")] {
            if !missing.is_empty() {
                let plural = if missing.len() == 1 { "" } else { "s" };
                return Err(FunctionError::type_error(format!(
                    "{fname}() missing {} required {what} argument{plural}: {}",
                    missing.len(),
                    quoted_list(&missing)
                )));
            }
        }
        Ok(slots.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn kinds(&self, kind: ParamKind) -> impl Iterator<Item = usize> + '_ {
        self.params.iter().enumerate().filter(move |(_, p)| p.kind == kind).map(|(i, _)| i)
    }

    /// Python's "takes 2 positional arguments but 3 were given" (or "from 1 to 2").
    fn too_many_positional(&self, fname: &str, given: usize) -> FunctionError {
        let positional: Vec<&Param> = self.params.iter().filter(|p| p.kind == ParamKind::PositionalOrKeyword).collect();
        let most = positional.len();
        let least = positional.iter().filter(|p| p.default.is_none()).count();
        let takes = if least == most { most.to_string() } else { format!("from {least} to {most}") };
        let plural = if most == 1 && least == most { "" } else { "s" };
        let were = if given == 1 { "was" } else { "were" };
        FunctionError::type_error(format!(
            "{fname}() takes {takes} positional argument{plural} but {given} {were} given"
        ))
    }

    /// The parameters as the reference's `rpc_describe` lists them (`parameters` of a spec).
    pub fn describe(&self) -> Value {
        Value::Array(
            self.params
                .iter()
                .map(|p| {
                    let default = match &p.default {
                        Some(value) => json!({"has_default": true, "encoding": "json", "json_value": value}),
                        None => json!({"has_default": false, "encoding": "none"}),
                    };
                    json!({
                        "name": p.name,
                        "kind": p.kind.as_str(),
                        "type_spec": {"display": "Any", "args": [], "is_optional": false},
                        "required": p.required(),
                        "default": default,
                        "doc": "",
                    })
                })
                .collect(),
        )
    }
}

impl fmt::Display for Signature {
    /// Python's spelling: `a, b=0, *, c=null`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut star_written = false;
        for p in &self.params {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match p.kind {
                ParamKind::PositionalOrKeyword => f.write_str(&p.name)?,
                ParamKind::VarPositional => {
                    star_written = true;
                    write!(f, "*{}", p.name)?
                }
                ParamKind::KeywordOnly => {
                    if !star_written {
                        star_written = true;
                        f.write_str("*, ")?;
                    }
                    f.write_str(&p.name)?
                }
                ParamKind::VarKeyword => write!(f, "**{}", p.name)?,
            }
            if let Some(default) = &p.default {
                write!(f, "={default}")?;
            }
        }
        Ok(())
    }
}

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'` (Python's wording).
fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}

/// A default value at the start of `text` and how many bytes it used: a JSON value, or
/// Python's `None`, `True`, `False`.
fn parse_default(text: &str) -> Result<(Value, usize), String> {
    for (word, value) in [("None", Value::Null), ("True", Value::Bool(true)), ("False", Value::Bool(false))] {
        if let Some(after) = text.strip_prefix(word) {
            if !after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                return Ok((value, word.len()));
            }
        }
    }
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => Ok((value, values.byte_offset())),
        _ => Err(format!("a default must be a JSON value, None, True or False, at `{text}`")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn call(args: Value, kwargs: Value) -> CallArgs {
        CallArgs::new(args.as_array().cloned().unwrap_or_default(), kwargs.as_object().cloned().unwrap_or_default())
    }

    fn bind(signature: &str, args: Value, kwargs: Value) -> Result<Value, String> {
        let signature = Signature::parse(signature).expect("a valid signature");
        signature.bind("f", call(args, kwargs)).map(Value::Array).map_err(|e| e.to_string())
    }

    #[test]
    fn positional_then_keyword_with_defaults_and_keyword_only() {
        let sig = "a, b=0, *, c=None";
        assert_eq!(bind(sig, json!([1]), json!({})), Ok(json!([1, 0, null])));
        assert_eq!(bind(sig, json!([1, 2]), json!({"c": 3})), Ok(json!([1, 2, 3])));
        assert_eq!(bind(sig, json!([]), json!({"b": 2, "a": 1})), Ok(json!([1, 2, null])));
        assert_eq!(bind("x, factor", json!([6]), json!({"factor": 7})), Ok(json!([6, 7])));
    }

    #[test]
    fn errors_name_what_is_wrong_as_python_does() {
        let sig = "a, b=0, *, c=None";
        assert_eq!(
            bind(sig, json!([]), json!({})),
            Err("TypeError: f() missing 1 required positional argument: 'a'".into())
        );
        assert_eq!(
            bind("a, b, c", json!([]), json!({})),
            Err("TypeError: f() missing 3 required positional arguments: 'a', 'b', and 'c'".into())
        );
        assert_eq!(
            bind("a, *, k", json!([1]), json!({})),
            Err("TypeError: f() missing 1 required keyword-only argument: 'k'".into())
        );
        assert_eq!(
            bind(sig, json!([1, 2, 3]), json!({})),
            Err("TypeError: f() takes from 1 to 2 positional arguments but 3 were given".into())
        );
        assert_eq!(
            bind("x", json!([1, 2]), json!({})),
            Err("TypeError: f() takes 1 positional argument but 2 were given".into())
        );
        assert_eq!(
            bind(sig, json!([1]), json!({"a": 2})),
            Err("TypeError: f() got multiple values for argument 'a'".into())
        );
        assert_eq!(
            bind(sig, json!([1]), json!({"d": 2})),
            Err("TypeError: f() got an unexpected keyword argument 'd'".into())
        );
        assert_eq!(
            bind(sig, json!([1]), json!({"d": 2, "e": 3})),
            Err("TypeError: f() got unexpected keyword arguments 'd' and 'e'".into())
        );
    }

    #[test]
    fn star_args_and_star_star_kwargs_collect_the_rest() {
        assert_eq!(bind("*args, **kwargs", json!([1, 2]), json!({"k": 3})), Ok(json!([[1, 2], {"k": 3}])));
        assert_eq!(bind("*args, **kwargs", json!([]), json!({})), Ok(json!([[], {}])));
        assert_eq!(bind("a, *rest, k=1", json!([1, 2, 3]), json!({"k": 4})), Ok(json!([1, [2, 3], 4])));
        // A name that is also a parameter binds to it, not to **kwargs.
        assert_eq!(bind("a, **kw", json!([]), json!({"a": 1, "z": 2})), Ok(json!([1, {"z": 2}])));
    }

    #[test]
    fn malformed_signatures_are_refused() {
        for bad in ["a=1, b", "a, a", "*, ", "*a, *b", "**k, a", "a b", "a=nope", "*a=1", "1x", "a,,b"] {
            assert!(Signature::parse(bad).is_err(), "{bad}");
        }
        assert!(Signature::named(["x", "x"]).is_err());
        let parsed = Signature::parse("a, b=[1, 2], *, c=None, d, **rest").expect("valid");
        assert_eq!(parsed.to_string(), "a, b=[1,2], *, c=null, d, **rest");
        assert_eq!(Signature::parse("").expect("empty").params().len(), 0);
    }

    #[test]
    fn describe_lists_kind_required_and_default() {
        let described = Signature::parse("a, b=0, *, c=None").expect("valid").describe();
        assert_eq!(described[0]["name"], json!("a"));
        assert_eq!(described[0]["required"], json!(true));
        assert_eq!(described[1]["default"], json!({"has_default": true, "encoding": "json", "json_value": 0}));
        assert_eq!(described[2]["kind"], json!("keyword_only"));
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-e]"
    }

    proptest! {
        /// Binding agrees with a direct model of Python's rules for signatures of plain
        /// parameters (some with defaults) and optional `**kwargs`: every parameter gets
        /// the positional value at its index, else its keyword, else its default; an
        /// error exactly when Python raises one.
        #[test]
        fn binding_matches_pythons_rules(
            required in 0usize..4,
            optional in 0usize..3,
            star_kwargs in any::<bool>(),
            given in 0usize..7,
            keywords in proptest::collection::btree_map(name(), 0i64..100, 0..5),
        ) {
            let names: Vec<String> = ["a", "b", "c", "d", "e", "f", "g"].iter().take(required + optional).map(|s| s.to_string()).collect();
            let mut text: Vec<String> = names.iter().enumerate()
                .map(|(i, n)| if i < required { n.clone() } else { format!("{n}={}", 1000 + i) })
                .collect();
            if star_kwargs {
                text.push("**kw".into());
            }
            let signature = Signature::parse(&text.join(", ")).expect("generated signatures are valid");
            let args: Vec<Value> = (0..given).map(|i| json!(i)).collect();
            let kwargs: Map<String, Value> = keywords.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            let bound = signature.bind("f", CallArgs::new(args.clone(), kwargs.clone()));

            let too_many = given > names.len();
            let twice = names.iter().take(given).any(|n| kwargs.contains_key(n));
            let unknown = !star_kwargs && kwargs.keys().any(|k| !names.contains(k));
            let missing = (0..required).any(|i| i >= given && !kwargs.contains_key(&names[i]));
            if too_many || twice || unknown || missing {
                prop_assert!(bound.is_err(), "{bound:?}");
            } else {
                let bound = bound.expect("binds");
                for (i, n) in names.iter().enumerate() {
                    let expected = args.get(i).cloned().or_else(|| kwargs.get(n).cloned()).unwrap_or_else(|| json!(1000 + i));
                    prop_assert_eq!(&bound[i], &expected);
                }
                if star_kwargs {
                    let rest: Map<String, Value> = kwargs.into_iter().filter(|(k, _)| !names.contains(k)).collect();
                    prop_assert_eq!(&bound[names.len()], &Value::Object(rest));
                }
            }
        }

        /// Whatever the text, parsing returns (never panics), and what parses prints back
        /// to a signature that parses to the same thing.
        #[test]
        fn parsing_never_panics_and_round_trips(text in "[a-c*=, 0-9N\\[\\]]{0,16}") {
            if let Ok(signature) = Signature::parse(&text) {
                prop_assert_eq!(Signature::parse(&signature.to_string()), Ok(signature));
            }
        }
    }
}
