//! The device event loop: one thread waiting on every queue notification,
//! device backend fd, the i8042 reset line and the control kick.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_devices::Device;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{ExitReason, VmCore};

const TOKEN_KICK: u64 = 0;
const TOKEN_RESET: u64 = 1;
const FIRST_SOURCE_TOKEN: u64 = 2;

#[derive(Clone, Copy, Debug)]
enum Source {
    Queue { device: usize, queue: usize },
    Backend { device: usize },
}

/// The epoll set and what each registration means.
pub(crate) struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    virtio: Vec<Arc<Mutex<Device>>>,
    reset_evt: EventFd,
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

impl EventLoop {
    /// Registers every event source of `virtio` devices plus the control kick.
    pub(crate) fn new(
        virtio: Vec<Arc<Mutex<Device>>>,
        reset_evt: EventFd,
        kick: &EventFd,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        add(&epoll, kick.as_raw_fd(), TOKEN_KICK)?;
        add(&epoll, reset_evt.as_raw_fd(), TOKEN_RESET)?;
        let mut sources = Vec::new();
        for (index, dev) in virtio.iter().enumerate() {
            let guard = dev.lock().unwrap_or_else(PoisonError::into_inner);
            let Device::VirtioMmio(t) = &*guard else {
                continue;
            };
            for (queue, evt) in t.queue_evts().iter().enumerate() {
                add(
                    &epoll,
                    evt.as_raw_fd(),
                    FIRST_SOURCE_TOKEN + sources.len() as u64,
                )?;
                sources.push(Source::Queue {
                    device: index,
                    queue,
                });
            }
            if let Some(fd) = t.device().backend_fd() {
                add(&epoll, fd, FIRST_SOURCE_TOKEN + sources.len() as u64)?;
                sources.push(Source::Backend { device: index });
            }
        }
        Ok(Self {
            epoll,
            sources,
            virtio,
            reset_evt,
        })
    }

    fn dispatch(&self, source: Source) {
        let (Source::Queue { device, .. } | Source::Backend { device }) = source;
        let mut guard = self.virtio[device]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Device::VirtioMmio(t) = &mut *guard else {
            return;
        };
        match source {
            Source::Queue { queue, .. } => t.handle_queue_event(queue),
            Source::Backend { .. } => t.handle_backend_event(),
        }
    }

    /// Runs until the VM stops; parks while it is paused.
    pub(crate) fn run(self, core: Arc<VmCore>) {
        let shared = &core.shared;
        let _done = shared.thread_guard();
        let mut events = vec![EpollEvent::default(); 64];
        while shared.checkpoint() {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    shared.request_exit(ExitReason::Error(format!("event loop: {e}")));
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KICK => {
                        // Only wakes the loop so it reaches its checkpoint.
                        let _ = shared.loop_kick.read();
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.read();
                        shared.request_exit(ExitReason::Reset);
                    }
                    token => {
                        if let Some(&source) =
                            self.sources.get((token - FIRST_SOURCE_TOKEN) as usize)
                        {
                            self.dispatch(source);
                        }
                    }
                }
            }
        }
    }
}
