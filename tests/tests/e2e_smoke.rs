use std::time::Duration;

use redirect_tests::{MiniCluster, scene::*};

#[test]
fn smoke() {
    let Some(mc) = MiniCluster::new_or_skip("smoke", &["curl"]) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    println!(
        "fork->checkout: {}",
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap()
    );
    println!(
        "fork->catalog: {}",
        get(&shop.frontend_fork, CATALOG_VIP4, "").unwrap()
    );
    println!(
        "client->checkout: {}",
        get(&shop.client, CHECKOUT_VIP4, "peer").unwrap()
    );
    println!(
        "fork6->checkout: {}",
        get(&shop.frontend_fork, CHECKOUT_VIP6, "").unwrap()
    );
    println!(
        "client6->checkout: {}",
        get(&shop.client, CHECKOUT_VIP6, "peer").unwrap()
    );
    println!("{:?}", shop.agent().counters().unwrap());
    println!("{}", shop.agent().log());
}
