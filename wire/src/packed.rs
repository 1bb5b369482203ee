//! The packed layout of world `packed-plugin`: a batch of records, or of outputs, in
//! one buffer. The Rust SDK reads inputs and writes outputs with it; the broker writes
//! inputs and reads outputs with the same module, so both sides agree by
//! construction. Integers are little-endian; a length of `NONE` is an absent key or
//! value.
//!
//! ```text
//! batch   = count:u32 item*
//! input   = offset:u64 timestamp_ms:i64 body
//! output  = input_index:u32 target_len:u32 target body
//! body    = key_len:u32 value_len:u32 header_count:u32 headers_len:u32
//!           key value headers
//! headers = (name_len:u32 name value_len:u32 value)*     (headers_len bytes)
//! ```
//!
//! `headers_len` lets a plugin pass a record's headers on as one copy.

/// The length of an absent key or value.
pub const NONE: u32 = u32::MAX;

/// A buffer that does not follow the layout; says which part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packed batch: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// A record's headers as packed: `count` of them in `bytes`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawHeaders<'a> {
    pub count: u32,
    pub bytes: &'a [u8],
}

impl<'a> RawHeaders<'a> {
    /// Each header's name and value.
    pub fn iter(&self) -> HeaderIter<'a> {
        HeaderIter {
            reader: Reader::new(self.bytes),
            left: self.count,
        }
    }
}

/// Iterates packed headers; a malformed header ends it with an error.
pub struct HeaderIter<'a> {
    reader: Reader<'a>,
    left: u32,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = Result<(&'a str, &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let header = (|| {
            let name_len = self.reader.u32()?;
            let name = self.reader.str(name_len, "header name")?;
            let value_len = self.reader.u32()?;
            Ok((name, self.reader.bytes(value_len, "header value")?))
        })();
        if header.is_err() {
            self.left = 0;
        }
        Some(header)
    }
}

/// Key, value and headers: the part inputs and outputs share.
#[derive(Clone, Copy, Debug, Default)]
pub struct Body<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: RawHeaders<'a>,
}

/// Reads a packed buffer front to back.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let bytes = self.bytes(4, "truncated")?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let bytes = self.bytes(8, "truncated")?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(word))
    }

    pub fn bytes(&mut self, len: u32, what: &'static str) -> Result<&'a [u8], Malformed> {
        let len = len as usize;
        if len > self.buf.len() {
            return Err(Malformed(what));
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    pub fn str(&mut self, len: u32, what: &'static str) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes(len, what)?).map_err(|_| Malformed(what))
    }

    /// The batch's leading record count.
    pub fn count(&mut self) -> Result<u32, Malformed> {
        self.u32()
    }

    /// An input record: (offset, timestamp_ms, body).
    pub fn input(&mut self) -> Result<(u64, i64, Body<'a>), Malformed> {
        let offset = self.u64()?;
        let timestamp_ms = self.u64()? as i64;
        Ok((offset, timestamp_ms, self.body()?))
    }

    /// An output: (index of its input, target, body).
    pub fn output(&mut self) -> Result<(u32, &'a str, Body<'a>), Malformed> {
        let input = self.u32()?;
        let target_len = self.u32()?;
        let target = self.str(target_len, "output target")?;
        Ok((input, target, self.body()?))
    }

    fn body(&mut self) -> Result<Body<'a>, Malformed> {
        let key_len = self.u32()?;
        let value_len = self.u32()?;
        let count = self.u32()?;
        let headers_len = self.u32()?;
        let key = self.optional(key_len, "key")?;
        let value = self.optional(value_len, "value")?;
        let bytes = self.bytes(headers_len, "headers")?;
        Ok(Body {
            key,
            value,
            headers: RawHeaders { count, bytes },
        })
    }

    fn optional(&mut self, len: u32, what: &'static str) -> Result<Option<&'a [u8]>, Malformed> {
        if len == NONE {
            Ok(None)
        } else {
            self.bytes(len, what).map(Some)
        }
    }
}

/// Writes a packed batch: a count placeholder first, patched by `finish`.
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
    count: u32,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new(Vec::new())
    }
}

impl Writer {
    /// Starts a batch in `buf` (cleared; its capacity is kept).
    pub fn new(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&0u32.to_le_bytes());
        Writer { buf, count: 0 }
    }

    /// Items written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn input<'h>(
        &mut self,
        offset: u64,
        timestamp_ms: i64,
        body: Body<'_>,
        extra: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
    ) {
        self.count += 1;
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&timestamp_ms.to_le_bytes());
        self.body(body, extra);
    }

    pub fn output<'h>(
        &mut self,
        input: u32,
        target: &str,
        body: Body<'_>,
        extra: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
    ) {
        self.count += 1;
        self.buf.extend_from_slice(&input.to_le_bytes());
        self.len(target.len());
        self.buf.extend_from_slice(target.as_bytes());
        self.body(body, extra);
    }

    /// The batch, its count in place.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }

    /// `body`, with `extra` headers after its packed ones.
    fn body<'h>(
        &mut self,
        body: Body<'_>,
        extra: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
    ) {
        let (extra_count, extra_len) = extra.clone().fold((0, 0), |(n, len), (k, v)| {
            (n + 1, len + 8 + k.len() + v.len())
        });
        self.optional_len(body.key);
        self.optional_len(body.value);
        self.len(body.headers.count as usize + extra_count);
        self.len(body.headers.bytes.len() + extra_len);
        self.buf.extend_from_slice(body.key.unwrap_or_default());
        self.buf.extend_from_slice(body.value.unwrap_or_default());
        self.buf.extend_from_slice(body.headers.bytes);
        for (k, v) in extra {
            self.len(k.len());
            self.buf.extend_from_slice(k.as_bytes());
            self.len(v.len());
            self.buf.extend_from_slice(v);
        }
    }

    fn optional_len(&mut self, part: Option<&[u8]>) {
        match part {
            Some(bytes) => self.len(bytes.len()),
            None => self.buf.extend_from_slice(&NONE.to_le_bytes()),
        }
    }

    /// Lengths over 4 GiB cannot be packed; the canonical ABI's lists stop at 4 GiB
    /// anyway, so this is a plugin or host bug, not input.
    fn len(&mut self, len: usize) {
        let len = u32::try_from(len).expect("packed part over 4 GiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
    }
}
