//! Request parameter shapes: unknown-parameter rejection, type coercion of form strings
//! and Stripe-style error messages, then small typed accessors for the handlers.
//!
//! After [`validate`], integers are JSON numbers, booleans are JSON booleans, arrays
//! are JSON arrays (also when sent as `a[0]=`), and the empty string still means
//! "unset" wherever it appears.

use serde_json::{Map, Value};

use super::catalog;
use super::error::ApiError;
use super::form;

/// What a parameter may hold.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// A string of at most this many characters.
    Str(usize),
    /// An integer within the bounds.
    Int(i64, i64),
    Bool,
    Enum(&'static [&'static str]),
    /// A merchant category name from the spec.
    Category,
    /// An ISO 3166-1 alpha-2 country code.
    Country,
    Obj(&'static [(&'static str, Shape)]),
    Arr(&'static Shape),
    /// `metadata[key]=value`.
    Metadata,
    /// An integer timestamp or `{gt,gte,lt,lte}`.
    Range,
    /// Accepted without checking (detail objects the emulator stores but ignores).
    Any,
}

const STR: Shape = Shape::Str(5000);

pub const EXPAND: (&str, Shape) = ("expand", Shape::Arr(&STR));
pub const METADATA: (&str, Shape) = ("metadata", Shape::Metadata);

pub const INTERVALS: &[&str] = &[
    "all_time",
    "daily",
    "monthly",
    "per_authorization",
    "weekly",
    "yearly",
];
pub const CARD_PRESENCES: &[&str] = &["not_present", "present"];

const SPENDING_LIMIT: Shape = Shape::Obj(&[
    ("amount", Shape::Int(0, 99_999_999_999)),
    ("categories", Shape::Arr(&Shape::Category)),
    ("interval", Shape::Enum(INTERVALS)),
]);

/// Card spending controls (create and update).
pub const CARD_SPENDING_CONTROLS: Shape = Shape::Obj(&[
    (
        "allowed_card_presences",
        Shape::Arr(&Shape::Enum(CARD_PRESENCES)),
    ),
    ("allowed_categories", Shape::Arr(&Shape::Category)),
    ("allowed_merchant_countries", Shape::Arr(&Shape::Country)),
    (
        "blocked_card_presences",
        Shape::Arr(&Shape::Enum(CARD_PRESENCES)),
    ),
    ("blocked_categories", Shape::Arr(&Shape::Category)),
    ("blocked_merchant_countries", Shape::Arr(&Shape::Country)),
    ("spending_limits", Shape::Arr(&SPENDING_LIMIT)),
]);

/// Cardholder spending controls: the card's plus `spending_limits_currency`.
pub const CARDHOLDER_SPENDING_CONTROLS: Shape = Shape::Obj(&[
    (
        "allowed_card_presences",
        Shape::Arr(&Shape::Enum(CARD_PRESENCES)),
    ),
    ("allowed_categories", Shape::Arr(&Shape::Category)),
    ("allowed_merchant_countries", Shape::Arr(&Shape::Country)),
    (
        "blocked_card_presences",
        Shape::Arr(&Shape::Enum(CARD_PRESENCES)),
    ),
    ("blocked_categories", Shape::Arr(&Shape::Category)),
    ("blocked_merchant_countries", Shape::Arr(&Shape::Country)),
    ("spending_limits", Shape::Arr(&SPENDING_LIMIT)),
    ("spending_limits_currency", Shape::Str(3)),
]);

/// `required_address` / `optional_fields_address`.
pub const ADDRESS: Shape = Shape::Obj(&[
    ("city", STR),
    ("country", STR),
    ("line1", STR),
    ("line2", STR),
    ("postal_code", STR),
    ("state", STR),
]);

/// List pagination parameters shared by all list endpoints.
pub const LIST_COMMON: [(&str, Shape); 5] = [
    ("created", Shape::Range),
    ("ending_before", STR),
    EXPAND,
    ("limit", Shape::Int(1, 100)),
    ("starting_after", STR),
];

/// Join enum values the way Stripe's messages do: `a, b, or c`.
fn one_of(values: &[&str]) -> String {
    match values {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [a, b] => format!("{a} or {b}"),
        [init @ .., last] => format!("{}, or {last}", init.join(", ")),
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}[{key}]")
    }
}

/// Validate and coerce the top-level parameters against `fields`.
pub fn validate(params: &mut Map<String, Value>, fields: &[(&str, Shape)]) -> Result<(), ApiError> {
    validate_fields(params, fields, "")
}

fn validate_fields(
    map: &mut Map<String, Value>,
    fields: &[(&str, Shape)],
    path: &str,
) -> Result<(), ApiError> {
    // Report unknown parameters first, in a stable order.
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    if let Some(unknown) = keys
        .into_iter()
        .find(|k| !fields.iter().any(|(name, _)| name == k))
    {
        return Err(ApiError::unknown_param(&child(path, unknown)));
    }
    for (name, shape) in fields {
        if let Some(v) = map.get_mut(*name) {
            check(v, shape, &child(path, name))?;
        }
    }
    Ok(())
}

fn check(value: &mut Value, shape: &Shape, path: &str) -> Result<(), ApiError> {
    // The empty string unsets any parameter; handlers decide what that means.
    if value.as_str() == Some("") {
        return Ok(());
    }
    match shape {
        Shape::Str(max) => {
            let Some(s) = value.as_str() else {
                return Err(ApiError::invalid(format!("Invalid string: {path}")).with_param(path));
            };
            if s.chars().count() > *max {
                return Err(ApiError::invalid(format!(
                    "Invalid string: {path} must be at most {max} characters"
                ))
                .with_param(path));
            }
        }
        Shape::Int(min, max) => {
            let s = value.as_str().unwrap_or("{…}");
            let Ok(n) = s.trim().parse::<i64>() else {
                return Err(ApiError::invalid(format!("Invalid integer: {s}"))
                    .with_code("parameter_invalid_integer")
                    .with_param(path));
            };
            if n < *min {
                return Err(ApiError::invalid(format!(
                    "This value must be greater than or equal to {min}."
                ))
                .with_code("parameter_invalid_integer")
                .with_param(path));
            }
            if n > *max {
                return Err(ApiError::invalid(format!(
                    "This value must be less than or equal to {max}."
                ))
                .with_code("parameter_invalid_integer")
                .with_param(path));
            }
            *value = Value::from(n);
        }
        Shape::Bool => {
            let b = match value.as_str() {
                Some("true") => true,
                Some("false") => false,
                other => {
                    return Err(ApiError::invalid(format!(
                        "Invalid boolean: {}",
                        other.unwrap_or("{…}")
                    ))
                    .with_param(path));
                }
            };
            *value = Value::Bool(b);
        }
        Shape::Enum(values) => {
            if !value.as_str().is_some_and(|s| values.contains(&s)) {
                return Err(invalid_enum(path, values));
            }
        }
        Shape::Category => {
            if !value.as_str().is_some_and(catalog::is_merchant_category) {
                return Err(invalid_enum(path, catalog::MERCHANT_CATEGORIES));
            }
        }
        Shape::Country => {
            let Some(s) = value.as_str() else {
                return Err(ApiError::invalid(format!("Invalid string: {path}")).with_param(path));
            };
            if !catalog::is_country(s) {
                return Err(ApiError::invalid(format!(
                    "Invalid {path}: '{s}' is not a valid ISO 3166-1 alpha-2 country code (for example US, GB, DE)."
                ))
                .with_param(path));
            }
        }
        Shape::Obj(fields) => {
            let Value::Object(map) = value else {
                return Err(ApiError::invalid("Invalid hash").with_param(path));
            };
            validate_fields(map, fields, path)?;
        }
        Shape::Arr(item) => {
            let items = match std::mem::take(value) {
                Value::Array(items) => items,
                Value::Object(map) if form::is_index_map(&map) => form::index_map_to_array(map),
                other => {
                    *value = other;
                    return Err(ApiError::invalid("Invalid array").with_param(path));
                }
            };
            *value = Value::Array(items);
            if let Value::Array(items) = value {
                for (i, v) in items.iter_mut().enumerate() {
                    check(v, item, &format!("{path}[{i}]"))?;
                }
            }
        }
        Shape::Metadata => {
            let Value::Object(map) = value else {
                return Err(ApiError::invalid("Invalid hash").with_param(path));
            };
            for (k, v) in map.iter() {
                let Some(s) = v.as_str() else {
                    return Err(ApiError::invalid(format!(
                        "Invalid value for metadata key '{k}': metadata values must be strings"
                    ))
                    .with_param(child(path, k)));
                };
                let key_len = k.chars().count();
                if key_len > 40 {
                    return Err(ApiError::invalid(format!(
                        "Metadata keys can have up to 40 characters, but you passed in a key that is {key_len} characters. Invalid key: '{k}'"
                    ))
                    .with_param(child(path, k)));
                }
                let len = s.chars().count();
                if len > 500 {
                    return Err(ApiError::invalid(format!(
                        "Metadata values can have up to 500 characters, but you passed in a value that is {len} characters. Invalid value for key '{k}'"
                    ))
                    .with_param(child(path, k)));
                }
            }
        }
        Shape::Any => {}
        Shape::Range => {
            if value.is_object() {
                const BOUNDS: Shape = Shape::Obj(&[
                    ("gt", Shape::Int(i64::MIN, i64::MAX)),
                    ("gte", Shape::Int(i64::MIN, i64::MAX)),
                    ("lt", Shape::Int(i64::MIN, i64::MAX)),
                    ("lte", Shape::Int(i64::MIN, i64::MAX)),
                ]);
                check(value, &BOUNDS, path)?;
            } else {
                check(value, &Shape::Int(i64::MIN, i64::MAX), path)?;
            }
        }
    }
    Ok(())
}

fn invalid_enum(path: &str, values: &[&str]) -> ApiError {
    ApiError::invalid(format!("Invalid {path}: must be one of {}", one_of(values))).with_param(path)
}

/// Maximum number of metadata keys on one object.
pub const MAX_METADATA_KEYS: usize = 50;

/// Apply `metadata` parameters to `current`: `metadata[k]=v` sets, `metadata[k]=`
/// removes, `metadata=` clears. Enforces the 50-key limit on the result.
pub fn apply_metadata(
    current: &mut std::collections::BTreeMap<String, String>,
    param: Option<&Value>,
) -> Result<(), ApiError> {
    match param {
        None => {}
        Some(Value::String(s)) if s.is_empty() => current.clear(),
        Some(Value::Object(map)) => {
            for (k, v) in map {
                match v.as_str() {
                    Some("") | None => {
                        current.remove(k);
                    }
                    Some(s) => {
                        current.insert(k.clone(), s.to_owned());
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("Invalid hash").with_param("metadata")),
    }
    if current.len() > MAX_METADATA_KEYS {
        return Err(ApiError::invalid(format!(
            "You can have up to {MAX_METADATA_KEYS} metadata keys, but you passed in {}.",
            current.len()
        ))
        .with_param("metadata"));
    }
    Ok(())
}

/// A set, non-empty string parameter.
pub fn str_of<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// A required string parameter; `path` names it in the error.
pub fn required_str<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, ApiError> {
    str_of(map, key).ok_or_else(|| ApiError::missing(path))
}

/// An integer parameter (already coerced by [`validate`]).
pub fn int_of(map: &Map<String, Value>, key: &str) -> Option<i64> {
    map.get(key).and_then(Value::as_i64)
}

/// A boolean parameter (already coerced by [`validate`]).
pub fn bool_of(map: &Map<String, Value>, key: &str) -> Option<bool> {
    map.get(key).and_then(Value::as_bool)
}

/// A nested hash parameter, if set.
pub fn obj_of<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Map<String, Value>> {
    map.get(key).and_then(Value::as_object)
}

/// What an array parameter asks for.
pub enum ArrayParam<'a> {
    /// Not sent: leave as is.
    Absent,
    /// Sent as the empty string: unset.
    Unset,
    Set(&'a [Value]),
}

pub fn array_of<'a>(map: &'a Map<String, Value>, key: &str) -> ArrayParam<'a> {
    match map.get(key) {
        None => ArrayParam::Absent,
        Some(Value::Array(items)) => ArrayParam::Set(items),
        Some(_) => ArrayParam::Unset,
    }
}

/// The string items of an array (validated arrays hold strings or "").
pub fn strings(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `expand` parameter's entries.
pub fn expand_of(map: &Map<String, Value>) -> Vec<String> {
    match array_of(map, "expand") {
        ArrayParam::Set(items) => strings(items),
        _ => Vec::new(),
    }
}

/// Reject expansions not in `allowed` (Stripe: "This property cannot be expanded").
pub fn check_expand(expand: &[String], allowed: &[&str]) -> Result<(), ApiError> {
    for e in expand {
        if !allowed.contains(&e.as_str()) {
            return Err(
                ApiError::invalid(format!("This property cannot be expanded ({e})."))
                    .with_param("expand"),
            );
        }
    }
    Ok(())
}

/// Like [`check_expand`] for list endpoints, where paths start with `data.`.
pub fn check_list_expand(expand: &[String], allowed: &[&str]) -> Result<(), ApiError> {
    for e in expand {
        if !e
            .strip_prefix("data.")
            .is_some_and(|rest| allowed.contains(&rest))
        {
            return Err(
                ApiError::invalid(format!("This property cannot be expanded ({e})."))
                    .with_param("expand"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Map<String, Value> {
        form::parse(s).expect("parses")
    }

    const CREATE: &[(&str, Shape)] = &[
        ("amount", Shape::Int(0, 100)),
        ("flag", Shape::Bool),
        ("type", Shape::Enum(&["physical", "virtual"])),
        ("spending_controls", CARD_SPENDING_CONTROLS),
        EXPAND,
        METADATA,
    ];

    #[test]
    fn coerces_types_and_arrays() {
        let mut m = parse(
            "amount=5&flag=true&type=virtual&expand[0]=number&spending_controls[spending_limits][0][amount]=5000&spending_controls[spending_limits][0][interval]=all_time&spending_controls[blocked_merchant_countries][]=RU",
        );
        validate(&mut m, CREATE).expect("valid");
        assert_eq!(
            Value::Object(m),
            json!({
                "amount": 5, "flag": true, "type": "virtual", "expand": ["number"],
                "spending_controls": {
                    "spending_limits": [{"amount": 5000, "interval": "all_time"}],
                    "blocked_merchant_countries": ["RU"]
                }
            })
        );
    }

    #[test]
    fn stripe_style_errors() {
        let mut m = parse("bogus=1");
        let e = validate(&mut m, CREATE).expect_err("unknown");
        assert_eq!(e.message, "Received unknown parameter: bogus");
        assert_eq!(e.code, Some("parameter_unknown"));

        let mut m = parse("spending_controls[nope]=1");
        let e = validate(&mut m, CREATE).expect_err("unknown nested");
        assert_eq!(e.param.as_deref(), Some("spending_controls[nope]"));

        let mut m = parse("amount=abc");
        let e = validate(&mut m, CREATE).expect_err("int");
        assert_eq!(e.message, "Invalid integer: abc");
        assert_eq!(e.code, Some("parameter_invalid_integer"));

        let mut m = parse("amount=101");
        assert!(validate(&mut m, CREATE).is_err());

        let mut m = parse("type=plastic");
        let e = validate(&mut m, CREATE).expect_err("enum");
        assert_eq!(
            e.message,
            "Invalid type: must be one of physical or virtual"
        );

        let mut m = parse("spending_controls[allowed_categories][]=taxis");
        let e = validate(&mut m, CREATE).expect_err("category");
        assert_eq!(
            e.param.as_deref(),
            Some("spending_controls[allowed_categories][0]")
        );

        let mut m = parse("spending_controls[blocked_merchant_countries][]=Russia");
        assert!(validate(&mut m, CREATE).is_err());

        let mut m = parse("expand=number");
        let e = validate(&mut m, CREATE).expect_err("array");
        assert_eq!(e.message, "Invalid array");

        let mut m = parse(&format!("metadata[{}]=v", "k".repeat(41)));
        assert!(validate(&mut m, CREATE).is_err());
        let mut m = parse(&format!("metadata[k]={}", "v".repeat(501)));
        assert!(validate(&mut m, CREATE).is_err());
    }

    #[test]
    fn empty_string_is_accepted_anywhere() {
        let mut m = parse("amount=&spending_controls[allowed_categories]=&metadata=");
        validate(&mut m, CREATE).expect("valid");
        assert!(matches!(
            array_of(
                obj_of(&m, "spending_controls").expect("obj"),
                "allowed_categories"
            ),
            ArrayParam::Unset
        ));
    }

    #[test]
    fn metadata_merge_rules() {
        let mut md = std::collections::BTreeMap::new();
        apply_metadata(&mut md, Some(&json!({"a": "1", "b": "2"}))).expect("ok");
        apply_metadata(&mut md, Some(&json!({"a": "", "c": "3"}))).expect("ok");
        assert_eq!(md.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        apply_metadata(&mut md, Some(&json!(""))).expect("ok");
        assert!(md.is_empty());
        let many: Map<String, Value> = (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
        let e = apply_metadata(&mut md, Some(&Value::Object(many))).expect_err("too many");
        assert!(e.message.contains("up to 50 metadata keys"));
    }

    #[test]
    fn enum_message_formatting() {
        assert_eq!(one_of(&["a"]), "a");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b, or c");
    }
}
