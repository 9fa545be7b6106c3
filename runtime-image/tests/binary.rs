//! The `kandle-runtime` binary: flags parse, the server comes up ready, serves, and exits
//! cleanly on SIGTERM. Uses the tiny random-weight llama from the shared fixtures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("KANDLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(
        dir.join("tiny/llama/config.json").is_file(),
        "fixtures not found at {}: check out shared/ beside the repository or set KANDLE_FIXTURES",
        dir.display()
    );
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 exchange, so that this test needs no client library.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out))
}

#[test]
fn the_binary_serves_a_model_and_exits_cleanly_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kandle-runtime"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--served-model-name",
            "tiny",
        ])
        .env("KANDLE_MODEL", fixtures().join("tiny/llama"))
        .env("KANDLE_SHUTDOWN_GRACE", "10s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some((200, _)) = http(port, "GET", "/ready", "") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not ready after 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"model":"tiny","prompt":"The weather today is","max_tokens":5,"temperature":0}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"completion_tokens\":5"), "{body}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
    assert!(
        http(port, "GET", "/health", "").is_none(),
        "still accepting connections after exit"
    );
}

#[test]
fn an_unsupported_device_is_refused_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_kandle-runtime"))
        .args(["serve", "--model", "/nonexistent", "--device", "cuda:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA build"), "{err}");
}
