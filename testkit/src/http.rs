//! A minimal HTTP/1.1 GET over a plain TCP stream, for scraping an endpoint (such as Prometheus
//! metrics) from a test without pulling in an HTTP client.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// GETs `path` from `addr` (`host:port`) and returns the response body. Panics, naming the address,
/// if the connection fails, the exchange takes over 5 s, or the status is not 200.
pub fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("testkit: cannot connect to http://{addr}{path}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("setting a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("testkit: cannot send to http://{addr}{path}: {e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("testkit: cannot read from http://{addr}{path}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| {
        panic!("testkit: http://{addr}{path} sent no HTTP response: {response:?}")
    });
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "testkit: http://{addr}{path} answered {}",
        head.lines().next().unwrap_or_default()
    );
    body.to_owned()
}

/// The value of the Prometheus sample whose line starts with `series` (a metric name with its
/// labels, e.g. `up{job="x"}`), if the exposition `text` has one.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
