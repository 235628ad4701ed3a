//! Plan before apply: commands that change more than one object print what
//! they will change, then ask. `--yes` skips the question; without a
//! terminal on stdin and without `--yes` they refuse, so a script never
//! changes things nobody looked at by accident.

use std::io::{BufRead, IsTerminal, Write};

use crate::ctx::Failure;

/// What a plan does to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Change {
    /// The object will be created.
    Create,
    /// The object will be changed.
    Update,
    /// The object will be removed.
    Delete,
    /// The object stays as it is.
    Unchanged,
}

impl Change {
    /// The one-character marker and word printed for the change.
    pub(crate) fn label(self) -> (&'static str, &'static str) {
        match self {
            Change::Create => ("+", "create"),
            Change::Update => ("~", "update"),
            Change::Delete => ("-", "delete"),
            Change::Unchanged => ("=", "unchanged"),
        }
    }
}

/// A list of changes to show before applying them.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// (change, object, detail), in the order they will be applied.
    pub(crate) items: Vec<(Change, String, String)>,
}

impl Plan {
    /// Adds one object's change.
    pub(crate) fn push(
        &mut self,
        change: Change,
        object: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.items.push((change, object.into(), detail.into()));
    }

    /// How many objects get `change`.
    pub(crate) fn count(&self, change: Change) -> usize {
        self.items.iter().filter(|(c, _, _)| *c == change).count()
    }

    /// Whether applying the plan would change anything.
    pub(crate) fn changes_anything(&self) -> bool {
        self.items.iter().any(|(c, _, _)| *c != Change::Unchanged)
    }

    /// The plan as people read it: a title, one line per object (unchanged
    /// objects only counted), and a summary.
    pub(crate) fn render(&self, title: &str) -> String {
        let mut text = format!("{title}\n");
        for (change, object, detail) in &self.items {
            if *change == Change::Unchanged {
                continue;
            }
            let (mark, word) = change.label();
            if detail.is_empty() {
                text.push_str(&format!("  {mark} {word:<9} {object}\n"));
            } else {
                text.push_str(&format!("  {mark} {word:<9} {object} ({detail})\n"));
            }
        }
        text.push_str(&format!(
            "Plan: {} to create, {} to update, {} to delete, {} unchanged.\n",
            self.count(Change::Create),
            self.count(Change::Update),
            self.count(Change::Delete),
            self.count(Change::Unchanged)
        ));
        text
    }

    /// The plan as JSON, for `--output json`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.items
                .iter()
                .map(|(change, object, detail)| {
                    serde_json::json!({
                        "change": change.label().1,
                        "object": object,
                        "detail": detail,
                    })
                })
                .collect(),
        )
    }
}

/// Asks before a change that `what` names (e.g. "apply these changes"):
/// `yes` skips the question; without a terminal it refuses with a usage
/// error (exit 2), like `tenant delete`.
pub(crate) fn confirm(what: &str, yes: bool) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "refusing to {what} without confirmation: stdin is not a terminal; \
             pass --yes to go ahead without asking (nothing was changed)"
        )));
    }
    eprint!("Do you want to {what}? [y/N] ");
    // The prompt has no newline; without a flush it may not show before the read.
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(Failure::Server("not confirmed; nothing was changed".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_changes_and_counts_unchanged() {
        let mut plan = Plan::default();
        plan.push(Change::Create, "a.json", "json");
        plan.push(Change::Unchanged, "b.json", "");
        plan.push(Change::Delete, "c.yaml", "");
        let text = plan.render("Plan for tenant t:");
        assert!(text.contains("+ create    a.json (json)"), "{text}");
        assert!(text.contains("- delete    c.yaml"), "{text}");
        assert!(!text.contains("b.json"), "{text}");
        assert!(
            text.contains("1 to create, 0 to update, 1 to delete, 1 unchanged"),
            "{text}"
        );
        assert!(plan.changes_anything());
    }
}
