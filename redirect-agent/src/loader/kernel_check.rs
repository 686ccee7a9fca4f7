//! What the programs need from the kernel, probed before anything is loaded. A kernel that lacks
//! something is refused with its name and the Linux version that brought it, instead of failing
//! deep in a load or, worse, at run time. Probes load no program of ours: each is the kernel's
//! answer to a minimal program or map of the type in question (aya's feature probes).
//!
//! Not probed here: the `getpeername` hooks and cgroup BPF links (both Linux 5.8 and 5.7); a
//! kernel without them fails the load or attach with a message naming the program.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// One thing the programs use.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub what: &'static str,
    /// The Linux version that brought it (or the oldest one known to have it).
    pub since: &'static str,
    probe: Probe,
}

#[derive(Clone, Copy, Debug)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
}

const SOCK_ADDR: ProgramType = ProgramType::CgroupSockAddr;

/// Everything probed, in the order reported.
pub const NEEDS: [Need; 12] = [
    Need {
        what: "cgroup socket-address programs (connect4/6, getpeername4/6)",
        since: "Linux 4.17",
        probe: Probe::Program(SOCK_ADDR),
    },
    Need {
        what: "sock_ops programs",
        since: "Linux 4.13",
        probe: Probe::Program(ProgramType::SockOps),
    },
    Need {
        what: "LRU hash maps (origin_cache_v1)",
        since: "Linux 4.10",
        probe: Probe::Map(MapType::LruHash),
    },
    Need {
        what: "sockmaps (router_socks_v1)",
        since: "Linux 4.14",
        probe: Probe::Map(MapType::SockMap),
    },
    Need {
        what: "socket storage (sock_records_v1)",
        since: "Linux 5.2",
        probe: Probe::Map(MapType::SkStorage),
    },
    Need {
        what: "ring buffers (trace_events_v1)",
        since: "Linux 5.8",
        probe: Probe::Map(MapType::RingBuf),
    },
    Need {
        what: "bpf_get_current_cgroup_id in socket-address programs",
        since: "Linux 5.7",
        probe: Probe::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_current_cgroup_id),
    },
    Need {
        what: "bpf_get_current_ancestor_cgroup_id in socket-address programs",
        since: "Linux 5.7",
        probe: Probe::Helper(
            SOCK_ADDR,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    },
    Need {
        what: "bpf_sk_storage_get in socket-address programs",
        since: "present in Linux 5.10",
        probe: Probe::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Need {
        what: "bpf_ringbuf_output in socket-address programs",
        since: "Linux 5.8",
        probe: Probe::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_ringbuf_output),
    },
    Need {
        what: "bpf_sk_storage_get in sock_ops programs",
        since: "Linux 5.2",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Need {
        what: "bpf_get_socket_cookie in socket-address programs (peer_slots_v1)",
        since: "Linux 5.0",
        probe: Probe::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_socket_cookie),
    },
];

/// A probe's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Yes,
    No,
    /// The probe itself failed (no permission, say): not held against the kernel.
    Unknown(String),
}

/// Every need with the kernel's answer.
#[derive(Clone, Debug)]
pub struct Report {
    /// `uname -r`.
    pub release: String,
    pub answers: Vec<(Need, Answer)>,
}

impl Report {
    /// What the kernel said it lacks.
    pub fn missing(&self) -> impl Iterator<Item = &Need> {
        self.answers
            .iter()
            .filter(|(_, a)| *a == Answer::No)
            .map(|(n, _)| n)
    }

    /// Why this kernel cannot run the programs, or `None` when nothing is missing.
    pub fn refusal(&self) -> Option<String> {
        let missing: Vec<String> = self
            .missing()
            .map(|n| format!("{} ({})", n.what, n.since))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "kernel {} lacks what the programs need: {}",
                self.release,
                missing.join(", ")
            )
        })
    }
}

/// Asks the kernel about every need.
pub fn probe() -> Report {
    let answer = |ok: Result<bool, String>| match ok {
        Ok(true) => Answer::Yes,
        Ok(false) => Answer::No,
        Err(e) => Answer::Unknown(e),
    };
    let answers = NEEDS
        .iter()
        .map(|n| {
            let a = match n.probe {
                Probe::Program(t) => answer(is_program_supported(t).map_err(|e| e.to_string())),
                Probe::Map(t) => answer(is_map_supported(t).map_err(|e| e.to_string())),
                Probe::Helper(t, h) => answer(is_helper_supported(t, h).map_err(|e| e.to_string())),
            };
            (*n, a)
        })
        .collect();
    Report {
        release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "(unknown release)".into()),
        answers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(answers: &[Answer]) -> Report {
        Report {
            release: "5.4.0-test".into(),
            answers: NEEDS.iter().copied().zip(answers.iter().cloned()).collect(),
        }
    }

    #[test]
    fn a_kernel_with_everything_is_not_refused_and_unknowns_do_not_count() {
        let mut all = vec![Answer::Yes; NEEDS.len()];
        assert_eq!(report(&all).refusal(), None);
        all[0] = Answer::Unknown("EPERM".into());
        assert_eq!(report(&all).refusal(), None);
    }

    #[test]
    fn a_refusal_names_each_missing_need_with_its_version_and_the_kernel() {
        let mut answers = vec![Answer::Yes; NEEDS.len()];
        answers[5] = Answer::No;
        answers[9] = Answer::No;
        let why = report(&answers).refusal().unwrap();
        assert_eq!(
            why,
            "kernel 5.4.0-test lacks what the programs need: ring buffers (trace_events_v1) \
             (Linux 5.8), bpf_ringbuf_output in socket-address programs (Linux 5.8)"
        );
    }
}
