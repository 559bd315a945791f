//! CIFAR-10, python version (torchvision's `cifar-10-batches-py`): each batch file is a pickled
//! dict whose `data` is a numpy `uint8` array of `N x 3072` (1024 R, 1024 G, 1024 B bytes per
//! image) and whose `labels` is a list of `N` ints.
//!
//! The batches are converted to the records of the binary version (1 label byte, then the
//! 3072 pixel bytes), so the two versions load through the same code and give the same
//! samples. The original files were written by Python 2's cPickle at protocol 2; files that
//! Python 3 re-pickled (protocols 2 to 5, numpy 1 or 2) are read as well.

use std::borrow::Cow;
use std::path::Path;

use crate::DataError;
use crate::read::Source;
use pyformats::pickle::{self, Limits, Value};

const PIXELS: usize = 3 * 32 * 32;
const CLASSES: i64 = 10;

/// Whether the first bytes of a (decompressed) file are a binary pickle: PROTO 2-5. A binary
/// CIFAR record starts with a label byte 0-9, so the two versions cannot be confused.
pub(crate) fn looks_like_pickle(head: &[u8]) -> bool {
    matches!(head, [0x80, 2..=5, ..])
}

/// A numpy array as pickled: shape, dtype code (`"u1"` for uint8), memory order and raw data.
struct Array<'a> {
    shape: Vec<usize>,
    dtype: String,
    fortran: bool,
    data: Cow<'a, [u8]>,
}

/// Reads a pickled batch and returns up to `max_records` (default: all) of its records in the
/// binary version's layout.
pub(crate) fn read_batch(path: &Path, max_records: Option<usize>) -> Result<Vec<u8>, DataError> {
    let bytes = Source::open(path)?.read_all()?;
    // A batch's strings are its own bytes, each used once; the default output bound (8 GiB) would
    // let a small file that shares one string a million times allocate gigabytes first.
    let max_output_bytes = (bytes.len() as u64).saturating_mul(2).saturating_add(1 << 20);
    let limits = Limits { max_output_bytes, ..Limits::default() };
    let (root, _) = pickle::parse(&bytes, &limits).map_err(|e| DataError::from_pickle(e, path))?;
    drop(bytes);
    let bad = |msg: String| DataError::BadContent { path: path.to_path_buf(), msg };
    if !matches!(root, Value::Dict(_)) {
        return Err(bad(format!("the pickle holds a {}, not the dict of a CIFAR-10 batch", root.kind())));
    }
    if root.get("labels").is_none() && root.get("fine_labels").is_some() {
        return Err(bad("the dict has 'fine_labels' but no 'labels': this is CIFAR-100, not CIFAR-10".into()));
    }
    let keys = || root.text_keys().join(", ");
    let data = root.get("data").ok_or_else(|| bad(format!("the dict has no 'data' key (its keys: {})", keys())))?;
    let labels =
        root.get("labels").ok_or_else(|| bad(format!("the dict has no 'labels' key (its keys: {})", keys())))?;
    let array = numpy_array(data).map_err(|e| bad(format!("'data': {e}")))?;
    if array.dtype != "u1" {
        return Err(bad(format!("'data' has dtype '{}', expected uint8 ('u1')", array.dtype)));
    }
    let shape = || array.shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let rows = array.shape.first().copied().unwrap_or(1);
    let row_len = array.shape.iter().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d));
    if array.shape.len() < 2 || row_len != Some(PIXELS) {
        return Err(bad(format!(
            "'data' has shape ({}): expected N rows of {PIXELS} bytes (32x32 RGB), i.e. shape (N, {PIXELS})",
            shape()
        )));
    }
    if array.fortran && rows > 1 {
        return Err(bad(format!("'data' of shape ({}) is in Fortran (column-major) order, not supported", shape())));
    }
    if rows.checked_mul(PIXELS) != Some(array.data.len()) {
        return Err(bad(format!(
            "'data' has shape ({}) but holds {} bytes instead of {}",
            shape(),
            array.data.len(),
            rows.saturating_mul(PIXELS)
        )));
    }
    let labels = labels.items().ok_or_else(|| bad(format!("'labels' is a {}, expected a list", labels.kind())))?;
    if labels.len() != rows {
        return Err(bad(format!("'labels' has {} entries but 'data' has {rows} rows", labels.len())));
    }
    let take = max_records.map_or(rows, |m| m.min(rows));
    let mut out = Vec::with_capacity(take * (1 + PIXELS));
    for (k, (label, row)) in labels.iter().zip(array.data.chunks_exact(PIXELS)).take(take).enumerate() {
        match label.as_int() {
            Some(l @ 0..CLASSES) => out.push(l as u8),
            Some(l) => return Err(bad(format!("label {l} of record {k} is not a CIFAR-10 class 0-9"))),
            None => return Err(bad(format!("label of record {k} is a {}, not an int", label.kind()))),
        }
        out.extend_from_slice(row);
    }
    Ok(out)
}

/// Recognises the two ways numpy pickles an array:
/// `_reconstruct(ndarray, (0,), b'b')` then BUILD with `(version, shape, dtype, is_fortran,
/// rawdata)` (protocols 0-4), or `_frombuffer(buffer, dtype, shape, order)` (protocol 5).
/// numpy 2 renamed the module `numpy.core` to `numpy._core`; both are accepted.
fn numpy_array(v: &Value) -> Result<Array<'_>, String> {
    let in_core = |callable: &Value, name: &str| {
        ["numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"]
            .iter()
            .any(|m| callable.is_global(m, name))
    };
    match v {
        Value::Build { obj, state } => {
            let Value::Reduce { callable, .. } = &**obj else {
                return Err(format!("expected a numpy array, found a {} with state", obj.kind()));
            };
            if !in_core(callable, "_reconstruct") {
                return Err(format!("expected a numpy array, found an object made by {}", describe_callable(callable)));
            }
            let state = state.items().ok_or("the numpy array's state is not a tuple")?;
            // Version 1 states start with the version; the older form has none.
            let fields = match state {
                [Value::Int(_), rest @ ..] if rest.len() == 4 => rest,
                _ if state.len() == 4 => state,
                _ => return Err(format!("the numpy array's state has {} fields, expected 4 or 5", state.len())),
            };
            let [shape, dtype, fortran, raw] = fields else { return Err("unreachable state length".into()) };
            let fortran = match fortran {
                Value::Bool(b) => *b,
                Value::Int(i) => *i != 0,
                other => return Err(format!("the numpy array's order flag is a {}", other.kind())),
            };
            let data = raw.bytes_like().ok_or_else(|| {
                format!("the numpy array's data is a {}, not raw bytes (an object array?)", raw.kind())
            })?;
            Ok(Array { shape: shape_of(shape)?, dtype: dtype_code(dtype)?, fortran, data })
        }
        Value::Reduce { callable, args } if in_core(callable, "_frombuffer") => {
            let [buf, dtype, shape, order] = args.items().unwrap_or_default() else {
                return Err("numpy _frombuffer call without its 4 arguments".into());
            };
            let data = buf.bytes_like().ok_or_else(|| format!("the numpy array's buffer is a {}", buf.kind()))?;
            let fortran = order.text() == Some(b"F");
            Ok(Array { shape: shape_of(shape)?, dtype: dtype_code(dtype)?, fortran, data })
        }
        Value::Reduce { callable, .. } => {
            Err(format!("expected a numpy array, found the result of {}", describe_callable(callable)))
        }
        other => Err(format!("expected a numpy array, found a {}", other.kind())),
    }
}

fn describe_callable(callable: &Value) -> String {
    match callable {
        Value::Global { module, name } => format!("{module}.{name}"),
        other => format!("a {}", other.kind()),
    }
}

fn shape_of(v: &Value) -> Result<Vec<usize>, String> {
    let dims = v.items().ok_or_else(|| format!("the numpy array's shape is a {}, not a tuple", v.kind()))?;
    dims.iter()
        .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "the numpy array's shape holds something other than sizes".into())
}

/// The type code of a pickled `numpy.dtype` (`dtype('u1', False, True)`, with or without its
/// BUILD state).
fn dtype_code(v: &Value) -> Result<String, String> {
    let call = match v {
        Value::Build { obj, .. } => obj,
        other => other,
    };
    match call {
        Value::Reduce { callable, args } if callable.is_global("numpy", "dtype") => {
            let code = args.items().and_then(|a| a.first()).and_then(Value::text);
            code.map(|c| String::from_utf8_lossy(c).into_owned())
                .ok_or_else(|| "numpy dtype without a type code".into())
        }
        other => Err(format!("the numpy array's dtype is a {}, not a numpy.dtype", other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DatasetSpec;
    use pyformats::pickle_writer::Writer;

    fn pixel(k: usize, p: usize) -> u8 {
        ((k * 13 + p * 7 / 3) % 256) as u8
    }

    /// `n` records in the binary layout, label `(3 * k + 1) % 10`.
    fn records(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for k in 0..n {
            v.push(((3 * k + 1) % 10) as u8);
            v.extend((0..PIXELS).map(|p| pixel(k, p)));
        }
        v
    }

    /// How the numpy dtype `code` is pickled by Python 2's cPickle.
    fn py2_dtype(w: &mut Writer, code: &str) {
        w.global("numpy", "dtype").py2_str(code.as_bytes()).int(0).int(1).op(0x87).op(b'R');
        w.op(b'(').int(3).py2_str(b"|").op(b'N').op(b'N').op(b'N').int(-1).int(-1).int(0).op(b't').op(b'b');
    }

    /// A batch as Python 2's cPickle writes it (protocol 2, `str` keys and data), with `labels`
    /// and a `data` array of `shape` and dtype `code` holding `raw`.
    fn py2_batch(labels: &[i32], shape: &[i32], code: &str, raw: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.proto(2).op(b'}').binput(1).op(b'(');
        w.py2_str(b"data").global("numpy.core.multiarray", "_reconstruct").binput(2);
        w.global("numpy", "ndarray").binput(3).int(0).op(0x85).py2_str(b"b").op(0x87).op(b'R').binput(4);
        w.op(b'(').int(1).op(b'(');
        for &d in shape {
            w.int(d);
        }
        w.op(b't');
        py2_dtype(&mut w, code);
        w.op(0x89).py2_str(raw).op(b't').op(b'b');
        w.py2_str(b"labels").op(b']').binput(5).op(b'(');
        for &l in labels {
            w.int(l);
        }
        w.op(b'e');
        w.py2_str(b"batch_label").py2_str(b"training batch 1 of 5");
        w.py2_str(b"filenames").op(b']').op(b'(');
        for k in 0..labels.len() {
            w.py2_str(format!("img_{k}.png").as_bytes());
        }
        w.op(b'e').op(b'u');
        w.stop()
    }

    /// `py2_batch` for the records of [`records`].
    fn py2_batch_of(binary: &[u8]) -> Vec<u8> {
        let labels: Vec<i32> = binary.chunks_exact(1 + PIXELS).map(|r| r[0].into()).collect();
        let raw: Vec<u8> = binary.chunks_exact(1 + PIXELS).flat_map(|r| r[1..].to_vec()).collect();
        py2_batch(&labels, &[labels.len() as i32, PIXELS as i32], "u1", &raw)
    }

    #[test]
    fn sniffs_pickles() {
        assert!(looks_like_pickle(&[0x80, 2, b'}']) && looks_like_pickle(&[0x80, 5]));
        assert!(!looks_like_pickle(&[0x80]) && !looks_like_pickle(&[6, 0x80]) && !looks_like_pickle(&[]));
    }

    #[test]
    fn py2_batch_loads_like_the_binary_version() {
        let binary = records(3);
        let root = tempfile::tempdir().unwrap();
        let py = root.path().join("cifar-10-batches-py");
        std::fs::create_dir(&py).unwrap();
        std::fs::write(py.join("data_batch_1"), py2_batch_of(&binary)).unwrap();
        std::fs::write(py.join("batches.meta"), b"not read").unwrap();
        assert_eq!(read_batch(&py.join("data_batch_1"), None).unwrap(), binary);
        assert_eq!(read_batch(&py.join("data_batch_1"), Some(2)).unwrap(), &binary[..2 * (1 + PIXELS)]);

        let bin_dir = tempfile::tempdir().unwrap();
        std::fs::write(bin_dir.path().join("data_batch_1.bin"), &binary).unwrap();
        let expected = DatasetSpec::Cifar10(bin_dir.path().into()).load(32, None).unwrap();
        // The directory holding cifar-10-batches-py, the directory itself, and one batch file.
        for spec in [root.path().to_path_buf(), py.clone(), py.join("data_batch_1")] {
            let d = DatasetSpec::Cifar10(spec.clone()).load(32, None).unwrap();
            assert_eq!(d, expected, "{}", spec.display());
        }
        assert_eq!(expected.labels, Some(vec![1, 4, 7]));
    }

    #[test]
    fn bad_batches_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data_batch_1");
        let check = |bytes: &[u8], wanted: &[&str]| {
            std::fs::write(&path, bytes).unwrap();
            let msg = read_batch(&path, None).unwrap_err().to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            for w in wanted {
                assert!(msg.contains(w), "{msg} lacks {w}");
            }
        };
        let good = py2_batch_of(&records(2));
        check(&good[..good.len() / 2], &["truncated", "BINSTRING", "byte offset"]);
        check(&good[..good.len() - 1], &["truncated", "STOP"]);
        let raw = vec![0u8; 2 * PIXELS];
        check(&py2_batch(&[1, 2], &[2, 3072], "f4", &raw), &["dtype 'f4'", "uint8"]);
        check(&py2_batch(&[1, 2], &[2, 3000], "u1", &raw[..6000]), &["shape (2, 3000)", "3072"]);
        check(&py2_batch(&[1, 10], &[2, 3072], "u1", &raw), &["label 10 of record 1", "0-9"]);
        check(&py2_batch(&[1], &[2, 3072], "u1", &raw), &["'labels' has 1 entries", "2 rows"]);
        check(&py2_batch(&[1, 2], &[2, 3072], "u1", &raw[..100]), &["holds 100 bytes instead of 6144"]);
        let mut w = Writer::default();
        w.proto(2).op(b'}').py2_str(b"fine_labels").op(b']').op(b's');
        check(&w.stop(), &["CIFAR-100"]);
        let mut w = Writer::default();
        w.proto(2).op(b']');
        check(&w.stop(), &["holds a list"]);
    }
}
