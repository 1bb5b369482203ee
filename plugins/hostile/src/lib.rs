//! Misbehaves on purpose, by record value: `loop` never returns, `grow` allocates
//! without end, `trap` panics, `huge` returns 80 MiB of output, `nowhere` names an
//! output the pipeline does not have. Anything else passes through to `out`.

use weir_plugin::{Batch, BatchResult, Output, Plugin, Source};

struct Hostile;

impl Plugin for Hostile {
    fn init(_params: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_source: Source, records: Batch<'_>) -> BatchResult {
        let mut result = BatchResult::default();
        for (i, r) in records.iter().enumerate() {
            match r.text().unwrap_or_default() {
                "loop" => {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                "grow" => {
                    // Reserves 8 MiB at a time without touching it, so the memory
                    // limit, not the time limit, stops it even on a busy machine.
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(Vec::with_capacity(8 * 1024 * 1024));
                        std::hint::black_box(&hoard);
                    }
                }
                "trap" => panic!("record {} asked for it", r.offset),
                "huge" => {
                    let mebibyte = vec![b'x'; 1024 * 1024];
                    for _ in 0..80 {
                        result.emit(Output::to("out", i).value(&mebibyte));
                    }
                }
                "nowhere" => result.emit(Output::to("nowhere", i).value(b"lost")),
                _ => result.emit(
                    Output::to("out", i)
                        .key(r.key)
                        .value(r.value.unwrap_or_default()),
                ),
            }
        }
        result
    }
}

weir_plugin::plugin!(Hostile);
