//! Starting and driving the real protocol peers in `tests/peers/` (gRPC, WebSocket, opaque TCP)
//! inside mini-cluster pods.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{MiniCluster, Pod, Proc, SetupError, or_skip, require_tools};

pub const GRPC_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/grpc_peer.py");
pub const WS_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/ws_peer.py");
pub const OPAQUE_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/opaque_peer.py");

/// How long a server may take to print "listening".
pub const READY: Duration = Duration::from_secs(20);
/// How long one client run may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the Python modules the peers need are installed (`./x setup` installs them).
pub fn python_modules_present() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, websockets"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A cluster for a test that runs the Python peers, or `None` after printing `SKIP` when the
/// machine cannot run it: not root, one of `tools` missing or the Python modules missing.
pub fn peer_cluster_or_skip(test: &str, tools: &[&str]) -> Option<MiniCluster> {
    let setup = if python_modules_present() {
        require_tools(tools).and_then(|()| MiniCluster::new())
    } else {
        Err(SetupError::Skip(
            "Python modules grpc, grpc_tools or websockets missing (`./x setup` installs \
             tests/peers/requirements.txt)"
                .into(),
        ))
    };
    or_skip(test, setup)
}

/// `ip4:port` and `[ip6]:port` of `pod`.
pub fn listen_addrs(pod: &Pod<'_>, port: u16) -> [String; 2] {
    [
        format!("{}:{port}", pod.ip4()),
        format!("[{}]:{port}", pod.ip6()),
    ]
}

/// Starts `argv` in `pod` and waits until it prints "listening" (like `Pod::spawn_server`).
pub fn spawn_listening(pod: &Pod<'_>, argv: &[&str]) -> Proc {
    let mut server = pod.spawn(argv).unwrap();
    server.wait_for_log("listening", READY).unwrap();
    server
}

/// A Python peer server (`script server --name NAME --listen ip4 --listen ip6 EXTRA..`).
pub fn peer_server(pod: &Pod<'_>, script: &str, name: &str, port: u16, extra: &[&str]) -> Proc {
    server(pod, &["python3", script], name, port, extra)
}

/// An `h2peer` server (the binary at `bin`) in `pod` on `port`, answering as `name`, with
/// `extra` arguments.
pub fn h2peer_server(pod: &Pod<'_>, bin: &str, name: &str, port: u16, extra: &[&str]) -> Proc {
    server(pod, &[bin], name, port, extra)
}

/// `program.. server --name NAME --listen ip4 --listen ip6 EXTRA..` in `pod`, once listening.
fn server(pod: &Pod<'_>, program: &[&str], name: &str, port: u16, extra: &[&str]) -> Proc {
    let [l4, l6] = listen_addrs(pod, port);
    let mut argv = program.to_vec();
    argv.extend_from_slice(&["server", "--name", name, "--listen", &l4, "--listen", &l6]);
    argv.extend_from_slice(extra);
    spawn_listening(pod, &argv)
}

/// Runs `argv` in `pod`, expecting success, and parses its stdout as JSON.
pub fn run_json(pod: &Pod<'_>, argv: &[&str]) -> Value {
    let out = pod.run(argv, TIMEOUT).unwrap().check().unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// A JSON list of strings.
pub fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// Sends `request` as is over one connection from `pod` and returns all it got back.
pub fn raw_http(pod: &Pod<'_>, ip: &str, port: u16, request: &str) -> String {
    let script = "import socket, sys\n\
         s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n\
         s.sendall(sys.argv[3].encode())\n\
         data = b''\n\
         while True:\n    c = s.recv(65536)\n    if not c: break\n    data += c\n\
         sys.stdout.write(data.decode())\n";
    pod.run(
        &["python3", "-c", script, ip, &port.to_string(), request],
        TIMEOUT,
    )
    .unwrap()
    .check()
    .unwrap()
}
