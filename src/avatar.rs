//! Draws the picture an agent without an avatar gets: the first letter of its name in white
//! on a colour of its own, so agents are told apart at a glance in a room list.
//!
//! Invariants: pure and deterministic (no I/O, no clock, no randomness, no system fonts);
//! equal [`Look`]s render to byte-identical PNGs, so [`content_hash`] of the bytes can key
//! "already uploaded as mxc://...". An agent's colour depends on its id alone and never
//! changes; its glyph changes only when a rename changes the first letter.
//!
//! Why `ab_glyph` + `png`: both are maintained and pure Rust, `ab_glyph` rasterises one
//! anti-aliased glyph from TrueType outlines and `png` encodes raw RGB rows; the `image`
//! crate would pull in every codec for the one format we write.
//!
//! Font: `assets/avatar-font.ttf`, a subset of DejaVu Sans Bold 2.37 under the Bitstream
//! Vera and Arev licences (DejaVu's changes are public domain; the text is in
//! `assets/avatar-font-LICENSE.txt`). It keeps only the glyphs [`look`] can pick: the
//! capitals of Basic Latin, Latin-1, Latin Extended-A, Greek and Cyrillic, the ASCII digits
//! and the fallback `#`; 25.7 KB instead of 709 KB. Made with fontTools 4.68:
//!
//! ```sh
//! U=$(python3 -c "r=[*range(32,127),*range(160,384),*range(880,1120)];up=lambda c:c.upper()[0];print(','.join(sorted({'%04X'%ord(up(c)) for c in map(chr,r) if c.isalnum() and (up(c).isupper() or up(c) in '0123456789')}|{'0023'})))")
//! pyftsubset DejaVuSans-Bold.ttf --unicodes="$U" --layout-features= --no-hinting \
//!     --name-IDs='*' --name-languages='*' --output-file=assets/avatar-font.ttf
//! ```
//!
//! A picture is [`SIZE`]² RGB, 0.8 to 4.9 KB (2.7 KB median over every glyph): sharp in a
//! profile view on a dense screen, and homeservers thumbnail it for room lists. Bytes are
//! stable for a given build; a new `png` or `ab_glyph` release may change them, which costs
//! one re-upload per agent (the hash differs), never a wrong picture.

use std::fmt::Write as _;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, Glyph, GlyphId, OutlinedGlyph, PxScale, PxScaleFactor, point};
use sha2::{Digest, Sha256};

/// Width and height of every avatar, in pixels.
pub const SIZE: u32 = 256;

/// Shown when a name has no alphanumeric character, or its first one has no glyph here
/// (CJK, emoji-only names, scripts beyond Latin, Greek and Cyrillic).
pub const FALLBACK: char = '#';

/// Font size relative to [`SIZE`]: puts the cap height of 'H' at half the picture.
const EM: f32 = 0.68;

/// Longest ink diagonal relative to [`SIZE`]: clients crop avatars to a circle, so a wide
/// or accented glyph is shrunk to stay clear of its edge. Of the ASCII capitals only 'W'
/// is, so a row of avatars looks even.
const MAX_DIAGONAL: f32 = 0.8;

/// Background channels: HSL with fixed saturation and lightness (S = 0.65, L = 0.33) is a
/// hue's brightest channel at `HIGH` and darkest at `LOW`, the third ramping between them.
/// Yellow, the brightest hue, still gives white text a WCAG contrast of 3.6:1 (3:1 is the
/// bar for large text).
const HIGH: u8 = 140;
const LOW: u8 = 30;

static FONT_BYTES: &[u8] = include_bytes!("../assets/avatar-font.ttf");

/// What a generated avatar shows; two agents with equal Looks get byte-identical PNGs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Look {
    pub glyph: char,
    pub colour: [u8; 3],
}

/// The look of agent `agent_id` named `name`: the name's first alphanumeric character,
/// upper-cased, if the font has it (else [`FALLBACK`]), on a colour derived from the id.
pub fn look(agent_id: &str, name: &str) -> Look {
    Look {
        glyph: glyph_for(name),
        colour: colour_for(agent_id),
    }
}

/// Encodes `look` as a [`SIZE`]² RGB PNG: the glyph in white, anti-aliased, its ink
/// bounding box centred. A glyph the font lacks (from a stored Look) is drawn as
/// [`FALLBACK`].
pub fn render(look: Look) -> Vec<u8> {
    let [r, g, b] = look.colour;
    let mut pixels = [r, g, b].repeat((SIZE * SIZE) as usize);
    let glyph = outlined(look.glyph);
    let bounds = glyph.px_bounds();
    glyph.draw(|x, y, coverage| {
        let (x, y) = (
            bounds.min.x as i64 + x as i64,
            bounds.min.y as i64 + y as i64,
        );
        if !(0..SIZE as i64).contains(&x) || !(0..SIZE as i64).contains(&y) {
            return;
        }
        let at = (y as usize * SIZE as usize + x as usize) * 3;
        let coverage = coverage.clamp(0.0, 1.0);
        for channel in &mut pixels[at..at + 3] {
            let under = f32::from(*channel);
            *channel = (under + (255.0 - under) * coverage).round() as u8;
        }
    });
    encode(&pixels)
}

/// The key under which the upload of the image fetched from `url` is remembered.
pub fn url_key(url: &str) -> String {
    format!("url:{url}")
}

/// Lower-case hex SHA-256 of `bytes`: the key under which a rendered avatar's upload is
/// remembered (and the digest of a transaction's event ids).
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(FONT_BYTES).expect("the embedded font parses (tested)")
    })
}

/// `c`'s glyph in the embedded font, if it has one (id 0 is the "missing" glyph).
fn glyph_id(c: char) -> Option<GlyphId> {
    let id = font().glyph_id(c);
    (id.0 != 0).then_some(id)
}

fn glyph_for(name: &str) -> char {
    name.chars()
        .find(|c| c.is_alphanumeric())
        .and_then(|c| c.to_uppercase().next())
        .filter(|&c| glyph_id(c).is_some())
        .unwrap_or(FALLBACK)
}

/// `c`'s outline scaled and positioned so its ink box is centred in the picture.
fn outlined(c: char) -> OutlinedGlyph {
    let font = font();
    let (id, outline) = [c, FALLBACK]
        .into_iter()
        .find_map(|c| {
            let id = glyph_id(c)?;
            Some((id, font.outline(id)?))
        })
        .expect("the embedded font outlines the fallback glyph (tested)");
    let units_per_em = font
        .units_per_em()
        .expect("the embedded font has an em size");
    // Font units, y up; ab_glyph stores the top in `min.y` and the bottom in `max.y`.
    let (left, right) = (outline.bounds.min.x, outline.bounds.max.x);
    let (top, bottom) = (outline.bounds.min.y, outline.bounds.max.y);
    let size = SIZE as f32;
    let mut px_per_unit = EM * size / units_per_em;
    let diagonal = (right - left).hypot(top - bottom) * px_per_unit;
    if diagonal > MAX_DIAGONAL * size {
        px_per_unit *= MAX_DIAGONAL * size / diagonal;
    }
    let position = point(
        size / 2.0 - (left + right) / 2.0 * px_per_unit,
        size / 2.0 + (top + bottom) / 2.0 * px_per_unit,
    );
    let glyph = Glyph {
        id,
        scale: PxScale::from(px_per_unit * font.height_unscaled()),
        position,
    };
    let factor = PxScaleFactor {
        horizontal: px_per_unit,
        vertical: px_per_unit,
    };
    OutlinedGlyph::new(glyph, outline, factor)
}

fn encode(pixels: &[u8]) -> Vec<u8> {
    let mut png = Vec::with_capacity(4096);
    let mut encoder = png::Encoder::new(&mut png, SIZE, SIZE);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    // Rows are mostly one flat colour, which deflate matches best unfiltered: 10 % smaller
    // than adaptive filtering over every glyph.
    encoder.set_filter(png::Filter::NoFilter);
    // Writing whole, well-formed rows of a fixed size into a Vec cannot fail.
    let mut writer = encoder.write_header().expect("PNG header into a Vec");
    writer
        .write_image_data(pixels)
        .expect("SIZE² RGB rows into a Vec");
    writer.finish().expect("PNG end into a Vec");
    png
}

/// The hue comes from FNV-1a 64 of the id: written out here, unlike std's `DefaultHasher`,
/// it is the same in every release, so an agent keeps its colour.
fn colour_for(agent_id: &str) -> [u8; 3] {
    hue_to_rgb((fnv1a64(agent_id.as_bytes()) % 360) as u32)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// HSL to RGB at the fixed saturation and lightness, in integers so it cannot drift.
fn hue_to_rgb(hue: u32) -> [u8; 3] {
    let span = u32::from(HIGH - LOW);
    let step = ((span * (hue % 60) + 30) / 60) as u8;
    let (rising, falling) = (LOW + step, HIGH - step);
    match hue / 60 % 6 {
        0 => [HIGH, rising, LOW],
        1 => [falling, HIGH, LOW],
        2 => [LOW, HIGH, rising],
        3 => [LOW, falling, HIGH],
        4 => [rising, LOW, HIGH],
        _ => [HIGH, LOW, falling],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const WHITE: [u8; 3] = [255, 255, 255];

    fn decode(png_bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().expect("a PNG header");
        let mut pixels = vec![0; reader.output_buffer_size().expect("a sane size")];
        let info = reader.next_frame(&mut pixels).expect("PNG image data");
        pixels.truncate(info.buffer_size());
        (info, pixels)
    }

    fn pixel(pixels: &[u8], x: u32, y: u32) -> [u8; 3] {
        let at = ((y * SIZE + x) * 3) as usize;
        [pixels[at], pixels[at + 1], pixels[at + 2]]
    }

    fn contrast_with_white(colour: [u8; 3]) -> f64 {
        let linear = |c: u8| {
            let c = f64::from(c) / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        let [r, g, b] = colour.map(linear);
        let luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b;
        1.05 / (luminance + 0.05)
    }

    #[test]
    fn should_decode_as_a_size_square_rgb_png_with_the_background_and_a_white_glyph() {
        let look = look("agent-1", "Ada");
        let (info, pixels) = decode(&render(look));
        assert_eq!((info.width, info.height), (SIZE, SIZE));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        for (x, y) in [(0, 0), (SIZE - 1, 0), (0, SIZE - 1), (SIZE - 1, SIZE - 1)] {
            assert_eq!(pixel(&pixels, x, y), look.colour, "corner ({x}, {y})");
        }
        let middle = SIZE / 4..SIZE * 3 / 4;
        let white = middle
            .clone()
            .flat_map(|y| middle.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| pixel(&pixels, x, y) == WHITE)
            .count();
        assert!(white > (SIZE * SIZE / 40) as usize, "{white} white pixels");
    }

    #[test]
    fn should_render_the_same_bytes_for_the_same_look() {
        let look = look("agent-1", "Ada");
        assert_eq!(render(look), render(look));
        assert_eq!(render(look), render(super::look("agent-1", "Ada")));
        assert_eq!(
            content_hash(&render(look)),
            content_hash(&render(look)),
            "the upload key is stable"
        );
    }

    #[test]
    fn should_render_different_bytes_for_a_different_glyph_or_colour() {
        let a = look("agent-1", "Ada");
        let b = Look { glyph: 'B', ..a };
        let other_colour = Look {
            colour: [a.colour[0] ^ 1, a.colour[1], a.colour[2]],
            ..a
        };
        assert_ne!(render(a), render(b));
        assert_ne!(render(a), render(other_colour));
    }

    #[test]
    fn should_centre_the_glyph_by_its_ink_box() {
        for glyph in ['A', 'I', 'W', 'É', 'Ж', '7', FALLBACK] {
            let (_, pixels) = decode(&render(Look {
                glyph,
                colour: [0, 0, 0],
            }));
            let lit: Vec<(u32, u32)> = (0..SIZE)
                .flat_map(|y| (0..SIZE).map(move |x| (x, y)))
                .filter(|&(x, y)| pixel(&pixels, x, y)[0] > 0)
                .collect();
            let centre = |axis: fn(&(u32, u32)) -> u32| {
                let (lo, hi) = (lit.iter().map(axis).min(), lit.iter().map(axis).max());
                (lo.unwrap() + hi.unwrap() + 1) as f32 / 2.0
            };
            let (x, y) = (centre(|p| p.0), centre(|p| p.1));
            let half = SIZE as f32 / 2.0;
            assert!((x - half).abs() <= 1.0, "{glyph}: x centre {x}");
            assert!((y - half).abs() <= 1.0, "{glyph}: y centre {y}");
        }
    }

    fn every_glyph() -> Vec<char> {
        let mut glyphs: Vec<char> = font().codepoint_ids().map(|(_, c)| c).collect();
        glyphs.sort_unstable();
        glyphs
    }

    #[test]
    fn should_keep_every_glyph_inside_the_circle_clients_crop_to() {
        let (centre, radius) = (SIZE as f32 / 2.0, SIZE as f32 / 2.0 - 2.0);
        for glyph in every_glyph() {
            let outlined = outlined(glyph);
            let min = outlined.px_bounds().min;
            outlined.draw(|x, y, coverage| {
                let (x, y) = (min.x + x as f32 + 0.5, min.y + y as f32 + 0.5);
                let distance = (x - centre).hypot(y - centre);
                assert!(
                    coverage == 0.0 || distance <= radius,
                    "{glyph} has ink at ({x}, {y}), {distance} from the centre"
                );
            });
        }
    }

    #[test]
    fn should_encode_in_500_bytes_to_8_kb() {
        // Every glyph measured in a release build: 0.8 KB ('I') to 4.9 KB ('Ŵ'). Encoding all
        // of them takes seconds in a debug build, so this takes the extremes and ASCII.
        let colour = colour_for("agent-1");
        let extremes = ['I', 'Ι', 'І', 'Ŵ', 'Ϣ', 'Ø', 'Õ', 'W', FALLBACK];
        for glyph in ('A'..='Z').chain('0'..='9').chain(extremes) {
            let size = render(Look { glyph, colour }).len();
            assert!((500..=8 * 1024).contains(&size), "{glyph}: {size} bytes");
        }
    }

    #[test]
    fn should_use_a_leading_digit() {
        assert_eq!(look("a", "7th agent").glyph, '7');
        assert_eq!(look("a", "0").glyph, '0');
    }

    #[test]
    fn should_upper_case_a_lower_case_first_letter() {
        assert_eq!(look("a", "letta").glyph, 'L');
        assert_eq!(look("a", "Letta").glyph, 'L');
    }

    #[test]
    fn should_upper_case_accented_greek_and_cyrillic_letters() {
        assert_eq!(look("a", "édith").glyph, 'É');
        assert_eq!(look("a", "Øystein").glyph, 'Ø');
        assert_eq!(look("a", "łukasz").glyph, 'Ł');
        assert_eq!(look("a", "ÿves").glyph, 'Ÿ');
        assert_eq!(look("a", "ωmega").glyph, 'Ω');
        assert_eq!(look("a", "жанна").glyph, 'Ж');
        // 'ß' upper-cases to "SS": the first char of it.
        assert_eq!(look("a", "ßeta").glyph, 'S');
    }

    #[test]
    fn should_skip_leading_spaces_and_punctuation() {
        assert_eq!(look("a", "  _bob").glyph, 'B');
        assert_eq!(look("a", "@agent:example.org").glyph, 'A');
        // An emoji is not alphanumeric, so a letter after it is used.
        assert_eq!(look("a", "🤖 helper").glyph, 'H');
    }

    #[test]
    fn should_fall_back_when_the_first_alphanumeric_has_no_glyph() {
        assert_eq!(look("a", "山田").glyph, FALLBACK);
        assert_eq!(look("a", "エージェント Bot").glyph, FALLBACK);
        assert_eq!(look("a", "عمر").glyph, FALLBACK);
        assert_eq!(look("a", "²nd").glyph, FALLBACK);
    }

    #[test]
    fn should_fall_back_for_an_emoji_only_empty_or_blank_name() {
        for name in ["🤖", "🤖🦀", "", " ", "\t\n ", "---", "!?"] {
            assert_eq!(look("a", name).glyph, FALLBACK, "{name:?}");
        }
    }

    #[test]
    fn should_draw_the_fallback_for_a_stored_glyph_the_font_lacks() {
        let colour = colour_for("agent-1");
        assert_eq!(
            render(Look {
                glyph: '山',
                colour
            }),
            render(Look {
                glyph: FALLBACK,
                colour
            })
        );
    }

    #[test]
    fn should_have_a_glyph_for_every_capital_and_digit_it_promises() {
        let promised = ('A'..='Z')
            .chain('0'..='9')
            .chain('À'..='Þ')
            .filter(|&c| c != '×')
            .chain(('Ā'..='ž').filter(|c| c.is_uppercase()))
            .chain(('Α'..='Ω').filter(|c| c.is_uppercase()))
            .chain('Ѐ'..='Я')
            .chain([FALLBACK]);
        for c in promised {
            let id = glyph_id(c).unwrap_or_else(|| panic!("no glyph for {c}"));
            assert!(font().outline(id).is_some(), "no outline for {c}");
        }
    }

    #[test]
    fn should_change_the_glyph_but_not_the_colour_on_a_rename() {
        let before = look("agent-1", "Ada");
        assert_eq!(look("agent-1", "Adele"), before, "same first letter");
        assert_eq!(look("agent-1", "ada"), before, "same letter, other case");
        let renamed = look("agent-1", "Bea");
        assert_eq!(renamed.colour, before.colour);
        assert_ne!(renamed.glyph, before.glyph);
        assert_ne!(render(renamed), render(before));
    }

    #[test]
    fn should_derive_the_colour_from_the_agent_id_only() {
        assert_eq!(
            look("agent-1", "Ada").colour,
            look("agent-1", "山田").colour
        );
        assert_ne!(look("agent-1", "Ada").colour, look("agent-2", "Ada").colour);
    }

    #[test]
    fn should_spread_colours_over_many_ids() {
        let colours: HashSet<[u8; 3]> = (0..100)
            .map(|i| look(&format!("agent-{i:08x}"), "Ada").colour)
            .collect();
        assert!(colours.len() >= 20, "{} distinct colours", colours.len());
    }

    #[test]
    fn should_keep_a_known_agents_colour() {
        // Pinned: a change here repaints every agent and re-uploads every avatar.
        assert_eq!(
            look("agent-3f2b8c1e-7d4a-4e59-9b0c-2a6f1d8e5c73", "Ada").colour,
            [30, 140, 135]
        );
    }

    #[test]
    fn should_hash_ids_with_fnv1a_64() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn should_give_white_text_at_least_3_to_1_contrast() {
        for i in 0..1000 {
            let colour = look(&format!("agent-{i}"), "Ada").colour;
            let contrast = contrast_with_white(colour);
            assert!(contrast >= 3.0, "{colour:?}: {contrast:.2}:1");
        }
        let worst = (0..360)
            .map(|hue| contrast_with_white(hue_to_rgb(hue)))
            .fold(f64::INFINITY, f64::min);
        assert!(worst >= 3.0, "worst hue: {worst:.2}:1");
    }

    #[test]
    fn should_walk_the_hue_circle_continuously() {
        for hue in 0..360 {
            let (a, b) = (hue_to_rgb(hue), hue_to_rgb((hue + 1) % 360));
            for channel in 0..3 {
                assert!(
                    a[channel].abs_diff(b[channel]) <= 2,
                    "{hue}: {a:?} -> {b:?}"
                );
                assert!((LOW..=HIGH).contains(&a[channel]));
            }
        }
        assert_eq!(hue_to_rgb(0), [HIGH, LOW, LOW]);
        assert_eq!(hue_to_rgb(120), [LOW, HIGH, LOW]);
        assert_eq!(hue_to_rgb(240), [LOW, LOW, HIGH]);
    }

    #[test]
    fn should_hash_content_as_lower_case_hex_sha256() {
        assert_eq!(
            content_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            content_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn should_serialize_a_look_as_glyph_and_colour() {
        let look = Look {
            glyph: 'É',
            colour: [1, 2, 3],
        };
        let json = serde_json::to_string(&look).unwrap();
        assert_eq!(json, r#"{"glyph":"É","colour":[1,2,3]}"#);
        assert_eq!(serde_json::from_str::<Look>(&json).unwrap(), look);
    }
}
