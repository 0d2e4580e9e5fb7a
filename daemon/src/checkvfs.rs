//! The VFS SQLite's integrity check runs on: the default (unix) VFS, except that SQLite's
//! memory-mapped reads (`xFetch`) come from a few small windows of the file that this VFS maps
//! and unmaps itself.
//!
//! The check of a restored or received database reads every page, most of them twice. Through
//! `pread` that is a system call and a 4 KiB copy per page read (1.2 s for a 1.8 GB database
//! here); through a memory map SQLite uses the page cache's pages in place (0.4 s). But SQLite's
//! own map covers the whole file (up to 2 GB) and every page touched stays in the process's
//! resident size until the connection closes: a 1 GB check peaks near 1 GB, which operators,
//! `ps` and memory limits see (and on recent kernels a touch maps a whole MiB around it).
//! Here a page comes from a window of `WINDOW` bytes, mapped when a read lands next to one of
//! the last reads served normally (a b-tree walked in file order); a page read in passing (an
//! index lookup) is read normally. At most `SLOTS` windows exist, and only windows SQLite holds
//! no page of are unmapped: the resident size stays within `SLOTS` x `WINDOW` beyond SQLite's
//! page cache, and the windows cover the whole file (SQLite's 2 GB limit applies to its own
//! map, which this VFS never makes).
//!
//! The VFS opens the main database a second time, read-only, for its maps, and closes that
//! descriptor after SQLite closed the file. Closing a descriptor drops the process's POSIX
//! locks on that file: use it only for a file nothing else in the process has open (the
//! check's files are fresh temporary files).

use std::ffi::{c_int, c_void, CStr};
use std::mem::size_of;
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections pass to `sqlite3_open_v2` to use this VFS.
pub const NAME: &CStr = c"replited-check";

/// Bytes of the file one window maps (512 pages of 4 KiB), aligned to its size.
const WINDOW: u64 = 2 << 20;
/// Windows mapped at most at once.
const SLOTS: usize = 4;
/// Reads served normally that are remembered; a read less than `NEAR` bytes before or after
/// one of them maps its window.
const HISTORY: usize = 4;
const NEAR: u64 = 64 << 10;

/// The registered VFS: SQLite's default one copied, with our `xOpen` and file size, and a
/// pointer to the original.
#[repr(C)]
struct Vfs {
    vfs: ffi::sqlite3_vfs,
    real: *mut ffi::sqlite3_vfs,
}

#[derive(Clone, Copy, Default)]
struct Window {
    /// File offset of the first byte mapped.
    start: u64,
    /// Address of the map (0: this slot is free).
    at: usize,
    len: usize,
    /// Pages SQLite fetched from it and has not released.
    held: u32,
    /// When it last served a page (for choosing which to unmap).
    used: u64,
}

impl Window {
    fn contains(&self, p: usize) -> bool {
        self.at != 0 && p >= self.at && p < self.at + self.len
    }
}

/// Our file: SQLite's base struct first, then our state, then the default VFS's own file.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    methods: ffi::sqlite3_io_methods,
    real: *mut ffi::sqlite3_file,
    /// Our read-only descriptor of the main database (-1: none; nothing is mapped).
    fd: c_int,
    /// SQLite's memory-map limit for the file (`PRAGMA mmap_size`): fetches only while > 0.
    limit: i64,
    /// Set by a write or truncate: no more maps.
    written: bool,
    tick: u64,
    windows: [Window; SLOTS],
    /// Where the last reads served normally started (`u64::MAX`: none).
    missed: [u64; HISTORY],
    next_miss: usize,
}

impl File {
    /// Unmaps every window SQLite holds no page of.
    unsafe fn unmap_idle(&mut self) {
        for w in self.windows.iter_mut().filter(|w| w.at != 0 && w.held == 0) {
            libc::munmap(w.at as *mut c_void, w.len);
            *w = Window::default();
        }
    }
}

/// Registers the VFS (once per process); returns SQLite's result code.
pub fn register() -> c_int {
    struct Registered(c_int);
    static DONE: OnceLock<Registered> = OnceLock::new();
    DONE.get_or_init(|| unsafe {
        let real = ffi::sqlite3_vfs_find(ptr::null());
        if real.is_null() {
            return Registered(ffi::SQLITE_ERROR);
        }
        let mut vfs: ffi::sqlite3_vfs = ptr::read(real);
        vfs.szOsFile = (size_of::<File>() + (*real).szOsFile as usize) as c_int;
        vfs.pNext = ptr::null_mut();
        vfs.zName = NAME.as_ptr();
        vfs.xOpen = Some(open);
        // Lives as long as the process: SQLite keeps the pointer.
        let v = Box::into_raw(Box::new(Vfs { vfs, real }));
        Registered(ffi::sqlite3_vfs_register(v.cast(), 0))
    })
    .0
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = (*vfs.cast::<Vfs>()).real;
    let f = file.cast::<File>();
    let real = file
        .cast::<u8>()
        .add(size_of::<File>())
        .cast::<ffi::sqlite3_file>();
    ptr::write_bytes(real.cast::<u8>(), 0, (*real_vfs).szOsFile as usize);
    ptr::write(
        f,
        File {
            base: ffi::sqlite3_file {
                pMethods: ptr::null(),
            },
            methods: METHODS,
            real,
            fd: -1,
            limit: 0,
            written: false,
            tick: 0,
            windows: [Window::default(); SLOTS],
            missed: [u64::MAX; HISTORY],
            next_miss: 0,
        },
    );
    let Some(x_open) = (*real_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = x_open(real_vfs, name, real, flags, out_flags);
    // SQLite closes a file whose methods are set even when the open failed: ours are set
    // exactly when the real file's are, with the same version.
    let m = (*real).pMethods;
    if !m.is_null() {
        (*f).methods.iVersion = (*m).iVersion.min(METHODS.iVersion);
        (*f).base.pMethods = &(*f).methods;
    }
    if rc == ffi::SQLITE_OK && flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && !name.is_null() {
        // Without it every read is an ordinary one.
        (*f).fd = libc::open(name, libc::O_RDONLY | libc::O_CLOEXEC);
    }
    rc
}

/// The real file and one of its methods, or `$none` when it has none.
macro_rules! real {
    ($file:expr, $method:ident, $none:expr) => {{
        let r = (*$file.cast::<File>()).real;
        match (*(*r).pMethods).$method {
            Some(m) => (m, r),
            None => return $none,
        }
    }};
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let f = &mut *file.cast::<File>();
    // SQLite released every page before closing.
    for w in f.windows.iter_mut().filter(|w| w.at != 0) {
        w.held = 0;
    }
    f.unmap_idle();
    let (m, r) = real!(file, xClose, ffi::SQLITE_OK);
    let rc = m(r);
    // After SQLite's own descriptor: closing ours drops the process's locks on the file.
    let f = &mut *file.cast::<File>();
    if f.fd >= 0 {
        libc::close(f.fd);
        f.fd = -1;
    }
    rc
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    let (m, r) = real!(file, xRead, ffi::SQLITE_IOERR_READ);
    m(r, buf, amt, at)
}

/// A write or truncate ends the maps: what is mapped stays valid for the pages SQLite holds
/// (the file only changes under them if SQLite itself got it wrong), nothing new is mapped.
unsafe fn stop_mapping(file: *mut ffi::sqlite3_file) {
    let f = &mut *file.cast::<File>();
    f.written = true;
    f.unmap_idle();
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    stop_mapping(file);
    let (m, r) = real!(file, xWrite, ffi::SQLITE_IOERR_WRITE);
    m(r, buf, amt, at)
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    stop_mapping(file);
    let (m, r) = real!(file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE);
    m(r, size)
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let (m, r) = real!(file, xSync, ffi::SQLITE_IOERR_FSYNC);
    m(r, flags)
}

unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    let (m, r) = real!(file, xFileSize, ffi::SQLITE_IOERR_FSTAT);
    m(r, size)
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (m, r) = real!(file, xLock, ffi::SQLITE_IOERR_LOCK);
    m(r, level)
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (m, r) = real!(file, xUnlock, ffi::SQLITE_IOERR_UNLOCK);
    m(r, level)
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let (m, r) = real!(
        file,
        xCheckReservedLock,
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK
    );
    m(r, out)
}

unsafe extern "C" fn x_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    if op == ffi::SQLITE_FCNTL_MMAP_SIZE {
        // Kept here: the unix VFS never maps the file itself. The old limit goes back, as
        // the unix VFS does.
        let f = &mut *file.cast::<File>();
        let new = *arg.cast::<i64>();
        *arg.cast::<i64>() = f.limit;
        if new >= 0 {
            f.limit = new;
            if new == 0 {
                f.unmap_idle();
            }
        }
        return ffi::SQLITE_OK;
    }
    let (m, r) = real!(file, xFileControl, ffi::SQLITE_NOTFOUND);
    m(r, op, arg)
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let (m, r) = real!(file, xSectorSize, 4096);
    m(r)
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let (m, r) = real!(file, xDeviceCharacteristics, 0);
    m(r)
}

unsafe extern "C" fn x_shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let (m, r) = real!(file, xShmMap, ffi::SQLITE_IOERR_SHMMAP);
    m(r, page, size, extend, out)
}

unsafe extern "C" fn x_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let (m, r) = real!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK);
    m(r, offset, n, flags)
}

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    let r = (*file.cast::<File>()).real;
    if let Some(m) = (*(*r).pMethods).xShmBarrier {
        m(r)
    }
}

unsafe extern "C" fn x_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    let (m, r) = real!(file, xShmUnmap, ffi::SQLITE_OK);
    m(r, delete)
}

/// A page from a window, or none (`*out` null: SQLite then reads it with `xRead`).
unsafe extern "C" fn x_fetch(
    file: *mut ffi::sqlite3_file,
    at: ffi::sqlite3_int64,
    amt: c_int,
    out: *mut *mut c_void,
) -> c_int {
    *out = ptr::null_mut();
    let f = &mut *file.cast::<File>();
    if f.fd < 0 || f.limit <= 0 || f.written || at < 0 || amt <= 0 {
        return ffi::SQLITE_OK;
    }
    let (at, end) = (at as u64, at as u64 + amt as u64);
    let start = at / WINDOW * WINDOW;
    if end > start + WINDOW {
        return ffi::SQLITE_OK;
    }
    f.tick += 1;
    let tick = f.tick;
    if let Some(w) = f.windows.iter_mut().find(|w| w.at != 0 && w.start == start) {
        if end > w.start + w.len as u64 {
            return ffi::SQLITE_OK;
        }
        w.held += 1;
        w.used = tick;
        *out = (w.at + (at - start) as usize) as *mut c_void;
        return ffi::SQLITE_OK;
    }
    // A page read in passing (an index lookup) is read normally; one next to another read
    // normally starts a walk in file order (SQLite's check walks a b-tree's children last to
    // first), worth a window.
    if !f
        .missed
        .iter()
        .any(|&m| m != u64::MAX && m.abs_diff(at) < NEAR)
    {
        f.missed[f.next_miss] = at;
        f.next_miss = (f.next_miss + 1) % HISTORY;
        return ffi::SQLITE_OK;
    }
    let mut st: libc::stat = std::mem::zeroed();
    if libc::fstat(f.fd, &mut st) != 0 || end > st.st_size as u64 {
        return ffi::SQLITE_OK;
    }
    let len = (st.st_size as u64 - start).min(WINDOW) as usize;
    let fd = f.fd;
    // A free slot, else the least recently used one SQLite holds nothing of.
    let Some(w) = f
        .windows
        .iter_mut()
        .filter(|w| w.held == 0)
        .min_by_key(|w| (w.at != 0, w.used))
    else {
        return ffi::SQLITE_OK;
    };
    if w.at != 0 {
        libc::munmap(w.at as *mut c_void, w.len);
        *w = Window::default();
    }
    // Populated: the pages were just written or read and sit in the page cache.
    let p = libc::mmap(
        ptr::null_mut(),
        len,
        libc::PROT_READ,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        fd,
        start as libc::off_t,
    );
    if p == libc::MAP_FAILED {
        return ffi::SQLITE_OK;
    }
    *w = Window {
        start,
        at: p as usize,
        len,
        held: 1,
        used: tick,
    };
    *out = (p as usize + (at - start) as usize) as *mut c_void;
    ffi::SQLITE_OK
}

/// SQLite is done with a page (or, without one, with every page: unmap what is idle).
unsafe extern "C" fn x_unfetch(
    file: *mut ffi::sqlite3_file,
    _at: ffi::sqlite3_int64,
    p: *mut c_void,
) -> c_int {
    let f = &mut *file.cast::<File>();
    if p.is_null() {
        f.unmap_idle();
    } else if let Some(w) = f.windows.iter_mut().find(|w| w.contains(p as usize)) {
        w.held = w.held.saturating_sub(1);
    }
    ffi::SQLITE_OK
}

const METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};
