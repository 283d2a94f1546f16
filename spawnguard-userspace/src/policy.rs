//! The policy file (TOML): parsing, validation with file/line/column errors, and the default
//! policy embedded in the binary.

use std::{fmt, ops::Range, path::Path, time::Duration};

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
        let bytes = std::fs::read(path).map_err(|e| PolicyError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the policy file: {e}"),
        })?;
        Self::parse_bytes(&bytes, &path.display().to_string())
    }

    /// `parse`, of a file's bytes: text that is not UTF-8 is refused at its first bad byte.
    pub fn parse_bytes(bytes: &[u8], file: &str) -> Result<Self, PolicyError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::parse(text, file),
            Err(e) => {
                // The valid part locates the bad byte (its column counts characters).
                let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
                Err(Source { text: valid, file }.error(
                    Some(valid.len()..valid.len()),
                    format!(
                        "the policy is not UTF-8 text (invalid byte 0x{:02x})",
                        bytes[e.valid_up_to()]
                    ),
                ))
            }
        }
    }

    pub fn default_policy() -> Self {
        Self::parse(DEFAULT_POLICY, "<embedded default policy>")
            .expect("the embedded default policy is valid")
    }

    /// Parses and validates `text`; `file` names it in errors. The first error found is the
    /// one reported: the host section, then each type in order, each checked against the types
    /// before it.
    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let source = Source { text, file };
        let raw = source.toml()?;
        let mode = raw.mode.map(|m| *m.get_ref()).unwrap_or_default();
        let host = match &raw.host {
            None => HostPolicy::default(),
            Some(h) => parse_host(h, &source)?,
        };
        source.check_type_count(&raw.types)?;
        let mut types: Vec<TypePolicy> = Vec::new();
        for t in &raw.types {
            let parsed = parse_type(t.get_ref(), mode, &types, &source)?;
            types.push(parsed);
        }
        Ok(Self { mode, host, types })
    }

    pub fn type_named(&self, name: &str) -> Option<&TypePolicy> {
        self.types.iter().find(|t| t.name == name)
    }
}

/// The policy text and the name it goes by: turns a place in the text into an error.
struct Source<'a> {
    text: &'a str,
    file: &'a str,
}

impl Source<'_> {
    /// An error at the start of `span` (the top of the file without one).
    fn error(&self, span: Option<Range<usize>>, message: String) -> PolicyError {
        let (line, column) = line_col(self.text, span.map_or(0, |s| s.start));
        PolicyError {
            file: self.file.to_owned(),
            line,
            column,
            message,
        }
    }

    /// The TOML, read into its raw shape: syntax, unknown fields and wrong value types.
    fn toml(&self) -> Result<RawPolicy, PolicyError> {
        if self.text.trim().is_empty() {
            return Err(self.error(
                None,
                "the policy is empty: it needs at least one [[type]]".into(),
            ));
        }
        toml::from_str(self.text).map_err(|e| {
            let mut message = one_line(e.message());
            if message.is_empty() {
                // toml says nothing for some characters (a control character in a comment).
                let at = e.span().map_or(0, |s| s.start);
                message = match self.text.get(at..).and_then(|t| t.chars().next()) {
                    Some(c) => format!("invalid TOML: character {c:?} is not allowed here"),
                    None => "invalid TOML".into(),
                };
            }
            // toml names the field only for unknown and missing ones: name it for the others
            // (a wrong type, a bad value) from the line the error points at.
            if let Some((what, key)) = e.span().and_then(|s| key_at(self.text, s.start)) {
                let bare = key.trim_matches(|c| c == '[' || c == ']');
                if !message.contains(&format!("`{bare}`")) {
                    message = format!("{what} {key}: {message}");
                }
            }
            self.error(e.span(), message)
        })
    }

    /// At least one type, and no more than the kernel's tables hold.
    fn check_type_count(&self, types: &[Spanned<RawType>]) -> Result<(), PolicyError> {
        if types.is_empty() {
            return Err(self.error(
                None,
                "no [[type]] defined: the policy guards nothing".into(),
            ));
        }
        if types.len() > MAX_TYPES as usize {
            return Err(self.error(
                Some(types[MAX_TYPES as usize].span()),
                format!("at most {MAX_TYPES} types are supported"),
            ));
        }
        Ok(())
    }
}

/// A section of the policy (`host`, `type "a"`): its errors name it and the field.
struct Section<'a> {
    source: &'a Source<'a>,
    name: String,
}

impl Section<'_> {
    fn error(&self, span: Range<usize>, field: &str, message: impl fmt::Display) -> PolicyError {
        self.source.error(
            Some(span),
            format!("{} field {field}: {message}", self.name),
        )
    }

    /// An optional count of at least 1.
    fn optional_positive(
        &self,
        v: &Option<Spanned<i64>>,
        field: &str,
    ) -> Result<Option<u64>, PolicyError> {
        v.as_ref()
            .map(|v| positive(v).map_err(|m| self.error(v.span(), field, m)))
            .transpose()
    }

    /// An optional duration (`30s`, `2m`), or `default` seconds.
    fn duration_or(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: u64,
    ) -> Result<Duration, PolicyError> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(v) => parse_duration(v.get_ref()).map_err(|m| self.error(v.span(), field, m)),
        }
    }
}

/// `[host]`: the host budget and the thresholds of every budget.
fn parse_host(h: &Spanned<RawHost>, source: &Source) -> Result<HostPolicy, PolicyError> {
    let section = Section {
        source,
        name: "host".into(),
    };
    let h_span = h.span();
    let h = h.get_ref();
    let max_tasks = section.optional_positive(&h.max_tasks, "max_tasks")?;
    let fraction = |v: &Option<Spanned<f64>>, field: &str, default: f64| match v {
        None => Ok(default),
        Some(f) if *f.get_ref() > 0.0 && *f.get_ref() <= 1.0 => Ok(*f.get_ref()),
        Some(f) => Err(section.error(
            f.span(),
            field,
            format!(
                "must be a fraction above 0 and at most 1, got {}",
                f.get_ref()
            ),
        )),
    };
    let warn_at = fraction(&h.warn_at, "warn_at", DEFAULT_WARN_AT)?;
    let deny_at = fraction(&h.deny_at, "deny_at", DEFAULT_DENY_AT)?;
    if warn_at >= deny_at {
        let span = h.warn_at.as_ref().map_or(h_span, Spanned::span);
        return Err(section.error(
            span,
            "warn_at",
            format!(
                "{warn_at} must be below deny_at ({deny_at}): a warning after the denials start \
                 warns of nothing"
            ),
        ));
    }
    Ok(HostPolicy {
        max_tasks,
        warn_at,
        deny_at,
    })
}

/// One `[[type]]`, checked against the types before it (`earlier`); `mode` is the policy's.
fn parse_type(
    t: &RawType,
    mode: Mode,
    earlier: &[TypePolicy],
    source: &Source,
) -> Result<TypePolicy, PolicyError> {
    let name = t.name.get_ref().clone();
    let section = Section {
        source,
        name: format!("type \"{name}\""),
    };
    check_type_name(&t.name, &section)?;
    if earlier.iter().any(|other| other.name == name) {
        return Err(section.error(t.name.span(), "name", "duplicate type name"));
    }
    let path = type_path(&t.path, earlier, &section)?;
    let (max_tasks, max_threads) = task_budgets(t, &section)?;
    let fork_rate = t
        .fork_rate
        .as_ref()
        .map(|r| fork_rate(r, &section))
        .transpose()?;
    let max_instances = section.optional_positive(&t.max_instances, "max_instances")?;
    let max_total_tasks = section.optional_positive(&t.max_total_tasks, "max_total_tasks")?;
    let (max_age, on_max_age) = age_limit(t, &section)?;
    let breaker = t
        .breaker
        .as_ref()
        .map(|b| parse_breaker(b, &section))
        .transpose()?;
    Ok(TypePolicy {
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
    })
}

/// A type name is a key in the kernel's tables: short, and plain characters.
fn check_type_name(name: &Spanned<String>, section: &Section) -> Result<(), PolicyError> {
    let n = name.get_ref();
    let valid = !n.is_empty()
        && n.len() < TYPE_NAME_LEN
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        return Ok(());
    }
    Err(section.error(
        name.span(),
        "name",
        format!(
            "must be 1 to {} characters of a-z, A-Z, 0-9, '-' and '_'",
            TYPE_NAME_LEN - 1
        ),
    ))
}

/// The type's directory, normalized; no type's directory may contain another's.
fn type_path(
    path: &Spanned<String>,
    earlier: &[TypePolicy],
    section: &Section,
) -> Result<String, PolicyError> {
    let normal =
        normalize_path(path.get_ref()).map_err(|m| section.error(path.span(), "path", m))?;
    match earlier.iter().find(|other| overlaps(&normal, &other.path)) {
        None => Ok(normal),
        Some(other) => Err(section.error(
            path.span(),
            "path",
            format!(
                "\"{normal}\" overlaps type \"{}\" at \"{}\"; type directories must not contain \
                 each other",
                other.name, other.path
            ),
        )),
    }
}

/// `max_tasks`, and `max_threads` (at most `max_tasks`: threads are tasks; by default equal).
fn task_budgets(t: &RawType, section: &Section) -> Result<(u64, u64), PolicyError> {
    let max_tasks =
        positive(&t.max_tasks).map_err(|m| section.error(t.max_tasks.span(), "max_tasks", m))?;
    let max_threads = match &t.max_threads {
        None => max_tasks,
        Some(v) => {
            let n = non_negative(v).map_err(|m| section.error(v.span(), "max_threads", m))?;
            if n > max_tasks {
                return Err(section.error(
                    v.span(),
                    "max_threads",
                    format!("{n} exceeds max_tasks ({max_tasks}); threads are tasks"),
                ));
            }
            n
        }
    };
    Ok((max_tasks, max_threads))
}

fn fork_rate(r: &Spanned<ForkRate>, section: &Section) -> Result<ForkRate, PolicyError> {
    let rate = *r.get_ref();
    if rate.burst == 0 {
        return Err(section.error(r.span(), "fork_rate", "burst must be at least 1"));
    }
    if !(rate.per_sec.is_finite() && rate.per_sec > 0.0 && rate.per_sec <= MAX_PER_SEC) {
        return Err(section.error(
            r.span(),
            "fork_rate",
            format!("per_sec must be above 0 and at most {MAX_PER_SEC}"),
        ));
    }
    Ok(rate)
}

/// `max_age` and what happens past it (`on_max_age` means nothing without `max_age`).
fn age_limit(t: &RawType, section: &Section) -> Result<(Option<Duration>, OnMaxAge), PolicyError> {
    let max_age = t
        .max_age
        .as_ref()
        .map(|v| parse_duration(v.get_ref()).map_err(|m| section.error(v.span(), "max_age", m)))
        .transpose()?;
    let on_max_age = match &t.on_max_age {
        None => OnMaxAge::default(),
        Some(v) if max_age.is_none() => {
            return Err(section.error(
                v.span(),
                "on_max_age",
                "set max_age too, or drop on_max_age",
            ));
        }
        Some(v) => *v.get_ref(),
    };
    Ok((max_age, on_max_age))
}

/// A type's `[type.breaker]`: its window, threshold, open durations and deny storm.
fn parse_breaker(b: &Spanned<RawBreaker>, section: &Section) -> Result<BreakerPolicy, PolicyError> {
    let b = b.get_ref();
    let startup_window = section.duration_or(&b.startup_window, "breaker.startup_window", 10)?;
    let within = section.duration_or(&b.within, "breaker.within", 60)?;
    let failures = match &b.failures {
        None => 3,
        Some(f) => match *f.get_ref() {
            n @ 1..=16 => n as u64,
            n => {
                return Err(section.error(
                    f.span(),
                    "breaker.failures",
                    format!("must be 1 to 16, got {n}"),
                ));
            }
        },
    };
    let open_for = open_durations(b, section)?;
    let (storm_denials, storm_within) = match &b.deny_storm {
        None => (None, None),
        Some(s) => {
            let (denials, within) = deny_storm(s, section)?;
            (Some(denials), Some(within))
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

/// How long the breaker stays open each time: a list (`open_for`), a schedule (`backoff`), or
/// 30 s, 2 min, 10 min.
fn open_durations(b: &RawBreaker, section: &Section) -> Result<Vec<Duration>, PolicyError> {
    match (&b.open_for, &b.backoff) {
        (Some(_), Some(x)) => Err(section.error(
            x.span(),
            "breaker.backoff",
            "give open_for or backoff, not both",
        )),
        (Some(list), None) => {
            let e = |m: String| section.error(list.span(), "breaker.open_for", m);
            let l = list.get_ref();
            if l.is_empty() || l.len() > MAX_BACKOFF_STEPS {
                return Err(e(format!("needs 1 to {MAX_BACKOFF_STEPS} durations")));
            }
            l.iter()
                .map(|d| parse_duration(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(e)
        }
        (None, Some(x)) => backoff_schedule(x, section),
        (None, None) => Ok([30, 120, 600].map(Duration::from_secs).to_vec()),
    }
}

/// `backoff = { base, factor, max }`: base x factor^n, at most max, for every kernel step.
fn backoff_schedule(
    x: &Spanned<RawBackoff>,
    section: &Section,
) -> Result<Vec<Duration>, PolicyError> {
    let e = |m: String| section.error(x.span(), "breaker.backoff", m);
    let x = x.get_ref();
    let base = parse_duration(&x.base).map_err(e)?;
    let max = parse_duration(&x.max).map_err(e)?;
    if !(x.factor.is_finite() && x.factor >= 1.0) {
        return Err(e(format!("factor must be at least 1.0, got {}", x.factor)));
    }
    if max < base {
        return Err(e("max must not be below base".into()));
    }
    Ok((0..MAX_BACKOFF_STEPS as i32)
        .map(|i| base.mul_f64(x.factor.powi(i)).min(max))
        .collect())
}

/// `deny_storm = { denials, within }`: that many enforced denials within that time.
fn deny_storm(
    s: &Spanned<RawDenyStorm>,
    section: &Section,
) -> Result<(u64, Duration), PolicyError> {
    let e = |m: String| section.error(s.span(), "breaker.deny_storm", m);
    let st = s.get_ref();
    if st.denials < 1 {
        return Err(e(format!("denials must be at least 1, got {}", st.denials)));
    }
    Ok((st.denials as u64, parse_duration(&st.within).map_err(e)?))
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

/// What the line holding `offset` sets, as (what it is, its name): ("field", KEY) for
/// `KEY = ...` (or a bare `KEY ...` missing its `=`), ("section", `[NAME]`) for a table header;
/// `None` for anything else.
fn key_at(text: &str, offset: usize) -> Option<(&'static str, &str)> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or_default().trim();
    let plain = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    };
    if line.starts_with('[') {
        // The header as written: `[[type]]`, `[type.breaker]`.
        let header = line.split('#').next().unwrap_or_default().trim();
        let name = header.trim_matches(|c| c == '[' || c == ']');
        return plain(name).then_some(("section", header));
    }
    let key = match line.split_once('=') {
        Some((key, _)) => key.trim(),
        None => line.split_whitespace().next()?,
    };
    plain(key).then_some(("field", key))
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

    /// The bad policies of the fuzz seed corpus (`fuzz/seeds/policy/bad-*.toml`): each is
    /// refused at the line its first line names, and the refusal names the field it gives.
    #[test]
    fn every_bad_policy_is_refused_at_its_line_naming_its_field() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/policy");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("bad-"))
            })
            .collect();
        files.sort();
        assert!(files.len() >= 50, "{} bad policies", files.len());
        let mut wrong = Vec::new();
        for f in &files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            // "# bad policy: refused at line N, naming 'FIELD'"
            let head = text.lines().next().unwrap();
            let rest = head
                .strip_prefix("# bad policy: refused at line ")
                .unwrap_or_else(|| panic!("{name}: no expectation on its first line"));
            let (line, field) = match rest.split_once(", naming ") {
                Some((l, f)) => (l, Some(f.trim_matches('\''))),
                None => (rest, None),
            };
            let line: usize = line.parse().unwrap();
            match Policy::parse_bytes(&bytes, &name) {
                Ok(_) => wrong.push(format!("{name}: accepted")),
                Err(e) => {
                    let names_field = field.is_none_or(|f| e.message.contains(f));
                    if e.file != name || e.line != line || e.column < 1 || !names_field {
                        wrong.push(format!(
                            "{name}: want line {line} naming {field:?}, got {e}"
                        ));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Fuzz finding (policy target): a control character in a comment made toml give an
    /// error with an empty message; the refusal must still say what is wrong.
    #[test]
    fn a_control_character_is_refused_with_a_message() {
        let e = parse("# \x0f\0\0\0\0\0\0\0here\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 3), "{e}");
        assert_eq!(
            e.message, "invalid TOML: character '\\u{f}' is not allowed here",
            "{e}"
        );
    }

    /// Bytes that are not UTF-8 are refused where the first bad one is.
    #[test]
    fn text_that_is_not_utf8_is_refused_at_its_first_bad_byte() {
        let e = Policy::parse_bytes(b"[[type]]\nname = \"a\xff\"\n", "p.toml").unwrap_err();
        assert_eq!((e.line, e.column), (2, 10), "{e}");
        assert!(e.message.contains("not UTF-8"), "{e}");
    }

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
    fn a_type_is_checked_against_earlier_types_before_its_own_fields() {
        // The duplicate name is found before the same type's bad max_tasks.
        let e = error(
            &GOOD
                .replace("\"social\"", "\"devsecops\"")
                .replace("= 10", "= 0"),
        );
        assert_eq!(
            e,
            "p.toml:13:8: type \"devsecops\" field name: duplicate type name"
        );
        // A type's own fields are checked before the next type is looked at.
        let e = error(
            &GOOD
                .replace("max_tasks = 64", "max_tasks = -1")
                .replace("\"social\"", "\"devsecops\""),
        );
        assert!(
            e.contains("field max_tasks: must be at least 1, got -1"),
            "{e}"
        );
    }

    #[test]
    fn host_thresholds_are_ordered_fractions() {
        let host = |h: &str| parse(&format!("{GOOD}[host]\n{h}\n")).map(|p| p.host);
        let h = host("max_tasks = 500\nwarn_at = 0.5\ndeny_at = 0.9").unwrap();
        assert_eq!((h.max_tasks, h.warn_at, h.deny_at), (Some(500), 0.5, 0.9));
        assert_eq!(host("").unwrap(), HostPolicy::default());
        let e = host("deny_at = 0.6").unwrap_err().to_string();
        assert!(
            e.ends_with(
                "host field warn_at: 0.7 must be below deny_at (0.6): a warning after the \
                 denials start warns of nothing"
            ),
            "{e}"
        );
        let e = host("warn_at = 0").unwrap_err().to_string();
        assert!(e.contains("host field warn_at: must be a fraction"), "{e}");
    }

    #[test]
    fn type_paths_are_relative_and_apart() {
        let source = Source {
            text: "",
            file: "p.toml",
        };
        let section = Section {
            source: &source,
            name: "type \"b\"".into(),
        };
        let earlier = parse(GOOD).unwrap().types;
        let path = |p: &str| type_path(&Spanned::new(0..0, p.to_owned()), &earlier, &section);
        assert_eq!(path("x//y/").unwrap(), "x/y");
        assert!(path("agents")
            .unwrap_err()
            .message
            .contains("overlaps type \"devsecops\""));
        assert!(
            path("agents/devsecops2").is_ok(),
            "a shared prefix is not containment"
        );
    }

    #[test]
    fn breaker_defaults_and_backoff_schedule() {
        let breaker = |b: &str| {
            parse(&format!("{GOOD}[type.breaker]\n{b}\n")).map(|p| p.types[1].breaker.clone())
        };
        let b = breaker("").unwrap().unwrap();
        let secs = |d: &[Duration]| d.iter().map(Duration::as_secs).collect::<Vec<_>>();
        assert_eq!(
            (b.startup_window.as_secs(), b.failures, b.within.as_secs()),
            (10, 3, 60)
        );
        assert_eq!(secs(&b.open_for), [30, 120, 600]);
        let b = breaker("backoff = { base = \"10s\", factor = 3.0, max = \"2m\" }")
            .unwrap()
            .unwrap();
        assert_eq!(b.open_for.len(), MAX_BACKOFF_STEPS);
        assert_eq!(secs(&b.open_for[..4]), [10, 30, 90, 120], "capped at max");
        let b = breaker("deny_storm = { denials = 5, within = \"1m\" }")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.storm_denials, b.storm_within),
            (Some(5), Some(Duration::from_secs(60)))
        );
        let e =
            breaker("open_for = [\"1s\"]\nbackoff = { base = \"1s\", factor = 2.0, max = \"1m\" }")
                .unwrap_err()
                .to_string();
        assert!(
            e.ends_with(
                "type \"social\" field breaker.backoff: give open_for or backoff, not both"
            ),
            "{e}"
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
