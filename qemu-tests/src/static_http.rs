//! A loopback HTTP/1.1 file server for build tests that need a web server kiln downloads from
//! (a classic Helm repository): serves the files of one directory on 127.0.0.1, one thread, one
//! response per connection. Paths with `..` are refused; nothing else is served.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// Serves `dir` until the process ends; returns the base URL (`http://127.0.0.1:PORT`).
pub fn serve_dir(dir: &Path) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let dir: PathBuf = dir.to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Ok(clone) = stream.try_clone() else { continue };
            let mut reader = BufReader::new(clone);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) <= 2 {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let body = if path.split('/').any(|c| c == "..") { None } else { std::fs::read(dir.join(&path)).ok() };
            let _ = match body {
                Some(b) => write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                    .and_then(|_| stream.write_all(&b)),
                None => write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    Ok(base)
}
