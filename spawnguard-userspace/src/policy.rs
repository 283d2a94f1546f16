//! The policy file (TOML): parsing, validation with file/line/column errors, and the default
//! policy embedded in the binary.

use std::{collections::HashSet, fmt, ops::Range, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use spawnguard_common::{MAX_TYPES, TYPE_NAME_LEN};
use toml::Spanned;

pub const DEFAULT_POLICY: &str = include_str!("default-policy.toml");

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Audit,
    #[default]
    Enforce,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForkRate {
    /// New tasks an idle instance may start at once.
    pub burst: u64,
    /// Tokens added per second.
    pub per_sec: f64,
}

/// What happens to an instance older than `max_age`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnMaxAge {
    /// Report only.
    #[default]
    Event,
    /// `cgroup.freeze` the instance (opt-in).
    Freeze,
    /// `cgroup.kill` the instance (opt-in).
    Kill,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<Spanned<Mode>>,
    host: Option<Spanned<RawHost>>,
    #[serde(rename = "type", default)]
    types: Vec<Spanned<RawType>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    max_tasks: Option<Spanned<i64>>,
    warn_at: Option<Spanned<f64>>,
    deny_at: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    name: Spanned<String>,
    path: Spanned<String>,
    max_tasks: Spanned<i64>,
    max_threads: Option<Spanned<i64>>,
    fork_rate: Option<Spanned<ForkRate>>,
    mode: Option<Mode>,
    max_instances: Option<Spanned<i64>>,
    max_total_tasks: Option<Spanned<i64>>,
    max_age: Option<Spanned<String>>,
    on_max_age: Option<Spanned<OnMaxAge>>,
    #[serde(default)]
    exempt: bool,
    breaker: Option<Spanned<RawBreaker>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    startup_window: Option<Spanned<String>>,
    failures: Option<Spanned<i64>>,
    within: Option<Spanned<String>>,
    open_for: Option<Spanned<Vec<String>>>,
    backoff: Option<Spanned<RawBackoff>>,
    deny_storm: Option<Spanned<RawDenyStorm>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    base: String,
    factor: f64,
    max: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDenyStorm {
    denials: i64,
    within: String,
}

/// A type's circuit breaker, validated.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BreakerPolicy {
    /// An instance that ends within this time of its admission is a start-up failure.
    #[serde(with = "humantime_serde")]
    pub startup_window: Duration,
    /// Start-up failures within `within` that open the breaker.
    pub failures: u64,
    #[serde(with = "humantime_serde")]
    pub within: Duration,
    /// Successive open durations; the last repeats.
    #[serde(with = "humantime_serde_vec")]
    pub open_for: Vec<Duration>,
    /// This many enforced denials in the type within `storm_within` also open it.
    pub storm_denials: Option<u64>,
    #[serde(with = "humantime_serde_opt")]
    pub storm_within: Option<Duration>,
}

/// Longest backoff schedule kept (the kernel's table).
pub const MAX_BACKOFF_STEPS: usize = spawnguard_common::BREAKER_STEPS;

/// One agent type, validated.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TypePolicy {
    pub name: String,
    /// Relative to the cgroup2 mount.
    pub path: String,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub fork_rate: Option<ForkRate>,
    pub mode: Mode,
    /// Live instances of this type at once.
    pub max_instances: Option<u64>,
    /// Live tasks of all instances of this type together.
    pub max_total_tasks: Option<u64>,
    /// Measured from the instance's creation, never from activity.
    #[serde(with = "humantime_serde_opt")]
    pub max_age: Option<Duration>,
    pub on_max_age: OnMaxAge,
    /// Only observed (counted, reported), never denied.
    pub exempt: bool,
    pub breaker: Option<BreakerPolicy>,
}

impl TypePolicy {
    /// The mode the kernel applies: an exempt type is never denied.
    pub fn effective_mode(&self) -> Mode {
        if self.exempt {
            Mode::Audit
        } else {
            self.mode
        }
    }
}

/// The host-wide budget and the warning threshold of every budget.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostPolicy {
    /// All instances of all types together.
    pub max_tasks: Option<u64>,
    /// Fraction of every budget at which a warning fires.
    pub warn_at: f64,
    /// Fraction of the host budget above which new tasks are denied.
    pub deny_at: f64,
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            max_tasks: None,
            warn_at: DEFAULT_WARN_AT,
            deny_at: DEFAULT_DENY_AT,
        }
    }
}

pub const DEFAULT_WARN_AT: f64 = 0.70;
pub const DEFAULT_DENY_AT: f64 = 1.0;

/// A validated policy.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    pub host: HostPolicy,
    pub types: Vec<TypePolicy>,
}

mod humantime_serde {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod humantime_serde_vec {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(d.iter().map(|d| humantime::format_duration(*d).to_string()))
    }
}

mod humantime_serde_opt {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// A policy that did not validate: where, which field, what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Serialize)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Largest fork rate accepted (tokens per second); more is no limit at all.
const MAX_PER_SEC: f64 = 1_000_000.0;

impl Policy {
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the policy file: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn default_policy() -> Self {
        Self::parse(DEFAULT_POLICY, "<embedded default policy>")
            .expect("the embedded default policy is valid")
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let err = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            PolicyError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        if text.trim().is_empty() {
            return Err(err(
                None,
                "the policy is empty: it needs at least one [[type]]".into(),
            ));
        }
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| err(e.span(), one_line(e.message())))?;
        let mode = raw.mode.map(|m| *m.get_ref()).unwrap_or_default();
        let host = match &raw.host {
            None => HostPolicy::default(),
            Some(h) => {
                let h_span = h.span();
                let h = h.get_ref();
                let max_tasks =
                    match &h.max_tasks {
                        None => None,
                        Some(v) => Some(positive(v).map_err(|m| {
                            err(Some(v.span()), format!("host field max_tasks: {m}"))
                        })?),
                    };
                let fraction = |v: &Option<Spanned<f64>>, field: &str, default: f64| match v {
                    None => Ok(default),
                    Some(f) if *f.get_ref() > 0.0 && *f.get_ref() <= 1.0 => Ok(*f.get_ref()),
                    Some(f) => Err(err(
                        Some(f.span()),
                        format!(
                            "host field {field}: must be a fraction above 0 and at most 1, got {}",
                            f.get_ref()
                        ),
                    )),
                };
                let warn_at = fraction(&h.warn_at, "warn_at", DEFAULT_WARN_AT)?;
                let deny_at = fraction(&h.deny_at, "deny_at", DEFAULT_DENY_AT)?;
                if warn_at >= deny_at {
                    let span = h.warn_at.as_ref().map_or(h_span, Spanned::span);
                    return Err(err(
                        Some(span),
                        format!(
                            "host field warn_at: {warn_at} must be below deny_at ({deny_at}): a \
                             warning after the denials start warns of nothing"
                        ),
                    ));
                }
                HostPolicy {
                    max_tasks,
                    warn_at,
                    deny_at,
                }
            }
        };
        if raw.types.is_empty() {
            return Err(err(
                None,
                "no [[type]] defined: the policy guards nothing".into(),
            ));
        }
        if raw.types.len() > MAX_TYPES as usize {
            return Err(err(
                Some(raw.types[MAX_TYPES as usize].span()),
                format!("at most {MAX_TYPES} types are supported"),
            ));
        }
        let mut names = HashSet::new();
        let mut types: Vec<TypePolicy> = Vec::new();
        for t in &raw.types {
            let t = t.get_ref();
            let name = t.name.get_ref().clone();
            let field = |f: &str| format!("type \"{name}\" field {f}");
            let valid_name = !name.is_empty()
                && name.len() < TYPE_NAME_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(err(
                    Some(t.name.span()),
                    format!(
                        "{}: must be 1 to {} characters of a-z, A-Z, 0-9, '-' and '_'",
                        field("name"),
                        TYPE_NAME_LEN - 1
                    ),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(err(
                    Some(t.name.span()),
                    format!("{}: duplicate type name", field("name")),
                ));
            }
            let path = normalize_path(t.path.get_ref())
                .map_err(|m| err(Some(t.path.span()), format!("{}: {m}", field("path"))))?;
            for other in &types {
                if overlaps(&path, &other.path) {
                    return Err(err(
                        Some(t.path.span()),
                        format!(
                            "{}: \"{path}\" overlaps type \"{}\" at \"{}\"; type directories \
                             must not contain each other",
                            field("path"),
                            other.name,
                            other.path
                        ),
                    ));
                }
            }
            let max_tasks = positive(&t.max_tasks).map_err(|m| {
                err(
                    Some(t.max_tasks.span()),
                    format!("{}: {m}", field("max_tasks")),
                )
            })?;
            let max_threads = match &t.max_threads {
                None => max_tasks,
                Some(v) => {
                    let n = non_negative(v).map_err(|m| {
                        err(Some(v.span()), format!("{}: {m}", field("max_threads")))
                    })?;
                    if n > max_tasks {
                        return Err(err(
                            Some(v.span()),
                            format!(
                                "{}: {n} exceeds max_tasks ({max_tasks}); threads are tasks",
                                field("max_threads")
                            ),
                        ));
                    }
                    n
                }
            };
            let fork_rate = match &t.fork_rate {
                None => None,
                Some(r) => {
                    let rate = *r.get_ref();
                    if rate.burst == 0 {
                        return Err(err(
                            Some(r.span()),
                            format!("{}: burst must be at least 1", field("fork_rate")),
                        ));
                    }
                    if !(rate.per_sec.is_finite()
                        && rate.per_sec > 0.0
                        && rate.per_sec <= MAX_PER_SEC)
                    {
                        return Err(err(
                            Some(r.span()),
                            format!(
                                "{}: per_sec must be above 0 and at most {MAX_PER_SEC}",
                                field("fork_rate")
                            ),
                        ));
                    }
                    Some(rate)
                }
            };
            let optional_positive = |v: &Option<Spanned<i64>>, f: &str| match v {
                None => Ok(None),
                Some(v) => positive(v)
                    .map(Some)
                    .map_err(|m| err(Some(v.span()), format!("{}: {m}", field(f)))),
            };
            let max_instances = optional_positive(&t.max_instances, "max_instances")?;
            let max_total_tasks = optional_positive(&t.max_total_tasks, "max_total_tasks")?;
            let max_age = match &t.max_age {
                None => None,
                Some(v) => Some(
                    parse_duration(v.get_ref())
                        .map_err(|m| err(Some(v.span()), format!("{}: {m}", field("max_age"))))?,
                ),
            };
            let on_max_age = match &t.on_max_age {
                None => OnMaxAge::default(),
                Some(v) if max_age.is_none() => {
                    return Err(err(
                        Some(v.span()),
                        format!(
                            "{}: set max_age too, or drop on_max_age",
                            field("on_max_age")
                        ),
                    ));
                }
                Some(v) => *v.get_ref(),
            };
            let breaker = match &t.breaker {
                None => None,
                Some(b) => Some(parse_breaker(b, &|f: &str| field(f), &err)?),
            };
            types.push(TypePolicy {
                name,
                path,
                max_tasks,
                max_threads,
                fork_rate,
                mode: t.mode.unwrap_or(mode),
                max_instances,
                max_total_tasks,
                max_age,
                on_max_age,
                exempt: t.exempt,
                breaker,
            });
        }
        Ok(Self { mode, host, types })
    }

    pub fn type_named(&self, name: &str) -> Option<&TypePolicy> {
        self.types.iter().find(|t| t.name == name)
    }
}

/// toml's messages may span lines; a policy error is one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

fn positive(v: &Spanned<i64>) -> Result<u64, String> {
    match *v.get_ref() {
        n if n >= 1 => Ok(n as u64),
        n => Err(format!("must be at least 1, got {n}")),
    }
}

fn non_negative(v: &Spanned<i64>) -> Result<u64, String> {
    match *v.get_ref() {
        n if n >= 0 => Ok(n as u64),
        n => Err(format!("must not be negative, got {n}")),
    }
}

fn parse_breaker(
    b: &Spanned<RawBreaker>,
    field: &dyn Fn(&str) -> String,
    err: &dyn Fn(Option<Range<usize>>, String) -> PolicyError,
) -> Result<BreakerPolicy, PolicyError> {
    let b = b.get_ref();
    let duration = |v: &Option<Spanned<String>>, name: &str, default: u64| match v {
        None => Ok(Duration::from_secs(default)),
        Some(v) => parse_duration(v.get_ref()).map_err(|m| {
            err(
                Some(v.span()),
                format!("{}: {m}", field(&format!("breaker.{name}"))),
            )
        }),
    };
    let startup_window = duration(&b.startup_window, "startup_window", 10)?;
    let within = duration(&b.within, "within", 60)?;
    let failures = match &b.failures {
        None => 3,
        Some(f) => match *f.get_ref() {
            n @ 1..=16 => n as u64,
            n => {
                return Err(err(
                    Some(f.span()),
                    format!("{}: must be 1 to 16, got {n}", field("breaker.failures")),
                ));
            }
        },
    };
    let open_for = match (&b.open_for, &b.backoff) {
        (Some(_), Some(x)) => {
            return Err(err(
                Some(x.span()),
                format!(
                    "{}: give open_for or backoff, not both",
                    field("breaker.backoff")
                ),
            ));
        }
        (Some(list), None) => {
            let l = list.get_ref();
            if l.is_empty() || l.len() > MAX_BACKOFF_STEPS {
                return Err(err(
                    Some(list.span()),
                    format!(
                        "{}: needs 1 to {MAX_BACKOFF_STEPS} durations",
                        field("breaker.open_for")
                    ),
                ));
            }
            l.iter()
                .map(|d| parse_duration(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| {
                    err(
                        Some(list.span()),
                        format!("{}: {m}", field("breaker.open_for")),
                    )
                })?
        }
        (None, Some(x)) => {
            let e = |m: String| err(Some(x.span()), format!("{}: {m}", field("breaker.backoff")));
            let x = x.get_ref();
            let base = parse_duration(&x.base).map_err(&e)?;
            let max = parse_duration(&x.max).map_err(&e)?;
            if !(x.factor.is_finite() && x.factor >= 1.0) {
                return Err(e(format!("factor must be at least 1.0, got {}", x.factor)));
            }
            if max < base {
                return Err(e("max must not be below base".into()));
            }
            (0..MAX_BACKOFF_STEPS as i32)
                .map(|i| base.mul_f64(x.factor.powi(i)).min(max))
                .collect()
        }
        (None, None) => [30, 120, 600].map(Duration::from_secs).to_vec(),
    };
    let (storm_denials, storm_within) = match &b.deny_storm {
        None => (None, None),
        Some(s) => {
            let e = |m: String| {
                err(
                    Some(s.span()),
                    format!("{}: {m}", field("breaker.deny_storm")),
                )
            };
            let st = s.get_ref();
            if st.denials < 1 {
                return Err(e(format!("denials must be at least 1, got {}", st.denials)));
            }
            (
                Some(st.denials as u64),
                Some(parse_duration(&st.within).map_err(&e)?),
            )
        }
    };
    Ok(BreakerPolicy {
        startup_window,
        failures,
        within,
        open_for,
        storm_denials,
        storm_within,
    })
}

/// `30s`, `2m`, `1h` (and combinations such as `1h30m`); at least one second.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("\"{text}\" is not a duration like 30s, 2m or 1h ({e})"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("\"{text}\" is shorter than one second"));
    }
    Ok(d)
}

/// A type path: relative to the cgroup2 mount, no `.`/`..`, no empty components.
fn normalize_path(p: &str) -> Result<String, String> {
    if p.starts_with('/') {
        return Err(format!(
            "\"{p}\" must be relative to the cgroup2 mount (drop the leading '/')"
        ));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() {
        return Err("must name a directory under the cgroup2 mount".into());
    }
    for c in &parts {
        if *c == "." || *c == ".." || c.starts_with("cgroup.") || c.contains(char::is_whitespace) {
            return Err(format!("component \"{c}\" is not allowed"));
        }
        // The kernel compares each component of a type path at every mkdir, in a fixed buffer.
        let most = spawnguard_common::PATH_NAME_LEN - 2;
        if c.len() > most {
            return Err(format!(
                "component \"{c}\" is {} bytes long; at most {most} are supported",
                c.len()
            ));
        }
    }
    Ok(parts.join("/"))
}

fn overlaps(a: &str, b: &str) -> bool {
    let within =
        |inner: &str, outer: &str| inner == outer || inner.starts_with(&format!("{outer}/"));
    within(a, b) || within(b, a)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "p.toml")
    }

    const GOOD: &str = r#"
mode = "enforce"

[[type]]
name = "devsecops"
path = "agents/devsecops"
max_tasks = 64
max_threads = 48
fork_rate = { burst = 20, per_sec = 2.0 }
mode = "audit"

[[type]]
name = "social"
path = "agents/social/"
max_tasks = 10
"#;

    #[test]
    fn parses_the_documented_fields() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.types.len(), 2);
        let d = &p.types[0];
        assert_eq!((d.max_tasks, d.max_threads, d.mode), (64, 48, Mode::Audit));
        assert_eq!(d.fork_rate.unwrap().burst, 20);
        let s = &p.types[1];
        assert_eq!(s.path, "agents/social");
        assert_eq!(
            (s.max_threads, s.mode, s.fork_rate),
            (10, Mode::Enforce, None)
        );
    }

    #[test]
    fn documented_examples_are_valid() {
        let p = Policy::parse(
            include_str!("../../deploy/examples/midnight-cascade.toml"),
            "midnight-cascade.toml",
        )
        .unwrap();
        let ceilings: Vec<_> = p
            .types
            .iter()
            .map(|t| (t.name.as_str(), t.max_instances))
            .collect();
        assert_eq!(
            ceilings,
            [
                ("devsecops", Some(10)),
                ("social", Some(10)),
                ("orchestrator", Some(5)),
                ("aria", Some(5))
            ]
        );
    }

    #[test]
    fn breaker_examples_are_valid() {
        for (name, text) in [
            (
                "midnight",
                include_str!("../../deploy/examples/breaker-midnight-cascade.toml"),
            ),
            (
                "respawn",
                include_str!("../../deploy/examples/breaker-respawn-loop.toml"),
            ),
            (
                "cadence",
                include_str!("../../deploy/examples/breaker-cadence-consumer.toml"),
            ),
        ] {
            let p = Policy::parse(text, name).unwrap();
            assert!(p.types[0].breaker.is_some(), "{name}");
        }
        let respawn = Policy::parse(
            include_str!("../../deploy/examples/breaker-respawn-loop.toml"),
            "respawn",
        )
        .unwrap();
        let steps: Vec<u64> = respawn.types[0].breaker.as_ref().unwrap().open_for[..4]
            .iter()
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(steps, [300, 600, 1200, 2400], "300 s x 2^n");
    }

    #[test]
    fn default_policy_is_valid() {
        let p = Policy::default_policy();
        assert_eq!(p.types[0].name, "agents");
        assert_eq!(p.types[0].path, "spawnguard/agents");
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let bad = GOOD.replace("max_tasks = 10", "max_tasks = 0");
        assert_eq!(
            error(&bad),
            "p.toml:15:13: type \"social\" field max_tasks: must be at least 1, got 0"
        );
        let e = error(&GOOD.replace("max_threads = 48", "max_threads = 48\nmax_thread = 4"));
        assert!(
            e.starts_with("p.toml:9:1: unknown field `max_thread`"),
            "{e}"
        );
        let e = error(&GOOD.replace("\"agents/social/\"", "\"agents/devsecops/x\""));
        assert!(e.contains("overlaps type \"devsecops\""), "{e}");
        let e = error(&GOOD.replace("\"social\"", "\"devsecops\""));
        assert!(e.contains("duplicate type name"), "{e}");
        let e = error(&GOOD.replace("max_threads = 48", "max_threads = 65"));
        assert!(e.contains("exceeds max_tasks (64)"), "{e}");
        let e = error(&GOOD.replace("per_sec = 2.0", "per_sec = 0.0"));
        assert!(e.contains("field fork_rate: per_sec"), "{e}");
        let e = error(&GOOD.replace("burst = 20", "burst = 0"));
        assert!(e.contains("burst must be at least 1"), "{e}");
        let e = error(&GOOD.replace("mode = \"audit\"", "mode = \"block\""));
        assert!(e.contains("unknown variant `block`"), "{e}");
        let e = error(&GOOD.replace("\"agents/social/\"", "\"/sys/fs/cgroup/x\""));
        assert!(e.contains("must be relative"), "{e}");
        let e = error(&GOOD.replace("\"agents/social/\"", "\"agents/../x\""));
        assert!(e.contains("component \"..\""), "{e}");
        assert!(error("").contains("empty"));
        assert!(error("mode = \"audit\"").contains("no [[type]]"));
        assert!(error("[[type]\n").starts_with("p.toml:1:"));
        let e = error(&GOOD.replace("max_tasks = 64", "max_tasks = \"64\""));
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
