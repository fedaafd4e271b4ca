//! The token counts of one LLM answer, as the metrics (`http::RouteMetrics::tokens`) and the
//! access log take them. Found in the answer's body by `stream::usage`, which re-exports
//! this type; defined here because `stream` depends on `observe`, not the other way round.

/// Token counts of one answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
}

impl Usage {
    /// Both counts added, saturating.
    pub(crate) fn add(self, other: Usage) -> Usage {
        Usage {
            prompt: self.prompt.saturating_add(other.prompt),
            completion: self.completion.saturating_add(other.completion),
        }
    }
}
