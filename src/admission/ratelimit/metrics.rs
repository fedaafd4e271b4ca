//! The rate limiter's metrics: decisions by policy, source and result, fallbacks, Redis
//! errors; handles made once per policy so a decision only increments.

use super::*;

/// Label values in snake case, as Prometheus labels usually are.
macro_rules! label_values {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(match self {
                    $(<$ty>::$variant => $text),+
                })
            }
        }
    };
}

label_values!(Source { Redis => "redis", Memory => "memory", FailOpen => "fail_open" });
label_values!(Outcome { Allowed => "allowed", Limited => "limited" });
label_values!(FallbackTo { Memory => "memory", Redis => "redis" });

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct DecisionLabels {
    pub(super) policy: String,
    pub(super) result: Outcome,
    pub(super) source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum FallbackTo {
    Memory,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct PolicyLabels {
    pub(super) policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TransitionLabels {
    pub(super) to: FallbackTo,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ErrorLabels {
    pub(super) kind: &'static str,
}

/// `rampart_ratelimit_*`. Labels: policy names from the config, small enums.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(super) decisions: Family<DecisionLabels, Counter>,
    /// `max_streams` decisions, with the labels of `decisions`.
    pub(super) stream_decisions: Family<DecisionLabels, Counter>,
    pub(super) streams_held: Family<PolicyLabels, Gauge>,
    pub(super) transitions: Family<TransitionLabels, Counter>,
    /// 1 while Redis is skipped (breaker open).
    pub(super) fallback_active: Gauge,
    pub(super) redis_seconds: Histogram,
    pub(super) redis_errors: Family<ErrorLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut PromRegistry) -> Metrics {
        let reg = registry.sub_registry_with_prefix("ratelimit");
        let m = Metrics {
            decisions: Family::default(),
            stream_decisions: Family::default(),
            streams_held: Family::default(),
            transitions: Family::default(),
            fallback_active: Gauge::default(),
            redis_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
            ]),
            redis_errors: Family::default(),
        };
        // No `_total` suffix: the encoder adds it to counters.
        reg.register(
            "decisions",
            "Rate-limit decisions by policy, result (allowed|limited) and source (redis|memory|fail_open)",
            m.decisions.clone(),
        );
        reg.register(
            "stream_decisions",
            "max_streams decisions by policy, result (allowed|limited) and source (redis|memory|fail_open)",
            m.stream_decisions.clone(),
        );
        reg.register(
            "streams_held",
            "Stream permits this replica holds, by policy",
            m.streams_held.clone(),
        );
        reg.register(
            "fallback_transitions",
            "Switches of the Redis policies between Redis and the memory fallback",
            m.transitions.clone(),
        );
        reg.register(
            "fallback_active",
            "1 while Redis is skipped and Redis policies are decided in memory",
            m.fallback_active.clone(),
        );
        reg.register(
            "redis_call_seconds",
            "Duration of rate-limit calls to Redis, check-out included",
            m.redis_seconds.clone(),
        );
        reg.register(
            "redis_errors",
            "Failed rate-limit calls to Redis by kind (timeout|error)",
            m.redis_errors.clone(),
        );
        m
    }

    pub(super) fn transition(&self, t: Transition) {
        let (to, active) = match t {
            Transition::ToMemory => (FallbackTo::Memory, 1),
            Transition::ToRedis => (FallbackTo::Redis, 0),
        };
        self.transitions
            .get_or_create(&TransitionLabels { to })
            .inc();
        self.fallback_active.set(active);
    }

    pub(super) fn redis_errors(&self, kind: &'static str) -> Counter {
        self.redis_errors
            .get_or_create(&ErrorLabels { kind })
            .clone()
    }

    /// Handles for one policy, made once so a decision does not allocate labels.
    pub(super) fn counters(
        &self,
        family: &Family<DecisionLabels, Counter>,
        policy: &str,
    ) -> DecisionCounters {
        let get = |result, source| {
            family
                .get_or_create(&DecisionLabels {
                    policy: policy.to_owned(),
                    result,
                    source,
                })
                .clone()
        };
        DecisionCounters {
            redis: [
                get(Outcome::Allowed, Source::Redis),
                get(Outcome::Limited, Source::Redis),
            ],
            memory: [
                get(Outcome::Allowed, Source::Memory),
                get(Outcome::Limited, Source::Memory),
            ],
            fail_open: get(Outcome::Allowed, Source::FailOpen),
        }
    }
}

pub(super) struct DecisionCounters {
    /// [allowed, limited]
    pub(super) redis: [Counter; 2],
    pub(super) memory: [Counter; 2],
    pub(super) fail_open: Counter,
}

impl DecisionCounters {
    pub(super) fn count(&self, source: Source, allowed: bool) {
        let i = usize::from(!allowed);
        match source {
            Source::Redis => self.redis[i].inc(),
            Source::Memory => self.memory[i].inc(),
            Source::FailOpen => self.fail_open.inc(),
        };
    }
}
