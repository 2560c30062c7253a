//! A blocking netlink client: one request at a time, and its answer (the
//! messages of a dump, or an acknowledgement). Used for routes, rules and
//! neighbours (rtnetlink) and for socket diagnostics (sock_diag); every call
//! is a few microseconds of kernel work, so no runtime is needed.

use std::{fmt::Debug, io};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

pub use netlink_sys::protocols::{NETLINK_ROUTE, NETLINK_SOCK_DIAG};

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// A request acknowledged by the kernel (`NLM_F_ACK`), with `flags`
    /// added (create, replace, ...).
    pub fn ack<M>(&mut self, payload: M, flags: u16) -> io::Result<()>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.request(payload, NLM_F_REQUEST | NLM_F_ACK | flags)
            .map(drop)
    }

    /// `ack` under another message type than the payload's own (for
    /// requests the crates do not frame, like sock_diag's SOCK_DESTROY).
    pub fn ack_as<M>(&mut self, payload: M, message_type: u16) -> io::Result<()>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.send(payload, NLM_F_REQUEST | NLM_F_ACK, Some(message_type))?;
        self.receive().map(|_: Vec<M>| ())
    }

    /// A dump: every message the kernel answers with.
    pub fn dump<M>(&mut self, payload: M) -> io::Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.request(payload, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// Sends one request with `flags` and reads its answer until the kernel
    /// is done (`NLMSG_DONE`, or an acknowledgement); an error answer is
    /// returned as the errno it carries.
    pub fn request<M>(&mut self, payload: M, flags: u16) -> io::Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.send(payload, flags, None)?;
        self.receive()
    }

    fn send<M>(&mut self, payload: M, flags: u16, message_type: Option<u16>) -> io::Result<()>
    where
        M: NetlinkSerializable + Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        m.finalize();
        if let Some(t) = message_type {
            m.header.message_type = t;
        }
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        self.socket.send(&out, 0).map(drop)
    }

    fn receive<M>(&mut self) -> io::Result<Vec<M>>
    where
        M: NetlinkDeserializable + Debug,
    {
        let mut got = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let m = NetlinkMessage::<M>::deserialize(&self.buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if m.header.sequence_number == self.seq {
                    match m.payload {
                        NetlinkPayload::InnerMessage(inner) => got.push(inner),
                        NetlinkPayload::Done(_) => return Ok(got),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(got),
                                Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
    }
}
