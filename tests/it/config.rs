//! `Config::load` from a real file.

use std::path::Path;

use rampart::config::Config;

#[test]
fn unreadable_file_is_one_problem_without_a_position() {
    let err = Config::load(Path::new("/nonexistent/proxy.yaml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!((err.problems[0].line, err.problems[0].column), (0, 0));
    assert!(
        err.to_string()
            .starts_with("cannot read /nonexistent/proxy.yaml: No such file")
    );
}

#[test]
fn a_file_on_disk_loads_and_names_itself_in_problems() {
    let dir = std::env::temp_dir().join(format!("rampart-it-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("proxy.yaml");
    std::fs::write(
        &good,
        "listeners:\n  - name: inbound\n    listen: 127.0.0.1:0\n    routes: [{upstream: backend}]\nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n",
    )
    .unwrap();
    let config = Config::load(&good).unwrap();
    assert_eq!(config.listeners[0].name, "inbound");
    assert!(
        config
            .summary()
            .contains("listener  inbound on 127.0.0.1:0")
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "listeners: []\nupstreams: {}\n").unwrap();
    let err = Config::load(&bad).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:1:12: listeners: ", bad.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
