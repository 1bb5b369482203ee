//! Reading the centre back before sending: which of a rule's records are there already.
//!
//! The centre's idempotence only matches retries of one producer. A record it
//! acknowledged just before the edge died, while the cursor write that covers it was
//! not durable yet, would come again from the next producer: a duplicate. So before
//! a target topic sends, the uplink reads the target's partitions from the rule's
//! *floor* to their end and notes each record of this gateway whose source offset is
//! at or past its source partition's cursor; those are not sent again.
//!
//! The floor, one position per upstream partition, is a point before which no record
//! past the cursors can sit. The uplink writes it in the transaction that writes the
//! cursors, as the least of: one past the highest position any delivery of this
//! producer reached (the end of the partition when it started, if none), and the
//! position of every record past its cursor that was delivered or found there. That
//! holds because a producer's records land in a partition in the order it sent them,
//! and their acknowledgements come in that order: whatever is not acknowledged yet
//! lands after everything that is.

use std::collections::{BTreeMap, HashMap};

use super::client::{Position, UpstreamReader};
use super::error::ReplicationError;

/// Records read back from each partition when the floor is not known (the cursors
/// were written by a Weir that kept no floor).
pub const UNKNOWN_FLOOR_RECORDS: u64 = 1_000_000;

/// What is known of where a target's records past the cursors can be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Every cursor was just placed: nothing was ever sent.
    Fresh,
    /// Not written (cursors from an older Weir): read the last
    /// `UNKNOWN_FLOOR_RECORDS` of each partition.
    Unknown,
    /// Upstream partition → first position to read.
    At(BTreeMap<u32, u64>),
}

/// A source partition that sends to the target.
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: u32,
    /// Its cursor: records from here on may be upstream already.
    pub cursor: u64,
    /// Its cursor was just placed: nothing upstream can be its.
    pub fresh: bool,
}

/// What a read-back found.
#[derive(Debug, Default)]
pub struct Found {
    /// By source (topic, partition): source offset → where it is upstream.
    pub copies: HashMap<(String, u32), BTreeMap<u64, Position>>,
    /// The end of every upstream partition as the read found it.
    pub ends: BTreeMap<u32, u64>,
}

impl Found {
    pub fn count(&self) -> usize {
        self.copies.values().map(BTreeMap::len).sum()
    }
}

/// Reads `target` back from `floor` and finds the records of `gateway` past the
/// cursors of `sources`.
pub async fn read_back(
    reader: &dyn UpstreamReader,
    target: &str,
    gateway: &str,
    floor: &Floor,
    sources: &[Source<'_>],
) -> Result<Found, ReplicationError> {
    let ends = reader.ends(target).await?;
    let mut found = Found {
        ends: (0u32..)
            .zip(&ends)
            .map(|(p, &(_, high))| (p, high))
            .collect(),
        ..Found::default()
    };
    if *floor == Floor::Fresh {
        // Nothing to find; a short end (Tansu's) only makes the floor lower: safe.
        return Ok(found);
    }
    let from: Vec<(u32, u64)> = (0u32..)
        .zip(&ends)
        .map(|(p, &(low, high))| {
            let known = match floor {
                Floor::At(at) => at.get(&p).copied(),
                Floor::Fresh | Floor::Unknown => None,
            };
            let from = known.unwrap_or_else(|| high.saturating_sub(UNKNOWN_FLOOR_RECORDS));
            (p, from.max(low))
        })
        .collect();
    let mut visit = |at: Position, headers: &[(&str, &[u8])]| {
        if let Some((source, offset)) = provenance(gateway, headers)
            && let Some(s) = sources
                .iter()
                .find(|s| !s.fresh && s.partition == source.1 && s.topic.as_bytes() == source.0)
            && offset >= s.cursor
        {
            found
                .copies
                .entry((s.topic.to_string(), s.partition))
                .or_default()
                .entry(offset)
                .or_insert(at);
        }
    };
    let scanned = reader.scan(target, &from, &mut visit).await?;
    // The end of each partition: the scan's, never below what ListOffsets said.
    for (p, end) in scanned {
        let known = found.ends.entry(p).or_default();
        *known = (*known).max(end);
    }
    Ok(found)
}

/// The source (topic, partition) and offset a record of `gateway` names in its
/// headers; None for anything else.
fn provenance<'h>(gateway: &str, headers: &[(&str, &'h [u8])]) -> Option<((&'h [u8], u32), u64)> {
    let get = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let number = |name: &str| -> Option<u64> { std::str::from_utf8(get(name)?).ok()?.parse().ok() };
    if get("weir.gateway")? != gateway.as_bytes() {
        return None;
    }
    let partition = u32::try_from(number("weir.source.partition")?).ok()?;
    Some((
        (get("weir.source.topic")?, partition),
        number("weir.source.offset")?,
    ))
}

/// The floor of a target's parts now (see the module comment): `tops` are one past
/// the highest position each part's deliveries reached, `unsettled` the positions of
/// records past their cursors that are upstream.
pub fn floor<'a>(
    tops: impl Iterator<Item = &'a BTreeMap<u32, u64>>,
    unsettled: impl Iterator<Item = Position>,
) -> BTreeMap<u32, u64> {
    let mut floor: BTreeMap<u32, u64> = BTreeMap::new();
    for top in tops {
        for (&p, &t) in top {
            let f = floor.entry(p).or_insert(t);
            *f = (*f).max(t);
        }
    }
    for at in unsettled {
        let f = floor.entry(at.partition).or_insert(at.offset);
        *f = (*f).min(at.offset);
    }
    floor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn the_floor_is_the_highest_top_lowered_by_every_unsettled_record() {
        let a = BTreeMap::from([(0, 10), (1, 5)]);
        let b = BTreeMap::from([(0, 12), (1, 5)]);
        let floor = floor(
            [&a, &b].into_iter(),
            [at(1, 3), at(0, 11), at(1, 4)].into_iter(),
        );
        assert_eq!(floor, BTreeMap::from([(0, 11), (1, 3)]));
    }

    #[test]
    fn provenance_needs_this_gateway_and_numbers() {
        let h: Vec<(&str, &[u8])> = vec![
            ("weir.gateway", b"gw"),
            ("weir.source.topic", b"t"),
            ("weir.source.partition", b"2"),
            ("weir.source.offset", b"41"),
        ];
        assert_eq!(provenance("gw", &h), Some(((&b"t"[..], 2), 41)));
        assert_eq!(provenance("other", &h), None);
        let mut bad = h.clone();
        bad[3].1 = b"4x";
        assert_eq!(provenance("gw", &bad), None);
        assert_eq!(provenance("gw", &h[..3]), None);
    }
}
