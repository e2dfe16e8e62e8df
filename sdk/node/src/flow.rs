//! Back-pressure from a Node stream to the thread feeding it: the thread
//! waits while the stream's buffer is full.

use std::sync::{Condvar, Mutex};

/// Whether the JavaScript side wants more data, and whether it gave up.
#[derive(Default)]
pub struct Flow {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    paused: bool,
    cancelled: bool,
}

impl Flow {
    /// Stops the feeding thread at its next [`Flow::wait`].
    pub fn pause(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).paused = true;
    }

    /// Lets it go on.
    pub fn resume(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).paused = false;
        self.changed.notify_all();
    }

    /// The consumer is gone: waiting ends, and [`Flow::wait`] says so.
    pub fn cancel(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancelled = true;
        self.changed.notify_all();
    }

    /// Blocks while paused; false once cancelled.
    pub fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.paused && !s.cancelled {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.cancelled
    }
}
