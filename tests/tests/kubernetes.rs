//! deploy/kubernetes: the manifests render with `kubectl kustomize` (base and the Prometheus
//! Operator overlay), every object of a kind with a bundled schema validates with
//! `kubernetes-validate --strict`, the ServiceMonitor selects the metrics Service, the
//! PrometheusRule passes `promtool`, the policy in the ConfigMap is valid, and the files pass
//! `yamllint`. Then the DaemonSet's pod template runs on this host with podman, every value
//! read from the rendered YAML (a field the test cannot translate fails it): it becomes ready,
//! holds a fork bomb in an instance of the ConfigMap's policy, stops within its grace period
//! leaving the enforcer pinned, and a second pod adopts it. Host-only: the vm-test guests have
//! no podman, kubectl or Python.

use std::{
    collections::BTreeMap,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_yaml_ng::Value;
use spawnguard_tests::{podman::*, *};

/// Where `cargo xtask setup` installs kubernetes-validate and yamllint (a venv of pinned
/// versions; xtask/src/main.rs).
const PY_TOOLS: &str = "/opt/spawnguard-py/bin";
/// The Kubernetes version the manifests are validated against: kubectl's (1.32 here).
const K8S_VERSION: &str = "1.32.0";
/// The address the test gives the pod as `status.hostIP`: with hostNetwork the pod's listener
/// is the host's, and the loopback keeps it off every network.
const HOST_IP: &str = "127.0.0.1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// A tool `cargo xtask setup` installs; a clear failure where it is missing.
fn tool(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{path} is missing: `cargo xtask setup` installs it"
    );
    p
}

fn output_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize DIR` (relative to deploy/kubernetes).
fn kustomize(dir: &str) -> String {
    output_ok(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(kube_dir().join(dir)),
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn base() -> Vec<Value> {
    documents(&kustomize("."))
}

fn overlay() -> Vec<Value> {
    documents(&kustomize("overlays/prometheus-operator"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the rendered manifests");
    found[0]
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string: {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_mapping()
        .map(|m| m.keys().map(s).collect())
        .unwrap_or_default()
}

/// Fails on a key the test does not know how to run: a field added to the manifest must be
/// added here too, so what was run is what the manifest says.
fn only_known(what: &str, v: &Value, known: &[&str]) {
    for k in keys(v) {
        assert!(
            known.contains(&k),
            "{what} has `{k}`, which tests/tests/kubernetes.rs does not run: teach it"
        );
    }
}

#[test]
fn kubernetes_kubectl_is_recent_enough_and_renders_the_base_and_the_overlay() {
    let version = output_ok(Command::new("kubectl").args(["version", "--client", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    let minor: u32 = v["clientVersion"]["minor"]
        .as_str()
        .unwrap()
        .trim_end_matches('+')
        .parse()
        .unwrap();
    assert!(
        minor >= 27,
        "kubectl 1.{minor} is older than 1.27: {version}"
    );

    let kinds = |docs: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = docs.iter().map(|d| s(&d["kind"]).to_owned()).collect();
        k.sort();
        k
    };
    let base = base();
    assert_eq!(
        kinds(&base),
        [
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount"
        ]
    );
    let overlay = overlay();
    assert_eq!(
        kinds(&overlay),
        [
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    for d in &overlay {
        if d["kind"] == "Namespace" {
            assert_eq!(d["metadata"]["name"], "spawnguard");
            assert_eq!(
                d["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
                "privileged"
            );
        } else {
            assert_eq!(d["metadata"]["namespace"], "spawnguard", "{d:?}");
        }
    }
}

/// `kubernetes-validate --strict` of a rendered stream; its report.
fn validate(yaml: &str) -> (bool, String) {
    let mut child = Command::new(tool(&format!("{PY_TOOLS}/kubernetes-validate")))
        .args(["--strict", "-k", K8S_VERSION, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn kubernetes_objects_of_bundled_kinds_validate_strictly() {
    let rendered = kustomize("overlays/prometheus-operator");
    let (ok, report) = validate(&rendered);
    eprintln!("{report}");
    assert!(ok, "{report}");
    for d in documents(&rendered) {
        let kind = s(&d["kind"]);
        let name = s(&d["metadata"]["name"]);
        let passed = format!("passed for resource {}/{name}", kind.to_lowercase());
        let no_schema = format!("Couldn't find schema for kind {kind} ");
        match kind {
            // Custom resources: checked by the tests below instead.
            "ServiceMonitor" | "PrometheusRule" => {
                assert!(report.contains(&no_schema), "{kind}: {report}")
            }
            _ => assert!(
                report.contains(&passed),
                "{kind} {name} not validated: {report}"
            ),
        }
    }
    // --strict refuses a field the schema lacks (without it, unknown fields pass).
    let typo = rendered.replacen("hostPID: true", "hostPIDs: true", 1);
    assert_ne!(typo, rendered);
    let (ok, report) = validate(&typo);
    assert!(!ok && report.contains("hostPIDs"), "{report}");
}

#[test]
fn kubernetes_service_monitor_scrapes_the_daemonset_s_metrics_port_as_job_spawnguard() {
    let docs = overlay();
    let (monitor, service, ds) = (
        of_kind(&docs, "ServiceMonitor"),
        of_kind(&docs, "Service"),
        of_kind(&docs, "DaemonSet"),
    );
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    only_known(
        "the ServiceMonitor",
        &monitor["spec"],
        &["namespaceSelector", "selector", "endpoints"],
    );
    // Its selector matches the Service's labels, in the Service's namespace.
    let labels = &service["metadata"]["labels"];
    let selector = &monitor["spec"]["selector"];
    only_known("the ServiceMonitor's selector", selector, &["matchLabels"]);
    assert!(!keys(&selector["matchLabels"]).is_empty());
    for (k, v) in selector["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[s(k)], v, "the Service lacks label {k:?}={v:?}");
    }
    let namespaces = seq(&monitor["spec"]["namespaceSelector"]["matchNames"]);
    assert!(
        namespaces.contains(&service["metadata"]["namespace"]),
        "{namespaces:?}"
    );
    // Its endpoint names a port of the Service, whose target is the container's named port.
    let endpoints = seq(&monitor["spec"]["endpoints"]);
    assert!(!endpoints.is_empty());
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    for e in endpoints {
        assert_eq!(e["path"], "/metrics");
        let port = seq(&service["spec"]["ports"])
            .iter()
            .find(|p| p["name"] == e["port"])
            .unwrap_or_else(|| panic!("the Service has no port {:?}", e["port"]));
        assert!(
            seq(&container["ports"])
                .iter()
                .any(|c| c["name"] == port["targetPort"] && c["containerPort"] == port["port"]),
            "the Service's port {port:?} is no port of the container"
        );
    }
    // The Service selects the DaemonSet's pods, and is headless (one endpoint per node).
    assert_eq!(service["spec"]["clusterIP"], "None");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[s(k)], v, "the pods lack label {k:?}={v:?}");
    }
    // Prometheus' job is the Service's name (no jobLabel), the one the alert rules name.
    let job = s(&service["metadata"]["name"]);
    let rule = serde_yaml_ng::to_string(&of_kind(&docs, "PrometheusRule")["spec"]).unwrap();
    assert!(
        rule.contains(&format!("job=\"{job}\"")),
        "the rules do not select job=\"{job}\": {rule}"
    );
}

#[test]
fn kubernetes_prometheus_rule_passes_promtool() {
    let docs = overlay();
    let rule = of_kind(&docs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert!(!seq(&rule["spec"]["groups"]).is_empty());
    let file = std::env::temp_dir().join(format!("sg-k8s-rules-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_yaml_ng::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = output_ok(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&file),
    );
    let _ = std::fs::remove_file(&file);
    eprintln!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn kubernetes_manifests_pass_yamllint() {
    let dir = kube_dir();
    let out = Command::new(tool(&format!("{PY_TOOLS}/yamllint")))
        .args(["--strict", "-c"])
        .arg(dir.join(".yamllint"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ConfigMap the DaemonSet mounts: its files (key, text).
fn policy_files(docs: &[Value]) -> BTreeMap<String, String> {
    let ds = of_kind(docs, "DaemonSet");
    let volume = seq(&ds["spec"]["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("a ConfigMap volume");
    let cm = of_kind(docs, "ConfigMap");
    assert_eq!(cm["metadata"]["name"], volume["configMap"]["name"]);
    cm["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (s(k).to_owned(), s(v).to_owned()))
        .collect()
}

#[test]
fn kubernetes_configmap_holds_a_valid_policy_mounted_as_a_directory() {
    let docs = base();
    let files = policy_files(&docs);
    let text = files
        .get("policy.toml")
        .expect("policy.toml in the ConfigMap");
    let file = write_policy("k8s-configmap", text);
    let out = cli(&["policy", "check", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = of_kind(&docs, "DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let mount = seq(&c["volumeMounts"])
        .iter()
        .find(|m| m["name"] == "policy")
        .unwrap();
    // A subPath mount is copied once and never updated: the directory it must be.
    for m in seq(&c["volumeMounts"]) {
        assert!(m.get("subPath").is_none(), "{m:?}");
    }
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    let at = args.iter().position(|a| *a == "--policy").unwrap();
    assert_eq!(
        args[at + 1],
        format!("{}/policy.toml", s(&mount["mountPath"]))
    );
    assert!(!args.contains(&"--no-watch-policy"));
}

// ---------------------------------------------------------------------------------------------
// The pod template, run with podman.

/// Kubernetes' `$(VAR)` expansion in command and args.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    env.iter()
        .fold(arg.to_owned(), |a, (k, v)| a.replace(&format!("$({k})"), v))
}

/// podman's propagation for a volumeMount's `mountPropagation`.
fn propagation(m: &Value) -> &'static str {
    match m.get("mountPropagation").map(s) {
        None | Some("None") => "rprivate",
        Some("HostToContainer") => "rslave",
        Some("Bidirectional") => "rshared",
        Some(other) => panic!("mountPropagation {other}"),
    }
}

/// The filesystems bpffs and tracefs must be mounted on a node (systemd does it at boot); a
/// host daemon of the other tests would mount them here, so does this test.
fn mount_node_filesystems() {
    for (fs, path) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounted = info.lines().any(|l| {
            let (left, right) = l.split_once(" - ").unwrap();
            left.split_whitespace().nth(4) == Some(path)
                && right.split_whitespace().next() == Some(fs)
        });
        if !mounted {
            output_ok(Command::new("mount").args(["-t", fs, fs, path]));
        }
    }
}

/// The `podman run` of the DaemonSet's pod template, read from the rendered YAML.
struct PodTemplate {
    /// podman's arguments after `run -d --name NAME`, image and command included.
    args: Vec<String>,
    /// The readiness and liveness probes' URLs (`ADDRESS:PORT`, path).
    ready: (String, String),
    alive: (String, String),
    grace: u64,
    /// The kubelet-style ConfigMap directory it mounts (removed on drop).
    policy_dir: PathBuf,
}

impl PodTemplate {
    fn from_manifest(docs: &[Value], image: &str, work: &Path) -> Self {
        let ds = of_kind(docs, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        only_known(
            "the pod spec",
            pod,
            &[
                "serviceAccountName",
                "automountServiceAccountToken",
                "priorityClassName",
                "tolerations",
                "hostPID",
                "hostNetwork",
                "dnsPolicy",
                "terminationGracePeriodSeconds",
                "containers",
                "volumes",
            ],
        );
        // Scheduling and the API: what a node does not see.
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(
            seq(&pod["tolerations"]),
            [serde_yaml_ng::from_str::<Value>("operator: Exists").unwrap()]
        );
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            1
        );
        let containers = seq(&pod["containers"]);
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        only_known(
            "the container",
            c,
            &[
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "env",
                "ports",
                "startupProbe",
                "livenessProbe",
                "readinessProbe",
                "securityContext",
                "resources",
                "volumeMounts",
            ],
        );
        // The image of deploy/container/Containerfile; here the one the tests build from it.
        let manifest_image = s(&c["image"]);
        assert!(
            manifest_image.split(':').next() == image.split(':').next(),
            "the manifest's image {manifest_image} is not the Containerfile's {image}"
        );

        let env: Vec<(String, String)> = seq(&c["env"])
            .iter()
            .map(|e| {
                let value = match (
                    e.get("value"),
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                ) {
                    (Some(v), _) => s(v).to_owned(),
                    (None, Some("status.hostIP")) => HOST_IP.to_owned(),
                    _ => panic!("env {e:?}: the test does not know its value"),
                };
                (s(&e["name"]).to_owned(), value)
            })
            .collect();

        let mut args: Vec<String> = vec!["--pull=never".into()];
        let sc = &c["securityContext"];
        only_known(
            "the securityContext",
            sc,
            &["privileged", "readOnlyRootFilesystem"],
        );
        if sc["privileged"] == true {
            args.push("--privileged".into());
        }
        if sc["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        if pod["hostPID"] == true {
            args.push("--pid=host".into());
        }
        if pod["hostNetwork"] == true {
            args.push("--network=host".into());
        } else {
            panic!("the test reaches the probes through the host's network");
        }
        // What a kubelet gives a container on cgroup v2: a cgroup namespace of its own (podman
        // on a hybrid host would share the host's). The daemon must find the host's itself.
        args.push("--cgroupns=private".into());
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        args.push(format!("--stop-timeout={grace}"));
        for (k, v) in &env {
            args.push(format!("--env={k}={v}"));
        }

        // Volumes: hostPath as bind mounts with their propagation, the ConfigMap as a
        // directory laid out as the kubelet does (`..data` symlink swapped on updates).
        let policy_dir = work.join("k8s-configmap");
        let _ = std::fs::remove_dir_all(&policy_dir);
        let data = policy_dir.join("..2026_01_01_00_00_00.000000001");
        std::fs::create_dir_all(&data).unwrap();
        for (key, text) in policy_files(docs) {
            std::fs::write(data.join(&key), text).unwrap();
            symlink(format!("..data/{key}"), policy_dir.join(&key)).unwrap();
        }
        symlink(data.file_name().unwrap(), policy_dir.join("..data")).unwrap();
        let volumes = seq(&pod["volumes"]);
        for m in seq(&c["volumeMounts"]) {
            only_known(
                "a volumeMount",
                m,
                &["name", "mountPath", "mountPropagation", "readOnly"],
            );
            let v = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("no volume {:?}", m["name"]));
            let src = if let Some(h) = v.get("hostPath") {
                let path = s(&h["path"]);
                match h["type"].as_str() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(path).unwrap(),
                    Some("Directory") => assert!(Path::new(path).is_dir(), "{path}"),
                    other => panic!("hostPath type {other:?}"),
                }
                path.to_owned()
            } else if v.get("configMap").is_some() {
                policy_dir.to_str().unwrap().to_owned()
            } else {
                panic!("volume {v:?}: the test runs hostPath and configMap volumes");
            };
            let mut mount = format!(
                "type=bind,src={src},dst={},bind-propagation={}",
                s(&m["mountPath"]),
                propagation(m)
            );
            if m["readOnly"] == true {
                mount.push_str(",ro");
            }
            args.push(format!("--mount={mount}"));
        }
        for v in volumes {
            assert!(
                seq(&c["volumeMounts"])
                    .iter()
                    .any(|m| m["name"] == v["name"]),
                "volume {:?} is mounted nowhere",
                v["name"]
            );
        }

        let command: Vec<String> = seq(&c["command"])
            .iter()
            .map(|a| expand(s(a), &env))
            .collect();
        assert!(!command.is_empty(), "the test runs an explicit command");
        args.push(format!(
            "--entrypoint={}",
            serde_json::to_string(&command).unwrap()
        ));
        args.push(image.to_owned());
        args.extend(seq(&c["args"]).iter().map(|a| expand(s(a), &env)));

        // Probes: httpGet on a named port of the container, at the pod's address (the host's).
        let probe = |which: &str| -> (String, String) {
            let get = &c[which]["httpGet"];
            only_known(which, get, &["path", "port"]);
            let port = seq(&c["ports"])
                .iter()
                .find(|p| p["name"] == get["port"])
                .unwrap_or_else(|| panic!("{which}: no port {:?}", get["port"]));
            (
                format!("{HOST_IP}:{}", port["containerPort"].as_u64().unwrap()),
                s(&get["path"]).to_owned(),
            )
        };
        let ready = probe("readinessProbe");
        let alive = probe("livenessProbe");
        assert_eq!(probe("startupProbe"), alive);
        assert_eq!(ready.1, "/readyz");
        assert_eq!(alive.1, "/healthz");
        Self {
            args,
            ready,
            alive,
            grace,
            policy_dir,
        }
    }
}

impl PodTemplate {
    /// A ConfigMap update as the kubelet makes it: the files in a new data directory, then the
    /// `..data` symlink swapped for one to it in one rename.
    fn update_configmap(&self, key: &str, text: &str) {
        let old = std::fs::read_link(self.policy_dir.join("..data")).unwrap();
        let new = "..2026_01_01_00_00_01.000000002";
        std::fs::create_dir(self.policy_dir.join(new)).unwrap();
        std::fs::write(self.policy_dir.join(new).join(key), text).unwrap();
        symlink(new, self.policy_dir.join("..data_tmp")).unwrap();
        std::fs::rename(
            self.policy_dir.join("..data_tmp"),
            self.policy_dir.join("..data"),
        )
        .unwrap();
        std::fs::remove_dir_all(self.policy_dir.join(old)).unwrap();
    }
}

impl Drop for PodTemplate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.policy_dir);
    }
}

/// The pods this test starts: removed, and the enforcer uninstalled, on drop (a failure too).
struct Pods {
    podman: &'static Podman,
    names: Vec<String>,
}

impl Pods {
    fn start(&mut self, t: &PodTemplate, short: &str) -> String {
        let name = format!("sg-k8s-{short}-{}", std::process::id());
        let _ = self
            .podman
            .output(&["rm", "-f", "-t", "0", "--ignore", &name]);
        self.names.push(name.clone());
        let mut args = vec!["run".to_owned(), "-d".into(), "--name".into(), name.clone()];
        args.extend(t.args.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.podman.ok(&refs);
        name
    }

    fn log(&self, name: &str) -> String {
        let out = self.podman.output(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits for the readiness probe's 200 (the kubelet's view), then checks liveness.
    fn wait_ready(&self, t: &PodTemplate, name: &str) -> Duration {
        let start = Instant::now();
        let ready = wait_for(Duration::from_secs(120), || {
            http_get(&t.ready.0, &t.ready.1).is_ok()
        });
        assert!(
            ready,
            "{} did not turn 200 ({:?}): {}",
            t.ready.1,
            http_get(&t.ready.0, &t.ready.1).err(),
            self.log(name)
        );
        http_get(&t.alive.0, &t.alive.1).unwrap();
        start.elapsed()
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        let mut args = vec!["rm", "-f", "-t", "0", "--ignore"];
        args.extend(self.names.iter().map(String::as_str));
        let _ = self.podman.output(&args);
        // Not `uninstall()`, which panics on failure: a panic while unwinding would abort.
        let _ = Command::new(spawnguard_bin()).arg("uninstall").output();
    }
}

/// Removes a directory the test's daemon made (the type's, and its parents up to the mount)
/// when it was not there before: rmdir of an empty cgroup only.
struct MadeDirs(Vec<PathBuf>);

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A never-backing-off fork bomb as an instance of the type (`spawnguard exec`); returns how
/// many of its processes ran at once (counted by themselves), the most the cgroup held, and
/// how long it ran.
fn storm(policy_file: &Path, type_name: &str, dir: &Path, bound: usize) -> (usize, usize, f64) {
    let start = Instant::now();
    let child = Command::new(spawnguard_bin())
        .args(["exec", "--policy"])
        .arg(policy_file)
        .args(["--type", type_name, "--instance"])
        .arg(dir.file_name().unwrap())
        .arg("--")
        .arg(bomb_bin())
        .args(["storm", "1500", "20000", "500"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let most = max_held(dir, Duration::from_millis(1800), bound, false);
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the bomb failed ({}): {report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("bomb: {}", report.trim());
    (
        report_value(&report, "ran") as usize,
        most,
        start.elapsed().as_secs_f64(),
    )
}

#[test]
fn kubernetes_daemonset_pod_runs_holds_a_bomb_and_hands_its_pinned_enforcer_over() {
    let Some(p) = podman() else { return };
    let start = Instant::now();
    let image = p.spawnguard_image();
    let images = start.elapsed();
    mount_node_filesystems();
    uninstall();

    let docs = base();
    let work = std::env::temp_dir().join(format!("sg-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let template = PodTemplate::from_manifest(&docs, image, &work);
    let policy_text = policy_files(&docs)["policy.toml"].clone();
    let policy = spawnguard::policy::Policy::parse(&policy_text, "policy.toml").unwrap();
    let ty = &policy.types[0];
    let policy_file = write_policy("k8s-pod", &policy_text);

    // The type directory (made by the daemon) goes again if it was not there; the bomb's
    // instance is killed and removed.
    let type_dir = cgroup2_mount().join(&ty.path);
    // Dropped last (after the pods and the instance trees), in this order on a failure too.
    let _made = MadeDirs(
        type_dir
            .ancestors()
            .take_while(|d| *d != cgroup2_mount())
            .filter(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect(),
    );
    let instance = type_dir.join(format!("sg-k8s-{}", std::process::id()));
    let quiet = type_dir.join(format!("sg-k8s-quiet-{}", std::process::id()));
    let _trees = (
        CgroupTree::new(instance.clone()),
        CgroupTree::new(quiet.clone()),
    );
    let mut pods = Pods {
        podman: p,
        names: Vec::new(),
    };

    // Without hostPID the daemon cannot tell the host's cgroup namespace (pid 1 is its own):
    // it says so in one sentence and installs nothing.
    let mut no_host_pid = template.args.clone();
    no_host_pid.retain(|a| a != "--pid=host");
    assert_ne!(no_host_pid, template.args);
    let mut args = vec!["run".to_owned(), "--rm".into()];
    args.extend(no_host_pid);
    let out = p.cmd().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    eprintln!("without hostPID: {last}");
    assert!(!out.status.success(), "{err}");
    assert!(
        last.starts_with("spawnguard: ") && last.contains("`hostPID: true`"),
        "{err}"
    );
    assert!(!Path::new(PIN_DIR).join("links").exists());

    let first = pods.start(&template, "a");
    assert_eq!(
        p.ok(&["inspect", "--format", "{{.HostConfig.CgroupMode}}", &first]),
        "private"
    );
    let took = pods.wait_ready(&template, &first);
    let log = pods.log(&first);
    eprintln!("pod a ready in {:.1} s:\n{log}", took.as_secs_f64());
    assert!(
        log.contains("joined the host's cgroup namespace"),
        "the daemon did not join the host's cgroup namespace: {log}"
    );
    assert!(
        log.contains(&format!("at {}:", type_dir.display())),
        "the daemon did not place the type at {}: {log}",
        type_dir.display()
    );

    let pid = p.ok(&["inspect", "--format", "{{.State.Pid}}", &first]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    eprintln!(
        "pod a's daemon: {}",
        status
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // A fork bomb in an instance of the ConfigMap's policy is held to its budget: never more
    // than max_tasks, nor more than the fork rate lets through.
    let bound = |secs: f64| -> usize {
        let rate = ty.fork_rate.as_ref().map_or(usize::MAX, |r| {
            r.burst as usize + (r.per_sec * secs).ceil() as usize + 2
        });
        rate.min(ty.max_tasks as usize)
    };
    let (ran, most, secs) = storm(&policy_file, &ty.name, &instance, ty.max_tasks as usize);
    assert!(
        ran <= bound(secs),
        "{ran} ran, bound {} in {secs:.1} s",
        bound(secs)
    );
    assert!(most <= ty.max_tasks as usize, "{most} held");
    assert!(ran >= 8, "the bomb never pressed on its budget: ran={ran}");
    let denied = |s: &serde_json::Value| -> u64 {
        s["denied"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum()
    };
    let before = denied(&type_status(&ty.name));
    assert!(before > 0, "{}", type_status(&ty.name));

    // An edit of the ConfigMap reaches the daemon through the directory mount and is applied
    // live (a subPath mount would never see it).
    let scrape = || http_get(&template.ready.0, "/metrics").unwrap();
    let reloads = |text: &str| {
        metric(
            text,
            "spawnguard_policy_reloads_total",
            r#"result="success""#,
        )
    };
    let info = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("spawnguard_policy_info{"))
            .map(str::to_owned)
    };
    let before_edit = scrape();
    assert_eq!(reloads(&before_edit), Some(0.0), "{before_edit}");
    template.update_configmap("policy.toml", &format!("{policy_text}\n# edited\n"));
    assert!(
        wait_for(Duration::from_secs(30), || reloads(&scrape()) == Some(1.0)),
        "the ConfigMap update was not applied: {}",
        pods.log(&first)
    );
    assert_ne!(info(&scrape()), info(&before_edit));

    // Stop as the kubelet does (SIGTERM, SIGKILL after the grace period): the daemon stops
    // cleanly well inside it, and the enforcer stays pinned and enforcing with no daemon.
    let stop = Instant::now();
    p.ok(&["stop", "-t", &template.grace.to_string(), &first]);
    let stopped_in = stop.elapsed();
    let code = p.ok(&["inspect", "--format", "{{.State.ExitCode}}", &first]);
    eprintln!(
        "pod a stopped in {:.2} s (grace {} s), exit {code}",
        stopped_in.as_secs_f64(),
        template.grace
    );
    assert_eq!(code, "0", "{}", pods.log(&first));
    assert!(stopped_in < Duration::from_secs(template.grace / 2));
    assert!(
        Path::new(PIN_DIR).join("links").is_dir(),
        "the enforcer is not pinned"
    );
    assert!(
        http_get(&template.ready.0, &template.ready.1).is_err(),
        "something still answers {}",
        template.ready.0
    );
    let (ran, _, secs) = storm(&policy_file, &ty.name, &quiet, ty.max_tasks as usize);
    assert!(
        ran <= bound(secs),
        "with no daemon: {ran} ran, bound {}",
        bound(secs)
    );
    assert!(denied(&type_status(&ty.name)) > before);

    // The next pod of the template adopts the pinned enforcer with its counts.
    let second = pods.start(&template, "b");
    let took = pods.wait_ready(&template, &second);
    let log = pods.log(&second);
    eprintln!("pod b ready in {:.1} s", took.as_secs_f64());
    assert!(
        log.contains("adopted the enforcer pinned at") && log.contains("(counts kept)"),
        "{log}"
    );
    assert!(denied(&type_status(&ty.name)) > before);
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "image {:.1} s, all {:.1} s",
        images.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}
