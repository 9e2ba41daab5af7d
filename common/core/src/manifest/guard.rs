//! A cheap look at YAML text before the real parse, refusing what would make it
//! slow or huge: nesting deeper than [`MAX_NESTING`] (libyaml and yaml_serde take
//! time quadratic in the depth: a 240 KB manifest of `[[[[…` cost 81 s of CPU), and
//! anchors and aliases that would expand the document past
//! [`MAX_EXPANDED_BYTES`] ("billion laughs").
//!
//! The scan is one pass over the bytes, linear in the text, and allocates only
//! what its limits bound: a stack of at most [`MAX_NESTING`] block columns and at
//! most [`MAX_ANCHORS`] anchor names. It follows just enough YAML to tell
//! structure from text: quoted strings (also across lines), comments, plain
//! scalars (a `[` inside `a [b]` is text), block scalars (`|`, `>`: their lines are
//! text), flow collections (`[`, `{`) and block collections (indentation, `- `,
//! `? `). What it cannot tell apart it counts as structure, so that it errs towards
//! refusing only documents the real parser would find deep anyway.
//!
//! Block nesting is measured by indentation: a sequence written at its key's own
//! indentation (`key:\n- a`) counts once for both, so a document may nest up to
//! twice [`MAX_NESTING`] that way; either bound keeps the parse fast.

use std::collections::HashMap;

use super::ManifestError;

/// The deepest nesting accepted (block and flow collections together). A job
/// manifest needs about 8 levels.
pub const MAX_NESTING: usize = 64;
/// Most anchors (`&name`) defined in one file.
pub const MAX_ANCHORS: usize = 256;
/// Most aliases (`*name`) used in one file.
pub const MAX_ALIASES: usize = 256;
/// Most bytes a file may expand to once every alias is replaced by what it names
/// (an upper bound: an alias counts everything from its anchor to itself).
pub const MAX_EXPANDED_BYTES: u64 = 4 << 20;

/// Refuses `text` (named `file` in the error) when it nests deeper than
/// [`MAX_NESTING`] or its aliases go past [`MAX_ANCHORS`], [`MAX_ALIASES`] or
/// [`MAX_EXPANDED_BYTES`]. Run it before handing the text to a YAML parser.
pub fn check(file: &str, text: &str) -> Result<(), ManifestError> {
    Scanner::new(text)
        .run()
        .map_err(|r| r.into_error(file, text))
}

/// Why [`check`] refused a text, at which byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Nesting reached `depth` levels.
    TooDeep { at: usize, depth: usize },
    /// More than [`MAX_ANCHORS`] anchors.
    TooManyAnchors { at: usize },
    /// More than [`MAX_ALIASES`] aliases.
    TooManyAliases { at: usize },
    /// Expansion would pass [`MAX_EXPANDED_BYTES`].
    Expands { at: usize, bytes: u64 },
}

impl Refusal {
    fn into_error(self, file: &str, text: &str) -> ManifestError {
        let (at, message) = match self {
            Refusal::TooDeep { at, depth } => (
                at,
                format!(
                    "the document nests {depth} levels deep here, past the limit of \
                     {MAX_NESTING}; expected a manifest that nests at most {MAX_NESTING} \
                     collections (`[`, `{{`, indented blocks) inside each other"
                ),
            ),
            Refusal::TooManyAnchors { at } => (
                at,
                format!(
                    "more than {MAX_ANCHORS} anchors (`&name`) in one file; expected at \
                     most {MAX_ANCHORS}: write the values out instead"
                ),
            ),
            Refusal::TooManyAliases { at } => (
                at,
                format!(
                    "more than {MAX_ALIASES} aliases (`*name`) in one file; expected at \
                     most {MAX_ALIASES}: write the values out instead"
                ),
            ),
            Refusal::Expands { at, bytes } => (
                at,
                format!(
                    "the aliases (`*name`) would expand the file to at least {bytes} bytes, \
                     past the limit of {MAX_EXPANDED_BYTES}; expected aliases of small \
                     anchored values that do not nest aliases many times over"
                ),
            ),
        };
        let at = at.min(text.len());
        let before = text.get(..at).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before
            .get(line_start..)
            .map_or(1, |s| s.chars().count() + 1);
        ManifestError {
            file: file.to_string(),
            line: Some(line),
            column: Some(column),
            path: String::new(),
            message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

struct Scanner<'a> {
    text: &'a str,
    /// Columns of the open block collections, strictly increasing.
    block: Vec<usize>,
    /// Open flow collections.
    flow: usize,
    /// An open quoted scalar (it may span lines).
    quote: Option<Quote>,
    /// Inside a block scalar whose header line had this indentation: its lines
    /// are text as long as they are indented deeper (or blank).
    block_scalar: Option<usize>,
    /// Anchors of the current document: name → expanded offset where defined.
    anchors: HashMap<&'a str, u64>,
    anchors_seen: usize,
    aliases_seen: usize,
    /// Bytes added so far by replacing aliases with what they name.
    expansion: u64,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Scanner<'a> {
        Scanner {
            text,
            block: Vec::new(),
            flow: 0,
            quote: None,
            block_scalar: None,
            anchors: HashMap::new(),
            anchors_seen: 0,
            aliases_seen: 0,
            expansion: 0,
        }
    }

    fn run(mut self) -> Result<(), Refusal> {
        let text = self.text;
        let mut start = if text.starts_with('\u{feff}') { 3 } else { 0 };
        while start < text.len() {
            let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let line = &text[start..end];
            let line = line.strip_suffix('\r').unwrap_or(line);
            self.line(line.as_bytes(), start)?;
            start = end + 1;
        }
        Ok(())
    }

    /// One line, without its end; `base` is the byte offset of its start.
    fn line(&mut self, b: &[u8], base: usize) -> Result<(), Refusal> {
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let blank = b[indent..].iter().all(|&c| c == b' ' || c == b'\t');
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        let mut after_value = false;
        if self.quote.is_none() && self.flow == 0 {
            if blank || b[indent] == b'#' {
                return Ok(());
            }
            if indent == 0 && b[0] == b'%' {
                return Ok(()); // a directive
            }
            if indent == 0 && (marker(b, b"---") || marker(b, b"...")) {
                // A new document: nothing stays open, and its anchors are new.
                self.block.clear();
                self.anchors.clear();
                i = 3;
            } else {
                while self.block.last().is_some_and(|&c| c >= indent) {
                    self.block.pop();
                }
                i = indent;
            }
        }
        let mut at_start = true;
        let mut plain = false;
        while i < b.len() {
            let c = b[i];
            if let Some(q) = self.quote {
                match (q, c) {
                    (Quote::Double, b'\\') => i += 1,
                    (Quote::Double, b'"') => self.quote = None,
                    (Quote::Single, b'\'') if b.get(i + 1) == Some(&b'\'') => i += 1,
                    (Quote::Single, b'\'') => self.quote = None,
                    _ => {}
                }
                i += 1;
                continue;
            }
            let next_blank = b.get(i + 1).is_none_or(|&n| n == b' ' || n == b'\t');
            let prev_blank = i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t';
            if plain {
                match c {
                    b'#' if prev_blank => return Ok(()),
                    b':' if next_blank => {
                        plain = false;
                        at_start = true;
                        after_value = self.flow == 0;
                    }
                    b',' | b'[' | b']' | b'{' | b'}' if self.flow > 0 => {
                        plain = false;
                        at_start = true;
                        continue; // the indicator is handled below
                    }
                    _ => {}
                }
                i += 1;
                continue;
            }
            match c {
                b' ' | b'\t' => at_start = true,
                b'#' if prev_blank => return Ok(()),
                b'[' | b'{' if at_start || self.flow > 0 => {
                    self.flow += 1;
                    self.depth_ok(base + i)?;
                    at_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    at_start = false;
                }
                b',' if self.flow > 0 => at_start = true,
                b'\'' | b'"' if at_start => {
                    if self.flow == 0 && !after_value {
                        self.open_block(i, base)?;
                    }
                    self.quote = Some(if c == b'"' {
                        Quote::Double
                    } else {
                        Quote::Single
                    });
                    at_start = false;
                }
                b'&' | b'*' | b'!' if at_start => {
                    let name_start = i + 1;
                    let mut j = name_start;
                    while j < b.len()
                        && !matches!(b[j], b' ' | b'\t')
                        && !(self.flow > 0 && matches!(b[j], b',' | b'[' | b']' | b'{' | b'}'))
                    {
                        j += 1;
                    }
                    let name = &self.text[base + name_start..base + j];
                    match c {
                        b'&' => self.anchor(name, base + i)?,
                        b'*' => {
                            if self.flow == 0 && !after_value {
                                self.open_block(i, base)?;
                            }
                            self.alias(name, base + i)?;
                        }
                        _ => {} // a tag
                    }
                    i = j;
                    at_start = true;
                    continue;
                }
                b'-' | b'?' | b':' if at_start && next_blank => {
                    if self.flow == 0 {
                        if c == b':' {
                            after_value = true;
                        } else if !after_value {
                            self.open_block(i, base)?;
                        }
                    }
                    at_start = true;
                }
                b'|' | b'>' if at_start && self.flow == 0 => {
                    self.block_scalar = Some(indent);
                    return Ok(());
                }
                _ => {
                    if self.flow == 0 && !after_value {
                        self.open_block(i, base)?;
                    }
                    plain = true;
                    at_start = false;
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// A node starts at column `col` of the line at `base` in block context.
    fn open_block(&mut self, col: usize, base: usize) -> Result<(), Refusal> {
        if self.block.last().is_none_or(|&top| col > top) {
            self.block.push(col);
            self.depth_ok(base + col)?;
        }
        Ok(())
    }

    fn depth_ok(&self, at: usize) -> Result<(), Refusal> {
        let depth = self.block.len() + self.flow;
        if depth > MAX_NESTING {
            return Err(Refusal::TooDeep { at, depth });
        }
        Ok(())
    }

    fn anchor(&mut self, name: &'a str, at: usize) -> Result<(), Refusal> {
        self.anchors_seen += 1;
        if self.anchors_seen > MAX_ANCHORS {
            return Err(Refusal::TooManyAnchors { at });
        }
        let expanded = at as u64 + self.expansion;
        self.anchors.insert(name, expanded);
        Ok(())
    }

    fn alias(&mut self, name: &str, at: usize) -> Result<(), Refusal> {
        self.aliases_seen += 1;
        if self.aliases_seen > MAX_ALIASES {
            return Err(Refusal::TooManyAliases { at });
        }
        // An unknown anchor is the parser's error to report.
        let Some(&defined) = self.anchors.get(name) else {
            return Ok(());
        };
        let here = at as u64 + self.expansion;
        self.expansion = self.expansion.saturating_add(here.saturating_sub(defined));
        let bytes = (self.text.len() as u64).saturating_add(self.expansion);
        if bytes > MAX_EXPANDED_BYTES {
            return Err(Refusal::Expands { at, bytes });
        }
        Ok(())
    }
}

/// Whether the line is the document marker `m` (`---`, `...`), alone or followed
/// by a blank.
fn marker(b: &[u8], m: &[u8]) -> bool {
    b.starts_with(m) && b.get(3).is_none_or(|&c| c == b' ' || c == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> ManifestError {
        check("deep.yaml", text).expect_err("refused")
    }

    const JOB: &str = "\
apiVersion: novacron.io/v1
kind: Job
metadata:
  name: web # the name
  labels: {team: \"a [b\", tier: 'c {d'}
spec:
  type: service
  replicas: 2
  task:
    image: nginx:1.27
    command: [\"sh\", \"-c\", \"echo '[[[[' && sleep 1\"]
    env:
      - name: A
        value: \"x: [y\"
  placement:
    constraints:
      - {key: zone, operator: In, values: [a, b]}
";

    #[test]
    fn a_legit_manifest_passes() {
        check("job.yaml", JOB).expect("a job manifest is fine");
        let twice = format!("{JOB}---\n{JOB}");
        check("jobs.yaml", &twice).expect("two documents are fine");
    }

    #[test]
    fn brackets_inside_strings_comments_and_block_scalars_are_text() {
        let brackets = "[".repeat(10_000);
        let text = format!(
            "a: \"{brackets}\"\nb: '{brackets}'\n# {brackets}\nc: x {brackets}\nd: |\n  {brackets}\n  {brackets}\ne: >-\n    {brackets}\nf: \"multi\n  line {brackets}\n  \"\ng: it's [fine] {brackets}\n"
        );
        check("text.yaml", &text).expect("brackets in text are not structure");
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_place() {
        let text = format!("a: {}1{}\n", "[".repeat(100), "]".repeat(100));
        let e = refused(&text);
        assert_eq!(e.line, Some(1));
        // `a` opens level 1, then 64 brackets: the 64th is the 65th level.
        assert_eq!(e.column, Some(4 + 63));
        assert!(e.message.contains("65 levels deep"), "{e}");
        assert!(
            e.message.contains(&format!("limit of {MAX_NESTING}")),
            "{e}"
        );
        let braces = format!("{}\n", "{a: ".repeat(200));
        assert!(refused(&braces).message.contains("levels deep"));
    }

    #[test]
    fn nesting_at_the_limit_passes() {
        let text = format!("{}1{}\n", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        check("ok.yaml", &text).expect("at the limit");
        let over = format!(
            "{}1{}\n",
            "[".repeat(MAX_NESTING + 1),
            "]".repeat(MAX_NESTING + 1)
        );
        refused(&over);
    }

    #[test]
    fn deep_flow_across_lines_is_refused() {
        let text = "[\n".repeat(1000);
        assert_eq!(refused(&text).line, Some(MAX_NESTING + 1));
    }

    #[test]
    fn deep_block_indentation_is_refused() {
        let mut text = String::new();
        for d in 0..200 {
            text.push_str(&" ".repeat(d));
            text.push_str("k:\n");
        }
        let e = refused(&text);
        assert_eq!(e.line, Some(MAX_NESTING + 1), "{e}");
        assert_eq!(e.column, Some(MAX_NESTING + 1), "{e}");
    }

    #[test]
    fn deep_block_sequences_on_one_line_are_refused() {
        let text = format!("{}x\n", "- ".repeat(100));
        refused(&text);
        let nested = (0..100)
            .map(|d| format!("{}- k:\n", "  ".repeat(d)))
            .collect::<String>();
        refused(&nested);
    }

    #[test]
    fn siblings_and_dedents_do_not_add_up() {
        let mut text = String::new();
        for _ in 0..2000 {
            text.push_str("a:\n  b:\n    c: [1, {d: 2}]\n  e:\n  - f\n  - - g\n");
        }
        check("wide.yaml", &text).expect("wide, not deep");
    }

    #[test]
    fn billion_laughs_is_refused() {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let mut prev = 'a';
        for name in ['b', 'c', 'd', 'e', 'f', 'g', 'h', 'i'] {
            text.push_str(&format!(
                "{name}: &{name} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            ));
            prev = name;
        }
        let e = refused(&text);
        assert!(e.message.contains("expand"), "{e}");
        assert!(e.line.is_some_and(|l| l <= 9), "{e}");
    }

    #[test]
    fn too_many_aliases_are_refused() {
        let mut text = String::from("a: &a 1\nb:\n");
        for _ in 0..=MAX_ALIASES {
            text.push_str("- *a\n");
        }
        assert!(refused(&text).message.contains("aliases"));
        let anchors = (0..=MAX_ANCHORS)
            .map(|i| format!("k{i}: &x{i} 1\n"))
            .collect::<String>();
        assert!(refused(&anchors).message.contains("anchors"));
    }

    #[test]
    fn a_few_small_aliases_pass() {
        let text = "\
env: &env
  - {name: A, value: \"1\"}
spec:
  task:
    env: *env
  other:
    env: *env
url: http://x/*y&z
glob: '*.example.com'
";
        check("alias.yaml", text).expect("small aliases are fine");
    }

    #[test]
    fn anchors_end_with_their_document() {
        let text = "a: &a [1]\n---\nb: *a\n";
        check("docs.yaml", text).expect("an unknown alias is the parser's error");
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        for text in [
            "",
            "\n",
            "\u{feff}a: 1",
            "\"unterminated",
            "'",
            "]]]]}}}",
            "&",
            "*",
            "- ",
            "a: |",
            "a: \"\\",
            "\r\n\r\n",
            "é: [ü, {ö: ß}]",
            "---",
            "--- [a]\n...\n",
            "%YAML 1.2\n---\na: 1",
        ] {
            let _ = check("odd.yaml", text);
        }
    }

    #[test]
    fn errors_count_columns_in_characters() {
        let text = format!("é: {}\n", "[".repeat(100));
        let e = refused(&text);
        assert_eq!(e.column, Some(3 + 64), "{e}");
    }

    proptest::proptest! {
        /// Any text of YAML's structural characters: no panic, and a refusal
        /// points inside the text.
        #[test]
        fn any_text_is_scanned_without_panic(
            chars in proptest::collection::vec(
                proptest::sample::select(vec![
                    '[', ']', '{', '}', ' ', '\n', '\r', '-', ':', '?', '#', '\'', '"', '&', '*',
                    '!', 'a', '|', '>', ',', '\\', '\t', 'é', '%', '.',
                ]),
                0..3000,
            )
        ) {
            let text: String = chars.into_iter().collect();
            if let Err(e) = check("p.yaml", &text) {
                let lines = text.split('\n').count();
                proptest::prop_assert!(e.line.is_some_and(|l| l >= 1 && l <= lines), "{}", e);
                proptest::prop_assert!(e.column.is_some_and(|c| c >= 1), "{}", e);
            }
        }

        /// Flow nesting is refused exactly past the limit, whatever wraps it.
        #[test]
        fn flow_nesting_is_refused_exactly_past_the_limit(depth in 1usize..200, key in "[a-z]{1,8}") {
            let text = format!("{key}:\n  - {}x{}\n", "[".repeat(depth), "]".repeat(depth));
            // The mapping and the sequence are two levels.
            let refused = check("p.yaml", &text).is_err();
            proptest::prop_assert_eq!(refused, depth + 2 > MAX_NESTING);
        }
    }
}
