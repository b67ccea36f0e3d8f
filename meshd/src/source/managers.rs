//! The swarm managers meshd may read, in order of preference. meshd reads one at a time and
//! moves to the next when a read or the event stream fails, so losing the manager a worker
//! was reading does not leave that worker blind while others keep quorum.
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use super::docker_api::DockerApi;

#[derive(Clone)]
pub struct Managers {
    apis: Arc<[DockerApi]>,
    current: Arc<AtomicUsize>,
}

impl Managers {
    /// `apis` must not be empty (the CLI always gives at least its default).
    pub fn new(apis: Vec<DockerApi>) -> Self {
        assert!(!apis.is_empty(), "at least one manager");
        Self {
            apis: apis.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The manager to read now, with its position (to report a failure against).
    pub fn pick(&self) -> (usize, &DockerApi) {
        let i = self.current.load(Ordering::Relaxed) % self.apis.len();
        (i, &self.apis[i])
    }

    /// Reading manager `which` failed: move on, unless someone already did.
    pub fn failed(&self, which: usize) {
        let next = (which + 1) % self.apis.len();
        let moved = self
            .current
            .compare_exchange(which, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved && next != which {
            tracing::warn!(
                from = self.apis[which].endpoint(),
                to = self.apis[next].endpoint(),
                "manager failing; moving to the next one"
            );
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.apis.iter().map(|a| a.endpoint().to_string()).collect()
    }

    pub fn len(&self) -> usize {
        self.apis.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apis.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::docker_api::TlsFiles;

    fn api(path: &str) -> DockerApi {
        DockerApi::new(path, &TlsFiles::default()).unwrap()
    }

    #[test]
    fn a_failure_moves_to_the_next_manager_once_and_wraps_around() {
        let m = Managers::new(vec![api("/a"), api("/b"), api("/c")]);
        assert_eq!(m.pick().1.endpoint(), "/a");
        m.failed(0);
        // A second report of the same failure (events and reads both saw it) is not a
        // second move.
        m.failed(0);
        assert_eq!(m.pick().1.endpoint(), "/b");
        m.failed(1);
        m.failed(2);
        assert_eq!(m.pick().0, 0);
        assert_eq!(m.pick().1.endpoint(), "/a");
    }
}
