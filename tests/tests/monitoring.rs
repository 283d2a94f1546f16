//! The monitoring assets: the alert rules (deploy/prometheus/alerts.yaml) and their promtool
//! tests, the Prometheus Operator's PrometheusRule, the runbook, and the Grafana dashboard
//! (deploy/grafana/spawnguard.json). Their structure is checked here, and every metric and label
//! their PromQL names is looked up in a live scrape of a real daemon, so a renamed metric or
//! label fails this file. Host-only (promtool; the qemu guests skip it by name).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, Expr, VectorSelector},
};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use spawnguard_tests::*;

/// Where every alert's runbook section lives: `RUNBOOK_BASE#<alert name in lower case>` (the
/// anchor GitHub gives the heading `## <alert name>`). The repository has no public URL yet; this
/// is the one place the rules' prefix is decided, and deploy/RUNBOOK.md states it.
const RUNBOOK_BASE: &str = "https://github.com/spawnguard/spawnguard/blob/main/deploy/RUNBOOK.md";

/// The alerts issue 17 asks for, at least.
const ALERTS: &[&str] = &[
    "SpawnguardTargetDown",
    "SpawnguardEnforcerNotReady",
    "SpawnguardDenialsRising",
    "SpawnguardBreakerOpenTooLong",
    "SpawnguardInstancesAtCeiling",
    "SpawnguardHostBudgetWarning",
    "SpawnguardHostBudgetDenying",
    "SpawnguardKernelMapFilling",
    "SpawnguardFailingOpen",
    "SpawnguardEventsDropped",
    "SpawnguardPolicyReloadFailing",
];

/// Labels Prometheus adds to every scraped series (the exporter never has them).
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Metrics port of this file's daemon (not the default, so a real daemon on the host is safe).
const METRICS: &str = "127.0.0.1:19618";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/spawnguard.json")).unwrap()
}

fn text<'a>(v: &'a Yaml, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v:?}"))
}

/// One alerting rule of alerts.yaml.
struct Rule {
    alert: String,
    expr: String,
    severity: String,
    annotations: BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let doc = yaml("deploy/prometheus/alerts.yaml");
    let groups = doc["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .map(|r| Rule {
            alert: text(r, "alert").to_owned(),
            expr: text(r, "expr").to_owned(),
            severity: text(&r["labels"], "severity").to_owned(),
            annotations: r["annotations"]
                .as_mapping()
                .expect("annotations")
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// The anchor GitHub gives a Markdown heading: lower case, punctuation but `-` and `_` dropped,
/// spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of the runbook's alert sections (its `## ` headings).
fn runbook_sections() -> Vec<String> {
    read("deploy/RUNBOOK.md")
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect()
}

#[test]
fn every_alert_follows_the_mixin_conventions_and_has_its_runbook_section() {
    let rules = rules();
    let names: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for want in ALERTS {
        assert!(names.contains(want), "alerts.yaml has no {want}: {names:?}");
    }
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "an alert name twice: {names:?}");
    let sections = runbook_sections();
    assert!(
        read("deploy/RUNBOOK.md").contains(RUNBOOK_BASE),
        "deploy/RUNBOOK.md does not state the runbook's URL {RUNBOOK_BASE}"
    );
    for r in &rules {
        let camel = r.alert.strip_prefix("Spawnguard").unwrap_or("");
        assert!(
            camel.starts_with(|c: char| c.is_ascii_uppercase())
                && camel.chars().all(|c| c.is_ascii_alphanumeric()),
            "{}: not CamelCase after the Spawnguard prefix",
            r.alert
        );
        assert!(
            ["warning", "critical"].contains(&r.severity.as_str()),
            "{}: severity {}",
            r.alert,
            r.severity
        );
        let keys: Vec<&str> = r.annotations.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["description", "runbook_url", "summary"],
            "{}",
            r.alert
        );
        assert!(r.annotations.values().all(|v| !v.trim().is_empty()));
        let anchor = r.alert.to_lowercase();
        assert_eq!(
            r.annotations["runbook_url"],
            format!("{RUNBOOK_BASE}#{anchor}"),
            "{}: runbook_url",
            r.alert
        );
        assert!(
            sections.contains(&anchor),
            "deploy/RUNBOOK.md has no section `## {}` (anchor #{anchor})",
            r.alert
        );
        // Every selector names the scrape job the Service and ServiceMonitor give.
        for s in names_in(&r.expr).selectors {
            if !s.equal.contains(&("job".into(), "spawnguard".into())) {
                panic!("{}: {} without job=\"spawnguard\"", r.alert, s.metric);
            }
        }
    }
    // And no section is left without its alert.
    let anchors: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
    for s in &sections {
        assert!(anchors.contains(s), "RUNBOOK.md section #{s} has no alert");
    }
}

/// promtool, or None where it is missing (a failure under CI=true: setup installs it).
fn promtool() -> Option<&'static str> {
    let have = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing (Debian package prometheus; `cargo xtask setup` installs it), \
             and CI=true"
        );
        eprintln!("skipped: needs promtool");
        return None;
    }
    Some("promtool")
}

fn run_promtool(args: &[&str], file: &Path) {
    let Some(promtool) = promtool() else { return };
    let out = Command::new(promtool)
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_every_alert_fires_and_stays_silent_in_its_tests() {
    let dir = repo().join("deploy/prometheus");
    run_promtool(&["check", "rules"], &dir.join("alerts.yaml"));
    run_promtool(&["test", "rules"], &dir.join("alerts_test.yaml"));
    // Each alert has a case where it fires and one where it stays silent.
    let tests = yaml("deploy/prometheus/alerts_test.yaml");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for case in t["alert_rule_test"].as_sequence().unwrap() {
            let name = text(case, "alertname").to_owned();
            if case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| a.is_empty())
            {
                silent.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for r in rules() {
        assert!(fires.contains(&r.alert), "no test where {} fires", r.alert);
        assert!(
            silent.contains(&r.alert),
            "no test where {} is silent",
            r.alert
        );
    }
}

const PROMETHEUS_RULE: &str = "deploy/kubernetes/overlays/prometheus-operator/prometheusrule.yaml";

#[test]
fn the_prometheus_rule_holds_exactly_the_alert_groups() {
    let rule = yaml(PROMETHEUS_RULE);
    assert_eq!(text(&rule, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(text(&rule, "kind"), "PrometheusRule");
    assert_eq!(text(&rule["metadata"], "namespace"), "spawnguard");
    assert_eq!(text(&rule["metadata"], "name"), "spawnguard");
    let labels = rule["metadata"]["labels"].as_mapping().expect("labels");
    assert!(
        labels.contains_key("prometheus") && labels.contains_key("role"),
        "no labels a Prometheus Operator's ruleSelector picks: {labels:?}"
    );
    let alerts = yaml("deploy/prometheus/alerts.yaml");
    assert!(
        rule["spec"]["groups"] == alerts["groups"],
        "{PROMETHEUS_RULE}: its spec.groups differ from deploy/prometheus/alerts.yaml's groups \
         (run `cargo xtask prometheus-rule`)"
    );
    // The operator's rules through promtool, as Prometheus will load them.
    let mut spec = serde_yaml_ng::Mapping::new();
    spec.insert("groups".into(), rule["spec"]["groups"].clone());
    let file = std::env::temp_dir().join(format!("sg-prometheusrule-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_yaml_ng::to_string(&spec).unwrap()).unwrap();
    run_promtool(&["check", "rules"], &file);
    let _ = std::fs::remove_file(&file);
    // yamllint's default line length, but for a line that is one word (a URL).
    for (n, line) in read(PROMETHEUS_RULE).lines().enumerate() {
        assert!(
            line.len() <= 80 || !line.trim().contains(' '),
            "{PROMETHEUS_RULE}:{}: longer than 80 characters",
            n + 1
        );
    }
}

/// Every panel of the dashboard, those inside rows too.
fn panels(d: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

fn exprs(panel: &Json) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
        .unwrap_or_default()
}

/// A variable of the dashboard, by name.
fn variable<'a>(d: &'a Json, name: &str) -> &'a Json {
    d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the dashboard has no ${name} variable"))
}

/// `label_values(SELECTOR, LABEL)`, a Grafana variable's query: the selector and the label.
fn label_values(query: &str) -> (&str, &str) {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(...): {query}"));
    let (selector, label) = inner.rsplit_once(',').unwrap();
    (selector.trim(), label.trim())
}

#[test]
fn the_dashboard_has_its_variables_panels_and_units() {
    let d = dashboard();
    let ds = variable(&d, "datasource");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let ty = variable(&d, "type");
    assert_eq!(ty["type"], "query");
    let (selector, label) = label_values(ty["query"].as_str().unwrap());
    assert_eq!(label, "type");
    assert!(selector.starts_with("spawnguard_"), "{selector}");
    let from_datasource = Json::String("${datasource}".into());
    for v in ["type", "instance"] {
        assert_eq!(
            variable(&d, v)["datasource"]["uid"],
            from_datasource,
            "${v}"
        );
    }

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "{title}: id twice");
        if p["type"] == "row" {
            continue;
        }
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        assert!(!unit.is_empty(), "panel {title:?} has no unit");
        assert_eq!(p["datasource"]["uid"], from_datasource, "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], from_datasource, "{title}");
        }
        for e in exprs(p) {
            // Every range is Grafana's $__rate_interval (at least 4 scrape intervals).
            for range in e.split('[').skip(1) {
                assert!(range.starts_with("$__rate_interval]"), "{title}: {e}");
            }
            for f in ["rate(", "increase("] {
                assert!(
                    !e.contains(f) || e.contains("[$__rate_interval]"),
                    "{title}: {e}"
                );
            }
            // Every selector filters by the job, the chosen hosts and (if it has one) type.
            for s in names_in(&substitute(e, "TYPE")).selectors {
                assert!(
                    s.equal.contains(&("job".into(), "spawnguard".into()))
                        && s.other.contains(&"instance".into()),
                    "{title}: {} not filtered by job and $instance: {e}",
                    s.metric
                );
            }
        }
    }
    // The panels the issue asks for, each with its metrics.
    let find = |title: &str| {
        *all.iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    for (title, metrics) in [
        (
            "Tasks vs budgets",
            &["spawnguard_tasks", "spawnguard_tasks_max"][..],
        ),
        ("Denials by reason", &["spawnguard_denials_total"]),
        (
            "Instances vs ceilings",
            &["spawnguard_instances", "spawnguard_instances_max"],
        ),
        ("Breaker state", &["spawnguard_breaker_state"]),
        (
            "Host budget",
            &["spawnguard_host_tasks", "spawnguard_host_tasks_max"],
        ),
        (
            "Kernel map fill",
            &["spawnguard_map_entries", "spawnguard_map_capacity"],
        ),
        ("Fail-open", &["spawnguard_fail_open_total"]),
        ("Dropped events", &["spawnguard_events_dropped_total"]),
    ] {
        let p = find(title);
        let named: BTreeSet<String> = exprs(p)
            .iter()
            .flat_map(|e| names_in(&substitute(e, "TYPE")).selectors)
            .map(|s| s.metric)
            .collect();
        for m in metrics {
            assert!(named.contains(*m), "panel {title:?} does not show {m}");
        }
    }
    assert_eq!(find("Breaker state")["type"], "state-timeline");
    assert_eq!(
        find("Kernel map fill")["fieldConfig"]["defaults"]["unit"],
        "percentunit"
    );
    assert!(exprs(find("Denials by reason"))[0].contains("by (type, reason)"));
}

/// One selector of an expression: its metric, its `label="value"` matchers, and the labels of
/// its other matchers (`!=`, `=~`, `!~`).
#[derive(Debug)]
struct Selector {
    metric: String,
    equal: Vec<(String, String)>,
    other: Vec<String>,
}

/// What an expression names: its selectors, and the labels it groups or matches by
/// (`by`/`without`, `on`/`ignoring`, `group_left`/`group_right`).
#[derive(Debug, Default)]
struct Named {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

/// Parses `expr` with a real PromQL parser (promql-parser) and lists what it names.
fn names_in(expr: &str) -> Named {
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("PromQL {expr:?}: {e}"));
    let mut named = Named::default();
    walk(&ast, &mut named);
    named
}

fn walk(e: &Expr, n: &mut Named) {
    let labels = |l: &promql_parser::label::Labels| l.labels.clone();
    match e {
        Expr::Aggregate(a) => {
            if let Some(m) = &a.modifier {
                n.grouping.extend(labels(m.labels()));
            }
            if let Some(p) = &a.param {
                walk(p, n);
            }
            walk(&a.expr, n);
        }
        Expr::Unary(u) => walk(&u.expr, n),
        Expr::Binary(b) => {
            if let Some(m) = &b.modifier {
                if let Some(l) = &m.matching {
                    n.grouping.extend(labels(l.labels()));
                }
                if let Some(l) = m.card.labels() {
                    n.grouping.extend(labels(l));
                }
            }
            walk(&b.lhs, n);
            walk(&b.rhs, n);
        }
        Expr::Paren(p) => walk(&p.expr, n),
        Expr::Subquery(s) => walk(&s.expr, n),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
        Expr::VectorSelector(vs) => n.selectors.push(selector(vs)),
        Expr::MatrixSelector(ms) => n.selectors.push(selector(&ms.vs)),
        Expr::Call(c) => {
            // These take label names as strings, which this walk does not read.
            assert!(
                !["label_replace", "label_join", "sort_by_label"].contains(&c.func.name),
                "{}: name its labels some other way (this check cannot see them)",
                c.func.name
            );
            for a in &c.args.args {
                walk(a, n);
            }
        }
        Expr::Extension(_) => panic!("an extension expression: {e}"),
    }
}

fn selector(vs: &VectorSelector) -> Selector {
    let all: Vec<&Matcher> = vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten())
        .collect();
    let metric = vs.name.clone().or_else(|| {
        all.iter()
            .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone())
    });
    let metric = metric.unwrap_or_else(|| panic!("a selector without a metric name: {vs}"));
    let mut s = Selector {
        metric,
        equal: Vec::new(),
        other: Vec::new(),
    };
    for m in all.into_iter().filter(|m| m.name != "__name__") {
        match m.op {
            MatchOp::Equal => s.equal.push((m.name.clone(), m.value.clone())),
            _ => s.other.push(m.name.clone()),
        }
    }
    s
}

/// Grafana's variables as a dashboard query gets them: `$__rate_interval` a range, `$type` a
/// real type name, `$instance` every host.
fn substitute(expr: &str, type_name: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "5m")
        .replace("${type}", type_name)
        .replace("$type", type_name)
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(!out.contains('$'), "a Grafana variable left in {out:?}");
    out
}

/// Every PromQL expression of the alerts and the dashboard (its panels and the selectors of its
/// variables' `label_values`), variables substituted, each with where it comes from.
fn asset_exprs(type_name: &str) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = rules()
        .into_iter()
        .map(|r| (format!("alert {}", r.alert), r.expr))
        .collect();
    let d = dashboard();
    for p in panels(&d) {
        for e in exprs(p) {
            all.push((
                format!("panel {:?}", p["title"].as_str().unwrap()),
                substitute(e, type_name),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let (selector, label) = label_values(v["query"].as_str().unwrap());
        // The label it lists, as a grouping the selector's metric must have.
        all.push((
            format!("variable ${}", v["name"].as_str().unwrap()),
            format!("count by ({label}) ({})", substitute(selector, type_name)),
        ));
    }
    all
}

/// A scrape's series: metric name to the label sets of its samples.
type Series = BTreeMap<String, Vec<BTreeMap<String, String>>>;

/// Reads Prometheus' text format (label values may hold escaped quotes and commas).
fn parse_scrape(text: &str) -> Series {
    let mut out = Series::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let mut rest = &line[name_end + 1..];
            while !rest.starts_with('}') {
                let (key, after) = rest.split_once("=\"").unwrap();
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next().unwrap() {
                        (_, '\\') => value.push(chars.next().unwrap().1),
                        (i, '"') => break i,
                        (_, c) => value.push(c),
                    }
                };
                labels.insert(key.to_owned(), value);
                rest = after[end + 1..].trim_start_matches(',');
            }
        }
        out.entry(name.to_owned()).or_default().push(labels);
    }
    out
}

/// What `expr` names that `scrape` does not have: a metric (only `up` is Prometheus' own), a
/// label of a selector's metric, a `label="value"` no series has, a grouping label none of the
/// expression's metrics has. Prometheus' target labels (job, instance) are allowed everywhere.
fn missing(expr: &str, scrape: &Series) -> Vec<String> {
    let named = names_in(expr);
    let mut problems = Vec::new();
    let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    for s in &named.selectors {
        let series: &[BTreeMap<String, String>] = if s.metric == "up" {
            &[]
        } else if let Some(series) = scrape.get(&s.metric) {
            series
        } else {
            problems.push(format!("metric {} is not in the scrape", s.metric));
            continue;
        };
        let has: BTreeSet<&String> = series.iter().flat_map(|l| l.keys()).collect();
        known.extend(has.iter().map(|l| l.to_string()));
        let labels = s.equal.iter().map(|(l, _)| l).chain(&s.other);
        for l in labels.filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
            if !has.contains(l) {
                problems.push(format!("{} has no label {l}", s.metric));
            }
        }
        for (l, v) in s.equal.iter() {
            let targets = TARGET_LABELS.contains(&l.as_str());
            if !targets && has.contains(l) && !series.iter().any(|x| x.get(l) == Some(v)) {
                problems.push(format!("no {}{{{l}=\"{v}\"}} in the scrape", s.metric));
            }
        }
    }
    for l in &named.grouping {
        if !known.contains(l) {
            problems.push(format!("no metric of the expression has the label {l}"));
        }
    }
    problems
}

#[test]
fn every_metric_and_label_the_assets_name_is_in_a_live_scrape() {
    if !privileged() {
        return;
    }
    // Every family: a host budget, a type with a ceiling, a total budget and a breaker, and a
    // denial from a bounded bomb.
    let (rel, _tree) = test_type("monitoring");
    let policy_text = format!(
        "[host]\nmax_tasks = 4000\nwarn_at = 0.7\ndeny_at = 0.85\n\n{}",
        policy(
            "mon",
            &rel,
            "max_tasks = 10\nmax_instances = 4\nmax_total_tasks = 40\n\
             [type.breaker]\nstartup_window = \"1s\"\nfailures = 3\nwithin = \"60s\"\n\
             open_for = [\"30s\"]"
        )
    );
    let _daemon = Daemon::start_with(&policy_text, &["--metrics-listen", METRICS]).unwrap();
    let out = exec_bomb("mon", "i1", &["fork", "1000", "3000", "200"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let opened = cli(&["breaker", "open", "mon", "--for", "30m", "--reason", "test"]);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let text = http_get(METRICS, "/metrics").unwrap();
    let denied = metric(
        &text,
        "spawnguard_denials_total",
        r#"reason="max_tasks",type="mon""#,
    );
    assert!(
        denied.is_some_and(|d| d > 0.0),
        "no denial ({report}): {text}"
    );
    // The open duration the breaker alert compares with: the manual opening's 30 minutes.
    assert_eq!(
        metric(
            &text,
            "spawnguard_breaker_open_duration_seconds",
            r#"type="mon""#
        ),
        Some(1800.0),
        "{text}"
    );
    let since = metric(
        &text,
        "spawnguard_breaker_open_since_timestamp_seconds",
        r#"type="mon""#,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        since.is_some_and(|s| (now - s).abs() < 60.0),
        "{since:?} {now}: {text}"
    );

    let scrape = parse_scrape(&text);
    let exprs = asset_exprs("mon");
    let mut problems = Vec::new();
    for (from, expr) in &exprs {
        for p in missing(expr, &scrape) {
            problems.push(format!("{from}: {p}\n    {expr}"));
        }
    }
    assert!(
        problems.is_empty(),
        "the monitoring assets name what the daemon does not export:\n{}\n\nscrape:\n{text}",
        problems.join("\n")
    );
    // The check finds what it is for: a renamed metric, label or label value fails it.
    for wrong in [
        r#"rate(spawnguard_denial_total{job="spawnguard"}[5m])"#,
        r#"sum by (reasons) (spawnguard_denials_total{job="spawnguard"})"#,
        r#"spawnguard_host_tasks_max{job="spawnguard", limit="deny_at"}"#,
        r#"spawnguard_breaker_state{job="spawnguard", phase="open"}"#,
        r#"spawnguard_tasks{job="spawnguard"} > on (type, kind) spawnguard_tasks_max"#,
    ] {
        assert!(!missing(wrong, &scrape).is_empty(), "not caught: {wrong}");
    }
    assert!(exprs.len() > ALERTS.len(), "{exprs:?}");
}

/// The scrape parser reads escaped label values whole (a kernel release or a cgroup path could
/// hold a quote or a comma).
#[test]
fn the_scrape_parser_reads_escaped_label_values() {
    let s = parse_scrape(
        "# HELP x y\nspawnguard_build_info{backend=\"kill\",kernel=\"6.1 \\\"a,b\\\"\"} 1\n\
         spawnguard_host_tasks 3\n",
    );
    assert_eq!(s["spawnguard_build_info"][0]["kernel"], "6.1 \"a,b\"");
    assert_eq!(s["spawnguard_build_info"][0]["backend"], "kill");
    assert!(s["spawnguard_host_tasks"][0].is_empty());
}
