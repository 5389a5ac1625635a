//! A one-line progress bar on stderr, redrawn at most every 100 ms; drawn
//! only when stderr is a terminal, so scripts and logs never see it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    on: bool,
    label: String,
    /// Shows an amount (done or total) in the bar's unit.
    unit: fn(u64) -> String,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(label: String, unit: fn(u64) -> String) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            label,
            unit,
            last: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if done < total
            && self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '.' })
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {pct:3}% {}/{}",
            self.label,
            (self.unit)(done),
            (self.unit)(total)
        );
        let _ = err.flush();
    }

    pub fn finish(&self) {
        if self.on && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
