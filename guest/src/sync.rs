//! Minimal synchronisation for a kernel without threads: a spin lock and a static cell.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// A test-and-set spin lock.
pub struct SpinLock(AtomicBool);

/// Holds a [`SpinLock`] until dropped.
pub struct Guard<'a>(&'a SpinLock);

impl SpinLock {
    /// An unlocked lock.
    pub const fn new() -> SpinLock {
        SpinLock(AtomicBool::new(false))
    }
    /// Spins until the lock is taken.
    pub fn lock(&self) -> Guard<'_> {
        while self.0.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        Guard(self)
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

/// A static whose users promise exclusive access by construction (boot-time set-up on one CPU).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: every mutable access goes through `get_mut`, whose callers guarantee exclusivity.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps a value.
    pub const fn new(v: T) -> Global<T> {
        Global(UnsafeCell::new(v))
    }
    /// Raw pointer to the value.
    pub fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
    /// Mutable access.
    ///
    /// # Safety
    /// No other reference to the value may exist while the result lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self) -> &mut T {
        // SAFETY: the caller guarantees exclusivity.
        unsafe { &mut *self.0.get() }
    }
    /// Shared access.
    ///
    /// # Safety
    /// No mutable reference to the value may exist while the result lives.
    pub unsafe fn get(&self) -> &T {
        // SAFETY: the caller guarantees no concurrent mutation.
        unsafe { &*self.0.get() }
    }
}
