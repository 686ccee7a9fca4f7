//! redirectctl: see why a connection or request went where it did, on this node.
//! `redirectctl --help` lists the commands; `docs/debugging.md` walks through them.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use redirect_agent::admin::access::Token;
use redirect_agent::ctl::{
    self, AdminClient, CtlError, Ctx, ErrorDoc, Format, explain::ExplainArgs, trace::TraceArgs,
};

#[derive(Parser)]
#[command(
    version,
    about = "Debug redirect on this node: what the kernel and the router decide, and why",
    long_about = "Debug redirect on this node. Reads the pinned eBPF maps directly (works while \
the agent is down; needs root) and adds names from the agent's admin API when it answers."
)]
struct Cli {
    /// Directory of the agent's pins.
    #[arg(
        long,
        env = "REDIRECT_PIN_DIR",
        default_value = "/sys/fs/bpf/redirect",
        global = true
    )]
    pin_dir: PathBuf,
    /// The agent's admin endpoint.
    #[arg(
        long,
        env = "REDIRECT_ADMIN",
        default_value = "http://127.0.0.1:9967",
        global = true
    )]
    admin: String,
    /// How long to wait for the admin endpoint, in milliseconds.
    #[arg(
        long,
        env = "REDIRECT_ADMIN_TIMEOUT_MS",
        default_value_t = 2000,
        global = true
    )]
    admin_timeout_ms: u64,
    /// File holding the agent's admin bearer token, when the agent was started with
    /// --admin-token-file (the same variable, so inside the agent's pod it is already set).
    #[arg(long, env = "REDIRECT_ADMIN_TOKEN_FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// Output format.
    #[arg(
        short,
        long,
        env = "REDIRECTCTL_OUTPUT",
        value_enum,
        default_value = "table",
        global = true
    )]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Programs and links (where attached, since when), router liveness, map fill, tracing,
    /// agent reachability and last sync.
    Status,
    /// Forked service ports the kernel knows (services_v1).
    Services,
    /// Routing keys and their sandboxes, with what the kernel holds for each.
    Sandboxes,
    /// Which key forks which service, with ready endpoints (forks_v1).
    Routes,
    /// Every ready fork endpoint, and the router addresses.
    Endpoints,
    /// Fork pods: cgroup → routing key (workloads_v1), with cgroup path and pod.
    Workloads,
    /// Original destinations recorded for the router and not picked up yet (conns_v1).
    Conns,
    /// Kernel decision counters per reason, trace counters, router outcome counters.
    Counters,
    /// Walk the kernel's (and the router's) decision for one caller and destination.
    Explain {
        /// The caller: a pod uid, a pod `namespace/name` (needs the agent), a cgroup path
        /// (absolute, or relative to the cgroup2 mount), or a pid.
        #[arg(long, env = "REDIRECTCTL_FROM")]
        from: String,
        /// Destination ip:port (`[v6]:port` for IPv6).
        #[arg(long, env = "REDIRECTCTL_TO")]
        to: SocketAddr,
        /// Routing key the requests carry (for the router's per-request decision).
        #[arg(long, env = "REDIRECTCTL_KEY")]
        key: Option<String>,
        /// SO_MARK of the connecting socket (decimal or 0x hex).
        #[arg(long, env = "REDIRECTCTL_MARK", default_value = "0", value_parser = parse_u32)]
        mark: u32,
    },
    /// Stream the kernel's connect() decisions live (tracing is on only while this runs).
    Trace {
        /// Only this service: `namespace/name[:port]` or `name` (needs the agent), or an
        /// address `ip` / `ip:port` (matches before or after translation).
        #[arg(long, env = "REDIRECTCTL_SERVICE")]
        service: Option<String>,
        /// Only callers in this sandbox (routing key or sandbox name) and services it forks.
        #[arg(long, env = "REDIRECTCTL_SANDBOX")]
        sandbox: Option<String>,
        /// Also show not_forked decisions (every TCP connect on the node).
        #[arg(long, env = "REDIRECTCTL_TRACE_ALL")]
        all: bool,
        /// Stop after this many events.
        #[arg(long, env = "REDIRECTCTL_COUNT")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, env = "REDIRECTCTL_DURATION")]
        duration: Option<u64>,
    },
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

/// Reports a failure: with `-o json` one [`ErrorDoc`] on stdout, else a line on stderr.
fn fail(json: bool, kind: &str, error: impl std::fmt::Display, code: u8) -> ExitCode {
    if json {
        println!("{}", ErrorDoc::new(kind, error).to_json());
    } else {
        eprintln!("redirectctl: {error}");
    }
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let usage = !matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            let env = std::env::var("REDIRECTCTL_OUTPUT").ok();
            if usage && ctl::json_requested(&args, env.as_deref()) {
                // clap's first line says what is wrong; the rest is usage text for a person.
                let rendered = e.render().to_string();
                let first = rendered.lines().next().unwrap_or("invalid arguments");
                return fail(true, "usage", first.trim_start_matches("error: "), 2);
            }
            e.exit()
        }
    };
    let json = matches!(cli.output, Output::Json);
    if !nix::unistd::geteuid().is_root() {
        let e = format!(
            "must run as root (it reads pinned eBPF maps under {}); try sudo",
            cli.pin_dir.display()
        );
        return fail(json, "not_root", e, 2);
    }
    let admin = match AdminClient::new(&cli.admin, Duration::from_millis(cli.admin_timeout_ms)) {
        Ok(a) => a,
        Err(e) => return fail(json, "admin_address", format!("--admin {e}"), 2),
    };
    let admin = match cli.admin_token_file.as_deref().map(Token::from_file) {
        None => admin,
        Some(Ok(token)) => admin.with_token(token),
        Some(Err(e)) => return fail(json, "admin_token", e, 2),
    };
    let ctx = Ctx {
        pin_dir: cli.pin_dir,
        admin,
        format: match cli.output {
            Output::Table => Format::Table,
            Output::Json => Format::Json,
        },
    };
    let r: Result<(), CtlError> = match cli.command {
        Command::Status => ctl::status::run(&ctx),
        Command::Services => ctl::services::run(&ctx),
        Command::Sandboxes => ctl::sandboxes::run(&ctx),
        Command::Routes => ctl::routes::run(&ctx),
        Command::Endpoints => ctl::endpoints::run(&ctx),
        Command::Workloads => ctl::workloads::run(&ctx),
        Command::Conns => ctl::conns::run(&ctx),
        Command::Counters => ctl::counters::run(&ctx),
        Command::Explain {
            from,
            to,
            key,
            mark,
        } => ctl::explain::run(
            &ctx,
            &ExplainArgs {
                from,
                to,
                key,
                mark,
            },
        ),
        Command::Trace {
            service,
            sandbox,
            all,
            count,
            duration,
        } => ctl::trace::run(
            &ctx,
            &TraceArgs {
                service,
                sandbox,
                all,
                count,
                duration: duration.map(Duration::from_secs),
            },
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(json, e.kind(), &e, 1),
    }
}
