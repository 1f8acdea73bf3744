//! `application/x-www-form-urlencoded` parsing into a nested JSON value, the way
//! Stripe (a Rack application) reads request parameters.
//!
//! - `a=1` → `{"a": "1"}`; a repeated plain key keeps the last value.
//! - `a[b][c]=1` → `{"a": {"b": {"c": "1"}}}`.
//! - `a[]=x&a[]=y` → `{"a": ["x", "y"]}`; `a[][k]=1&a[][j]=2` merges into the last
//!   element until a key repeats (Rack semantics), so it yields `[{"k": "1", "j": "2"}]`.
//! - `a[0]=x&a[1]=y` → `{"a": {"0": "x", "1": "y"}}`: index segments are kept as object
//!   keys here and turned into arrays by the parameter validator where the endpoint
//!   expects an array (so `metadata[0]=x` stays a metadata key). [`canonical`] does the
//!   same conversion for comparisons.
//! - `+` is a space; keys and values are percent-decoded, so `a%5B%5D=x` is `a[]=x`.
//! - `a=` is the empty string, which endpoints read as "unset".
//!
//! All leaf values are strings; types are checked later against the endpoint's shape.

use serde_json::{Map, Value};

/// Most nesting levels accepted in one parameter name.
const MAX_DEPTH: usize = 16;
/// Most `key=value` pairs accepted in one request.
const MAX_PAIRS: usize = 10_000;

/// A request whose form encoding cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("invalid percent-encoding or utf-8 in form data")]
    Encoding,
    #[error("invalid parameter name '{0}'")]
    BadName(String),
    #[error("parameter '{0}' is nested too deeply")]
    TooDeep(String),
    #[error("too many parameters")]
    TooMany,
    #[error("parameter '{0}' is given both as a value and as a nested hash or array")]
    Conflict(String),
}

impl FormError {
    /// The top-level parameter the error is about, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            FormError::BadName(n) | FormError::TooDeep(n) | FormError::Conflict(n) => {
                Some(n.as_str())
            }
            FormError::Encoding | FormError::TooMany => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `[]`: append to an array.
    Append,
    /// `[name]` (or the base name): an object key.
    Key(String),
}

/// Parse a form body or query string into a JSON object.
pub fn parse(input: &str) -> Result<Map<String, Value>, FormError> {
    let mut root = Value::Object(Map::new());
    let mut pairs = 0usize;
    for pair in input.split('&') {
        if pair.is_empty() {
            continue;
        }
        pairs += 1;
        if pairs > MAX_PAIRS {
            return Err(FormError::TooMany);
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key)?;
        if key.is_empty() {
            continue;
        }
        let value = decode(raw_value)?;
        let segments = split_key(&key)?;
        put(&mut root, &segments, value, &key)?;
    }
    match root {
        Value::Object(map) => Ok(map),
        _ => Ok(Map::new()),
    }
}

fn decode(raw: &str) -> Result<String, FormError> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| FormError::Encoding)
}

/// `a[b][]` → `[Key(a), Key(b), Append]`.
fn split_key(key: &str) -> Result<Vec<Segment>, FormError> {
    let bad = || FormError::BadName(key.to_owned());
    let (base, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if base.is_empty() || base.contains(']') {
        return Err(bad());
    }
    let mut segments = vec![Segment::Key(base.to_owned())];
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return Err(bad());
        };
        let Some(close) = inner.find(']') else {
            return Err(bad());
        };
        let name = &inner[..close];
        if name.contains('[') {
            return Err(bad());
        }
        segments.push(if name.is_empty() {
            Segment::Append
        } else {
            Segment::Key(name.to_owned())
        });
        if segments.len() > MAX_DEPTH {
            return Err(FormError::TooDeep(base.to_owned()));
        }
        rest = &inner[close + 1..];
    }
    Ok(segments)
}

fn conflict(full_key: &str) -> FormError {
    let base = full_key.split('[').next().unwrap_or(full_key);
    FormError::Conflict(base.to_owned())
}

/// Insert `value` at `segments` below `slot`. A `Null` slot is fresh.
fn put(slot: &mut Value, segments: &[Segment], value: String, full: &str) -> Result<(), FormError> {
    let Some((first, rest)) = segments.split_first() else {
        return match slot {
            Value::Null | Value::String(_) => {
                *slot = Value::String(value);
                Ok(())
            }
            _ => Err(conflict(full)),
        };
    };
    match first {
        Segment::Key(k) => {
            if slot.is_null() {
                *slot = Value::Object(Map::new());
            }
            let Value::Object(map) = slot else {
                return Err(conflict(full));
            };
            let child = map.entry(k.clone()).or_insert(Value::Null);
            put(child, rest, value, full)
        }
        Segment::Append => {
            if slot.is_null() {
                *slot = Value::Array(Vec::new());
            }
            let Value::Array(items) = slot else {
                return Err(conflict(full));
            };
            if rest.is_empty() {
                items.push(Value::String(value));
                return Ok(());
            }
            // Rack: keep filling the last hash until the nested key repeats.
            if let Some(last) = items.last_mut()
                && last.is_object()
                && !has_path(last, rest)
            {
                return put(last, rest, value, full);
            }
            items.push(Value::Null);
            match items.last_mut() {
                Some(last) => put(last, rest, value, full),
                None => Err(conflict(full)),
            }
        }
    }
}

/// Whether the nested key `segments` is already set below `value`. Like Rack, a path
/// that itself appends (`[]`) never counts as set, so it keeps filling the last hash.
fn has_path(value: &Value, segments: &[Segment]) -> bool {
    if segments.contains(&Segment::Append) {
        return false;
    }
    let mut node = value;
    for segment in segments {
        match (segment, node) {
            (Segment::Key(k), Value::Object(map)) => match map.get(k) {
                Some(child) => node = child,
                None => return false,
            },
            _ => return false,
        }
    }
    true
}

/// Whether every key of `map` is a decimal index (and there is at least one).
pub fn is_index_map(map: &Map<String, Value>) -> bool {
    !map.is_empty()
        && map
            .keys()
            .all(|k| !k.is_empty() && k.len() <= 9 && k.bytes().all(|b| b.is_ascii_digit()))
}

/// Turn an object with index keys (`{"1": b, "0": a}`) into an array ordered by index.
pub fn index_map_to_array(map: Map<String, Value>) -> Vec<Value> {
    let mut items: Vec<(u64, Value)> = map
        .into_iter()
        .map(|(k, v)| (k.parse::<u64>().unwrap_or(u64::MAX), v))
        .collect();
    items.sort_by_key(|(i, _)| *i);
    items.into_iter().map(|(_, v)| v).collect()
}

/// A form value normalised for comparison: index-keyed objects become arrays, so
/// `a[]=x` and `a[0]=x` compare equal. Object key order never matters for `==`.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) if is_index_map(map) => {
            let converted: Map<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), canonical(v))).collect();
            Value::Array(index_map_to_array(converted))
        }
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Value {
        Value::Object(parse(s).expect("parses"))
    }

    #[test]
    fn flat_and_nested() {
        assert_eq!(p("a=1&b=two"), json!({"a": "1", "b": "two"}));
        assert_eq!(
            p("billing[address][line1]=1+Main+St&billing[address][city]=SF"),
            json!({"billing": {"address": {"line1": "1 Main St", "city": "SF"}}})
        );
        assert_eq!(p("a=1&a=2"), json!({"a": "2"}));
        assert_eq!(p(""), json!({}));
        assert_eq!(p("&&a=1&"), json!({"a": "1"}));
        assert_eq!(p("flag"), json!({"flag": ""}));
    }

    #[test]
    fn empty_bracket_arrays() {
        assert_eq!(
            p("expand[]=number&expand[]=cvc"),
            json!({"expand": ["number", "cvc"]})
        );
        assert_eq!(
            p("l[][amount]=1&l[][interval]=daily&l[][amount]=2&l[][interval]=all_time"),
            json!({"l": [{"amount": "1", "interval": "daily"}, {"amount": "2", "interval": "all_time"}]})
        );
        assert_eq!(
            p("l[][categories][]=a&l[][categories][]=b"),
            json!({"l": [{"categories": ["a", "b"]}]})
        );
    }

    #[test]
    fn indexed_arrays_and_canonical_form() {
        let v = p("expand[1]=cvc&expand[0]=number");
        assert_eq!(v, json!({"expand": {"1": "cvc", "0": "number"}}));
        assert_eq!(canonical(&v), json!({"expand": ["number", "cvc"]}));
        assert_eq!(canonical(&v), canonical(&p("expand[]=number&expand[]=cvc")));
        let nested = p(
            "spending_controls[spending_limits][0][amount]=5000&spending_controls[spending_limits][0][interval]=all_time&spending_controls[spending_limits][0][categories][0]=bakeries",
        );
        assert_eq!(
            canonical(&nested),
            json!({"spending_controls": {"spending_limits": [
                {"amount": "5000", "interval": "all_time", "categories": ["bakeries"]}
            ]}})
        );
        // sorted numerically, not lexically
        let many: String = (0..12).map(|i| format!("a[{i}]={i}&")).collect();
        let arr = canonical(&p(&many));
        assert_eq!(arr["a"][10], json!("10"));
        assert_eq!(arr["a"][2], json!("2"));
    }

    #[test]
    fn percent_encoding_everywhere() {
        assert_eq!(
            p("expand%5B%5D=number&expand%5B%5D=cvc"),
            json!({"expand": ["number", "cvc"]})
        );
        assert_eq!(
            p("metadata%5Bintent_id%5D=pi%3D1%262&name=J%C3%BCrgen+M"),
            json!({"metadata": {"intent_id": "pi=1&2"}, "name": "Jürgen M"})
        );
        assert_eq!(p("a=%2B"), json!({"a": "+"}));
        assert_eq!(parse("a=%FF"), Err(FormError::Encoding));
    }

    #[test]
    fn empty_value_is_kept_as_unset_marker() {
        assert_eq!(
            p("spending_controls[blocked_merchant_countries]="),
            json!({"spending_controls": {"blocked_merchant_countries": ""}})
        );
        assert_eq!(p("metadata="), json!({"metadata": ""}));
    }

    #[test]
    fn malformed_names_and_conflicts() {
        assert!(matches!(parse("a[b=1"), Err(FormError::BadName(_))));
        assert!(matches!(parse("[a]=1"), Err(FormError::BadName(_))));
        assert!(matches!(parse("a]=1"), Err(FormError::BadName(_))));
        assert!(matches!(parse("a[b]c=1"), Err(FormError::BadName(_))));
        assert_eq!(parse("a=1&a[b]=2"), Err(FormError::Conflict("a".into())));
        assert_eq!(parse("a[]=1&a[b]=2"), Err(FormError::Conflict("a".into())));
        let deep = format!("a{}=1", "[x]".repeat(20));
        assert_eq!(parse(&deep), Err(FormError::TooDeep("a".into())));
        // a later plain value may not replace a hash either
        assert_eq!(parse("a[b]=1&a=2"), Err(FormError::Conflict("a".into())));
    }

    #[test]
    fn index_map_detection() {
        let m = parse("a=1").expect("parses");
        assert!(!is_index_map(&m));
        let m = parse("0=a&12=b").expect("parses");
        assert!(is_index_map(&m));
        assert_eq!(index_map_to_array(m), vec![json!("a"), json!("b")]);
        assert!(!is_index_map(&Map::new()));
    }
}
