//! Small pieces of wording shared by the planner's messages and the
//! operator's conditions, so that lists and sizes read the same everywhere.

/// "1, 2, 4".
pub(crate) fn join_sizes(sizes: &[u32]) -> String {
    let parts: Vec<String> = sizes.iter().map(u32::to_string).collect();
    parts.join(", ")
}

/// Bytes as GiB with one decimal, for messages.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// "1 node has" / "3 nodes have".
pub(crate) fn nodes_have(n: usize) -> String {
    if n == 1 {
        "1 node has".to_owned()
    } else {
        format!("{n} nodes have")
    }
}

/// "1 rank was requested" / "4 ranks were requested".
pub(crate) fn ranks_requested(w: u32) -> String {
    if w == 1 {
        "1 rank was requested".to_owned()
    } else {
        format!("{w} ranks were requested")
    }
}

/// "a", "a or b", "a, b, or c".
pub(crate) fn or_list(options: &[String]) -> String {
    match options {
        [] => String::new(),
        [one] => one.clone(),
        [first, second] => format!("{first} or {second}"),
        [rest @ .., last] => format!("{}, or {last}", rest.join(", ")),
    }
}

/// The first `shown` items joined by `; `, then how many more: "a; b; and
/// 3 more".
pub fn short_list(items: &[String], shown: usize) -> String {
    let mut text = items
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > shown {
        text.push_str(&format!("; and {} more", items.len() - shown));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_the_same_everywhere() {
        let items: Vec<String> = (1..=4).map(|i| format!("n{i}")).collect();
        assert_eq!(short_list(&items, 4), "n1; n2; n3; n4");
        assert_eq!(short_list(&items, 2), "n1; n2; and 2 more");
        assert_eq!(short_list(&[], 2), "");
        assert_eq!(or_list(&items[..3]), "n1, n2, or n3");
        assert_eq!(join_sizes(&[1, 2, 4]), "1, 2, 4");
    }
}
