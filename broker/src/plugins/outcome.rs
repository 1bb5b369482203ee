//! What a plugin call made of each record of a batch, and the rule both plugin paths
//! (MQTT ingest rules and pipelines) follow when a call fails as a whole: the batch
//! again, record by record, on a fresh instance after each failure, so that only the
//! record that breaks the plugin fails and the others keep their outputs.

use std::fmt::Display;

use tracing::warn;

use super::host::{BatchResult, InputRecord, OutputRecord};

/// Per input, in the batch's order: its outputs (none: the plugin dropped it), or why it
/// failed. An input that failed emits nothing: all of its outputs or none.
pub type PerInput = Vec<Result<Vec<OutputRecord>, String>>;

/// An output that names an input the batch does not have: the result is unusable.
#[derive(Debug, thiserror::Error)]
#[error("an output names input {input} of a batch of {batch}")]
pub struct NoSuchInput {
    pub input: usize,
    pub batch: usize,
}

/// A call's result per input. A failure naming an input outside the batch is ignored
/// (there is no record to fail); an output doing so makes the whole result unusable.
pub fn per_input(result: BatchResult, batch: usize) -> Result<PerInput, NoSuchInput> {
    let mut per_input: PerInput = (0..batch).map(|_| Ok(Vec::new())).collect();
    for failure in result.failures {
        if let Some(slot) = per_input.get_mut(failure.input as usize) {
            *slot = Err(failure.reason);
        }
    }
    for output in result.outputs {
        let input = output.input as usize;
        match per_input.get_mut(input) {
            Some(Ok(outputs)) => outputs.push(output),
            Some(Err(_)) => {}
            None => return Err(NoSuchInput { input, batch }),
        }
    }
    Ok(per_input)
}

/// Runs `call` on the whole batch. If it fails as a whole (a trap, a timeout, an
/// unusable result), `renew` makes a fresh instance and each input is called alone,
/// with `renew` again after each failure: that input fails with the call's error.
/// An error of `renew` ends the run (there is no instance left to call).
pub fn isolating<S, E: Display, F>(
    plugin: &str,
    state: &mut S,
    inputs: &[InputRecord],
    call: impl Fn(&mut S, &[InputRecord]) -> Result<PerInput, E>,
    renew: impl Fn(&mut S) -> Result<(), F>,
) -> Result<PerInput, F> {
    let failure = match call(state, inputs) {
        Ok(per_input) => return Ok(per_input),
        Err(failure) => failure,
    };
    warn!(plugin, error = %failure, records = inputs.len(),
        "plugin failed on a batch; isolating the record that breaks it");
    renew(state)?;
    let mut all = Vec::with_capacity(inputs.len());
    for input in inputs {
        match call(state, std::slice::from_ref(input)) {
            Ok(mut one) => all.push(one.pop().unwrap_or_else(|| Ok(Vec::new()))),
            Err(failure) => {
                all.push(Err(failure.to_string()));
                renew(state)?;
            }
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::plugins::host::Failure;

    fn input(offset: u64) -> InputRecord {
        InputRecord {
            key: None,
            value: Some(vec![offset as u8]),
            headers: Vec::new(),
            timestamp_ms: 0,
            offset,
        }
    }

    fn output(input: u32) -> OutputRecord {
        OutputRecord {
            input,
            target: "out".into(),
            key: None,
            value: Some(vec![input as u8]),
            headers: Vec::new(),
        }
    }

    #[test]
    fn per_input_keeps_a_failed_input_free_of_outputs() {
        let result = BatchResult {
            outputs: vec![output(0), output(1), output(0)],
            failures: vec![
                Failure {
                    input: 1,
                    reason: "bad".into(),
                },
                Failure {
                    input: 9,
                    reason: "no such input".into(),
                },
            ],
        };
        let per_input = per_input(result, 3).unwrap();
        assert_eq!(per_input[0].as_ref().unwrap().len(), 2);
        assert_eq!(per_input[1].as_ref().err().map(String::as_str), Some("bad"));
        assert!(per_input[2].as_ref().is_ok_and(Vec::is_empty));

        let stray = BatchResult {
            outputs: vec![output(3)],
            failures: Vec::new(),
        };
        let err = per_input_err(stray, 3);
        assert_eq!((err.input, err.batch), (3, 3));
    }

    fn per_input_err(result: BatchResult, batch: usize) -> NoSuchInput {
        match per_input(result, batch) {
            Err(e) => e,
            Ok(_) => panic!("an output past the batch was accepted"),
        }
    }

    /// A plugin that traps on any batch holding the record with offset 1, counting its
    /// instances.
    struct Breaks {
        instances: usize,
        broken: bool,
    }

    impl Breaks {
        fn fresh() -> Self {
            Self {
                instances: 1,
                broken: false,
            }
        }
    }

    fn call(state: &mut Breaks, inputs: &[InputRecord]) -> Result<PerInput, String> {
        assert!(!state.broken, "called on a broken instance");
        if inputs.iter().any(|i| i.offset == 1) {
            state.broken = true;
            return Err("trap".into());
        }
        Ok(inputs
            .iter()
            .map(|i| Ok(vec![output(i.offset as u32)]))
            .collect())
    }

    fn renew(state: &mut Breaks) -> Result<(), Infallible> {
        state.instances += 1;
        state.broken = false;
        Ok(())
    }

    #[test]
    fn a_trap_fails_only_the_record_that_causes_it() {
        let inputs: Vec<_> = (0..4).map(input).collect();
        let mut state = Breaks::fresh();
        let all = isolating("p", &mut state, &inputs, call, renew).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1].as_ref().err().map(String::as_str), Some("trap"));
        for i in [0, 2, 3] {
            assert_eq!(all[i].as_ref().unwrap()[0].input, i as u32);
        }
        // One fresh instance for the batch, one after the record that broke it.
        assert_eq!(state.instances, 3);
    }

    #[test]
    fn a_batch_that_succeeds_is_called_once() {
        let inputs: Vec<_> = [0, 2, 3].into_iter().map(input).collect();
        let mut state = Breaks::fresh();
        let all = isolating("p", &mut state, &inputs, call, renew).unwrap();
        assert!(all.iter().all(Result::is_ok));
        assert_eq!(state.instances, 1);
    }

    #[test]
    fn a_failed_renewal_ends_the_run() {
        let inputs: Vec<_> = (0..3).map(input).collect();
        let mut state = Breaks::fresh();
        let ended = isolating("p", &mut state, &inputs, call, |_| Err("no memory"));
        assert!(matches!(ended, Err("no memory")));
    }
}
