//! A DNS client for the tests: one query over UDP, the answer's code and data.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Asks `server` (UDP, recursion desired) for `name`/`kind`: the response code
/// and the answers' data; `None` when no answer comes within 2 s.
pub async fn query(
    server: SocketAddr,
    name: &str,
    kind: RecordType,
) -> Option<(ResponseCode, Vec<RData>)> {
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).ok()?, kind));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.send_to(&query.to_vec().ok()?, server).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let answer = Message::from_vec(&buf[..n]).ok()?;
    assert_eq!(
        answer.metadata.id, query.metadata.id,
        "an answer to another query"
    );
    Some((
        answer.metadata.response_code,
        answer.answers.into_iter().map(|r| r.data).collect(),
    ))
}

/// The ports of the SRV records in `data`, sorted.
pub fn srv_ports(data: &[RData]) -> Vec<u16> {
    let mut ports: Vec<u16> = data
        .iter()
        .filter_map(|d| match d {
            RData::SRV(srv) => Some(srv.port),
            _ => None,
        })
        .collect();
    ports.sort();
    ports
}
