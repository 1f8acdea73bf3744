//! Running the real `roony` binary in tests: a child killed on drop, waiting for a line in
//! its log file, and stopping it with SIGTERM.

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// A child process that is killed (and reaped) when dropped, so a failing test leaves no
/// server behind.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 60 s for a line containing `needle` in the file at `path`; returns the line.
pub fn wait_for(path: &std::path::Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {needle:?}; got:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The URL of a `… listening on http://…` line.
pub fn url_after(line: &str) -> String {
    line.split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

/// Sends SIGTERM and waits up to 20 s for the process to exit; returns its exit status.
pub fn stop(child: &mut Child) -> ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            return exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
