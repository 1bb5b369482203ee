//! Weir plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`] (`init` once with the pipeline's
//! params, `process` per batch of records), exported with [`plugin!`], built for
//! `wasm32-wasip2`:
//!
//! ```ignore
//! use weir_plugin::{Batch, BatchResult, Output, Plugin, Source};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     fn init(_params: Vec<(String, String)>) -> Result<(), String> {
//!         Ok(())
//!     }
//!     fn process(_source: Source, records: Batch<'_>) -> BatchResult {
//!         let mut result = BatchResult::default();
//!         for (i, r) in records.iter().enumerate() {
//!             let value = r.value.unwrap_or_default().to_ascii_uppercase();
//!             result.emit(Output::to("out", i).key(r.key).value(&value));
//!         }
//!         result
//!     }
//! }
//!
//! weir_plugin::plugin!(Upper);
//! ```
//!
//! The component this builds is of world `packed-plugin` (`wasm-sdk/wit`): records
//! arrive packed in one buffer and outputs leave in another, so a record costs no
//! allocation at the boundary; [`Record`] borrows from the batch.

/// The bindings `wit-bindgen` generates from `wasm-sdk/wit`.
pub mod bindings {
    wit_bindgen::generate!({
        world: "packed-plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_plugin_bindings",
        default_bindings_module: "weir_plugin::bindings",
    });
}

pub use weir_wire::packed;

pub use bindings::weir::plugin::types::{Failure, Level, PackedResult, Source};
use packed::{Body, RawHeaders, Reader, Writer};

/// What a plugin implements.
pub trait Plugin {
    /// Called once per instance, before any `process`, with the pipeline's params.
    /// An error stops the pipeline with that message.
    fn init(params: Vec<(String, String)>) -> Result<(), String>;

    /// Called with a batch of records of one source partition, in offset order.
    fn process(source: Source, records: Batch<'_>) -> BatchResult;
}

/// Exports `$t` (a type implementing [`Plugin`]) as the component's plugin.
#[macro_export]
macro_rules! plugin {
    ($t:ident) => {
        #[doc(hidden)]
        pub struct __WeirPluginExport;

        impl $crate::bindings::Guest for __WeirPluginExport {
            fn init(
                params: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                <$t as $crate::Plugin>::init(params)
            }

            fn process_packed(
                source: $crate::Source,
                records: ::std::vec::Vec<u8>,
            ) -> $crate::PackedResult {
                $crate::process_packed::<$t>(source, &records)
            }
        }

        $crate::bindings::export_plugin_bindings!(__WeirPluginExport with_types_in $crate::bindings);
    };
}

/// What [`plugin!`] calls: unpacks the batch, runs the plugin, packs its result.
#[doc(hidden)]
pub fn process_packed<P: Plugin>(source: Source, records: &[u8]) -> PackedResult {
    let batch = Batch::new(records).unwrap_or_else(|e| panic!("from the host: {e}"));
    P::process(source, batch).finish()
}

/// Logs through the broker (the line carries the pipeline's name).
pub fn log(level: Level, message: &str) {
    bindings::weir::plugin::host::log(level, message);
}

/// A batch of input records, borrowed from the buffer the host passed.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    len: usize,
    packed: &'a [u8],
}

impl<'a> Batch<'a> {
    fn new(buf: &'a [u8]) -> Result<Self, packed::Malformed> {
        let mut reader = Reader::new(buf);
        let len = reader.count()? as usize;
        Ok(Batch {
            len,
            packed: &buf[4..],
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records, in offset order; index `i` of this iterator is input `i`.
    pub fn iter(&self) -> Records<'a> {
        Records {
            reader: Reader::new(self.packed),
            left: self.len,
        }
    }
}

impl<'a> IntoIterator for Batch<'a> {
    type Item = Record<'a>;
    type IntoIter = Records<'a>;

    fn into_iter(self) -> Records<'a> {
        self.iter()
    }
}

/// Iterates a [`Batch`].
pub struct Records<'a> {
    reader: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (offset, timestamp_ms, body) = self
            .reader
            .input()
            .unwrap_or_else(|e| panic!("from the host: {e}"));
        Some(Record {
            key: body.key,
            value: body.value,
            timestamp_ms,
            offset,
            headers: Headers(body.headers),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Records<'_> {}

/// One input record, as stored in its source topic.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Its offset in the source partition.
    pub offset: u64,
    pub headers: Headers<'a>,
}

impl<'a> Record<'a> {
    /// The value as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&'a str> {
        self.value.and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A header's value (the first, if there are several of that name).
    pub fn header(&self, key: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// A record's headers (Kafka headers: a name and bytes, names may repeat).
#[derive(Clone, Copy, Default)]
pub struct Headers<'a>(RawHeaders<'a>);

impl<'a> Headers<'a> {
    pub fn len(&self) -> usize {
        self.0.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0.count == 0
    }

    /// Name and value of each header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + use<'a> {
        self.0
            .iter()
            .map(|h| h.unwrap_or_else(|e| panic!("from the host: {e}")))
    }
}

/// One record to emit: `Output::to("alarms", i).key(r.key).value(&v)`.
pub struct Output<'a> {
    input: u32,
    target: &'a str,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    passed: RawHeaders<'a>,
    added: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Output<'a> {
    /// An output to the pipeline output named `target` (one of the pipeline's
    /// outputs), coming from input `input` (its index in the batch).
    pub fn to(target: &'a str, input: usize) -> Self {
        Output {
            input: input as u32,
            target,
            key: None,
            value: None,
            passed: RawHeaders::default(),
            added: Vec::new(),
        }
    }

    pub fn key(mut self, key: Option<&'a [u8]>) -> Self {
        self.key = key;
        self
    }

    pub fn value(mut self, value: &'a [u8]) -> Self {
        self.value = Some(value);
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: &'a str, value: &'a [u8]) -> Self {
        self.added.push((key, value));
        self
    }

    /// Passes on an input's headers (in one copy), before any added with `header`.
    pub fn headers(mut self, headers: Headers<'a>) -> Self {
        self.passed = headers.0;
        self
    }
}

/// What `process` returns: the outputs and the failures. An input with neither is
/// dropped (filtered out); one input may have several outputs (fan-out, routing).
#[derive(Default)]
pub struct BatchResult {
    outputs: Writer,
    failures: Vec<Failure>,
}

impl BatchResult {
    /// Adds an output record.
    pub fn emit(&mut self, output: Output<'_>) {
        let body = Body {
            key: output.key,
            value: output.value,
            headers: output.passed,
        };
        self.outputs.output(
            output.input,
            output.target,
            body,
            output.added.iter().copied(),
        );
    }

    /// Sends input `input` to the dead-letter topic with `reason`.
    pub fn fail(&mut self, input: usize, reason: impl Into<String>) {
        self.failures.push(Failure {
            input: input as u32,
            reason: reason.into(),
        });
    }

    /// Outputs emitted so far.
    pub fn outputs(&self) -> usize {
        self.outputs.count() as usize
    }

    /// The common shape of a converter: each record's value through `convert`, out
    /// to `target` with the record's key and headers, or to the dead-letter topic
    /// with the error.
    pub fn map_values(
        records: Batch<'_>,
        target: &str,
        mut convert: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, String>,
    ) -> BatchResult {
        let mut result = BatchResult::default();
        for (i, record) in records.iter().enumerate() {
            match convert(record.value) {
                Ok(value) => result.emit(
                    Output::to(target, i)
                        .key(record.key)
                        .value(&value)
                        .headers(record.headers),
                ),
                Err(reason) => result.fail(i, reason),
            }
        }
        result
    }

    fn finish(self) -> PackedResult {
        PackedResult {
            outputs: self.outputs.finish(),
            failures: self.failures,
        }
    }
}
