//! [`DdpProcess`]: a real `ddp serve` process.

use serde_json::Value;

/// A real `ddp serve` process (for tests that kill it, and for benchmarks), on loopback ports
/// the system picks; killed and reaped when dropped.
pub struct DdpProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// `127.0.0.1:port` of the MQTT listener.
    pub mqtt: String,
    /// Every listener's address, by transport (`http`, `https`, `mqtt`, `mqtts`, `mqtt-ws`).
    pub listening: std::collections::HashMap<String, String>,
    /// The process id.
    pub pid: u32,
}

impl DdpProcess {
    /// Starts `bin serve` with its data in `data_dir`, the given admin key and `extra` flags, and
    /// waits until it logs that HTTP and MQTT are listening.
    pub fn start(
        bin: &std::path::Path,
        data_dir: &std::path::Path,
        admin_key: &str,
        extra: &[&str],
    ) -> Result<DdpProcess, String> {
        DdpProcess::start_wrapped(&[], bin, data_dir, admin_key, extra)
    }

    /// Like [`DdpProcess::start`], run through `wrapper` (a command and its arguments, e.g.
    /// `["prlimit", "--nofile=256:256"]`, that runs the rest of its command line).
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &std::path::Path,
        data_dir: &std::path::Path,
        admin_key: &str,
        extra: &[&str],
    ) -> Result<DdpProcess, String> {
        use std::io::BufRead;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let mut child = command
            .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--admin-key", admin_key])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut listening = std::collections::HashMap::new();
        loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                return Err("ddp serve exited before listening".into());
            };
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            if entry["message"] == "listening"
                && let (Some(transport), Some(addr)) = (entry["transport"].as_str(), entry["addr"].as_str())
            {
                listening.insert(transport.to_owned(), addr.to_owned());
            }
            if entry["message"] == "serving" {
                break;
            }
        }
        let (http, mqtt) = (listening.get("http").cloned(), listening.get("mqtt").cloned());
        // Keep draining the log so the server never blocks on a full pipe; pass on what it warns of.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && matches!(entry["level"].as_str(), Some("WARN" | "ERROR"))
                {
                    eprintln!("ddp serve: {line}");
                }
            }
        });
        let pid = child.id();
        Ok(DdpProcess {
            child,
            base: format!("http://{}", http.unwrap_or_default()),
            mqtt: mqtt.unwrap_or_default(),
            listening,
            pid,
        })
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DdpProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
