//! Helpers shared by the host crate's integration tests.
#![allow(dead_code)]

use std::process::{Child, Command};

/// A process standing in for a VMM; killed and reaped when dropped, so that a failed
/// assertion leaves none behind.
pub struct Sleeper(Child);

impl Sleeper {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sleeper() -> Sleeper {
    Sleeper(Command::new("sleep").arg("1000").spawn().unwrap())
}
