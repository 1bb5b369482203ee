//! A sensor frame: one device's reading, encoded with postcard (varints, no field
//! names) into a few bytes, so a battery device sends 15 bytes instead of 80 of JSON.
//!
//! `no_std` and allocation-free: firmware encodes into a stack buffer and writes it
//! to any `embedded_io::Write` (a UART, a TCP socket of an embedded stack, an MQTT
//! client's payload buffer). On the wire a frame is a one-byte length then the
//! postcard bytes, so frames can be streamed back to back; as an MQTT payload the
//! frame is the whole payload and [`decode`] reads it.
#![no_std]

use serde::{Deserialize, Serialize};

/// Largest encoded frame (postcard bytes, without the length byte).
pub const MAX_FRAME: usize = 64;

/// One reading of one device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensorFrame {
    /// The frame format; decoders refuse versions they do not know.
    pub version: u8,
    pub device_id: u32,
    /// Counts up per device; gaps show lost frames.
    pub seq: u32,
    /// Milliseconds since the Unix epoch (0 if the device has no clock).
    pub timestamp_ms: u64,
    /// Tenths of a degree Celsius.
    pub temperature_dc: i16,
    /// Tenths of a percent.
    pub humidity_dpct: u16,
    pub battery_mv: u16,
}

/// The version this crate writes and reads.
pub const VERSION: u8 = 1;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError<E> {
    /// Bytes that are not a frame (truncated, or not postcard of this shape).
    Malformed,
    /// A frame version this decoder does not know.
    UnknownVersion(u8),
    /// The underlying writer or reader failed.
    Io(E),
}

/// Encodes `frame` into `buf`; returns the bytes used (the MQTT payload).
pub fn encode<'a>(frame: &SensorFrame, buf: &'a mut [u8]) -> Result<&'a mut [u8], FrameError<()>> {
    postcard::to_slice(frame, buf).map_err(|_| FrameError::Malformed)
}

/// Decodes a frame from a whole payload.
pub fn decode(bytes: &[u8]) -> Result<SensorFrame, FrameError<()>> {
    let frame: SensorFrame = postcard::from_bytes(bytes).map_err(|_| FrameError::Malformed)?;
    if frame.version != VERSION {
        return Err(FrameError::UnknownVersion(frame.version));
    }
    Ok(frame)
}

/// Writes one length-prefixed frame to a stream.
pub fn write_frame<W: embedded_io::Write>(
    writer: &mut W,
    frame: &SensorFrame,
) -> Result<(), FrameError<W::Error>> {
    let mut buf = [0u8; MAX_FRAME];
    let bytes = encode(frame, &mut buf).map_err(|_| FrameError::Malformed)?;
    writer
        .write_all(&[bytes.len() as u8])
        .map_err(FrameError::Io)?;
    writer.write_all(bytes).map_err(FrameError::Io)?;
    writer.flush().map_err(FrameError::Io)
}

/// Reads one length-prefixed frame from a stream.
pub fn read_frame<R: embedded_io::Read>(
    reader: &mut R,
) -> Result<SensorFrame, FrameError<embedded_io::ReadExactError<R::Error>>> {
    let mut len = [0u8; 1];
    reader.read_exact(&mut len).map_err(FrameError::Io)?;
    let len = usize::from(len[0]);
    if len > MAX_FRAME {
        return Err(FrameError::Malformed);
    }
    let mut buf = [0u8; MAX_FRAME];
    reader.read_exact(&mut buf[..len]).map_err(FrameError::Io)?;
    decode(&buf[..len]).map_err(|e| match e {
        FrameError::UnknownVersion(v) => FrameError::UnknownVersion(v),
        _ => FrameError::Malformed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u32) -> SensorFrame {
        SensorFrame {
            version: VERSION,
            device_id: 42,
            seq,
            timestamp_ms: 1_764_000_000_000,
            temperature_dc: -125,
            humidity_dpct: 455,
            battery_mv: 3012,
        }
    }

    /// A byte buffer as a stream, without std.
    struct Buf {
        data: [u8; 256],
        len: usize,
        pos: usize,
    }

    impl embedded_io::ErrorType for Buf {
        type Error = core::convert::Infallible;
    }

    impl embedded_io::Write for Buf {
        fn write(&mut self, bytes: &[u8]) -> Result<usize, Self::Error> {
            let n = bytes.len().min(self.data.len() - self.len);
            self.data[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            Ok(n)
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    impl embedded_io::Read for Buf {
        fn read(&mut self, out: &mut [u8]) -> Result<usize, Self::Error> {
            let n = out.len().min(self.len - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn round_trip_and_size() {
        let mut buf = [0u8; MAX_FRAME];
        let bytes = encode(&frame(7), &mut buf).unwrap();
        assert!(bytes.len() <= 20, "{} bytes", bytes.len());
        assert_eq!(decode(bytes).unwrap(), frame(7));
    }

    #[test]
    fn streams_back_to_back() {
        let mut stream = Buf {
            data: [0; 256],
            len: 0,
            pos: 0,
        };
        for seq in 0..5 {
            write_frame(&mut stream, &frame(seq)).unwrap();
        }
        for seq in 0..5 {
            assert_eq!(read_frame(&mut stream).unwrap(), frame(seq));
        }
        assert!(matches!(read_frame(&mut stream), Err(FrameError::Io(_))));
    }

    #[test]
    fn refuses_garbage_and_unknown_versions() {
        assert_eq!(decode(&[]), Err(FrameError::Malformed));
        assert_eq!(decode(&[1, 2]), Err(FrameError::Malformed));
        let mut f = frame(1);
        f.version = 9;
        let mut buf = [0u8; MAX_FRAME];
        let bytes = encode(&f, &mut buf).unwrap();
        assert_eq!(decode(bytes), Err(FrameError::UnknownVersion(9)));
    }
}
