//! Memory for packed weights, on transparent huge pages where Linux gives them.
//!
//! Decoding one token reads every weight once: SmolLM2's ~98 MB is ~24,000 pages of 4 KiB,
//! and the TLB holds a few thousand, so every 4 KiB of a weight stream took a page walk
//! (whose page-table entries the stream itself had evicted from the caches), and the CPU's
//! prefetchers stop at each 4 KiB boundary. With 2 MiB pages a matrix is a handful of pages.
//! Measured on SmolLM2 (the bench binary's `--concurrency-only --streams 1,4,8`, five
//! alternating pairs): one stream 159–180 against 96–133 tok/s, 4 streams 407–513 against
//! 260–373, 8 streams 458–555 against 338–479; load time no different. The encoders' packed
//! weights were tried on them too and left on malloc's pages: MiniLM loaded 40 ms slower
//! (0.21–0.28 against 0.16–0.22 s) and embedded no faster.
//!
//! Most distributions set THP to `madvise` (Ubuntu, Debian) or `always` (RHEL); both give
//! huge pages to memory marked `MADV_HUGEPAGE`, which glibc's `malloc` does not do. So the
//! packed weights are carved out of chunks of anonymous memory that are mapped here, aligned
//! to 2 MiB and marked before they are first touched. Where THP is off (`never`), or on other
//! systems, the same chunks are plain pages and nothing else changes.
//!
//! A chunk is [`CHUNK`] bytes of address space; matrices are placed one after another in it
//! (64-byte aligned), and a matrix larger than half a chunk gets a chunk of its own. Pages are
//! only backed once written, so the unused end of the last chunk costs no memory. A chunk is
//! unmapped when the last matrix in it is dropped.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// A huge page (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;
/// Address space per shared chunk.
const CHUNK: usize = 64 << 20;
/// Alignment of each buffer in a chunk: a cache line (AMX tiles and AVX-512 loads want it).
const ALIGN: usize = 64;

/// One mapping, `size` bytes from `ptr` (2 MiB aligned), zero until written.
struct Chunk {
    ptr: NonNull<u8>,
    size: usize,
    /// What to give back to `munmap`: the whole mapping, alignment slack included.
    #[cfg(unix)]
    mapped: (*mut libc::c_void, usize),
    /// Where `mmap` is not used: the allocation and its layout.
    #[cfg(not(unix))]
    layout: std::alloc::Layout,
}

// SAFETY: a chunk is plain memory; the buffers in it are disjoint, and each is accessed
// through `&`/`&mut` of its own `WeightBytes`.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    #[cfg(unix)]
    fn new(size: usize) -> Chunk {
        let len = size + HUGE;
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(len, HUGE).unwrap());
        }
        let start = (base as usize).next_multiple_of(HUGE);
        let ptr = base.cast::<u8>().wrapping_add(start - base as usize);
        #[cfg(target_os = "linux")]
        // SAFETY: `ptr .. ptr + size` lies in the mapping. A refusal (THP compiled out, an old
        // kernel) leaves plain pages, which is all this asks for then.
        unsafe {
            libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE);
        }
        Chunk {
            ptr: NonNull::new(ptr).expect("mmap gave a non-null mapping"),
            size,
            mapped: (base, len),
        }
    }

    #[cfg(not(unix))]
    fn new(size: usize) -> Chunk {
        let layout = std::alloc::Layout::from_size_align(size, HUGE).expect("a chunk's layout");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Chunk { ptr, size, layout }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping (allocation) made in `new`, released once, after the last
        // buffer in it (each holds an `Arc` of the chunk).
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.mapped.0, self.mapped.1);
        }
        #[cfg(not(unix))]
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr(), self.layout)
        };
    }
}

/// The chunk new buffers go into, and how much of it is taken.
static OPEN: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// A zeroed byte buffer in a [`Chunk`]: a `Vec<u8>` that cannot grow.
pub(crate) struct WeightBytes {
    chunk: Arc<Chunk>,
    offset: usize,
    len: usize,
}

/// Bytes of the [`WeightBytes`] alive: what a THP setting of `never` leaves on 4 KiB pages.
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes of weights this process keeps in huge-page chunks now.
pub fn weight_bytes() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Drop for WeightBytes {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.len, std::sync::atomic::Ordering::Relaxed);
    }
}

impl WeightBytes {
    /// `len` zero bytes, 64-byte aligned.
    pub(crate) fn zeroed(len: usize) -> WeightBytes {
        LIVE.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        if len > CHUNK / 2 {
            let chunk = Arc::new(Chunk::new(len.next_multiple_of(HUGE)));
            return WeightBytes {
                chunk,
                offset: 0,
                len,
            };
        }
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |(c, used): &(Arc<Chunk>, usize)| used.next_multiple_of(ALIGN) + len <= c.size;
        if !open.as_ref().is_some_and(fits) {
            *open = Some((Arc::new(Chunk::new(CHUNK)), 0));
        }
        let (chunk, used) = open.as_mut().expect("an open chunk");
        let offset = used.next_multiple_of(ALIGN);
        *used = offset + len;
        WeightBytes {
            chunk: chunk.clone(),
            offset,
            len,
        }
    }
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `offset .. offset + len` lies in the chunk (checked when carved out), was
        // zeroed by the mapping, and belongs to this buffer alone.
        unsafe { std::slice::from_raw_parts(self.chunk.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` is the only access to these bytes.
        unsafe {
            std::slice::from_raw_parts_mut(self.chunk.ptr.as_ptr().add(self.offset), self.len)
        }
    }
}

/// The node's transparent-huge-page setting (`always`, `madvise` or `never`, the bracketed
/// word of `/sys/kernel/mm/transparent_hugepage/enabled`), or `unavailable`. Logged when a
/// model is loaded: under `never` the packed weights stay on 4 KiB pages and decode runs at
/// the speed before huge pages (see the module's figures).
pub fn thp_setting() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| bracketed(&s).map(str::to_string))
        .unwrap_or_else(|| "unavailable".to_string())
}

/// The word in brackets of a sysfs choice list (`always [madvise] never` → `madvise`).
fn bracketed(s: &str) -> Option<&str> {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thp_setting_is_the_bracketed_word() {
        assert_eq!(bracketed("always [madvise] never\n"), Some("madvise"));
        assert_eq!(bracketed("[always] madvise never"), Some("always"));
        assert_eq!(bracketed("always madvise never"), None);
        let before = weight_bytes();
        let buf = WeightBytes::zeroed(1 << 20);
        // Other tests' buffers come and go meanwhile; this one is counted while it lives.
        assert!(
            weight_bytes() >= 1 << 20,
            "{before} then {}",
            weight_bytes()
        );
        drop(buf);
        let here = thp_setting();
        assert!(
            ["always", "madvise", "never", "unavailable"].contains(&here.as_str()),
            "{here}"
        );
    }

    #[test]
    fn buffers_are_zeroed_aligned_disjoint_and_outlive_the_others() {
        // Other tests take buffers from the same chunks at the same time: only what holds
        // whatever they do is asserted.
        let mut small: Vec<WeightBytes> = (1..40).map(|i| WeightBytes::zeroed(i * 997)).collect();
        let big = WeightBytes::zeroed(CHUNK / 2 + 1);
        assert_eq!(
            big.as_ptr() as usize % HUGE,
            0,
            "a chunk of its own starts on a huge page"
        );
        for (i, buf) in small.iter_mut().enumerate() {
            assert!(buf.iter().all(|x| *x == 0), "buffer {i} is zero");
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0, "buffer {i} is aligned");
            buf.fill(i as u8 + 1);
        }
        let mut spans: Vec<(usize, usize)> = small
            .iter()
            .chain([&big])
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.len()))
            .collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "buffers overlap"
        );
        // Filling a chunk moves on to a new one; dropping buffers keeps the others' bytes.
        let fill: Vec<WeightBytes> = (0..3).map(|_| WeightBytes::zeroed(CHUNK / 2)).collect();
        drop((fill, big));
        for (i, buf) in small.iter().enumerate().step_by(2) {
            assert!(
                buf.iter().all(|x| *x == i as u8 + 1),
                "buffer {i} kept its bytes"
            );
        }
    }

    /// The chunks are marked for huge pages and get them where this Linux gives them.
    #[cfg(target_os = "linux")]
    #[test]
    fn chunks_get_huge_pages_where_thp_allows() {
        let setting = |name: &str| {
            std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}"))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let (mode, defrag) = (setting("enabled"), setting("defrag"));
        let mut buf = WeightBytes::zeroed(CHUNK / 2 + 1);
        buf.fill(7);
        let start = buf.as_ptr() as usize;
        // The fields of the mapping that holds `buf` in /proc/self/smaps.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut fields = std::collections::HashMap::new();
        let mut inside = false;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            if let Some((lo, hi)) = first.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = lo <= start && start < hi;
            } else if inside && let Some(name) = first.strip_suffix(':') {
                fields.insert(
                    name.to_string(),
                    words.next().unwrap_or_default().to_string(),
                );
            }
        }
        let field = |name: &str| -> usize {
            fields
                .get(name)
                .unwrap_or_else(|| panic!("no {name} for the buffer's mapping in /proc/self/smaps"))
                .parse()
                .unwrap()
        };
        let huge_kb = field("AnonHugePages");
        eprintln!("THP enabled {mode}, defrag {defrag}: {huge_kb} kB of huge pages");
        if mode.contains("[never]") {
            assert_eq!(huge_kb, 0);
            return;
        }
        // Marked (under `madvise` only the mark makes it eligible).
        assert_eq!(
            field("THPeligible"),
            1,
            "the chunk is not eligible for huge pages"
        );
        // Where a fault in marked memory compacts memory for a huge page, one is there: the
        // kernel may fall short of more, but gives none only when the mark did not take.
        // Other `defrag` settings leave it to khugepaged, later.
        if ["[always]", "[madvise]", "[defer+madvise]"]
            .iter()
            .any(|m| defrag.contains(m))
        {
            assert!(
                huge_kb >= 2048,
                "THP {mode}, defrag {defrag}, but the buffer's {} MiB got {huge_kb} kB of huge \
                 pages",
                buf.len() >> 20
            );
        }
    }
}
