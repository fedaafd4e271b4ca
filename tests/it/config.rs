//! `Config::load` from a real file.

use std::path::Path;

use rampart::config::Config;

#[test]
fn unreadable_file_is_one_problem_at_0_0() {
    let err = Config::load(Path::new("/nonexistent/proxy.yaml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!((err.problems[0].line, err.problems[0].column), (0, 0));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/proxy.yaml:0:0: cannot read file")
    );
}
