//! Cursor pagination shared by list endpoints: newest first, `limit` 1..=100
//! (default 10), `starting_after` / `ending_before` object ids, `created` ranges.

use serde_json::{Map, Value, json};

use crate::emulator::error::ApiError;
use crate::emulator::params::{int_of, obj_of, str_of};
use crate::emulator::state::{ObjectStore, StoredObject};

pub const DEFAULT_LIMIT: usize = 10;

/// `created=` as an exact value or bounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CreatedRange {
    pub gt: Option<i64>,
    pub gte: Option<i64>,
    pub lt: Option<i64>,
    pub lte: Option<i64>,
}

impl CreatedRange {
    pub fn contains(&self, t: i64) -> bool {
        self.gt.is_none_or(|b| t > b)
            && self.gte.is_none_or(|b| t >= b)
            && self.lt.is_none_or(|b| t < b)
            && self.lte.is_none_or(|b| t <= b)
    }
}

/// Validated pagination parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    pub starting_after: Option<String>,
    pub ending_before: Option<String>,
    pub created: CreatedRange,
}

impl ListQuery {
    /// Read from parameters already checked against `params::LIST_COMMON`.
    pub fn from_params(params: &Map<String, Value>) -> Result<Self, ApiError> {
        let limit = int_of(params, "limit")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_LIMIT);
        let starting_after = str_of(params, "starting_after").map(str::to_owned);
        let ending_before = str_of(params, "ending_before").map(str::to_owned);
        if starting_after.is_some() && ending_before.is_some() {
            return Err(ApiError::exclusive(&["starting_after", "ending_before"]));
        }
        let created = match params.get("created") {
            Some(Value::Number(n)) => {
                let t = n.as_i64();
                CreatedRange {
                    gte: t,
                    lte: t,
                    ..CreatedRange::default()
                }
            }
            Some(Value::Object(_)) => {
                let o = obj_of(params, "created");
                let get = |k| o.and_then(|o| int_of(o, k));
                CreatedRange {
                    gt: get("gt"),
                    gte: get("gte"),
                    lt: get("lt"),
                    lte: get("lte"),
                }
            }
            _ => CreatedRange::default(),
        };
        Ok(Self {
            limit,
            starting_after,
            ending_before,
            created,
        })
    }
}

/// One page of a list.
#[derive(Debug)]
pub struct Page<'a, T> {
    pub items: Vec<&'a T>,
    pub has_more: bool,
}

/// Select a page from `store` (newest first). `keep` filters; the cursor object is a
/// position in the unfiltered list and must exist (`noun` names it in the error).
pub fn paginate<'a, T: StoredObject>(
    store: &'a ObjectStore<T>,
    query: &ListQuery,
    noun: &str,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<'a, T>, ApiError> {
    let all: Vec<&T> = store.newest_first().collect();
    let position = |param: &str, id: &str| {
        all.iter()
            .position(|o| o.id() == id)
            .ok_or_else(|| ApiError::no_such_param(noun, id, param))
    };
    let wanted = |o: &&T| keep(o) && query.created.contains(o.created());
    if let Some(id) = &query.ending_before {
        let end = position("ending_before", id)?;
        let before: Vec<&T> = all[..end].iter().copied().filter(wanted).collect();
        let start = before.len().saturating_sub(query.limit);
        return Ok(Page {
            has_more: start > 0,
            items: before[start..].to_vec(),
        });
    }
    let start = match &query.starting_after {
        Some(id) => position("starting_after", id)? + 1,
        None => 0,
    };
    let mut after = all[start..].iter().copied().filter(wanted);
    let items: Vec<&T> = after.by_ref().take(query.limit).collect();
    let has_more = after.next().is_some();
    Ok(Page { items, has_more })
}

/// The list envelope.
pub fn envelope(data: Vec<Value>, has_more: bool, url: &str) -> Value {
    json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "url": url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Obj(String, i64);
    impl StoredObject for Obj {
        fn id(&self) -> &str {
            &self.0
        }
        fn created(&self) -> i64 {
            self.1
        }
    }

    fn store(n: usize) -> ObjectStore<Obj> {
        let mut s = ObjectStore::default();
        for i in 0..n {
            s.insert(Obj(format!("o{i}"), 1000 + i as i64));
        }
        s
    }

    fn q(limit: usize, after: Option<&str>, before: Option<&str>) -> ListQuery {
        ListQuery {
            limit,
            starting_after: after.map(str::to_owned),
            ending_before: before.map(str::to_owned),
            created: CreatedRange::default(),
        }
    }

    fn ids<'a>(p: &Page<'a, Obj>) -> Vec<&'a str> {
        p.items.iter().map(|o| o.0.as_str()).collect()
    }

    #[test]
    fn forward_pagination_walks_everything_once() {
        let s = store(25);
        let first = paginate(&s, &q(10, None, None), "thing", |_| true).expect("page");
        assert_eq!(ids(&first)[0], "o24");
        assert!(first.has_more);
        let mut seen = ids(&first)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let mut cursor = seen.last().cloned();
        loop {
            let p = paginate(&s, &q(10, cursor.as_deref(), None), "thing", |_| true).expect("page");
            seen.extend(ids(&p).into_iter().map(str::to_owned));
            cursor = seen.last().cloned();
            if !p.has_more {
                break;
            }
        }
        assert_eq!(seen.len(), 25);
        assert_eq!(seen.last().map(String::as_str), Some("o0"));
    }

    #[test]
    fn backward_pagination() {
        let s = store(25);
        // the 3 newer objects just before o10, still newest first
        let p = paginate(&s, &q(3, None, Some("o10")), "thing", |_| true).expect("page");
        assert_eq!(ids(&p), vec!["o13", "o12", "o11"]);
        assert!(p.has_more);
        let p = paginate(&s, &q(10, None, Some("o20")), "thing", |_| true).expect("page");
        assert_eq!(ids(&p), vec!["o24", "o23", "o22", "o21"]);
        assert!(!p.has_more);
    }

    #[test]
    fn filters_exact_limits_and_errors() {
        let s = store(6);
        let even = |o: &Obj| o.1 % 2 == 0;
        let p = paginate(&s, &q(3, None, None), "thing", even).expect("page");
        assert_eq!(ids(&p), vec!["o4", "o2", "o0"]);
        assert!(!p.has_more, "exactly limit items left means no more");
        let mut query = q(10, None, None);
        query.created = CreatedRange {
            gte: Some(1002),
            lt: Some(1004),
            ..CreatedRange::default()
        };
        let p = paginate(&s, &query, "thing", |_| true).expect("page");
        assert_eq!(ids(&p), vec!["o3", "o2"]);
        let err = paginate(&s, &q(3, Some("nope"), None), "thing", |_| true).expect_err("cursor");
        assert_eq!(err.param.as_deref(), Some("starting_after"));
        assert_eq!(err.code, Some("resource_missing"));
        let empty: ObjectStore<Obj> = ObjectStore::default();
        let p = paginate(&empty, &q(10, None, None), "thing", |_| true).expect("page");
        assert!(p.items.is_empty() && !p.has_more);
    }

    #[test]
    fn both_cursors_rejected() {
        let mut m = Map::new();
        m.insert("starting_after".into(), json!("a"));
        m.insert("ending_before".into(), json!("b"));
        assert!(ListQuery::from_params(&m).is_err());
    }
}
