// Text mutations shared by the fuzz tests of text formats (whet-data, whet-models, whet-train),
// included after tests/fuzz_harness.rs, whose `Rng` and `mutate` they use.

/// Fragments that matter to text formats: delimiters, quotes, escapes, line ends, a BOM,
/// numbers at the edges, and bytes that are not UTF-8.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"'",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b".",
    b"#",
    b"\n",
    b"\r\n",
    b"\r",
    b"\t",
    b" ",
    b"\0",
    "\u{feff}".as_bytes(),
    "é".as_bytes(),
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"null",
    b"true",
    b"[[",
    b"{}",
    b"[]",
    b"\"\"",
    b"-1",
    b"-0",
    b"0",
    b"1e999",
    b"-1e999",
    b"NaN",
    b"inf",
    b"4294967296",
    b"9007199254740993",
    b"18446744073709551615",
    b"18446744073709551616",
    b"340282366920938463463374607431768211456",
    b"\\u0000",
    b"\\ud800",
    b"\\uDFFF\\uD800",
];

/// One to three mutations of text: the byte-level ones of [`mutate`], or a [`TOKENS`]
/// fragment inserted, overwriting, or replacing a run of digits.
fn mutate_text(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len() + 1);
        let token = TOKENS[rng.below(TOKENS.len())];
        match rng.below(4) {
            0 => b = mutate(&b, rng, 0..b.len()),
            1 => {
                b.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + token.len()).min(b.len());
                b.splice(at..end, token.iter().copied());
            }
            _ => {
                // The next run of digits from `at`, replaced by a number at an edge.
                let Some(start) = b[at..].iter().position(u8::is_ascii_digit).map(|p| at + p)
                else {
                    continue;
                };
                let len = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
                let edge = rng.edge().to_string();
                b.splice(start..start + len, edge.bytes());
            }
        }
    }
    b
}
