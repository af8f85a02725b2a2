//! A small deterministic mutation fuzzer that runs under `cargo test`.
//!
//! Each target starts from its committed seed corpus
//! (`node-agent/fuzz/corpus/<target>/`), runs every seed as it is, then
//! mutates seeds (bit flips, interesting bytes and integers, truncation,
//! duplication, splicing, random insertions, and for JSON inputs edits of
//! the parsed document) for a budget of wall time and iterations. Inputs
//! the parser accepts join the pool, so mutations reach past the first
//! checks. A check that panics, or an input that runs longer than the
//! hang limit, fails the test with the seed, the iteration, the input in
//! hex, and a file holding the input (under `target/tmp/fuzz-failures/`).
//!
//! Environment:
//! - `TANDEM_FUZZ_SECONDS`: wall time per target (default 2).
//! - `TANDEM_FUZZ_ITERATIONS`: most iterations per target (default 1 000 000).
//! - `TANDEM_FUZZ_SEED`: the PRNG seed (default: fixed per target, so CI
//!   runs the same inputs; `time` picks one from the clock).
//! - `TANDEM_FUZZ_HANG_SECONDS`: one input taking longer fails (default 10).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a check made of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The parser accepted it: worth mutating further.
    Accepted,
    /// The parser refused it with an error (as it should for garbage).
    Rejected,
}

impl Verdict {
    /// `Accepted` for `Ok`, `Rejected` for `Err`.
    pub fn of<T, E>(result: &Result<T, E>) -> Verdict {
        if result.is_ok() {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        }
    }
}

/// How inputs of a target are built, which picks the mutations that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Any bytes (protobuf messages).
    Bytes,
    /// A text (templates): byte mutations plus template-ish tokens.
    Text,
    /// A JSON document: byte mutations plus edits of the parsed value.
    Json,
    /// A safetensors file: 8-byte length, JSON header, data.
    Safetensors,
}

/// A fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Directory name under the corpus root, and the name in reports.
    pub name: &'static str,
    /// How its inputs are built.
    pub shape: Shape,
    /// Longest input to try.
    pub max_len: usize,
}

/// Where the committed seeds live.
pub fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// SplitMix64: small, fast, and the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Integers that break arithmetic: limits of each width, and neighbours.
const INTERESTING_INTS: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4095,
    4096,
    32767,
    32768,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'9', b'-',
    b'.', b'e', b'n', b't', b'/', b'%', b' ', b'\n', 0xc3, 0xe2, 0xf0,
];

/// JSON values that parsers mishandle: big, negative and fractional
/// numbers, wrong types, deep and empty containers, odd strings.
fn interesting_json(rng: &mut Rng) -> Value {
    let text = match rng.below(24) {
        0 => "0",
        1 => "-1",
        2 => "4294967295",
        3 => "4294967296",
        4 => "18446744073709551615",
        5 => "18446744073709551616",
        6 => "-9223372036854775808",
        7 => "1e308",
        8 => "1.5",
        9 => "-0.0",
        10 => "null",
        11 => "true",
        12 => "false",
        13 => "[]",
        14 => "{}",
        15 => "\"\"",
        16 => "\"..\"",
        17 => "\"a/b\"",
        18 => "\"\\u0000\"",
        19 => "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        20 => "\"\u{1F999}\u{0301}\"",
        21 => "2147483648",
        22 => "65536",
        _ => {
            let n = *rng.pick(INTERESTING_INTS);
            return Value::from(n);
        }
    };
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Edits one node of a JSON document.
fn mutate_json_value(value: &mut Value, rng: &mut Rng, pool: &[Vec<u8>], depth: usize) {
    let descend = depth < 12 && !rng.one_in(3);
    match value {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            if descend {
                if let Some(child) = map.get_mut(&key) {
                    mutate_json_value(child, rng, pool, depth + 1);
                }
                return;
            }
            match rng.below(5) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(key, interesting_json(rng));
                }
                2 => {
                    // A key borrowed from elsewhere in the document (or another seed).
                    let other = rng.pick(&keys).clone();
                    if let Some(v) = map.get(&other).cloned() {
                        map.insert(key, v);
                    }
                }
                3 => {
                    if let Some(v) = map.remove(&key) {
                        map.insert(format!("{key}{}", rng.below(3)), v);
                    }
                }
                _ => {
                    if let Some(donor) = pool_value(rng, pool) {
                        map.insert(key, donor);
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            if descend {
                mutate_json_value(&mut items[i], rng, pool, depth + 1);
                return;
            }
            match rng.below(5) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    let times = 1 + rng.below(64);
                    for _ in 0..times {
                        items.insert(i, copy.clone());
                    }
                }
                2 => items[i] = interesting_json(rng),
                3 => items.push(interesting_json(rng)),
                _ => items.reverse(),
            }
        }
        Value::String(s) => match rng.below(5) {
            0 => s.clear(),
            1 => {
                let copy = s.clone();
                let times = 1 + rng.below(16);
                for _ in 0..times {
                    s.push_str(&copy);
                }
            }
            2 => s.push(char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}')),
            3 => {
                let cut = rng.below(s.len() + 1);
                let cut = (0..=cut)
                    .rev()
                    .find(|c| s.is_char_boundary(*c))
                    .unwrap_or(0);
                s.truncate(cut);
            }
            _ => *value = interesting_json(rng),
        },
        _ => *value = interesting_json(rng),
    }
}

/// A JSON value from another pool entry (for splicing documents).
fn pool_value(rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Value> {
    if pool.is_empty() {
        return None;
    }
    let donor: Value = serde_json::from_slice(rng.pick(pool).as_slice()).ok()?;
    let mut node = &donor;
    for _ in 0..rng.below(4) {
        node = match node {
            Value::Object(m) if !m.is_empty() => {
                let values: Vec<&Value> = m.values().collect();
                values[rng.below(values.len())]
            }
            Value::Array(a) if !a.is_empty() => &a[rng.below(a.len())],
            _ => break,
        };
    }
    Some(node.clone())
}

fn mutate_json(input: &[u8], rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(input).ok()?;
    for _ in 0..1 + rng.below(3) {
        mutate_json_value(&mut value, rng, pool, 0);
    }
    let text = if rng.one_in(2) {
        serde_json::to_vec(&value)
    } else {
        serde_json::to_vec_pretty(&value)
    };
    text.ok()
}

/// Template syntax, for splicing into template texts.
const TEMPLATE_TOKENS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{%-",
    "-%}",
    "{{-",
    "-}}",
    "{% for x in messages %}",
    "{% endfor %}",
    "{% if ",
    "{% endif %}",
    "{% else %}",
    "{% set x = ",
    "{% macro m(a) %}",
    "{% endmacro %}",
    "{{ m(1) }}",
    "loop.index",
    "messages[0]['content']",
    "| trim",
    "| tojson",
    "| length",
    "| join(',')",
    "| reverse",
    "| sort",
    "range(99999)",
    "~",
    " + ",
    " * 99999",
    "raise_exception('x')",
    "strftime_now('%Y')",
    "strftime_now('%')",
    ".strip()",
    ".split()",
    "namespace(a=1)",
    "{% raw %}",
    "{% endraw %}",
    "{% filter upper %}",
    "{% endfilter %}",
    "{% call m(1) %}",
    "{% endcall %}",
    "caller()",
    "{% include 'x' %}",
    "{% extends 'x' %}",
    "{% block b %}",
    "{% endblock %}",
    "self",
    "super()",
    "[1,2,3][::-1]",
    "'\\u{0}'",
    "{% break %}",
    "{% continue %}",
    "x is defined",
    "not ",
    "(((((",
    ")))))",
    "0x",
    "1e999",
    "tojson(indent=99999)",
];

fn mutate_bytes(input: &mut Vec<u8>, rng: &mut Rng, pool: &[Vec<u8>], shape: Shape) {
    let len = input.len();
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = *rng.pick(INTERESTING_BYTES);
        }
        2 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next_u64() as u8;
        }
        3 => input.truncate(rng.below(len + 1)),
        4 if len > 0 => {
            // Duplicate a chunk in place.
            let start = rng.below(len);
            let end = (start + 1 + rng.below(64)).min(len);
            let chunk = input[start..end].to_vec();
            let at = rng.below(input.len() + 1);
            input.splice(at..at, chunk);
        }
        5 if len > 0 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(32)).min(len);
            input.drain(start..end);
        }
        6 if !pool.is_empty() => {
            // Splice: our head with another entry's tail.
            let other = rng.pick(pool);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        7 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let fresh: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            input.splice(at..at, fresh);
        }
        8 if len > 0 => {
            // An interesting integer, binary little-endian, at a random place.
            let n = *rng.pick(INTERESTING_INTS);
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let at = rng.below(len);
            for (k, b) in n.to_le_bytes().iter().take(width).enumerate() {
                if let Some(slot) = input.get_mut(at + k) {
                    *slot = *b;
                }
            }
        }
        9 => {
            // An interesting integer as text, over a digit run or anywhere.
            let n = rng.pick(INTERESTING_INTS).to_string();
            let at = rng.below(len + 1);
            let end = input[at..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(len, |p| at + p);
            input.splice(at..end, n.into_bytes());
        }
        10 if shape == Shape::Text => {
            let token = rng.pick(TEMPLATE_TOKENS).as_bytes().to_vec();
            let at = rng.below(len + 1);
            input.splice(at..at, token);
        }
        11 if len > 0 => {
            // Repeat a chunk many times (quadratic blow-ups).
            let start = rng.below(len);
            let end = (start + 1 + rng.below(16)).min(len);
            let chunk = input[start..end].to_vec();
            let times = 2 + rng.below(200);
            let at = rng.below(input.len() + 1);
            let repeated: Vec<u8> = chunk
                .iter()
                .copied()
                .cycle()
                .take(chunk.len() * times)
                .collect();
            input.splice(at..at, repeated);
        }
        _ => {
            // Swap two bytes.
            if len > 1 {
                let (a, b) = (rng.below(len), rng.below(len));
                input.swap(a, b);
            }
        }
    }
}

/// Splits a safetensors file into its header JSON and the data after it.
fn safetensors_parts(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u64::from_le_bytes(*input.first_chunk::<8>()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    Some((input.get(8..end)?, input.get(end..)?))
}

fn mutate_safetensors(input: &[u8], rng: &mut Rng, pool: &[Vec<u8>]) -> Option<Vec<u8>> {
    let (header, data) = safetensors_parts(input)?;
    let headers: Vec<Vec<u8>> = pool
        .iter()
        .filter_map(|p| safetensors_parts(p).map(|(h, _)| h.to_vec()))
        .collect();
    let mut header = if rng.one_in(2) {
        mutate_json(header, rng, &headers)?
    } else {
        header.to_vec()
    };
    if rng.one_in(8) {
        // Trailing spaces, as real writers pad to 8 bytes.
        header.extend(std::iter::repeat_n(b' ', rng.below(8)));
    }
    let mut data = data.to_vec();
    match rng.below(4) {
        0 => data.truncate(rng.below(data.len() + 1)),
        1 => data.extend(std::iter::repeat_n(0u8, rng.below(256))),
        _ => {}
    }
    let mut len = header.len() as u64;
    if rng.one_in(6) {
        len = *rng.pick(INTERESTING_INTS);
    } else if rng.one_in(6) {
        len = len.wrapping_add(rng.below(17) as u64).wrapping_sub(8);
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    Some(out)
}

/// One mutated input from `base`.
pub fn mutate(base: &[u8], rng: &mut Rng, pool: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let structured = match target.shape {
        Shape::Json if rng.below(3) != 0 => mutate_json(base, rng, pool),
        Shape::Safetensors if rng.below(3) != 0 => mutate_safetensors(base, rng, pool),
        _ => None,
    };
    let mut out = match structured {
        Some(out) => out,
        None => {
            let mut out = base.to_vec();
            for _ in 0..1 + rng.below(4) {
                mutate_bytes(&mut out, rng, pool, target.shape);
            }
            out
        }
    };
    out.truncate(target.max_len);
    out
}

/// The seeds of `target`, sorted by file name.
pub fn load_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_root().join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap_or_else(|err| panic!("{name}: {err}"));
            (name, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "the corpus {} is empty", dir.display());
    seeds
}

fn hex(bytes: &[u8]) -> String {
    const SHOWN: usize = 4096;
    let mut out: String = bytes
        .iter()
        .take(SHOWN)
        .map(|b| format!("{b:02x}"))
        .collect();
    if bytes.len() > SHOWN {
        out.push_str(&format!("... ({} bytes in all)", bytes.len()));
    }
    out
}

/// Keeps a failing input for a human: `target/tmp/fuzz-failures/`.
fn save_failure(target: &str, seed: u64, iteration: u64, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-seed{seed}-iter{iteration}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Runs `check` on every seed of `target`, then on mutations of the pool,
/// within the budget. Fails the test on the first panic or hang.
pub fn run<F>(target: Target, check: F)
where
    F: Fn(&[u8]) -> Verdict + Send + Sync + 'static,
{
    let seconds: f64 = env_number("TANDEM_FUZZ_SECONDS").unwrap_or(2.0);
    let max_iterations: u64 = env_number("TANDEM_FUZZ_ITERATIONS").unwrap_or(1_000_000);
    let hang = Duration::from_secs_f64(env_number("TANDEM_FUZZ_HANG_SECONDS").unwrap_or(10.0));
    let seed = match std::env::var("TANDEM_FUZZ_SEED")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("time") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        Some(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("TANDEM_FUZZ_SEED={text} is not a number or `time`")),
        None => fnv(target.name),
    };
    let budget = Duration::from_secs_f64(seconds.max(0.0));
    let seeds = load_corpus(target.name);
    eprintln!(
        "fuzz {}: seed {seed} (TANDEM_FUZZ_SEED={seed} repeats it), {} corpus seeds, \
         {seconds} s or {max_iterations} iterations; should the process abort, the input \
         it ran is target/tmp/fuzz-current/{}.bin (its seed beside it)",
        target.name,
        seeds.len(),
        target.name
    );

    // The loop runs on its own thread, so a hang is seen (and reported
    // with its input) instead of stalling the test run.
    let current = Arc::new(Mutex::new(Vec::<u8>::new()));
    let started_at = Arc::new(AtomicU64::new(0));
    let iteration = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let clock = Instant::now();
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let worker = {
        let (current, started_at, iteration, done, failure) = (
            current.clone(),
            started_at.clone(),
            iteration.clone(),
            done.clone(),
            failure.clone(),
        );
        std::thread::Builder::new()
            .name(format!("fuzz-{}", target.name))
            .spawn(move || {
                // The input being checked, on disk: a stack overflow aborts
                // the process before any report, and this file survives it.
                let trace_path = Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .join("fuzz-current")
                    .join(format!("{}.bin", target.name));
                let _ = std::fs::create_dir_all(trace_path.parent().unwrap_or(Path::new(".")));
                let trace = std::fs::File::create(&trace_path).ok();
                let _ = std::fs::write(
                    trace_path.with_extension("seed"),
                    format!("TANDEM_FUZZ_SEED={seed}\n"),
                );
                let mut rng = Rng::new(seed);
                let mut pool: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
                let mut accepted = 0u64;
                let mut n = 0u64;
                while n < max_iterations {
                    let input = match seeds.get(n as usize) {
                        Some((_, bytes)) => bytes.clone(),
                        None => {
                            if clock.elapsed() >= budget {
                                break;
                            }
                            let base = rng.pick(&pool).clone();
                            mutate(&base, &mut rng, &pool, &target)
                        }
                    };
                    if let Some(file) = &trace {
                        use std::os::unix::fs::FileExt;
                        let _ = file.set_len(0);
                        let _ = file.write_all_at(&input, 0);
                    }
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = input.clone();
                    iteration.store(n, Ordering::Relaxed);
                    started_at.store(clock.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                    let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
                    started_at.store(0, Ordering::Relaxed);
                    match outcome {
                        Ok(Verdict::Accepted) => {
                            accepted += 1;
                            if n as usize >= seeds.len() && pool.len() < 512 {
                                pool.push(input);
                            } else if n as usize >= seeds.len() && rng.one_in(8) {
                                let slot = seeds.len() + rng.below(pool.len() - seeds.len());
                                pool[slot] = input;
                            }
                        }
                        Ok(Verdict::Rejected) => {}
                        Err(payload) => {
                            let path = save_failure(target.name, seed, n, &input);
                            let origin = match seeds.get(n as usize) {
                                Some((name, _)) => format!("corpus seed {name}"),
                                None => format!("iteration {n} of seed {seed}"),
                            };
                            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                                "fuzz {}: {origin} panicked: {}\ninput ({} bytes, saved to {}): {}",
                                target.name,
                                panic_text(payload.as_ref()),
                                input.len(),
                                path.display(),
                                hex(&input)
                            ));
                            break;
                        }
                    }
                    n += 1;
                }
                eprintln!(
                    "fuzz {}: {n} inputs in {:.1} s, {accepted} accepted, pool of {}",
                    target.name,
                    clock.elapsed().as_secs_f64(),
                    pool.len()
                );
                done.store(true, Ordering::Release);
            })
            .expect("the fuzz thread")
    };
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let since = started_at.load(Ordering::Relaxed);
        if since > 0 {
            let running = (clock.elapsed().as_millis() as u64 + 1).saturating_sub(since);
            if Duration::from_millis(running) > hang {
                let input = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let n = iteration.load(Ordering::Relaxed);
                let path = save_failure(target.name, seed, n, &input);
                panic!(
                    "fuzz {}: iteration {n} of seed {seed} ran over {hang:?} (a hang?)\n\
                     input ({} bytes, saved to {}): {}",
                    target.name,
                    input.len(),
                    path.display(),
                    hex(&input)
                );
            }
        }
    }
    let _ = worker.join();
    if let Some(message) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        panic!("{message}");
    }
}
