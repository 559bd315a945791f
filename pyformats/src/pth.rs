//! PyTorch `.pth` state dicts (`torch.save(net.state_dict(), path)`), read without Python.
//!
//! Since torch 1.6 a `.pth` file is a zip archive: `<prefix>/data.pkl` is a pickle (protocol 2)
//! whose tensors refer, through persistent ids, to raw little-endian storages kept beside it as
//! `<prefix>/data/<key>`. Only the subset a state dict needs is understood: an `OrderedDict` (or
//! plain dict) of tensors built by `torch._utils._rebuild_tensor_v2` on float32, float64,
//! float16, bfloat16 or int64 storages, possibly wrapped as `{"state_dict": {...}}` and possibly
//! with DataParallel's `module.` prefix. Anything else (a pickled module, optimizer state, an
//! object of another class) is refused with an error naming the file and what was found,
//! because evaluating arbitrary pickles is exactly what `torch.load(weights_only=True)` refuses
//! too.
//!
//! The tensors come out contiguous and row-major whatever their strides and offsets in the
//! storage, so a transposed view saved as such reads as the values PyTorch shows.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::pickle::{self, Limits, Value};

/// A `.pth` file could not be read as a state dict. The message names the file and what was
/// found instead of what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct PthError {
    pub file: String,
    pub reason: String,
}

/// Element types of the storages this reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The dtype of a `torch.<Name>Storage` class, as torch's persistent ids name it.
    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            _ => return None,
        })
    }

    fn safetensors(self) -> Dtype {
        match self {
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
        }
    }

    fn is_float(self) -> bool {
        self != DType::I64
    }
}

/// One tensor of a state dict: contiguous, row-major, little-endian.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// The values as f32 (rounded from float64; exact from the 16-bit types); `None` for an
    /// integer tensor.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            DType::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            DType::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::I64 => return None,
        })
    }
}

/// The tensors of a state dict in the file's order, names without a `module.` prefix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    pub tensors: Vec<Tensor>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Every floating-point tensor converted to float32, integer ones kept: this project's
    /// networks hold f32 parameters and an i64 `num_batches_tracked`, so a state dict saved
    /// after `net.double()` or `net.half()` still loads.
    pub fn with_floats_as_f32(mut self) -> Self {
        for t in &mut self.tensors {
            if t.dtype.is_float()
                && let Some(values) = t.to_f32()
            {
                t.data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                t.dtype = DType::F32;
            }
        }
        self
    }

    /// The tensors as a safetensors file, dtypes kept.
    pub fn to_safetensors(&self, file: &str) -> Result<Vec<u8>, PthError> {
        let views = self
            .tensors
            .iter()
            .map(|t| {
                TensorView::new(t.dtype.safetensors(), t.shape.clone(), &t.data)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| fail(file, format!("tensor {}: {e}", t.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, None).map_err(|e| fail(file, format!("writing safetensors: {e}")))
    }
}

fn fail(file: &str, reason: impl Into<String>) -> PthError {
    PthError { file: file.to_string(), reason: reason.into() }
}

/// What the first bytes of a weights file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A zip archive: torch >= 1.6's `.pth`.
    PthZip,
    /// A bare pickle: torch < 1.6's legacy `.pth` (its magic number pickled first).
    PthLegacy,
    /// Anything else; safetensors is the only other format weights come in here.
    Other,
}

/// Sniffs the format from the first bytes.
pub fn sniff(head: &[u8]) -> Format {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Format::PthZip
    } else if matches!(head, [0x80, 2..=5, ..]) {
        Format::PthLegacy
    } else {
        Format::Other
    }
}

const LEGACY: &str = "saved with torch < 1.6's legacy format, which is not read here; re-save it with \
                      torch.save(torch.load(path), path, _use_new_zipfile_serialization=True)";

/// Reads the state dict in a `.pth` file's bytes; `file` names it in errors.
pub fn read(bytes: &[u8], file: &str) -> Result<StateDict, PthError> {
    match sniff(bytes) {
        Format::PthZip => {}
        Format::PthLegacy => return Err(fail(file, LEGACY)),
        Format::Other => {
            return Err(fail(file, "not a PyTorch .pth file (torch >= 1.6 writes zip archives; this is not one)"));
        }
    }
    let zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| fail(file, format!("not a readable zip: {e}")))?;
    let pickles: Vec<String> = zip.file_names().filter(|n| is_data_pkl(n)).map(str::to_string).collect();
    let pkl_name = match pickles.as_slice() {
        [one] => one.clone(),
        [] => return Err(fail(file, "a zip archive without <name>/data.pkl: not written by torch.save")),
        many => {
            return Err(fail(file, format!("a zip archive with {} data.pkl files: {}", many.len(), many.join(", "))));
        }
    };
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let mut archive = Archive { zip, prefix, file, storages: HashMap::new() };
    if let Some(order) = archive.small_entry("byteorder")?
        && order.trim_ascii() != b"little"
    {
        return Err(fail(
            file,
            format!("storages are {}-endian; only little-endian files are read", String::from_utf8_lossy(&order)),
        ));
    }
    let pkl = archive.entry(&pkl_name, None)?;
    // A state dict's pickle holds names and small tuples; its strings are its own bytes.
    let max_output_bytes = (pkl.len() as u64).saturating_mul(2).saturating_add(1 << 20);
    let limits = Limits { max_output_bytes, ..Limits::default() };
    let (root, _) = pickle::parse(&pkl, &limits).map_err(|e| fail(file, format!("{pkl_name}: pickle {e}")))?;
    let root = unwrap_state_dict(&root).map_err(|e| fail(file, e))?;
    let mut tensors: Vec<Tensor> = Vec::new();
    for (key, value) in root {
        let name = key.text().ok_or_else(|| fail(file, format!("a state dict key is a {}, not a name", key.kind())))?;
        let name = String::from_utf8_lossy(name);
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        let tensor = archive.tensor(value).map_err(|e| fail(file, format!("{name}: {e}")))?;
        if tensors.iter().any(|t| t.name == name) {
            return Err(fail(file, format!("tensor {name} appears twice (once with a module. prefix?)")));
        }
        tensors.push(Tensor { name, ..tensor });
    }
    Ok(StateDict { tensors })
}

/// Reads a weights file as safetensors bytes whatever it was saved as: a `.pth` state dict (by
/// its content, or by its `.pth`/`.pt` name, so that a damaged one is reported as such) is
/// converted (floats to f32, as this project's networks hold them); anything else is returned
/// as read, for the safetensors parser to accept or refuse. This is how every `--checkpoint`,
/// `--netG` and `--netD` path takes PyTorch files.
pub fn weights_as_safetensors(path: &Path) -> Result<Vec<u8>, PthError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| fail(&file, format!("cannot read: {e}")))?;
    let named_pth = path.extension().is_some_and(|e| e == "pth" || e == "pt");
    if sniff(&bytes) == Format::Other && !named_pth {
        return Ok(bytes);
    }
    read(&bytes, &file)?.with_floats_as_f32().to_safetensors(&file)
}

fn is_data_pkl(name: &str) -> bool {
    name.strip_suffix("data.pkl").is_some_and(|p| p.matches('/').count() == 1 && p.ends_with('/'))
}

/// The items of the state dict: the root dict itself, or its `"state_dict"` entry.
fn unwrap_state_dict(root: &Value) -> Result<Vec<(&Value, &Value)>, String> {
    let items = dict_items(root).ok_or_else(|| format!("the pickle holds {}, not a state dict", describe(root)))?;
    let wrapped = items.iter().rev().find(|(k, _)| k.text() == Some(b"state_dict")).map(|(_, v)| *v);
    if let Some(inner) = wrapped {
        return dict_items(inner).ok_or_else(|| format!("'state_dict' holds {}, not a dict", describe(inner)));
    }
    if let Some((key, value)) = items.iter().find(|(_, v)| tensor_call(v).is_none()) {
        let key = key.text().map(String::from_utf8_lossy).unwrap_or_default();
        let keys: Vec<String> = items
            .iter()
            .take(8)
            .filter_map(|(k, _)| k.text())
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect();
        return Err(format!(
            "a dict whose '{key}' is {}, not a tensor, and no 'state_dict' entry (keys: {}{}): expected \
             torch.save(net.state_dict(), path) or {{\"state_dict\": ...}}",
            describe(value),
            keys.join(", "),
            if items.len() > 8 { ", ..." } else { "" }
        ));
    }
    Ok(items)
}

/// The `(key, value)` items of a plain dict or of an `OrderedDict` as pickle builds it
/// (REDUCE of `collections.OrderedDict`, SETITEMS, and a BUILD with its `_metadata`).
fn dict_items(v: &Value) -> Option<Vec<(&Value, &Value)>> {
    match v {
        Value::Dict(items) => Some(items.iter().map(|(k, v)| (k, v)).collect()),
        Value::Build { obj, .. } => dict_items(obj),
        Value::SetItems { obj, items } => {
            let mut out = dict_items(obj)?;
            out.extend(items.iter().map(|(k, v)| (k, v)));
            Some(out)
        }
        Value::Reduce { callable, .. } if callable.is_global("collections", "OrderedDict") => Some(Vec::new()),
        _ => None,
    }
}

/// The arguments of `_rebuild_tensor_v2(...)`, also inside `_rebuild_parameter(tensor, ...)`.
fn tensor_call(v: &Value) -> Option<&[Value]> {
    let Value::Reduce { callable, args } = v else { return None };
    let args = args.items()?;
    if callable.is_global("torch._utils", "_rebuild_tensor_v2") {
        Some(args)
    } else if callable.is_global("torch._utils", "_rebuild_parameter") {
        tensor_call(args.first()?)
    } else {
        None
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Reduce { callable, .. } | Value::Build { obj: callable, .. } => match &**callable {
            Value::Global { module, name } => format!("an object made by {module}.{name}"),
            Value::Reduce { .. } => describe(callable),
            other => format!("a {}", other.kind()),
        },
        other => format!("a {}", other.kind()),
    }
}

/// The zip archive and the storages already read (views of one storage share it).
struct Archive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
    file: &'a str,
    storages: HashMap<String, Vec<u8>>,
}

impl Archive<'_> {
    /// An entry's bytes; `expected`, when given, is the size it must have.
    fn entry(&mut self, name: &str, expected: Option<u64>) -> Result<Vec<u8>, PthError> {
        let file = self.file;
        let mut entry = self.zip.by_name(name).map_err(|e| fail(file, format!("{name}: {e}")))?;
        let size = entry.size();
        if let Some(want) = expected
            && size != want
        {
            return Err(fail(file, format!("{name} holds {size} bytes, its tensor's storage needs {want}")));
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 30));
        entry.by_ref().take(size).read_to_end(&mut out).map_err(|e| fail(file, format!("{name}: {e}")))?;
        if out.len() as u64 != size {
            return Err(fail(file, format!("{name}: {} bytes read, the zip says {size}", out.len())));
        }
        Ok(out)
    }

    /// `<prefix>/<name>` when present.
    fn small_entry(&mut self, name: &str) -> Result<Option<Vec<u8>>, PthError> {
        let full = format!("{}{name}", self.prefix);
        if self.zip.index_for_name(&full).is_none() {
            return Ok(None);
        }
        self.entry(&full, None).map(Some)
    }

    /// Materialises one `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call.
    fn tensor(&mut self, v: &Value) -> Result<Tensor, String> {
        let args = tensor_call(v).ok_or_else(|| format!("{}, not a tensor", describe(v)))?;
        let [storage, offset, size, stride, ..] = args else {
            return Err(format!("_rebuild_tensor_v2 with {} arguments, expected at least 4", args.len()));
        };
        let (dtype, key, numel) = storage_id(storage)?;
        let offset = as_usize(offset).ok_or("the storage offset is not a size")?;
        let shape = as_sizes(size).ok_or("the size is not a tuple of sizes")?;
        let stride = as_sizes(stride).ok_or("the stride is not a tuple of sizes")?;
        if shape.len() != stride.len() {
            return Err(format!("size {shape:?} and stride {stride:?} have different lengths"));
        }
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("the size overflows")?;
        // A state dict's tensors never hold more elements than their storage; one that does
        // is a broadcast (stride 0) view, and materialising it could turn a small file into an
        // unbounded allocation.
        if count > numel {
            return Err(format!(
                "size {shape:?} holds {count} elements, more than its storage's {numel} (a broadcast view?): not read"
            ));
        }
        // The last element a view reaches must lie inside the storage.
        if count > 0 {
            let last = shape.iter().zip(&stride).try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
            if last.is_none_or(|l| l >= numel) {
                return Err(format!(
                    "size {shape:?}, stride {stride:?} at offset {offset} reach past its storage of {numel} elements"
                ));
            }
        }
        let el = dtype.size();
        let path = format!("{}data/{key}", self.prefix);
        if !self.storages.contains_key(&key) {
            let want = (numel as u64).checked_mul(el as u64).ok_or("the storage size overflows")?;
            let bytes = self.entry(&path, Some(want)).map_err(|e| e.reason)?;
            self.storages.insert(key.clone(), bytes);
        }
        let storage = &self.storages[&key];
        let mut data = Vec::with_capacity(count * el);
        if count > 0 {
            let mut index = vec![0usize; shape.len()];
            for _ in 0..count {
                let at = offset + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
                data.extend_from_slice(&storage[at * el..(at + 1) * el]);
                // Row-major odometer: the last dimension moves fastest.
                for d in (0..shape.len()).rev() {
                    index[d] += 1;
                    if index[d] < shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        Ok(Tensor { name: String::new(), dtype, shape, data })
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)`, the persistent id torch writes.
fn storage_id(v: &Value) -> Result<(DType, String, usize), String> {
    let Value::PersistentId(id) = v else {
        return Err(format!("the tensor's storage is {}, not a persistent id", describe(v)));
    };
    let [tag, class, key, _location, numel] = id.items().unwrap_or_default() else {
        return Err(format!("the storage id is {}, not ('storage', type, key, location, numel)", describe(id)));
    };
    if tag.text() != Some(b"storage") {
        return Err("the storage id does not start with 'storage'".into());
    }
    let dtype = match class {
        Value::Global { module, name } if module == "torch" => DType::from_storage_class(name).ok_or_else(|| {
            format!("storage type torch.{name} is not read here (float32, float64, float16, bfloat16 and int64 are)")
        })?,
        other => return Err(format!("the storage type is {}, not a torch storage class", describe(other))),
    };
    let key = key.text().map(|k| String::from_utf8_lossy(k).into_owned()).ok_or("the storage key is not text")?;
    if key.is_empty() || key.contains('/') || key.contains("..") {
        return Err(format!("the storage key '{key}' is not a file name"));
    }
    let numel = as_usize(numel).ok_or("the storage size is not a size")?;
    Ok((dtype, key, numel))
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_int().and_then(|i| usize::try_from(i).ok())
}

fn as_sizes(v: &Value) -> Option<Vec<usize>> {
    v.items()?.iter().map(as_usize).collect()
}
