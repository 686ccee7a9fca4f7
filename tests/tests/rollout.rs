//! Upgrades drop nothing: the agent (the workspace binary here; the container image in
//! `container.rs`) is upgraded and rolled back while clients keep calling a forked service with
//! and without the routing key. Every connect must succeed, every request must be answered, and
//! every answer must come from where its key says.

use redirect_tests::{MiniCluster, agent::SourceMode, rollout, scene::*};

const TOOLS: &[&str] = &["curl", "python3"];

#[test]
fn an_upgrade_and_a_rollback_refuse_no_connection_fail_no_request_and_misroute_nothing() {
    let Some(mc) = MiniCluster::new_or_skip("rollout", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    let figures = rollout::upgrade_and_roll_back(&mc, &mut shop, 12).unwrap();
    println!(
        "rollout (processes): {} (old agent exited {:?} after SIGTERM on upgrade, {:?} on rollback)",
        figures.clients, figures.upgrade, figures.rollback
    );
    rollout::assert_dropped_nothing(&figures, &shop.agent().log());
}
