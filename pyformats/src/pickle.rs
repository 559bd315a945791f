//! A small virtual machine for the *data* subset of Python's pickle format, protocols 0 to 5.
//!
//! Datasets and checkpoints from the Python world are pickles: torchvision's
//! `cifar-10-batches-py` (a dict holding a numpy array), PyTorch `.pth` state dicts. Their
//! objects are built by calls to named Python functions (`numpy.core.multiarray._reconstruct`,
//! `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict`). This reader is hand-written
//! because no maintained crate evaluates those numpy/torch reconstruct calls in a safe subset:
//! the existing ones either refuse such calls or replace them, losing the array. Here nothing
//! is ever executed. Plain data becomes [`Value`]s; each call is kept, unevaluated, as a
//! [`Value::Global`] / [`Value::Reduce`] / [`Value::Build`] tree for the caller to recognise
//! the few shapes it expects and reject everything else.
//!
//! A hostile file can at worst make [`parse`] fail: every length is checked against the data
//! before it is used, and [`Limits`] bounds the objects, the memo and the output (shared
//! references are copied into the output tree, so without a bound a small file could expand
//! exponentially). Every error names the opcode and its byte offset.

use std::borrow::Cow;
use std::collections::HashMap;

/// A value read from a pickle. Containers own their items; a value the pickle shares between
/// two places appears as two copies.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Python `int`; integers that do not fit in 64 bits are an error.
    Int(i64),
    Float(f64),
    /// Python 3 `bytes` and `bytearray`, and Python 2 `str` (which was bytes).
    Bytes(Vec<u8>),
    /// Python 3 `str`, Python 2 `unicode`.
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// `(key, value)` pairs in insertion order. A key set twice appears twice; [`Value::get`]
    /// returns the later value, as Python's dict would hold.
    Dict(Vec<(Value, Value)>),
    /// A reference to a module attribute (a class or function), never imported or called.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`: REDUCE, and NEWOBJ/OBJ/INST (`cls.__new__(cls, *args)`).
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)` (BUILD).
    Build {
        obj: Box<Value>,
        state: Box<Value>,
    },
    /// `obj[key] = value` for each item, on an object that is not a plain dict (an
    /// `OrderedDict` built by REDUCE, as in PyTorch state dicts).
    SetItems {
        obj: Box<Value>,
        items: Vec<(Value, Value)>,
    },
    /// `obj.append(item)` for each item, on an object that is not a plain list.
    Appends {
        obj: Box<Value>,
        items: Vec<Value>,
    },
    /// A persistent id (PERSID/BINPERSID): how PyTorch refers to tensor storages kept outside
    /// the pickle.
    PersistentId(Box<Value>),
}

impl Value {
    /// A short name of the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global { .. } => "global",
            Value::Reduce { .. } => "call (REDUCE)",
            Value::Build { .. } => "object (BUILD)",
            Value::SetItems { .. } => "object with items (SETITEMS)",
            Value::Appends { .. } => "object with items (APPENDS)",
            Value::PersistentId(_) => "persistent id",
        }
    }

    /// For a dict: the value of the last entry whose key is the text `key`, as `str` (Python 3)
    /// or as bytes (a Python 2 `str`).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().rev().find(|(k, _)| k.text() == Some(key.as_bytes())).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The keys of a dict that are text, for error messages that list what is there.
    pub fn text_keys(&self) -> Vec<String> {
        match self {
            Value::Dict(items) => {
                items.iter().filter_map(|(k, _)| k.text()).map(|t| String::from_utf8_lossy(t).into_owned()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The bytes of a `str` (UTF-8) or of a `bytes` (Python 2's `str`): text that Python 2 and
    /// 3 pickle differently.
    pub fn text(&self) -> Option<&[u8]> {
        match self {
            Value::Str(s) => Some(s.as_bytes()),
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// Whether this is the global `module.name`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }

    /// Raw bytes however the pickler wrote them: `bytes` (and Python 2 `str`), or what Python 3
    /// writes for bytes at protocols 0-2, which have no bytes opcode: `_codecs.encode(text,
    /// 'latin1')`, or `bytes()` / `bytearray()` for empty ones and `bytearray(bytes)`.
    pub fn bytes_like(&self) -> Option<Cow<'_, [u8]>> {
        match self {
            Value::Bytes(b) => Some(Cow::Borrowed(b)),
            Value::Reduce { callable, args } => {
                let args = args.items()?;
                let builtin = |name| callable.is_global("builtins", name) || callable.is_global("__builtin__", name);
                if callable.is_global("_codecs", "encode") {
                    let [Value::Str(text), Value::Str(encoding)] = args else { return None };
                    if !matches!(encoding.to_ascii_lowercase().as_str(), "latin1" | "latin-1" | "iso-8859-1") {
                        return None;
                    }
                    let latin1: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                    latin1.map(Cow::Owned)
                } else if builtin("bytes") || builtin("bytearray") {
                    match args {
                        [] => Some(Cow::Borrowed(&[])),
                        [inner] => inner.bytes_like(),
                        _ => None,
                    }
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// Bounds on what one [`parse`] may build, so that a hostile file fails instead of exhausting
/// memory or the stack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Objects created while running the pickle, and values in the output tree.
    pub max_objects: usize,
    /// Memo entries.
    pub max_memo: usize,
    /// Nesting depth of the output tree.
    pub max_depth: usize,
    /// Bytes of `bytes`/`str` payloads in the output tree (shared payloads count each time).
    pub max_output_bytes: u64,
}

impl Default for Limits {
    /// Generous for datasets and checkpoints (a CIFAR batch is about 20,000 objects and 30 MB).
    fn default() -> Self {
        Limits { max_objects: 4 << 20, max_memo: 1 << 20, max_depth: 256, max_output_bytes: 8 << 30 }
    }
}

/// Why a pickle could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorKind {
    /// The data ends inside an opcode's argument, or before STOP.
    Truncated { needed: u64, available: u64 },
    /// An impossible or unsupported opcode or argument, or a [`Limits`] bound exceeded.
    Malformed(String),
}

/// An error with the byte offset and opcode where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    /// Byte offset of the opcode.
    pub offset: u64,
    /// The opcode (`None` when the data ends where an opcode should be).
    pub opcode: Option<u8>,
    pub kind: ErrorKind,
}

impl std::error::Error for PickleError {}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte offset {}: {}: ", self.offset, describe_opcode(self.opcode))?;
        match &self.kind {
            ErrorKind::Truncated { needed, available } => {
                write!(f, "truncated: needs {needed} bytes but only {available} are present")
            }
            ErrorKind::Malformed(msg) => f.write_str(msg),
        }
    }
}

/// `opcode NAME (0xNN)`, or the end of the data when there was no opcode left to read.
pub fn describe_opcode(op: Option<u8>) -> String {
    match op {
        Some(op) => format!("opcode {} ({op:#04x})", opcode_name(op)),
        None => "end of data (no STOP opcode)".into(),
    }
}

/// The name Python's `pickletools` gives the opcode byte `op`.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Runs the pickle at the start of `data` and returns its value and the number of bytes read
/// through its STOP opcode (anything after it is left to the caller: PyTorch's legacy format
/// writes several pickles back to back).
pub fn parse(data: &[u8], limits: &Limits) -> Result<(Value, usize), PickleError> {
    let mut vm = Machine::new(data, limits);
    let root = vm.run()?;
    let end = vm.pos;
    let value = vm.into_value(root)?;
    Ok((value, end))
}

/// Index of an object in [`Machine::objects`].
type Id = usize;

/// An object while the pickle runs. Containers refer to objects by id so that mutations after a
/// memo PUT (the usual EMPTY_DICT, BINPUT, ..., SETITEMS) are seen through later GETs, as in
/// Python.
#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global {
        module: String,
        name: String,
    },
    Reduce {
        callable: Id,
        args: Id,
    },
    Build {
        obj: Id,
        state: Id,
    },
    SetItems {
        obj: Id,
        items: Vec<(Id, Id)>,
    },
    Appends {
        obj: Id,
        items: Vec<Id>,
    },
    PersistentId(Id),
    /// A payload already moved into the output tree.
    Moved,
}

struct Machine<'a> {
    data: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// Offset and byte of the opcode being run, for errors.
    op_pos: usize,
    op: Option<u8>,
    limits: &'a Limits,
    objects: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Output tree size so far, against the limits.
    out_values: usize,
    out_bytes: u64,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: &'a Limits) -> Self {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            op: None,
            limits,
            objects: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            out_values: 0,
            out_bytes: 0,
        }
    }

    fn err(&self, msg: impl Into<String>) -> PickleError {
        PickleError { offset: self.op_pos as u64, opcode: self.op, kind: ErrorKind::Malformed(msg.into()) }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let available = (data.len() - self.pos) as u64;
        if n > available {
            return Err(PickleError {
                offset: self.op_pos as u64,
                opcode: self.op,
                kind: ErrorKind::Truncated {
                    needed: ((self.pos - self.op_pos) as u64).saturating_add(n),
                    available: (data.len() - self.op_pos) as u64,
                },
            });
        }
        let out = &data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A text argument: the bytes up to (not including) the next newline.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => Err(PickleError {
                offset: self.op_pos as u64,
                opcode: self.op,
                kind: ErrorKind::Truncated {
                    needed: (self.pos - self.op_pos + rest.len() + 1) as u64,
                    available: (self.pos - self.op_pos + rest.len()) as u64,
                },
            }),
        }
    }

    fn text_line(&mut self, what: &str) -> Result<&'a str, PickleError> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.err(format!("{what} is not UTF-8 text")))
    }

    fn new_obj(&mut self, obj: Obj) -> Result<Id, PickleError> {
        if self.objects.len() >= self.limits.max_objects {
            return Err(self.err(format!("more than {} objects (limit)", self.limits.max_objects)));
        }
        self.objects.push(obj);
        Ok(self.objects.len() - 1)
    }

    fn push(&mut self, obj: Obj) -> Result<(), PickleError> {
        let id = self.new_obj(obj)?;
        self.stack.push(id);
        Ok(())
    }

    /// The bottom of the items above the innermost MARK.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow (the stack is empty above the last MARK)"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow (the stack is empty above the last MARK)"));
        }
        self.stack.last().copied().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(mark) = self.marks.pop() else { return Err(self.err("no MARK to pop to")) };
        Ok(self.stack.split_off(mark))
    }

    fn put(&mut self, key: u64) -> Result<(), PickleError> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return Err(self.err(format!("more than {} memo entries (limit)", self.limits.max_memo)));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn get(&mut self, key: u64) -> Result<(), PickleError> {
        let id = *self.memo.get(&key).ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    fn str_obj(&self, id: Id, what: &str) -> Result<String, PickleError> {
        match &self.objects[id] {
            Obj::Str(s) => Ok(s.clone()),
            Obj::Bytes(_) => Err(self.err(format!("{what} must be a str, found bytes"))),
            _ => Err(self.err(format!("{what} must be a str"))),
        }
    }

    /// Replaces the object `id` by `wrap(id of a copy of the old object)`, so that every
    /// reference to `id` (memo, containers) sees the wrapped object, as a mutation in Python.
    fn wrap(&mut self, id: Id, wrap: impl FnOnce(Id) -> Obj) -> Result<(), PickleError> {
        let old = std::mem::replace(&mut self.objects[id], Obj::None);
        let inner = self.new_obj(old)?;
        self.objects[id] = wrap(inner);
        Ok(())
    }

    fn append(&mut self, target: Id, items: Vec<Id>) -> Result<(), PickleError> {
        match &mut self.objects[target] {
            Obj::List(v) | Obj::Appends { items: v, .. } => v.extend(items),
            _ => self.wrap(target, |obj| Obj::Appends { obj, items })?,
        }
        Ok(())
    }

    fn set_items(&mut self, target: Id, items: Vec<(Id, Id)>) -> Result<(), PickleError> {
        match &mut self.objects[target] {
            Obj::Dict(v) | Obj::SetItems { items: v, .. } => v.extend(items),
            _ => self.wrap(target, |obj| Obj::SetItems { obj, items })?,
        }
        Ok(())
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>, PickleError> {
        let pairs = items.chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return Err(self.err(format!("odd number of items ({}) for key/value pairs", items.len())));
        }
        Ok(pairs.map(|p| (p[0], p[1])).collect())
    }

    fn int(&self, digits: &[u8]) -> Result<i64, PickleError> {
        std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| self.err(format!("'{}' is not an integer that fits in 64 bits", digits.escape_ascii())))
    }

    /// A little-endian two's complement integer of any length (LONG1, LONG4).
    fn long(&self, bytes: &[u8]) -> Result<i64, PickleError> {
        let Some(&last) = bytes.last() else { return Ok(0) };
        let fill = if last & 0x80 != 0 { 0xff } else { 0 };
        if bytes.len() > 8 && (bytes[8..].iter().any(|&b| b != fill) || (bytes[7] & 0x80 != 0) != (fill != 0)) {
            return Err(self.err(format!("integer of {} bytes does not fit in 64 bits", bytes.len())));
        }
        let mut le = [fill; 8];
        let n = bytes.len().min(8);
        le[..n].copy_from_slice(&bytes[..n]);
        Ok(i64::from_le_bytes(le))
    }

    fn utf8(&self, bytes: &[u8]) -> Result<String, PickleError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("string is not UTF-8: {e}")))
    }

    /// Runs opcodes up to STOP and returns the id of the result.
    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            self.op_pos = self.pos;
            self.op = None;
            let op = self.u8()?;
            self.op = Some(op);
            match op {
                b'.' => return self.pop(),
                0x80 => {
                    let version = self.u8()?;
                    if version > 5 {
                        return Err(self.err(format!("protocol {version} is newer than the supported 0-5")));
                    }
                }
                0x95 => {
                    // Framing only groups opcodes for buffered reading; the data is all here.
                    let len = self.u64()?;
                    let available = (self.data.len() - self.pos) as u64;
                    if len > available {
                        return Err(PickleError {
                            offset: self.op_pos as u64,
                            opcode: self.op,
                            kind: ErrorKind::Truncated { needed: len.saturating_add(9), available: 9 + available },
                        });
                    }
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(id);
                }
                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'I' => {
                    let line = self.line()?;
                    let obj = match line {
                        b"00" => Obj::Bool(false),
                        b"01" => Obj::Bool(true),
                        _ => Obj::Int(self.int(line)?),
                    };
                    self.push(obj)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Obj::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Obj::Int(v.into()))?;
                }
                b'L' => {
                    let line = self.line()?;
                    let v = self.int(line.strip_suffix(b"L").unwrap_or(line))?;
                    self.push(Obj::Int(v))?;
                }
                0x8a => {
                    let n = self.u8()?;
                    let bytes = self.take(n.into())?;
                    let v = self.long(bytes)?;
                    self.push(Obj::Int(v))?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = u64::try_from(n).map_err(|_| self.err(format!("negative length {n}")))?;
                    let bytes = self.take(n)?;
                    let v = self.long(bytes)?;
                    self.push(Obj::Int(v))?;
                }
                b'F' => {
                    let line = self.line()?;
                    let v = std::str::from_utf8(line)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .ok_or_else(|| self.err(format!("'{}' is not a float", line.escape_ascii())))?;
                    self.push(Obj::Float(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Obj::Float(v))?;
                }
                b'S' => {
                    let line = self.line()?;
                    let bytes = self.string_repr(line)?;
                    self.push(Obj::Bytes(bytes))?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = u64::try_from(n).map_err(|_| self.err(format!("negative length {n}")))?;
                    let bytes = self.take(n)?;
                    self.push(Obj::Bytes(bytes.to_vec()))?;
                }
                b'U' | b'C' => {
                    let n = self.u8()?;
                    let bytes = self.take(n.into())?;
                    self.push(Obj::Bytes(bytes.to_vec()))?;
                }
                b'B' => {
                    let n = self.u32()?;
                    let bytes = self.take(n.into())?;
                    self.push(Obj::Bytes(bytes.to_vec()))?;
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    let bytes = self.take(n)?;
                    self.push(Obj::Bytes(bytes.to_vec()))?;
                }
                b'V' => {
                    let line = self.line()?;
                    let s = self.raw_unicode_escape(line)?;
                    self.push(Obj::Str(s))?;
                }
                b'X' => {
                    let n = self.u32()?;
                    let bytes = self.take(n.into())?;
                    let s = self.utf8(bytes)?;
                    self.push(Obj::Str(s))?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let bytes = self.take(n.into())?;
                    let s = self.utf8(bytes)?;
                    self.push(Obj::Str(s))?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let bytes = self.take(n)?;
                    let s = self.utf8(bytes)?;
                    self.push(Obj::Str(s))?;
                }
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < self.floor() + n {
                        return Err(self.err(format!("stack underflow: needs {n} items above the last MARK")));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items))?;
                }
                b']' => self.push(Obj::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items))?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, items)?;
                }
                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Obj::Dict(pairs))?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let target = self.top()?;
                    self.set_items(target, pairs)?;
                }
                b'c' => {
                    let module = self.text_line("GLOBAL module name")?.to_owned();
                    let name = self.text_line("GLOBAL attribute name")?.to_owned();
                    self.push(Obj::Global { module, name })?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let name = self.str_obj(name, "STACK_GLOBAL name")?;
                    let module = self.str_obj(module, "STACK_GLOBAL module")?;
                    self.push(Obj::Global { module, name })?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Obj::Reduce { callable, args })?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Obj::Reduce { callable, args })?;
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if !matches!(&self.objects[kwargs], Obj::Dict(d) if d.is_empty()) {
                        return Err(self.err("keyword arguments to a constructor are not supported"));
                    }
                    self.push(Obj::Reduce { callable, args })?;
                }
                b'o' => {
                    let mut items = self.pop_mark()?.into_iter();
                    let callable = items.next().ok_or_else(|| self.err("OBJ needs a class after the MARK"))?;
                    let args = self.new_obj(Obj::Tuple(items.collect()))?;
                    self.push(Obj::Reduce { callable, args })?;
                }
                b'i' => {
                    let module = self.text_line("INST module name")?.to_owned();
                    let name = self.text_line("INST class name")?.to_owned();
                    let items = self.pop_mark()?;
                    let callable = self.new_obj(Obj::Global { module, name })?;
                    let args = self.new_obj(Obj::Tuple(items))?;
                    self.push(Obj::Reduce { callable, args })?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.wrap(target, |obj| Obj::Build { obj, state })?;
                }
                b'P' => {
                    let id = self.text_line("PERSID id")?.to_owned();
                    let id = self.new_obj(Obj::Str(id))?;
                    self.push(Obj::PersistentId(id))?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Obj::PersistentId(id))?;
                }
                b'p' => {
                    let key = self.line()?;
                    let key = self.int(key)?;
                    self.put(key as u64)?;
                }
                b'q' => {
                    let key = self.u8()?;
                    self.put(key.into())?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.put(key.into())?;
                }
                0x94 => self.put(self.memo.len() as u64)?,
                b'g' => {
                    let key = self.line()?;
                    let key = self.int(key)?;
                    self.get(key as u64)?;
                }
                b'h' => {
                    let key = self.u8()?;
                    self.get(key.into())?;
                }
                b'j' => {
                    let key = self.u32()?;
                    self.get(key.into())?;
                }
                0x98 => {
                    // Marks the buffer on the stack read-only: nothing to do for a copy.
                    self.top()?;
                }
                0x8f..=0x91 => return Err(self.err("sets are not supported")),
                0x82..=0x84 => return Err(self.err("the copyreg extension registry is not supported")),
                0x97 => return Err(self.err("out-of-band buffers are not supported")),
                _ => return Err(self.err("unknown opcode")),
            }
        }
    }

    /// Decodes the quoted Python 2 `repr` of a byte string (STRING).
    fn string_repr(&self, line: &[u8]) -> Result<Vec<u8>, PickleError> {
        let inner = match line {
            [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
            _ => return Err(self.err("STRING argument is not a quoted string")),
        };
        let mut out = Vec::with_capacity(inner.len());
        let mut i = 0;
        while i < inner.len() {
            let b = inner[i];
            i += 1;
            if b != b'\\' {
                out.push(b);
                continue;
            }
            let Some(&e) = inner.get(i) else { return Err(self.err("STRING ends with a lone backslash")) };
            i += 1;
            match e {
                b'\n' => {}
                b'\\' | b'\'' | b'"' => out.push(e),
                b'a' => out.push(7),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(11),
                b'x' => {
                    let hex = inner.get(i..i + 2).and_then(|h| std::str::from_utf8(h).ok());
                    let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                    out.push(v.ok_or_else(|| self.err("bad \\x escape in STRING"))?);
                    i += 2;
                }
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    for _ in 0..2 {
                        match inner.get(i) {
                            Some(&d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    out.push((v & 0xff) as u8);
                }
                _ => out.extend_from_slice(&[b'\\', e]),
            }
        }
        Ok(out)
    }

    /// Decodes Python's `raw-unicode-escape` (UNICODE): `\uXXXX` and `\UXXXXXXXX` escapes,
    /// every other byte a Latin-1 character.
    fn raw_unicode_escape(&self, line: &[u8]) -> Result<String, PickleError> {
        let mut out = String::with_capacity(line.len());
        let mut i = 0;
        while i < line.len() {
            let b = line[i];
            let digits = match (b, line.get(i + 1)) {
                (b'\\', Some(b'u')) => 4,
                (b'\\', Some(b'U')) => 8,
                _ => {
                    out.push(char::from(b));
                    i += 1;
                    continue;
                }
            };
            let hex = line.get(i + 2..i + 2 + digits).and_then(|h| std::str::from_utf8(h).ok());
            let c = hex.and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32);
            out.push(c.ok_or_else(|| self.err("bad \\u escape in UNICODE"))?);
            i += 2 + digits;
        }
        Ok(out)
    }

    /// Converts the object graph under `root` to a tree of [`Value`]s.
    fn into_value(mut self, root: Id) -> Result<Value, PickleError> {
        // A payload referred to from one place only is moved, not copied (the 30 MB array of a
        // CIFAR batch); the root counts as one reference so a cycle back to it still copies.
        let mut refs = vec![0u32; self.objects.len()];
        refs[root] = 1;
        for obj in &self.objects {
            let mut count = |id: &Id| refs[*id] = refs[*id].saturating_add(1);
            match obj {
                Obj::List(v) | Obj::Tuple(v) => v.iter().for_each(&mut count),
                Obj::Dict(p) => p.iter().for_each(|(k, v)| {
                    count(k);
                    count(v);
                }),
                Obj::Reduce { callable: a, args: b } | Obj::Build { obj: a, state: b } => {
                    count(a);
                    count(b);
                }
                Obj::SetItems { obj, items } => {
                    count(obj);
                    items.iter().for_each(|(k, v)| {
                        count(k);
                        count(v);
                    });
                }
                Obj::Appends { obj, items } => {
                    count(obj);
                    items.iter().for_each(&mut count);
                }
                Obj::PersistentId(id) => count(id),
                _ => {}
            }
        }
        // Errors from here on are about the whole pickle, reported at its STOP.
        self.op_pos = self.pos.saturating_sub(1);
        self.op = Some(b'.');
        self.value(root, 0, true, &refs)
    }

    fn values(&mut self, ids: &[Id], depth: usize, unique: bool, refs: &[u32]) -> Result<Vec<Value>, PickleError> {
        ids.iter().map(|&id| self.value(id, depth + 1, unique, refs)).collect()
    }

    fn value_pairs(
        &mut self,
        ids: &[(Id, Id)],
        depth: usize,
        unique: bool,
        refs: &[u32],
    ) -> Result<Vec<(Value, Value)>, PickleError> {
        ids.iter()
            .map(|&(k, v)| Ok((self.value(k, depth + 1, unique, refs)?, self.value(v, depth + 1, unique, refs)?)))
            .collect()
    }

    /// The value of object `id`. `unique`: every object on the path from the root to `id` is
    /// referred to once, so this visit is the only one and a payload can be moved.
    fn value(&mut self, id: Id, depth: usize, unique: bool, refs: &[u32]) -> Result<Value, PickleError> {
        if depth > self.limits.max_depth {
            return Err(self.err(format!(
                "values nested more than {} deep (limit; or a container that contains itself)",
                self.limits.max_depth
            )));
        }
        self.out_values += 1;
        if self.out_values > self.limits.max_objects {
            return Err(self.err(format!(
                "the value expands to more than {} objects (limit; shared objects count each time)",
                self.limits.max_objects
            )));
        }
        let payload_len = match &self.objects[id] {
            Obj::Bytes(b) => b.len() as u64,
            Obj::Str(s) => s.len() as u64,
            _ => 0,
        };
        self.out_bytes += payload_len;
        if self.out_bytes > self.limits.max_output_bytes {
            return Err(self.err(format!(
                "the value holds more than {} bytes of strings (limit; shared strings count each time)",
                self.limits.max_output_bytes
            )));
        }
        let owned = unique && refs[id] <= 1;
        let boxed = |v: Value| Box::new(v);
        Ok(match &self.objects[id] {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(i) => Value::Int(*i),
            Obj::Float(f) => Value::Float(*f),
            Obj::Bytes(b) if !owned => Value::Bytes(b.clone()),
            Obj::Str(s) if !owned => Value::Str(s.clone()),
            Obj::Bytes(_) | Obj::Str(_) => match std::mem::replace(&mut self.objects[id], Obj::Moved) {
                Obj::Bytes(b) => Value::Bytes(b),
                Obj::Str(s) => Value::Str(s),
                _ => return Err(self.err("internal error: payload changed while moving")),
            },
            Obj::Moved => return Err(self.err("internal error: a payload was used after being moved")),
            Obj::Global { module, name } => Value::Global { module: module.clone(), name: name.clone() },
            Obj::List(v) => {
                let v = v.clone();
                Value::List(self.values(&v, depth, owned, refs)?)
            }
            Obj::Tuple(v) => {
                let v = v.clone();
                Value::Tuple(self.values(&v, depth, owned, refs)?)
            }
            Obj::Dict(p) => {
                let p = p.clone();
                Value::Dict(self.value_pairs(&p, depth, owned, refs)?)
            }
            &Obj::Reduce { callable, args } => Value::Reduce {
                callable: boxed(self.value(callable, depth + 1, owned, refs)?),
                args: boxed(self.value(args, depth + 1, owned, refs)?),
            },
            &Obj::Build { obj, state } => Value::Build {
                obj: boxed(self.value(obj, depth + 1, owned, refs)?),
                state: boxed(self.value(state, depth + 1, owned, refs)?),
            },
            Obj::SetItems { obj, items } => {
                let (obj, items) = (*obj, items.clone());
                Value::SetItems {
                    obj: boxed(self.value(obj, depth + 1, owned, refs)?),
                    items: self.value_pairs(&items, depth, owned, refs)?,
                }
            }
            Obj::Appends { obj, items } => {
                let (obj, items) = (*obj, items.clone());
                Value::Appends {
                    obj: boxed(self.value(obj, depth + 1, owned, refs)?),
                    items: self.values(&items, depth, owned, refs)?,
                }
            }
            &Obj::PersistentId(inner) => Value::PersistentId(boxed(self.value(inner, depth + 1, owned, refs)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle_writer::Writer;

    fn run(data: &[u8]) -> Result<Value, PickleError> {
        parse(data, &Limits::default()).map(|(v, _)| v)
    }

    #[test]
    fn scalars_and_containers_of_every_protocol() {
        // Protocol 0 text opcodes, as `pickle.dumps([1, -2, 'a\xe9', b'x', 1.5, True, None], 0)`
        // writes them (with a py2-style STRING instead of bytes).
        let p0 = b"(lp0\nI1\naL-2L\naVa\\u00e9\np1\naS'x\\n\\'\\x41'\naF1.5\naI01\naNa.";
        assert_eq!(
            run(p0).unwrap(),
            Value::List(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Str("a\u{e9}".into()),
                Value::Bytes(b"x\n'A".to_vec()),
                Value::Float(1.5),
                Value::Bool(true),
                Value::None,
            ])
        );
        // Protocol 4 with a frame, memoize and a shared (memoized) list seen after mutation.
        let mut w = Writer::default();
        w.proto(4).op(0x95).raw(&0u64.to_le_bytes());
        w.op(b'}').op(0x94).op(b'(');
        w.raw(&[0x8c, 1, b'a']).op(b']').op(0x94).op(b'(').op(0x88).op(0x89).op(b'e');
        w.raw(&[0x8c, 1, b'b']).raw(&[b'h', 1]);
        w.raw(&[0x8c, 1, b'c']).raw(&[b'C', 2, 1, 2]);
        w.raw(&[0x8c, 1, b'd']).raw(&[0x8a, 2, 0xff, 0x7f]).raw(&[0x8a, 1, 0xff]).op(0x86);
        w.raw(&[0x8c, 1, b'e']).op(b'G').raw(&2.5f64.to_be_bytes());
        w.raw(&[0x8c, 1, b'f']).op(0x96).raw(&3u64.to_le_bytes()).raw(b"xyz");
        let v = run(&w.op(b'u').stop()).unwrap();
        let list = Value::List(vec![Value::Bool(true), Value::Bool(false)]);
        assert_eq!(v.get("a"), Some(&list));
        assert_eq!(v.get("b"), Some(&list));
        assert_eq!(v.get("c"), Some(&Value::Bytes(vec![1, 2])));
        assert_eq!(v.get("d"), Some(&Value::Tuple(vec![Value::Int(32767), Value::Int(-1)])));
        assert_eq!(v.get("e"), Some(&Value::Float(2.5)));
        assert_eq!(v.get("f").and_then(Value::bytes_like).as_deref(), Some(&b"xyz"[..]));
        assert_eq!(v.text_keys(), ["a", "b", "c", "d", "e", "f"]);
    }

    #[test]
    fn calls_are_kept_unevaluated_and_mutations_follow_the_memo() {
        // An OrderedDict as torch writes a state dict: REDUCE, BINPUT, SETITEMS, then BUILD.
        let mut w = Writer::default();
        w.proto(2).global("collections", "OrderedDict").op(b')').op(b'R').binput(0);
        w.op(b'(').unicode("w").op(b'N').op(b'u');
        w.op(b'}').unicode("meta").int(7).op(b's').op(b'b');
        w.raw(&[b'h', 0]).op(0x86);
        let v = run(&w.stop()).unwrap();
        let Value::Tuple(pair) = v else { panic!("{v:?}") };
        assert_eq!(pair[0], pair[1]);
        let Value::Build { obj, state } = &pair[0] else { panic!("{pair:?}") };
        assert_eq!(state.get("meta"), Some(&Value::Int(7)));
        let Value::SetItems { obj, items } = &**obj else { panic!("{obj:?}") };
        assert_eq!(items, &[(Value::Str("w".into()), Value::None)]);
        let Value::Reduce { callable, args } = &**obj else { panic!("{obj:?}") };
        assert!(callable.is_global("collections", "OrderedDict"));
        assert_eq!(**args, Value::Tuple(vec![]));

        // Python 3's protocol-2 bytes.
        let mut w = Writer::default();
        w.proto(2).global("_codecs", "encode").unicode("\u{ff}\u{0}a").unicode("latin1").op(0x86).op(b'R');
        let v = run(&w.stop()).unwrap();
        assert_eq!(v.bytes_like().as_deref(), Some(&[0xff, 0, b'a'][..]));
    }

    #[test]
    fn errors_name_the_opcode_and_offset() {
        // Truncated inside BINBYTES's payload.
        let mut w = Writer::default();
        w.proto(3).op(b'B').raw(&10u32.to_le_bytes()).raw(b"abc");
        let e = run(&w.0).unwrap_err();
        assert_eq!((e.offset, e.opcode), (2, Some(b'B')));
        assert_eq!(e.kind, ErrorKind::Truncated { needed: 15, available: 8 });
        assert!(e.to_string().contains("BINBYTES"), "{e}");
        // No STOP.
        let e = run(b"\x80\x02N").unwrap_err();
        assert_eq!((e.offset, e.opcode), (3, None));
        // Memo key never stored, unknown opcode, underflow, negative length.
        for (data, offset, what) in [
            (&b"\x80\x02h\x05."[..], 2, "memo key 5"),
            (b"\x80\x02N\xff.", 3, "unknown opcode"),
            (b"\x80\x02Na.", 3, "underflow"),
            (b"\x80\x02T\xff\xff\xff\xff.", 2, "negative length"),
            (b"\x80\x06N.", 0, "protocol 6"),
            (b"\x80\x04\x8f.", 2, "sets"),
        ] {
            let e = run(data).unwrap_err();
            assert_eq!(e.offset, offset, "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let msg = run(b"\x80\x02h\x05.").unwrap_err().to_string();
        assert!(msg.contains("BINGET") && msg.contains("byte offset 2"), "{msg}");
    }

    #[test]
    fn limits_stop_hostile_pickles() {
        // A list containing itself.
        let e = run(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(e.to_string().contains("nested more than"), "{e}");
        // Each level doubles a shared list: 2^40 values from a few hundred bytes.
        let mut w = Writer::default();
        w.proto(2).op(b']').binput(0);
        for k in 0..40u8 {
            w.raw(&[b'h', k, b'h', k]).op(0x86).binput(k + 1);
        }
        let e = parse(&w.stop(), &Limits { max_objects: 10_000, ..Limits::default() }).unwrap_err();
        assert!(e.to_string().contains("expands to more than"), "{e}");
        // Object and memo limits.
        let limits = Limits { max_objects: 3, max_memo: 1, ..Limits::default() };
        let e = parse(b"\x80\x02NNNN.", &limits).unwrap_err();
        assert_eq!(e.offset, 5);
        let e = parse(b"\x80\x02Nq\x00q\x01.", &limits).unwrap_err();
        assert!(e.to_string().contains("memo"), "{e}");
        // A FRAME longer than the data.
        let e = run(b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.").unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}");
    }
}
