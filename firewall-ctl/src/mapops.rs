//! Map operations aya 0.14 does not offer, as `bpf(2)` calls: batched lookup
//! (read a table a bucket range at a time), batched delete, and
//! lookup-and-delete (take an entry atomically, so that a datapath that
//! uses it at the same moment cannot be overlooked).

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a live, initialised bpf_attr variant of the size
    // passed; the kernel reads and writes only within it and the buffers it
    // points to, which the callers keep alive and sized for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Where a batched scan of a hash table goes on from (the kernel's bucket
/// cursor); `Scan::default()` starts at the beginning.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scan {
    next: Option<u32>,
    /// The last call reached the end of the table (the next one starts over).
    pub wrapped: bool,
}

/// Reads up to `max` entries of the hash table `fd` from `scan` on, and
/// moves `scan` past them; at the end of the table it starts over.
pub fn lookup_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    scan: &mut Scan,
    max: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut max = max.max(1);
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(max);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(max);
        let in_batch = scan.next.unwrap_or(0);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: if scan.next.is_some() {
                &in_batch as *const u32 as u64
            } else {
                0
            },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: max as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(max);
        let take = |keys: Vec<MaybeUninit<K>>, values: Vec<MaybeUninit<V>>| {
            (0..n)
                // SAFETY: the kernel filled the first `count` keys and values.
                .map(|i| unsafe {
                    (
                        keys.as_ptr().add(i).read().assume_init(),
                        values.as_ptr().add(i).read().assume_init(),
                    )
                })
                .collect::<Vec<_>>()
        };
        match r {
            Ok(()) => {
                scan.next = Some(out_batch);
                scan.wrapped = false;
                return Ok(take(keys, values));
            }
            // The end of the table, with the last entries (or none).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                scan.next = None;
                scan.wrapped = true;
                return Ok(take(keys, values));
            }
            // One bucket holds more entries than `max`: read it whole.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && max < 1 << 16 => max *= 4,
            Err(e) => return Err(e),
        }
    }
}

/// Deletes `keys` from the table `fd` in one call where it can; keys that are
/// already gone are skipped. Returns how many were deleted.
pub fn delete_batch<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(rest.len());
        deleted += done;
        match r {
            Ok(()) => break,
            // The key after the deleted ones is gone already: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Takes the entry for `key` out of the table `fd`: its value, or None when
/// there is none.
pub fn lookup_and_delete<K, V: Copy>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote the value.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
