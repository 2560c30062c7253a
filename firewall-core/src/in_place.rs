//! One FTP control connection forwarded in place, the daemon's side: the
//! segments the datapath hands over (`firewall_common::inplace`), each
//! direction through [`StreamRewrite`] and the FTP filter, and what to do
//! for each — the packets to send and the translation and offers to
//! publish first.
//!
//! The datapath hands a direction over at a segment it will not forward
//! (not one plain line at the next byte) and keeps diverting it until the
//! daemon's offer, published with the translation, names the count of
//! segments diverted so far: the filter is between lines again, and
//! nothing was diverted since. The kernel then forwards from the offer's
//! `next`, shifted by the translation, until it diverts again; the daemon
//! learns how far it went from the direction's state (`kernel_next`).

use firewall_common::{
    ftp_lines,
    inplace::{InPlaceAdjust, LineMark, Offer, DIR_COMMANDS},
};

use crate::{
    ftp::{Control, Output},
    stream_rewrite::{LineFilter, Send, StreamError, StreamRewrite},
};

/// A segment the datapath handed over.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// `DIR_COMMANDS` or `DIR_REPLIES`.
    pub dir: usize,
    pub seq: u32,
    /// Its acknowledgment (of the other direction, in the sender's view).
    pub ack: u32,
    pub fin: bool,
    pub data: &'a [u8],
    /// The direction's count of diverted segments, this one included.
    pub diverted: u32,
    /// The highest acknowledgment of this direction the datapath took back
    /// exactly, if any.
    pub acked: Option<u32>,
    /// Where the datapath stopped forwarding this direction (its state's
    /// `next`, read after the segment was diverted).
    pub kernel_next: u32,
    /// Longest payload to send in one packet.
    pub mss: usize,
    /// Where the last lines the datapath forwarded in this direction lie
    /// (its state's `lines`).
    pub forwarded: &'a [LineMark],
}

/// A packet to send for a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// To the segment's receiver, as the segment's sender.
    Data {
        seq: u32,
        ack: u32,
        payload: Vec<u8>,
        fin: bool,
    },
    /// To the segment's sender, as its receiver: its bytes before `ack` are
    /// done with (the filter removed them). `seq` is the receiver's next
    /// byte as the sender knows it.
    AckToSender { seq: u32, ack: u32 },
}

/// What a segment calls for: publish `adjust`, then send `packets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaction {
    pub adjust: InPlaceAdjust,
    pub packets: Vec<Packet>,
}

/// A control connection the daemon reads in place.
pub struct Connection {
    control: Control,
    /// Each direction, from its first segment handed over.
    dirs: [Option<StreamRewrite>; 2],
    offers: [Offer; 2],
    /// The translation found published when the connection was first seen
    /// (a previous daemon's), which each direction goes on from.
    inherited: InPlaceAdjust,
}

impl Connection {
    /// `control` made with `Control::in_place`; `published` the
    /// connection's translation as the datapath has it now.
    pub fn new(control: Control, published: InPlaceAdjust) -> Self {
        Self {
            control,
            dirs: [None, None],
            offers: [Offer::default(); 2],
            inherited: published,
        }
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The filter, for a restarting daemon to hand over (`Control::hand_over`).
    pub fn into_control(self) -> Control {
        self.control
    }

    /// The translation and offers as the datapath is to have them.
    pub fn adjust(&self) -> InPlaceAdjust {
        let mut a = InPlaceAdjust {
            offer: self.offers,
            ..self.inherited
        };
        for (d, rw) in self.dirs.iter().enumerate() {
            if let Some(rw) = rw {
                a.adjust[d] = *rw.adjust();
            }
        }
        a
    }

    /// What to do for a segment handed over; an error ends the connection.
    pub fn segment(&mut self, s: &Segment) -> Result<Reaction, StreamError> {
        let d = s.dir & 1;
        let commands = d == DIR_COMMANDS;
        let inherited = self.inherited.adjust[d];
        let rw = self.dirs[d]
            .get_or_insert_with(|| StreamRewrite::taken_over(inherited, s.acked, s.kernel_next));
        // Bytes the kernel forwarded since the last offer was taken.
        rw.resume_at(s.kernel_next);
        let filter = &mut Dir {
            control: &mut self.control,
            commands,
        };
        let acked = s.acked.unwrap_or(s.seq);
        let sends = rw.segment(s.seq, s.data, filter, s.mss, acked, s.forwarded)?;
        let end = s.seq.wrapping_add(s.data.len() as u32);
        let fin = s.fin && rw.next() == end && self.control.held(commands) == 0;
        let own = *rw.adjust();
        self.offers[d] = if self.control.at_line_boundary(commands) {
            Offer {
                valid: 1,
                next: rw.next(),
                diverted: s.diverted,
                _pad: 0,
            }
        } else {
            Offer::default()
        };
        // The acknowledgment the segment carries, of the other direction's
        // bytes in the receiver's numbers, taken back for its sender.
        let ack = match &mut self.dirs[1 - d] {
            Some(other) => {
                let a = other.adjust();
                let back = a.ack_in(s.ack);
                if a.ack_trusted(s.ack) {
                    other.acknowledged(back);
                }
                back
            }
            None => s.ack,
        };
        let mut packets: Vec<Packet> = sends
            .into_iter()
            .map(|send| match send {
                Send::Data { seq, bytes } => Packet::Data {
                    seq,
                    ack,
                    payload: bytes,
                    fin: false,
                },
                Send::Ack { ack: done } => Packet::AckToSender {
                    seq: s.ack,
                    ack: done,
                },
            })
            .collect();
        if fin {
            // On the piece that ends the sender's bytes, or alone after it.
            let at = own.seq_out_bare(end);
            let last = packets.iter_mut().rev().find_map(|p| match p {
                Packet::Data {
                    seq, payload, fin, ..
                } if seq.wrapping_add(payload.len() as u32) == at => Some(fin),
                _ => None,
            });
            match last {
                Some(fin) => *fin = true,
                None => packets.push(Packet::Data {
                    seq: at,
                    ack,
                    payload: Vec::new(),
                    fin: true,
                }),
            }
        }
        Ok(Reaction {
            adjust: self.adjust(),
            packets,
        })
    }

    /// The connection ended: the filter's unused openings go.
    pub fn finish(&mut self) {
        self.control.finish();
    }
}

/// One direction of the filter, as `stream_rewrite` feeds it.
struct Dir<'a> {
    control: &'a mut Control,
    commands: bool,
}

impl LineFilter for Dir<'_> {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut o = Output::default();
        if self.commands {
            self.control.client_data(data, &mut o);
            // In place, a command's refusal goes on to the server
            // (`Control::in_place`): nothing for the client. An ABOR's
            // urgency is not sent afresh (the client's own segment was
            // urgent; the server reads it in line).
            out.extend_from_slice(&o.to_server);
        } else {
            self.control.server_data(data, &mut o);
            out.extend_from_slice(&o.to_client);
        }
    }

    fn held(&self) -> usize {
        self.control.held(self.commands)
    }

    fn plain(&self, line: &[u8]) -> bool {
        let role = if self.commands {
            ftp_lines::ROLE_COMMANDS
        } else {
            ftp_lines::ROLE_REPLIES
        };
        ftp_lines::plain(role, line)
    }
}

#[cfg(test)]
mod tests;
