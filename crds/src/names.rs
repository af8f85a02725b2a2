//! Names and label values both sides derive from user-chosen names: the
//! operator writes them, the agent selects by them, so one function makes
//! each.

/// Longest object name (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 63;

/// 32-bit FNV-1a: a stable hash (unlike `std`'s) for shortening names.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `base + suffix`, or when that is longer than `max`, `base` cut short and
/// followed by `-` and eight hex digits of its hash, then `suffix`. The cut
/// never leaves a `-` or `.` before the hash, so the result stays a valid name.
pub fn fit_name(base: &str, suffix: &str, max: usize) -> String {
    if base.len() + suffix.len() <= max {
        return format!("{base}{suffix}");
    }
    let hash = format!("{:08x}", fnv1a(base));
    let keep = max.saturating_sub(suffix.len() + hash.len() + 1);
    let cut: String = base.chars().take(keep).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    format!("{cut}-{hash}{suffix}")
}

/// A name as a label value: unchanged when it has at most 63 characters,
/// else shortened with a hash (see [`fit_name`]). The operator labels each
/// shard with `tandem.dev/node=<label_value(node name)>`, and the agent
/// selects its shards by the same value: a node name may be a DNS
/// subdomain of up to 253 characters (a Mac's full host name), a label
/// value may not.
pub fn label_value(name: &str) -> String {
    fit_name(name, "", MAX_LABEL_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_become_valid_label_values() {
        let label = label_value(&"n".repeat(70));
        assert_eq!(label.len(), 63);
        assert!(
            label
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric())
        );
        assert_eq!(label_value("node-1"), "node-1");
        assert_ne!(label_value(&"n".repeat(70)), label_value(&"n".repeat(71)));
        // A cut that would end in '-' or '.' is trimmed.
        let dashy = format!("{}-{}", "a".repeat(53), "b".repeat(20));
        assert!(
            !label_value(&dashy).contains("--"),
            "{}",
            label_value(&dashy)
        );
    }
}
