//! A reader for YUV4MPEG2 (`.y4m`) streams, the raw video format `ffmpeg -f yuv4mpegpipe`
//! writes.
//!
//! A stream is one header line, `YUV4MPEG2` followed by space-separated parameters (`W`
//! width, `H` height, `F` rate as `num:den`, `C` colour space, `I`, `A`, `X...`), then frames,
//! each a line starting `FRAME` (with optional parameters) followed by the raw planes: Y at
//! full size, then U and V subsampled as the colour space says. Only 8-bit colour spaces
//! are read (`420jpeg`, `420paldv`, `420mpeg2`, `420`, `422`, `444`, `mono`).
//!
//! The reader hands out the luma plane as a gray frame, or converts to RGB for colour
//! models. Video luma is usually "limited range" (black at 16, white at 235); it is
//! stretched to the full 0..=255 unless the header says `XCOLORRANGE=FULL` (`mono` streams
//! are taken as full range unless they say `XCOLORRANGE=LIMITED`).

use std::io::{BufRead, ErrorKind, Read};

/// Longest header or frame line accepted; real ones are under 100 bytes.
const MAX_LINE_BYTES: usize = 1024;
/// Largest frame side accepted.
const MAX_SIDE: u32 = 16384;

/// Chroma subsampling of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chroma {
    /// U and V at half width and half height.
    C420,
    /// U and V at half width, full height.
    C422,
    /// U and V at full size.
    C444,
    /// Luma only.
    Mono,
}

/// The stream header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Y4mHeader {
    pub width: u32,
    pub height: u32,
    /// Frames per second, when the header states a valid rate.
    pub fps: Option<f64>,
    pub chroma: Chroma,
    /// Whether luma uses the full 0..=255 range (else 16..=235).
    pub full_range: bool,
}

impl Y4mHeader {
    fn plane_bytes(&self) -> (usize, usize) {
        let (w, h) = (self.width as usize, self.height as usize);
        let chroma = match self.chroma {
            Chroma::C420 => w.div_ceil(2) * h.div_ceil(2),
            Chroma::C422 => w.div_ceil(2) * h,
            Chroma::C444 => w * h,
            Chroma::Mono => 0,
        };
        (w * h, chroma)
    }

    /// Bytes of one frame's planes.
    pub fn frame_bytes(&self) -> usize {
        let (luma, chroma) = self.plane_bytes();
        luma + 2 * chroma
    }
}

/// Why a stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Y4mError {
    #[error("not a Y4M stream: {0}")]
    Header(String),
    #[error("frame {frame}: {reason}")]
    Frame { frame: u64, reason: String },
    #[error("reading the stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a Y4M byte stream.
pub struct Y4mReader<R> {
    input: R,
    header: Y4mHeader,
    planes: Vec<u8>,
    frames_read: u64,
}

impl<R: BufRead> Y4mReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, Y4mError> {
        let line =
            read_line(&mut input)?.ok_or_else(|| Y4mError::Header("the input is empty".into()))?;
        let header = parse_header(&line)?;
        Ok(Y4mReader { input, header, planes: Vec::new(), frames_read: 0 })
    }

    pub fn header(&self) -> &Y4mHeader {
        &self.header
    }

    /// Reads the next frame's planes; `Ok(false)` at a clean end of stream.
    fn read_planes(&mut self) -> Result<bool, Y4mError> {
        let frame = self.frames_read;
        let Some(line) = read_line(&mut self.input)? else { return Ok(false) };
        if !line.starts_with(b"FRAME") {
            let shown = String::from_utf8_lossy(&line[..line.len().min(20)]).into_owned();
            return Err(Y4mError::Frame {
                frame,
                reason: format!("expected a FRAME line, found {shown:?}; the stream is damaged"),
            });
        }
        self.planes.resize(self.header.frame_bytes(), 0);
        self.input.read_exact(&mut self.planes).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Y4mError::Frame {
                frame,
                reason: format!(
                    "truncated: fewer than the {} bytes a frame holds",
                    self.planes.len()
                ),
            },
            _ => Y4mError::Io(e),
        })?;
        self.frames_read += 1;
        Ok(true)
    }

    /// The next frame as 8-bit gray (full range) into `out`; `Ok(false)` at end of stream.
    pub fn next_gray(&mut self, out: &mut Vec<u8>) -> Result<bool, Y4mError> {
        if !self.read_planes()? {
            return Ok(false);
        }
        let (luma, _) = self.header.plane_bytes();
        out.clear();
        if self.header.full_range {
            out.extend_from_slice(&self.planes[..luma]);
        } else {
            out.extend(self.planes[..luma].iter().map(|&y| expand_luma(y)));
        }
        Ok(true)
    }

    /// The next frame as 8-bit RGB into `out`; `Ok(false)` at end of stream.
    pub fn next_rgb(&mut self, out: &mut Vec<u8>) -> Result<bool, Y4mError> {
        if !self.read_planes()? {
            return Ok(false);
        }
        let h = self.header;
        let (w, height) = (h.width as usize, h.height as usize);
        let (luma_bytes, chroma_bytes) = h.plane_bytes();
        let (luma, chroma) = self.planes.split_at(luma_bytes);
        let (u_plane, v_plane) = chroma.split_at(chroma_bytes);
        let chroma_w = match h.chroma {
            Chroma::C444 => w,
            _ => w.div_ceil(2),
        };
        out.clear();
        out.reserve(w * height * 3);
        for y in 0..height {
            for x in 0..w {
                let luma_value = luma[y * w + x] as f32;
                let (u, v) = match h.chroma {
                    Chroma::Mono => (128.0, 128.0),
                    Chroma::C444 => (u_plane[y * w + x] as f32, v_plane[y * w + x] as f32),
                    Chroma::C422 => {
                        let i = y * chroma_w + x / 2;
                        (u_plane[i] as f32, v_plane[i] as f32)
                    }
                    Chroma::C420 => {
                        let i = (y / 2) * chroma_w + x / 2;
                        (u_plane[i] as f32, v_plane[i] as f32)
                    }
                };
                // BT.601: limited range scales luma by 255/219 and chroma by 255/224.
                let (c, k) = if h.full_range {
                    (luma_value, 1.0)
                } else {
                    ((luma_value - 16.0) * (255.0 / 219.0), 255.0 / 224.0)
                };
                let (du, dv) = ((u - 128.0) * k, (v - 128.0) * k);
                let clamp = |value: f32| value.round().clamp(0.0, 255.0) as u8;
                out.push(clamp(c + 1.402 * dv));
                out.push(clamp(c - 0.344_136 * du - 0.714_136 * dv));
                out.push(clamp(c + 1.772 * du));
            }
        }
        Ok(true)
    }
}

/// Limited-range luma (16..=235) stretched to 0..=255.
fn expand_luma(y: u8) -> u8 {
    ((y as f32 - 16.0) * (255.0 / 219.0)).round().clamp(0.0, 255.0) as u8
}

/// One `\n`-terminated line without its terminator; `None` at end of input before any byte.
fn read_line<R: BufRead>(input: &mut R) -> Result<Option<Vec<u8>>, Y4mError> {
    let mut line = Vec::new();
    let read = input.take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(Y4mError::Header(if line.len() > MAX_LINE_BYTES {
            format!("a header or frame line longer than {MAX_LINE_BYTES} bytes")
        } else {
            "the stream ends inside a header or frame line".into()
        }));
    }
    line.pop();
    Ok(Some(line))
}

fn parse_header(line: &[u8]) -> Result<Y4mHeader, Y4mError> {
    let bad = |reason: String| Y4mError::Header(reason);
    let text = std::str::from_utf8(line).map_err(|_| bad("the header is not text".into()))?;
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    if words.next() != Some("YUV4MPEG2") {
        return Err(bad("it does not start with YUV4MPEG2".into()));
    }
    let (mut width, mut height, mut fps) = (None, None, None);
    let mut chroma = Chroma::C420;
    let mut range: Option<bool> = None;
    for word in words {
        let (tag, value) = word.split_at(1);
        match tag {
            "W" => width = value.parse::<u32>().ok(),
            "H" => height = value.parse::<u32>().ok(),
            "F" => {
                fps = value.split_once(':').and_then(|(n, d)| {
                    let (n, d) = (n.parse::<f64>().ok()?, d.parse::<f64>().ok()?);
                    (n > 0.0 && d > 0.0).then_some(n / d)
                })
            }
            "C" => {
                chroma = match value {
                    "420jpeg" | "420paldv" | "420mpeg2" | "420" => Chroma::C420,
                    "422" => Chroma::C422,
                    "444" => Chroma::C444,
                    "mono" => Chroma::Mono,
                    other => {
                        return Err(bad(format!(
                        "colour space {other} is not supported (8-bit 420, 422, 444 or mono are)"
                    )))
                    }
                }
            }
            "I" if value != "p" && value != "?" => {
                return Err(bad(format!("interlaced video (I{value}) is not supported")));
            }
            "X" => match value {
                "COLORRANGE=FULL" => range = Some(true),
                "COLORRANGE=LIMITED" => range = Some(false),
                _ => {}
            },
            _ => {}
        }
    }
    let valid = |side: Option<u32>| side.filter(|s| (1..=MAX_SIDE).contains(s));
    let (Some(width), Some(height)) = (valid(width), valid(height)) else {
        return Err(bad(format!("the header lacks a width and height within 1..={MAX_SIDE}")));
    };
    let full_range = range.unwrap_or(chroma == Chroma::Mono);
    Ok(Y4mHeader { width, height, fps, chroma, full_range })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(header: &str, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("{header}\n").into_bytes();
        for f in frames {
            out.extend_from_slice(b"FRAME\n");
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn reads_mono_frames_at_full_range() {
        let bytes =
            stream("YUV4MPEG2 W2 H2 F30:1 Cmono", &[vec![0, 50, 100, 255], vec![1, 2, 3, 4]]);
        let mut reader = Y4mReader::new(bytes.as_slice()).expect("header");
        assert_eq!(reader.header().fps, Some(30.0));
        let mut gray = Vec::new();
        assert!(reader.next_gray(&mut gray).expect("frame"));
        assert_eq!(gray, vec![0, 50, 100, 255]);
        assert!(reader.next_gray(&mut gray).expect("frame"));
        assert!(!reader.next_gray(&mut gray).expect("clean end"));
    }

    #[test]
    fn stretches_limited_range_420_luma_and_converts_gray_to_rgb() {
        // 2x2 frame: Y plane 16, 235, 126, 126; one U and one V sample at 128 (no colour).
        let bytes = stream(
            "YUV4MPEG2 W2 H2 F25:1 Ip A1:1 C420jpeg XYSCSS=420JPEG",
            &[vec![16, 235, 126, 126, 128, 128]],
        );
        let mut reader = Y4mReader::new(bytes.as_slice()).expect("header");
        assert!(!reader.header().full_range);
        let mut gray = Vec::new();
        reader.next_gray(&mut gray).expect("frame");
        assert_eq!(&gray[..2], &[0, 255]);
        assert_eq!(gray[2], 128);

        let mut reader = Y4mReader::new(bytes.as_slice()).expect("header");
        let mut rgb = Vec::new();
        reader.next_rgb(&mut rgb).expect("frame");
        assert_eq!(&rgb[..6], &[0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn converts_saturated_red() {
        // Full-range BT.601 red (255, 0, 0): Y 76, U 85, V 255 (rounded).
        let bytes = stream("YUV4MPEG2 W1 H1 C444 XCOLORRANGE=FULL", &[vec![76, 85, 255]]);
        let mut reader = Y4mReader::new(bytes.as_slice()).expect("header");
        let mut rgb = Vec::new();
        reader.next_rgb(&mut rgb).expect("frame");
        assert!(rgb[0] >= 253 && rgb[1] <= 2 && rgb[2] <= 2, "{rgb:?}");
    }

    #[test]
    fn damaged_streams_are_errors() {
        assert!(matches!(Y4mReader::new(&b""[..]), Err(Y4mError::Header(_))));
        assert!(matches!(Y4mReader::new(&b"P6 2 2 255\n"[..]), Err(Y4mError::Header(_))));
        assert!(Y4mReader::new(&b"YUV4MPEG2 W0 H2\n"[..]).is_err());
        assert!(Y4mReader::new(&b"YUV4MPEG2 W2 H2 C420p10\n"[..]).is_err());
        assert!(Y4mReader::new(&b"YUV4MPEG2 W2 H2"[..]).is_err(), "no end of line");
        let huge = vec![b'Y'; 5000];
        assert!(Y4mReader::new(huge.as_slice()).is_err());

        let mut truncated = stream("YUV4MPEG2 W2 H2 Cmono", &[vec![1, 2, 3, 4]]);
        truncated.extend_from_slice(b"FRAME\n\x01\x02");
        let mut reader = Y4mReader::new(truncated.as_slice()).expect("header");
        let mut gray = Vec::new();
        assert!(reader.next_gray(&mut gray).expect("first frame"));
        let err = reader.next_gray(&mut gray).unwrap_err();
        assert!(err.to_string().contains("frame 1: truncated"), "{err}");

        let garbage = stream("YUV4MPEG2 W2 H2 Cmono", &[])
            .into_iter()
            .chain(b"JUNK\n".iter().copied())
            .collect::<Vec<_>>();
        let mut reader = Y4mReader::new(garbage.as_slice()).expect("header");
        assert!(reader.next_gray(&mut gray).unwrap_err().to_string().contains("expected a FRAME"));
    }
}
