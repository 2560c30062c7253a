//! FTP control lines forwarded in the kernel: the stream verdict on the two
//! sockets of each control connection the daemon proxies. A segment that is
//! exactly one plain line (`firewall_common::ftp_lines::plain`) goes
//! straight to the other socket while the direction is the kernel's; all
//! else goes to the daemon (SK_PASS: its socket's receive queue), and the
//! direction with it until the daemon hands it back. The protocol of the
//! hand-offs is described in `firewall_common::ftp_lines`.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    btf_maps::{Array, HashMap, SockMap},
    helpers::{bpf_get_socket_cookie, bpf_skb_load_bytes},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
    EbpfContext as _,
};
use firewall_common::ftp_lines::{
    plain, LineState, KERNEL_LINE_BUDGET, KERNEL_LINE_MAX, LINE_SLOT_COUNT,
};

use crate::stats;

/// BPF_F_MMAPABLE: the daemon reads and writes the states in place.
const MMAPABLE: usize = 1 << 10;

/// The proxy's sockets, by slot.
#[btf_map]
static LINE_SOCKS: SockMap<{ LINE_SLOT_COUNT as usize }> = SockMap::new();

/// A socket's slot, by its cookie.
#[btf_map]
static LINE_SLOTS: HashMap<u64, u32, { LINE_SLOT_COUNT as usize }> = HashMap::new();

/// Each slot's direction.
#[btf_map]
static LINE_STATE: Array<LineState, { LINE_SLOT_COUNT as usize }, MMAPABLE> = Array::new();

#[stream_verdict]
pub fn ftp_lines(ctx: SkBuffContext) -> u32 {
    verdict(&ctx)
}

#[inline(always)]
fn verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the verdict's own skb, which this helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a plain value read from a map entry.
    let Some(&slot) = (unsafe { LINE_SLOTS.get(cookie) }) else {
        return SK_PASS;
    };
    let Some(st) = LINE_STATE.get_ptr_mut(slot) else {
        return SK_PASS;
    };
    let len = ctx.len();
    // SAFETY: `st` points at this slot's entry of an array map, which lives
    // as long as the program; this verdict is its only writer of these
    // fields (the daemon writes `resume` only, read here once, volatile).
    unsafe {
        if (*st).kernel == 0
            && core::ptr::read_volatile(&raw const (*st).resume) == (*st).passed + 1
        {
            (*st).kernel = 1;
            (*st).budget = KERNEL_LINE_BUDGET;
        }
        if (*st).kernel == 1 && (*st).budget > 0 && is_plain(ctx, (*st).role, len) {
            let peer = (*st).peer;
            if LINE_SOCKS.redirect_skb(ctx, peer, 0) == SK_PASS as i64 {
                (*st).budget -= 1;
                (*st).redirected += len as u64;
                (*st).lines += 1;
                stats::count_ftp_line(len as u64);
                return SK_PASS;
            }
        }
        (*st).kernel = 0;
        (*st).passed += len as u64;
    }
    SK_PASS
}

#[inline(always)]
fn is_plain(ctx: &SkBuffContext, role: u32, len: u32) -> bool {
    if len == 0 || len as usize > KERNEL_LINE_MAX {
        return false;
    }
    let mut buf = [0u8; KERNEL_LINE_MAX];
    // SAFETY: `buf` has room for `len` (1..=KERNEL_LINE_MAX) bytes; the
    // helper checks them against the skb.
    let r = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), 0, buf.as_mut_ptr().cast(), len) };
    match buf.get(..len as usize) {
        Some(seg) if r == 0 => plain(role, seg),
        _ => false,
    }
}
