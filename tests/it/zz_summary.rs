//! The suite's last line about skips. libtest starts tests in name order, so this one
//! starts after every other test has; skips happen as a test begins, so once the counts
//! have stood still for a second they are final. (Tests still running may print their
//! `ok` after it; with `--test-threads=1` it is the last line before the result.)

use std::time::Duration;

use crate::support::skip;

#[test]
fn tests_skipped() {
    let mut last = skip::counts();
    let mut still = 0;
    // At most 10 s: 50 looks, 200 ms apart; done after 5 in a row without a change.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = skip::counts();
        if now == last {
            still += 1;
            if still == 5 {
                break;
            }
        } else {
            (last, still) = (now, 0);
        }
    }
    skip::print_summary();
}
