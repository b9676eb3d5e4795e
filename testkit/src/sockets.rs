//! The machine's established TCP connections, from `/proc/net/tcp`: what the kernel says a
//! process holds, to check a client's connection count against its own view.

use std::net::{Ipv4Addr, SocketAddrV4};

/// One established IPv4 TCP connection, as seen from one of its ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Connection {
    /// This end.
    pub local: SocketAddrV4,
    /// The other end.
    pub remote: SocketAddrV4,
}

/// Every established IPv4 TCP connection in this network namespace (both ends of a loopback
/// connection appear, once each). Clients on loopback are told apart from servers by port:
/// `established().filter(|c| ports.contains(&c.remote.port()))` are the client ends towards
/// servers on `ports`.
///
/// # Panics
/// When `/proc/net/tcp` cannot be read (not Linux), naming the file.
pub fn established() -> Vec<Connection> {
    let table = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_else(|e| panic!("reading /proc/net/tcp (Linux only): {e}"));
    parse(&table)
}

fn parse(table: &str) -> Vec<Connection> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = addr(fields.next()?)?;
            let remote = addr(fields.next()?)?;
            // State 01 is TCP_ESTABLISHED.
            (fields.next()? == "01").then_some(Connection { local, remote })
        })
        .collect()
}

/// `0100007F:1F90`: the address as the kernel's u32 in host (little-endian) order, the port in
/// hex.
fn addr(field: &str) -> Option<SocketAddrV4> {
    let (ip, port) = field.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_le_bytes()), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_established_rows_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   1: 0100007F:C350 0201017F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        let rows = parse(table);
        assert_eq!(
            rows,
            [Connection {
                local: "127.0.0.1:50000".parse().unwrap(),
                remote: "127.1.1.2:8080".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn sees_a_connection_this_process_made() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        let ends = established()
            .into_iter()
            .filter(|c| c.remote.port() == port)
            .count();
        assert_eq!(ends, 1);
    }
}
