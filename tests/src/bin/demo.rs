//! The mini-cluster demo: a sandbox that forks one service, requests with and without its
//! routing key, and where each one lands. Everything it creates is removed at the end.

use std::process::ExitCode;

use anyhow::Result;
use redirect_tests::{MiniCluster, SetupError, scene::*};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mc = match MiniCluster::new() {
        Ok(mc) => mc,
        Err(SetupError::Skip(why)) => anyhow::bail!("the demo needs {why}"),
        Err(SetupError::Failed(e)) => return Err(e),
    };
    println!(
        "mini-cluster {}: node + 5 pods (network namespaces), services checkout, catalog, frontend",
        mc.id()
    );
    let shop = Shop::with_agent(&mc, true)?;
    println!(
        "sandbox {SANDBOX_KEY} forks frontend and checkout; agent attached at {}\n",
        mc.cgroup_root().display()
    );

    let key = format!("baggage: routing-key={SANDBOX_KEY}");
    let rows: [(&str, &redirect_tests::Pod<'_>, &str, &str, Option<&str>); 6] = [
        (
            "client (baseline pod)",
            &shop.client,
            CHECKOUT_VIP4,
            "checkout",
            None,
        ),
        (
            "client (baseline pod)",
            &shop.client,
            CHECKOUT_VIP4,
            "checkout",
            Some(&key),
        ),
        (
            "client (baseline pod)",
            &shop.client,
            CATALOG_VIP4,
            "catalog",
            Some(&key),
        ),
        (
            "frontend-fork (in feature-x)",
            &shop.frontend_fork,
            CHECKOUT_VIP4,
            "checkout",
            None,
        ),
        (
            "frontend-fork (in feature-x)",
            &shop.frontend_fork,
            CATALOG_VIP4,
            "catalog",
            None,
        ),
        (
            "frontend-fork (in feature-x)",
            &shop.frontend_fork,
            CHECKOUT_VIP6,
            "checkout",
            None,
        ),
    ];
    println!(
        "{:<30} {:<27} {:<32} served by",
        "caller", "request", "header"
    );
    for (who, pod, ip, svc, header) in rows {
        let body = get_with(pod, ip, "", header)?;
        println!(
            "{who:<30} {:<27} {:<32} {}",
            format!("{svc} ({ip})"),
            header.unwrap_or("-"),
            body.trim()
        );
    }
    println!(
        "\nbaseline pods reach forks per request, through the node router, when the request \
         carries the key;\nfork pods reach forks from the kernel at connect(), and baseline for \
         services their sandbox does not fork."
    );
    let counters = shop.agent.as_ref().expect("agent").counters()?;
    let moved: Vec<String> = counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("\nkernel decisions: {}", moved.join(" "));
    drop(shop);
    drop(mc);
    println!("cleaned up: namespaces, cgroups, programs, links and pins removed");
    Ok(())
}
