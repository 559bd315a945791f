//! Writes pickle opcodes one by one, for tests that need pickles Python never made (hostile,
//! truncated, or of a protocol the fixtures do not cover). Compiled for this crate's tests and,
//! with the `writer` feature, for other crates' tests.

/// Writes pickle opcodes, for tests that need pickles Python never made for us.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn proto(&mut self, v: u8) -> &mut Self {
        self.raw(&[0x80, v])
    }
    /// A Python 2 `str` (SHORT_BINSTRING or BINSTRING).
    pub fn py2_str(&mut self, s: &[u8]) -> &mut Self {
        match u8::try_from(s.len()) {
            Ok(n) => self.raw(&[b'U', n]),
            Err(_) => self.op(b'T').raw(&(s.len() as i32).to_le_bytes()),
        }
        .raw(s)
    }
    /// A Python 3 `str` (BINUNICODE).
    pub fn unicode(&mut self, s: &str) -> &mut Self {
        self.op(b'X').raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }
    /// BININT1, BININT2 or BININT, like cPickle.
    pub fn int(&mut self, v: i32) -> &mut Self {
        match (u8::try_from(v), u16::try_from(v)) {
            (Ok(b), _) => self.raw(&[b'K', b]),
            (_, Ok(w)) => self.op(b'M').raw(&w.to_le_bytes()),
            _ => self.op(b'J').raw(&v.to_le_bytes()),
        }
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c').raw(module.as_bytes()).op(b'\n').raw(name.as_bytes()).op(b'\n')
    }
    pub fn binput(&mut self, k: u8) -> &mut Self {
        self.raw(&[b'q', k])
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.op(b'.');
        std::mem::take(&mut self.0)
    }
}
