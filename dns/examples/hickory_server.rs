//! hickory-server's `ServerFuture` answering with meshd's own request path: the comparison
//! row in `cargo xtask bench dns`, kept so the choice of meshd's serving loop over
//! hickory-server stays measured (see the README, "The embedded DNS").
//!
//! The handler does what an integration with hickory-server has to: re-encode the parsed
//! request for `answer()` (forwarding needs the raw packet), then parse the reply back into
//! records for hickory's response builder.
//!
//! Usage: hickory_server LISTEN_ADDR NAME=IP[,IP...]...
use std::{error::Error, net::Ipv4Addr, sync::Arc};

use hickory_proto::{
    op::{Header, Message, MessageType, ResponseCode},
    serialize::binary::BinEncodable,
};
use hickory_server::{
    authority::MessageResponseBuilder,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    ServerFuture,
};
use meshd_dns::{
    answer::{Decision, Transport},
    server::Resolver,
    upstream::Upstreams,
    Entry, Kind, NetworkRecords, Zones,
};

struct Handler {
    resolver: Arc<Resolver>,
    networks: Vec<String>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        let reply = request.to_bytes().ok().and_then(|raw| {
            match self.resolver.decide(&raw, &self.networks, Transport::Udp).0 {
                Decision::Reply(r) => Message::from_vec(&r).ok(),
                Decision::Drop | Decision::Forward => None,
            }
        });
        let answers = match &reply {
            Some(m) => {
                header.set_message_type(MessageType::Response);
                header.set_authoritative(m.authoritative());
                header.set_response_code(m.response_code());
                m.answers().to_vec()
            }
            None => {
                header.set_response_code(ResponseCode::ServFail);
                Vec::new()
            }
        };
        let built = MessageResponseBuilder::from_message_request(request).build(
            header,
            answers.iter(),
            [].iter(),
            [].iter(),
            [].iter(),
        );
        match response.send_response(built).await {
            Ok(info) => info,
            Err(_) => header.into(),
        }
    }
}

fn zones(specs: &[String]) -> Result<Zones, Box<dyn Error>> {
    let mut net = NetworkRecords {
        id: "n1".into(),
        name: "front".into(),
        ..Default::default()
    };
    for spec in specs {
        let (name, addrs) = spec.split_once('=').ok_or("NAME=IP[,IP...] expected")?;
        let addrs = addrs
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Ipv4Addr>, _>>()?;
        let many = addrs.len() > 1;
        net.names.insert(
            name.to_lowercase().into(),
            Entry {
                kind: if many {
                    Kind::ServiceDnsrr
                } else {
                    Kind::ServiceVip
                },
                addrs: addrs.into(),
                shuffle: many,
                about: name.into(),
            },
        );
    }
    Ok(Zones {
        networks: [("n1".to_string(), std::sync::Arc::new(net))].into(),
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, names) = args.split_first().ok_or("usage: LISTEN_ADDR NAME=IP...")?;
    let resolver = Arc::new(Resolver::new(Upstreams::new(
        Vec::new(),
        std::time::Duration::from_secs(1),
    )));
    resolver.zones.store(Arc::new(zones(names)?));
    let socket = std::net::UdpSocket::bind(listen.as_str())?;
    socket.set_nonblocking(true)?;
    // One thread, as meshd's DNS runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut server = ServerFuture::new(Handler {
            resolver,
            networks: vec!["n1".into()],
        });
        server.register_socket(tokio::net::UdpSocket::from_std(socket)?);
        server.block_until_done().await?;
        Ok(())
    })
}
