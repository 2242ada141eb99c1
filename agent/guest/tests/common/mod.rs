//! Helpers shared by the integration tests: reading the guest's report lines.

#![allow(dead_code)]

use novacron_testguest::abi;

/// The value of `key=` in a report line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The first line starting with `prefix`, or a panic showing the whole output.
pub fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in output:\n{out}"))
}

/// Checks the report sequence common to every run that ends by `nc.stop_after_pages`:
/// ready, the first progress (pages=1), a passing verification, poweroff. Returns the
/// working-set size and the verified checksum.
pub fn check_stop_run(out: &str, stop_after: u64) -> (u64, u64) {
    let ready = line(out, "novacron-guest: ready ");
    let ws_pages: u64 = field(ready, "ws_pages").unwrap().parse().unwrap();
    assert!(ws_pages > 0, "{ready}");
    let first = line(out, "novacron-guest: progress ");
    assert_eq!(
        field(first, "pages"),
        Some("1"),
        "first progress line: {first}"
    );
    let verify = line(out, "novacron-guest: verify ");
    assert!(
        verify.starts_with("novacron-guest: verify ok "),
        "verification failed: {verify}\nfull output:\n{out}"
    );
    assert_eq!(field(verify, "pages"), Some(ws_pages.to_string().as_str()));
    assert_eq!(field(verify, "bad"), Some("0"));
    let checksum = field(verify, "checksum").unwrap();
    assert_eq!(Some(checksum), field(verify, "expected"));
    let last = out
        .lines()
        .rfind(|l| l.starts_with("novacron-guest: progress "))
        .unwrap();
    assert_eq!(field(last, "pages"), Some(stop_after.to_string().as_str()));
    assert_eq!(field(last, "checksum"), Some(checksum));
    assert!(
        out.lines().any(|l| l == "novacron-guest: poweroff"),
        "no poweroff line in output:\n{out}"
    );
    (ws_pages, u64::from_str_radix(checksum, 16).unwrap())
}

/// The checksum after `written` sequential page writes over `ws_pages` pages.
pub fn seq_checksum(seed: u64, ws_pages: u64, written: u64) -> u64 {
    (0..ws_pages)
        .map(|i| {
            let g = written / ws_pages + u64::from(i < written % ws_pages);
            abi::checksum_term_seeded(seed, i, g)
        })
        .fold(0u64, u64::wrapping_add)
}
