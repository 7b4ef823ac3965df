//! Verification reports: what was checked, what was found, and the fix for each gap. Used by
//! `sluice setup check` and `sluice source check`.

use serde::Serialize;

/// One verification finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked (`connect`, `database`, `read_role`, `schema "stripe"`, …).
    pub check: String,
    /// True when nothing needs doing.
    pub ok: bool,
    /// What was found.
    pub message: String,
    /// The SQL (or action) that fixes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Everything `setup check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Findings in the order checked.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// True when nothing needs fixing.
    pub fn is_ok(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    /// The names of the checks that need fixing, in order.
    pub fn failing(&self) -> Vec<&str> {
        self.findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| f.check.as_str())
            .collect()
    }

    /// A report for a person: one line per check, the fix under each problem.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!(
                "{} {}: {}\n",
                if f.ok { "ok " } else { "FIX" },
                f.check,
                f.message
            ));
            if let Some(fix) = &f.fix {
                for line in fix.lines() {
                    out.push_str(&format!("      {line}\n"));
                }
            }
        }
        let problems = self.findings.iter().filter(|f| !f.ok).count();
        out.push_str(&if problems == 0 {
            "nothing to fix\n".to_owned()
        } else {
            format!("{problems} thing(s) to fix\n")
        });
        out
    }

    /// Records a finding (the fix is kept only when something is wrong).
    pub fn push(
        &mut self,
        check: impl Into<String>,
        ok: bool,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            check: check.into(),
            ok,
            message: message.into(),
            fix: if ok { None } else { fix },
        });
    }
}
