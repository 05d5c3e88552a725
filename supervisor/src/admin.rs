//! A small blocking RESP2 client for the admin subcommands (`shoal backup`,
//! `shoal cluster status`): it connects to a running Shoal like any client,
//! over the config's Unix socket or else its TCP listener, and authenticates
//! with the config's password.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_shared::config::Config;

/// Largest reply line or bulk string this client accepts.
const MAX_REPLY_BYTES: usize = 256 << 20;

/// `path` made absolute against the working directory (the server resolves nothing).
pub(crate) fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.components().collect());
    }
    let cwd = std::env::current_dir().context("reading the working directory")?;
    Ok(cwd.join(path).components().collect())
}

/// A RESP2 reply.
#[derive(Debug)]
pub(crate) enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    /// A short description for error messages.
    pub(crate) fn describe(&self) -> String {
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
pub(crate) struct Connection {
    reader: BufReader<Stream>,
}

impl Connection {
    /// Connects over the config's Unix socket, else its TCP listener, and authenticates
    /// with the config's password if it sets one.
    pub(crate) fn open(config: &Config) -> anyhow::Result<Connection> {
        let mut connection = Connection::connect(config)?;
        if let Some(password) = &config.client.requirepass {
            if let Value::Error(error) = connection.command(&[b"AUTH", password.as_bytes()])? {
                bail!("the server refused the password from the config: {error}");
            }
        }
        Ok(connection)
    }

    fn connect(config: &Config) -> anyhow::Result<Connection> {
        let hint = "is shoal serve running with this config?";
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

    pub(crate) fn command(&mut self, args: &[&[u8]]) -> io::Result<Value> {
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
