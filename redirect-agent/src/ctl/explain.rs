//! `redirectctl explain --from <caller> --to <ip:port> [--key K]`: the kernel's `connect()`
//! decision for that caller and destination, computed by the same function the tests check
//! against the kernel (`routing::at_connect_observed`, which narrates its steps) over the tables read from the pinned maps, with
//! router liveness probed from `router_socks_v1` exactly as `connect4` looks it up; and, when the
//! connection goes to the router, the router's per-request decision (`routing::for_request`) for
//! the routing key, over the tables the router uses (the agent's). Printed step by step with the
//! map entries used.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use redirect_common::{
    ForkEndpoints, ForkKey, MAX_CGROUP_LEVELS, OrigDst, Reason, SockAddr,
    connect::{Step as DecisionStep, Steps},
};
use serde::Serialize;

use super::{
    CtlError, Ctx, Names,
    names::{CgroupIndex, ancestors, pod_uid_of_path},
};
use crate::{
    cgroup::cgroup2_mount,
    loader::{KernelMaps, inspect},
    routing::{
        BaselineWhy, ConnectInput, RequestRoute, RouteView, at_connect_observed, for_request,
    },
    sync::RedirectMaps,
};

#[derive(Clone, Debug)]
pub struct ExplainArgs {
    /// Pod uid, pod `namespace/name` (needs the agent), cgroup path, or pid.
    pub from: String,
    pub to: SocketAddr,
    pub key: Option<String>,
    /// The socket's SO_MARK.
    pub mark: u32,
}

#[derive(Debug, Serialize)]
pub struct ExplainDoc {
    pub schema: &'static str,
    pub from: Caller,
    pub to: SocketAddr,
    pub key: Option<String>,
    pub steps: Vec<Step>,
    pub kernel: KernelDecision,
    /// The router's decision for one request, when the kernel sends the connection to it.
    pub router: Option<RouterDecision>,
    pub verdict: Verdict,
    pub agent_reachable: bool,
}

#[derive(Debug, Serialize)]
pub struct Caller {
    pub cgroup_path: String,
    pub cgroup_id: u64,
    /// cgroup ids from the root down, as the kernel walks them (at most 12 levels).
    pub ancestors: Vec<u64>,
    pub pod_uid: Option<String>,
    pub pod: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    /// The map read, when the step reads one.
    pub map: Option<&'static str>,
    /// What was looked up.
    pub lookup: String,
    /// What was found (`miss` when nothing).
    pub found: String,
    /// What it means for the decision.
    pub then: String,
}

#[derive(Debug, Serialize)]
pub struct KernelDecision {
    /// The reason the kernel counts for this connect (a `counters_v1` label).
    pub reason: &'static str,
    /// Where the connection goes after the decision (None: untouched).
    pub rewrite: Option<SocketAddr>,
    /// For a fork endpoint: every candidate (the kernel picks one at random per connection).
    pub candidates: Vec<SocketAddr>,
    pub service_id: Option<u32>,
    pub service: Option<String>,
    pub workload_cgroup_id: Option<u64>,
    pub key_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct RouterDecision {
    /// `fork`, `baseline`, `unavailable` (503) or `unknown` (the agent does not answer).
    pub route: &'static str,
    /// Why a request stays on baseline (`no_key`, `unknown_key`, `not_forked`, `fallback`).
    pub why: Option<&'static str>,
    pub upstream: Option<SocketAddr>,
    pub candidates: Vec<SocketAddr>,
    pub status: Option<u16>,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    /// `untouched`, `fork_endpoint`, `fail_open`, `router_fork`, `router_baseline`,
    /// `router_unavailable` or `router`.
    pub kind: &'static str,
    pub destination: Option<SocketAddr>,
    pub summary: String,
}

/// The caller's cgroup directory, from a pid, a cgroup path, a pod uid or pod name.
fn resolve_caller(
    from: &str,
    mount: &Path,
    idx: &CgroupIndex,
    names: &Names,
) -> Result<PathBuf, CtlError> {
    if !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit()) {
        let text = fs::read_to_string(format!("/proc/{from}/cgroup"))
            .map_err(|e| CtlError::Input(format!("pid {from}: {e}")))?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| CtlError::Input(format!("pid {from}: no cgroup v2 entry")))?;
        return Ok(mount.join(rel.trim_start_matches('/')));
    }
    let as_path = Path::new(from);
    if as_path.is_absolute() && as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let rel = mount.join(from.trim_start_matches('/'));
    if from.contains('/') && rel.is_dir() {
        return Ok(rel);
    }
    let uid = names.pod_uid(from).unwrap_or_else(|| from.to_string());
    if let Some(p) = idx.pod_cgroup(&uid) {
        return Ok(p.to_path_buf());
    }
    Err(CtlError::Input(format!(
        "--from {from}: not a pid, a cgroup directory, a pod uid with a cgroup on this node{}",
        if names.reachable() {
            ", or a pod name the agent knows"
        } else {
            " (pod names need the agent's admin API)"
        }
    )))
}

fn name_or_id(name: Option<String>, id: u32) -> String {
    name.unwrap_or_else(|| format!("id {id:#010x}"))
}

pub fn collect(ctx: &Ctx, args: &ExplainArgs) -> Result<ExplainDoc, CtlError> {
    ctx.require_pins()?;
    let names = Names::fetch(&ctx.admin);
    let mount = cgroup2_mount()?
        .ok_or_else(|| CtlError::Input("no cgroup2 mount in /proc/self/mountinfo".into()))?;
    let idx = CgroupIndex::scan_at(&mount);
    let dir = resolve_caller(&args.from, &mount, &idx, &names)?;
    let mut ids = ancestors(&mount, &dir)?;
    let cgroup_id = *ids.last().unwrap_or(&0);
    ids.truncate(MAX_CGROUP_LEVELS as usize);
    let pod_uid = pod_uid_of_path(&dir);
    let caller = Caller {
        cgroup_path: dir.display().to_string(),
        cgroup_id,
        ancestors: ids.clone(),
        pod: pod_uid.as_deref().and_then(|u| names.pod(u)),
        pod_uid,
    };

    // The kernel's tables, from the pins; names from the agent.
    let kernel = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let alive = inspect::router_alive(&ctx.pin_dir)?;
    let dst = SockAddr::from(args.to);
    let input = ConnectInput {
        dst,
        tcp: true,
        ancestors: ids,
        mark: args.mark,
        router_alive: if dst.is_v4() { alive[0] } else { alive[1] },
        pick: 0,
    };
    let mut narrator = Narrator {
        names: &names,
        input: &input,
        steps: Vec::new(),
        candidates: Vec::new(),
        service: String::new(),
        router: String::new(),
    };
    let d = at_connect_observed(&kernel, &input, &mut narrator);
    let Narrator {
        mut steps,
        candidates,
        ..
    } = narrator;
    let kd = KernelDecision {
        reason: d.reason.label(),
        rewrite: d.rewrite.get().map(|r| SocketAddr::from(&r)),
        candidates: if d.reason == Reason::OriginFork {
            candidates
        } else {
            Vec::new()
        },
        service_id: d.service_id.get(),
        service: d.service_id.get().and_then(|id| names.service(id)),
        workload_cgroup_id: d.workload.get().map(|w| w.0),
        key_id: d.workload.get().map(|w| w.1),
    };

    let router = (d.reason == Reason::ToRouter)
        .then(|| router_steps(&names, d.service_id.or_default(), dst, args, &mut steps));
    let verdict = verdict(d.reason, &kd, router.as_ref(), args);
    Ok(ExplainDoc {
        schema: "redirectctl.explain/v1",
        from: caller,
        to: args.to,
        key: args.key.clone(),
        steps,
        kernel: kd,
        router,
        verdict,
        agent_reachable: names.reachable(),
    })
}

/// The kernel's decision, narrated step by step as `at_connect_observed` takes it.
struct Narrator<'a> {
    names: &'a Names,
    input: &'a ConnectInput,
    steps: Vec<Step>,
    /// The fork endpoints a fork pod's connection picks from.
    candidates: Vec<SocketAddr>,
    service: String,
    router: String,
}

/// A fork's endpoints of one family.
fn candidates(f: &ForkEndpoints, v4: bool) -> Vec<SocketAddr> {
    let (start, n) = f.family_range(v4);
    f.endpoints[start..start + n]
        .iter()
        .map(SocketAddr::from)
        .collect()
}

impl Steps for Narrator<'_> {
    fn step(&mut self, step: DecisionStep<'_>) {
        let names = self.names;
        let step = match step {
            DecisionStep::Service { dst, service_id } => {
                let lookup = SocketAddr::from(&dst).to_string();
                match service_id {
                    None => Step {
                        map: Some("services_v1"),
                        lookup,
                        found: "miss".into(),
                        then: "not a forked service port: untouched (not_forked)".into(),
                    },
                    Some(id) => {
                        self.service = name_or_id(names.service(id), id);
                        Step {
                            map: Some("services_v1"),
                            lookup,
                            found: match names.service(id) {
                                Some(n) => format!("service {n} (id {id:#010x})"),
                                None => format!("service id {id:#010x} (name unknown)"),
                            },
                            then: "a forked service: decide".into(),
                        }
                    }
                }
            }
            DecisionStep::RouterSocket { mark } => Step {
                map: Some("router_v1"),
                lookup: format!("socket mark {mark:#x}"),
                found: format!("router mark {mark:#x}"),
                then: "the router's own upstream socket: untouched (router_socket)".into(),
            },
            DecisionStep::Caller { found: None } => Step {
                map: Some("workloads_v1"),
                lookup: format!(
                    "{} cgroup ancestors {:?}",
                    self.input.ancestors.len(),
                    self.input.ancestors
                ),
                found: "miss".into(),
                then: "no fork pod in the caller's cgroup ancestry: a baseline caller".into(),
            },
            DecisionStep::Caller {
                found: Some((cg, key_id)),
            } => {
                let level = self.input.ancestors.iter().position(|a| *a == cg);
                Step {
                    map: Some("workloads_v1"),
                    lookup: format!("cgroup {cg} (ancestor level {})", level.unwrap_or(0)),
                    found: format!("fork pod of key {}", name_or_id(names.key(key_id), key_id)),
                    then: "origin routing, decided in the kernel".into(),
                }
            }
            DecisionStep::Fork { key, v4, endpoints } => {
                let lookup = format!(
                    "(key {}, service {})",
                    name_or_id(names.key(key.key_id), key.key_id),
                    self.service
                );
                match endpoints {
                    None => Step {
                        map: Some("forks_v1"),
                        lookup,
                        found: "miss".into(),
                        then: "the caller's sandbox does not fork this service: baseline, \
                               untouched (origin_baseline)"
                            .into(),
                    },
                    Some(f) => {
                        self.candidates = candidates(f, v4);
                        let eps: Vec<String> =
                            self.candidates.iter().map(|e| e.to_string()).collect();
                        let (_, n4) = f.family_range(true);
                        let (_, n6) = f.family_range(false);
                        Step {
                            map: Some("forks_v1"),
                            lookup,
                            found: format!("{n4} IPv4 + {n6} IPv6 ready endpoints"),
                            then: if eps.is_empty() {
                                "no ready endpoint of the destination's family: baseline, \
                                 untouched (origin_no_endpoint)"
                                    .into()
                            } else {
                                format!(
                                    "rewrite to a fork endpoint, one of [{}] at random \
                                     (origin_fork)",
                                    eps.join(", ")
                                )
                            },
                        }
                    }
                }
            }
            DecisionStep::RouterAddress { v4, to } => {
                let family = if v4 { "ipv4" } else { "ipv6" };
                let lookup = format!("router address ({family})");
                if to.is_unset() {
                    Step {
                        map: Some("router_v1"),
                        lookup,
                        found: "unset".into(),
                        then: "no router for this family: untouched, fail open \
                               (router_no_address)"
                            .into(),
                    }
                } else {
                    self.router = SocketAddr::from(&to).to_string();
                    Step {
                        map: Some("router_v1"),
                        lookup,
                        found: self.router.clone(),
                        then: "check the router is alive".into(),
                    }
                }
            }
            DecisionStep::RouterAlive { slot, alive } => Step {
                map: Some("router_socks_v1"),
                lookup: format!(
                    "slot {slot} ({} listener)",
                    if slot == 0 { "ipv4" } else { "ipv6" }
                ),
                found: if alive {
                    "a listening socket".into()
                } else {
                    "empty".into()
                },
                then: if alive {
                    format!(
                        "rewrite to the router {}; original destination recorded (to_router)",
                        self.router
                    )
                } else {
                    "the router is down: untouched, fail open (router_down)".into()
                },
            },
            // The model always has room: storage exists only in the kernel.
            DecisionStep::Recorded { .. } => return,
        };
        self.steps.push(step);
    }
}

fn router_steps(
    names: &Names,
    service_id: u32,
    dst: SockAddr,
    args: &ExplainArgs,
    steps: &mut Vec<Step>,
) -> RouterDecision {
    let service = name_or_id(names.service(service_id), service_id);
    if !names.reachable() {
        steps.push(Step {
            map: None,
            lookup: "router tables (agent /tables)".into(),
            found: names.error.clone().unwrap_or_default(),
            then: "the router's per-request decision is unknown: routing keys live in the agent"
                .into(),
        });
        return RouterDecision {
            route: "unknown",
            why: None,
            upstream: None,
            candidates: Vec::new(),
            status: None,
        };
    }
    // The router decides over the agent's tables (what it last synced), not the pins.
    let view = RouteView::new(names.tables.clone());
    let orig = OrigDst {
        dst,
        service_id,
        ..Default::default()
    };
    let route = for_request(&view, &orig, args.key.as_deref(), 0);
    let key_text = args.key.as_deref().map(|k| format!("key {k:?}"));
    let mut candidates = Vec::new();
    if let Some(k) = args.key.as_deref()
        && let Some(id) = view.key_id(k)
        && let Some(f) = view.tables.forks.get(&ForkKey {
            key_id: id,
            service_id,
        })
    {
        candidates = self::candidates(f, dst.is_v4());
    }
    let orig_dst = SocketAddr::from(&dst);
    let (d, then) = match route {
        RequestRoute::Fork { endpoint, .. } => (
            RouterDecision {
                route: "fork",
                why: None,
                upstream: Some(SocketAddr::from(&endpoint)),
                candidates: candidates.clone(),
                status: None,
            },
            format!(
                "requests with this key go to a fork endpoint, one of {candidates:?} ({service})"
            ),
        ),
        RequestRoute::Baseline(why) => (
            RouterDecision {
                route: "baseline",
                why: Some(why.label()),
                upstream: Some(orig_dst),
                candidates,
                status: None,
            },
            match why {
                BaselineWhy::NoKey => format!(
                    "no routing key: baseline, the original destination {orig_dst}{}",
                    forking_keys(names, service_id)
                ),
                BaselineWhy::UnknownKey => {
                    format!(
                        "no sandbox carries this key: baseline {orig_dst} (is the key right? is the sandbox loaded?)"
                    )
                }
                BaselineWhy::NotForked => {
                    format!("the key's sandbox does not fork {service}: baseline {orig_dst}")
                }
                BaselineWhy::Fallback => format!(
                    "the fork has no ready endpoint and the sandbox falls back: baseline {orig_dst}"
                ),
            },
        ),
        RequestRoute::Unavailable { .. } => (
            RouterDecision {
                route: "unavailable",
                why: None,
                upstream: None,
                candidates,
                status: Some(503),
            },
            "the fork has no ready endpoint and the sandbox's fallback is Unavailable: 503".into(),
        ),
    };
    steps.push(Step {
        map: None,
        lookup: format!(
            "router, per request: {} for {service}",
            key_text.unwrap_or_else(|| "no key".into())
        ),
        found: match args.key.as_deref().and_then(|k| view.key_id(k)) {
            Some(id) => format!(
                "key id {id:#010x} ({})",
                view.tables
                    .keys
                    .get(&id)
                    .map(|k| k.owners.join(","))
                    .unwrap_or_default()
            ),
            None if args.key.is_some() => "no such key".into(),
            None => "-".into(),
        },
        then,
    });
    d
}

/// ` (keys that fork it: a, b)` for a hint.
fn forking_keys(names: &Names, service_id: u32) -> String {
    let keys: Vec<String> = names
        .tables
        .forks
        .keys()
        .filter(|k| k.service_id == service_id)
        .filter_map(|k| names.key(k.key_id))
        .collect();
    if keys.is_empty() {
        String::new()
    } else {
        format!(
            "; requests carrying one of [{}] go to a fork",
            keys.join(", ")
        )
    }
}

fn verdict(
    reason: Reason,
    k: &KernelDecision,
    r: Option<&RouterDecision>,
    args: &ExplainArgs,
) -> Verdict {
    let to = args.to;
    match reason {
        Reason::OriginFork => Verdict {
            kind: "fork_endpoint",
            destination: k.rewrite,
            summary: format!(
                "the kernel rewrites {to} to the fork endpoint {} (one of {})",
                k.rewrite.map(|r| r.to_string()).unwrap_or_default(),
                k.candidates.len()
            ),
        },
        Reason::RouterDown | Reason::RouterNoAddress | Reason::StorageFull | Reason::Error => {
            Verdict {
                kind: "fail_open",
                destination: Some(to),
                summary: format!(
                    "fail open ({}): the connection goes to {to} untouched, baseline",
                    k.reason
                ),
            }
        }
        Reason::ToRouter => {
            let router = k.rewrite.map(|r| r.to_string()).unwrap_or_default();
            match r {
                Some(RouterDecision {
                    route: "fork",
                    upstream,
                    ..
                }) => Verdict {
                    kind: "router_fork",
                    destination: *upstream,
                    summary: format!(
                        "to the router {router}, which sends the request to the fork endpoint {}",
                        upstream.map(|u| u.to_string()).unwrap_or_default()
                    ),
                },
                Some(RouterDecision {
                    route: "baseline",
                    why,
                    ..
                }) => Verdict {
                    kind: "router_baseline",
                    destination: Some(to),
                    summary: format!(
                        "to the router {router}, which sends the request to baseline {to} ({})",
                        why.unwrap_or("")
                    ),
                },
                Some(RouterDecision {
                    route: "unavailable",
                    ..
                }) => Verdict {
                    kind: "router_unavailable",
                    destination: None,
                    summary: format!("to the router {router}, which answers 503"),
                },
                _ => Verdict {
                    kind: "router",
                    destination: k.rewrite,
                    summary: format!(
                        "to the router {router}; its per-request decision is unknown (agent unreachable)"
                    ),
                },
            }
        }
        Reason::NotForked
        | Reason::RouterSocket
        | Reason::OriginBaseline
        | Reason::OriginNoEndpoint
        | Reason::ConnRecorded
        | Reason::ConnsFull => Verdict {
            kind: "untouched",
            destination: Some(to),
            summary: format!(
                "untouched ({}): the connection goes to {to}",
                reason.label()
            ),
        },
    }
}

pub fn render(doc: &ExplainDoc) -> String {
    let mut out = format!(
        "caller: {} (cgroup {}){}\n",
        doc.from
            .pod
            .as_ref()
            .map(|p| format!("pod {p}"))
            .or(doc.from.pod_uid.as_ref().map(|u| format!("pod uid {u}")))
            .unwrap_or_else(|| "not a pod".into()),
        doc.from.cgroup_path,
        if doc.agent_reachable {
            ""
        } else {
            "\n(agent admin API unreachable: names and the router's decision are unavailable)"
        }
    );
    out.push_str(&format!(
        "connect to {}{}\n\n",
        doc.to,
        doc.key
            .as_ref()
            .map(|k| format!(", requests carry key {k:?}"))
            .unwrap_or_default()
    ));
    for (i, s) in doc.steps.iter().enumerate() {
        out.push_str(&format!(
            "{}. {}{}\n   found: {}\n   => {}\n",
            i + 1,
            s.map.map(|m| format!("{m}[")).unwrap_or_default(),
            if s.map.is_some() {
                format!("{}]", s.lookup)
            } else {
                s.lookup.clone()
            },
            s.found,
            s.then
        ));
    }
    out.push_str(&format!(
        "\nkernel: {}{}\n",
        doc.kernel.reason,
        doc.kernel
            .rewrite
            .map(|r| format!(", rewrite {} -> {r}", doc.to))
            .unwrap_or_else(|| ", destination untouched".into())
    ));
    out.push_str(&format!("result: {}\n", doc.verdict.summary));
    out
}

pub fn run(ctx: &Ctx, args: &ExplainArgs) -> Result<(), CtlError> {
    let doc = collect(ctx, args)?;
    ctx.print(&doc, || render(&doc));
    Ok(())
}
