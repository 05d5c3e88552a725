//! `shoal backup DIR`: asks a running Shoal for a copy of every shard.
//!
//! It connects to the server like any client (the Unix socket if the config
//! has one, else TCP), authenticates if the config sets a password, and sends
//! `SHOAL.BACKUP <absolute DIR>`. The server does the copying (see the
//! net-daemon's `commands::backup`); meanwhile this command shows progress on
//! stderr by watching the shard files grow in DIR. When the server answers
//! with the manifest, it prints a summary.
//!
//! It never opens LMDB and never touches the data dir.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_shared::backup::{Manifest, MANIFEST_FILE, SHARD_FILE};
use shoal_shared::config::Config;

/// How often progress is shown while the server copies.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Largest reply line or bulk string this client accepts.
const MAX_REPLY_BYTES: usize = 256 << 20;

/// Runs `shoal backup DIR`.
pub fn run(config: &Config, dir: &Path) -> anyhow::Result<()> {
    let dir = absolute(dir)?;
    check_target(&dir)?;
    let Some(dir_text) = dir.to_str() else {
        bail!("backup directory {} is not a UTF-8 path", dir.display())
    };
    let mut connection = Connection::open(config)?;
    if let Some(password) = &config.client.requirepass {
        if let Value::Error(error) = connection.command(&[b"AUTH", password.as_bytes()])? {
            bail!("the server refused the password from the config: {error}");
        }
    }
    let started = Instant::now();
    eprintln!("backup: copying every shard into {}", dir.display());
    let (sender, receiver) = mpsc::channel();
    let request = [b"SHOAL.BACKUP".to_vec(), dir_text.as_bytes().to_vec()];
    std::thread::Builder::new()
        .name("backup-request".into())
        .spawn(move || {
            let args: Vec<&[u8]> = request.iter().map(Vec::as_slice).collect();
            let _ = sender.send(connection.command(&args));
        })
        .context("starting the request thread")?;
    let mut last_shown = Vec::new();
    let reply = loop {
        match receiver.recv_timeout(PROGRESS_EVERY) {
            Ok(reply) => break reply.context("reading the server's answer")?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let sizes = shard_sizes(&dir);
                if !sizes.is_empty() && sizes != last_shown {
                    eprintln!(
                        "backup: copied {} ({:.1} s)",
                        describe_sizes(&sizes),
                        started.elapsed().as_secs_f64()
                    );
                    last_shown = sizes;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the request thread stopped without an answer")
            }
        }
    };
    let text = match reply {
        Value::Bulk(Some(text)) => text,
        Value::Error(error) => bail!("the server refused the backup: {error}"),
        other => bail!("unexpected answer from the server: {}", other.describe()),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).context("decoding the manifest the server sent")?;
    for shard in &manifest.shards {
        eprintln!(
            "backup: shard-{}: {} copied, sha256 {}, done",
            shard.shard,
            human_bytes(shard.bytes),
            &shard.sha256[..16.min(shard.sha256.len())]
        );
    }
    let highest = manifest
        .commit_ids
        .iter()
        .map(|commit| commit.last_commit_id)
        .max()
        .unwrap_or(0);
    println!(
        "backup of {} shards ({} partitions, {}, highest commit id {highest}) written to {} in {:.1} s; \
         commit ids per partition are in {MANIFEST_FILE}",
        manifest.workers,
        manifest.partitions,
        human_bytes(manifest.total_bytes()),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `path` made absolute against the working directory (the server resolves nothing).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.components().collect());
    }
    let cwd = std::env::current_dir().context("reading the working directory")?;
    Ok(cwd.join(path).components().collect())
}

/// Refuses a target that exists and is not an empty directory (the server checks again).
fn check_target(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "backup directory {} exists and is not empty; choose a new one",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => {
            Err(error).with_context(|| format!("cannot use backup directory {}", dir.display()))
        }
    }
}

/// Sizes of the shard files written so far, by shard index.
fn shard_sizes(dir: &Path) -> Vec<(usize, u64)> {
    let mut sizes: Vec<(usize, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let index = name.to_str()?.strip_prefix("shard-")?.parse().ok()?;
            let bytes = std::fs::metadata(entry.path().join(SHARD_FILE)).ok()?.len();
            Some((index, bytes))
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

fn describe_sizes(sizes: &[(usize, u64)]) -> String {
    let total: u64 = sizes.iter().map(|(_, bytes)| bytes).sum();
    let each: Vec<String> = sizes
        .iter()
        .map(|(index, bytes)| format!("shard-{index} {}", human_bytes(*bytes)))
        .collect();
    format!("{} ({} in all)", each.join(", "), human_bytes(total))
}

/// `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A RESP2 reply.
#[derive(Debug)]
enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    /// A short description for error messages.
    fn describe(&self) -> String {
        match self {
            Value::Simple(text) => format!("status {text:?}"),
            Value::Error(text) => format!("error {text:?}"),
            Value::Integer(n) => format!("integer {n}"),
            Value::Bulk(None) | Value::Array(None) => "nil".into(),
            Value::Bulk(Some(bytes)) => format!("{} bytes of text", bytes.len()),
            Value::Array(Some(items)) => format!("an array of {}", items.len()),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.read(buf),
            Stream::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.write(buf),
            Stream::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(stream) => stream.flush(),
            Stream::Tcp(stream) => stream.flush(),
        }
    }
}

/// A blocking RESP2 connection to the server: enough for the admin commands.
struct Connection {
    reader: BufReader<Stream>,
}

impl Connection {
    /// Connects over the config's Unix socket, else its TCP listener.
    fn open(config: &Config) -> anyhow::Result<Connection> {
        let hint =
            "is shoal serve running with this config? (`shoal backup` copies a running server)";
        let stream = if let Some(socket) = &config.client.unix_socket {
            let socket = absolute(socket)?;
            Stream::Unix(UnixStream::connect(&socket).with_context(|| {
                format!(
                    "cannot connect to the Unix socket {}; {hint}",
                    socket.display()
                )
            })?)
        } else if let Some(mut address) = config.client.listen {
            if address.ip().is_unspecified() {
                address.set_ip(match address {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .with_context(|| format!("cannot connect to {address}; {hint}"))?;
            stream.set_nodelay(true)?;
            Stream::Tcp(stream)
        } else {
            bail!("the config has neither client.unix_socket nor client.listen");
        };
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    fn command(&mut self, args: &[&[u8]]) -> io::Result<Value> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)?;
        self.read_value(0)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_REPLY_BYTES as u64)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        if !line.ends_with(b"\r\n") {
            return Err(invalid("a reply line is not terminated"));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| invalid("a reply line is not UTF-8"))
    }

    fn read_value(&mut self, depth: usize) -> io::Result<Value> {
        if depth > 8 {
            return Err(invalid("reply nested too deeply"));
        }
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| invalid("bad length or integer"))
        };
        Ok(match kind {
            "+" => Value::Simple(rest.to_string()),
            "-" => Value::Error(rest.to_string()),
            ":" => Value::Integer(number()?),
            "$" => match number()? {
                -1 => Value::Bulk(None),
                len if (0..=MAX_REPLY_BYTES as i64).contains(&len) => {
                    let mut bytes = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(len as usize);
                    Value::Bulk(Some(bytes))
                }
                _ => return Err(invalid("bulk length out of range")),
            },
            "*" => match number()? {
                -1 => Value::Array(None),
                len if (0..=1_000_000).contains(&len) => {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(self.read_value(depth + 1)?);
                    }
                    Value::Array(Some(items))
                }
                _ => return Err(invalid("array length out of range")),
            },
            _ => return Err(invalid("unknown reply type")),
        })
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed reply from the server: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_do() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn relative_targets_become_absolute() {
        let path = absolute(Path::new("./backups/../b1")).unwrap();
        assert!(path.is_absolute());
        assert!(path.ends_with("b1"));
    }
}
