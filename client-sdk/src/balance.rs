//! Client-side load balancing over a service's instances: [`RoundRobin`]
//! and [`PowerOfTwoChoices`]. Both take the instance list of a
//! [`ResolvedService`](crate::ResolvedService) at each pick, so they follow
//! a [`ServiceWatch`](crate::ServiceWatch) as its endpoint set changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::services::ServiceInstance;

/// Weight of an instance as the registry defines it: 0 (unset) means 100
/// (`registry.proto`, `Instance.weight`).
fn effective_weight(instance: &ServiceInstance) -> u32 {
    if instance.weight == 0 {
        100
    } else {
        instance.weight
    }
}

/// Picks instances in turn, in proportion to their weights: smooth
/// weighted round robin, as nginx does it. Each pick adds every instance's
/// weight to its running score, takes the instance with the highest score
/// (the first on a tie) and subtracts the total weight from it. Weights
/// 5:1:1 give `a a b a c a a` — the heavy instance's turns are spread out
/// rather than bunched — and equal weights visit the instances in order.
///
/// The scores are kept per instance (tenant and id), so they carry over
/// when the set changes; an instance that joins starts at 0.
///
/// ```
/// use strata_client::RoundRobin;
/// # let instances: Vec<strata_client::ServiceInstance> = Vec::new();
/// let balancer = RoundRobin::new();
/// assert!(balancer.pick(&instances).is_none(), "nothing to pick from");
/// ```
#[derive(Debug, Default)]
pub struct RoundRobin {
    peers: Mutex<Vec<Peer>>,
}

/// An instance's running score.
#[derive(Debug)]
struct Peer {
    tenant: String,
    id: String,
    current: i64,
}

impl Peer {
    fn is(&self, instance: &ServiceInstance) -> bool {
        self.id == instance.id && self.tenant == instance.tenant
    }
}

impl RoundRobin {
    /// A balancer starting at the first instance.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next instance by weight, or `None` when there is none.
    pub fn pick<'a>(&self, instances: &'a [ServiceInstance]) -> Option<&'a ServiceInstance> {
        if instances.is_empty() {
            return None;
        }
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The usual case is the same set as last time, in the same order;
        // only a changed set pays for re-matching the scores.
        let same =
            peers.len() == instances.len() && peers.iter().zip(instances).all(|(p, i)| p.is(i));
        if !same {
            let mut old = std::mem::take(&mut *peers);
            *peers = instances
                .iter()
                .map(|i| Peer {
                    tenant: i.tenant.clone(),
                    id: i.id.clone(),
                    current: old
                        .iter()
                        .position(|p| p.is(i))
                        .map_or(0, |at| old.swap_remove(at).current),
                })
                .collect();
        }
        let mut total = 0i64;
        let mut best = 0usize;
        let mut best_score = i64::MIN;
        for (at, (peer, instance)) in peers.iter_mut().zip(instances).enumerate() {
            let weight = i64::from(effective_weight(instance));
            peer.current += weight;
            total += weight;
            // Strictly greater: the first instance wins a tie.
            if peer.current > best_score {
                best = at;
                best_score = peer.current;
            }
        }
        peers[best].current -= total;
        instances.get(best)
    }
}

/// Power of two choices: picks two instances at random and takes the one
/// with fewer requests in flight (relative to its weight). Near-optimal
/// spreading without global state; the in-flight count is this process's
/// own, kept by the [`InFlight`] guards it hands out.
#[derive(Debug, Default)]
pub struct PowerOfTwoChoices {
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// A picked instance, counted as in flight until dropped: keep it for the
/// duration of the request.
#[derive(Debug)]
pub struct InFlight {
    instance: ServiceInstance,
    counter: Arc<AtomicUsize>,
}

impl InFlight {
    /// The instance picked.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PowerOfTwoChoices {
    /// A balancer with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks an instance, or `None` when there is none.
    pub fn pick(&self, instances: &[ServiceInstance]) -> Option<InFlight> {
        let chosen = match instances.len() {
            0 => return None,
            1 => &instances[0],
            n => {
                let a = rand::random_range(0..n);
                // A second, different index: uniform over the other n-1.
                let b = (a + 1 + rand::random_range(0..n - 1)) % n;
                let mut map = self.lock();
                let load =
                    |i: &ServiceInstance| map.get(&key(i)).map_or(0, |c| c.load(Ordering::Acquire));
                let (ia, ib) = (&instances[a], &instances[b]);
                // Compare load/weight without division: la/wa <= lb/wb.
                let (la, lb) = (load(ia) as u64, load(ib) as u64);
                let (wa, wb) = (
                    u64::from(effective_weight(ia)),
                    u64::from(effective_weight(ib)),
                );
                let chosen = if la * wb <= lb * wa { ia } else { ib };
                // Forget instances that left the set and have nothing in
                // flight, so the map does not grow with churn.
                if map.len() > 4 * n + 16 {
                    let live: std::collections::HashSet<String> =
                        instances.iter().map(key).collect();
                    map.retain(|k, c| live.contains(k) || c.load(Ordering::Acquire) > 0);
                }
                drop(map);
                chosen
            }
        };
        let counter = Arc::clone(self.lock().entry(key(chosen)).or_default());
        counter.fetch_add(1, Ordering::AcqRel);
        Some(InFlight {
            instance: chosen.clone(),
            counter,
        })
    }

    /// Requests in flight to an instance, as this balancer counts them.
    pub fn in_flight(&self, instance: &ServiceInstance) -> usize {
        self.lock()
            .get(&key(instance))
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicUsize>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn key(instance: &ServiceInstance) -> String {
    format!("{}/{}", instance.tenant, instance.id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn instance(id: &str, weight: u32) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            tenant: "integration".into(),
            endpoints: BTreeMap::new(),
            metadata: BTreeMap::new(),
            weight,
            version: String::new(),
        }
    }

    #[test]
    fn round_robin_visits_every_instance_in_turn() {
        let set = [instance("a", 100), instance("b", 100), instance("c", 100)];
        let rr = RoundRobin::new();
        let picks: Vec<&str> = (0..6).map(|_| rr.pick(&set).unwrap().id.as_str()).collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let set = [instance("a", 5), instance("b", 1), instance("c", 1)];
        let rr = RoundRobin::new();
        let picks: Vec<&str> = (0..14)
            .map(|_| rr.pick(&set).unwrap().id.as_str())
            .collect();
        // nginx's sequence for 5:1:1, twice: the scores are back at zero
        // after every full cycle of 7.
        assert_eq!(
            picks,
            [
                "a", "a", "b", "a", "c", "a", "a", "a", "a", "b", "a", "c", "a", "a"
            ]
        );
    }

    #[test]
    fn round_robin_reads_weight_zero_as_the_default_100() {
        // 0 means 100 (registry.proto), so 0 against 100 is an even split,
        // and 0 against 300 is 1:3.
        let rr = RoundRobin::new();
        let even = [instance("a", 0), instance("b", 100)];
        let picks: Vec<&str> = (0..4)
            .map(|_| rr.pick(&even).unwrap().id.as_str())
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        let rr = RoundRobin::new();
        let set = [instance("light", 0), instance("heavy", 300)];
        let heavy = (0..400)
            .filter(|_| rr.pick(&set).unwrap().id == "heavy")
            .count();
        assert_eq!(heavy, 300);
    }

    #[test]
    fn round_robin_keeps_scores_across_a_changed_set() {
        let rr = RoundRobin::new();
        let (a, b, c) = (instance("a", 100), instance("b", 100), instance("c", 100));
        assert_eq!(rr.pick(&[a.clone(), b.clone()]).unwrap().id, "a");
        // c joins: b, which has waited, goes before a and the newcomer.
        let set = [a, b, c];
        let picks: Vec<&str> = (0..3).map(|_| rr.pick(&set).unwrap().id.as_str()).collect();
        assert_eq!(picks, ["b", "c", "a"]);
        assert!(rr.pick(&[]).is_none());
    }

    #[test]
    fn two_choices_avoid_the_busy_instance() {
        let set = [instance("a", 100), instance("b", 100)];
        let p2c = PowerOfTwoChoices::new();
        // Hold 5 requests on whichever comes first, then every new pick must
        // go to the other one until they are level.
        let first = p2c.pick(&set).unwrap();
        let busy = first.instance().id.clone();
        let mut held = vec![first];
        for _ in 0..4 {
            let p = p2c.pick(&set).unwrap();
            held.push(p);
        }
        let counts: Vec<usize> = set.iter().map(|i| p2c.in_flight(i)).collect();
        assert_eq!(counts.iter().sum::<usize>(), 5);
        assert!(
            counts.iter().all(|&c| c >= 2),
            "spread: {counts:?} (first was {busy})"
        );
        drop(held);
        assert!(set.iter().all(|i| p2c.in_flight(i) == 0), "guards release");
    }

    #[test]
    fn two_choices_follow_weights() {
        let set = [instance("heavy", 300), instance("light", 100)];
        let p2c = PowerOfTwoChoices::new();
        let held: Vec<InFlight> = (0..400).map(|_| p2c.pick(&set).unwrap()).collect();
        let heavy = p2c.in_flight(&set[0]);
        assert!((290..=310).contains(&heavy), "heavy got {heavy} of 400");
        drop(held);
        assert!(p2c.pick(&[]).is_none());
    }
}
