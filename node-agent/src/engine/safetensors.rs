//! The safetensors format, read by hand so that a rank reads only its slices.
//!
//! A file is an 8-byte little-endian header length, a JSON header mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets into
//! the data section that follows the header), then the data. Reading the header
//! ourselves lets the loader fetch row ranges (one contiguous read) and column
//! ranges (one read per row) with positioned reads, counting every byte, instead
//! of loading whole tensors.
//!
//! The writer half produces the same layout for `make-model`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use super::error::{EngineError, Result};

/// Largest header accepted: real checkpoints have headers of a few hundred KiB.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorDtype {
    /// Booleans, one byte each.
    Bool,
    /// Unsigned 8-bit integers.
    U8,
    /// Signed 8-bit integers.
    I8,
    /// Unsigned 16-bit integers.
    U16,
    /// Signed 16-bit integers.
    I16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integers (MLX's packed quantized weights).
    U32,
    /// Signed 32-bit integers.
    I32,
    /// IEEE single precision.
    F32,
    /// Unsigned 64-bit integers.
    U64,
    /// Signed 64-bit integers.
    I64,
    /// IEEE double precision.
    F64,
}

impl TensorDtype {
    /// The name in the safetensors header.
    pub fn as_str(self) -> &'static str {
        match self {
            TensorDtype::Bool => "BOOL",
            TensorDtype::U8 => "U8",
            TensorDtype::I8 => "I8",
            TensorDtype::U16 => "U16",
            TensorDtype::I16 => "I16",
            TensorDtype::F16 => "F16",
            TensorDtype::BF16 => "BF16",
            TensorDtype::U32 => "U32",
            TensorDtype::I32 => "I32",
            TensorDtype::F32 => "F32",
            TensorDtype::U64 => "U64",
            TensorDtype::I64 => "I64",
            TensorDtype::F64 => "F64",
        }
    }

    fn parse(name: &str) -> Option<TensorDtype> {
        Some(match name {
            "BOOL" => TensorDtype::Bool,
            "U8" => TensorDtype::U8,
            "I8" => TensorDtype::I8,
            "U16" => TensorDtype::U16,
            "I16" => TensorDtype::I16,
            "F16" => TensorDtype::F16,
            "BF16" => TensorDtype::BF16,
            "U32" => TensorDtype::U32,
            "I32" => TensorDtype::I32,
            "F32" => TensorDtype::F32,
            "U64" => TensorDtype::U64,
            "I64" => TensorDtype::I64,
            "F64" => TensorDtype::F64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            TensorDtype::Bool | TensorDtype::U8 | TensorDtype::I8 => 1,
            TensorDtype::U16 | TensorDtype::I16 | TensorDtype::F16 | TensorDtype::BF16 => 2,
            TensorDtype::U32 | TensorDtype::I32 | TensorDtype::F32 => 4,
            TensorDtype::U64 | TensorDtype::I64 | TensorDtype::F64 => 8,
        }
    }

    /// Whether this is a floating-point type a model's weights may use.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            TensorDtype::F16 | TensorDtype::BF16 | TensorDtype::F32
        )
    }

    /// The matching MLX dtype.
    pub fn mlx(self) -> mlx_rs::Dtype {
        use mlx_rs::Dtype;
        match self {
            TensorDtype::Bool => Dtype::Bool,
            TensorDtype::U8 => Dtype::Uint8,
            TensorDtype::I8 => Dtype::Int8,
            TensorDtype::U16 => Dtype::Uint16,
            TensorDtype::I16 => Dtype::Int16,
            TensorDtype::F16 => Dtype::Float16,
            TensorDtype::BF16 => Dtype::Bfloat16,
            TensorDtype::U32 => Dtype::Uint32,
            TensorDtype::I32 => Dtype::Int32,
            TensorDtype::F32 => Dtype::Float32,
            TensorDtype::U64 => Dtype::Uint64,
            TensorDtype::I64 => Dtype::Int64,
            TensorDtype::F64 => Dtype::Float64,
        }
    }

    /// The safetensors type of an MLX dtype, if it has one.
    pub fn from_mlx(dtype: mlx_rs::Dtype) -> Option<TensorDtype> {
        use mlx_rs::Dtype;
        Some(match dtype {
            Dtype::Bool => TensorDtype::Bool,
            Dtype::Uint8 => TensorDtype::U8,
            Dtype::Int8 => TensorDtype::I8,
            Dtype::Uint16 => TensorDtype::U16,
            Dtype::Int16 => TensorDtype::I16,
            Dtype::Float16 => TensorDtype::F16,
            Dtype::Bfloat16 => TensorDtype::BF16,
            Dtype::Uint32 => TensorDtype::U32,
            Dtype::Int32 => TensorDtype::I32,
            Dtype::Float32 => TensorDtype::F32,
            Dtype::Uint64 => TensorDtype::U64,
            Dtype::Int64 => TensorDtype::I64,
            Dtype::Float64 => TensorDtype::F64,
            _ => return None,
        })
    }
}

impl fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one tensor lies in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: TensorDtype,
    /// Shape, outermost dimension first (row-major).
    pub shape: Vec<u64>,
    /// Absolute file offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Bytes of one row: everything after the first dimension.
    pub fn row_bytes(&self) -> u64 {
        self.shape.iter().skip(1).product::<u64>() * self.dtype.size()
    }
}

/// An open safetensors file with its parsed header. Reads go through
/// positioned reads and add to a byte counter shared by all files of a model.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    tensors: BTreeMap<String, TensorInfo>,
    bytes_read: Arc<AtomicU64>,
}

impl SafetensorsFile {
    /// Opens `path` and parses its header, checking that every tensor's byte
    /// range is consistent with its dtype and shape and lies inside the file.
    pub fn open(path: &Path, bytes_read: Arc<AtomicU64>) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(EngineError::io(path))?;
        let file_len = file.metadata().map_err(EngineError::io(path))?.len();
        let corrupt = |message: String| EngineError::CorruptHeader {
            file: path.to_owned(),
            message,
        };
        if file_len < 8 {
            return Err(corrupt(format!(
                "the file has {file_len} bytes, too few for the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(EngineError::io(path))?;
        let header_len = header_length(path, len_bytes, file_len)?;
        let mut header = vec![0u8; usize::try_from(header_len).unwrap_or(0)];
        file.read_exact_at(&mut header, 8)
            .map_err(EngineError::io(path))?;
        bytes_read.fetch_add(8 + header_len, Ordering::Relaxed);
        let tensors = layout(path, &header, file_len)?;
        Ok(SafetensorsFile {
            path: path.to_owned(),
            file,
            tensors,
            bytes_read,
        })
    }

    /// The tensors of a whole safetensors file held in memory, checked as
    /// [`SafetensorsFile::open`] checks a file on disk (`path` is for
    /// messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, TensorInfo>> {
        let file_len = bytes.len() as u64;
        let Some(len_bytes) = bytes.first_chunk::<8>() else {
            return Err(EngineError::CorruptHeader {
                file: path.to_owned(),
                message: format!(
                    "the file has {file_len} bytes, too few for the 8-byte header length"
                ),
            });
        };
        let header_len = header_length(path, *len_bytes, file_len)?;
        let header = bytes
            .get(8..8 + usize::try_from(header_len).unwrap_or(usize::MAX))
            .unwrap_or_default();
        layout(path, header, file_len)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors in the header, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// Reads `len` bytes at absolute offset `at` into `buf`.
    fn read_into(&self, tensor: &str, buf: &mut [u8], at: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|source| EngineError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("reading tensor `{tensor}`: {source}"),
                ),
            })?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Rows `first .. first + count` of the tensor (along its first dimension):
    /// one contiguous read.
    pub fn read_rows(
        &self,
        name: &str,
        info: &TensorInfo,
        first: u64,
        count: u64,
    ) -> Result<Vec<u8>> {
        let row = info.row_bytes();
        let mut buf = vec![0u8; to_usize(row * count)];
        self.read_into(name, &mut buf, info.start + first * row)?;
        Ok(buf)
    }

    /// Columns `first .. first + count` of a 2-D tensor: one read per row, so
    /// only the slice's bytes are read.
    pub fn read_columns(
        &self,
        name: &str,
        info: &TensorInfo,
        first: u64,
        count: u64,
    ) -> Result<Vec<u8>> {
        let elem = info.dtype.size();
        let (rows, cols) = (info.shape[0], info.shape[1]);
        if first == 0 && count == cols {
            return self.read_rows(name, info, 0, rows);
        }
        let piece = to_usize(count * elem);
        let mut buf = vec![0u8; piece * to_usize(rows)];
        for (r, chunk) in buf.chunks_exact_mut(piece.max(1)).enumerate() {
            let at = info.start + (r as u64 * cols + first) * elem;
            self.read_into(name, chunk, at)?;
        }
        Ok(buf)
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The header length in the first 8 bytes of a file of `file_len` bytes,
/// checked to fit.
fn header_length(path: &Path, len_bytes: [u8; 8], file_len: u64) -> Result<u64> {
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(EngineError::CorruptHeader {
            file: path.to_owned(),
            message: format!("header length {header_len} does not fit a file of {file_len} bytes"),
        });
    }
    Ok(header_len)
}

/// The tensors of `header` (the JSON after the length), each checked to lie
/// inside a file of `file_len` bytes.
fn layout(path: &Path, header: &[u8], file_len: u64) -> Result<BTreeMap<String, TensorInfo>> {
    let corrupt = |message: String| EngineError::CorruptHeader {
        file: path.to_owned(),
        message,
    };
    let data_start = 8 + header.len() as u64;
    let tensors = parse_header(header, data_start).map_err(corrupt)?;
    for (name, info) in &tensors {
        let Some(needed) = info.start.checked_add(info.len) else {
            return Err(corrupt(format!(
                "tensor {name}'s data_offsets end past any file size"
            )));
        };
        if needed > file_len {
            return Err(EngineError::Truncated {
                file: path.to_owned(),
                tensor: name.clone(),
                needed,
                actual: file_len,
            });
        }
    }
    Ok(tensors)
}

fn parse_header(header: &[u8], data_start: u64) -> Result<BTreeMap<String, TensorInfo>, String> {
    let text = std::str::from_utf8(header).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let json: Value =
        serde_json::from_str(text.trim_end()).map_err(|e| format!("header is not JSON: {e}"))?;
    let Value::Object(entries) = json else {
        return Err("header is not a JSON object".into());
    };
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype_name = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let dtype = TensorDtype::parse(dtype_name)
            .ok_or_else(|| bad(&format!("unknown dtype `{dtype_name}`")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| bad("shape is not a list of integers"))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
        let begin = offsets[0]
            .as_u64()
            .ok_or_else(|| bad("data_offsets are not integers"))?;
        let end = offsets[1]
            .as_u64()
            .ok_or_else(|| bad("data_offsets are not integers"))?;
        let elements = shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| bad("shape overflows"))?;
        let expected = elements
            .checked_mul(dtype.size())
            .ok_or_else(|| bad("shape overflows"))?;
        // A row's size too: with a first dimension of 0 the tensor is empty
        // whatever the others are, and the readers compute row sizes.
        shape
            .iter()
            .skip(1)
            .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| bad("shape overflows"))?;
        if end < begin || end - begin != expected {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but {dtype} {shape:?} needs {expected}",
                end.saturating_sub(begin)
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start: data_start
                    .checked_add(begin)
                    .ok_or_else(|| bad("offset overflows"))?,
                len: expected,
            },
        );
    }
    Ok(tensors)
}

/// One tensor to be written: its name, type and shape.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Name in the header.
    pub name: String,
    /// Element type.
    pub dtype: TensorDtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn len(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size()
    }

    /// Whether the tensor holds no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes one safetensors file whose header is known up front; the tensors'
/// data is then streamed in header order, so a large model never has to be in
/// memory at once.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    pending: std::vec::IntoIter<TensorSpec>,
    current: Option<(TensorSpec, u64)>,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors` (in this order) with
    /// string `metadata`.
    pub fn create(
        path: &Path,
        tensors: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SafetensorsWriter> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).unwrap_or_default(),
            );
        }
        let mut offset = 0u64;
        for t in &tensors {
            let end = offset + t.len();
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.as_str(),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut bytes =
            serde_json::to_vec(&Value::Object(header)).map_err(|source| EngineError::Json {
                path: path.to_owned(),
                source,
            })?;
        // Pad with spaces so the data starts 8-byte aligned, as the format's
        // reference writer does.
        while !bytes.len().is_multiple_of(8) {
            bytes.push(b' ');
        }
        let file = File::create(path).map_err(EngineError::io(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&bytes))
            .map_err(EngineError::io(path))?;
        Ok(SafetensorsWriter {
            path: path.to_owned(),
            out,
            pending: tensors.into_iter(),
            current: None,
        })
    }

    /// Writes the next tensor's data whole; `name` must be the next one in
    /// the header.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.write_part(name, data)?;
        self.end_part(name)
    }

    /// Appends bytes of tensor `name`, which must be the one being written
    /// or the next one in the header.
    pub fn write_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if self.current.is_none() {
            let Some(next) = self.pending.next() else {
                return Err(self.misuse(format!("tensor `{name}` is not in the header")));
            };
            self.current = Some((next, 0));
        }
        let Some((spec, written)) = self.current.as_mut() else {
            return Err(self.misuse(format!("tensor `{name}` is not in the header")));
        };
        let (expected, len) = (spec.name.clone(), spec.len());
        if expected != name || *written + data.len() as u64 > len {
            let message = format!(
                "expected {} more bytes of tensor `{expected}`, got {} bytes of `{name}`",
                len - *written,
                data.len()
            );
            return Err(self.misuse(message));
        }
        *written += data.len() as u64;
        self.out
            .write_all(data)
            .map_err(EngineError::io(&self.path))
    }

    /// Ends tensor `name`, checking that all of its bytes were written.
    pub fn end_part(&mut self, name: &str) -> Result<()> {
        match self.current.take() {
            Some((spec, written)) if spec.name == name && written == spec.len() => Ok(()),
            Some((spec, written)) => Err(self.misuse(format!(
                "tensor `{}` ended after {written} of {} bytes",
                spec.name,
                spec.len()
            ))),
            None => Err(self.misuse(format!("tensor `{name}` was never started"))),
        }
    }

    fn misuse(&self, message: String) -> EngineError {
        EngineError::Argument(format!("{}: {message}", self.path.display()))
    }

    /// Flushes the file, checking that every tensor was written.
    pub fn finish(mut self) -> Result<()> {
        if let Some((spec, _)) = &self.current {
            return Err(self.misuse(format!("tensor `{}` was left unfinished", spec.name)));
        }
        if let Some(next) = self.pending.next() {
            return Err(EngineError::Argument(format!(
                "{}: tensor `{}` was never written",
                self.path.display(),
                next.name
            )));
        }
        self.out.flush().map_err(EngineError::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-st-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir.join("t.safetensors")
    }

    #[test]
    fn writes_and_reads_back_rows_and_columns() {
        let path = scratch("roundtrip");
        let spec = TensorSpec {
            name: "m".into(),
            dtype: TensorDtype::U16,
            shape: vec![3, 4],
        };
        let values: Vec<u16> = (0..12).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut w = SafetensorsWriter::create(&path, vec![spec], &BTreeMap::new()).expect("create");
        w.write("m", &bytes).expect("write");
        w.finish().expect("finish");

        let counter = Arc::new(AtomicU64::new(0));
        let f = SafetensorsFile::open(&path, counter.clone()).expect("open");
        let info = f.tensors()["m"].clone();
        assert_eq!(info.shape, vec![3, 4]);
        let rows = f.read_rows("m", &info, 1, 2).expect("rows");
        let rows: Vec<u16> = rows
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(rows, (4..12).collect::<Vec<u16>>());
        let before = counter.load(Ordering::Relaxed);
        let cols = f.read_columns("m", &info, 1, 2).expect("cols");
        let cols: Vec<u16> = cols
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(cols, vec![1, 2, 5, 6, 9, 10]);
        assert_eq!(counter.load(Ordering::Relaxed) - before, 12);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn offsets_near_the_end_of_u64_are_a_corrupt_header_not_an_overflow() {
        let path = scratch("overflow");
        // Offsets of 20 digits either way, so the header's length (and the
        // data's start) is known before they are: the tensor starts 4 bytes
        // short of u64::MAX and ends past it.
        let header_for = |begin: u64, end: u64| {
            format!(
                r#"{{"a": {{"dtype": "F32", "shape": [1], "data_offsets": [{begin}, {end}]}}}}"#
            )
        };
        let data_start = 8 + header_for(u64::MAX, u64::MAX).len() as u64;
        let begin = u64::MAX - 3 - data_start;
        let header = header_for(begin, begin + 4);
        assert_eq!(8 + header.len() as u64, data_start);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 4]);
        std::fs::write(&path, &bytes).expect("write");
        let Err(err) = SafetensorsFile::open(&path, Arc::new(AtomicU64::new(0))) else {
            panic!("a header whose offsets overflow was accepted");
        };
        assert!(
            matches!(
                err,
                EngineError::CorruptHeader { .. } | EngineError::Truncated { .. }
            ),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn header_errors_are_named() {
        let bad = |text: &str| parse_header(text.as_bytes(), 0).expect_err(text);
        assert!(bad("[]").contains("not a JSON object"));
        assert!(
            bad(r#"{"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}"#).contains("Q7")
        );
        assert!(
            bad(r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#).contains("`a`")
        );
        assert!(bad("{not json").contains("not JSON"));
        // Found by the fuzzer: no bytes at all, but rows of 2^66 bytes.
        assert!(
            bad(r#"{"a": {"dtype": "F32", "shape": [0, 4294967296, 4294967296], "data_offsets": [0, 0]}}"#)
                .contains("overflows")
        );
    }
}
