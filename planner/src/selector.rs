//! Kubernetes label selectors (`matchLabels` plus `matchExpressions`) over
//! LlamaNode labels, with the same meaning as `metav1.LabelSelector`.

use std::collections::BTreeMap;
use std::fmt;

/// How a [`SelectorRequirement`] relates a label to its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorOperator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorRequirement {
    /// Label key.
    pub key: String,
    /// How the label relates to `values`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`; ignored by `Exists` and `DoesNotExist`.
    /// The API server rejects an empty list for `In`/`NotIn`; here an empty
    /// `In` matches nothing and an empty `NotIn` matches everything.
    pub values: Vec<String>,
}

impl SelectorRequirement {
    /// Whether a node with `labels` satisfies this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector. Every `match_labels` pair and every
/// `match_expressions` requirement must hold; an empty selector matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Whether the selector has no terms and so matches every node.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether a node with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// The `kubectl -l` syntax: `k=v,k in (a,b),k notin (c),k,!k`. An empty
/// selector renders as the empty string.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            let mut values = r.values.clone();
            values.sort();
            let values = values.join(",");
            terms.push(match r.operator {
                SelectorOperator::In => format!("{} in ({values})", r.key),
                SelectorOperator::NotIn => format!("{} notin ({values})", r.key),
                SelectorOperator::Exists => r.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn operators_follow_kubernetes() {
        use SelectorOperator::*;
        let m3 = labels(&[("chip", "m3"), ("os", "macos")]);
        let bare = labels(&[]);
        let cases = [
            (req("chip", In, &["m2", "m3"]), true, false),
            (req("chip", In, &["m2"]), false, false),
            (req("chip", In, &[]), false, false),
            (req("chip", NotIn, &["m2"]), true, true),
            (req("chip", NotIn, &["m3"]), false, true),
            (req("chip", Exists, &[]), true, false),
            (req("chip", DoesNotExist, &[]), false, true),
        ];
        for (r, on_m3, on_bare) in cases {
            assert_eq!(r.matches(&m3), on_m3, "{r:?} on m3");
            assert_eq!(r.matches(&bare), on_bare, "{r:?} on bare");
        }
    }

    #[test]
    fn all_terms_must_hold_and_empty_matches_all() {
        let node = labels(&[("tandem.dev/chip", "apple-m3-ultra"), ("zone", "a")]);
        assert!(LabelSelector::default().matches(&node));
        assert!(LabelSelector::default().matches(&labels(&[])));
        let mut s = LabelSelector {
            match_labels: labels(&[("tandem.dev/chip", "apple-m3-ultra")]),
            match_expressions: vec![req("zone", SelectorOperator::In, &["a", "b"])],
        };
        assert!(s.matches(&node));
        s.match_expressions
            .push(req("gpu", SelectorOperator::Exists, &[]));
        assert!(!s.matches(&node));
    }

    #[test]
    fn displays_like_kubectl() {
        use SelectorOperator::*;
        let s = LabelSelector {
            match_labels: labels(&[("tandem.dev/chip", "apple-m3-ultra")]),
            match_expressions: vec![
                req("zone", In, &["b", "a"]),
                req("os", NotIn, &["linux"]),
                req("fast", Exists, &[]),
                req("slow", DoesNotExist, &[]),
            ],
        };
        assert_eq!(
            s.to_string(),
            "tandem.dev/chip=apple-m3-ultra,zone in (a,b),os notin (linux),fast,!slow"
        );
        assert_eq!(LabelSelector::default().to_string(), "");
    }
}
