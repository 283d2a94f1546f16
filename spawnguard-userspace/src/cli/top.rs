//! `spawnguard top`: a live view of the types and their hottest instances, refreshed from the
//! pinned maps (so it works with the daemon down, and costs the host a few syscalls a frame).

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute, queue,
    terminal::{self, ClearType},
};
use spawnguard_common::BreakerPhase;

use spawnguard::{
    events::Names,
    loader::DaemonState,
    status::{self, or_dash, Status},
};

/// Per-type totals of the last frame, for rates.
#[derive(Clone, Copy)]
struct Totals {
    spawns: u64,
    denied: u64,
}

fn totals(s: &Status) -> HashMap<String, Totals> {
    s.types
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                Totals {
                    spawns: t.forks_allowed.saturating_add(t.threads_allowed),
                    denied: t.denied.total(),
                },
            )
        })
        .collect()
}

fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// One frame as lines of text.
fn frame(
    s: &Status,
    before: Option<(&HashMap<String, Totals>, Duration)>,
    names: &mut Names,
    per_type: usize,
) -> Vec<String> {
    let mut lines = Vec::new();
    let daemon = match (s.daemon_pid, &s.backend) {
        (Some(pid), Some(b)) => format!("daemon pid {pid}, backend {b}"),
        _ => "daemon not running (the pinned enforcer still enforces)".into(),
    };
    let host = match s.host.max_tasks {
        Some(max) => format!("host {}/{max} tasks", s.host.tasks),
        None => format!("host {} tasks", s.host.tasks),
    };
    lines.push(format!(
        "spawnguard top - {} - {daemon} - {host} - q quits",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    ));
    if s.events_dropped.saturating_add(s.failed_open) > 0 {
        lines.push(format!(
            "events dropped {}, let through uncounted (fail-open) {}",
            s.events_dropped, s.failed_open
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "{:<20} {:<7} {:>9} {:>11} {:>9} {:>9} {:>9} {:<10}",
        "TYPE", "MODE", "INSTANCES", "TASKS", "SPAWNS/S", "DENIED/S", "DENIED", "BREAKER"
    ));
    for t in &s.types {
        let rate = |now: u64, then: fn(&Totals) -> u64| match before {
            Some((b, dt)) if dt.as_secs_f64() > 0.0 => b.get(&t.name).map_or("-".into(), |x| {
                format!(
                    "{:.0}",
                    now.saturating_sub(then(x)) as f64 / dt.as_secs_f64()
                )
            }),
            _ => "-".into(),
        };
        let breaker = t
            .breaker
            .as_ref()
            .map_or("-".into(), |b| match b.retry_in_seconds {
                Some(r) if b.state == BreakerPhase::Open.name() => format!("open {r:.0}s"),
                _ => b.state.clone(),
            });
        lines.push(format!(
            "{:<20} {:<7} {:>9} {:>11} {:>9} {:>9} {:>9} {:<10}",
            t.name,
            t.mode,
            format!("{}/{}", t.instances, or_dash(t.max_instances)),
            format!("{}/{}", t.tasks, or_dash(t.max_total_tasks)),
            rate(t.forks_allowed.saturating_add(t.threads_allowed), |x| x
                .spawns),
            rate(t.denied.total(), |x| x.denied),
            t.denied.total(),
            breaker,
        ));
        let mut hottest: Vec<_> = s
            .instances
            .iter()
            .filter(|i| i.type_name == t.name && i.tasks > 0)
            .collect();
        hottest.sort_by(|a, b| b.tasks.cmp(&a.tasks).then(a.id.cmp(&b.id)));
        for i in hottest.into_iter().take(per_type) {
            lines.push(format!(
                "  {:<44} tasks {:>6} threads {:>6} age {:>7}",
                names.instance(i.id),
                format!("{}/{}", i.tasks, t.max_tasks),
                format!("{}/{}", i.threads, t.max_threads),
                age(i.age_seconds),
            ));
        }
    }
    lines
}

/// Restores the terminal however `top` ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Self> {
        terminal::enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(Self)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

fn names() -> Names {
    Names::from_maps()
        .unwrap_or_else(|_| Names::new(DaemonState::read().map(|d| d.types).unwrap_or_default()))
}

/// Runs until `q` (or Esc, or Ctrl-C). Not on a terminal, or with `once`: prints one frame.
pub fn run(interval: Duration, per_type: usize, once: bool) -> Result<()> {
    let mut names = names();
    if once || !std::io::stdout().is_terminal() {
        // Rates need two readings.
        let first = status::snapshot()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let s = status::snapshot()?;
        let before = totals(&first);
        for line in frame(&s, Some((&before, t0.elapsed())), &mut names, per_type) {
            println!("{line}");
        }
        return Ok(());
    }
    let _screen = Screen::enter()?;
    let mut before: Option<(HashMap<String, Totals>, Instant)> = None;
    loop {
        let s = status::snapshot()?;
        let (cols, rows) = terminal::size().unwrap_or((120, 40));
        let lines = frame(
            &s,
            before.as_ref().map(|(b, t)| (b, t.elapsed())),
            &mut names,
            per_type,
        );
        let mut out = std::io::stdout().lock();
        queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All))?;
        for (row, line) in lines.iter().take(rows as usize).enumerate() {
            let shown: String = line.chars().take(cols as usize).collect();
            queue!(out, cursor::MoveTo(0, row as u16))?;
            write!(out, "{shown}")?;
        }
        out.flush()?;
        drop(out);
        before = Some((totals(&s), Instant::now()));
        let next = Instant::now() + interval;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            match event::read()? {
                Event::Key(k) => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers == KeyModifiers::CONTROL;
                    if k.kind == KeyEventKind::Press
                        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                    {
                        return Ok(());
                    }
                }
                // Redraw at the new size now.
                Event::Resize(..) => break,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_top() {
        assert_eq!(age(5.2), "5s");
        assert_eq!(age(125.0), "2m05s");
        assert_eq!(age(7300.0), "2h01m");
    }
}
